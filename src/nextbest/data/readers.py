"""Readers for the SPEC §2 input formats (CSV or Parquet), with the bad-input rules.

A file that cannot be used at all (missing, empty, a required column absent) raises `DataError` with
a one-line message naming the file and column. Rows that cannot be used are rejected and counted by
reason, never dropped silently; `rejects_path` writes them out with their reason and row number, and
a run fails with `RejectShareError` when the rejected share passes `max_reject_share`.

Every reader returns `(table, report)`: a pyarrow table with the canonical column names and types
listed in its `*_SCHEMA`, and a `ReadReport` with the counts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from nextbest.errors import DataError, RejectShareError

__all__ = [
    "ReadReport",
    "EVENT_SCHEMA",
    "CATALOG_SCHEMA",
    "CONSENT_SCHEMA",
    "CONTENT_SCHEMA",
    "CONTENT_KINDS",
    "PURPOSES",
    "read_events",
    "read_catalog",
    "read_content",
    "read_consent",
    "read_customer_ids",
    "write_table",
]

logger = logging.getLogger(__name__)

PURPOSES = ("personalization", "behavioral", "sensitive")
CONTENT_KINDS = ("guide", "article", "video", "newsletter")
RETURN = "return"
PURCHASE = "purchase"

EVENT_SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("product_id", pa.string()),
        ("timestamp", pa.timestamp("us")),
        ("event_type", pa.string()),
        ("quantity", pa.float64()),
        ("value", pa.float64()),
        ("channel", pa.string()),
    ]
)
CATALOG_SCHEMA = pa.schema(
    [
        ("product_id", pa.string()),
        ("title", pa.string()),
        ("category", pa.string()),
        ("department", pa.string()),
        ("product_type", pa.string()),
        ("price", pa.float64()),
        ("available", pa.bool_()),
        ("sensitivity", pa.float64()),
        ("repurchase_days", pa.float64()),
    ]
)
CONTENT_SCHEMA = pa.schema(
    [
        ("content_id", pa.string()),
        ("title", pa.string()),
        ("kind", pa.string()),
        ("product_ids", pa.list_(pa.string())),
        ("categories", pa.list_(pa.string())),
        ("sensitivity", pa.float64()),
        ("published_at", pa.timestamp("us")),
    ]
)
CONSENT_SCHEMA = pa.schema(
    [
        ("customer_id", pa.string()),
        ("purpose", pa.string()),
        ("granted", pa.bool_()),
        ("updated_at", pa.timestamp("us")),
    ]
)


@dataclass
class ReadReport:
    """What reading one file did: rows read, kept and rejected by reason."""

    path: str
    rows_read: int = 0
    rows_kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v:,}" for k, v in sorted(self.rejected.items())) or "none"
        return (
            f"{self.path}: read {self.rows_read:,} rows, kept {self.rows_kept:,}, "
            f"rejected {self.rows_rejected:,} ({reasons})"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "rows_read": self.rows_read,
            "rows_kept": self.rows_kept,
            "rejected": dict(sorted(self.rejected.items())),
        }


# --- raw reading -------------------------------------------------------------------------------


def _read_raw(path: str | Path) -> pa.Table:
    """The file as a table; CSV columns all as strings so that each value is checked by us."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    name = path.name.lower()
    try:
        if name.endswith(".parquet") or name.endswith(".pq"):
            table = pq.read_table(path)
        elif name.endswith((".csv", ".csv.gz", ".txt")):
            # Peek at the header so that every column is read as a string.
            header = pacsv.open_csv(path).schema.names
            table = pacsv.read_csv(
                path,
                convert_options=pacsv.ConvertOptions(
                    column_types={n: pa.string() for n in header},
                    strings_can_be_null=False,
                    null_values=[],
                ),
            )
        else:
            raise DataError(f"{path}: unsupported file type (expected .csv, .csv.gz or .parquet)")
    except (pa.ArrowInvalid, OSError) as exc:
        if isinstance(exc, pa.ArrowInvalid) and "Empty CSV file" in str(exc):
            raise DataError(f"{path}: file is empty") from None
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{path}: cannot be read: {first_line}") from None
    table = table.rename_columns([c.strip().lower() for c in table.column_names])
    if table.num_rows == 0:
        raise DataError(f"{path}: file has no data rows")
    return table


