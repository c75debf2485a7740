"""Canaries for what ``shared.jobs`` knows of arq's internals: an arq upgrade that changes any of it
fails here, in one place, rather than somewhere in a worker at run time."""

from __future__ import annotations

import inspect

import arq
import pytest
from arq.connections import ArqRedis
from arq.constants import expires_extra_ms, job_key_prefix
from arq.jobs import deserialize_job
from arq.worker import Worker

from streambridge.shared import keys
from streambridge.shared.jobs import ARQ_VERSIONS, JOB_EXPIRES_MS, JOB_FUNCTION, QueueWorker, job_record


def test_the_installed_arq_is_one_these_internals_were_read_from() -> None:
    assert arq.VERSION.rsplit(".", 1)[0] in ARQ_VERSIONS, (
        f"arq {arq.VERSION}: re-read arq's Worker and job layout against shared/jobs.py, then add it to ARQ_VERSIONS"
    )


def test_a_job_record_is_one_arq_itself_reads() -> None:
    job = deserialize_job(job_record("c" * 32))
    assert (job.function, job.args, job.kwargs, job.job_try) == (JOB_FUNCTION, ("c" * 32,), {}, None)
    assert keys.job("c" * 32) == job_key_prefix + "c" * 32
    assert JOB_EXPIRES_MS == expires_extra_ms == 86_400_000


def test_the_worker_methods_streambridge_replaces_or_calls_are_arqs() -> None:
    # _poll_iteration (the scan) and start_jobs are replaced; the rest is called as arq defines it.
    for name, parameters in {
        "_poll_iteration": ["self"],
        "start_jobs": ["self", "job_ids"],
        "heart_beat": ["self"],
        "main": ["self"],
        "close": ["self"],
    }.items():
        method = getattr(Worker, name)
        assert inspect.iscoroutinefunction(method), name
        assert list(inspect.signature(method).parameters) == parameters, name
    init = inspect.signature(Worker.__init__).parameters
    for name in ("redis_pool", "queue_name", "burst", "poll_delay", "max_jobs", "on_startup", "on_shutdown"):
        assert name in init, name


def test_the_worker_attributes_streambridge_reads_are_arqs() -> None:
    # read or set by QueueWorker and the worker: arq's __init__ must still make each of them
    source = inspect.getsource(Worker.__init__)
    for name in ("_pool", "health_check_key", "allow_pick_jobs", "tasks", "ctx", "max_jobs", "queue_name"):
        assert f"self.{name}" in source, name
    assert isinstance(Worker.pool, property)


def test_arqs_main_loop_calls_the_scan_and_its_burst_mode_waits_for_tracked_tasks() -> None:
    source = inspect.getsource(Worker.main)
    assert "await self._poll_iteration()" in source
    assert "await asyncio.gather(*self.tasks.values())" in source
    assert "self.ctx['redis'] = self.pool" in source


async def test_a_queue_worker_uses_the_pool_it_is_given_and_the_queue_streambridge_names() -> None:
    pool = ArqRedis.from_url("redis://127.0.0.1:1")  # never reached: closing gives up at once
    worker = QueueWorker(pool=pool, concurrency=3, burst=True, poll_delay=0)
    try:
        assert worker.pool is pool
        assert worker.queue_name == keys.queue() == pool.default_queue_name
        assert worker.max_jobs == 3
        assert worker.tasks == {}
        with pytest.raises(AssertionError):
            await worker.start_jobs([b"x"])  # arq's own start is never used
    finally:
        await worker.close()
