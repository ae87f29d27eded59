"""A real S3-compatible server on loopback for the store tests: moto's standalone server (HTTP,
its own thread), on a free port, which a test can stop and start again to simulate an outage.

Objects survive a stop/start within one test process (moto keeps them in this process's memory),
which is what an S3 outage looks like to a client: refused connections, then the same bucket back.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request

from tests.prefect_server import free_port

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "facetrace-test", "AWS_SECRET_ACCESS_KEY": "facetrace-test-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


class S3Server:
    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._server = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client_env(self) -> dict[str, str]:
        """The standard AWS variables a client (botocore, s3fs, a worker process) needs."""
        return {"AWS_ENDPOINT_URL": self.endpoint, **CREDENTIALS}

    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2).close()
                return self
            except urllib.error.HTTPError:
                return self
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"moto S3 server on {self.endpoint} did not start") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def running(self) -> bool:
        return self._server is not None

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, **{k.lower(): v for k, v in CREDENTIALS.items()
                                                           if k != "AWS_DEFAULT_REGION"},
                     region_name=CREDENTIALS["AWS_DEFAULT_REGION"]).create_bucket(Bucket=name)


def use_env(env: dict[str, str]) -> dict[str, str | None]:
    """Set variables in this process; returns the previous values for :func:`restore_env`."""
    previous = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return previous


def restore_env(previous: dict[str, str | None]) -> None:
    for key, value in previous.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