# --- column parsers: (raw column) -> (typed array with nulls, mask of bad values) ---------------

Parsed = tuple[pa.Array, np.ndarray]


def _as_string(col: pa.ChunkedArray) -> pa.Array:
    arr = col.combine_chunks()
    if pa.types.is_floating(arr.type):
        # Integer ids stored as floats (1234.0) keep their integer spelling.
        as_int = pc.cast(arr, pa.int64(), safe=False)
        if pc.all(
            pc.or_kleene(pc.equal(pc.cast(as_int, pa.float64()), arr), pc.is_null(arr))
        ).as_py():
            arr = as_int
    if not pa.types.is_string(arr.type):
        arr = pc.cast(arr, pa.string())
    return pc.utf8_trim_whitespace(arr)


def _null_mask(arr: pa.Array) -> np.ndarray:
    return pc.is_null(arr).to_numpy(zero_copy_only=False)


def parse_id(col: pa.ChunkedArray) -> Parsed:
    """Identifiers: trimmed strings; empty or null is bad."""
    arr = _as_string(col)
    arr = pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)
    return arr, _null_mask(arr)


def parse_text(col: pa.ChunkedArray) -> Parsed:
    """Free text: trimmed strings, empty becomes null; never bad."""
    arr = _as_string(col)
    arr = pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)
    return arr, np.zeros(len(arr), dtype=bool)


_TIME_FORMATS = ("%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d", "%Y/%m/%d %H:%M:%S")
_ZONED_FORMATS = ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z")


def parse_timestamp(col: pa.ChunkedArray) -> Parsed:
    """Timestamps (ISO 8601 and common variants) as naive UTC microseconds; unparseable is bad."""
    arr = col.combine_chunks()
    if pa.types.is_timestamp(arr.type):
        if arr.type.tz is not None:
            arr = pc.cast(arr, pa.timestamp(arr.type.unit, tz="UTC"))
            arr = pa.Array.from_buffers(
                pa.timestamp(arr.type.unit), len(arr), arr.buffers(), null_count=arr.null_count
            )
        out = pc.cast(arr, pa.timestamp("us"))
        return out, _null_mask(out)
    if pa.types.is_date(arr.type):
        out = pc.cast(pc.cast(arr, pa.timestamp("s")), pa.timestamp("us"))
        return out, _null_mask(out)
    text = _as_string(col)
    zoned = pc.match_substring_regex(text, r"(Z|[+-]\d\d:?\d\d)$")
    naive_part = _cast_time(pc.if_else(zoned, pa.scalar(None, pa.string()), text), None)
    zoned_part = _cast_time(pc.if_else(zoned, text, pa.scalar(None, pa.string())), "UTC")
    out = pc.coalesce(naive_part, zoned_part)
    return out, _null_mask(out)


def _cast_time(text: pa.Array, tz: str | None) -> pa.Array:
    """Strings → naive UTC timestamps: a fast cast, else format by format (failures → null)."""
    try:
        out = pc.cast(text, pa.timestamp("us", tz=tz))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        formats = _ZONED_FORMATS if tz else _TIME_FORMATS
        parsed = [pc.strptime(text, format=f, unit="us", error_is_null=True) for f in formats]
        out = (
            pc.coalesce(*parsed)
            if tz is None
            else pc.coalesce(*[pc.cast(p, pa.timestamp("us", tz="UTC")) for p in parsed])
        )
    if tz is not None:
        out = pc.cast(pc.cast(out, pa.int64()), pa.timestamp("us"))  # UTC wall clock
    return out


