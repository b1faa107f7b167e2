"""Test doubles for the virtual rack's timed parts: a settable clock and a manual timer queue."""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable


class FakeClock:
    def __init__(self, start: float = 100.0) -> None:
        self.t = start

    def __call__(self) -> float:
        return self.t


class FakeScheduler:
    """Manual timer queue: nothing runs until advance(); thread-safe to schedule into."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()

    def __call__(self, delay: float, func: Callable[[], None]) -> None:
        with self._lock:
            heapq.heappush(self._heap, (self.clock.t + delay, next(self._seq), func))

    def advance(self, dt: float) -> None:
        end = self.clock.t + dt
        while True:
            with self._lock:
                if not self._heap or self._heap[0][0] > end:
                    break
                due, _, func = heapq.heappop(self._heap)
            self.clock.t = max(self.clock.t, due)
            func()
        self.clock.t = end
