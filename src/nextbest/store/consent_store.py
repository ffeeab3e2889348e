"""The consent and event store (SPEC §5, §6): an SQLite file by default, PostgreSQL for replicas.

`open_store(url)` takes `sqlite:///path.db` (SQLAlchemy spelling: `sqlite:///data/store.db` is
relative, `sqlite:////var/lib/nextbest/store.db` absolute; a bare path ending in `.db`, `.sqlite`
or `.sqlite3` also works) or `postgresql://user@host:port/db[?schema=NAME]` (`schema` puts the
tables in that PostgreSQL schema, created if missing; the other query parameters go to libpq). The
tables (`nextbest_*`) and a `nextbest_schema_version` row are created if missing.

Guarantees:
- Durable before acknowledged: every write method is one transaction, committed before it returns
  (SQLite in WAL mode with `synchronous=FULL`; PostgreSQL's commit). A failed write leaves nothing.
- No caching: every call reads the database, so replicas sharing one PostgreSQL store see each
  other's committed writes on their next call. Safe to call from many threads (a small pool of
  connections, one per concurrent call).
- Reconnects by itself: a connection that failed is dropped, and an idle PostgreSQL connection the
  server or the network closed meanwhile (restart, failover, idle timeout, a cut) is noticed
  before it is used and replaced, so the first call after the database is back succeeds.
- Consent: one record per customer and purpose; a purpose without a record follows
  `policy.default_consent` (`consent_state(..., default_allow)`). The latest `updated_at` wins: a
  change dated before the stored record is ignored. Setting the value a record already has moves
  its `updated_at` and `source` forward and writes no audit row; every real change of value,
  including the first set (`old_granted` None), writes one audit row (when, source, old, new).
- Erasure (`forget`): one transaction deletes the customer's consent records, events and audit
  rows and leaves a tombstone (customer id, `erased_at` = time of the latest erasure). A customer
  may come back: consent and events dated after `erased_at` are stored again and the tombstone
  stays; consent and events dated at or before `erased_at` are erased data replayed and are not
  stored. So every consent record of an erased customer was made after the erasure, which is
  what `policy.still_erased` relies on (the customer stays erased until personalization consent
  is recorded again; RecordEvents stores nothing of them until then).
- Times are naive UTC datetimes, like the readers (an aware datetime is converted to UTC). SQLite
  keeps them as integer microseconds since the epoch, PostgreSQL as `timestamp`.

Errors: `InvalidRequest` names the bad field; `StoreError` (one line, naming the URL with any
password hidden) when the database cannot be reached or fails; `ConfigError` for a bad URL.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import select
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nextbest.data.readers import CONSENT_SCHEMA, EVENT_SCHEMA, PURPOSES
from nextbest.errors import ConfigError, InvalidRequest, NextbestError
from nextbest.policy import ConsentState, erased_rows

__all__ = [
    "SCHEMA_VERSION",
    "Impression",
    "StoreError",
    "ConsentRecord",
    "AuditRecord",
    "ForgetReport",
    "AccessRecord",
    "CustomerReads",
    "Store",
    "SqliteStore",
    "PostgresStore",
    "open_store",
]

SCHEMA_VERSION = 3
"""2: impressions carry their experiment arm, attribution id, rank, model version and reasons.
3: `nextbest_exposure`, the unanswered run of each customer's product (the fatigue read)."""
_MIGRATIONS = {
    2: [
        ("nextbest_impressions", "experiment", "TEXT"),
        ("nextbest_impressions", "variant", "TEXT"),
        ("nextbest_impressions", "attribution_id", "TEXT"),
        ("nextbest_impressions", "rank", "INTEGER"),
        ("nextbest_impressions", "model_version", "TEXT"),
        ("nextbest_impressions", "reasons", "TEXT"),
    ]
}
"""Columns each schema version added to tables of the version before (added in place)."""
_BACKFILLS: dict[int, list[str]] = {}
"""Statements that fill what a schema version added from the rows already there (after its
columns are added); filled in below, once the SQL they use is defined."""
_EPOCH = dt.datetime(1970, 1, 1)
_MICRO = dt.timedelta(microseconds=1)
_IDLE_CONNECTIONS = 16
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_LOCK_NAMESPACE = 0x6E627374  # PostgreSQL advisory locks: (namespace, hashtext(customer_id))


class StoreError(NextbestError):
    """The store's database cannot be reached or failed; the message names the URL."""


@dataclass(frozen=True)
class ConsentRecord:
    """The stored consent of one customer for one purpose."""

    purpose: str
    granted: bool
    updated_at: dt.datetime
    source: str


@dataclass(frozen=True)
class AuditRecord:
    """One consent change. `old_granted`/`new_granted` None: no record (before the first set, or
    after an erasure). `set_consent` returns one with `old == new` when nothing changed."""

    customer_id: str
    purpose: str
    old_granted: bool | None
    new_granted: bool | None
    changed_at: dt.datetime
    source: str

    @property
    def changed(self) -> bool:
        """Did the value change (and was an audit row written)?"""
        return self.old_granted != self.new_granted


@dataclass(frozen=True)
class ForgetReport:
    """What `forget` deleted; `already_erased`: a tombstone existed before this call."""

    customer_id: str
    consent_rows: int
    events: int
    audit_rows: int
    already_erased: bool


@dataclass(frozen=True)
class CustomerReads:
    """What the serving path reads about the customers of one request, in one query
    (`Store.customer_reads`)."""

    consent: ConsentState
    erased: dict[str, dt.datetime]
    """Erased customers → the time of their latest erasure (as `Store.erased`)."""
    purchases: pa.Table
    """Their recorded purchases and returns from a time on (EVENT_SCHEMA), by time."""
    impressions: dict[str, dict[str, int]]
    """customer → product → unanswered impressions (as `Store.unanswered_impressions`); empty
    when not asked for."""


@dataclass(frozen=True)
class AccessRecord:
    """One request for a customer's data (`what`: "export"): when, which client, which source."""

    customer_id: str
    requested_at: dt.datetime
    what: str
    client: str
    source: str


# --- validation and conversions ----------------------------------------------------------------


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


def _naive_utc(value: dt.datetime, field: str) -> dt.datetime:
    if not isinstance(value, dt.datetime):
        raise InvalidRequest(f"{field}: expected a datetime, got {type(value).__name__}")
    if value.tzinfo is not None:
        value = value.astimezone(dt.UTC).replace(tzinfo=None)
    return value


def _check_customer(customer_id: object, field: str = "customer_id") -> str:
    if not isinstance(customer_id, str) or not customer_id.strip():
        raise InvalidRequest(f"{field}: must not be empty")
    return customer_id


def _check_purpose(purpose: object, field: str = "purpose") -> str:
    if purpose not in PURPOSES:
        raise InvalidRequest(
            f"{field}: unknown purpose {purpose!r} (expected {', '.join(PURPOSES)})"
        )
    return purpose  # type: ignore[return-value]


def _check_source(source: object) -> str:
    if not isinstance(source, str) or not source.strip():
        raise InvalidRequest("source: must not be empty")
    return source


def _ts_array(arr: pa.ChunkedArray | pa.Array, field: str) -> pa.Array:
    """Any arrow timestamp column as naive UTC microseconds (aware → UTC wall clock)."""
    arr = arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
    if not pa.types.is_timestamp(arr.type):
        raise InvalidRequest(f"{field}: expected timestamps, got {arr.type}")
    arr = arr.cast(pa.timestamp("us", tz=arr.type.tz))
    return arr.cast(pa.int64()).cast(pa.timestamp("us")) if arr.type.tz else arr


