from arq.constants import job_key_prefix
from arq.jobs import deserialize_job

from streambridge.shared import keys
from streambridge.shared.queue import job_record


def test_the_api_writes_the_job_record_arq_itself_would() -> None:
    job_keys, args = job_record("c" * 32)
    assert job_keys == [job_key_prefix + "c" * 32, keys.QUEUE_NAME, keys.wake()]
    job_id, job, expires_ms, score, backlog = args
    assert job_id == "c" * 32
    assert isinstance(job, bytes)
    decoded = deserialize_job(job)
    assert (decoded.function, decoded.args, decoded.kwargs, decoded.job_try) == ("run_chat", ("c" * 32,), {}, None)
    assert str(decoded.enqueue_time.timestamp() * 1000).startswith(str(score)[:10])
    assert int(expires_ms) == 86_400_000
    assert int(backlog) > 0