def parse_float(col: pa.ChunkedArray, *, default: float | None = None) -> Parsed:
    """Numbers; empty takes `default` (null when None); unparseable or non-finite is bad."""
    arr = col.combine_chunks()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        text = pc.utf8_trim_whitespace(arr)
        empty = pc.equal(text, "").to_numpy(zero_copy_only=False)
        ok = pc.match_substring_regex(text, r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$").to_numpy(
            zero_copy_only=False
        )
        cleaned = pc.if_else(pa.array(ok), text, pa.scalar(None, pa.string()))
        values = pc.cast(cleaned, pa.float64())
        bad = ~ok & ~empty
    else:
        values = pc.cast(arr, pa.float64())
        empty = _null_mask(values)
        bad = np.zeros(len(values), dtype=bool)
    np_values = values.to_numpy(zero_copy_only=False).astype(np.float64)
    bad |= ~np.isfinite(np_values) & ~empty
    if default is not None:
        np_values = np.where(empty, default, np_values)
        empty = np.zeros_like(empty)
    return pa.array(np_values, mask=empty | bad), bad


_TRUE = ("true", "1", "yes", "y", "t")
_FALSE = ("false", "0", "no", "n", "f")


def parse_bool(col: pa.ChunkedArray, *, default: bool | None = None) -> Parsed:
    """Booleans spelled true/false, 1/0, yes/no; empty takes `default`; anything else is bad."""
    arr = col.combine_chunks()
    if pa.types.is_boolean(arr.type):
        values, empty = arr, _null_mask(arr)
        bad = np.zeros(len(arr), dtype=bool)
    else:
        text = pc.utf8_lower(_as_string(col))
        is_true = pc.is_in(text, pa.array(_TRUE)).to_numpy(zero_copy_only=False)
        is_false = pc.is_in(text, pa.array(_FALSE)).to_numpy(zero_copy_only=False)
        empty = pc.or_kleene(pc.is_null(text), pc.equal(text, "")).to_numpy(zero_copy_only=False)
        bad = ~is_true & ~is_false & ~empty
        values = pa.array(is_true, mask=~(is_true | is_false))
    if default is not None:
        values = pc.fill_null(values, default)
        empty = np.zeros(len(values), dtype=bool)
    return values, bad


def _string_lists(lists: pa.Array) -> pa.Array:
    """list<string> with every value trimmed, empty and null values dropped, null lists empty."""
    n = len(lists)
    flat = pc.list_flatten(lists)
    parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    values = _as_string(pa.chunked_array([flat], flat.type))
    keep = pc.fill_null(pc.not_equal(values, ""), False)
    values = values.filter(keep)
    counts = np.bincount(parent[keep.to_numpy(zero_copy_only=False)], minlength=n)
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def parse_list(col: pa.ChunkedArray, *, sep: str = "|") -> Parsed:
    """Lists of strings: a list column, or one string with values separated by `sep`.

    Values are trimmed, empty values dropped; an empty or null cell is an empty list. Never bad.
    """
    arr = col.combine_chunks()
    t = arr.type
    if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)):
        arr = pc.split_pattern(_as_string(col), sep)
    out = _string_lists(arr)
    return out, np.zeros(len(out), dtype=bool)


def parse_optional_timestamp(col: pa.ChunkedArray) -> Parsed:
    """Like `parse_timestamp`, but an empty or null value is null, not bad."""
    arr = col.combine_chunks()
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        arr = _as_string(col)
        arr = pc.if_else(pc.equal(arr, ""), pa.scalar(None, pa.string()), arr)
    empty = _null_mask(arr)
    values, bad = parse_timestamp(pa.chunked_array([arr], arr.type))
    return values, bad & ~empty


# --- the generic checked read --------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    parse: Callable[[pa.ChunkedArray], Parsed]
    bad_reason: str
    required: bool = False
    type: pa.DataType = pa.string()


