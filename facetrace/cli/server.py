"""`facetrace server [status|start|stop]`: this data root's background Prefect server and its UI.

Flow commands start it on first use (see :mod:`facetrace.local_server`); these verbs show where it
is, start it ahead of time (e.g. to open the UI), or stop it to free its memory.
"""

from __future__ import annotations

import argparse

from facetrace.cli.app import print_table, verb


def add_parsers(sub) -> None:
    p = sub.add_parser("server", help="this data root's background Prefect server (and UI): status, start, stop")
    p.add_argument("action", nargs="?", choices=["status", "start", "stop"], default="status")


@verb("server")
def cmd_server(args: argparse.Namespace) -> int:
    from facetrace.local_server import configured_api_url, read_state, running_server, server_home, start_server, \
        stop_server
    from facetrace.settings import get_settings

    data_dir = get_settings().data_dir
    configured = configured_api_url()
    if args.action == "stop":
        state = stop_server(data_dir)
        print(f"stopped the Prefect server at {state['ui_url']} (pid {state['pid']})" if state
              else "no Prefect server recorded for this data root")
        return 0
    if args.action == "start":
        state, started = start_server(data_dir)
        print(f"{'started' if started else 'already running'}: Prefect UI at {state['ui_url']}")
    state = running_server(data_dir)
    recorded = read_state(data_dir)
    rows = [("data root", str(data_dir.resolve())),
            ("state", "running" if state else ("not answering" if recorded else "not started")),
            ("UI", state["ui_url"] if state else ""), ("API", state["api_url"] if state else ""),
            ("pid", state["pid"] if state else ""), ("started at", state["started_at"] if state else ""),
            ("home", str(server_home(data_dir)))]
    if configured:
        rows.append(("flows use", f"{configured} (PREFECT_API_URL)"))
    print_table(["server", "value"], rows, title="local Prefect server")
    return 0
