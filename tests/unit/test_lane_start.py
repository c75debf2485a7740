"""Starting the batch lane must not eat a signal meant for its worker."""

from __future__ import annotations

import os
import signal
import types

from streambridge.shared.settings import Settings
from streambridge.workers.lane import BatchLane


def test_a_sigint_that_lands_while_the_lane_spawns_still_reaches_the_worker() -> None:
    lane = BatchLane(Settings(), "http://127.0.0.1:9/v1")
    heard: list[int] = []

    def spawn() -> None:  # the signal arrives mid-spawn
        os.kill(os.getpid(), signal.SIGINT)

    lane._process = types.SimpleNamespace(start=spawn)  # type: ignore[assignment]
    previous = signal.signal(signal.SIGINT, lambda signum, _: heard.append(signum))
    try:
        lane.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    assert heard == [signal.SIGINT]
