"""Generate synthetic faces into the catalog: plan the request's missing items, write their prompts,
generate them in batches, store and catalogue each batch like an ingest, then report and emit.

A request (model, sampling settings, prompt style, seed...) has a key; its images are items
0..n-1 of that key. The device and the batch size are not part of it: they change how an image is
computed, not which image is asked for (each records its own device and batch). Items already in the catalog are skipped, so a re-run adds nothing, an
interrupted run resumes where it stopped, and a larger ``n`` extends the same request.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from facetrace.db.catalog import ensure_source
from facetrace.db.engine import get_engine, session_scope
from facetrace.db.generations import generated_item_indices, image_paths
from facetrace.flows.common import current_flow_run_id, emit, progress
from facetrace.settings import get_settings
from facetrace.tasks.store import ArtifactStore
from facetrace.tasks.synthesis import (
    GenerationCounts,
    GenerationItem,
    GenerationRequest,
    ModelChoice,
    batch_task,
    catalogue_generated,
    defaults_for,
    item_seed,
    load_model,
    plan_item_prompts,
    resolve_model,
)

GENERATED_EVENT = "facetrace.faces.generated"
GRID_FACES = 8
DEFAULT_BATCH = 4


def face_grid(pngs: list[bytes], columns: int = 4, thumb: int = 128, format: str = "PNG") -> bytes:
    """A contact sheet of ``pngs`` (each scaled to ``thumb`` px) as PNG (or JPEG) bytes."""
    from PIL import Image

    tiles = []
    for data in pngs:
        with Image.open(io.BytesIO(data)) as image:
            tiles.append(image.convert("RGB").resize((thumb, thumb), Image.Resampling.NEAREST))
    rows = -(-len(tiles) // columns)
    sheet = Image.new("RGB", (thumb * min(columns, len(tiles)), thumb * rows), "white")
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * thumb, (i // columns) * thumb))
    buffer = io.BytesIO()
    sheet.save(buffer, format=format, **({"quality": 80} if format == "JPEG" else {}))
    return buffer.getvalue()


def summary_markdown(request: GenerationRequest, n: int, skipped: int, counts: GenerationCounts,
                     model: dict, grid: str | None, preview_jpeg: bytes | None) -> str:
    lines = [
        f"# Generated faces: `{request.model.model_id}`",
        "",
        f"request `{request.key[:16]}`: {request.width}x{request.height}, {request.steps} steps, "
        f"guidance {request.guidance}, seed {request.seed}, prompts {request.llm}/{request.prompt_style}; "
        f"device {model.get('device', '-')} ({model.get('dtype', '-')})",
        "",
        "| outcome | images |", "|---|---:|",
        f"| requested | {n} |", f"| already in the catalog | {skipped} |", f"| new | {counts.new} |",
        f"| duplicate bytes | {counts.duplicate} |", f"| blanked by the safety checker | {counts.flagged} |",
        f"| quarantined | {counts.quarantined} |",
    ]
    if preview_jpeg is not None:
        # Embedded (a small JPEG), so the UI shows it without serving files; the PNG sheet is on disk.
        encoded = base64.b64encode(preview_jpeg).decode()
        lines += ["", f"![generated faces](data:image/jpeg;base64,{encoded})", "", f"contact sheet: `{grid}`"]
    return "\n".join(lines)


@flow(name="generate-synthetic-faces", log_prints=True)
def generate_synthetic_faces(
    n: int = 8,
    model: str = "tiny",
    steps: int | None = None,
    guidance: float | None = None,
    size: int | None = None,
    batch_size: int | None = None,
    prompt_style: str = "simple",
    seed: int = 0,
    llm: str = "template",
    negative_prompt: str | None = None,
    device: str | None = None,
    revision: str | None = None,
    prompt_ids: list[int] | None = None,
) -> dict:
    """Make items 0..n-1 of this request that the catalog lacks; idempotent and resumable.

    ``prompt_ids`` (e.g. from the `write_prompts` flow) makes item i use stored prompt
    ``prompt_ids[i % len(prompt_ids)]``; otherwise each item's prompt is written from the seed.
    """
    if n < 0:
        raise ValueError(f"n must be zero or more, got {n}")
    logger = get_run_logger()
    settings = get_settings()
    store = ArtifactStore.from_settings(settings)
    run_id = current_flow_run_id()
    ref = resolve_model(model, revision)
    defaults = defaults_for(ref)
    size = size or defaults.size
    request = GenerationRequest(ref, steps or defaults.steps, defaults.guidance if guidance is None else guidance,
                                size, size, prompt_style, llm, seed, negative_prompt,
                                tuple(prompt_ids) if prompt_ids else None)
    options = request.options()  # validates steps and size before anything is loaded
    batch = batch_size or DEFAULT_BATCH
    if batch < 1:
        raise ValueError(f"batch size must be at least 1, got {batch}")

    engine = get_engine(settings.catalog_url)
    with session_scope(engine) as session:
        done = generated_item_indices(session, request.key)
        source_id = ensure_source(session, "generated", ref.model_id, version=ref.revision,
                                  details={"kind": ref.kind}, flow_run_id=run_id)
    pending = [i for i in range(n) if i not in done]
    logger.info("request %s: %d of %d items to generate with %s", request.key[:16], len(pending), n, ref.model_id)

    counts, described = GenerationCounts(), {}
    if pending:
        prompts = plan_item_prompts(request, pending)
        items = [GenerationItem(i, prompts[i].text, prompts[i].negative_text, item_seed(seed, i)) for i in pending]
        choice = ModelChoice(model, revision, device, None, True, str(settings.data_dir / "cache"))
        described = load_model(choice)
        generate = batch_task(described)  # tagged `gpu` on an accelerator
        with progress(f"generate {ref.model_id}") as bar:
            job = bar.add_task("images", total=len(items))
            for start in range(0, len(items), batch):
                chunk = items[start:start + batch]
                images = generate(choice, chunk, options, run_id)
                stored_ids = ({i.index: prompt_ids[i.index % len(prompt_ids)] for i in chunk} if prompt_ids else None)
                counts.add(catalogue_generated(images, {i.index: prompts[i.index] for i in chunk}, request.key,
                                               source_id, store, settings.catalog_url, run_id,
                                               stored_ids))
                bar.advance(job, len(chunk))

    grid_path, preview = None, None
    if counts.new_sha256:
        with session_scope(engine) as session:
            paths = image_paths(session, counts.new_sha256[:GRID_FACES])
        faces = [store.get_bytes(paths[sha]) for sha in counts.new_sha256[:GRID_FACES]]
        grid_path = store.url_for(store.put_bytes(f"reports/generated-{(run_id or request.key)[:16]}.png",
                                                  face_grid(faces)))
        preview = face_grid(faces, thumb=96, format="JPEG")

    summary = {"requested": n, "skipped": len(done & set(range(n))), "new": counts.new,
               "duplicate": counts.duplicate, "flagged": counts.flagged, "quarantined": counts.quarantined}
    logger.info("generated with %s: %s", ref.model_id, summary)
    create_markdown_artifact(summary_markdown(request, n, summary["skipped"], counts, described, grid_path, preview),
                             key="generate-summary", description=f"faces generated with {ref.model_id}")
    emit(GENERATED_EVENT, f"facetrace.source.generated.{source_id}",
         {**summary, "model": ref.model_id, "request_key": request.key},
         **{"facetrace.source.kind": "generated", "facetrace.faces.arrived": "true" if counts.new else "false"})
    return {**summary, "source_id": source_id, "model": ref.model_id, "request_key": request.key,
            "new_sha256": counts.new_sha256, "grid": str(grid_path) if grid_path else None}
