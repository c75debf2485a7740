"""W3C trace context: what is taken from a request, what is passed on."""

from __future__ import annotations

import pytest

from streambridge.shared import trace

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_traceparent_is_continued_as_a_child_span() -> None:
    span = trace.continue_or_start(PARENT, "vendor=abc")
    assert span.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert span.span_id != "00f067aa0ba902b7"
    assert span.flags == "01"
    assert span.headers() == {"traceparent": span.traceparent, "tracestate": "vendor=abc"}
    assert trace.parse(span.traceparent) is not None


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "garbage",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",  # upper case
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero span id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # the forbidden version
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # version 00 has 4 fields
        "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",  # short trace id
    ],
)
def test_an_invalid_traceparent_is_not_continued(bad: str) -> None:
    assert trace.parse(bad) is None
    span = trace.continue_or_start(bad, "vendor=abc")
    assert span.trace_id not in bad
    assert span.state is None  # a tracestate travels only with the traceparent it came with


def test_a_later_version_keeps_its_first_four_fields() -> None:
    parsed = trace.parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what-comes-next")
    assert parsed is not None
    assert parsed.traceparent == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_without_a_traceparent_a_new_trace_starts() -> None:
    first, second = trace.continue_or_start(None), trace.continue_or_start(None)
    assert first.trace_id != second.trace_id
    assert trace.parse(first.traceparent) == first


def test_a_span_survives_the_chat_record() -> None:
    span = trace.continue_or_start(PARENT, "a=1, b=two words")
    assert trace.decode(trace.encode(span).encode()) == span
    assert trace.decode(None) is None
    assert trace.decode(b"not a trace") is None


@pytest.mark.parametrize(
    ("traceparent", "flags"),
    [
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-ff", "01"),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-fe", "00"),
        ("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00", "00"),
        ("cc-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-09-x", "01"),  # a later version, flags unknown to 00
    ],
)
def test_only_the_sampled_flag_is_passed_on(traceparent: str, flags: str) -> None:
    parsed = trace.parse(traceparent)
    assert parsed is not None
    assert parsed.flags == flags
    assert parsed.traceparent.endswith(f"-{flags}")
    assert trace.continue_or_start(traceparent).traceparent.endswith(f"-{flags}")


@pytest.mark.parametrize(
    ("headers", "kept"),
    [
        (["vendor=abc"], "vendor=abc"),
        (["a=1", "b=2"], "a=1,b=2"),  # several headers are one list, in order
        (["a=1 , ,b=2\t"], "a=1,b=2"),  # blanks around members, empty members
        (["tenant@system=x", "k_-*/9=v w"], "tenant@system=x,k_-*/9=v w"),
        ([], None),
        ([""], None),
        (["garbage"], None),  # no '='
        (["a=1", "Upper=2"], None),  # one bad member: the whole value goes
        (["a=1,a=2"], None),  # a key twice
        (["a=x,y"], None),
        (["a=bad=value"], None),
        ([",".join(f"k{n}=v" for n in range(33))], None),  # over 32 members
        ([",".join(f"k{n}=v" for n in range(32))], ",".join(f"k{n}=v" for n in range(32))),
        (["a=" + "x" * 257], None),  # a value over 256 characters
    ],
)
def test_tracestate_is_a_list_of_valid_members_or_nothing(headers: list[str], kept: str | None) -> None:
    span = trace.continue_or_start(PARENT, trace.tracestate_of(headers))
    assert span.state == kept