def _checked_read(
    path: str | Path, columns: list[Column], aliases: dict[str, str] | None = None
) -> tuple[dict[str, pa.Array], pa.Table, dict[str, np.ndarray]]:
    """Parse each known column; return typed columns, the raw table and per-reason bad masks."""
    raw = _read_raw(path)
    for alias, name in (aliases or {}).items():
        if alias in raw.column_names and name not in raw.column_names:
            raw = raw.rename_columns([name if c == alias else c for c in raw.column_names])
    n = raw.num_rows
    typed: dict[str, pa.Array] = {}
    reasons: dict[str, np.ndarray] = {}
    for spec in columns:
        if spec.name not in raw.column_names:
            if spec.required:
                raise DataError(f"{path}: missing required column '{spec.name}'")
            typed[spec.name] = pa.nulls(n, spec.type)
            continue
        values, bad = spec.parse(raw.column(spec.name))
        typed[spec.name] = values
        if bad.any():
            reasons[spec.bad_reason] = reasons.get(spec.bad_reason, np.zeros(n, bool)) | bad
    return typed, raw, reasons


def _finish(
    path: str | Path,
    schema: pa.Schema,
    typed: dict[str, pa.Array],
    raw: pa.Table,
    reasons: dict[str, np.ndarray],
    *,
    rejects_path: str | Path | None,
    max_reject_share: float | None,
) -> tuple[pa.Table, ReadReport]:
    """Apply reject masks in order (first reason wins), report, write rejects, enforce the share."""
    n = raw.num_rows
    rejected = np.zeros(n, dtype=bool)
    reason_of = np.full(n, "", dtype=object)
    report = ReadReport(path=str(path), rows_read=n)
    for reason, mask in reasons.items():
        new = mask & ~rejected
        count = int(new.sum())
        if count:
            report.rejected[reason] = count
            reason_of[new] = reason
            rejected |= new
    keep = ~rejected
    table = pa.table({name: typed[name] for name in schema.names}, schema=schema)
    table = table.filter(pa.array(keep))
    report.rows_kept = table.num_rows
    if rejects_path is not None and rejected.any():
        idx = np.flatnonzero(rejected)
        bad_rows = raw.take(pa.array(idx))
        bad_rows = bad_rows.append_column("row", pa.array(idx + 1, pa.int64()))
        bad_rows = bad_rows.append_column("reason", pa.array(reason_of[idx].tolist(), pa.string()))
        write_table(bad_rows, rejects_path)
        logger.info("wrote %d rejected rows of %s to %s", len(idx), path, rejects_path)
    if max_reject_share is not None and n and report.rows_rejected / n > max_reject_share:
        reasons_done = report.rejected.items()
        raise RejectShareError(
            f"{path}: {report.rows_rejected / n:.1%} of {n:,} rows rejected, more than the "
            f"limit {max_reject_share:.1%} ({', '.join(f'{k} {v:,}' for k, v in reasons_done)})"
        )
    return table, report


