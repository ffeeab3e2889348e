"""Admission control of unary calls: bounded concurrency, bounded queueing, deadline check.

One Python process computes one call at a time (the GIL): sixteen calls running at once on the
worker threads each take sixteen times as long, and under overload every admitted call waits
behind all the others. So each server process runs at most `serve.max_running_calls` unary calls
at once; a call waits for a slot at most `serve.max_queue_ms`, and is refused if none frees in
time (RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms`, before any work is done). A call whose
deadline is nearer than the method's recent service time (an exponential moving average) is
refused at once (DEADLINE_EXCEEDED): it could not finish anyway. Streams are not counted here
(`serve.max_concurrent_streams` admits them), so a campaign batch cannot take the slots the
website's calls need. No gRPC here: the interceptor asks, this module decides.

Under overload the wait for a slot is not the only queue: a call first waits for a worker thread
of the pool, and one that reaches a worker only to be refused has already waited its turn
behind every call queued before it (1.3 s at p99 at 3× capacity, measured). So unary calls run on
their own pool (`UnaryExecutor`, gRPC's per-method `experimental_thread_pool`), which judges each
call as it arrives: when the calls ahead of it (queued for a worker or waiting for a slot) would
keep it waiting longer than `max_queue_ms`, it goes to a small pool of its own that only
refuses, and is refused without waiting behind the queue.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = [
    "Admission",
    "Decision",
    "StampedExecutor",
    "UnaryExecutor",
    "queued_ms",
    "refused_on_arrival",
]

EWMA_WEIGHT = 0.1
"""Weight of the newest call in a method's service-time average."""
REFUSERS = 2
"""Threads of the pool that refuses calls on arrival (a refusal takes well under a millisecond)."""


@dataclass(frozen=True)
class Decision:
    """`admitted`, else why not: `overloaded` (no slot within max_queue_ms) or `deadline` (the
    deadline is nearer than the service time); `pushback_ms` for the client's retry: the time
    the calls waiting now need (waiting × service time / slots), at least max_queue_ms."""

    admitted: bool
    reason: str = ""
    message: str = ""
    pushback_ms: int = 0
    queued_ms: float = 0.0


class Admission:
    """Slots for running unary calls, a bounded wait for one, and service times per method."""

    def __init__(self, max_running: int, max_queue_ms: float):
        self.max_running = max_running
        self.max_queue_ms = max_queue_ms
        self._slots = threading.BoundedSemaphore(max_running)
        self._service_ms: dict[str, float] = {}
        self._lock = threading.Lock()
        self._waiting = 0
        self._running = 0
        self._overall_ms = 0.0
        self._queued_ms = 0.0

    def service_ms(self, method: str) -> float:
        """The method's recent service time (0 before its first call)."""
        return self._service_ms.get(method, 0.0)

    def estimate_ms(self, method: str) -> float:
        """What a call of `method` is expected to take, for the queue's reckoning: its recent
        service time (all methods' average before its first call), at most max_queue_ms (one
        slow call, a model reload or an export, must not turn the next calls away)."""
        ms = self._service_ms.get(method, self._overall_ms)
        return min(ms, self.max_queue_ms)

    def on_arrival(self, method: str) -> Decision | None:
        """A refusal for a call of `method` arriving while the calls queued ahead of it (for a
        worker thread or for a slot) need more than max_queue_ms of the slots; None to let it
        queue (`enqueue`). Each queued call counts its method's `estimate_ms`."""
        if self._running < self.max_running and not self._queued_ms:
            return None
        wait_ms = self._queued_ms / self.max_running
        if wait_ms <= self.max_queue_ms:
            return None
        pushback = max(int(wait_ms), int(self.max_queue_ms), 1)
        return Decision(
            False,
            "overloaded",
            f"server busy: the calls queued ahead of this one need about {wait_ms:.0f} ms "
            f"(serve.max_queue_ms = {self.max_queue_ms:g}); retry after {pushback} ms",
            pushback_ms=pushback,
        )

    def enqueue(self, estimate_ms: float) -> None:
        """A call expected to take `estimate_ms` joins the queue (until `left_queue`)."""
        with self._lock:
            self._queued_ms += estimate_ms

    def left_queue(self) -> None:
        """The call running in this thread leaves the queue's reckoning (`enqueue`): it got its
        slot, was refused, or ended without asking for one. Once per call; a no-op outside a
        queued call."""
        estimate = getattr(_arrival, "estimate", 0.0)
        if estimate:
            _arrival.estimate = 0.0
            with self._lock:
                self._queued_ms = max(self._queued_ms - estimate, 0.0)

    def admit(self, method: str, remaining_s: float | None, queued_ms: float = 0.0) -> Decision:
        """Take a slot for a call of `method` with `remaining_s` to its deadline (None: none)
        that already waited `queued_ms` for a worker thread (`StampedExecutor`); the caller must
        `release(method, started)` an admitted call. The whole wait, for a worker and for a
        slot, stays within max_queue_ms. The call leaves the queue's reckoning either way."""
        try:
            return self._admit(method, remaining_s, queued_ms)
        finally:
            self.left_queue()

    def _admit(self, method: str, remaining_s: float | None, queued_ms: float) -> Decision:
        need = self.service_ms(method)
        if remaining_s is not None and remaining_s * 1000.0 < need:
            return Decision(
                False,
                "deadline",
                f"the deadline is {max(remaining_s * 1000.0, 0.0):.1f} ms away and a call takes "
                f"about {need:.1f} ms: refused before any work",
            )
        wait_ms = self.max_queue_ms - queued_ms
        # A long wait for a worker counts only while every slot is taken (a busy server); with a
        # free slot it was a pause of the process (garbage collection), not load: go ahead.
        if wait_ms <= 0 and self._running < self.max_running:
            wait_ms = 0.0
        elif wait_ms <= 0:
            pushback = max(int(self.max_queue_ms), int(queued_ms), 1)
            return Decision(
                False,
                "overloaded",
                f"server busy: the call waited {queued_ms:.0f} ms for a worker (serve.max_queue_ms"
                f" = {self.max_queue_ms:g}); retry after {pushback} ms",
                pushback_ms=pushback,
                queued_ms=queued_ms,
            )
        if remaining_s is not None:  # never wait past the point where the call cannot finish
            wait_ms = min(wait_ms, max(remaining_s * 1000.0 - need, 0.0))
        t0 = time.perf_counter()
        with self._lock:
            self._waiting += 1
        try:
            if (
                self._slots.acquire(timeout=wait_ms / 1000.0)
                if wait_ms > 0
                else self._slots.acquire(blocking=False)
            ):
                with self._lock:
                    self._running += 1
                return Decision(True, queued_ms=(time.perf_counter() - t0) * 1000.0)
            waiting = self._waiting
        finally:
            with self._lock:
                self._waiting -= 1
        # Retry once the calls waiting now have had their turn (at least max_queue_ms).
        pushback = max(int(self.max_queue_ms), int(waiting * need / self.max_running), 1)
        return Decision(
            False,
            "overloaded",
            f"server busy: no slot within {wait_ms + queued_ms:.0f} ms (serve.max_running_calls = "
            f"{self.max_running}, serve.max_queue_ms = {self.max_queue_ms:g}); retry after "
            f"{pushback} ms",
            pushback_ms=pushback,
            queued_ms=(time.perf_counter() - t0) * 1000.0,
        )

    def release(self, method: str, started: float) -> None:
        """Give the slot back and fold the call's service time (since `started`,
        perf_counter seconds) into the method's average."""
        self.observe(method, (time.perf_counter() - started) * 1000.0)
        with self._lock:
            self._running -= 1
        self._slots.release()

    def observe(self, method: str, ms: float) -> None:
        """Fold one call's service time into the method's and the overall average."""
        with self._lock:
            old = self._service_ms.get(method)
            self._service_ms[method] = ms if old is None else old + EWMA_WEIGHT * (ms - old)
            overall = self._overall_ms
            self._overall_ms = ms if not overall else overall + EWMA_WEIGHT * (ms - overall)


