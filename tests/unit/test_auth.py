from api.auth import hash_token, sign_stream_token, verify_stream_token

SECRET = b"k" * 32


def test_stream_token_opens_its_own_chat_until_it_expires() -> None:
    token = sign_stream_token(SECRET, "chat-a", ttl=60, now=1000)
    assert verify_stream_token(SECRET, "chat-a", token, now=1059)
    assert not verify_stream_token(SECRET, "chat-a", token, now=1061)


def test_stream_token_of_another_chat_or_secret_is_refused() -> None:
    token = sign_stream_token(SECRET, "chat-a", ttl=60, now=1000)
    assert not verify_stream_token(SECRET, "chat-b", token, now=1001)
    assert not verify_stream_token(b"other", "chat-a", token, now=1001)


def test_forged_stream_tokens_are_refused() -> None:
    token = sign_stream_token(SECRET, "chat-a", ttl=60, now=1000)
    expires, _, signature = token.partition(".")
    later = f"{int(expires) + 3600}.{signature}"
    for forged in [later, "", ".", "abc", "1060.", f"{expires}.{signature[:-1]}x"]:
        assert not verify_stream_token(SECRET, "chat-a", forged, now=1001)


def test_tokens_are_stored_as_hashes_only() -> None:
    assert hash_token("sbv_secret") != "sbv_secret"
    assert len(hash_token("sbv_secret")) == 64
