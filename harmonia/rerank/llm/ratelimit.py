"""A request- and token-rate limiter shared by the threads of one process (the LLM reranker's concurrent calls)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable


class RateLimiter:
    """Requests and tokens per minute over a sliding 60 s window, shared by all threads (0 = unlimited)."""

    def __init__(self, requests_per_minute: int = 0, tokens_per_minute: int = 0,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep) -> None:
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self.clock, self.sleep = clock, sleep
        self._lock = threading.Lock()
        self._events: deque[list[float]] = deque()  # [time, tokens]

    def acquire(self, tokens: int) -> list[float] | None:
        """Block until a request of about `tokens` fits; returns the entry to correct with `settle`."""
        if not self.rpm and not self.tpm:
            return None
        while True:
            with self._lock:
                now = self.clock()
                while self._events and self._events[0][0] <= now - 60.0:
                    self._events.popleft()
                used = sum(e[1] for e in self._events)
                fits_rpm = not self.rpm or len(self._events) < self.rpm
                # a request bigger than the whole budget still goes through once the window is empty
                fits_tpm = not self.tpm or used + tokens <= self.tpm or not self._events
                if fits_rpm and fits_tpm:
                    entry = [now, float(tokens)]
                    self._events.append(entry)
                    return entry
                wait = (self._events[0][0] + 60.0 - now) if self._events else 0.05
            self.sleep(max(0.01, min(wait, 1.0)))

    def settle(self, entry: list[float] | None, tokens: int) -> None:
        if entry is not None:
            with self._lock:
                entry[1] = float(tokens)
