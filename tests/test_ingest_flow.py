"""The `ingest_faces` flow as Prefect sees it: batches fanned out on a thread pool, a markdown
summary artifact, the `facetrace.faces.ingested` event, flow run ids on the rows it writes, progress
in its logs, and no warnings about the candidates it passes to its tasks."""

from __future__ import annotations

import logging
import pickle
import time
import warnings
from pathlib import Path

import pytest
from sqlalchemy import select

from facetrace.db.engine import get_engine, session_scope
from facetrace.db.models import Image, Rejection, Sighting, Source
from ingest_corpus import encode, noise_image, write_image_tree


@pytest.fixture
def inbox(tmp_path: Path) -> Path:
    folder = tmp_path / "inbox"
    write_image_tree(folder, 10, size=(32, 32))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    (folder / "copy.png").write_bytes((folder / "face_00000.png").read_bytes())
    return folder


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def prefect_logs():
    """Records of Prefect's loggers, run loggers down to INFO. Run records stop here instead of
    propagating to the console handler, whose stream may be an earlier test's closed capture."""
    handler = Records()
    quiet = logging.getLogger("prefect")
    runs = [logging.getLogger(name) for name in ("prefect.flow_runs", "prefect.task_runs")]
    saved = [(logger.level, logger.propagate) for logger in runs]
    quiet.addHandler(handler)
    for logger in runs:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    yield handler.records
    quiet.removeHandler(handler)
    for logger, (level, propagate) in zip(runs, saved):
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def test_flow_publishes_its_summary_artifact_and_the_ingested_event(prefect_harness, settings_env, inbox):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey
    from prefect.events.filters import EventFilter, EventNameFilter, EventRelatedFilter
    from prefect.events.worker import EventsWorker

    from facetrace.flows.ingest import INGESTED_EVENT, ingest_faces

    state = ingest_faces(kind="folder", path=str(inbox), label="real", return_state=True)
    assert state.is_completed()
    result = state.result()
    flow_run_id = str(state.state_details.flow_run_id)
    assert (result["seen"], result["new"], result["duplicate"], result["quarantined"]) == (12, 10, 1, 1)

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=["ingest-summary"]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    assert len(artifacts) == 1 and artifacts[0].type == "markdown"
    markdown = artifacts[0].data
    for row in ("| seen | 12 |", "| new | 10 |", "| duplicate | 1 |", "| quarantined | 1 |", "| truncated | 1 |"):
        assert row in markdown, markdown

    EventsWorker.drain_all(timeout=10)
    deadline, events = time.monotonic() + 20, []
    while time.monotonic() < deadline and not events:
        with get_client(sync_client=True) as client:
            events = client.read_events(EventFilter(
                event=EventNameFilter(name=[INGESTED_EVENT]),
                related=EventRelatedFilter(id=[f"prefect.flow-run.{flow_run_id}"])), limit=50).events
        if not events:
            time.sleep(0.5)
    assert len(events) == 1, f"no {INGESTED_EVENT} event related to flow run {flow_run_id}"
    event = events[0]
    assert event.resource.id == f"facetrace.source.folder.{result['source_id']}"
    assert event.resource["facetrace.source.kind"] == "folder"
    assert {k: event.payload[k] for k in ("seen", "new", "duplicate", "quarantined")} == {
        "seen": 12, "new": 10, "duplicate": 1, "quarantined": 1}
    assert event.payload["quarantined_by_reason"] == {"truncated": 1}


def test_batches_fan_out_as_task_runs_and_every_row_names_its_flow_run(
        prefect_harness, settings_env, inbox, prefect_logs):
    from prefect.cache_policies import NO_CACHE
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.task_runners import ThreadPoolTaskRunner

    from facetrace.flows.ingest import ingest_faces
    from facetrace.tasks.faces import download_kaggle, ingest_batch

    if settings_env.task_runner == "threads":
        assert isinstance(ingest_faces.task_runner, ThreadPoolTaskRunner)
        assert ingest_faces.task_runner._max_workers == settings_env.workers >= 2  # both cores
    # Candidates carry callables: no cache key may be computed from them, nothing persisted.
    assert ingest_batch.cache_policy is NO_CACHE and download_kaggle.cache_policy is NO_CACHE
    assert ingest_batch.retries >= 1

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state = ingest_faces(kind="folder", path=str(inbox), label="real", batch_size=5, return_state=True)
    assert state.is_completed()
    flow_run_id = str(state.state_details.flow_run_id)

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}))
    batches = [run for run in runs if run.name.startswith("ingest_batch")]
    assert len(batches) == 3 and all(run.state.is_completed() for run in batches)  # 12 files / 5 per batch

    with session_scope(get_engine(settings_env.catalog_url)) as session:
        for model in (Image, Sighting, Rejection, Source):
            assert set(session.scalars(select(model.flow_run_id))) == {flow_run_id}, model.__name__

    ours = [w for w in caught if raised_by_us_or_prefect(w.filename)]
    assert not ours, [f"{w.filename}:{w.lineno}: {w.message}" for w in ours]
    complaints = [r.getMessage() for r in prefect_logs if r.levelno >= logging.WARNING]
    assert not complaints, complaints
    progress = [r.getMessage() for r in prefect_logs if r.getMessage().startswith("progress:")]
    assert progress and progress[-1].startswith("progress: 12 of 12 files")  # stderr is no terminal here


REPO = Path(__file__).resolve().parents[1]
OUR_SOURCES = ("facetrace", "flows", "tasks", "db", "expectations", "deployments")


