from streambridge.api.edge import _frame
from streambridge.api.sse import HEADERS, PING, encode_entry
from streambridge.shared.events import Complete, Content, encode_event
from streambridge.shared.streams import Entry


def test_entry_is_encoded_as_id_event_and_one_line_of_json() -> None:
    data = encode_event(Content(content="héllo\nworld 👩‍💻", index=3, attempt=1))
    wire = encode_entry(Entry("1732400000000-0", "content", data))
    assert wire == (
        b"id: 1732400000000-0\n"
        b"event: content\n"
        b'data: {"type":"content","content":"h\xc3\xa9llo\\nworld \xf0\x9f\x91\xa9\xe2\x80\x8d\xf0\x9f\x92\xbb",'
        b'"index":3,"attempt":1}\n'
        b"\n"
    )


def test_terminal_event_bytes() -> None:
    data = encode_event(
        Complete(attempt=2, total_chunks=5, content_length=9, elapsed_ms=12, finish_reason="stop", usage=None)
    )
    assert encode_entry(Entry("5-1", "complete", data)) == (
        b"id: 5-1\nevent: complete\n"
        b'data: {"type":"complete","attempt":2,"total_chunks":5,"content_length":9,"elapsed_ms":12,'
        b'"finish_reason":"stop","usage":null}\n\n'
    )


def test_heartbeat_is_a_comment_line() -> None:
    assert PING == b": ping\n\n"


def test_stream_headers_keep_proxies_from_buffering() -> None:
    assert HEADERS["Cache-Control"] == "no-cache"
    assert HEADERS["X-Accel-Buffering"] == "no"
    assert HEADERS["Content-Type"].startswith("text/event-stream")


def test_a_batch_is_framed_once_for_all_its_readers_and_right_for_each_kind() -> None:
    batch = [Entry("7-0", "content", b'{"a":1}'), Entry("7-1", "content", b'{"a":2}')]
    sse = encode_entry(batch[0]) + encode_entry(batch[1])
    chunk = b"%x\r\n%b\r\n" % (len(sse), sse)
    assert _frame(batch, True) == chunk
    assert _frame(batch, True) is _frame(batch, True), "the next reader of the same batch reuses its frame"
    assert _frame(batch, False) == sse  # an HTTP/1.0 reader of the same chat: not chunked
    assert _frame(batch, True) == chunk
    other = [Entry("8-0", "content", b'{"a":3}')]
    assert _frame(other, False) == encode_entry(other[0])  # another batch, though it may share an id()
