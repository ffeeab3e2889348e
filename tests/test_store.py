"""The consent and event store: one set of tests against SQLite and PostgreSQL.

PostgreSQL: `NEXTBEST_TEST_POSTGRES` (default postgresql://postgres@127.0.0.1:5432/test), one
schema `nextbest_test_<random>` per session, dropped at the end. Unreachable: the PostgreSQL tests
skip, or fail when `CI` is true (conftest.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pytest
from conftest import PG_URL

from nextbest.data.readers import EVENT_SCHEMA
from nextbest.errors import ConfigError, InvalidRequest
from nextbest.store.consent_store import (
    SCHEMA_VERSION,
    AuditRecord,
    ConsentRecord,
    Store,
    StoreError,
    open_store,
)

DATA_TABLES = (
    "nextbest_consent",
    "nextbest_consent_audit",
    "nextbest_events",
    "nextbest_impressions",
    "nextbest_exposure",
    "nextbest_tombstones",
)
T0 = dt.datetime(2024, 3, 1, 12, 0, 0)


def day(n: float) -> dt.datetime:
    return T0 + dt.timedelta(days=n)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def events_table(rows: list[tuple], **extra: list) -> pa.Table:
    """rows: (customer_id, product_id, timestamp, event_type, quantity)."""
    cols = list(zip(*rows, strict=True)) if rows else [[]] * 5
    data = {
        "customer_id": pa.array(cols[0], pa.string()),
        "product_id": pa.array(cols[1], pa.string()),
        "timestamp": pa.array(cols[2], pa.timestamp("us")),
        "event_type": pa.array(cols[3], pa.string()),
        "quantity": pa.array(cols[4], pa.float64()),
    }
    data.update(extra)
    return pa.table(data)


def consent_table(rows: list[tuple]) -> pa.Table:
    """rows: (customer_id, purpose, granted, updated_at)."""
    cols = list(zip(*rows, strict=True))
    return pa.table(
        {
            "customer_id": pa.array(cols[0], pa.string()),
            "purpose": pa.array(cols[1], pa.string()),
            "granted": pa.array(cols[2], pa.bool_()),
            "updated_at": pa.array(cols[3], pa.timestamp("us")),
        }
    )


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL schema for this session; skipped (failed in CI) if unreachable."""
    import psycopg
    from psycopg import sql

    try:
        admin = psycopg.connect(PG_URL, autocommit=True, connect_timeout=5)
    except psycopg.Error as exc:
        reason = f"PostgreSQL at {PG_URL} unreachable: {str(exc).strip().splitlines()[0]}"
        pytest.skip(reason)  # a failure in CI (conftest.py)
    schema = f"nextbest_test_{secrets.token_hex(4)}"
    with admin:
        admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
        try:
            yield f"{PG_URL}?schema={schema}"
        finally:
            admin.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path) -> str:
    """An empty store's URL: an SQLite file in tmp_path, or the session's PostgreSQL schema with
    its tables emptied."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    url = request.getfixturevalue("pg_url")
    with open_store(url) as s, s._write() as cur:
        cur.execute(f"TRUNCATE {', '.join(DATA_TABLES)} RESTART IDENTITY")
    return url


@pytest.fixture
def store(store_url: str) -> Iterator[Store]:
    s = open_store(store_url)
    yield s
    s.close()


# --- consent --------------------------------------------------------------------------------------


def test_set_get_round_trip(store: Store) -> None:
    store.set_consent("c1", "personalization", True, source="web", at=day(0))
    store.set_consent("c1", "sensitive", False, source="call-centre", at=day(1))
    berlin = dt.timezone(dt.timedelta(hours=1))
    store.set_consent("c2", "behavioral", True, source="app", at=day(2).replace(tzinfo=berlin))
    assert store.get_consent("c1") == {
        "personalization": ConsentRecord("personalization", True, day(0), "web"),
        "sensitive": ConsentRecord("sensitive", False, day(1), "call-centre"),
    }
    # An aware time is stored as naive UTC.
    assert store.get_consent("c2")["behavioral"].updated_at == day(2) - dt.timedelta(hours=1)
    assert store.get_consent("nobody") == {}
    before = now()
    store.set_consent("c3", "behavioral", True, source="app")
    assert before <= store.get_consent("c3")["behavioral"].updated_at <= now()


def test_audit_trail(store: Store) -> None:
    first = store.set_consent("c1", "personalization", True, source="web", at=day(0))
    assert first == AuditRecord("c1", "personalization", None, True, day(0), "web")
    assert first.changed
    change = store.set_consent("c1", "personalization", False, source="app", at=day(1))
    assert change == AuditRecord("c1", "personalization", True, False, day(1), "app")
    # The same value again: updated_at and source move forward, no audit row.
    same = store.set_consent("c1", "personalization", False, source="email", at=day(2))
    assert (same.old_granted, same.new_granted, same.changed) == (False, False, False)
    assert store.get_consent("c1")["personalization"] == ConsentRecord(
        "personalization", False, day(2), "email"
    )
    # A change dated before the stored record is ignored.
    older = store.set_consent("c1", "personalization", True, source="late", at=day(1.5))
    assert (older.old_granted, older.new_granted, older.changed) == (False, False, False)
    assert store.get_consent("c1")["personalization"].granted is False
    # A tie is not older: the later call wins.
    tie = store.set_consent("c1", "personalization", True, source="tie", at=day(2))
    assert tie.changed
    assert store.audit("c1") == [first, change, tie]
    assert store.audit("c2") == []


def test_audit_oldest_first_across_purposes(store: Store) -> None:
    store.set_consent("c1", "sensitive", True, source="a", at=day(5))
    store.set_consent("c1", "behavioral", True, source="b", at=day(1))
    store.set_consent("c1", "personalization", True, source="c", at=day(3))
    assert [r.changed_at for r in store.audit("c1")] == [day(1), day(3), day(5)]


def test_consent_state_batch_with_defaults(store: Store) -> None:
    store.set_consent("c1", "personalization", True, source="t", at=day(0))
    store.set_consent("c2", "personalization", False, source="t", at=day(0))
    store.set_consent("c2", "behavioral", True, source="t", at=day(0))
    store.set_consent("other", "sensitive", True, source="t", at=day(0))
    ids = pa.array(["c1", "c2", "c3"])
    deny = store.consent_state(["c1", "c2", "c3", "c1"], default_allow=False)
    assert deny.default_allow is False
    assert deny.granted == {
        "personalization": {"c1": True, "c2": False},
        "behavioral": {"c2": True},
    }
    assert deny.allowed("personalization", ids).tolist() == [True, False, False]
    assert deny.allowed("behavioral", ids).tolist() == [False, True, False]
    assert deny.allowed("sensitive", ids).tolist() == [False, False, False]
    allow = store.consent_state(["c1", "c2", "c3"], default_allow=True)
    assert allow.allowed("personalization", ids).tolist() == [True, False, True]
    assert allow.allowed("sensitive", ids).tolist() == [True, True, True]
    assert store.consent_state([], default_allow=False).granted == {}


def test_consent_state_large_batch(store: Store) -> None:
    store.import_consent(
        consent_table([(f"c{i}", "personalization", i % 2 == 0, day(0)) for i in range(3000)]),
        source="file",
    )
    ids = [f"c{i}" for i in range(0, 40000, 3)]
    state = store.consent_state(ids, default_allow=False)
    assert state.granted["personalization"] == {f"c{i}": i % 2 == 0 for i in range(0, 3000, 3)}


def test_import_consent_latest_wins(store: Store) -> None:
    store.set_consent("a", "personalization", True, source="web", at=day(10))  # newer than file
    store.set_consent("b", "personalization", True, source="web", at=day(1))  # same value
    store.set_consent("c", "personalization", True, source="web", at=day(1))  # changed by file
    table = consent_table(
        [
            ("a", "personalization", False, day(5)),  # older than the store
            ("b", "personalization", True, day(3)),  # unchanged, updated_at moves
            ("c", "personalization", False, day(4)),  # latest in the file for c
            ("c", "personalization", True, day(2)),  # superseded in the file
            ("d", "behavioral", True, day(2)),  # superseded in the file
            ("d", "behavioral", False, day(6)),  # new
            ("e", "sensitive", True, day(1)),  # tie in the file: the later row wins
            ("e", "sensitive", False, day(1)),
        ]
    )
    counts = store.import_consent(table, source="crm-export")
    assert counts == {"applied": 3, "unchanged": 1, "older": 4}
    assert sum(counts.values()) == table.num_rows
    assert store.get_consent("a")["personalization"] == ConsentRecord(
        "personalization", True, day(10), "web"
    )
    assert store.get_consent("b")["personalization"] == ConsentRecord(
        "personalization", True, day(3), "crm-export"
    )
    assert store.get_consent("c")["personalization"].granted is False
    assert store.get_consent("d")["behavioral"] == ConsentRecord(
        "behavioral", False, day(6), "crm-export"
    )
    assert store.get_consent("e")["sensitive"].granted is False
    assert store.audit("c")[-1] == AuditRecord(
        "c", "personalization", True, False, day(4), "crm-export"
    )
    assert store.audit("d") == [AuditRecord("d", "behavioral", None, False, day(6), "crm-export")]
    assert len(store.audit("b")) == 1  # only the first set
    # The same file again changes nothing.
    assert store.import_consent(table, source="crm-export") == {
        "applied": 0,
        "unchanged": 4,
        "older": 4,
    }
    empty = consent_table([("x", "sensitive", True, day(0))]).slice(0, 0)
    assert store.import_consent(empty, source="f") == {"applied": 0, "unchanged": 0, "older": 0}
    assert len(store.audit("d")) == 1


def test_import_consent_rejects_bad_tables(store: Store) -> None:
    bad_purpose = consent_table(
        [("a", "personalization", True, day(0)), ("b", "ads", True, day(0))]
    )
    with pytest.raises(InvalidRequest, match=r"^purpose \(row 1\): unknown purpose 'ads'"):
        store.import_consent(bad_purpose, source="f")
    empty_id = consent_table([("", "personalization", True, day(0))])
    with pytest.raises(InvalidRequest, match=r"^customer_id: "):
        store.import_consent(empty_id, source="f")
    with pytest.raises(InvalidRequest, match=r"^updated_at: missing column"):
        store.import_consent(empty_id.drop_columns(["updated_at"]), source="f")
    with pytest.raises(InvalidRequest, match=r"^source: "):
        store.import_consent(consent_table([("a", "sensitive", True, day(0))]), source="")
    assert store.get_consent("a") == {}  # nothing of a refused table is stored


# --- erasure --------------------------------------------------------------------------------------


def _populate(store: Store) -> None:
    for customer in ("gone", "stays"):
        store.set_consent(customer, "personalization", True, source="web", at=day(0))
        store.set_consent(customer, "personalization", False, source="web", at=day(1))
        store.set_consent(customer, "behavioral", True, source="web", at=day(1))
    store.record_events(
        events_table(
            [
                ("gone", "p1", day(0), "purchase", 1.0),
                ("stays", "p1", day(0), "purchase", 1.0),
                ("gone", "p2", day(1), "view", 1.0),
            ]
        )
    )


def test_forget_removes_every_row_and_leaves_a_tombstone(store: Store) -> None:
    _populate(store)
    before = now()
    report = store.forget("gone", source="dsar-123")
    assert (report.consent_rows, report.events, report.audit_rows) == (2, 2, 3)
    assert report.already_erased is False
    assert store.get_consent("gone") == {}
    assert store.audit("gone") == []
    assert store.events(["gone"]).num_rows == 0
    assert store.events()["customer_id"].to_pylist() == ["stays"]
    assert "gone" not in store.consent_state(["gone"], False).granted.get("personalization", {})
    tombstones = store.tombstones()
    assert list(tombstones) == ["gone"]
    assert before <= tombstones["gone"] <= now()
    assert store.erased(["gone", "stays", "never-seen"]) == {"gone": tombstones["gone"]}
    assert store.erased([]) == {}
    # The other customer is untouched.
    assert len(store.get_consent("stays")) == 2 and len(store.audit("stays")) == 3
    # Idempotent.
    again = store.forget("gone", source="dsar-123")
    assert (again.consent_rows, again.events, again.audit_rows, again.already_erased) == (
        0,
        0,
        0,
        True,
    )
    assert store.tombstones()["gone"] >= tombstones["gone"]
    assert store.forget("never-seen", source="dsar-9").already_erased is False


def test_a_customer_may_come_back_after_erasure(store: Store) -> None:
    _populate(store)
    store.forget("gone", source="dsar")
    erased_at = store.tombstones()["gone"]
    # Replayed data dated at or before the erasure is not stored again.
    replay = store.set_consent("gone", "personalization", True, source="replay", at=day(0))
    assert (replay.old_granted, replay.new_granted) == (None, None)
    old_file = consent_table([("gone", "behavioral", True, day(1))])
    assert store.import_consent(old_file, source="crm")["older"] == 1
    assert store.record_events(events_table([("gone", "p1", day(0), "purchase", 1.0)])) == 0
    assert store.get_consent("gone") == {} and store.events(["gone"]).num_rows == 0
    # New consent and new events are stored; the tombstone stays for training.
    back = store.set_consent("gone", "personalization", True, source="web")
    assert (back.old_granted, back.new_granted) == (None, True)
    later = erased_at + dt.timedelta(seconds=1)
    assert store.record_events(events_table([("gone", "p3", later, "purchase", 1.0)])) == 1
    assert store.get_consent("gone")["personalization"].granted is True
    assert store.events(["gone"])["product_id"].to_pylist() == ["p3"]
    assert store.tombstones() == {"gone": erased_at}
    # Erasing again removes the new data and moves the tombstone.
    assert store.forget("gone", source="dsar-2").events == 1
    assert store.tombstones()["gone"] >= erased_at


# --- events ---------------------------------------------------------------------------------------


def test_events_round_trip(store: Store) -> None:
    table = events_table(
        [
            ("c2", "p9", day(2), "purchase", 2.0),
            ("c1", "p1", day(1), "view", 1.0),
            ("c1", "p2", day(2), "cart", 1.0),  # same time as the first row: insertion order
            ("c3", "p1", day(0) + dt.timedelta(microseconds=7), "email_click", 1.0),
        ],
        value=pa.array([19.5, None, 3.25, None], pa.float64()),
        channel=pa.array(["web", None, "app", "email"], pa.string()),
    )
    assert store.record_events(table) == 4
    assert store.record_events(table.slice(0, 0)) == 0
    out = store.events()
    assert out.schema == EVENT_SCHEMA
    order = [3, 1, 0, 2]
    assert out.to_pylist() == [table.to_pylist()[i] for i in order]
    assert store.events(["c1", "nobody"])["product_id"].to_pylist() == ["p1", "p2"]
    assert store.events([]).schema == EVENT_SCHEMA and store.events([]).num_rows == 0


def test_record_events_coerces_types(store: Store) -> None:
    aware = pa.array([T0], pa.timestamp("s", tz="Europe/Berlin"))  # 12:00 UTC
    table = pa.table(
        {
            "customer_id": ["c1"],
            "product_id": ["p1"],
            "timestamp": aware,
            "event_type": ["purchase"],
            "quantity": pa.array([2], pa.int64()),
        }
    )
    assert store.record_events(table) == 1
    row = store.events().to_pylist()[0]
    assert row["timestamp"] == T0 and row["quantity"] == 2.0
    assert row["value"] is None and row["channel"] is None


BAD_INPUT = {
    "set_consent-purpose": (lambda s: s.set_consent("c1", "ads", True, source="t"), "purpose"),
    "set_consent-empty-id": (
        lambda s: s.set_consent("", "personalization", True, source="t"),
        "customer_id",
    ),
    "set_consent-blank-id": (
        lambda s: s.set_consent("  ", "personalization", True, source="t"),
        "customer_id",
    ),
    "set_consent-granted": (
        lambda s: s.set_consent("c1", "personalization", "yes", source="t"),
        "granted",
    ),
    "set_consent-source": (
        lambda s: s.set_consent("c1", "personalization", True, source=""),
        "source",
    ),
    "set_consent-at": (
        lambda s: s.set_consent("c1", "sensitive", True, source="t", at="now"),
        "at",
    ),
    "get_consent-id": (lambda s: s.get_consent(""), "customer_id"),
    "audit-id": (lambda s: s.audit(""), "customer_id"),
    "forget-id": (lambda s: s.forget("", source="t"), "customer_id"),
    "record_events-id": (
        lambda s: s.record_events(events_table([("", "p", T0, "view", 1.0)])),
        "customer_id",
    ),
    "record_events-product": (
        lambda s: s.record_events(events_table([("c", None, T0, "view", 1.0)])),
        "product_id",
    ),
    "record_events-no-timestamp": (
        lambda s: s.record_events(
            events_table([("c", "p", T0, "view", 1.0)]).drop_columns(["timestamp"])
        ),
        "timestamp",
    ),
}


@pytest.mark.parametrize(("call", "field"), BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_names_the_field(store: Store, call, field: str) -> None:
    with pytest.raises(InvalidRequest, match=rf"^{field}\b"):
        call(store)
    assert store.events().num_rows == 0 and store.audit("c1") == []


# --- durability, sharing, concurrency -------------------------------------------------------------

CHILD = """
import sys, time, datetime as dt
import pyarrow as pa
from nextbest.store.consent_store import open_store
store = open_store(sys.argv[1])
store.set_consent("durable", "personalization", True, source="child")
store.record_events(pa.table({
    "customer_id": ["durable"], "product_id": ["p1"],
    "timestamp": pa.array([dt.datetime(2024, 1, 1)], pa.timestamp("us")),
    "event_type": ["purchase"], "quantity": [1.0],
}))
store.forget("erased", source="child")
print("ok", flush=True)
time.sleep(120)
"""


def test_acknowledged_writes_survive_sigkill(store_url: str) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", CHILD, store_url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        try:
            line = child.stdout.readline()
            if line.strip() != "ok":
                child.kill()
                pytest.fail(f"child did not acknowledge: {line!r} {child.stderr.read()}")
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    with open_store(store_url) as fresh:
        assert fresh.get_consent("durable")["personalization"].granted is True
        assert fresh.events(["durable"]).num_rows == 1
        assert "erased" in fresh.tombstones()


def test_two_stores_see_each_others_writes(store: Store, store_url: str) -> None:
    with open_store(store_url) as other:
        store.set_consent("c1", "personalization", True, source="replica-a", at=day(0))
        assert other.get_consent("c1")["personalization"].source == "replica-a"
        other.set_consent("c1", "personalization", False, source="replica-b", at=day(1))
        assert store.consent_state(["c1"], True).granted == {"personalization": {"c1": False}}
        other.record_events(events_table([("c1", "p1", day(0), "view", 1.0)]))
        assert store.events().num_rows == 1
        store.forget("c1", source="replica-a")
        assert other.get_consent("c1") == {} and "c1" in other.tombstones()


def test_concurrent_writes_lose_nothing(store: Store) -> None:
    threads_n, per_thread = 8, 25
    errors: list[BaseException] = []
    start = threading.Barrier(threads_n)

    def work(t: int) -> None:
        try:
            start.wait()
            for i in range(per_thread):
                store.set_consent(f"t{t}-{i}", "personalization", True, source=f"thread-{t}")
                store.set_consent("shared", "behavioral", (t + i) % 2 == 0, source=f"thread-{t}")
                store.record_events(events_table([(f"t{t}-{i}", f"p{i}", day(i), "view", 1.0)] * 2))
                store.consent_state([f"t{t}-{i}", "shared"], default_allow=False)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(threads_n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert errors == []
    ids = [f"t{t}-{i}" for t in range(threads_n) for i in range(per_thread)]
    state = store.consent_state(ids, default_allow=False)
    assert state.granted["personalization"] == dict.fromkeys(ids, True)
    assert store.events().num_rows == 2 * len(ids)
    assert sum(len(store.audit(c)) for c in ids) == len(ids)
    # The shared record's audit trail is one unbroken chain of changes.
    chain = store.audit("shared")
    assert chain[0].old_granted is None
    for prev, cur in zip(chain, chain[1:], strict=False):
        assert cur.old_granted == prev.new_granted != cur.new_granted
    assert chain[-1].new_granted == store.get_consent("shared")["behavioral"].granted


# --- opening --------------------------------------------------------------------------------------


def test_open_store_sqlite_urls(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with open_store("sqlite:///rel/store.db") as s:
        s.set_consent("c1", "sensitive", True, source="t")
    assert (tmp_path / "rel" / "store.db").is_file()
    with open_store(str(tmp_path / "rel" / "store.db")) as s:  # bare path, reopened
        assert s.get_consent("c1")["sensitive"].granted is True
        with s._read() as cur:
            assert cur.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert cur.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
            assert cur.execute("SELECT version FROM nextbest_schema_version").fetchall() == [
                (SCHEMA_VERSION,)
            ]
    with open_store("other.sqlite") as s:
        assert s.events().num_rows == 0


@pytest.mark.parametrize("url", ["mysql://u@h/db", "store.txt", "sqlite://", "sqlite:///:memory:"])
def test_open_store_refuses_unknown_urls(url: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(url)):
        open_store(url)


def test_open_store_unreachable_postgres_names_the_url() -> None:
    url = "postgresql://nextbest:s3cret@127.0.0.1:1/nowhere"
    with pytest.raises(StoreError) as info:
        open_store(url)
    message = str(info.value)
    assert message.startswith("postgresql://nextbest:***@127.0.0.1:1/nowhere: cannot reach")
    assert "s3cret" not in message and "\n" not in message


def test_bad_schema_name_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="schema"):
        open_store("postgresql://postgres@127.0.0.1:1/test?schema=bad;name")


def test_closed_store_refuses_calls(store: Store) -> None:
    store.close()
    with pytest.raises(StoreError, match="closed"):
        store.get_consent("c1")


def test_newer_schema_version_is_refused(store_url: str) -> None:
    with open_store(store_url) as s, s._write() as cur:
        cur.execute("UPDATE nextbest_schema_version SET version = 99")
    try:
        with pytest.raises(StoreError, match="schema version 99 is newer"):
            open_store(store_url)
    finally:
        # Put it back: the PostgreSQL schema is shared by the session's tests.
        with _raw_cursor(store_url) as cur:
            cur.execute("UPDATE nextbest_schema_version SET version = 1")


@contextlib.contextmanager
def _raw_cursor(url: str) -> Iterator:
    """A cursor on the store's database that bypasses the store (and its version check)."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.split("://", 1)[1][1:], isolation_level=None)
        try:
            yield conn.cursor()
        finally:
            conn.close()
    else:
        import psycopg

        base, schema = url.split("?schema=")
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"SET search_path TO {schema}")
            yield conn.cursor()


