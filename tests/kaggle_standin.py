"""A stand-in for the Kaggle API on 127.0.0.1, speaking the protocol the real client (kaggle 2.x with
kagglesdk) uses, so tests run the real client code path without a network.

How the real client is routed here, with no change to it:
- ``KAGGLE_API_ENVIRONMENT=LOCALHOST`` makes ``KaggleApi`` build its ``KaggleClient`` for the local
  endpoint ``http://localhost`` (``/api/v1/<service>/<method>``) instead of ``https://api.kaggle.com``;
- ``HTTP_PROXY=http://127.0.0.1:<port>`` makes ``requests`` (under kagglesdk) send those plain-HTTP
  requests to this server, which answers them as the API would (``NO_PROXY=127.0.0.1`` keeps other
  loopback traffic, such as the Prefect API, direct).

Protocol (kagglesdk ``KaggleHttpClient``): every call is ``POST /api/v1/<Service>/<Method>`` with a
JSON body of the request object in camelCase; legacy API keys travel as HTTP basic auth. A dataset
download (``datasets.DatasetApiService/DownloadDataset``) answers with a redirect to a signed storage
URL, which the client follows with a GET and streams into ``<slug>.zip``. Metadata
(``GetDatasetMetadata``) answers ``{"info": DatasetInfo}``.
"""

from __future__ import annotations

import base64
import json
import threading
import zipfile
from dataclasses import dataclass, field
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

SERVICE = "/api/v1/datasets.DatasetApiService/"


@dataclass
class Dataset:
    owner: str
    slug: str
    archive: bytes
    licenses: list[str] = field(default_factory=lambda: ["unknown"])
    title: str = ""


@dataclass
class Seen:
    method: str
    path: str
    authorization: str | None
    body: dict | None


class KaggleStandIn:
    """Serve ``datasets`` to clients presenting ``username``/``key``; record every request."""

    def __init__(self, datasets: list[Dataset], username: str = "facetrace-test", key: str = "0123456789abcdef"):
        self.datasets = {f"{d.owner}/{d.slug}": d for d in datasets}
        self.username, self.key = username, key
        self.requests: list[Seen] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def __enter__(self) -> KaggleStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def client_env(self, with_credentials: bool = True) -> dict[str, str]:
        """Environment that points the real Kaggle client at this server."""
        proxy = f"http://127.0.0.1:{self.port}"
        # Only `localhost` (the client's endpoint) goes through the proxy; the Prefect API on
        # 127.0.0.1 is reached directly.
        env = {"KAGGLE_API_ENVIRONMENT": "LOCALHOST", "HTTP_PROXY": proxy, "http_proxy": proxy,
               "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}
        if with_credentials:
            env.update(KAGGLE_USERNAME=self.username, KAGGLE_KEY=self.key)
        return env

    def _authorized(self, header: str | None) -> bool:
        expected = base64.b64encode(f"{self.username}:{self.key}".encode()).decode()
        return header == f"Basic {expected}"

    def _handler(self):
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # keep test output quiet
                pass

            def _reply(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in headers.items():
                    self.send_header(name.replace("_", "-"), value)
                self.end_headers()
                self.wfile.write(body)

            def _json(self, status: int, payload: dict) -> None:
                self._reply(status, json.dumps(payload).encode(), "application/json")

            def _path(self) -> str:
                # Through a proxy the request line carries the absolute URL.
                return urlsplit(self.path).path

            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                path = self._path()
                standin.requests.append(Seen("POST", path, self.headers.get("Authorization"), body))
                if not standin._authorized(self.headers.get("Authorization")):
                    self._json(401, {"code": 401, "message": "Unauthenticated"})
                    return
                if not path.startswith(SERVICE):
                    self._json(404, {"code": 404, "message": f"no method {path}"})
                    return
                dataset = standin.datasets.get(f"{(body or {}).get('ownerSlug')}/{(body or {}).get('datasetSlug')}")
                if dataset is None:
                    self._json(404, {"code": 404, "message": "Dataset not found"})
                    return
                method = path.removeprefix(SERVICE)
                if method == "DownloadDataset":
                    location = f"http://localhost/storage/kaggle-data-sets/{dataset.owner}/{dataset.slug}/archive.zip"
                    self._reply(302, b"", "text/plain", Location=location + "?X-Goog-Signature=standin")
                elif method == "GetDatasetMetadata":
                    self._json(200, {"info": {
                        "datasetId": 1, "datasetSlug": dataset.slug, "ownerUser": dataset.owner,
                        "title": dataset.title or dataset.slug, "licenses": [{"name": n} for n in dataset.licenses],
                    }})
                else:
                    self._json(404, {"code": 404, "message": f"no method {method}"})

            def do_GET(self) -> None:  # noqa: N802
                path = self._path()
                standin.requests.append(Seen("GET", path, self.headers.get("Authorization"), None))
                parts = path.split("/")
                # /storage/kaggle-data-sets/<owner>/<slug>/archive.zip: a signed URL, no auth needed.
                if len(parts) == 6 and parts[1] == "storage" and f"{parts[3]}/{parts[4]}" in standin.datasets:
                    data = standin.datasets[f"{parts[3]}/{parts[4]}"].archive
                    self._reply(200, data, "application/zip",
                                Last_Modified=formatdate(1_700_000_000, usegmt=True))
                    return
                self._reply(404, b"not found", "text/plain")

        return Handler


def human_faces_archive(images: dict[str, bytes]) -> bytes:
    """A zip laid out as Kaggle ships ``ashwingupta3012/human-faces``: one ``Humans/`` folder of
    files named like ``1 (123).jpg``, deflated."""
    import io

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, data in images.items():
            archive.writestr(f"Humans/{name}", data)
    return buffer.getvalue()


def write_archive(path: Path, images: dict[str, bytes]) -> Path:
    path.write_bytes(human_faces_archive(images))
    return path
