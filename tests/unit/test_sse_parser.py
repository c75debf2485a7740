import pytest

from streambridge.sse import SSEMessage, SSEParser


def parse(*chunks: bytes) -> list[SSEMessage]:
    parser = SSEParser()
    return [message for chunk in chunks for message in parser.feed(chunk)]


def test_an_event_carries_its_id_type_and_data() -> None:
    stream = b'id: 1732400000000-0\nevent: content\ndata: {"type":"content"}\n\n'
    assert parse(stream) == [SSEMessage("1732400000000-0", "content", '{"type":"content"}')]


def test_data_lines_are_joined_with_newlines() -> None:
    assert parse(b"data: YHOO\ndata: +2\ndata: 10\n\n") == [SSEMessage(None, "message", "YHOO\n+2\n10")]


def test_the_spec_example_with_comments_and_ids() -> None:
    stream = b": test stream\n\ndata: first event\nid: 1\n\ndata:second event\nid\n\n data:  third event\n\n"
    assert parse(stream) == [
        SSEMessage("1", "message", "first event"),
        SSEMessage("", "message", "second event"),
    ]


def test_a_field_without_colon_has_an_empty_value() -> None:
    assert parse(b"data\n\ndata\ndata\n\ndata:") == [
        SSEMessage(None, "message", ""),
        SSEMessage(None, "message", "\n"),
    ]


def test_only_one_leading_space_is_stripped() -> None:
    assert parse(b"data:test\n\ndata: test\n\ndata:  test\n\n") == [
        SSEMessage(None, "message", "test"),
        SSEMessage(None, "message", "test"),
        SSEMessage(None, "message", " test"),
    ]


def test_an_id_persists_and_one_containing_nul_is_ignored() -> None:
    assert parse(b"id: 7\ndata: a\n\nid: 8\x009\ndata: b\n\n") == [
        SSEMessage("7", "message", "a"),
        SSEMessage("7", "message", "b"),
    ]


def test_an_event_without_data_is_not_dispatched_and_resets_the_type() -> None:
    assert parse(b"event: status\n\ndata: x\n\n") == [SSEMessage(None, "message", "x")]


def test_unknown_fields_are_ignored_and_retry_is_kept() -> None:
    parser = SSEParser()
    assert parser.feed(b"retry: 3000\nfoo: bar\nretry: soon\ndata: x\n\n") == [SSEMessage(None, "message", "x")]
    assert parser.retry == 3000


def test_an_unterminated_event_is_not_dispatched() -> None:
    assert parse(b"data: a\n\ndata: b\n") == [SSEMessage(None, "message", "a")]


def test_a_leading_bom_is_stripped() -> None:
    assert parse(b"\xef\xbb\xbfdata: a\n\n") == [SSEMessage(None, "message", "a")]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_every_line_ending_is_understood(eol: bytes) -> None:
    stream = eol.join([b"id: 1-0", b"event: content", b"data: a", b"data: b", b"", b"data: c", b"", b""])
    assert parse(stream) == [SSEMessage("1-0", "content", "a\nb"), SSEMessage("1-0", "message", "c")]


STREAMS = [
    b'id: 1-0\r\nevent: content\r\ndata: {"content": "h\xc3\xa9llo \xf0\x9f\x91\x8b"}\r\n\r\n',
    b"data: a\r\ndata: b\r\n\r\ndata: c\r\r: ping\n\ndata: \xe2\x82\xac\n\n",
    b"\xef\xbb\xbfid: 1\rdata\r\rid: 2\r\ndata:x\n\r\n",
]


@pytest.mark.parametrize("stream", STREAMS)
def test_byte_by_byte_parsing_equals_whole_parsing(stream: bytes) -> None:
    whole = parse(stream)
    assert whole
    assert parse(*(stream[i : i + 1] for i in range(len(stream)))) == whole


@pytest.mark.parametrize("stream", STREAMS)
def test_every_split_point_equals_whole_parsing(stream: bytes) -> None:
    whole = parse(stream)
    for i in range(len(stream) + 1):
        assert parse(stream[:i], stream[i:]) == whole, i


def test_a_split_between_cr_and_lf_is_one_line_ending() -> None:
    assert parse(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n") == [SSEMessage(None, "message", "a\nb")]


def test_a_split_utf8_character_is_reassembled() -> None:
    assert parse(b"data: \xf0\x9f", b"\x91", b"\x8b\n\n") == [SSEMessage(None, "message", "\U0001f44b")]