def test_numpy_bool_is_accepted(store: Store) -> None:
    assert store.set_consent("c1", "behavioral", np.bool_(True), source="t").new_granted is True


def test_impressions_count_until_the_customer_answers(store: Store) -> None:
    shown = [
        ("c1", "p1", "email", day(1)),
        ("c1", "p1", "web", day(2)),
        ("c1", "p1", "app", day(3)),
        ("c1", "p2", "email", day(1)),
        ("c2", "p1", "email", day(3)),
        ("c1", "p3", "email", day(-30)),  # before the window
    ]
    assert store.record_impressions(shown) == 6
    assert store.unanswered_impressions(["c1", "c2", "c9"], since=day(0)) == {
        "c1": {"p1": 3, "p2": 1},
        "c2": {"p1": 1},
    }
    # A click on p2 after it was shown answers that impression; a later showing counts again.
    store.record_events(events_table([("c1", "p2", day(1.5), "email_click", 1.0)]))
    store.record_impressions([("c1", "p2", "web", day(4))])
    assert store.unanswered_impressions(["c1"], since=day(0)) == {"c1": {"p1": 3, "p2": 1}}
    # Erasure deletes impressions too.
    store.forget("c1", source="dsar")
    assert store.unanswered_impressions(["c1"], since=day(0)) == {}
    assert store.unanswered_impressions([], since=day(0)) == {}