def _duplicates(table_columns: dict[str, pa.Array], names: list[str]) -> np.ndarray:
    """Rows equal on `names` to an earlier row.

    Each row gets a 64-bit hash of its values (strings through dictionary codes, nulls as their
    own value); a stable sort by hash puts equal rows next to each other in file order, and
    neighbours are then compared value by value, so a hash collision can never mark a row that
    differs.
    """
    keys: list[np.ndarray] = []
    for c in names:
        arr = table_columns[c]
        if pa.types.is_string(arr.type):
            arr = pc.dictionary_encode(arr).indices
        elif pa.types.is_timestamp(arr.type):
            arr = pc.cast(arr, pa.int64())
        elif pa.types.is_boolean(arr.type):
            arr = pc.cast(arr, pa.int8())
        null = pc.is_null(arr).to_numpy(zero_copy_only=False)
        keys.append(pc.fill_null(arr, 0).to_numpy(zero_copy_only=False))
        if null.any():
            keys.append(null)
    n = len(keys[0])
    row_hash = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for k in keys:
            bits = np.ascontiguousarray(k).astype(np.float64 if k.dtype.kind == "f" else np.int64)
            row_hash ^= (
                bits.view(np.uint64)
                + np.uint64(0x9E3779B97F4A7C15)
                + (row_hash << np.uint64(6))
                + (row_hash >> np.uint64(2))
            )
            row_hash *= np.uint64(0xBF58476D1CE4E5B9)
    order = np.argsort(row_hash, kind="stable")
    same = row_hash[order][1:] == row_hash[order][:-1]
    for k in keys:
        ks = k[order]
        same &= ks[1:] == ks[:-1]
    dup = np.zeros(n, dtype=bool)
    dup[order[1:][same]] = True
    return dup


# --- the readers -------------------------------------------------------------------------------


def read_events(
    path: str | Path,
    *,
    event_types: tuple[str, ...] = ("purchase", "return", "cart", "view", "email_click"),
    known_products: pa.Array | None = None,
    rejects_path: str | Path | None = None,
    max_reject_share: float | None = None,
) -> tuple[pa.Table, ReadReport]:
    """Read an events file (SPEC §2) into EVENT_SCHEMA.

    Reject reasons: missing_customer_id, missing_product_id, bad_timestamp, bad_quantity,
    negative_quantity, zero_quantity, bad_value, unknown_event_type, unknown_product (when
    `known_products` is given) and duplicate (a row equal to an earlier one in every column).
    Event types are lower-cased; a missing or empty type means purchase, a missing quantity means 1.
    """
    columns = [
        Column("customer_id", parse_id, "missing_customer_id", required=True),
        Column("product_id", parse_id, "missing_product_id", required=True),
        Column("timestamp", parse_timestamp, "bad_timestamp", True, pa.timestamp("us")),
        Column("event_type", parse_text, "unknown_event_type"),
        Column(
            "quantity", lambda c: parse_float(c, default=1.0), "bad_quantity", False, pa.float64()
        ),
        Column("value", parse_float, "bad_value", False, pa.float64()),
        Column("channel", parse_text, "bad_channel"),
    ]
    typed, raw, reasons = _checked_read(path, columns)
    n = raw.num_rows
    if "quantity" not in raw.column_names:
        typed["quantity"] = pa.array(np.ones(n))
    etype = pc.utf8_lower(pc.fill_null(typed["event_type"], PURCHASE))
    typed["event_type"] = etype
    unknown = ~pc.is_in(etype, pa.array(list(event_types))).to_numpy(zero_copy_only=False)
    reasons["unknown_event_type"] = unknown
    qty = typed["quantity"].to_numpy(zero_copy_only=False)
    reasons["negative_quantity"] = np.nan_to_num(qty, nan=1.0) < 0
    reasons["zero_quantity"] = np.nan_to_num(qty, nan=1.0) == 0
    if known_products is not None:
        unknown_p = ~pc.is_in(typed["product_id"], known_products).to_numpy(zero_copy_only=False)
        reasons["unknown_product"] = unknown_p & ~_null_mask(typed["product_id"])
    reasons["duplicate"] = _duplicates(typed, EVENT_SCHEMA.names)
    return _finish(
        path,
        EVENT_SCHEMA,
        typed,
        raw,
        reasons,
        rejects_path=rejects_path,
        max_reject_share=max_reject_share,
    )


