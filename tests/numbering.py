"""A Responses stream's event numbers, as a client checks them."""

from __future__ import annotations

from typing import Any


def sequence_numbers(events: list[Any]) -> list[int]:
    """The events' ``sequence_number``s, keepalives left out: a quiet moment (a slow first token, a
    loaded host) sends one, numbered as the event before it, and it takes no number of its own."""
    numbers: list[int] = []
    for event in events:
        kind, number = (
            (event["type"], event["sequence_number"])
            if isinstance(event, dict)
            else (
                event.type,
                event.sequence_number,
            )
        )
        if kind == "keepalive":
            assert not numbers or number == numbers[-1], f"a keepalive numbered {number} after {numbers[-1]}"
            continue
        numbers.append(number)
    return numbers
