"""The serving core of `facetrace api`, free of HTTP: the loaded champion, the micro-batcher that
shares forward passes between concurrent requests, the watcher that hot-swaps a newly registered
champion, and the recorder that writes every answer to the catalog off the request path.

Threads, not asyncio: the model runs on one worker thread (TensorFlow releases the GIL while it
computes), the event loop only waits on futures. TensorFlow is imported when the first model loads.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import insert, select

from facetrace.db.engine import get_engine, session_scope
from facetrace.db.models import Model, Prediction, utcnow
from facetrace.tasks.registry import current_champion, serving_info
from facetrace.tasks.storage import Limits, Quarantine, inspect_image, write_atomically
from facetrace.tasks.training import PreprocessConfig, TrainConfig, prepare_bytes

log = logging.getLogger("facetrace.api")


class NotReady(RuntimeError):
    """No champion is loaded yet."""


class Overloaded(RuntimeError):
    """The queue in front of the model is full."""


# ---------------------------------------------------------------- the loaded model


@dataclass(frozen=True)
class LoadedModel:
    """A registered detector in memory, with what its answers must carry."""

    id: int
    backbone: str
    version: int
    threshold: float
    sha256: str
    config: TrainConfig
    network: Any
    hyperparameters: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"id": self.id, "backbone": self.backbone, "version": self.version, "threshold": self.threshold,
                "sha256": self.sha256, "image_size": self.config.preprocess.image_size}

    def decide(self, score: float) -> str:
        return "synthetic" if score >= self.threshold else "real"


def load_registered(info: dict[str, Any], threads: int | None = None) -> LoadedModel:
    """Load a registry row's model (sha256 checked) and run it once, so the first request is not slow."""
    from facetrace.tasks.training import configure_tensorflow, load_model, score_batch

    configure_tensorflow(threads)
    network = load_model(info["path"], info["sha256"])
    config = TrainConfig.from_hyperparameters(info["hyperparameters"])
    size = config.preprocess.image_size
    score_batch(network, np.zeros((1, size, size, 3), np.uint8), flip=config.test_time_flip)
    return LoadedModel(id=info["id"], backbone=info["backbone"], version=info["version"],
                       threshold=float(info["threshold"]), sha256=info["sha256"], config=config, network=network,
                       hyperparameters=info["hyperparameters"])


# ---------------------------------------------------------------- input


@dataclass
class Upload:
    """One checked image of a request: its bytes, digest, format and the tensor for the model."""

    name: str
    data: bytes
    sha256: str
    extension: str
    pixels: np.ndarray
    preprocess: PreprocessConfig
    decode_ms: float


def check_upload(name: str, data: bytes, limits: Limits, preprocess: PreprocessConfig) -> Upload:
    """The ingest guard (size cap, full decode, decompression-bomb limit), then the model's input.

    Raises :class:`Quarantine` with the same reason codes ingest records."""
    started = time.perf_counter()
    record = inspect_image(data, limits)
    try:
        pixels = prepare_bytes(data, preprocess)
    except Exception as exc:  # noqa: BLE001 - inspect_image decoded it; a failure here is still the file's
        raise Quarantine("unconvertible", f"{type(exc).__name__}: {exc}") from None
    return Upload(name=name, data=data, sha256=record.sha256, extension=record.extension, pixels=pixels,
                  preprocess=preprocess, decode_ms=(time.perf_counter() - started) * 1000)


@dataclass
class Answer:
    score: float
    model: LoadedModel
    batch_size: int
    queued_ms: float
    model_ms: float


# ---------------------------------------------------------------- the micro-batcher


class QueueWorker:
    """A bounded queue drained by one thread in groups: up to ``group`` items, or what arrived
    within ``wait_s`` after the first. ``stop()`` lets the thread finish what is queued."""

    def __init__(self, name: str, *, queue_size: int, group: int, wait_s: float) -> None:
        self.group = max(1, group)
        self.wait_s = max(0.0, wait_s)
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, queue_size))
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    @property
    def depth(self) -> int:
        return self._queue.qsize()

    def handle(self, items: list) -> None:
        raise NotImplementedError

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            items, stop = [first], False
            deadline = time.perf_counter() + self.wait_s
            while len(items) < self.group:
                try:
                    item = self._queue.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                items.append(item)
            try:
                self.handle(items)
            except Exception:  # noqa: BLE001 - the thread must outlive one bad group
                log.exception("%s failed on %d items", self._thread.name, len(items))
            if stop:
                return