def read_catalog(
    path: str | Path,
    *,
    rejects_path: str | Path | None = None,
    max_reject_share: float | None = None,
) -> tuple[pa.Table, ReadReport]:
    """Read a catalog file (SPEC §2) into CATALOG_SCHEMA.

    Reject reasons: missing_product_id, bad_price, bad_available, bad_sensitivity (not in [0, 1]),
    bad_repurchase_days (not > 0) and duplicate_product (a product id seen on an earlier row).
    A missing `available` means available; a missing sensitivity means 0 (unless its category is
    listed as sensitive in the config).
    """
    columns = [
        Column("product_id", parse_id, "missing_product_id", required=True),
        Column("title", parse_text, "bad_title"),
        Column("category", parse_text, "bad_category"),
        Column("department", parse_text, "bad_department"),
        Column("product_type", parse_text, "bad_product_type"),
        Column("price", parse_float, "bad_price", False, pa.float64()),
        Column(
            "available", lambda c: parse_bool(c, default=True), "bad_available", False, pa.bool_()
        ),
        Column("sensitivity", parse_float, "bad_sensitivity", False, pa.float64()),
        Column("repurchase_days", parse_float, "bad_repurchase_days", False, pa.float64()),
    ]
    typed, raw, reasons = _checked_read(path, columns, aliases={"name": "title"})
    n = raw.num_rows
    if "available" not in raw.column_names:
        typed["available"] = pa.array(np.ones(n, dtype=bool))
    sens = typed["sensitivity"].to_numpy(zero_copy_only=False)
    reasons["bad_sensitivity"] = reasons.get("bad_sensitivity", np.zeros(n, bool)) | (
        (sens < 0) | (sens > 1)
    )
    typed["sensitivity"] = pc.fill_null(typed["sensitivity"], 0.0)
    days = typed["repurchase_days"].to_numpy(zero_copy_only=False)
    reasons["bad_repurchase_days"] = reasons.get("bad_repurchase_days", np.zeros(n, bool)) | (
        days <= 0
    )
    price = typed["price"].to_numpy(zero_copy_only=False)
    reasons["bad_price"] = reasons.get("bad_price", np.zeros(n, bool)) | (price < 0)
    reasons["duplicate_product"] = _duplicates(typed, ["product_id"]) & ~_null_mask(
        typed["product_id"]
    )
    return _finish(
        path,
        CATALOG_SCHEMA,
        typed,
        raw,
        reasons,
        rejects_path=rejects_path,
        max_reject_share=max_reject_share,
    )


def read_content(
    path: str | Path,
    *,
    rejects_path: str | Path | None = None,
    max_reject_share: float | None = None,
) -> tuple[pa.Table, ReadReport]:
    """Read a content file (SPEC §2) into CONTENT_SCHEMA.

    `content_id` and `title` are required. `kind` is lower-cased, empty means article, and must be
    one of CONTENT_KINDS. `product_ids` and `categories` are lists: in CSV one string with values
    separated by "|" (trimmed, empty values dropped), in Parquet a list column or such a string;
    missing or empty means an empty list. `sensitivity` is in [0, 1] (empty means 0); an empty
    `published_at` is null.

    Reject reasons: missing_content_id, missing_title, bad_sensitivity, bad_published_at,
    unknown_kind and duplicate_content (a content id seen on an earlier row). Linked products are
    not checked against a catalog here.
    """
    columns = [
        Column("content_id", parse_id, "missing_content_id", required=True),
        Column("title", parse_id, "missing_title", required=True),
        Column("kind", parse_text, "unknown_kind"),
        Column("product_ids", parse_list, "bad_product_ids", False, pa.list_(pa.string())),
        Column("categories", parse_list, "bad_categories", False, pa.list_(pa.string())),
        Column(
            "sensitivity",
            lambda c: parse_float(c, default=0.0),
            "bad_sensitivity",
            False,
            pa.float64(),
        ),
        Column(
            "published_at", parse_optional_timestamp, "bad_published_at", False, pa.timestamp("us")
        ),
    ]
    typed, raw, reasons = _checked_read(path, columns)
    n = raw.num_rows
    for name in ("product_ids", "categories"):
        if name not in raw.column_names:
            typed[name] = _string_lists(pa.nulls(n, pa.list_(pa.string())))
    if "sensitivity" not in raw.column_names:
        typed["sensitivity"] = pa.array(np.zeros(n))
    sens = typed["sensitivity"].to_numpy(zero_copy_only=False)
    reasons["bad_sensitivity"] = reasons.get("bad_sensitivity", np.zeros(n, bool)) | (
        (sens < 0) | (sens > 1)
    )
    kind = pc.utf8_lower(pc.fill_null(typed["kind"], "article"))
    typed["kind"] = kind
    reasons["unknown_kind"] = ~pc.is_in(kind, pa.array(CONTENT_KINDS)).to_numpy(
        zero_copy_only=False
    )
    reasons["duplicate_content"] = _duplicates(typed, ["content_id"]) & ~_null_mask(
        typed["content_id"]
    )
    return _finish(
        path,
        CONTENT_SCHEMA,
        typed,
        raw,
        reasons,
        rejects_path=rejects_path,
        max_reject_share=max_reject_share,
    )


