"""Synthetic faces: the tiny offline pipeline generates into the catalog through the same storage
and catalog path as ingest, requests are idempotent and resumable, every image can be regenerated
byte for byte from its catalog rows, and a hub model that is not cached fails clearly offline."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from sqlalchemy import func, select, text, update

from facetrace.db.engine import get_engine, session_scope
from facetrace.db.generations import GENERATION_FIELDS
from facetrace.db.models import Generation, Image, Prompt, Sighting, Source

# Small and fast: 32 px, 2 steps.
FAST = {"size": 32, "steps": 2}


def catalog_rows(settings) -> dict[str, int]:
    with session_scope(get_engine(settings.catalog_url)) as session:
        return {
            "images": session.scalar(select(func.count()).select_from(Image)),
            "generations": session.scalar(select(func.count()).select_from(Generation)),
            "prompts": session.scalar(select(func.count()).select_from(Prompt)),
            "sightings": session.scalar(select(func.count()).select_from(Sighting)),
        }


def generated_items(settings) -> list[tuple[int, str]]:
    with session_scope(get_engine(settings.catalog_url)) as session:
        return list(session.execute(
            select(Generation.item_index, Image.sha256).join(Image, Image.id == Generation.image_id)
            .order_by(Generation.item_index)).all())


def assert_complete_provenance(settings) -> int:
    """Every generated synthetic image has its file, its prompt row and a generation row whose
    every field is filled; the catalog's own view of incomplete provenance is empty."""
    with session_scope(get_engine(settings.catalog_url)) as session:
        rows = session.execute(
            select(Image, Generation, Prompt)
            .join(Source, Source.id == Image.source_id)
            .outerjoin(Generation, Generation.image_id == Image.id)
            .outerjoin(Prompt, Prompt.id == Image.prompt_id)
            .where(Image.label == "synthetic", Source.kind == "generated")
        ).all()
        for image, generation, prompt in rows:
            assert image.provenance == "complete", image.sha256
            assert (settings.data_dir / image.path).is_file(), image.path
            assert prompt is not None and prompt.text and prompt.method == "template", image.sha256
            assert generation is not None, f"{image.sha256} has no generation row"
            assert generation.prompt_id == image.prompt_id
            for name in GENERATION_FIELDS:
                assert getattr(generation, name) not in (None, "", {}), f"{image.sha256}: {name} is empty"
            assert {"torch", "diffusers", "transformers", "pillow", "zlib"} <= set(generation.library_versions)
            execution = generation.execution
            assert execution["batch_items"][execution["batch_position"]] == generation.item_index
            assert execution["batch_seeds"][execution["batch_position"]] == generation.seed
            assert len(execution["batch_prompt_ids"]) == len(execution["batch_items"])
        assert session.execute(text("SELECT COUNT(*) FROM incomplete_provenance")).scalar() == 0
    return len(rows)


# ---------------------------------------------------------------- the flow

def test_tiny_pipeline_generates_into_the_catalog_and_a_rerun_adds_nothing(prefect_harness, sqlite_settings_env):
    from facetrace.flows.generate import generate_synthetic_faces
    from facetrace.tasks.synthesis import item_seed, tiny_revision

    settings = sqlite_settings_env
    first = generate_synthetic_faces(n=6, batch_size=4, device="cpu", **FAST)
    assert (first["new"], first["skipped"], first["duplicate"]) == (6, 0, 0)
    assert Path(first["grid"]).is_file()
    before = catalog_rows(settings)
    assert before == {"images": 6, "generations": 6, "prompts": 6, "sightings": 6}
    assert [i for i, _ in generated_items(settings)] == list(range(6))

    with session_scope(get_engine(settings.catalog_url)) as session:
        source = session.scalars(select(Source)).one()
        assert (source.kind, source.reference, source.version) == ("generated", "tiny", tiny_revision())
        generations = session.scalars(select(Generation).order_by(Generation.item_index)).all()
        assert [g.seed for g in generations] == [item_seed(0, i) for i in range(6)]
        assert {(g.width, g.height, g.steps, g.device, g.dtype, g.safety_checker) for g in generations} == {
            (32, 32, 2, "cpu", "float32", "none")}
        assert len({g.flow_run_id for g in generations}) == 1 and generations[0].flow_run_id
        # Stored like an ingest: content-addressed PNG files whose bytes hash to the key.
        import hashlib

        for image in session.scalars(select(Image)):
            data = (settings.data_dir / image.path).read_bytes()
            assert hashlib.sha256(data).hexdigest() == image.sha256 and image.format == "PNG"
            assert image.path == f"images/{image.sha256[:2]}/{image.sha256}.png"

    again = generate_synthetic_faces(n=6, batch_size=2, device="cpu", **FAST)  # batch size is not the request
    assert (again["new"], again["skipped"]) == (0, 6)
    assert catalog_rows(settings) == before

    more = generate_synthetic_faces(n=8, batch_size=4, device="cpu", **FAST)
    assert (more["new"], more["skipped"]) == (2, 6)
    assert [i for i, _ in generated_items(settings)] == list(range(8))
    assert assert_complete_provenance(settings) == 8