RAW_UNANSWERED = (
    "SELECT i.customer_id, i.product_id, COUNT(*) FROM nextbest_impressions i "
    "WHERE i.shown_at >= ? AND NOT EXISTS (SELECT 1 FROM nextbest_events e "
    "WHERE e.customer_id = i.customer_id AND e.product_id = i.product_id "
    'AND e."timestamp" >= i.shown_at) GROUP BY i.customer_id, i.product_id'
)
"""The fatigue count by its definition, over every impression (what the store read before it
kept exposure runs)."""


def _raw_unanswered(store: Store, since: dt.datetime) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    with store._read() as cur:
        cur.execute(store._sql(RAW_UNANSWERED), (store._ts(since),))
        for c, p, n in cur.fetchall():
            out.setdefault(c, {})[p] = int(n)
    return out


def test_fatigue_counts_from_exposure_runs_equal_the_definition(store: Store) -> None:
    """Random impressions and answering events, in any order of time (clicks that come before
    the batching writer stores what they answer, late events dated before later showings,
    erasures): after every write the fatigue read from `nextbest_exposure` equals the count by
    its definition over the impressions, for windows that cut runs and that hold them whole."""
    rng = np.random.default_rng(7)
    customers, products = ["c1", "c2", "c3"], ["p1", "p2", "p3"]
    ids = [*customers, "c9"]
    for step in range(120):
        c = customers[rng.integers(3)]
        kind = rng.random()
        if kind < 0.6:
            rows = [
                (c, products[rng.integers(3)], "web", day(float(rng.uniform(0, 10))))
                for _ in range(int(rng.integers(1, 5)))
            ]
            store.record_impressions(rows)
        elif kind < 0.95:
            at = day(float(rng.uniform(0, 10)))
            store.record_events(events_table([(c, products[rng.integers(3)], at, "click", 1.0)]))
        else:
            store.forget(c, source="dsar")
        for since in (day(-1), day(3), day(6.5), day(11)):
            want = _raw_unanswered(store, since)
            want = {k: v for k, v in want.items() if k in ids}
            assert store.unanswered_impressions(ids, since=since) == want, (step, since)
            reads = store.customer_reads(ids, True, purchases_since=day(0), impressions_since=since)
            assert reads.impressions == want, (step, since)


