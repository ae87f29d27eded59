"""`facetrace api` as a client sees it: a real uvicorn process on a free loopback port, a tiny
detector trained once for the module. Contract (detect one and several images, models, health,
readiness before a champion exists), a bad-input corpus answered with 4xx reasons, hot swap under
load, predictions in the catalog, the opt-in inbox, the Grad-CAM overlay, and the page in a real
headless browser."""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image as PILImage

from api_support import ApiServer, promote_model, register, train_tiny
from conftest import SHARED_DATA
from ingest_corpus import bomb_png, encode, noise_image
from test_registry import write_faces

pytestmark = pytest.mark.slow

MAX_REQUEST_BYTES = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("api")


@pytest.fixture(scope="module")
def faces(workdir) -> Path:
    return write_faces(workdir / "faces", per_class=10)


@pytest.fixture(scope="module")
def tiny_models(workdir, faces):
    """Two detectors (different seeds): the first champion, and the one promoted later."""
    return [train_tiny(workdir / f"model{seed}", faces, seed=seed, epochs=1) for seed in (0, 1)]


def server_env(data_dir: Path, **extra: str) -> dict[str, str]:
    data_dir.mkdir(parents=True, exist_ok=True)
    return {"FACETRACE_DATA_DIR": str(data_dir), "FACETRACE_DB_URL": f"sqlite:///{data_dir / 'catalog.sqlite'}",
            "FACETRACE_TRAIN_THREADS": "1", **extra}


def wait_for(condition, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def served(workdir, tiny_models):
    """An API over a catalog whose champion is the first tiny model; labelled uploads kept (opt-in)."""
    data_dir = workdir / "served"
    env = server_env(data_dir, FACETRACE_API_KEEP_LABELLED="1",
                     FACETRACE_API_MAX_REQUEST_BYTES=str(MAX_REQUEST_BYTES))
    champion = register(env["FACETRACE_DB_URL"], tiny_models[0], champion=True)
    with ApiServer(workdir / "served-home", env) as api:
        api.champion_id = champion
        api.env_vars = env
        yield api


def files_of(*paths: Path) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("file", (p.name, p.read_bytes(), "application/octet-stream")) for p in paths]


