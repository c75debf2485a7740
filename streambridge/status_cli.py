"""``streambridge status``: its flags. The view itself (``status_view``) is imported only when it runs:
it needs the server parts (redis, rich), and every other command starts without them."""

from __future__ import annotations

import argparse


def add_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    status = commands.add_parser(
        "status", help="a live view of queue, workers, edges and batches (needs STREAMBRIDGE_REDIS_URL)"
    )
    status.add_argument("--once", action="store_true", help="print one snapshot and exit")
    status.add_argument("--json", action="store_true", help="snapshots as JSON, one a line")
    status.add_argument("--interval", type=interval, default=1.0, help="seconds between refreshes (default 1)")


def interval(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0.1 <= seconds <= 3600:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds (0.1-3600)")
    return seconds