def _table(table: pa.Table, schema: pa.Schema, required: Sequence[str], what: str) -> pa.Table:
    """`table` with `schema`'s columns and types; missing optional columns are null; required
    columns may hold neither nulls nor empty strings."""
    if not isinstance(table, pa.Table):
        raise InvalidRequest(f"{what}: expected a pyarrow Table, got {type(table).__name__}")
    columns = []
    for f in schema:
        if f.name not in table.column_names:
            if f.name in required:
                raise InvalidRequest(f"{f.name}: missing column in {what}")
            columns.append(pa.nulls(table.num_rows, f.type))
            continue
        col = table.column(f.name)
        try:
            arr = _ts_array(col, f.name) if pa.types.is_timestamp(f.type) else col.cast(f.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
            raise InvalidRequest(f"{f.name}: cannot be read as {f.type} ({exc})") from None
        columns.append(arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr)
    out = pa.Table.from_arrays(columns, schema=schema)
    for name in required:
        col = out[name].combine_chunks()
        bad = pc.is_null(col)
        if pa.types.is_string(col.type):
            bad = pc.or_kleene(bad, pc.equal(pc.utf8_trim_whitespace(col), ""))
        bad_np = bad.to_numpy(zero_copy_only=False)
        if bad_np.any():
            row = int(np.flatnonzero(bad_np)[0])
            raise InvalidRequest(f"{name}: missing or empty in row {row} of {what}")
    return out


def _redact(url: str) -> str:
    """The URL with any password replaced by `***` (for messages and logs)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].strip() if text else type(exc).__name__


# --- the shared store ----------------------------------------------------------------------------

_TABLES = (
    """CREATE TABLE IF NOT EXISTS nextbest_schema_version (version INTEGER NOT NULL){strict}""",
    """CREATE TABLE IF NOT EXISTS nextbest_consent (
        customer_id TEXT NOT NULL,
        purpose TEXT NOT NULL,
        granted {bool} NOT NULL,
        updated_at {ts} NOT NULL,
        source TEXT NOT NULL,
        PRIMARY KEY (customer_id, purpose)
    ){strict}""",
    """CREATE TABLE IF NOT EXISTS nextbest_consent_audit (
        id {id},
        customer_id TEXT NOT NULL,
        purpose TEXT NOT NULL,
        old_granted {bool},
        new_granted {bool},
        changed_at {ts} NOT NULL,
        source TEXT NOT NULL,
        recorded_at {ts} NOT NULL
    ){strict}""",
    """CREATE INDEX IF NOT EXISTS nextbest_consent_audit_customer
        ON nextbest_consent_audit (customer_id, changed_at)""",
    """CREATE TABLE IF NOT EXISTS nextbest_events (
        id {id},
        customer_id TEXT NOT NULL,
        product_id TEXT NOT NULL,
        "timestamp" {ts} NOT NULL,
        event_type TEXT NOT NULL,
        quantity {float} NOT NULL,
        value {float},
        channel TEXT
    ){strict}""",
    """CREATE INDEX IF NOT EXISTS nextbest_events_customer
        ON nextbest_events (customer_id, "timestamp")""",
    """CREATE INDEX IF NOT EXISTS nextbest_events_time ON nextbest_events ("timestamp", id)""",
    # Whether an impression was answered (`_UNANSWERED`) is one probe of this index per
    # impression; by (customer, time) alone it scanned every later event of the customer, so a
    # call's cost grew with its customer's impressions times their events (make bench-soak).
    """CREATE INDEX IF NOT EXISTS nextbest_events_customer_product
        ON nextbest_events (customer_id, product_id, "timestamp")""",
    """CREATE TABLE IF NOT EXISTS nextbest_impressions (
        customer_id TEXT NOT NULL,
        product_id TEXT NOT NULL,
        channel TEXT NOT NULL,
        shown_at {ts} NOT NULL,
        experiment TEXT,
        variant TEXT,
        attribution_id TEXT,
        rank INTEGER,
        model_version TEXT,
        reasons TEXT
    ){strict}""",
    """CREATE INDEX IF NOT EXISTS nextbest_impressions_customer
        ON nextbest_impressions (customer_id, shown_at)""",
    """CREATE INDEX IF NOT EXISTS nextbest_impressions_customer_product
        ON nextbest_impressions (customer_id, product_id, shown_at)""",
    # Per customer and product, the run of impressions no event has answered yet: how many,
    # the first and the last shown. Kept by `record_impressions`; the fatigue read counts from
    # it, so a call's cost grows with the products a customer was shown, not with how often.
    """CREATE TABLE IF NOT EXISTS nextbest_exposure (
        customer_id TEXT NOT NULL,
        product_id TEXT NOT NULL,
        shown INTEGER NOT NULL,
        first_shown {ts} NOT NULL,
        last_shown {ts} NOT NULL,
        PRIMARY KEY (customer_id, product_id)
    ){strict}""",
    """CREATE TABLE IF NOT EXISTS nextbest_tombstones (
        customer_id TEXT PRIMARY KEY,
        erased_at {ts} NOT NULL,
        source TEXT NOT NULL
    ){strict}""",
    """CREATE TABLE IF NOT EXISTS nextbest_access_log (
        id {id},
        customer_id TEXT NOT NULL,
        requested_at {ts} NOT NULL,
        what TEXT NOT NULL,
        client TEXT NOT NULL,
        source TEXT NOT NULL
    ){strict}""",
    """CREATE INDEX IF NOT EXISTS nextbest_access_log_customer
        ON nextbest_access_log (customer_id, requested_at)""",
)

_RELATIONS = tuple(re.search(r"IF NOT EXISTS (\w+)", ddl).group(1) for ddl in _TABLES)
"""The tables and indexes of the schema, by name."""
_UNANSWERED = (
    "NOT EXISTS (SELECT 1 FROM nextbest_events e WHERE e.customer_id = i.customer_id "
    'AND e.product_id = i.product_id AND e."timestamp" >= i.shown_at)'
)
"""An impression `i` that no later event of its customer on its product answered."""
_RUN_ANSWERED = (
    "EXISTS (SELECT 1 FROM nextbest_events e WHERE e.customer_id = x.customer_id "
    'AND e.product_id = x.product_id AND e."timestamp" >= x.first_shown)'
)
"""An event answered part or all of the exposure run `x` after it was written."""
_FATIGUE = (
    "SELECT {head}x.customer_id, x.product_id, {mid}x.shown{tail} FROM nextbest_exposure x "
    f"WHERE x.customer_id IN ({{ids}}) AND x.first_shown >= ? AND NOT {_RUN_ANSWERED} "
    "UNION ALL "
    "SELECT {head}customer_id, product_id, {mid}n{tail} FROM (SELECT x.customer_id, "
    "x.product_id, (SELECT COUNT(*) FROM nextbest_impressions i "
    "WHERE i.customer_id = x.customer_id AND i.product_id = x.product_id "
    f"AND i.shown_at >= ? AND {_UNANSWERED}) AS n FROM nextbest_exposure x "
    f"WHERE x.customer_id IN ({{ids}}) AND x.last_shown >= ? "
    f"AND (x.first_shown < ? OR {_RUN_ANSWERED})) AS cut WHERE n > 0"
)
"""Unanswered impressions since a time per (customer, product), from `nextbest_exposure`: a run
that lies inside the window and that no event answered since is counted as stored (one row);
only a run that began before the window or was answered since it was written is counted from
the impressions themselves (a correlated count per run: the runs drive the query, so its cost
follows the products shown). Parameters: ids, since, since, ids, since, since."""
_EXPOSURE_COLUMNS = "customer_id, product_id, shown, first_shown, last_shown"
_EXPOSURE_REBUILD = (
    f"INSERT INTO nextbest_exposure ({_EXPOSURE_COLUMNS}) SELECT i.customer_id, i.product_id, "
    "COUNT(*), MIN(i.shown_at), MAX(i.shown_at) FROM nextbest_impressions i WHERE {where} "
    f"AND {_UNANSWERED} GROUP BY i.customer_id, i.product_id"
)
"""The exposure runs of the impressions that `where` selects, from the impressions."""
_BACKFILLS[3] = [_EXPOSURE_REBUILD.format(where="1 = 1")]
_NO_EVENTS = EVENT_SCHEMA.empty_table()
"""Tables are immutable: one empty one serves every read that finds nothing (making one costs
more than the query)."""
_EVENT_COLUMNS = 'customer_id, product_id, "timestamp", event_type, quantity, value, channel'
_AUDIT_INSERT = (
    "INSERT INTO nextbest_consent_audit (customer_id, purpose, old_granted, new_granted, "
    "changed_at, source, recorded_at) VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_IMPORT_COLUMNS = ("customer_id", "purpose", "granted", "updated_at")
_IMPRESSION_COLUMNS = (
    "customer_id, product_id, channel, shown_at, experiment, variant, attribution_id, rank, "
    "model_version, reasons"
)


class Impression(NamedTuple):
    """One product shown to a customer (the fatigue rule and attribution read these)."""

    customer_id: str
    product_id: str
    channel: str
    shown_at: dt.datetime
    """Naive UTC."""
    experiment: str = ""
    variant: str = ""
    """The experiment arm of the answer ('' outside experiments)."""
    attribution_id: str = ""
    """The answer's id (RecommendProductsResponse.attribution_id)."""
    rank: int = 0
    """1-based position in the answer."""
    model_version: str = ""
    reasons: str = ""
    """The kinds of the item's reasons, comma-separated (bought_related,repurchase_due, ...)."""


class Store:
    """Consent records, their audit trail, events and tombstones in one SQL database.

    The SQL is shared; `SqliteStore` and `PostgresStore` supply connections, placeholders, column
    types, time conversion and locking. `url` is the URL as given, with any password hidden.
    """

    _types: dict[str, str] = {}
    _temp = "temp"

    def __init__(self, url: str) -> None:
        self.url = _redact(url)
        self._idle: list[Any] = []
        self._all: list[Any] = []
        self._pool_lock = threading.Lock()
        self._closed = False
        try:
            # Read only first: a server starting beside replicas that write takes no table lock
            # when there is nothing to create or migrate (DDL waits for, and can deadlock with,
            # the writers' transactions).
            with self._read() as cur:
                current = self._schema_is_current(cur)
            if not current:
                with self._write() as cur:
                    self._create_schema(cur)
        except BaseException:
            self.close()
            raise

    # -- dialect hooks -----------------------------------------------------------------------------

    def _connect(self) -> Any:
        raise NotImplementedError

    def _driver_error(self) -> type[Exception]:
        raise NotImplementedError

    def _add_column(self, cur: Any, table: str, column: str, kind: str) -> None:
        """Add a column to a table of an older schema (a no-op when it is there)."""
        raise NotImplementedError

    def _existing(self, cur: Any, names: Sequence[str]) -> set[str]:
        """Which of the tables and indexes `names` exist (a catalog read)."""
        raise NotImplementedError

    def _is_broken(self, conn: Any) -> bool:
        return False

    def _is_stale(self, conn: Any) -> bool:
        """An idle connection that must not be used again (checked before each reuse)."""
        return self._is_broken(conn)

    @contextmanager
    def _transaction(self, conn: Any) -> Iterator[Any]:
        raise NotImplementedError
        yield

    def _sql(self, sql: str) -> str:
        """Placeholders: the shared SQL uses `?`."""
        return sql

    def _ts(self, value: dt.datetime) -> Any:
        return value

    def _dt(self, value: Any) -> dt.datetime:
        return value

    def _ts_list(self, arr: pa.Array) -> list:
        return arr.to_pylist()

    def _ts_arrow(self, values: list) -> pa.Array:
        return pa.array(values, pa.timestamp("us"))

    def _id_set(self, ids: Sequence[str]) -> tuple[str, Any]:
        """A subquery of customer ids with one parameter (one round trip for any batch size)."""
        raise NotImplementedError

    def _key_set(self, keys: Sequence[tuple[str, str]]) -> tuple[str, list]:
        """A subquery of (customer id, product id) pairs as columns `c`, `p`, and its
        parameters."""
        raise NotImplementedError

    def _lock(self, cur: Any, table: str, mode: str) -> None:
        """Table lock (PostgreSQL); SQLite's `BEGIN IMMEDIATE` already serializes writers."""

    def _lock_customer(self, cur: Any, customer_id: str) -> None:
        """Serialize writers of one customer (PostgreSQL); a no-op for SQLite."""

    def _copy(self, cur: Any, table: str, columns: str, rows: list[tuple]) -> None:
        """Bulk insert in one call."""
        marks = ", ".join("?" * len(rows[0]))
        cur.executemany(self._sql(f"INSERT INTO {table} ({columns}) VALUES ({marks})"), rows)

    # -- connections and transactions --------------------------------------------------------------

    @contextmanager
    def _conn(self) -> Iterator[Any]:
        """A connection for this call, back to the pool afterwards (dropped if broken)."""
        if self._closed:
            raise StoreError(f"{self.url}: store is closed")
        conn = self._checkout()
        if conn is None:
            conn = self._connect()
            with self._pool_lock:
                self._all.append(conn)
        try:
            yield conn
        except self._driver_error() as exc:
            raise StoreError(f"{self.url}: {_first_line(exc)}") from exc
        finally:
            self._release(conn)

    def _checkout(self) -> Any:
        """An idle connection that is still usable, or None; stale ones are closed."""
        while True:
            with self._pool_lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None or not self._is_stale(conn):
                return conn
            with self._pool_lock:
                self._all = [c for c in self._all if c is not conn]
            self._close_quietly(conn)

    def _release(self, conn: Any) -> None:
        with self._pool_lock:
            keep = not self._closed and not self._is_broken(conn)
            keep = keep and len(self._idle) < _IDLE_CONNECTIONS
            if keep:
                self._idle.append(conn)
            else:
                self._all = [c for c in self._all if c is not conn]
        if not keep:
            self._close_quietly(conn)

    def _close_quietly(self, conn: Any) -> None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - closing a broken connection must not mask the cause
            pass

    @contextmanager
    def _write(self) -> Iterator[Any]:
        """One write transaction, committed (durably) when the block ends without an error."""
        with self._conn() as conn, self._transaction(conn) as cur:
            yield cur

    @contextmanager
    def _read(self) -> Iterator[Any]:
        with self._conn() as conn:
            cur = conn.cursor()
            try:
                yield cur
            finally:
                cur.close()

    def close(self) -> None:
        """Close every connection; later calls raise StoreError."""
        with self._pool_lock:
            self._closed = True
            conns, self._all, self._idle = self._all, [], []
        for conn in conns:
            self._close_quietly(conn)

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def _schema_is_current(self, cur: Any) -> bool:
        """Every table and index exists and the schema version is this nextbest's."""
        if self._existing(cur, _RELATIONS) != set(_RELATIONS):
            return False
        cur.execute("SELECT MAX(version) FROM nextbest_schema_version")
        return cur.fetchone()[0] == SCHEMA_VERSION

    def _create_schema(self, cur: Any) -> None:
        for ddl in _TABLES:
            cur.execute(ddl.format(**self._types))
        cur.execute("SELECT MAX(version) FROM nextbest_schema_version")
        version = cur.fetchone()[0]
        if version is None:
            cur.execute(
                self._sql("INSERT INTO nextbest_schema_version (version) VALUES (?)"),
                (SCHEMA_VERSION,),
            )
        elif version < SCHEMA_VERSION:
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for table, column, kind in _MIGRATIONS.get(target, []):
                    self._add_column(cur, table, column, kind)
                for sql in _BACKFILLS.get(target, []):
                    cur.execute(sql)
            cur.execute(
                self._sql("UPDATE nextbest_schema_version SET version = ?"), (SCHEMA_VERSION,)
            )
        elif version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.url}: store schema version {version} is newer than this nextbest "
                f"({SCHEMA_VERSION}); upgrade nextbest"
            )

    # -- consent -----------------------------------------------------------------------------------

    def set_consent(
        self,
        customer_id: str,
        purpose: str,
        granted: bool,
        *,
        source: str,
        at: dt.datetime | None = None,
    ) -> AuditRecord:
        """Record one consent decision made at `at` (default: now) and return the change.

        A decision dated before the stored record's `updated_at`, or at or before the customer's
        erasure, is ignored: the returned record has `old == new` (the stored value, None if none)
        and nothing is written. The same value again moves `updated_at`/`source` forward, returns
        `old == new` and writes no audit row. A real change writes the record and one audit row.
        """
        _check_customer(customer_id)
        _check_purpose(purpose)
        _check_source(source)
        if not isinstance(granted, bool | np.bool_):
            raise InvalidRequest(f"granted: must be true or false, got {granted!r}")
        granted = bool(granted)
        at = _now() if at is None else _naive_utc(at, "at")
        with self._write() as cur:
            self._lock(cur, "nextbest_consent", "ROW EXCLUSIVE")
            self._lock_customer(cur, customer_id)
            cur.execute(
                self._sql("SELECT erased_at FROM nextbest_tombstones WHERE customer_id = ?"),
                (customer_id,),
            )
            tomb = cur.fetchone()
            cur.execute(
                self._sql(
                    "SELECT granted, updated_at FROM nextbest_consent "
                    "WHERE customer_id = ? AND purpose = ?"
                ),
                (customer_id, purpose),
            )
            row = cur.fetchone()
            old = None if row is None else bool(row[0])
            stale = (tomb is not None and at <= self._dt(tomb[0])) or (
                row is not None and at < self._dt(row[1])
            )
            if stale:
                return AuditRecord(customer_id, purpose, old, old, at, source)
            if row is None:
                cur.execute(
                    self._sql(
                        "INSERT INTO nextbest_consent "
                        "(customer_id, purpose, granted, updated_at, source) VALUES (?, ?, ?, ?, ?)"
                    ),
                    (customer_id, purpose, granted, self._ts(at), source),
                )
            else:
                cur.execute(
                    self._sql(
                        "UPDATE nextbest_consent SET granted = ?, updated_at = ?, source = ? "
                        "WHERE customer_id = ? AND purpose = ?"
                    ),
                    (granted, self._ts(at), source, customer_id, purpose),
                )
            if old != granted:
                cur.execute(
                    self._sql(_AUDIT_INSERT),
                    (customer_id, purpose, old, granted, self._ts(at), source, self._ts(_now())),
                )
        return AuditRecord(customer_id, purpose, old, granted, at, source)

    def get_consent(self, customer_id: str) -> dict[str, ConsentRecord]:
        """The customer's stored records, purpose → record (purposes without one are absent)."""
        _check_customer(customer_id)
        with self._read() as cur:
            cur.execute(
                self._sql(
                    "SELECT purpose, granted, updated_at, source FROM nextbest_consent "
                    "WHERE customer_id = ? ORDER BY purpose"
                ),
                (customer_id,),
            )
            rows = cur.fetchall()
        return {p: ConsentRecord(p, bool(g), self._dt(u), s) for p, g, u, s in rows}

    def consent_state(self, customer_ids: Sequence[str], default_allow: bool) -> ConsentState:
        """The consent of a batch of customers in one query; customers or purposes without a
        record follow `default_allow`."""
        ids = sorted({c for c in customer_ids if isinstance(c, str) and c})
        granted: dict[str, dict[str, bool]] = {}
        if ids:
            subquery, param = self._id_set(ids)
            with self._read() as cur:
                cur.execute(
                    self._sql(
                        "SELECT purpose, customer_id, granted FROM nextbest_consent "
                        f"WHERE customer_id IN ({subquery})"
                    ),
                    (param,),
                )
                for purpose, customer, value in cur.fetchall():
                    granted.setdefault(purpose, {})[customer] = bool(value)
        return ConsentState(default_allow=bool(default_allow), granted=granted)

    def import_consent(self, table: pa.Table, *, source: str) -> dict[str, int]:
        """Apply a consent table (CONSENT_SCHEMA) in one transaction.

        Per customer and purpose the row with the latest `updated_at` in the file wins (the later
        row on a tie), then it wins against the store as `set_consent` would. Counts: `applied`
        (new record or changed value, one audit row each), `unchanged` (same value, `updated_at`
        moved forward), `older` (superseded in the file, older than the stored record, or at or
        before the customer's erasure).
        """
        _check_source(source)
        consent = _table(table, CONSENT_SCHEMA, CONSENT_SCHEMA.names, "consent table")
        known = pc.is_in(consent["purpose"], pa.array(PURPOSES)).to_numpy(zero_copy_only=False)
        if not known.all():
            row = int(np.flatnonzero(~known)[0])
            _check_purpose(consent["purpose"][row].as_py(), f"purpose (row {row})")
        counts = {"applied": 0, "unchanged": 0, "older": 0}
        if consent.num_rows == 0:
            return counts
        latest = _latest_per_key(consent)
        counts["older"] = consent.num_rows - latest.num_rows
        temp = f"{self._temp}.nextbest_import"
        rows = list(
            zip(
                latest["customer_id"].to_pylist(),
                latest["purpose"].to_pylist(),
                latest["granted"].to_pylist(),
                self._ts_list(latest["updated_at"].combine_chunks()),
                strict=True,
            )
        )
        t = self._types
        with self._write() as cur:
            self._lock(cur, "nextbest_consent", "SHARE ROW EXCLUSIVE")
            cur.execute(f"DROP TABLE IF EXISTS {temp}")
            cur.execute(
                f"CREATE TABLE {temp} (customer_id TEXT NOT NULL, purpose TEXT NOT NULL, "
                f"granted {t['bool']} NOT NULL, updated_at {t['ts']} NOT NULL, "
                f"old_granted {t['bool']}, old_updated_at {t['ts']}, erased_at {t['ts']}, "
                "outcome TEXT)"
            )
            self._copy(cur, temp, ", ".join(_IMPORT_COLUMNS), rows)
            key = (
                "c.customer_id = nextbest_import.customer_id "
                "AND c.purpose = nextbest_import.purpose"
            )
            cur.execute(
                f"UPDATE {temp} SET "
                f"old_granted = (SELECT c.granted FROM nextbest_consent c WHERE {key}), "
                f"old_updated_at = (SELECT c.updated_at FROM nextbest_consent c WHERE {key}), "
                "erased_at = (SELECT t.erased_at FROM nextbest_tombstones t "
                "WHERE t.customer_id = nextbest_import.customer_id)"
            )
            cur.execute(
                f"UPDATE {temp} SET outcome = CASE "
                "WHEN erased_at IS NOT NULL AND updated_at <= erased_at THEN 'older' "
                "WHEN old_updated_at IS NOT NULL AND updated_at < old_updated_at THEN 'older' "
                "WHEN old_granted IS NOT NULL AND old_granted = granted THEN 'unchanged' "
                "ELSE 'applied' END"
            )
            cur.execute(f"SELECT outcome, COUNT(*) FROM {temp} GROUP BY outcome")
            for outcome, n in cur.fetchall():
                counts[outcome] += int(n)
            cur.execute(
                self._sql(
                    "INSERT INTO nextbest_consent_audit (customer_id, purpose, old_granted, "
                    "new_granted, changed_at, source, recorded_at) "
                    f"SELECT customer_id, purpose, old_granted, granted, updated_at, ?, ? "
                    f"FROM {temp} WHERE outcome = 'applied' ORDER BY updated_at"
                ),
                (source, self._ts(_now())),
            )
            cur.execute(
                self._sql(
                    "INSERT INTO nextbest_consent (customer_id, purpose, granted, updated_at, "
                    f"source) SELECT customer_id, purpose, granted, updated_at, ? FROM {temp} "
                    "WHERE outcome <> 'older' ON CONFLICT (customer_id, purpose) DO UPDATE SET "
                    "granted = excluded.granted, updated_at = excluded.updated_at, "
                    "source = excluded.source"
                ),
                (source,),
            )
            cur.execute(f"DROP TABLE {temp}")
        return counts

    def audit(self, customer_id: str) -> list[AuditRecord]:
        """The customer's consent changes, oldest first."""
        _check_customer(customer_id)
        with self._read() as cur:
            cur.execute(
                self._sql(
                    "SELECT purpose, old_granted, new_granted, changed_at, source "
                    "FROM nextbest_consent_audit WHERE customer_id = ? ORDER BY changed_at, id"
                ),
                (customer_id,),
            )
            rows = cur.fetchall()
        return [
            AuditRecord(customer_id, p, _opt_bool(o), _opt_bool(n), self._dt(at), s)
            for p, o, n, at, s in rows
        ]

    # -- erasure -----------------------------------------------------------------------------------

    def forget(self, customer_id: str, *, source: str) -> ForgetReport:
        """Erase the customer in one transaction: consent records, events and audit rows are
        deleted and the tombstone is set to now. Idempotent (`already_erased` on a repeat)."""
        _check_customer(customer_id)
        _check_source(source)
        erased_at = _now()
        with self._write() as cur:
            self._lock(cur, "nextbest_consent", "ROW EXCLUSIVE")
            self._lock(cur, "nextbest_events", "SHARE ROW EXCLUSIVE")
            self._lock_customer(cur, customer_id)
            deleted = {}
            tables = (
                "nextbest_consent",
                "nextbest_events",
                "nextbest_consent_audit",
                "nextbest_impressions",
                "nextbest_exposure",
                "nextbest_access_log",
            )
            for table in tables:
                cur.execute(self._sql(f"DELETE FROM {table} WHERE customer_id = ?"), (customer_id,))
                deleted[table] = max(cur.rowcount, 0)
            cur.execute(
                self._sql("SELECT erased_at FROM nextbest_tombstones WHERE customer_id = ?"),
                (customer_id,),
            )
            before = cur.fetchone()
            if before is not None:
                erased_at = max(erased_at, self._dt(before[0]))
            cur.execute(
                self._sql(
                    "INSERT INTO nextbest_tombstones (customer_id, erased_at, source) "
                    "VALUES (?, ?, ?) ON CONFLICT (customer_id) DO UPDATE SET "
                    "erased_at = excluded.erased_at, source = excluded.source"
                ),
                (customer_id, self._ts(erased_at), source),
            )
        return ForgetReport(
            customer_id=customer_id,
            consent_rows=deleted["nextbest_consent"],
            events=deleted["nextbest_events"],
            audit_rows=deleted["nextbest_consent_audit"],
            already_erased=before is not None,
        )

    def erased(self, customer_ids: Sequence[str]) -> dict[str, dt.datetime]:
        """Those of `customer_ids` that were erased → the time of their latest erasure; one
        query (the serving path asks on every call)."""
        ids = sorted({c for c in customer_ids if isinstance(c, str) and c})
        if not ids:
            return {}
        subquery, param = self._id_set(ids)
        with self._read() as cur:
            cur.execute(
                self._sql(
                    "SELECT customer_id, erased_at FROM nextbest_tombstones "
                    f"WHERE customer_id IN ({subquery})"
                ),
                (param,),
            )
            return {c: self._dt(at) for c, at in cur.fetchall()}

    def consent_summary(self, since: dt.datetime) -> dict[str, int]:
        """Aggregates for the operator's dashboard (no customer ids): customers whose
        personalization consent is granted / withheld now, consent values granted and withdrawn
        (any purpose) since `since` (naive UTC), and customers erased since then."""
        with self._read() as cur:
            cur.execute(
                self._sql(
                    "SELECT granted, COUNT(*) FROM nextbest_consent WHERE purpose = ? "
                    "GROUP BY granted"
                ),
                ("personalization",),
            )
            now = {bool(g): int(n) for g, n in cur.fetchall()}
            cur.execute(
                self._sql(
                    "SELECT new_granted, COUNT(*) FROM nextbest_consent_audit "
                    "WHERE changed_at >= ? AND (old_granted IS NULL OR old_granted <> new_granted) "
                    "GROUP BY new_granted"
                ),
                (self._ts(since),),
            )
            changes = {bool(g): int(n) for g, n in cur.fetchall() if g is not None}
            cur.execute(
                self._sql("SELECT COUNT(*) FROM nextbest_tombstones WHERE erased_at >= ?"),
                (self._ts(since),),
            )
            erased = int(cur.fetchone()[0])
        return {
            "personalization_granted": now.get(True, 0),
            "personalization_withheld": now.get(False, 0),
            "granted_since": changes.get(True, 0),
            "withdrawn_since": changes.get(False, 0),
            "erased_since": erased,
        }

    def tombstones(self) -> dict[str, dt.datetime]:
        """Every erased customer → the time of their latest erasure."""
        with self._read() as cur:
            cur.execute("SELECT customer_id, erased_at FROM nextbest_tombstones")
            return {c: self._dt(at) for c, at in cur.fetchall()}

    # -- events ------------------------------------------------------------------------------------

    def record_events(self, table: pa.Table) -> int:
        """Store events (EVENT_SCHEMA; `value` and `channel` may be absent) in one transaction.

        Returns the number stored: events of an erased customer dated at or before their erasure
        are erased data replayed and are not stored.
        """
        events = _table(
            table,
            EVENT_SCHEMA,
            ("customer_id", "product_id", "timestamp", "event_type", "quantity"),
            "events table",
        )
        if events.num_rows == 0:
            return 0
        customers = sorted(set(events["customer_id"].to_pylist()))
        subquery, param = self._id_set(customers)
        with self._write() as cur:
            self._lock(cur, "nextbest_events", "ROW EXCLUSIVE")
            cur.execute(
                self._sql(
                    "SELECT customer_id, erased_at FROM nextbest_tombstones "
                    f"WHERE customer_id IN ({subquery})"
                ),
                (param,),
            )
            erased = cur.fetchall()
            if erased:
                events = _drop_erased(events, {c: self._dt(at) for c, at in erased})
            if events.num_rows == 0:
                return 0
            rows = list(
                zip(
                    events["customer_id"].to_pylist(),
                    events["product_id"].to_pylist(),
                    self._ts_list(events["timestamp"].combine_chunks()),
                    events["event_type"].to_pylist(),
                    events["quantity"].to_pylist(),
                    events["value"].to_pylist(),
                    events["channel"].to_pylist(),
                    strict=True,
                )
            )
            self._copy(cur, "nextbest_events", _EVENT_COLUMNS, rows)
        return events.num_rows

    # -- impressions (cross-channel fatigue) ---------------------------------------------------

    def record_impressions(self, rows: Sequence[Sequence[Any]]) -> int:
        """Store what was shown, in one transaction: `Impression` rows, or their first fields
        (customer_id, product_id, channel, shown_at naive UTC, ...); returns how many were
        stored (not those of an erased customer shown at or before their erasure)."""
        if not rows:
            return 0
        shown = [r if isinstance(r, Impression) else Impression(*r) for r in rows]
        customers = sorted({i.customer_id for i in shown})
        subquery, param = self._id_set(customers)
        with self._write() as cur:
            for customer in customers:  # sorted: writers of the same customers cannot deadlock
                self._lock_customer(cur, customer)
            # Shown before the customer's erasure (an answer in flight while they were
            # forgotten): not kept, as `record_events` keeps no replayed events.
            cur.execute(
                self._sql(
                    "SELECT customer_id, erased_at FROM nextbest_tombstones "
                    f"WHERE customer_id IN ({subquery})"
                ),
                (param,),
            )
            erased = {c: self._dt(at) for c, at in cur.fetchall()}
            if erased:
                blocked = erased_rows(
                    pa.array([i.customer_id for i in shown], pa.string()),
                    pa.array([i.shown_at for i in shown], pa.timestamp("us")),
                    erased,
                )
                shown = [i for i, no in zip(shown, blocked, strict=True) if not no]
            if not shown:
                return 0
            self._copy(
                cur,
                "nextbest_impressions",
                _IMPRESSION_COLUMNS,
                [(*i[:3], self._ts(i.shown_at), *i[4:]) for i in shown],
            )
            self._extend_exposure(cur, shown)
        return len(shown)

    def _extend_exposure(self, cur: Any, shown: list[Impression]) -> None:
        """Add impressions just stored to their exposure runs (`nextbest_exposure`), under the
        customers' locks. An impression an event already answered (a click that came before
        the batching writer) is not added; a run that an event answered since it was written
        is rebuilt from the impressions."""
        new: dict[tuple[str, str], list[dt.datetime]] = {}
        for i in shown:
            new.setdefault((i.customer_id, i.product_id), []).append(i.shown_at)
        keys, key_params = self._key_set(list(new))
        cur.execute(
            self._sql(
                'SELECT k.c, k.p, (SELECT MAX(e."timestamp") FROM nextbest_events e '
                "WHERE e.customer_id = k.c AND e.product_id = k.p), x.shown, x.first_shown, "
                f"x.last_shown FROM ({keys}) k LEFT JOIN nextbest_exposure x "
                "ON x.customer_id = k.c AND x.product_id = k.p"
            ),
            key_params,
        )
        rebuild, upsert = [], []
        for c, p, last_event, count, first, last in cur.fetchall():
            answered = self._dt(last_event) if last_event is not None else None
            if count is not None and answered is not None and answered >= self._dt(first):
                rebuild.append((c, p))
                continue
            fresh = [t for t in new[(c, p)] if answered is None or t > answered]
            if not fresh:
                continue
            if count is not None:
                fresh_span = [*fresh, self._dt(first), self._dt(last)]
            else:
                fresh_span = fresh
            upsert.append(
                (
                    c,
                    p,
                    (count or 0) + len(fresh),
                    self._ts(min(fresh_span)),
                    self._ts(max(fresh_span)),
                )
            )
        if rebuild:
            cur.executemany(
                self._sql("DELETE FROM nextbest_exposure WHERE customer_id = ? AND product_id = ?"),
                rebuild,
            )
            cur.executemany(
                self._sql(_EXPOSURE_REBUILD.format(where="i.customer_id = ? AND i.product_id = ?")),
                rebuild,
            )
        if upsert:
            cur.executemany(
                self._sql(
                    f"INSERT INTO nextbest_exposure ({_EXPOSURE_COLUMNS}) VALUES (?, ?, ?, ?, ?) "
                    "ON CONFLICT (customer_id, product_id) DO UPDATE SET shown = excluded.shown, "
                    "first_shown = excluded.first_shown, last_shown = excluded.last_shown"
                ),
                upsert,
            )

    def impressions(
        self, customer_ids: Sequence[str] | None = None, since: dt.datetime | None = None
    ) -> list[Impression]:
        """Stored impressions (of the given customers, default everyone; shown at or after
        `since`, naive UTC, default ever), oldest first."""
        where, params = [], []
        if customer_ids is not None:
            ids = sorted({c for c in customer_ids if isinstance(c, str) and c})
            if not ids:
                return []
            subquery, param = self._id_set(ids)
            where.append(f"customer_id IN ({subquery})")
            params.append(param)
        if since is not None:
            where.append("shown_at >= ?")
            params.append(self._ts(since))
        sql = f"SELECT {_IMPRESSION_COLUMNS} FROM nextbest_impressions"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._read() as cur:
            cur.execute(self._sql(sql + " ORDER BY shown_at, customer_id, rank"), tuple(params))
            rows = cur.fetchall()
        return [self._impression(row) for row in rows]

    def _fatigue_params(self, ids: Any, since: dt.datetime) -> list:
        """The parameters of `_FATIGUE`."""
        at = self._ts(since)
        return [ids, at, at, ids, at, at]

    def _impression(self, row: Sequence[Any]) -> Impression:
        c, p, ch, at, e, v, a, r, m, why = row
        return Impression(
            c, p, ch, self._dt(at), e or "", v or "", a or "", int(r or 0), m or "", why or ""
        )

    def unanswered_impressions(
        self, customer_ids: Sequence[str], since: dt.datetime
    ) -> dict[str, dict[str, int]]:
        """customer → product → times shown since `since` (on any channel) after the customer's
        last event on that product (a click, view, cart, purchase ... answers an impression)."""
        ids = sorted({c for c in customer_ids if isinstance(c, str) and c})
        if not ids:
            return {}
        subquery, param = self._id_set(ids)
        out: dict[str, dict[str, int]] = {}
        with self._read() as cur:
            cur.execute(
                self._sql(_FATIGUE.format(head="", mid="", tail="", ids=subquery)),
                self._fatigue_params(param, since),
            )
            for customer, product, count in cur.fetchall():
                out.setdefault(customer, {})[product] = int(count)
        return out

    def events(self, customer_ids: Sequence[str] | None = None) -> pa.Table:
        """Stored events (EVENT_SCHEMA) of the given customers (default: everyone), ordered by
        timestamp, then by insertion."""
        sql = f"SELECT {_EVENT_COLUMNS} FROM nextbest_events"
        params: tuple = ()
        if customer_ids is not None:
            ids = sorted({c for c in customer_ids if isinstance(c, str) and c})
            if not ids:
                return _NO_EVENTS
            subquery, param = self._id_set(ids)
            sql += f" WHERE customer_id IN ({subquery})"
            params = (param,)
        with self._read() as cur:
            cur.execute(self._sql(sql + ' ORDER BY "timestamp", id'), params)
            return self._event_table(cur.fetchall())

    def _event_table(self, rows: list[tuple]) -> pa.Table:
        """EVENT_SCHEMA rows (in `_EVENT_COLUMNS` order) as a table."""
        if not rows:
            return _NO_EVENTS
        cols = list(zip(*rows, strict=True))
        arrays = [
            pa.array(cols[0], pa.string()),
            pa.array(cols[1], pa.string()),
            self._ts_arrow(list(cols[2])),
            pa.array(cols[3], pa.string()),
            pa.array(cols[4], pa.float64()),
            pa.array(cols[5], pa.float64()),
            pa.array(cols[6], pa.string()),
        ]
        return pa.Table.from_arrays(arrays, schema=EVENT_SCHEMA)

    def customer_reads(
        self,
        customer_ids: Sequence[str],
        default_allow: bool,
        *,
        purchases_since: dt.datetime,
        impressions_since: dt.datetime | None,
    ) -> CustomerReads:
        """`consent_state`, `erased`, the purchases and returns of `events` from
        `purchases_since` on, and (unless None) `unanswered_impressions` since
        `impressions_since`, of a batch of customers in one query: what a served call needs, in
        one round trip (with PostgreSQL) and one statement (with SQLite)."""
        ids = sorted({c for c in customer_ids if isinstance(c, str) and c})
        if not ids:
            return CustomerReads(
                ConsentState(default_allow=bool(default_allow)), {}, _NO_EVENTS, {}
            )
        subquery, param = self._id_set(ids)
        # One row shape for the four: (kind, customer, 3 texts, 2 numbers, a time, event id).
        # The events come first: their typed columns type the NULLs of the others (PostgreSQL).
        parts = [
            "SELECT 2, customer_id, product_id, event_type, channel, quantity, value, "
            f'"timestamp", id FROM nextbest_events WHERE customer_id IN ({subquery}) '
            'AND event_type IN (?, ?) AND "timestamp" >= ?',
            "SELECT 0, customer_id, purpose, NULL, NULL, CAST(granted AS INTEGER), NULL, NULL, 0 "
            f"FROM nextbest_consent WHERE customer_id IN ({subquery})",
            "SELECT 1, customer_id, NULL, NULL, NULL, NULL, NULL, erased_at, 0 "
            f"FROM nextbest_tombstones WHERE customer_id IN ({subquery})",
        ]
        params: list = [param, "purchase", "return", self._ts(purchases_since), param, param]
        if impressions_since is not None:
            parts.append(
                _FATIGUE.format(
                    head="3, ", mid="NULL, NULL, ", tail=", NULL, NULL, 0", ids=subquery
                )
            )
            params += self._fatigue_params(param, impressions_since)
        with self._read() as cur:
            cur.execute(self._sql(" UNION ALL ".join(parts) + " ORDER BY 1, 8, 9"), params)
            rows = cur.fetchall()
        granted: dict[str, dict[str, bool]] = {}
        erased: dict[str, dt.datetime] = {}
        shown: dict[str, dict[str, int]] = {}
        events = []
        for row in rows:
            kind = row[0]
            if kind == 2:
                events.append(row)
            elif kind == 0:
                granted.setdefault(row[2], {})[row[1]] = bool(row[5])
            elif kind == 1:
                erased[row[1]] = self._dt(row[7])
            else:
                shown.setdefault(row[1], {})[row[2]] = int(row[5])
        return CustomerReads(
            ConsentState(default_allow=bool(default_allow), granted=granted),
            erased,
            self._event_table([(r[1], r[2], r[7], r[3], r[5], r[6], r[4]) for r in events]),
            shown,
        )

    # -- the customer data export (export.py) --------------------------------------------------

    def record_access(
        self, customer_id: str, *, what: str, client: str, source: str
    ) -> AccessRecord:
        """Write one request for a customer's data to the access log (durable before it
        returns). Erasure deletes the customer's rows like their consent audit; the rows of
        requests made after it stay (who asked, when)."""
        _check_customer(customer_id)
        _check_source(source)
        record = AccessRecord(customer_id, _now(), what, client, source)
        with self._write() as cur:
            cur.execute(
                self._sql(
                    "INSERT INTO nextbest_access_log (customer_id, requested_at, what, client, "
                    "source) VALUES (?, ?, ?, ?, ?)"
                ),
                (customer_id, self._ts(record.requested_at), what, client, source),
            )
        return record

    def access_log(self, customer_id: str) -> list[AccessRecord]:
        """The requests for the customer's data, oldest first."""
        _check_customer(customer_id)
        with self._read() as cur:
            cur.execute(
                self._sql(
                    "SELECT requested_at, what, client, source FROM nextbest_access_log "
                    "WHERE customer_id = ? ORDER BY requested_at, id"
                ),
                (customer_id,),
            )
            rows = cur.fetchall()
        return [AccessRecord(customer_id, self._dt(at), w, c, s) for at, w, c, s in rows]

    def tombstone(self, customer_id: str) -> tuple[dt.datetime, str] | None:
        """(erased_at, source) of the customer's tombstone, None when never erased."""
        _check_customer(customer_id)
        with self._read() as cur:
            cur.execute(
                self._sql(
                    "SELECT erased_at, source FROM nextbest_tombstones WHERE customer_id = ?"
                ),
                (customer_id,),
            )
            row = cur.fetchone()
        return None if row is None else (self._dt(row[0]), row[1])

    def events_page(self, customer_id: str, after: int, limit: int) -> tuple[list[tuple], int]:
        """Up to `limit` of the customer's stored events with an id above `after`, in insertion
        order, as (product_id, timestamp, event_type, quantity, value, channel) rows, and the
        id to pass as `after` for the next page (-1 after the last page)."""
        _check_customer(customer_id)
        with self._read() as cur:
            cur.execute(
                self._sql(
                    'SELECT id, product_id, "timestamp", event_type, quantity, value, channel '
                    "FROM nextbest_events WHERE customer_id = ? AND id > ? ORDER BY id LIMIT ?"
                ),
                (customer_id, after, limit),
            )
            rows = cur.fetchall()
        page = [(p, self._dt(t), k, q, v, c) for _, p, t, k, q, v, c in rows]
        return page, (rows[-1][0] if len(rows) == limit else -1)

    def impressions_page(
        self, customer_id: str, offset: int, limit: int
    ) -> tuple[list[Impression], int]:
        """Up to `limit` of what the customer was shown, from row `offset` in order of time
        (then product and channel), and the offset of the next page (-1 after the last page).
        New impressions come after every earlier one, so pages of a growing table neither
        repeat nor skip a row."""
        _check_customer(customer_id)
        with self._read() as cur:
            cur.execute(
                self._sql(
                    f"SELECT {_IMPRESSION_COLUMNS} FROM nextbest_impressions "
                    "WHERE customer_id = ? ORDER BY shown_at, product_id, channel "
                    "LIMIT ? OFFSET ?"
                ),
                (customer_id, limit, offset),
            )
            rows = cur.fetchall()
        page = [self._impression(row) for row in rows]
        return page, (offset + limit if len(rows) == limit else -1)


