"""The collector's policy in streambridge's processes: no full pass while long-lived objects grow
(10,000 streams opening on an edge), since a full pass holds every stream's delivery."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from streambridge.serve import settle_gc


@pytest.fixture(autouse=True)
def default_policy_afterwards() -> Iterator[None]:
    before = gc.get_threshold()
    gc.collect()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def full_passes_while_growing(objects: int) -> int:
    """Full passes the collector ran on its own while ``objects`` tracked objects were made, all kept."""
    passes = 0

    def count(phase: str, info: dict[str, int]) -> None:
        nonlocal passes
        passes += phase == "stop" and info["generation"] == 2

    gc.callbacks.append(count)
    try:
        kept = [[n] for n in range(objects)]
    finally:
        gc.callbacks.remove(count)
    del kept
    return passes


def test_the_default_policy_runs_full_passes_as_long_lived_objects_grow() -> None:
    gc.set_threshold(700, 10, 10)  # CPython's default, whatever an earlier test left
    assert full_passes_while_growing(2_000_000) > 0, "the premise of settle_gc: CPython's default pauses here"


def test_settled_processes_run_no_full_pass_as_long_lived_objects_grow() -> None:
    settle_gc()
    assert full_passes_while_growing(2_000_000) == 0