def test_detect_one_image_returns_probability_decision_model_hash_and_timing(served, faces):
    face = faces / "Real" / "r0.jpg"
    response = httpx.post(f"{served.url}/v1/detect", files=files_of(face), timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    (result,) = body["results"]
    import hashlib

    assert result["sha256"] == hashlib.sha256(face.read_bytes()).hexdigest()
    assert 0.0 <= result["probability"] <= 1.0
    assert result["decision"] == ("synthetic" if result["probability"] >= result["threshold"] else "real")
    assert result["model"] == {"id": served.champion_id, "backbone": "mobilenet_v2", "version": 1}
    assert body["models"] == [served.champion_id]
    assert set(result["timing_ms"]) == {"decode", "queue", "model", "batch_size"} and body["timing_ms"] > 0
    assert body["request_id"]


def test_detect_several_images_answers_each_in_order(served, faces):
    picks = [faces / "Real" / "r1.jpg", faces / "AI" / "s1.png", faces / "AI" / "s2.png"]
    response = httpx.post(f"{served.url}/v1/detect", files=files_of(*picks), timeout=60)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [r["file"] for r in results] == [p.name for p in picks]
    # The same bytes give the same score whether sent alone or in a batch.
    alone = httpx.post(f"{served.url}/v1/detect", files=files_of(picks[1]), timeout=60).json()["results"][0]
    assert alone["probability"] == pytest.approx(results[1]["probability"], abs=1e-5)


def test_concurrent_requests_share_forward_passes(served, faces):
    before = served.get_json("/healthz")[1]
    face = faces / "AI" / "s3.png"
    with httpx.Client(timeout=60) as client:
        threads = [threading.Thread(target=lambda: client.post(f"{served.url}/v1/detect", files=files_of(face)))
                   for _ in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    after = served.get_json("/healthz")[1]
    images, batches = after["images"] - before["images"], after["batches"] - before["batches"]
    assert images == 16 and batches < images  # at least two requests answered by one forward pass


def test_models_health_readiness_and_docs(served):
    status, models = served.get_json("/v1/models")
    assert status == 200 and models["serving"]["id"] == served.champion_id
    assert [m["stage"] for m in models["models"] if m["serving"]] == ["champion"]
    assert served.get_json("/healthz")[0] == 200
    status, ready = served.get_json("/readyz")
    assert status == 200 and ready["model"]["id"] == served.champion_id
    assert httpx.get(f"{served.url}/docs").status_code == 200
    spec = httpx.get(f"{served.url}/openapi.json").json()
    assert {"/v1/detect", "/v1/explain", "/v1/models", "/healthz", "/readyz"} <= set(spec["paths"])


def truncated_jpeg() -> bytes:
    data = encode(noise_image(3, (120, 90)), "JPEG", quality=90)
    return data[: len(data) // 2]


BAD_INPUTS = {
    # name: (multipart files or raw content, expected status, expected error code)
    "zero-byte": ({"file": ("empty.jpg", b"", "image/jpeg")}, 422, "empty"),
    "text named .jpg": ({"file": ("notes.jpg", b"just some text, not a picture\n" * 4, "image/jpeg")}, 422,
                        "not_an_image"),
    "truncated JPEG": ({"file": ("cut.jpg", truncated_jpeg(), "image/jpeg")}, 422, "truncated"),
    "declared 50000x50000 PNG": ({"file": ("bomb.png", bomb_png(50_000, 50_000), "image/png")}, 422,
                                 "decompression_bomb"),
    "oversize body": ({"file": ("big.png", os.urandom(MAX_REQUEST_BYTES + 4096), "image/png")}, 413, "too_large"),
    "no file at all": ({"label": (None, "real")}, 400, "no_image"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_a_4xx_naming_the_reason_and_the_server_stays_healthy(served, faces, case):
    files, status, code = BAD_INPUTS[case]
    response = httpx.post(f"{served.url}/v1/detect", files=files, timeout=60)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code and body["detail"]
    assert served.get_json("/healthz")[0] == 200
    ok = httpx.post(f"{served.url}/v1/detect", files=files_of(faces / "Real" / "r2.jpg"), timeout=60)
    assert ok.status_code == 200


def test_wrong_content_type_and_a_bad_label_are_refused_with_reasons(served, faces):
    response = httpx.post(f"{served.url}/v1/detect", json={"image": "r0.jpg"}, timeout=30)
    assert response.status_code == 415 and response.json()["error"] == "unsupported_media_type"
    response = httpx.post(f"{served.url}/v1/detect", content=(faces / "Real" / "r0.jpg").read_bytes(),
                          headers={"content-type": "image/jpeg"}, timeout=30)
    assert response.status_code == 415 and "multipart/form-data" in response.json()["detail"]
    response = httpx.post(f"{served.url}/v1/detect", files=files_of(faces / "Real" / "r0.jpg"),
                          data={"label": "maybe"}, timeout=30)
    assert response.status_code == 422 and response.json()["error"] == "invalid_label"
    # One bad image among good ones: the request is refused, naming the bad file only.
    response = httpx.post(f"{served.url}/v1/detect", timeout=30, files=[
        *files_of(faces / "Real" / "r0.jpg"), ("file", ("broken.jpg", b"<html>no</html>", "image/jpeg"))])
    assert response.status_code == 422
    assert [f["file"] for f in response.json()["files"]] == ["broken.jpg"]
    assert httpx.get(f"{served.url}/v1/nothing-here").json()["error"] == "not_found"
    assert served.get_json("/healthz")[0] == 200


def test_every_answer_is_recorded_in_the_catalog_and_labelled_uploads_reach_the_inbox(served, faces):
    from sqlalchemy import text

    from facetrace.db.engine import make_engine

    face = faces / "AI" / "s4.png"
    response = httpx.post(f"{served.url}/v1/detect", files=files_of(face), data={"label": "synthetic"}, timeout=60)
    assert response.status_code == 200
    result = response.json()["results"][0]
    assert result["label"] == "synthetic" and result["kept_in_inbox"]
    inbox = Path(served.env_vars["FACETRACE_DATA_DIR"]) / "inbox" / "synthetic" / f"{result['sha256']}.png"
    assert inbox.read_bytes() == face.read_bytes()

    engine = make_engine(served.env_vars["FACETRACE_DB_URL"], read_only=True)
    try:
        def recorded():
            with engine.connect() as connection:
                return connection.execute(text(
                    "SELECT model_id, score, decision, label FROM predictions WHERE request_id = :r"),
                    {"r": response.json()["request_id"]}).all()

        (row,) = wait_for(recorded, 30, "the prediction row")
        assert row.model_id == served.champion_id and row.label == "synthetic"
        assert row.score == pytest.approx(result["probability"]) and row.decision == result["decision"]
        with engine.connect() as connection:
            daily = connection.execute(text("SELECT * FROM predictions_daily")).mappings().all()
            total = connection.execute(text("SELECT COUNT(*) FROM predictions")).scalar()
    finally:
        engine.dispose()
    assert sum(d["predictions"] for d in daily) == total
    assert daily[0]["labelled"] >= 1 and 0.0 <= daily[0]["flag_rate"] <= 1.0


def test_explain_returns_a_grad_cam_overlay_png(served, faces):
    response = httpx.post(f"{served.url}/v1/explain", files=files_of(faces / "AI" / "s0.png"), timeout=120)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    overlay = PILImage.open(io.BytesIO(response.content))
    assert overlay.format == "PNG" and overlay.size == (32, 32)
    assert response.headers["x-model-id"] == str(served.champion_id)
    assert response.headers["x-decision"] in ("real", "synthetic")


def test_readiness_before_a_champion_exists_then_the_first_champion_is_loaded(workdir, tiny_models, faces):
    env = server_env(workdir / "empty")
    with ApiServer(workdir / "empty-home", env) as api:
        assert api.get_json("/healthz")[0] == 200
        status, body = api.get_json("/readyz")
        assert status == 503 and body["error"] == "not_ready"
        response = httpx.post(f"{api.url}/v1/detect", files=files_of(faces / "Real" / "r0.jpg"), timeout=30)
        assert response.status_code == 503 and response.json()["error"] == "not_ready"
        assert api.get_json("/v1/models") == (200, {"serving": None, "models": []})
        model_id = register(env["FACETRACE_DB_URL"], tiny_models[0], champion=True)
        wait_for(lambda: api.get_json("/readyz")[0] == 200, 120, "readiness after registration")
        response = httpx.post(f"{api.url}/v1/detect", files=files_of(faces / "Real" / "r0.jpg"), timeout=30)
        assert response.status_code == 200 and response.json()["models"] == [model_id]


def test_hot_swap_under_load_fails_no_request_and_switches_model_once(workdir, tiny_models, faces):
    env = server_env(workdir / "swap")
    first = register(env["FACETRACE_DB_URL"], tiny_models[0], champion=True)
    second = register(env["FACETRACE_DB_URL"], tiny_models[1], champion=False)
    picks = sorted((faces / "Real").iterdir())[:4] + sorted((faces / "AI").iterdir())[:4]
    with ApiServer(workdir / "swap-home", env) as api:
        stop = threading.Event()
        answers: dict[int, list] = {0: [], 1: []}

        def client(index: int) -> None:
            with httpx.Client(timeout=60) as http:
                n = 0
                while not stop.is_set():
                    face = picks[(n + index) % len(picks)]
                    response = http.post(f"{api.url}/v1/detect", files=files_of(face))
                    answers[index].append((response.status_code,
                                           response.json()["models"] if response.status_code == 200 else
                                           response.text))
                    n += 1

        threads = [threading.Thread(target=client, args=(i,)) for i in answers]
        for t in threads:
            t.start()
        wait_for(lambda: min(len(a) for a in answers.values()) >= 10, 120, "requests before the promotion")
        promote_model(env["FACETRACE_DB_URL"], second)
        wait_for(lambda: all(sum(1 for _, m in a if m == [second]) >= 10 for a in answers.values()), 180,
                 "answers from the new champion")
        stop.set()
        for t in threads:
            t.join(60)
        assert api.get_json("/healthz")[1]["swaps"] == 1
    for sequence in answers.values():
        assert [status for status, _ in sequence] == [200] * len(sequence), sequence
        ids = [models[0] for _, models in sequence]
        switches = [i for i in range(1, len(ids)) if ids[i] != ids[i - 1]]
        assert ids[0] == first and ids[-1] == second and len(switches) == 1, ids


# ---------------------------------------------------------------- the page, in a real browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_the_page_shows_a_verdict_score_and_grad_cam_for_a_dropped_face(served, faces, tmp_path):
    if not Path(CHROMIUM).is_file():
        if os.environ.get("FACETRACE_REQUIRE_BROWSER") == "1":
            pytest.fail(f"chromium not found at {CHROMIUM} (required: FACETRACE_REQUIRE_BROWSER=1)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    face = tmp_path / "face.png"
    # A real face when the shared development faces are here, else a generated picture; larger than
    # the model's 32 px input, so the page shows something a person can see.
    real = sorted(SHARED_DATA.glob("Real/*.jpg"))[:1] or [faces / "AI" / "s5.png"]
    PILImage.open(real[0]).convert("RGB").resize((192, 192), PILImage.Resampling.LANCZOS).save(face)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 820, "height": 520})
        try:
            page = browser.new_page()
            page.goto(served.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.startsWith('model ')")
            assert f"model {served.champion_id}: mobilenet_v2 v1" in page.text_content("#model")
            page.set_input_files("#file", str(face))
            page.wait_for_selector("#result[data-done='1']", timeout=60_000)
            verdict = page.text_content("#verdict")
            score = float(page.text_content("#score"))
            assert verdict in ("Real", "Synthetic") and 0.0 <= score <= 1.0
            page.wait_for_function("document.getElementById('overlay').naturalWidth > 0")
            assert page.evaluate("document.getElementById('photo').naturalWidth") == 192
            shot = tmp_path / "api-page.png"
            page.screenshot(path=str(shot), full_page=True)
            if os.environ.get("FACETRACE_API_SCREENSHOT"):
                shutil.copy(shot, os.environ["FACETRACE_API_SCREENSHOT"])
        finally:
            browser.close()
    assert PILImage.open(shot).size[0] == 820
