from streambridge.shared import keys


def test_redis_key_strings_are_pinned() -> None:
    """These strings are a wire contract between processes of different versions: change them knowingly."""
    assert keys.QUEUE_NAME == "sb:queue"
    assert keys.chat("c1") == "sb:chat:c1"
    assert keys.events("c1") == "sb:chat:c1:events"
    assert keys.notify("c1") == "sb:chat:c1:notify"
    assert keys.lease("c1") == "sb:chat:c1:lease"
    assert keys.credential("0123456789abcdef") == "sb:cred:0123456789abcdef"
    assert keys.api_keys() == "sb:keys"
    assert keys.active("visitor_1") == "sb:active:visitor_1"
    assert keys.user_streams("visitor_1") == "sb:streams:user:visitor_1"
    assert keys.ip_streams("127.0.0.1") == "sb:streams:ip:127.0.0.1"
    assert keys.secret() == "sb:secret"
    assert keys.edges() == "sb:edges"
    assert keys.cancels() == "sb:cancels"
    assert keys.running() == "sb:running"
    assert keys.wake() == "sb:wake"
    assert keys.rate("visitor_1", 29) == "sb:rate:visitor_1:29"
    assert keys.visitor_logins("127.0.0.1", 29) == "sb:logins:127.0.0.1:29"
