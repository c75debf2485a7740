from streambridge.api.auth import sign_stream_token, verify_stream_token

SECRET = b"k" * 32
CRED = "0123456789abcdef"


def test_stream_token_opens_its_own_chat_until_it_expires() -> None:
    token = sign_stream_token(SECRET, "chat-a", CRED, ttl=60, now=1000)
    assert verify_stream_token(SECRET, "chat-a", token, now=1059) == CRED
    assert verify_stream_token(SECRET, "chat-a", token, now=1061) is None


def test_stream_token_of_another_chat_or_secret_is_refused() -> None:
    token = sign_stream_token(SECRET, "chat-a", CRED, ttl=60, now=1000)
    assert verify_stream_token(SECRET, "chat-b", token, now=1001) is None
    assert verify_stream_token(b"other", "chat-a", token, now=1001) is None


def test_forged_stream_tokens_are_refused() -> None:
    token = sign_stream_token(SECRET, "chat-a", CRED, ttl=60, now=1000)
    expires, credential, signature = token.split(".")
    later = f"{int(expires) + 3600}.{credential}.{signature}"
    other_credential = f"{expires}.{'f' * 16}.{signature}"
    for forged in [
        later,
        other_credential,
        "",
        ".",
        "..",
        "abc",
        "1060..",
        f"{expires}.{credential}.{signature[:-1]}x",
    ]:
        assert verify_stream_token(SECRET, "chat-a", forged, now=1001) is None


def test_on_redis_6_2_a_stream_holding_a_lone_failed_event_is_not_taken_for_trimmed() -> None:
    from streambridge.api.edge import ChatState, check_retained

    # Redis 6.2's XINFO has no entries-added: a chat past its deadline before any attempt began
    info = {"length": 1, "last-generated-id": b"5-0", "first-entry": (b"5-0", {b"type": b"failed"})}
    check_retained("c", ChatState(None, b"u", b"failed", info), None)  # no 410