_arrival = threading.local()


def _stamped(enqueued: float, fn, args, kwargs):
    _arrival.at = enqueued
    try:
        return fn(*args, **kwargs)
    finally:
        _arrival.at = None


def _refusing(decision: Decision, fn, args, kwargs):
    _arrival.refusal = decision
    try:
        return fn(*args, **kwargs)
    finally:
        _arrival.refusal = None


class StampedExecutor(ThreadPoolExecutor):
    """The server's worker pool: remembers when each job was queued, so that the call running
    in a worker knows how long it waited for one (`queued_ms`)."""

    def submit(self, fn, /, *args, **kwargs):
        return super().submit(_stamped, time.perf_counter(), fn, args, kwargs)


def queued_ms() -> float:
    """How long the job running in this worker thread waited for the worker (0 outside one)."""
    at = getattr(_arrival, "at", None)
    return 0.0 if at is None else (time.perf_counter() - at) * 1000.0


class UnaryExecutor(StampedExecutor):
    """The worker pool of the unary calls admission control counts. Each method's handler gets
    its own view of it (`pool_for`, gRPC's `experimental_thread_pool`), so that an arriving
    call is judged by its method: when the calls queued ahead would keep it waiting longer
    than `max_queue_ms` (`Admission.on_arrival`), it is handed to a small pool that only
    refuses (`refused_on_arrival` tells the interceptor so), instead of queueing behind them."""

    def __init__(self, admission: Admission, max_workers: int):
        super().__init__(max_workers=max_workers, thread_name_prefix="grpc-unary")
        self.admission = admission
        self._refusers = ThreadPoolExecutor(REFUSERS, thread_name_prefix="grpc-refuse")

    def pool_for(self, method: str) -> ThreadPoolExecutor:
        """The executor gRPC is to give the calls of `method` to."""
        return _MethodPool(self, method)

    def submit_call(self, method: str, fn, /, *args, **kwargs):
        refusal = self.admission.on_arrival(method)
        if refusal is not None:
            return self._refusers.submit(_refusing, refusal, fn, args, kwargs)
        estimate = self.admission.estimate_ms(method)
        self.admission.enqueue(estimate)
        return self.submit(self._queued, estimate, fn, *args, **kwargs)

    def _queued(self, estimate: float, fn, /, *args, **kwargs):
        _arrival.estimate = estimate
        try:
            return fn(*args, **kwargs)
        finally:  # a call that ended without asking for a slot (an undecodable request)
            self.admission.left_queue()

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        super().shutdown(wait, cancel_futures=cancel_futures)
        self._refusers.shutdown(wait, cancel_futures=cancel_futures)


class _MethodPool(ThreadPoolExecutor):
    """One method's view of a `UnaryExecutor` (it starts no threads of its own: a
    ThreadPoolExecutor starts them on its first submit, and this one passes every job on)."""

    def __init__(self, shared: UnaryExecutor, method: str):
        super().__init__(max_workers=1)
        self._shared = shared
        self._method = method

    def submit(self, fn, /, *args, **kwargs):
        return self._shared.submit_call(self._method, fn, *args, **kwargs)


def refused_on_arrival() -> Decision | None:
    """The refusal `UnaryExecutor` decided for the call running in this thread, if any."""
    return getattr(_arrival, "refusal", None)