def read_consent(
    path: str | Path,
    *,
    rejects_path: str | Path | None = None,
    max_reject_share: float | None = None,
) -> tuple[pa.Table, ReadReport]:
    """Read a consent file (SPEC §2: customer_id, purpose, granted, updated_at).

    Reject reasons: missing_customer_id, unknown_purpose, bad_granted, bad_timestamp, duplicate.
    """
    columns = [
        Column("customer_id", parse_id, "missing_customer_id", required=True),
        Column("purpose", parse_text, "unknown_purpose", required=True),
        Column("granted", parse_bool, "bad_granted", True, pa.bool_()),
        Column("updated_at", parse_timestamp, "bad_timestamp", True, pa.timestamp("us")),
    ]
    typed, raw, reasons = _checked_read(path, columns)
    typed["purpose"] = pc.utf8_lower(typed["purpose"])
    known = pc.is_in(typed["purpose"], pa.array(list(PURPOSES))).to_numpy(zero_copy_only=False)
    reasons["unknown_purpose"] = ~known
    reasons["bad_granted"] = reasons.get("bad_granted", np.zeros(raw.num_rows, bool)) | _null_mask(
        typed["granted"]
    )
    reasons["duplicate"] = _duplicates(typed, CONSENT_SCHEMA.names)
    return _finish(
        path,
        CONSENT_SCHEMA,
        typed,
        raw,
        reasons,
        rejects_path=rejects_path,
        max_reject_share=max_reject_share,
    )


def read_customer_ids(path: str | Path) -> tuple[pa.Array, ReadReport]:
    """A file with a `customer_id` column (customers to recommend for, erased customers)."""
    typed, raw, reasons = _checked_read(
        path, [Column("customer_id", parse_id, "missing_customer_id", required=True)]
    )
    table, report = _finish(
        path,
        pa.schema([("customer_id", pa.string())]),
        typed,
        raw,
        reasons,
        rejects_path=None,
        max_reject_share=None,
    )
    return table.column("customer_id").combine_chunks(), report


def write_table(table: pa.Table, path: str | Path) -> None:
    """Write a table as Parquet or CSV, by the file name's extension."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.lower().endswith((".parquet", ".pq")):
        pq.write_table(table, path)
    elif path.name.lower().endswith(".csv"):
        pacsv.write_csv(_lists_joined(table), path)
    else:
        raise DataError(f"{path}: unsupported output type (expected .csv or .parquet)")


def _lists_joined(table: pa.Table, sep: str = "|") -> pa.Table:
    """List columns as one string per cell, values separated by `sep` (CSV has no lists)."""
    for i, f in enumerate(table.schema):
        if pa.types.is_list(f.type) or pa.types.is_large_list(f.type):
            values = pc.cast(table.column(i), pa.list_(pa.string()))
            table = table.set_column(i, f.name, pc.binary_join(values, sep))
    return table