@dataclass
class _Pending:
    upload: Upload
    future: Future
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher(QueueWorker):
    """A bounded queue in front of the model and one worker thread that runs it on up to
    ``max_batch`` images at a time, waiting at most ``max_wait_s`` after the first for more.

    Each batch is scored by the model current when the batch starts, and every answer names that
    model: a hot swap between two batches never mixes models inside one forward pass.
    """

    def __init__(self, current, *, max_batch: int, max_wait_s: float, queue_size: int) -> None:
        super().__init__("facetrace-batcher", queue_size=queue_size, group=max_batch, wait_s=max_wait_s)
        self._current = current
        self._lock = threading.Lock()  # a request's images enter the queue together or not at all
        self.batches = 0
        self.images = 0

    def submit(self, uploads: list[Upload]) -> list[Future]:
        with self._lock:
            free = self._queue.maxsize - self._queue.qsize()
            if len(uploads) > free:
                raise Overloaded(f"{self._queue.qsize()} images already wait for the model "
                                 f"(queue of {self._queue.maxsize}); retry shortly")
            pending = [_Pending(upload, Future()) for upload in uploads]
            for item in pending:
                self._queue.put_nowait(item)
        return [item.future for item in pending]

    def handle(self, items: list[_Pending]) -> None:
        batch = [item for item in items if item.future.set_running_or_notify_cancel()]
        if batch:
            self._score(batch)

    def _score(self, batch: list[_Pending]) -> None:
        from facetrace.tasks.training import score_batch

        started = time.perf_counter()
        model = self._current()
        if model is None:  # cannot happen after readiness, but never leave a caller waiting
            for item in batch:
                item.future.set_exception(NotReady("no champion model is loaded"))
            return
        try:
            wanted = model.config.preprocess
            # Inputs prepared for a model swapped out meanwhile are prepared again for this one.
            pixels = np.stack([item.upload.pixels if item.upload.preprocess == wanted
                               else prepare_bytes(item.upload.data, wanted) for item in batch])
            scores = score_batch(model.network, pixels, flip=model.config.test_time_flip)
        except Exception as exc:  # noqa: BLE001 - reported to each waiting request
            log.exception("scoring a batch of %d failed", len(batch))
            for item in batch:
                item.future.set_exception(exc)
            return
        finished = time.perf_counter()
        self.batches += 1
        self.images += len(batch)
        for item, score in zip(batch, scores):
            item.future.set_result(Answer(score=float(score), model=model, batch_size=len(batch),
                                          queued_ms=(started - item.enqueued) * 1000,
                                          model_ms=(finished - started) * 1000))


# ---------------------------------------------------------------- predictions in the catalog


class PredictionRecorder(QueueWorker):
    """Answers written to ``predictions`` in batches by a thread of their own (never on the request path).

    Bounded: when the catalog cannot keep up, rows beyond the queue are dropped and counted
    (``dropped`` in /healthz), rather than growing memory or slowing answers.
    """

    def __init__(self, catalog_url: str, *, queue_size: int = 20_000, flush_rows: int = 500,
                 flush_s: float = 1.0) -> None:
        super().__init__("facetrace-recorder", queue_size=queue_size, group=flush_rows, wait_s=flush_s)
        self.catalog_url = catalog_url
        self.written = 0
        self.dropped = 0

    def record(self, row: dict[str, Any]) -> None:
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self.dropped += 1

    def handle(self, rows: list[dict]) -> None:
        self._write(rows)

    def _write(self, rows: list[dict]) -> None:
        try:
            with session_scope(get_engine(self.catalog_url)) as session:
                session.execute(insert(Prediction), rows)
            self.written += len(rows)
        except Exception:  # noqa: BLE001 - the catalog being away must not stop the service
            log.exception("could not record %d predictions", len(rows))
            self.dropped += len(rows)


# ---------------------------------------------------------------- the service


