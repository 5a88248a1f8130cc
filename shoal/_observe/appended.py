"""Lists that one thread appends to while another takes what they hold (access lines
waiting to be written, a histogram's values waiting to be counted)."""

from __future__ import annotations

from typing import TypeVar

T = TypeVar("T")


def take(items: list[T]) -> list[T]:
    """The items appended to ``items`` so far, removed from it. An item another thread
    appends meanwhile stays in ``items`` (each step is atomic under the GIL); two takers
    at once could take the same items: hold the list's lock."""
    count = len(items)
    taken = items[:count]
    del items[:count]
    return taken