def raised_by_us_or_prefect(filename: str) -> bool:
    """Whether a warning came from this repository's code or from Prefect itself.

    Decided by where the file lies, not by its name containing "facetrace": a clone in a folder of
    that name holds the virtual environment too, and SQLAlchemy's own warnings are not ours.
    """
    path = Path(filename).resolve()
    if "site-packages" in path.parts:
        return path.parts[path.parts.index("site-packages") + 1:][:1] == ("prefect",)
    try:
        return path.relative_to(REPO).parts[0] in OUR_SOURCES
    except ValueError:
        return False


def test_warning_origin_depends_on_the_file_not_on_the_clone_folder_name() -> None:
    venv_file = REPO / ".venv" / "lib" / "python3.11" / "site-packages" / "sqlalchemy" / "engine" / "result.py"
    assert not raised_by_us_or_prefect(str(venv_file))
    assert raised_by_us_or_prefect(str(REPO / "db" / "catalog.py"))
    assert raised_by_us_or_prefect("/opt/venv/lib/python3.11/site-packages/prefect/flows.py")
    assert not raised_by_us_or_prefect("/facetrace/elsewhere/sqlalchemy/orm/session.py")


def test_candidates_travel_between_processes_intact(tmp_path, inbox):
    """Batches go to Dask workers pickled: a folder's and a zip's readers must survive the trip."""
    import zipfile

    from facetrace.tasks.faces import list_folder, list_zip

    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("Real/a.png", encode(noise_image(1, (20, 20)), "PNG"))
    for listing in (list_folder(inbox, "real"), list_zip(archive)):
        copies = pickle.loads(pickle.dumps(listing.candidates))
        assert [c.read() for c in copies] == [c.read() for c in listing.candidates]


def test_the_stored_perceptual_hash_is_imagehash_phash_bit_for_bit(tmp_path):
    """Stored phashes must compare with anyone's `imagehash.phash` (near-duplicate search uses them)."""
    import imagehash
    import numpy as np
    from PIL import Image as PILImage

    from facetrace.tasks.storage import perceptual_hash, to_rgb

    images = [noise_image(seed, size) for seed, size in enumerate([(64, 64), (128, 96), (25, 25), (300, 17)])]
    images += [PILImage.new("RGB", (40, 40), (v, v, v)) for v in (0, 77, 255)]  # flat: DCT ties everywhere
    images += [PILImage.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1)), "L").convert("RGB")]
    images += [to_rgb(noise_image(9, (48, 48), "CMYK")), to_rgb(noise_image(10, (48, 48)).convert("P"))]
    shared = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "seed-faces-dev"
    for path in sorted(shared.glob("*/*"))[:40]:
        with PILImage.open(path) as image:
            images.append(to_rgb(image))
    for image in images:
        assert perceptual_hash(image) == str(imagehash.phash(image))


def test_the_same_content_under_both_labels_is_quarantined_with_its_reason(prefect_harness, settings_env, tmp_path):
    """Bytes filed under Real/ and AI/ (in one run, or in a later one) cannot keep either label: the
    conflicting name is a rejection with its reason and the image leaves every snapshot."""
    from facetrace.flows.ingest import ingest_faces
    from facetrace.tasks.splits import load_split_items

    one_run, later = tmp_path / "one_run", tmp_path / "later"
    shared_now, shared_later = encode(noise_image(101), "PNG"), encode(noise_image(102), "JPEG", quality=90)
    for folder, name, data in ((one_run / "Real", "a.png", shared_now), (one_run / "AI", "a-copy.png", shared_now),
                               (one_run / "Real", "b.jpg", shared_later), (one_run / "AI", "c.png",
                                                                          encode(noise_image(103), "PNG")),
                               (later / "AI", "b-again.jpg", shared_later), (later / "Real", "b.jpg", shared_later)):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)

    first = ingest_faces(kind="folder", path=str(one_run))
    assert (first["seen"], first["new"], first["duplicate"], first["quarantined"]) == (4, 3, 0, 1)
    assert first["quarantined_by_reason"] == {"label_conflict": 1}
    second = ingest_faces(kind="folder", path=str(later))
    # b.jpg again under Real/ is a plain duplicate; under AI/ it conflicts with the catalogued real copy.
    assert (second["seen"], second["new"], second["duplicate"], second["quarantined"]) == (2, 0, 1, 1)
    rerun = ingest_faces(kind="folder", path=str(one_run))  # idempotent: nothing new, the same refusal
    assert (rerun["new"], rerun["quarantined"]) == (0, 1)

    with session_scope(get_engine(settings_env.catalog_url)) as session:
        rejections = {r.original_name.rsplit("/", 1)[-1]: r for r in session.scalars(select(Rejection))}
        assert {r.reason for r in rejections.values()} == {"label_conflict"}
        assert "labelled synthetic here, real as image" in rejections.pop("b-again.jpg").detail
        # Of the pair in one run, the first listed keeps the row (with its label), the other is refused.
        (refused_name, refused), = rejections.items()
        kept_name, kept_label = {"a.png": ("a-copy.png", "synthetic"), "a-copy.png": ("a.png", "real")}[refused_name]
        other_label = {"real": "synthetic", "synthetic": "real"}[kept_label]
        assert f"labelled {other_label} here, {kept_label} as " in refused.detail and refused.sha256
        status = {image.original_name.rsplit("/", 1)[-1]: (image.label, image.status)
                  for image in session.scalars(select(Image))}
        assert status == {kept_name: (kept_label, "quarantined"), "b.jpg": ("real", "quarantined"),
                          "c.png": ("synthetic", "ok")}
        usable, _ = load_split_items(session)
        assert [item.label for item in usable] == ["synthetic"]