def _opt_bool(value: object) -> bool | None:
    return None if value is None else bool(value)


def _latest_per_key(consent: pa.Table) -> pa.Table:
    """The last row per (customer_id, purpose) by `updated_at`, then by row order."""
    rows = consent.append_column("__row", pa.array(np.arange(consent.num_rows)))
    rows = rows.sort_by([("updated_at", "ascending"), ("__row", "ascending")])
    latest = rows.group_by(["customer_id", "purpose"], use_threads=False).aggregate(
        [("granted", "last"), ("updated_at", "last")]
    )
    return latest.rename_columns(
        {"granted_last": "granted", "updated_at_last": "updated_at"}
    ).select(list(_IMPORT_COLUMNS))


def _drop_erased(events: pa.Table, erased: dict[str, dt.datetime]) -> pa.Table:
    """Events without those of erased customers dated at or before their erasure."""
    replayed = erased_rows(
        events["customer_id"].combine_chunks(), events["timestamp"].combine_chunks(), erased
    )
    return events.filter(pa.array(~replayed))


# --- SQLite --------------------------------------------------------------------------------------


class SqliteStore(Store):
    """A store in one SQLite file: WAL mode, `synchronous=FULL`, writers serialized by
    `BEGIN IMMEDIATE`, readers concurrent."""

    _types = {
        "id": "INTEGER PRIMARY KEY",
        "ts": "INTEGER",
        "bool": "INTEGER",
        "float": "REAL",
        "strict": " STRICT",
    }
    _temp = "temp"

    def _existing(self, cur: Any, names: Sequence[str]) -> set[str]:
        marks = ", ".join("?" * len(names))
        cur.execute(f"SELECT name FROM sqlite_master WHERE name IN ({marks})", tuple(names))
        return {row[0] for row in cur.fetchall()}

    def _add_column(self, cur: Any, table: str, column: str, kind: str) -> None:
        cur.execute(f"PRAGMA table_info({table})")
        if column not in {row[1] for row in cur.fetchall()}:
            cur.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")

    def __init__(self, url: str, path: Path) -> None:
        self.path = path
        super().__init__(url)

    def _driver_error(self) -> type[Exception]:
        return sqlite3.Error

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, timeout=30.0, isolation_level=None, check_same_thread=False
            )
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            conn.execute("PRAGMA synchronous=FULL")
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{self.url}: cannot open the database: {_first_line(exc)}") from None
        if str(mode).lower() != "wal":
            conn.close()
            raise StoreError(f"{self.url}: cannot use WAL mode (journal mode stays {mode})")
        return conn

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Cursor]:
        cur = conn.cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        finally:
            cur.close()

    def _ts(self, value: dt.datetime) -> int:
        return (value - _EPOCH) // _MICRO

    def _dt(self, value: Any) -> dt.datetime:
        return _EPOCH + dt.timedelta(microseconds=int(value))

    def _ts_list(self, arr: pa.Array) -> list:
        return arr.cast(pa.int64()).to_pylist()

    def _ts_arrow(self, values: list) -> pa.Array:
        return pa.array(values, pa.int64()).cast(pa.timestamp("us"))

    def _id_set(self, ids: Sequence[str]) -> tuple[str, Any]:
        return "SELECT j.value FROM json_each(?) AS j", json.dumps(list(ids))

    def _key_set(self, keys: Sequence[tuple[str, str]]) -> tuple[str, list]:
        return (
            "SELECT json_extract(j.value, '$[0]') AS c, json_extract(j.value, '$[1]') AS p "
            "FROM json_each(?) AS j",
            [json.dumps([list(k) for k in keys])],
        )