def test_a_fatigue_read_costs_the_products_shown_not_the_showings(store: Store) -> None:
    """The same product shown 200 times: the exposure table holds one row for it, and the read
    answers from that row; an answered run is rebuilt at the next showing."""
    store.record_impressions([("c1", "p1", "web", day(1 + k / 1000)) for k in range(100)])
    store.record_impressions([("c1", "p1", "app", day(2 + k / 1000)) for k in range(100)])
    with store._read() as cur:
        cur.execute("SELECT customer_id, product_id, shown FROM nextbest_exposure")
        assert cur.fetchall() == [("c1", "p1", 200)]
    assert store.unanswered_impressions(["c1"], since=day(0)) == {"c1": {"p1": 200}}
    assert store.unanswered_impressions(["c1"], since=day(2)) == {"c1": {"p1": 100}}
    # A click answers the run; the next showings start a new one, rebuilt from the impressions.
    store.record_events(events_table([("c1", "p1", day(2.5), "click", 1.0)]))
    assert store.unanswered_impressions(["c1"], since=day(0)) == {}
    store.record_impressions([("c1", "p1", "web", day(3 + k / 1000)) for k in range(5)])
    with store._read() as cur:
        cur.execute("SELECT shown, first_shown FROM nextbest_exposure")
        assert cur.fetchall() == [(5, store._ts(day(3)))]
    assert store.unanswered_impressions(["c1"], since=day(0)) == {"c1": {"p1": 5}}