def test_an_interrupted_run_completes_on_rerun_without_duplicates(prefect_harness, sqlite_settings_env, monkeypatch):
    import facetrace.flows.generate as generate_flow
    import facetrace.tasks.synthesis as synthesis
    from facetrace.flows.reproduce import reproduce_image

    settings = sqlite_settings_env
    real_run = synthesis.run_pipeline
    calls = {"n": 0}

    def dies_after_first_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise RuntimeError("power cut during batch 2")
        return real_run(*args, **kwargs)

    monkeypatch.setattr(synthesis, "run_pipeline", dies_after_first_batch)
    # No retry delays in a test: the interruption must reach the flow.
    monkeypatch.setattr(synthesis, "generate_batch", synthesis.generate_batch.with_options(retries=0))
    with pytest.raises(RuntimeError, match="power cut"):
        generate_flow.generate_synthetic_faces(n=8, batch_size=3, device="cpu", **FAST)
    assert [i for i, _ in generated_items(settings)] == [0, 1, 2]
    assert catalog_rows(settings)["images"] == 3  # the failed batch left no rows

    monkeypatch.setattr(synthesis, "run_pipeline", real_run)
    resumed = generate_flow.generate_synthetic_faces(n=8, batch_size=3, device="cpu", **FAST)
    assert (resumed["new"], resumed["skipped"]) == (5, 3)
    items = generated_items(settings)
    assert [i for i, _ in items] == list(range(8))
    assert len({sha for _, sha in items}) == 8
    rows = catalog_rows(settings)
    assert rows["images"] == rows["generations"] == rows["sightings"] == 8
    assert rows["prompts"] == 8  # prompts are written with their batch, so the failed one wrote none
    # Resumed items are regenerated exactly from their rows too.
    assert reproduce_image(items[-1][1])["match"]


def test_reproduce_regenerates_tiny_images_byte_for_byte(prefect_harness, sqlite_settings_env):
    from facetrace.flows.generate import generate_synthetic_faces
    from facetrace.flows.reproduce import reproduce_image
    from facetrace.tasks.synthesis import release_pipelines

    settings = sqlite_settings_env
    result = generate_synthetic_faces(n=5, batch_size=3, device="cpu", seed=7, **FAST)
    release_pipelines()  # reload from the cache folder, as a new process would
    for sha in result["new_sha256"]:
        outcome = reproduce_image(sha)
        assert outcome["exact_expected"] and outcome["match"], outcome
        assert outcome["reproduced_sha256"] == sha
        assert (outcome["max_pixel_difference"], outcome["model_hash_match"]) == (0, True)
        assert outcome["library_changes"] == []
    assert assert_complete_provenance(settings) == 5


