"""Load shedding: at most N calls in progress; the next one is refused at once, never queued.

Refusing is cheaper for everyone than queueing without bound: the client gets RESOURCE_EXHAUSTED in
microseconds and can back off or go elsewhere, and the calls already admitted keep their latency.
"""

from __future__ import annotations

from collections.abc import Callable

from cnnserve.errors import OverloadedError

__all__ = ["ConcurrencyLimit"]


class ConcurrencyLimit:
    def __init__(self, limit: int, on_change: Callable[[int], None] | None = None) -> None:
        if limit < 1:
            raise ValueError("the limit must be at least 1")
        self.limit = limit
        self.in_flight = 0
        self._on_change = on_change

    def enter(self) -> None:
        """Take a slot (give it back with :meth:`leave`); :class:`OverloadedError` when none is free.

        Used from one event loop: nothing awaits between the check and the increment.
        """
        if self.in_flight >= self.limit:
            raise OverloadedError(f"over {self.limit} concurrent calls; retry later")
        self.in_flight += 1
        if self._on_change is not None:
            self._on_change(self.in_flight)

    def leave(self) -> None:
        self.in_flight -= 1
        if self._on_change is not None:
            self._on_change(self.in_flight)
