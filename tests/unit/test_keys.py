from streambridge.shared import keys


def test_redis_key_strings_are_pinned() -> None:
    """These strings are a wire contract between processes of different versions: change them knowingly."""
    assert keys.QUEUE_NAME == "sb:queue"
    assert keys.chat("c1") == "sb:chat:{c1}"
    assert keys.events("c1") == "sb:chat:{c1}:events"
    assert keys.notify("c1") == "sb:chat:{c1}:notify"
    assert keys.lease("c1") == "sb:chat:{c1}:lease"
    assert keys.credential("0123456789abcdef") == "sb:cred:0123456789abcdef"
    assert keys.api_keys() == "sb:keys"
    assert keys.active("visitor_1") == "sb:active:visitor_1"
    assert keys.user_streams("visitor_1") == "sb:streams:user:visitor_1"
    assert keys.ip_streams("127.0.0.1") == "sb:streams:ip:127.0.0.1"
    assert keys.secret() == "sb:secret"
    assert keys.edges() == "sb:edges"
    assert keys.cancels() == "sb:cancels"
    assert keys.workers() == "sb:workers"
    assert keys.worker_chats("w1") == "sb:worker:w1:chats"
    assert keys.reaping("w1") == "sb:reaping:w1"
    assert keys.wake() == "sb:wake"
    assert keys.rate("visitor_1") == "sb:rate:visitor_1"
    assert keys.visitor_logins("127.0.0.1") == "sb:logins:127.0.0.1"
    assert keys.queue() == "sb:queue"
    assert keys.job("c1") == "arq:job:c1"
    k_sha256 = "8254c329a92850f6d539dd376f4816ee2764517da5e0235514af433164480d7a"
    assert keys.idempotency("u", "k") == f"sb:idem:u:{k_sha256}"


def test_batch_key_strings_are_pinned() -> None:
    assert keys.file("file-1") == "sb:file:file-1"
    assert keys.file_lines("file-1") == "sb:file:file-1:lines"
    assert keys.file_items("file-1") == "sb:file:file-1:items"
    assert keys.user_files("visitor_1") == "sb:files:user:visitor_1"
    assert keys.user_file_sizes("visitor_1") == "sb:files:sizes:visitor_1"
    assert keys.user_file_bytes("visitor_1") == "sb:files:bytes:visitor_1"
    assert keys.batch("batch_1") == "sb:batch:batch_1"
    assert keys.batch_events("batch_1") == "sb:batch:batch_1:events"
    assert keys.batch_leases("batch_1") == "sb:batch:batch_1:leases"
    assert keys.batch_again("batch_1") == "sb:batch:batch_1:again"
    assert keys.batch_done("batch_1") == "sb:batch:batch_1:done"
    assert keys.user_batches("visitor_1") == "sb:batches:user:visitor_1"
    assert keys.active_batches() == "sb:batches:active"
    assert keys.user_batch_items("visitor_1") == "sb:batches:running:visitor_1"


def test_presence_key_strings_are_pinned() -> None:
    assert keys.processes() == "sb:processes"
    assert keys.process("worker-h-1-ab") == "sb:process:worker-h-1-ab"


def test_a_chats_own_keys_share_one_cluster_slot() -> None:
    """Every script over a chat's keys runs on one node of a Redis Cluster: one hash tag, the chat's id."""
    from redis.crc import key_slot

    slots = {key_slot(k(c).encode()) for k in (keys.chat, keys.events, keys.notify, keys.lease) for c in ["c1"]}
    assert len(slots) == 1
    assert key_slot(keys.chat("c2").encode()) != key_slot(keys.chat("c1").encode())