def test_cli_generate_and_reproduce(prefect_harness, sqlite_settings_env, capsys):
    from facetrace.cli.app import main

    settings = sqlite_settings_env
    assert main(["generate", "--count", "3", "--size", "32", "--steps", "2", "--batch-size", "2",
                 "--device", "cpu", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "new" in out and "contact sheet" in out
    sha = generated_items(settings)[0][1]
    assert main(["reproduce", sha, "--format", "json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[: out.rindex("}") + 1])["match"] is True and "reproduced exactly" in out

    # A catalog row that no longer describes the image must be caught: change the recorded seed.
    with session_scope(get_engine(settings.catalog_url)) as session:
        generation = session.scalars(select(Generation).join(Image).where(Image.sha256 == sha)).one()
        execution = dict(generation.execution)
        execution["batch_seeds"] = [s + 1 for s in execution["batch_seeds"]]
        session.execute(update(Generation).where(Generation.id == generation.id).values(execution=execution))
    assert main(["reproduce", sha]) == 1
    assert "not reproduced" in capsys.readouterr().err

    assert main(["reproduce", "0" * 64]) == 2
    assert "no generated image" in capsys.readouterr().err
    assert main(["reproduce", "nothex"]) == 2


@pytest.mark.postgres
@pytest.mark.parametrize("catalog_url", ["postgresql"], indirect=True)
def test_generation_on_postgresql_is_idempotent(prefect_harness, settings_env):
    from facetrace.flows.generate import generate_synthetic_faces
    from facetrace.flows.reproduce import reproduce_image

    first = generate_synthetic_faces(n=4, batch_size=4, device="cpu", **FAST)
    again = generate_synthetic_faces(n=4, batch_size=4, device="cpu", **FAST)
    assert (first["new"], again["new"], again["skipped"]) == (4, 0, 4)
    assert catalog_rows(settings_env)["generations"] == 4
    assert assert_complete_provenance(settings_env) == 4
    assert reproduce_image(first["new_sha256"][0])["match"]


# ---------------------------------------------------------------- the pipeline, without Prefect

@pytest.fixture
def tiny(tmp_path: Path):
    from facetrace.tasks.synthesis import ModelChoice, load_pipeline

    return load_pipeline(ModelChoice(device="cpu", cache_root=str(tmp_path / "cache")))


def some_items(count: int, run_seed: int = 0):
    from facetrace.tasks.synthesis import GenerationItem, item_seed

    return [GenerationItem(i, f"a photo of a {20 + i} year old woman", None, item_seed(run_seed, i))
            for i in range(count)]


def test_seeds_and_images_do_not_depend_on_batch_size(tiny):
    import numpy as np
    from PIL import Image as PILImage
    import io

    from facetrace.tasks.synthesis import SamplingOptions, derive_seed, generate_images, item_seed

    options = SamplingOptions(steps=2, guidance=5.0, width=32, height=32)
    items = some_items(4)
    assert item_seed(0, 3) == item_seed(0, 3) != item_seed(0, 2) != item_seed(1, 2)
    assert 0 <= derive_seed(123, "image", 10**9) < 2**63  # fits the catalog's BIGINT
    together = generate_images(tiny, items, options)
    alone = [generate_images(tiny, [item], options)[0] for item in items]
    pairs = generate_images(tiny, items[:2], options) + generate_images(tiny, items[2:], options)
    assert [g.provenance["seed"] for g in together] == [g.provenance["seed"] for g in alone] == [i.seed for i in items]

    def pixels(png: bytes):
        return np.asarray(PILImage.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)

    for a, b, c in zip(together, alone, pairs):
        # Same noise, same picture: only float rounding of the batched sums may flip a pixel level.
        assert np.abs(pixels(a.png) - pixels(b.png)).max() <= 2
        assert np.abs(pixels(a.png) - pixels(c.png)).max() <= 2
    assert len({g.png for g in together}) == 4  # different seeds, different images
    # The same batch again gives the same bytes, and records where each image sat in it.
    assert [g.png for g in generate_images(tiny, items, options)] == [g.png for g in together]
    assert [g.provenance["execution"]["batch_position"] for g in together] == [0, 1, 2, 3]


def test_cuda_out_of_memory_halves_the_batch_and_records_what_ran(tiny, monkeypatch):
    """Simulated on the CPU: a "GPU" that fits two images at a time."""
    import dataclasses

    import torch

    import facetrace.tasks.synthesis as synthesis

    real_run = synthesis.run_pipeline
    tried: list[int] = []

    def small_gpu(loaded, items, options):
        tried.append(len(items))
        if len(items) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_run(loaded, items, options)

    monkeypatch.setattr(synthesis, "run_pipeline", small_gpu)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: "simulated GPU")
    monkeypatch.setattr(synthesis, "_VERSIONS", None)
    gpu = dataclasses.replace(tiny, device="cuda")
    options = synthesis.SamplingOptions(steps=2, guidance=5.0, width=32, height=32)
    made = synthesis.generate_images(gpu, some_items(5), options)
    assert tried == [5, 2, 3, 1, 2]
    assert [g.item.index for g in made] == [0, 1, 2, 3, 4]
    assert [g.provenance["execution"]["batch_items"] for g in made] == [[0, 1], [0, 1], [2], [3, 4], [3, 4]]
    assert made[0].provenance["library_versions"]["gpu"] == "simulated GPU"

    def broken(loaded, items, options):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(synthesis, "run_pipeline", broken)  # only out-of-memory is worth halving for
    with pytest.raises(RuntimeError, match="illegal memory access"):
        synthesis.generate_images(gpu, some_items(4), options)


def test_tiny_pipeline_is_built_once_from_a_seed_and_loads_as_a_local_folder(tiny, tmp_path):
    from facetrace.tasks.synthesis import (
        ModelChoice,
        SamplingOptions,
        directory_hash,
        generate_images,
        load_pipeline,
        resolve_model,
        tiny_pipeline_dir,
        tiny_vocabulary,
    )

    folder = tiny_pipeline_dir(tmp_path / "cache")
    assert folder.name == tiny.ref.revision and (folder / "tokenizer" / "vocab.json").is_file()
    vocab, merges = tiny_vocabulary()
    assert json.loads((folder / "tokenizer" / "vocab.json").read_text()) == vocab
    assert tiny.pipe.tokenizer("a photo of a face").input_ids[1:-1] == [vocab[w + "</w>"] for w in "a photo of a face".split()]
    # Built again elsewhere from the same seed: the same files.
    assert directory_hash(tiny_pipeline_dir(tmp_path / "elsewhere"), contents=True) == tiny.model_hash

    ref = resolve_model(str(folder))
    assert (ref.kind, ref.model_id) == ("directory", str(folder))
    as_folder = load_pipeline(ModelChoice(str(folder), device="cpu"))
    assert as_folder.model_hash and as_folder.safety_checker == "none"
    options = SamplingOptions(steps=2, guidance=5.0, width=32, height=32)
    items = some_items(2)
    assert [g.png for g in generate_images(as_folder, items, options)] == \
        [g.png for g in generate_images(tiny, items, options)]


def test_model_names_are_resolved_or_refused_clearly(tmp_path):
    from facetrace.tasks.synthesis import ModelUnavailable, SamplingOptions, resolve_model

    assert resolve_model("SG161222/Realistic_Vision_V1.4").kind == "hub"
    assert resolve_model("SG161222/Realistic_Vision_V1.4").revision == "main"
    assert resolve_model("default").model_id == "SG161222/Realistic_Vision_V1.4"
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"x")
    assert resolve_model(str(checkpoint)).kind == "single_file"
    with pytest.raises(ModelUnavailable, match="does not exist"):
        resolve_model(str(tmp_path / "missing.ckpt"))
    with pytest.raises(ValueError, match="model_index.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="neither"):
        resolve_model("not a model")
    with pytest.raises(ValueError, match="multiple of 8"):
        SamplingOptions(steps=2, guidance=5.0, width=30, height=30)


def test_an_uncached_hub_model_fails_clearly_offline(monkeypatch, tmp_path, prefect_harness, sqlite_settings_env,
                                                     capsys):
    from facetrace.cli.app import main
    from facetrace.tasks.synthesis import ModelChoice, ModelUnavailable, load_pipeline

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = str(tmp_path / "hf-cache")
    with pytest.raises(ModelUnavailable) as caught:
        load_pipeline(ModelChoice("facetrace-tests/no-such-model", device="cpu", hub_cache_dir=cache))
    message = str(caught.value)
    assert "facetrace-tests/no-such-model" in message and "HF_HUB_OFFLINE" in message and "\n" not in message
    # From the command line: one line on stderr, a non-zero status, nothing catalogued.
    assert main(["generate", "--count", "1", "--model", "facetrace-tests/no-such-model", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("facetrace generate: cannot load model facetrace-tests/no-such-model") and "\n" not in err
    assert catalog_rows(sqlite_settings_env)["images"] == 0


def test_a_cached_hub_model_loads_offline_with_its_commit(monkeypatch, tiny, tmp_path):
    """The hub path, offline: a Hugging Face cache holding the tiny pipeline as a snapshot."""
    import shutil

    from facetrace.tasks.synthesis import ModelChoice, load_pipeline, tiny_pipeline_dir

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf-cache" / "models--facetrace-tests--tiny-sd"
    shutil.copytree(tiny_pipeline_dir(tmp_path / "cache"), repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_pipeline(ModelChoice("facetrace-tests/tiny-sd", device="cpu",
                                       hub_cache_dir=str(tmp_path / "hf-cache")))
    assert (loaded.ref.kind, loaded.revision) == ("hub", commit)
    assert loaded.model_hash and type(loaded.pipe).__name__ == "StableDiffusionPipeline"


def test_prompts_are_planned_per_item_whatever_else_is_pending(monkeypatch):
    from facetrace.tasks.synthesis import GenerationRequest, plan_prompts, resolve_model

    request = GenerationRequest(resolve_model("tiny"), 2, 5.0, 32, 32, "descriptive", "template", 11, "blurry")
    everything = plan_prompts(request, list(range(20)))
    some = plan_prompts(request, [3, 17])
    assert {i: everything[i].text for i in (3, 17)} == {i: some[i].text for i in (3, 17)}
    assert len({spec.text for spec in everything.values()}) >= 16  # distinct within each block
    assert {spec.negative_text for spec in some.values()} == {"blurry"}
    assert some[17].parameters["item_index"] == 17 and some[17].style == "descriptive"
    # Another seed, other prompts; the request key follows everything that shapes an image.
    other = GenerationRequest(resolve_model("tiny"), 2, 5.0, 32, 32, "descriptive", "template", 12, "blurry")
    assert plan_prompts(other, [3])[3].text != some[3].text or plan_prompts(other, [4])[4].text != everything[4].text
    assert len({request.key, other.key, GenerationRequest(resolve_model("tiny"), 3, 5.0, 32, 32).key}) == 3
    # An LLM writer without a key falls back to templates ("auto"), all pending items in one request.
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    auto = GenerationRequest(resolve_model("tiny"), 2, 5.0, 32, 32, "simple", "auto", 0)
    planned = plan_prompts(auto, [5, 9])
    assert sorted(planned) == [5, 9] and {s.method for s in planned.values()} == {"template"}


def test_the_cli_module_stays_light():
    import subprocess
    import sys

    code = ("import sys; from facetrace.cli.app import build_parser; build_parser(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.stdout.strip() == "[]"


def test_generation_from_stored_prompts_uses_them_and_reruns_add_nothing(prefect_harness, sqlite_settings_env):
    """The pipeline's prompts step: prompts written first (`write_prompts`) are the ones generated
    from, and writing the same template prompts again reuses their rows."""
    from facetrace.flows.generate import generate_synthetic_faces
    from facetrace.flows.prompts import write_prompts

    settings = sqlite_settings_env
    prompt_ids = write_prompts(count=3, style="simple", llm="template", seed=5)
    assert write_prompts(count=3, style="simple", llm="template", seed=5) == prompt_ids
    first = generate_synthetic_faces(n=4, model="tiny", seed=5, prompt_ids=prompt_ids, **FAST)
    assert first["new"] == 4
    with session_scope(get_engine(settings.catalog_url)) as session:
        used = session.execute(select(Generation.item_index, Generation.prompt_id, Image.prompt_id)
                               .join(Image, Image.id == Generation.image_id)
                               .order_by(Generation.item_index)).all()
    assert [(i, p) for i, p, _ in used] == [(i, prompt_ids[i % 3]) for i in range(4)]
    assert all(g == i for _, g, i in used)
    before = catalog_rows(settings)
    assert before["prompts"] == 3
    again = generate_synthetic_faces(n=4, model="tiny", seed=5, prompt_ids=prompt_ids, **FAST)
    assert again["new"] == 0 and again["skipped"] == 4
    assert catalog_rows(settings) == before
    assert_complete_provenance(settings)


def test_generation_batches_carry_the_gpu_tag_only_on_an_accelerator():
    """The tag lets a Prefect concurrency limit named `gpu` cap GPU work; each tagged run leases slots
    through the API, so CPU batches (no GPU to share) go without it."""
    from facetrace.tasks.synthesis import GPU_TAG, batch_task

    assert GPU_TAG in batch_task({"device": "cuda"}).tags and GPU_TAG in batch_task({"device": "cuda:1"}).tags
    assert GPU_TAG in batch_task({"device": "mps"}).tags
    assert not batch_task({"device": "cpu"}).tags and not batch_task({}).tags
