"""The notification that announces appended entries: one per batch, whole entries only."""

from __future__ import annotations

import pytest

from streambridge.shared.streams import Entry, parse_notification


def test_a_notification_of_one_entry_reads_as_that_entry() -> None:
    assert parse_notification(b'5-0\ncontent\n{"a":1}') == [Entry("5-0", "content", b'{"a":1}')]


def test_a_notification_of_a_batch_reads_as_its_entries_in_order() -> None:
    payload = b'5-0\nstarted\n{"s":1}\n5-1\ncontent\n{"c":"x y"}\n6-0\nprogress\n{}'
    assert parse_notification(payload) == [
        Entry("5-0", "started", b'{"s":1}'),
        Entry("5-1", "content", b'{"c":"x y"}'),
        Entry("6-0", "progress", b"{}"),
    ]


@pytest.mark.parametrize("payload", [b"5-0", b"5-0\ncontent", b"5-0\ncontent\n{}\n6-0"])
def test_a_notification_of_broken_entries_is_refused(payload: bytes) -> None:
    with pytest.raises(ValueError, match="three lines each"):
        parse_notification(payload)
