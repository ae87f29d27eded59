"""A detector trained on the demo's data (LFW thumbnails against the tiny generator's noise), or one
whose confound audit fired, says so: recorded with the model, in its card, and on `predict`'s stderr."""

from __future__ import annotations

from types import SimpleNamespace

import pytest


def _catalog(session, real_kind: str, generator: str | None, n: int = 3) -> list[int]:
    from facetrace.db.models import Generation, Image, Prompt, Source

    ids = []
    for label, kind in (("real", real_kind), ("synthetic", "generated")):
        source = Source(kind=kind, reference=f"{kind}-ref")
        session.add(source)
        session.flush()
        for i in range(n):
            sha = f"{label[0]}{i:063x}".replace("r", "a").replace("s", "b")
            image = Image(sha256=sha, path=f"images/{sha[:2]}/{sha}.png", label=label, source_id=source.id,
                          original_name=f"{label}{i}.png", format="PNG", mode="RGB", width=32, height=32,
                          bytes=100, phash="0" * 16, dedup_group=sha, status="ok")
            session.add(image)
            session.flush()
            ids.append(image.id)
            if label == "synthetic" and generator:
                prompt = Prompt(text=f"a face {i}", method="template")
                session.add(prompt)
                session.flush()
                session.add(Generation(image_id=image.id, prompt_id=prompt.id, request_key="r" * 64, item_index=i,
                                       model_id=generator, pipeline_class="P", scheduler_class="S",
                                       scheduler_config={}, steps=2, guidance=1.0, seed=2**60 + i, width=32,
                                       height=32, dtype="float32", device="cpu", library_versions={}))
    return ids


@pytest.mark.parametrize("real_kind, generator, toy", [
    ("sample", "tiny", True),  # the demo
    ("folder", "tiny", True),  # real photos, but a generator that makes noise
    ("sample", "SG161222/Realistic_Vision_V1.4", True),  # real side: thumbnails only
    ("folder", "SG161222/Realistic_Vision_V1.4", False),
    ("kaggle", None, False),  # imported synthetic images (no generation record)
])
def test_demo_data_is_recognised_from_the_snapshot(catalog_url, real_kind, generator, toy):
    from facetrace.db.engine import dispose_engines, get_engine, session_scope
    from facetrace.tasks.splits import demo_data_note

    with session_scope(get_engine(catalog_url)) as session:
        ids = _catalog(session, real_kind, generator)
    note = demo_data_note(catalog_url, SimpleNamespace(images=[SimpleNamespace(image_id=i) for i in ids]))
    dispose_engines()
    assert (note is not None) == toy
    if toy:
        assert note.startswith("trained on the demo's data") and "says nothing about real photos" in note


def test_the_model_card_and_the_warnings_name_a_toy_and_a_confound():
    from facetrace.tasks.registry import model_card_markdown, model_warnings

    toy = "trained on the demo's data: every synthetic image comes from the `tiny` offline generator; a toy"
    metrics = {"test": {"roc_auc": 1.0}, "demo_data": toy, "confound_audit": {"warning": True, "roc_auc": 0.99,
                                                                                "classifier": "tree", "features": []}}
    card = model_card_markdown(backbone="mobilenet_v2", version=1, stage="champion", sha256="a" * 64, path="/m",
                               snapshot={"id": 1, "image_count": 2, "counts": {}, "sources": []},
                               hyperparameters={}, metrics=metrics, threshold=0.5, target_fpr=0.05)
    assert "**Warning: toy model.**" in card and toy in card and "**Warning: confound.**" in card
    warnings = model_warnings(metrics)
    assert len(warnings) == 2 and warnings[0] == f"toy model: {toy}" and "ROC AUC 0.990" in warnings[1]
    assert model_warnings({"test": {"roc_auc": 0.9}, "confound_audit": {"warning": False}}) == []
    assert model_warnings(None) == []


def test_predict_warns_on_stderr_before_it_loads_the_model(sqlite_settings_env, tmp_path, capsys):
    from facetrace.cli.app import main
    from test_cli import _register_model

    toy = "trained on the demo's data: every real image is one of the bundled 25x25 LFW thumbnails; a toy"
    model_id = _register_model(sqlite_settings_env, "mobilenet_v2", str(tmp_path / "missing.keras"),
                               {"test": {"roc_auc": 1.0}, "demo_data": toy})
    picture = tmp_path / "face.png"
    picture.write_bytes(b"not loaded: the model is missing")
    capsys.readouterr()
    code = main(["predict", str(picture), "--model", str(model_id)])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"facetrace predict: warning: model {model_id}: toy model: {toy}"
    assert code != 0 and err[-1].startswith("facetrace predict: ")  # the model file is missing: one line
