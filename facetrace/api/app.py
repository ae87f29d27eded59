"""The FastAPI application of `facetrace api`.

    POST /v1/detect    one or several images (multipart) -> P(synthetic), decision, model, sha256, timing
    POST /v1/explain   one image -> a Grad-CAM overlay (PNG) of the serving model's decision
    GET  /v1/models    the registry, with the model now serving marked
    GET  /healthz      the process answers (always 200 while it runs)
    GET  /readyz       a champion is loaded (503 before one exists)
    GET  /             a page to try it; OpenAPI docs at /docs

Every error is JSON ``{"error": code, "detail": reason}`` with a 4xx status (or 503/504 for a full
queue or a timeout), never a 500 for bad input. Run with several workers as
``uvicorn --factory facetrace.api.app:create_app --workers N`` (each worker loads the champion).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from facetrace.api.service import DetectionService, NotReady, Overloaded, Upload, check_upload, new_request_id
from facetrace.db.models import LABELS
from facetrace.tasks.storage import Quarantine

STATIC = Path(__file__).with_name("static")


class RequestTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body larger than {limit} bytes")


def error(status: int, code: str, detail: str, **extra: Any) -> JSONResponse:
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse({"error": code, "detail": detail, **extra}, status_code=status, headers=headers)


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes: at once when Content-Length says so, else as soon
    as the streamed body passes the limit (the receiving endpoint turns that into a 413)."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            response = error(413, "too_large", str(RequestTooLarge(self.limit)))
            return await response(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise RequestTooLarge(self.limit)
            return message

        return await self.app(scope, limited_receive, send)


def create_app(settings=None, service: DetectionService | None = None) -> FastAPI:
    """The application; ``settings`` default to the environment's (FACETRACE_*)."""
    if settings is None:
        from facetrace.settings import get_settings

        settings = get_settings()
    service = service or DetectionService(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI):
        await run_in_threadpool(service.start)
        try:
            yield
        finally:
            await run_in_threadpool(service.stop)

    app = FastAPI(title="facetrace detection API", version="1", lifespan=lifespan,
                  description="Is this face photo synthetic? Answers from the registry's champion detector.")
    app.state.service = service

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError):
        return error(422, "invalid_request", json.dumps(exc.errors(), default=str)[:500])

    @app.exception_handler(RequestTooLarge)
    async def too_large(_request: Request, exc: RequestTooLarge):
        return error(413, "too_large", str(exc))

    async def read_uploads(request: Request, max_images: int) -> tuple[list[tuple[str, bytes]], str | None]:
        """The request's files and its optional label; raises _Refused with the 4xx to send."""
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            raise _Refused(error(415, "unsupported_media_type",
                                 f"send images as multipart/form-data (one or more file fields), "
                                 f"not {content_type.split(';')[0] or 'no content type'}"))
        try:
            form = await request.form(max_files=max_images, max_fields=16)
        except RequestTooLarge as exc:
            raise _Refused(error(413, "too_large", str(exc))) from None
        except StarletteHTTPException as exc:  # malformed multipart, too many files
            raise _Refused(error(400, "bad_multipart", str(exc.detail))) from None
        files: list[tuple[str, bytes]] = []
        for _key, value in form.multi_items():
            if isinstance(value, UploadFile):
                files.append((value.filename or f"file{len(files) + 1}", await value.read()))
        await form.close()
        label = form.get("label")
        if label is not None and (not isinstance(label, str) or label not in LABELS):
            raise _Refused(error(422, "invalid_label", f"label must be one of {', '.join(LABELS)}"))
        if not files:
            raise _Refused(error(400, "no_image", "no image in the request: send one or more files as "
                                                  "multipart form fields (e.g. curl -F file=@face.jpg)"))
        return files, label or None

    async def checked(files: list[tuple[str, bytes]]) -> list[Upload]:
        model = service.model
        if model is None:
            raise _Refused(not_ready())
        outcomes = await run_in_threadpool(_check_all, files, service.limits, model.config.preprocess)
        refused = [{"file": name, "reason": o.reason, "detail": o.detail}
                   for (name, _), o in zip(files, outcomes) if isinstance(o, Quarantine)]
        if refused:
            status = 413 if all(r["reason"] == "too_large" for r in refused) else 422
            raise _Refused(error(status, refused[0]["reason"], "; ".join(f"{r['file']}: {r['detail']}"
                                                                         for r in refused), files=refused))
        return outcomes

    def not_ready() -> JSONResponse:
        return error(503, "not_ready", "no champion model is loaded yet; train one with `facetrace train`")

    @app.post("/v1/detect", summary="P(synthetic) and a decision for one or several face images")
    async def detect(request: Request):
        started = time.perf_counter()
        request_id = new_request_id()
        try:
            files, label = await read_uploads(request, settings.api_max_images)
            uploads = await checked(files)
        except _Refused as refused:
            return refused.response
        try:
            futures = service.batcher.submit(uploads)
        except Overloaded as exc:
            return error(503, "overloaded", str(exc))
        waiting = [asyncio.wrap_future(f) for f in futures]
        try:
            answers = await asyncio.wait_for(asyncio.gather(*waiting), timeout=settings.api_request_timeout_s)
        except asyncio.TimeoutError:
            for f in futures:
                f.cancel()
            return error(504, "timeout", f"not answered within {settings.api_request_timeout_s:g} s")
        except NotReady:
            return not_ready()
        results = []
        for upload, answer in zip(uploads, answers):
            service.record(upload, answer, label, request_id)
            kept = await run_in_threadpool(service.keep_labelled, upload, label) if label else None
            results.append({
                "file": upload.name, "sha256": upload.sha256, "probability": answer.score,
                "decision": answer.model.decide(answer.score), "threshold": answer.model.threshold,
                "model": {k: answer.model.describe()[k] for k in ("id", "backbone", "version")},
                "label": label, "kept_in_inbox": kept is not None,
                "timing_ms": {"decode": round(upload.decode_ms, 2), "queue": round(answer.queued_ms, 2),
                              "model": round(answer.model_ms, 2), "batch_size": answer.batch_size}})
        return {"request_id": request_id, "results": results,
                "models": sorted({r["model"]["id"] for r in results}),
                "timing_ms": round((time.perf_counter() - started) * 1000, 2)}

    @app.post("/v1/explain", summary="Grad-CAM overlay (PNG) of the serving model's decision on one image",
              response_class=Response, responses={200: {"content": {"image/png": {}}}})
    async def explain(request: Request):
        try:
            files, _label = await read_uploads(request, 1)
            upload, = await checked(files[:1])
        except _Refused as refused:
            return refused.response
        try:
            png, model, score = await run_in_threadpool(service.explain, upload)
        except NotReady:
            return not_ready()
        return Response(png, media_type="image/png", headers={
            "X-Model-Id": str(model.id), "X-Probability": f"{score:.6f}", "X-Decision": model.decide(score)})

    @app.get("/v1/models", summary="The model registry; `serving` marks the model answering now")
    async def models():
        return {"serving": service.model.describe() if service.model else None,
                "models": await run_in_threadpool(service.registry)}

    @app.get("/healthz", summary="Liveness: the process answers")
    async def healthz():
        recorder = service.recorder
        return {"status": "ok", "queue": service.batcher.depth, "batches": service.batcher.batches,
                "images": service.batcher.images, "swaps": service.swaps,
                "predictions_written": recorder.written if recorder else 0,
                "predictions_dropped": recorder.dropped if recorder else 0}

    @app.get("/readyz", summary="Readiness: a champion is loaded (503 before one exists)")
    async def readyz():
        if service.model is None:
            return not_ready()
        return {"ready": True, "model": service.model.describe()}

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.add_middleware(BodyLimit, limit=settings.api_max_request_bytes)
    return app


class _Refused(Exception):
    def __init__(self, response: JSONResponse) -> None:
        self.response = response


def _check_all(files, limits, preprocess) -> list:
    outcomes = []
    for name, data in files:
        try:
            outcomes.append(check_upload(name, data, limits, preprocess))
        except Quarantine as exc:
            outcomes.append(exc)
    return outcomes