def test_impressions_keep_their_arm_rank_and_version(store: Store) -> None:
    from nextbest.store.consent_store import Impression

    rows = [
        Impression("c1", "p1", "web", day(1), "exp", "served", "a" * 32, 1, "v1"),
        Impression("c1", "p2", "web", day(1), "exp", "served", "a" * 32, 2, "v1"),
        ("c2", "p1", "email", day(2)),  # the fields of earlier versions only
    ]
    assert store.record_impressions(rows) == 3
    got = store.impressions()
    assert got[:2] == rows[:2]
    assert got[2] == Impression("c2", "p1", "email", day(2))
    assert store.impressions(["c2"]) == [got[2]]
    assert store.impressions(since=day(1.5)) == [got[2]]
    assert store.impressions([]) == []
    store.forget("c1", source="dsar")
    assert [i.customer_id for i in store.impressions()] == ["c2"]


def test_a_version_1_store_is_migrated_in_place(store_url: str) -> None:
    """A store created by the previous release (schema 1: impressions without the experiment
    columns) gets the new columns at open, keeping its rows."""
    with open_store(store_url) as s, s._write() as cur:
        cur.execute("DROP TABLE nextbest_impressions")
        cur.execute(
            "CREATE TABLE nextbest_impressions (customer_id TEXT NOT NULL, product_id TEXT NOT "
            "NULL, channel TEXT NOT NULL, shown_at "
            + ("INTEGER" if store_url.startswith("sqlite") else "TIMESTAMP")
            + " NOT NULL)"
        )
        cur.execute(
            s._sql("INSERT INTO nextbest_impressions VALUES (?, ?, ?, ?)"),
            ("c1", "p1", "web", s._ts(day(1))),
        )
        cur.execute("UPDATE nextbest_schema_version SET version = 1")
    with open_store(store_url) as s:
        with s._read() as cur:
            cur.execute("SELECT version FROM nextbest_schema_version")
            assert cur.fetchall() == [(SCHEMA_VERSION,)]
        assert s.impressions() == [("c1", "p1", "web", day(1), "", "", "", 0, "", "")]
        s.record_impressions([("c1", "p2", "web", day(2), "e", "v", "x", 1, "m")])
        assert s.impressions()[1].variant == "v"
        # The exposure runs (schema 3) are filled from the impressions already there.
        assert s.unanswered_impressions(["c1"], since=day(0)) == {"c1": {"p1": 1, "p2": 1}}