class DetectionService:
    """The champion, kept current: polls the catalog every ``poll_s`` and, when another model has
    become champion, loads it beside the one serving and switches with one reference assignment.
    Requests in flight finish on the model they started with; none fails because of a swap."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.catalog_url = settings.catalog_url
        self.limits = Limits(settings.max_file_bytes, settings.max_image_pixels, settings.min_image_side)
        self._model: LoadedModel | None = None
        self._failed: tuple[int, str] | None = None  # a champion that would not load: not retried each poll
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="facetrace-watcher", daemon=True)
        self.batcher = MicroBatcher(lambda: self._model, max_batch=settings.api_max_batch,
                                    max_wait_s=settings.api_max_wait_ms / 1000, queue_size=settings.api_queue_size)
        self.recorder = PredictionRecorder(self.catalog_url) if settings.api_record_predictions else None
        self.explain_lock = threading.Lock()
        self.swaps = 0

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    def start(self) -> None:
        get_engine(self.catalog_url)  # migrate before anything reads
        self.refresh()
        self.batcher.start()
        if self.recorder:
            self.recorder.start()
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        self._watcher.join(timeout=30)
        self.batcher.stop()
        if self.recorder:
            self.recorder.stop()

    def _watch(self) -> None:
        while not self._stop.wait(self.settings.api_poll_s):
            try:
                self.refresh()
            except Exception:  # noqa: BLE001 - a catalog hiccup must not end the watcher
                log.exception("champion poll failed")

    def refresh(self) -> bool:
        """Load the catalog's champion if it is not the one serving; True when a swap happened."""
        with session_scope(get_engine(self.catalog_url)) as session:
            row = current_champion(session)
            info = serving_info(row) if row is not None else None
        if info is None or (self._model is not None and self._model.id == info["id"]):
            return False
        if self._failed == (info["id"], info["sha256"]):
            return False
        try:
            loaded = load_registered(info, self.settings.train_threads)
        except Exception as exc:  # noqa: BLE001 - keep serving the old champion
            self._failed = (info["id"], info["sha256"])
            log.error("champion %s could not be loaded (%s: %s); still serving %s", info["id"],
                      type(exc).__name__, exc, self._model.id if self._model else "nothing")
            return False
        previous = self._model
        self._model = loaded  # the swap: one reference assignment, atomic for every reader
        self.swaps += previous is not None
        log.info("serving model %s (%s v%s)%s", loaded.id, loaded.backbone, loaded.version,
                 f", replacing {previous.id}" if previous else "")
        return True

    def registry(self) -> list[dict[str, Any]]:
        with session_scope(get_engine(self.catalog_url)) as session:
            rows = session.scalars(select(Model).order_by(Model.id)).all()
            return [{"id": m.id, "backbone": m.backbone, "version": m.version, "stage": m.stage,
                     "threshold": m.threshold, "image_size": m.image_size,
                     "roc_auc": ((m.metrics or {}).get("test") or {}).get("roc_auc"),
                     "created_at": m.created_at.isoformat() if m.created_at else None,
                     "serving": self._model is not None and self._model.id == m.id} for m in rows]

    def record(self, upload: Upload, answer: Answer, label: str | None, request_id: str) -> None:
        if self.recorder:
            self.recorder.record({"sha256": upload.sha256, "model_id": answer.model.id, "score": answer.score,
                                  "decision": answer.model.decide(answer.score), "label": label,
                                  "request_id": request_id, "created_at": utcnow()})

    def keep_labelled(self, upload: Upload, label: str | None) -> str | None:
        """Opt-in (FACETRACE_API_KEEP_LABELLED): a labelled upload goes to the inbox for the next ingest."""
        if not (label and self.settings.api_keep_labelled):
            return None
        target = self.settings.data_dir.resolve() / "inbox" / label / f"{upload.sha256}.{upload.extension}"
        if not target.exists():
            write_atomically(target, upload.data)
        return str(target)

    def explain(self, upload: Upload) -> tuple[bytes, LoadedModel, float]:
        """A Grad-CAM overlay (PNG) of why the serving model decided as it did, and its score."""
        from facetrace.tasks.evaluation import explained_network, grad_cam, overlay_png
        from facetrace.tasks.training import score_batch

        model = self._model
        if model is None:
            raise NotReady("no champion model is loaded")
        pixels = upload.pixels if upload.preprocess == model.config.preprocess else \
            prepare_bytes(upload.data, model.config.preprocess)
        network, layer = explained_network(model.network, model.hyperparameters)
        with self.explain_lock:  # one gradient computation at a time: the CPU is shared
            score = float(score_batch(model.network, pixels[None], flip=model.config.test_time_flip)[0])
            heat = grad_cam(network, pixels[None], layer)[0]
        return overlay_png(pixels, heat), model, score


def new_request_id() -> str:
    return str(uuid.uuid4())
