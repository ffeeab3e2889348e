"""The pure helpers of `make bench-soak` (benchmarks/bench_soak.py): when the faults start, which
fault a failed call is counted against, the minutes a fault touches, p99 drift, the recovery after
the store outage, and acknowledged writes missing from the store."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from bench_soak import (  # noqa: E402
    UNAVAILABLE_REASON,
    Window,
    calls_per_op,
    cause,
    fault_minutes,
    fault_times,
    growth,
    missing_writes,
    p99_drift,
    recovery,
)

WINDOWS = [
    Window("database restart", 180.0, 191.0),
    Window("replica kill", 300.0, 316.0),
    Window("corrupt model", 420.0, 425.0),
    Window("token rotation", 480.0, 481.5),
]


def test_faults_start_at_minutes_3_5_7_and_8_of_10_and_scale_with_the_run():
    assert fault_times(600.0) == {
        "database restart": 180.0,
        "replica kill": 300.0,
        "model swap": 360.0,
        "corrupt model": 420.0,
        "token rotation": 480.0,
    }
    short = fault_times(120.0, swap=False)
    assert short == {
        "database restart": 36.0,
        "replica kill": 60.0,
        "corrupt model": 84.0,
        "token rotation": 96.0,
    }
    assert list(short.values()) == sorted(short.values())  # in the order they happen


@pytest.mark.parametrize(
    ("code", "sent", "done", "expected"),
    [
        ("OK", 185.0, 185.1, ""),
        # The status a fault causes, within its window (or overlapping it at either end).
        ("UNAVAILABLE", 185.0, 185.1, "database restart"),
        ("UNAVAILABLE", 179.9, 180.2, "database restart"),
        ("UNAVAILABLE", 190.9, 191.3, "database restart"),
        ("UNAVAILABLE", 301.0, 301.2, "replica kill"),
        ("UNAUTHENTICATED", 480.5, 480.6, "token rotation"),
        # Outside every window, or a status the fault does not cause: a real failure.
        ("UNAVAILABLE", 191.1, 191.2, "outside faults"),
        ("UNAVAILABLE", 100.0, 100.1, "outside faults"),
        ("UNAUTHENTICATED", 185.0, 185.1, "outside faults"),
        # Admission control's refusals: the store reconnecting, the survivor of the kill.
        ("RESOURCE_EXHAUSTED", 185.0, 185.1, "database restart"),
        ("RESOURCE_EXHAUSTED", 305.0, 305.1, "replica kill"),
        ("RESOURCE_EXHAUSTED", 100.0, 100.1, "outside faults"),
        ("RESOURCE_EXHAUSTED", 421.0, 421.1, "outside faults"),
        ("RESOURCE_EXHAUSTED", 480.5, 480.6, "outside faults"),
        ("DEADLINE_EXCEEDED", 301.0, 311.0, "outside faults"),
        ("INTERNAL", 480.5, 480.6, "outside faults"),
        ("UNAVAILABLE", 421.0, 421.1, "outside faults"),  # a corrupt model excuses nothing
        ("UNAUTHENTICATED", 482.0, 482.1, "outside faults"),  # after the client switched
    ],
)
def test_a_failed_call_counts_against_the_fault_whose_window_and_status_it_has(
    code, sent, done, expected
):
    assert cause(code, sent, done, WINDOWS) == expected


def test_fault_minutes_are_the_minutes_a_window_overlaps():
    windows = [*WINDOWS, Window("model swap", 359.0, 366.0)]
    assert fault_minutes(windows, 10) == {
        4: ["database restart"],
        6: ["replica kill", "model swap"],
        7: ["model swap"],
        8: ["corrupt model"],
        9: ["token rotation"],
    }
    # A window past the last minute is clipped to it.
    assert fault_minutes([Window("replica kill", 110.0, 130.0)], 2) == {2: ["replica kill"]}


def test_p99_drift_leaves_out_the_baseline_and_the_fault_minutes():
    p99 = {1: 90.0, 2: 20.0, 3: 30.0, 4: 200.0, 5: 41.0}
    assert p99_drift(p99, 2, [4]) == {1: 4.5, 3: 1.5, 5: 2.05}
    assert p99_drift(p99, 2, [1, 3, 4, 5]) == {}


def test_growth():
    assert growth(100.0, 109.0) == pytest.approx(0.09)
    assert growth(100.0, 95.0) == pytest.approx(-0.05)
    assert growth(0.0, 10.0) == 0.0


def test_recovery_is_the_first_personal_and_the_last_fail_closed_answer_after_the_store():
    up = 100.0
    answers = [
        (99.0, False, UNAVAILABLE_REASON),  # before: not counted
        (99.5, True, 0),
        (100.2, False, UNAVAILABLE_REASON),
        (100.4, False, 2),  # unknown customer: not personal, not fail closed
        (100.7, True, 0),
        (101.5, False, UNAVAILABLE_REASON),  # another process still failing closed
        (102.0, True, 0),
    ]
    first, last = recovery(answers, up)
    assert first == pytest.approx(0.7) and last == pytest.approx(1.5)
    assert recovery([(101.0, False, UNAVAILABLE_REASON)], up) == (None, pytest.approx(1.0))
    assert recovery([(101.0, True, 0)], up) == (pytest.approx(1.0), None)


def test_missing_writes_are_the_acknowledged_keys_not_stored_once_each():
    acked = [
        ("consent", "c1", "sensitive", False, "soak-consent-1"),
        ("event", "c2", "p1", "view", "2026-01-01T00:00:00.001000"),
        ("event", "c2", "p1", "view", "2026-01-01T00:00:00.001000"),  # sent twice (failover)
        ("forget", "c3"),
    ]
    stored = {acked[0], ("forget", "c3"), ("forget", "c4")}
    assert missing_writes(acked, stored) == [acked[1]]
    assert missing_writes(acked, set(acked)) == []


def test_a_checked_write_is_two_calls():
    assert 1.0 < calls_per_op() < 1.2