def test_impressions_shown_before_an_erasure_are_not_kept(store: Store) -> None:
    """An answer in flight while its customer is forgotten: its impressions, written after the
    erasure by the batching writer, are dropped; a later showing (they came back) is kept."""
    store.forget("c1", source="dsar")
    erased_at = store.tombstones()["c1"]
    before = erased_at - dt.timedelta(seconds=1)
    after = erased_at + dt.timedelta(seconds=1)
    rows = [("c1", "p1", "web", before), ("c2", "p1", "web", before), ("c1", "p2", "web", after)]
    assert store.record_impressions([]) == 0
    assert store.record_impressions([("c1", "p3", "web", erased_at)]) == 0  # at the erasure
    assert store.record_impressions(rows) == 2
    assert [(i.customer_id, i.product_id) for i in store.impressions()] == [
        ("c2", "p1"),
        ("c1", "p2"),
    ]


def test_customer_reads_is_the_four_reads_in_one_query(store: Store) -> None:
    """The serving path's one query per call returns what consent_state, erased, events and
    unanswered_impressions return one by one (on both backends: one row shape for four tables)."""
    store.set_consent("c1", "personalization", True, source="app")
    store.set_consent("c1", "sensitive", False, source="app")
    store.set_consent("c2", "personalization", False, source="app")
    store.record_events(
        events_table(
            [
                ("c1", "p1", day(1), "purchase", 2.0),
                ("c1", "p2", day(2), "return", 1.0),
                ("c1", "p3", day(3), "view", 1.0),  # not a purchase: not read
                ("c1", "p4", day(-5), "purchase", 1.0),  # before `purchases_since`: not read
                ("c2", "p1", day(2), "purchase", 1.0),
            ]
        )
    )
    store.record_impressions(
        [("c1", "p5", "email", day(1)), ("c1", "p5", "web", day(2)), ("c2", "p6", "web", day(2))]
    )
    store.forget("c3", source="dsar")
    ids = ["c1", "c2", "c3", "c9"]
    reads = store.customer_reads(ids, True, purchases_since=day(0), impressions_since=day(0))
    assert reads.consent.granted == store.consent_state(ids, True).granted
    assert reads.consent.granted == {
        "personalization": {"c1": True, "c2": False},
        "sensitive": {"c1": False},
    }
    assert set(reads.erased) == {"c3"} == set(store.erased(ids))
    assert reads.impressions == {"c1": {"p5": 2}, "c2": {"p6": 1}}
    assert reads.impressions == store.unanswered_impressions(ids, since=day(0))
    got = reads.purchases.select(["customer_id", "product_id", "event_type", "quantity"])
    assert got.to_pylist() == [
        {"customer_id": "c1", "product_id": "p1", "event_type": "purchase", "quantity": 2.0},
        {"customer_id": "c1", "product_id": "p2", "event_type": "return", "quantity": 1.0},
        {"customer_id": "c2", "product_id": "p1", "event_type": "purchase", "quantity": 1.0},
    ]  # by time, then as recorded
    assert reads.purchases.schema == EVENT_SCHEMA
    none = store.customer_reads(ids, False, purchases_since=day(0), impressions_since=None)
    assert none.impressions == {} and none.consent.default_allow is False
    empty = store.customer_reads([], True, purchases_since=day(0), impressions_since=day(0))
    assert empty.purchases.num_rows == 0 and empty.erased == {}


