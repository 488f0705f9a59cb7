"""What `/metrics` reports, in Prometheus text format (`prometheus-client`).

One registry per app (several apps in one process, as in the tests, never collide). The
worker thread updates the numbers; the route only renders them.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401 - re-exported for the route

WINDOW_S = 10.0  # tokens/s is the rate over the last WINDOW_S seconds


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.tokens = Counter("hasten_generated_tokens", "Tokens generated (all requests)",
                              registry=r)
        self.requests = Counter("hasten_requests", "Requests by how they ended", ["status"],
                                registry=r)
        self.active = Gauge("hasten_batch_size", "Requests generating now (rows of the batch)",
                            registry=r)
        self.queued = Gauge("hasten_queue_length", "Requests waiting for a batch row", registry=r)
        self.rate = Gauge("hasten_tokens_per_second",
                          f"Tokens generated per second over the last {WINDOW_S:.0f} s", registry=r)
        self.step_rows = Histogram("hasten_step_batch_size", "Rows per batched forward",
                                   buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.step_time = Histogram("hasten_step_seconds", "Time of one batched decoding step",
                                   buckets=(.005, .01, .02, .05, .1, .2, .5, 1, 2), registry=r)
        self.ttft = Histogram("hasten_time_to_first_token_seconds",
                              "From arrival (queue included) to the first token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.accepted = Histogram("hasten_accepted_tokens_per_step",
                                  "Tokens a request gained per step (1 = plain decoding)",
                                  buckets=(1, 2, 3, 4, 6, 8, 16), registry=r)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()
        self._lock = threading.Lock()

    def step(self, gained: list[int], seconds: float) -> None:
        """One batched step of len(gained) requests, request i gaining gained[i] tokens (1 for
        a plain step, more for an accepted draft path) in `seconds`."""
        self.step_rows.observe(len(gained))
        self.step_time.observe(seconds)
        for tokens in gained:
            self.accepted.observe(tokens)
        self.generated(sum(gained))

    def generated(self, tokens: int) -> None:
        self.tokens.inc(tokens)
        now = time.monotonic()
        with self._lock:
            self._recent.append((now, tokens))

    def render(self, active: int, queued: int) -> bytes:
        self.active.set(active)
        self.queued.set(queued)
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - WINDOW_S:
                self._recent.popleft()
            self.rate.set(sum(n for _, n in self._recent) / WINDOW_S)
        return generate_latest(self.registry)
