"""`facetrace api`: the champion detector over HTTP (FastAPI on uvicorn).

Light at import time: FastAPI, uvicorn and TensorFlow load only when the verb runs.
"""

from __future__ import annotations

import argparse

from facetrace.cli.app import CLIError, verb


def add_parsers(sub) -> None:
    p = sub.add_parser("api", help="serve the champion over HTTP: POST /v1/detect, a page at /, docs at /docs")
    p.add_argument("--host", help="address to listen on (default FACETRACE_API_HOST, 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default FACETRACE_API_PORT, 8000)")


@verb("api")
def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    from facetrace.api.app import create_app
    from facetrace.settings import get_settings

    settings = get_settings()
    host = args.host or settings.api_host
    port = settings.api_port if args.port is None else args.port
    if not 0 <= port <= 65535:
        raise CLIError(f"--port must be between 0 and 65535, got {port}")
    uvicorn.run(create_app(settings), host=host, port=port, log_level="info", access_log=False,
                timeout_graceful_shutdown=10)
    return 0