def test_training_from_the_store_logs_its_url_without_the_password(caplog) -> None:
    """`nextbest train --store URL`'s log lines name the store with any password hidden."""
    import logging
    from urllib.parse import urlsplit, urlunsplit

    from nextbest.config import Settings
    from nextbest.training.inputs import _store_inputs

    parts = urlsplit(PG_URL)  # trust auth: a password in the URL is accepted and not checked
    user = parts.username or "postgres"
    host = parts.netloc.rsplit("@", 1)[-1]
    url = urlunsplit(parts._replace(netloc=f"{user}:s3cret-pw@{host}"))
    events = pa.Table.from_pylist(
        [{"customer_id": "c1", "product_id": "p1", "timestamp": day(1), "event_type": "purchase"}],
        schema=EVENT_SCHEMA,
    )
    catalog = pa.table({"product_id": ["p2"]})  # p1 unknown: the "skipped" line is logged too
    with caplog.at_level(logging.INFO, logger="nextbest.training.inputs"):
        _store_inputs(url, events, catalog, Settings())
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "recorded events added" in logged
    assert "s3cret-pw" not in logged and f"{user}:***@" in logged


def test_a_store_opens_beside_a_writer_without_waiting_for_it(store_url: str) -> None:
    """A replica starting (or started again) while another one writes to the shared store:
    opening a store whose schema is current takes no table lock, so it neither waits for the
    writers' transactions nor deadlocks with them. (`make bench-soak`'s restart of a killed
    replica failed with "deadlock detected": its CREATE INDEX IF NOT EXISTS waited for a lock
    on a table a writer held, while that writer waited for one the schema transaction held.)"""
    open_store(store_url).close()
    with _raw_cursor(store_url) as cur:
        if store_url.startswith("sqlite"):
            cur.execute("BEGIN IMMEDIATE")  # a writer's transaction
            cur.execute("DELETE FROM nextbest_events WHERE customer_id = 'nobody'")
        else:
            cur.execute("BEGIN")
            cur.execute("LOCK TABLE nextbest_events IN ROW EXCLUSIVE MODE")  # as record_events
            cur.execute("LOCK TABLE nextbest_consent IN ROW EXCLUSIVE MODE")  # as set_consent
        opened: list[object] = []

        def open_it() -> None:
            try:
                open_store(store_url).close()
                opened.append(True)
            except Exception as exc:  # noqa: BLE001 - reported below
                opened.append(exc)

        opener = threading.Thread(target=open_it, daemon=True)
        opener.start()
        opener.join(10)
        while_writing = list(opened)
        cur.execute("ROLLBACK")
        opener.join(60)
    assert while_writing == [True], f"waited for the writer's transaction to end: {opened}"
