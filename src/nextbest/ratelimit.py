"""Per-client rate limits: one token bucket per `[[serve.clients]]` entry with `rate_per_s`.

    limits = RateLimits(settings.serve.clients)
    wait_s = limits.take("email-platform")   # 0.0: go ahead; else refuse, retry after wait_s

A bucket holds up to `burst` calls and refills at `rate_per_s`; each call takes one. The buckets
live in one server process: with `serve.processes = N` each process enforces the client's whole
rate (see README, Operations, for why the rate is not divided by N). No gRPC here: the
interceptor asks, this module decides, as admission.py does for load.
"""

from __future__ import annotations

import math
import threading
import time

from nextbest.config import ClientToken

__all__ = ["RateLimits", "TokenBucket"]


class TokenBucket:
    """`burst` calls at once, refilled at `rate_per_s`; `now` is a time.monotonic() value."""

    def __init__(self, rate_per_s: float, burst: int, now: float):
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.tokens = float(burst)
        self.at = now

    def take(self, now: float) -> float:
        """Take one call's token: 0.0 when taken, else the seconds until one is there."""
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate_per_s)
        self.at = now
        if self.tokens >= 1.0 - 1e-9:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate_per_s


def bucket_size(client: ClientToken) -> int:
    """The client's `burst`, by default one second's worth of its rate (at least 1)."""
    return client.burst or max(1, math.ceil(client.rate_per_s))


class RateLimits:
    """The buckets of the clients that have a `rate_per_s`; clients without one are not limited."""

    def __init__(self, clients: tuple[ClientToken, ...], clock=time.monotonic):
        self.clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, TokenBucket] = {}
        self.use(clients)

    def use(self, clients: tuple[ClientToken, ...]) -> None:
        """Switch to `clients` (SIGHUP): a client whose rate and burst did not change keeps its
        bucket (a reload grants no extra burst); the others start full."""
        now = self.clock()
        with self._lock:
            old = self._buckets
            self._buckets = {}
            for c in clients:
                if c.rate_per_s <= 0:
                    continue
                size, bucket = bucket_size(c), old.get(c.name)
                if bucket is None or (bucket.rate_per_s, bucket.burst) != (c.rate_per_s, size):
                    bucket = TokenBucket(c.rate_per_s, size, now)
                self._buckets[c.name] = bucket

    def limit(self, client: str) -> TokenBucket | None:
        """The client's bucket (its rate and burst), None when it is not limited."""
        return self._buckets.get(client)

    def take(self, client: str) -> float:
        """One call of `client`: 0.0 when it may go ahead, else the seconds until it may."""
        bucket = self._buckets.get(client)
        if bucket is None:
            return 0.0
        with self._lock:
            return bucket.take(self.clock())
