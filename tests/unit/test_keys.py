from shared import keys


def test_redis_key_strings_are_pinned() -> None:
    """These strings are a wire contract between processes of different versions: change them knowingly."""
    assert keys.QUEUE_NAME == "sb:queue"
    assert keys.chat("c1") == "sb:chat:c1"
    assert keys.events("c1") == "sb:chat:c1:events"
    assert keys.notify("c1") == "sb:chat:c1:notify"
    assert keys.lease("c1") == "sb:chat:c1:lease"
    assert keys.token("abc") == "sb:token:abc"
    assert keys.secret() == "sb:secret"
    assert keys.edges() == "sb:edges"
    assert keys.cancels() == "sb:cancels"
    assert keys.running() == "sb:running"
    assert keys.wake() == "sb:wake"
    assert keys.rate("visitor_1", 29) == "sb:rate:visitor_1:29"
