"""The API's back-pressure in-process (no model trained): a request whose images do not fit in the
queue gets 503, one the model does not answer in time gets 504, and neither leaves work behind."""

from __future__ import annotations

import io

import pytest
from PIL import Image as PILImage

from facetrace.api.service import LoadedModel, MicroBatcher, Overloaded
from facetrace.tasks.storage import Limits
from facetrace.tasks.training import PreprocessConfig, TrainConfig


def picture(seed: int) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (40, 40), (seed * 40 % 255, 90, 120)).save(buffer, format="PNG")
    return buffer.getvalue()


class StalledService:
    """A service whose model never answers: its batcher's worker is not started."""

    def __init__(self, queue_size: int) -> None:
        self.model = LoadedModel(id=7, backbone="mobilenet_v2", version=1, threshold=0.5, sha256="0" * 64,
                                 config=TrainConfig(preprocess=PreprocessConfig(image_size=32)), network=None)
        self.limits = Limits()
        self.batcher = MicroBatcher(lambda: self.model, max_batch=4, max_wait_s=0.0, queue_size=queue_size)
        self.recorder = None
        self.swaps = 0

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def test_the_batcher_takes_a_request_whole_or_refuses_it():
    from facetrace.api.service import check_upload

    batcher = MicroBatcher(lambda: None, max_batch=4, max_wait_s=0.0, queue_size=3)
    upload = check_upload("a.png", picture(1), Limits(), PreprocessConfig(image_size=32))
    assert len(batcher.submit([upload, upload])) == 2
    with pytest.raises(Overloaded, match="queue of 3"):
        batcher.submit([upload, upload])
    assert batcher.depth == 2  # nothing of the refused request entered
    assert len(batcher.submit([upload])) == 1


@pytest.fixture
def client_for():
    from fastapi.testclient import TestClient

    from facetrace.api.app import create_app
    from facetrace.settings import Settings

    clients = []

    def make(queue_size: int, timeout_s: float) -> TestClient:
        settings = Settings(api_request_timeout_s=timeout_s, api_queue_size=queue_size)
        client = TestClient(create_app(settings, service=StalledService(queue_size)))
        clients.append(client.__enter__())
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def test_a_full_queue_answers_503_and_a_slow_model_504(client_for):
    client = client_for(queue_size=2, timeout_s=0.3)
    files = [("file", (f"{i}.png", picture(i), "image/png")) for i in range(3)]
    response = client.post("/v1/detect", files=files)
    assert response.status_code == 503 and response.json()["error"] == "overloaded"
    assert response.headers["retry-after"] == "1"
    response = client.post("/v1/detect", files=files[:1])
    assert response.status_code == 504 and response.json()["error"] == "timeout"
    assert "0.3 s" in response.json()["detail"]
    assert client.get("/healthz").json()["status"] == "ok"