# --- PostgreSQL ----------------------------------------------------------------------------------


class PostgresStore(Store):
    """A store in a PostgreSQL database (optionally one schema of it), shared by replicas.

    Writers of one customer are serialized by a transaction-level advisory lock; a consent import
    locks the consent table against other consent writers, an erasure the events table against
    event writers, so no write can slip between an erasure's deletes and its tombstone.
    """

    _types = {
        "id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "ts": "TIMESTAMP",
        "bool": "BOOLEAN",
        "float": "DOUBLE PRECISION",
        "strict": "",
    }
    _temp = "pg_temp"

    def _add_column(self, cur: Any, table: str, column: str, kind: str) -> None:
        cur.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column} {kind}")

    def _existing(self, cur: Any, names: Sequence[str]) -> set[str]:
        cur.execute(
            "SELECT relname FROM pg_class WHERE relnamespace = current_schema()::regnamespace "
            "AND relname = ANY(%s)",
            (list(names),),
        )
        return {row[0] for row in cur.fetchall()}

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        query = parse_qsl(parts.query, keep_blank_values=True)
        schemas = [v for k, v in query if k == "schema"]
        self.schema = schemas[-1] if schemas else None
        if self.schema is not None and not _IDENT.fullmatch(self.schema):
            raise ConfigError(f"{_redact(url)}: schema {self.schema!r} is not a plain identifier")
        query = [(k, v) for k, v in query if k != "schema"]
        if not any(k == "connect_timeout" for k, _ in query):
            query.append(("connect_timeout", "10"))
        self._conninfo = urlunsplit(parts._replace(query=urlencode(query, quote_via=quote)))
        super().__init__(url)

    def _driver_error(self) -> type[Exception]:
        import psycopg

        return psycopg.Error

    def _is_broken(self, conn: Any) -> bool:
        return bool(conn.closed or conn.broken)

    def _is_stale(self, conn: Any) -> bool:
        """Broken, or readable while idle: between calls the server sends nothing (no LISTEN),
        so input means it closed the connection (EOF) or is closing it (an admin shutdown, an
        idle timeout); psycopg would only find out by failing the next query."""
        if self._is_broken(conn):
            return True
        try:
            return _readable(conn.fileno())
        except Exception:  # noqa: BLE001 - no usable socket: stale
            return True

    def _connect(self) -> Any:
        import psycopg
        from psycopg import sql

        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise StoreError(f"{self.url}: cannot reach the database: {_first_line(exc)}") from None
        # psycopg prepares a statement at its 5th use; PostgreSQL would still plan it anew at
        # every call (custom plans), which cost more than running the serving path's one query
        # (0.5 against 0.2 ms for the fatigue read of one customer). Every frequent statement
        # here is an index lookup by customer, so one generic plan fits every parameter.
        conn.execute("SET plan_cache_mode = force_generic_plan")
        if self.schema is not None:
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LOCK_NAMESPACE,))
                    exists = conn.execute(
                        "SELECT 1 FROM pg_namespace WHERE nspname = %s", (self.schema,)
                    ).fetchone()
                    if exists is None:
                        conn.execute(
                            sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(self.schema))
                        )
                conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
            except psycopg.Error as exc:
                conn.close()
                raise StoreError(
                    f"{self.url}: cannot use schema {self.schema!r}: {_first_line(exc)}"
                ) from None
        return conn

    @contextmanager
    def _transaction(self, conn: Any) -> Iterator[Any]:
        with conn.transaction(), conn.cursor() as cur:
            yield cur

    def _create_schema(self, cur: Any) -> None:
        cur.execute("SELECT pg_advisory_xact_lock(%s, 0)", (_LOCK_NAMESPACE,))
        super()._create_schema(cur)

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s")

    def _id_set(self, ids: Sequence[str]) -> tuple[str, Any]:
        return "SELECT unnest(?::text[])", list(ids)

    def _key_set(self, keys: Sequence[tuple[str, str]]) -> tuple[str, list]:
        return (
            "SELECT unnest(?::text[]) AS c, unnest(?::text[]) AS p",
            [[k[0] for k in keys], [k[1] for k in keys]],
        )

    def _lock(self, cur: Any, table: str, mode: str) -> None:
        cur.execute(f"LOCK TABLE {table} IN {mode} MODE")

    def _lock_customer(self, cur: Any, customer_id: str) -> None:
        cur.execute(
            "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (_LOCK_NAMESPACE, customer_id)
        )

    def _copy(self, cur: Any, table: str, columns: str, rows: list[tuple]) -> None:
        with cur.copy(f"COPY {table} ({columns}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)


def _readable(fd: int) -> bool:
    """Whether `fd` has input (or EOF, or an error) now, without waiting."""
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLERR | select.POLLHUP)
        return bool(poller.poll(0))
    readable, _, errors = select.select([fd], [], [fd], 0)
    return bool(readable or errors)


# --- opening -------------------------------------------------------------------------------------

_SQLITE_SUFFIXES = (".db", ".sqlite", ".sqlite3")


def store_exists(url: str) -> bool:
    """Whether `url` names a store that may hold data: a PostgreSQL URL, or an SQLite file that
    exists (a missing file holds nothing: no tombstones, no events)."""
    url = url.strip()
    if url.lower().startswith(("postgresql://", "postgres://")):
        return True
    path = url.split("://", 1)[1][1:] if url.lower().startswith("sqlite://") else url
    return Path(path).is_file()


def open_store(url: str) -> Store:
    """Open (creating the tables if missing) the store at `url`: `sqlite:///path.db`, a bare
    `*.db`/`*.sqlite` path, or `postgresql://user@host:port/db[?schema=NAME]`."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError("store URL: must not be empty")
    url = url.strip()
    scheme = url.split(":", 1)[0].lower() if "://" in url else ""
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(url)
    if scheme == "sqlite":
        path = url.split("://", 1)[1]
        if not path.startswith("/") or path in ("/", "/:memory:"):
            raise ConfigError(
                f"{url}: expected sqlite:///relative/path.db or sqlite:////absolute/path.db "
                "(an in-memory database is not durable)"
            )
        return SqliteStore(url, Path(path[1:]))
    if not scheme and url.lower().endswith(_SQLITE_SUFFIXES):
        return SqliteStore(url, Path(url))
    raise ConfigError(
        f"{_redact(url)}: unknown store URL (expected sqlite:///path.db, a .db file or "
        "postgresql://user@host:port/db)"
    )
