"""Adapters from the real public data sets in ../shared/data to SPEC §2 events, catalog and content.

Three data sets: UCI Online Retail (`online-retail`), dunnhumby The Complete Journey
(`complete-journey`) and the 5,000-customer sample of dunnhumby Let's Get Sort-of-Real (`lgsr`,
a UK grocer, 2006-2008: the check that defaults tuned on the first two hold on unseen data).

Each adapter reads with pyarrow (vectorised, no per-row Python), writes `events.parquet`,
`catalog.parquet` and `content.parquet` into the output directory, and returns a `PrepareReport`
of rows read, kept and rejected by reason.

The content is generated, not taken from the data sets (none has any): one guide per catalog
category, kind `guide`, id `guide-<slug of the category>`, titled "How to choose and use
<category> (generated guide)", linking the category's 5 best-selling products (by distinct buyers
in the prepared events). It gives the content API real ids to work with; it is not editorial.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from nextbest.data.readers import CATALOG_SCHEMA, CONTENT_SCHEMA, EVENT_SCHEMA, _duplicates
from nextbest.errors import DataError

__all__ = ["PrepareReport", "DATASETS", "generated_guides", "prepare"]


@dataclass
class PrepareReport:
    """Counts of one adapter run."""

    dataset: str
    rows_read: int = 0
    rows_kept: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    products: int = 0
    customers: int = 0
    returns: int = 0
    content: int = 0
    """Rows of the generated content (one guide per category)."""

    def summary(self) -> str:
        reasons = ", ".join(f"{k} {v:,}" for k, v in self.rejected.items()) or "none"
        return (
            f"{self.dataset}: read {self.rows_read:,} rows, kept {self.rows_kept:,} "
            f"({self.returns:,} returns), rejected {sum(self.rejected.values()):,} ({reasons}); "
            f"{self.customers:,} customers, {self.products:,} products in the catalog, "
            f"{self.content:,} generated guides in the content"
        )


def _reject(report: PrepareReport, rejected: np.ndarray, mask: np.ndarray, reason: str) -> None:
    """Mark rows of `mask` not yet rejected as rejected for `reason` (first reason wins)."""
    new = mask & ~rejected
    if new.any():
        report.rejected[reason] = report.rejected.get(reason, 0) + int(new.sum())
    rejected |= new


def _need(table: pa.Table, path: Path, columns: list[str]) -> None:
    for name in columns:
        if name not in table.column_names:
            raise DataError(f"{path}: missing required column '{name}'")


def _source_file(source: Path, name: str) -> Path:
    path = source / name
    if not path.is_file():
        raise DataError(f"{path}: file not found (is --source the data set's folder?)")
    return path


def _finish(
    report: PrepareReport, out: Path, events: pa.Table, products: pa.Table, title: pa.Array
) -> PrepareReport:
    """Catalog rows from `products` (key `k`, category, department, product_type and the median
    unit price `p_approximate_median`; every product available, not sensitive, no catalog
    repurchase interval), the generated content, the files written and the report's counts."""
    m = products.num_rows
    catalog = pa.table(
        {
            "product_id": products["k"],
            "title": title,
            "category": products["category"],
            "department": products["department"],
            "product_type": products["product_type"],
            "price": products["p_approximate_median"],
            "available": pa.array(np.ones(m, dtype=bool)),
            "sensitivity": pa.array(np.zeros(m)),
            "repurchase_days": pa.nulls(m, pa.float64()),
        }
    )
    content = generated_guides(events, catalog)
    _write(out, events, catalog, content)
    report.rows_kept = events.num_rows
    report.products = m
    report.content = content.num_rows
    report.customers = pc.count_distinct(events["customer_id"]).as_py()
    return report


def _write(out: Path, events: pa.Table, catalog: pa.Table, content: pa.Table) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(events.cast(EVENT_SCHEMA), out / "events.parquet")
    pq.write_table(catalog.cast(CATALOG_SCHEMA), out / "catalog.parquet")
    pq.write_table(content.cast(CONTENT_SCHEMA), out / "content.parquet")


GUIDE_PRODUCTS = 5


def _occurrence(values: np.ndarray) -> np.ndarray:
    """0 where a value occurs for the first time in the array, 1 the second time, and so on."""
    n = len(values)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    first = np.r_[True, ordered[1:] != ordered[:-1]]
    run_start = np.maximum.accumulate(np.where(first, np.arange(n), 0))
    out = np.empty(n, dtype=np.int64)
    out[order] = np.arange(n) - run_start
    return out


def generated_guides(events: pa.Table, catalog: pa.Table) -> pa.Table:
    """One generated guide per catalog category (CONTENT_SCHEMA), linking its best sellers.

    A category's products are ranked by distinct buyers in the purchases of `events` (ties by
    product id) and the first GUIDE_PRODUCTS are linked. Ids are `guide-<slug>`; should two
    categories share a slug, the later ones get `-2`, `-3` … Sensitivity is the category's highest
    catalog sensitivity; published_at is null.
    """
    purchases = events.filter(pc.equal(events["event_type"], "purchase"))
    buyers = purchases.group_by("product_id").aggregate([("customer_id", "count_distinct")])
    items = (
        catalog.select(["product_id", "category", "sensitivity"])
        .filter(pc.is_valid(catalog["category"]))
        .join(buyers, "product_id", join_type="left outer")
    )
    items = items.append_column(
        "buyers", pc.fill_null(items["customer_id_count_distinct"], 0)
    ).sort_by([("category", "ascending"), ("buyers", "descending"), ("product_id", "ascending")])
    rank = _occurrence(items["category"].to_numpy().astype(str))  # categories are contiguous now
    group = np.cumsum(rank == 0) - 1
    m = int(group[-1]) + 1 if len(group) else 0
    top = rank < GUIDE_PRODUCTS
    offsets = np.zeros(m + 1, dtype=np.int32)
    np.cumsum(np.bincount(group[top], minlength=m), out=offsets[1:])
    names = items["category"].combine_chunks().filter(pa.array(rank == 0))
    sensitivity = pc.fill_null(items["sensitivity"], 0.0).to_numpy()
    highest = np.zeros(m)
    np.maximum.at(highest, group, sensitivity)
    slug = pc.utf8_trim(pc.replace_substring_regex(pc.utf8_lower(names), r"[^a-z0-9]+", "-"), "-")
    slug = pc.if_else(pc.equal(slug, ""), "category", slug)
    repeat = _occurrence(slug.to_numpy(zero_copy_only=False).astype(str))
    suffix = np.where(repeat > 0, np.char.add("-", (repeat + 1).astype(str)), "")
    return pa.table(
        {
            "content_id": pc.binary_join_element_wise("guide-", slug, pa.array(suffix), ""),
            "title": pc.binary_join_element_wise(
                "How to choose and use ", names, " (generated guide)", ""
            ),
            "kind": pa.array(np.full(m, "guide")),
            "product_ids": pa.ListArray.from_arrays(
                pa.array(offsets), items["product_id"].combine_chunks().filter(pa.array(top))
            ),
            "categories": pa.ListArray.from_arrays(
                pa.array(np.arange(m + 1, dtype=np.int32)), names
            ),
            "sensitivity": pa.array(highest),
            "published_at": pa.nulls(m, pa.timestamp("us")),
        },
        schema=CONTENT_SCHEMA,
    )


def _mode_per_key(keys: pa.Array, values: pa.Array) -> pa.Table:
    """For each key, its most frequent non-null value (ties: the smallest value)."""
    t = pa.table({"k": keys, "v": values}).filter(pc.is_valid(values))
    counts = t.group_by(["k", "v"]).aggregate([("v", "count")])
    counts = counts.sort_by([("k", "ascending"), ("v_count", "descending"), ("v", "ascending")])
    first = counts.group_by("k", use_threads=False).aggregate([("v", "first")])
    return first.rename_columns(["k", "v"])


def prepare_online_retail(source: Path, out: Path) -> PrepareReport:
    """UCI Online Retail: invoices → purchases, `C` invoices → returns; stock codes → catalog.

    Rejected: rows without a customer (missing_customer_id), postage, fees and other non-product
    codes (non_product_code), zero quantities, stock adjustments (a negative quantity on a
    non-cancellation invoice: adjustment) and non-positive prices (non_positive_price). The category
    is the description's last word (e.g. HOLDER, MUG), derived here because the source has none.
    """
    path = _source_file(source, "online_retail.csv.gz")
    table = pacsv.read_csv(
        path,
        convert_options=pacsv.ConvertOptions(
            column_types={
                "InvoiceNo": pa.string(),
                "StockCode": pa.string(),
                "Description": pa.string(),
                "Quantity": pa.int64(),
                "InvoiceDate": pa.timestamp("us"),
                "UnitPrice": pa.float64(),
                "CustomerID": pa.string(),
            },
            strings_can_be_null=True,
        ),
    )
    _need(
        table,
        path,
        ["InvoiceNo", "StockCode", "Quantity", "InvoiceDate", "UnitPrice", "CustomerID"],
    )
    report = PrepareReport(dataset="online-retail", rows_read=table.num_rows)
    n = table.num_rows
    code = pc.utf8_upper(pc.utf8_trim_whitespace(table["StockCode"]))
    qty = table["Quantity"].to_numpy(zero_copy_only=False)
    price = table["UnitPrice"].to_numpy(zero_copy_only=False)
    is_return = pc.starts_with(table["InvoiceNo"], "C").to_numpy(zero_copy_only=False)
    rejected = np.zeros(n, dtype=bool)
    _reject(
        report,
        rejected,
        pc.is_null(table["CustomerID"]).to_numpy(zero_copy_only=False),
        "missing_customer_id",
    )
    product_code = pc.match_substring_regex(code, r"^\d{5}").to_numpy(zero_copy_only=False)
    _reject(report, rejected, ~product_code, "non_product_code")
    _reject(report, rejected, qty == 0, "zero_quantity")
    _reject(report, rejected, (qty < 0) & ~is_return, "adjustment")
    _reject(report, rejected, price <= 0, "non_positive_price")
    keep = pa.array(~rejected)
    kept = table.filter(keep)
    code = code.filter(keep)
    qty_k = np.abs(qty[~rejected]).astype(np.float64)
    price_k = price[~rejected]
    ret_k = is_return[~rejected]
    events = pa.table(
        {
            "customer_id": kept["CustomerID"],
            "product_id": code,
            "timestamp": kept["InvoiceDate"],
            "event_type": pa.array(np.where(ret_k, "return", "purchase")),
            "quantity": qty_k,
            "value": np.round(qty_k * price_k, 2),
            "channel": pa.nulls(kept.num_rows, pa.string()),
        }
    )
    desc = pc.utf8_trim_whitespace(kept["Description"])
    titles = _mode_per_key(code, desc)
    prices = (
        pa.table({"k": code, "p": price_k}).group_by("k").aggregate([("p", "approximate_median")])
    )
    catalog = titles.join(prices, "k", join_type="full outer").sort_by("k")
    title = catalog["v"]
    last_word = pc.utf8_upper(
        pc.struct_field(pc.extract_regex(title, r"(?P<w>[A-Za-z]+)\W*$"), [0])
    )
    catalog = pa.table(
        {
            "product_id": catalog["k"],
            "title": title,
            "category": last_word,
            "department": pa.nulls(catalog.num_rows, pa.string()),
            "product_type": pa.nulls(catalog.num_rows, pa.string()),
            "price": catalog["p_approximate_median"],
            "available": pa.array(np.ones(catalog.num_rows, dtype=bool)),
            "sensitivity": pa.array(np.zeros(catalog.num_rows)),
            "repurchase_days": pa.nulls(catalog.num_rows, pa.float64()),
        }
    )
    content = generated_guides(events, catalog)
    _write(out, events, catalog, content)
    report.rows_kept = events.num_rows
    report.returns = int(ret_k.sum())
    report.content = content.num_rows
    report.products = catalog.num_rows
    report.customers = pc.count_distinct(events["customer_id"]).as_py()
    return report


def prepare_complete_journey(source: Path, out: Path) -> PrepareReport:
    """dunnhumby Complete Journey: transactions → purchases; products → catalog with department,
    category (product_category) and type. The data set has no returns.

    Rejected: zero quantities (zero_quantity), mostly coupon and fuel adjustments, and rows whose
    product is missing from products.parquet (unknown_product). The catalog keeps every listed
    product; its price is the median unit price paid.
    """
    tpath = _source_file(source, "transactions.parquet")
    ppath = _source_file(source, "products.parquet")
    tx = pq.read_table(
        tpath,
        columns=["household_id", "product_id", "quantity", "sales_value", "transaction_timestamp"],
    )
    products = pq.read_table(
        ppath,
        columns=[
            "product_id",
            "department",
            "brand",
            "product_category",
            "product_type",
            "package_size",
        ],
    )
    report = PrepareReport(dataset="complete-journey", rows_read=tx.num_rows)
    n = tx.num_rows
    qty = tx["quantity"].to_numpy(zero_copy_only=False)
    known = pc.is_in(tx["product_id"], products["product_id"]).to_numpy(zero_copy_only=False)
    rejected = np.zeros(n, dtype=bool)
    _reject(report, rejected, qty <= 0, "zero_quantity")
    _reject(report, rejected, ~known, "unknown_product")
    kept = tx.filter(pa.array(~rejected))
    pid = pc.cast(kept["product_id"], pa.string())
    q = kept["quantity"].to_numpy().astype(np.float64)
    value = kept["sales_value"].to_numpy().astype(np.float64)
    events = pa.table(
        {
            "customer_id": pc.cast(kept["household_id"], pa.string()),
            "product_id": pid,
            "timestamp": pc.cast(kept["transaction_timestamp"], pa.timestamp("us")),
            "event_type": pa.array(np.full(kept.num_rows, "purchase")),
            "quantity": q,
            "value": value,
            "channel": pa.array(np.full(kept.num_rows, "store")),
        }
    )
    unit = (
        pa.table({"k": pid, "p": value / q}).group_by("k").aggregate([("p", "approximate_median")])
    )
    catalog = (
        pa.table(
            {
                "k": pc.cast(products["product_id"], pa.string()),
                "department": products["department"],
                "category": products["product_category"],
                "product_type": products["product_type"],
                "title": pc.binary_join_element_wise(
                    pc.fill_null(products["brand"], ""),
                    pc.fill_null(pc.utf8_lower(products["product_type"]), "product"),
                    pc.fill_null(products["package_size"], ""),
                    " ",
                ),
            }
        )
        .join(unit, "k", join_type="left outer")
        .sort_by("k")
    )
    return _finish(report, out, events, catalog, pc.utf8_trim_whitespace(catalog["title"]))


LGSR_TRANSACTION_COLUMNS = [
    "SHOP_DATE",
    "SHOP_HOUR",
    "CUST_CODE",
    "PROD_CODE",
    "QUANTITY",
    "SPEND",
]
LGSR_PRODUCT_COLUMNS = ["PROD_CODE", "PROD_CODE_10", "PROD_CODE_20", "PROD_CODE_30"]


def _read_parquet_columns(path: Path, columns: list[str]) -> pa.Table:
    """The `columns` of a Parquet file, a DataError naming the first one missing."""
    _need(pq.read_schema(path).empty_table(), path, columns)
    return pq.read_table(path, columns=columns)


def _trimmed_id(col: pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """Trimmed string ids and the mask of null or empty ones (as the readers see them)."""
    arr = pc.utf8_trim_whitespace(pc.cast(col.combine_chunks(), pa.string()))
    missing = pc.fill_null(pc.equal(arr, ""), True).to_numpy(zero_copy_only=False)
    return arr, missing


def prepare_lgsr(source: Path, out: Path) -> PrepareReport:
    """dunnhumby Let's Get Sort-of-Real (5,000-customer sample): transaction lines → purchases;
    products → catalog from the code hierarchy. The data set has no returns and no names.

    Events: CUST_CODE, PROD_CODE, QUANTITY; the timestamp is SHOP_DATE (yyyymmdd) plus SHOP_HOUR
    hours, naive like the other adapters (the shop's wall clock, no time zone conversion); value
    is SPEND (GBP) as Complete Journey's sales value; channel `store`. BASKET_ID is not read: the
    event schema has no basket column.

    Catalog: every product of products.parquet. The codes have no names, so the title is the
    product code; category is PROD_CODE_20 (the README's "department", 90 codes), department
    the next level up, PROD_CODE_30 ("group", 31 codes; PROD_CODE_40's 9 divisions are too coarse
    to filter or to mark sensitive by), product_type the level below, PROD_CODE_10 ("class", 250
    codes). This keeps Complete Journey's shape (a few dozen departments over some hundred
    categories). Price is the median unit price paid (SPEND / QUANTITY).

    Rejected: rows without a customer (missing_customer_id) or product (missing_product_id), a
    null quantity (bad_quantity), zero or negative quantities (zero_quantity,
    negative_quantity), products missing from products.parquet (unknown_product), a SHOP_DATE
    that is no yyyymmdd date or a SHOP_HOUR outside 0..23 (bad_timestamp), and lines equal to an
    earlier kept one in every event column (duplicate: the same customer buying the same quantity
    of a product for the same spend in another basket of the same hour; with no basket id in the
    events the readers would drop them as duplicates).
    """
    tpath = _source_file(source, "transactions.parquet")
    ppath = _source_file(source, "products.parquet")
    tx = _read_parquet_columns(tpath, LGSR_TRANSACTION_COLUMNS)
    products = _read_parquet_columns(ppath, LGSR_PRODUCT_COLUMNS)
    report = PrepareReport(dataset="lgsr", rows_read=tx.num_rows)
    n = tx.num_rows
    customer, no_customer = _trimmed_id(tx["CUST_CODE"])
    product, no_product = _trimmed_id(tx["PROD_CODE"])
    listed, _ = _trimmed_id(products["PROD_CODE"])
    qty_col = pc.cast(tx["QUANTITY"], pa.float64())
    qty = pc.fill_null(qty_col, 1.0).to_numpy(zero_copy_only=False)
    known = pc.fill_null(pc.is_in(product, listed), False).to_numpy(zero_copy_only=False)
    day = pc.strptime(
        pc.cast(tx["SHOP_DATE"], pa.string()), format="%Y%m%d", unit="us", error_is_null=True
    )
    hour_col = pc.cast(tx["SHOP_HOUR"], pa.int64())
    hour = pc.fill_null(hour_col, -1).to_numpy(zero_copy_only=False)
    bad_time = pc.is_null(day).to_numpy(zero_copy_only=False) | (hour < 0) | (hour > 23)
    rejected = np.zeros(n, dtype=bool)
    _reject(report, rejected, no_customer, "missing_customer_id")
    _reject(report, rejected, no_product, "missing_product_id")
    _reject(report, rejected, pc.is_null(qty_col).to_numpy(zero_copy_only=False), "bad_quantity")
    _reject(report, rejected, qty == 0, "zero_quantity")
    _reject(report, rejected, qty < 0, "negative_quantity")
    _reject(report, rejected, ~known, "unknown_product")
    _reject(report, rejected, bad_time, "bad_timestamp")
    keep = pa.array(~rejected)
    micros = pc.fill_null(pc.cast(day, pa.int64()), 0).to_numpy(zero_copy_only=False)
    stamp = micros + np.clip(hour, 0, 23) * 3_600_000_000
    value_col = pc.cast(tx["SPEND"], pa.float64()).combine_chunks()
    events = pa.table(
        {
            "customer_id": customer.filter(keep),
            "product_id": product.filter(keep),
            "timestamp": pc.cast(pa.array(stamp[~rejected]), pa.timestamp("us")),
            "event_type": pa.array(np.full(int((~rejected).sum()), "purchase")),
            "quantity": pa.array(qty[~rejected]),
            "value": value_col.filter(keep),
            "channel": pa.array(np.full(int((~rejected).sum()), "store")),
        }
    )
    dup = _duplicates(
        {c: events[c].combine_chunks() for c in EVENT_SCHEMA.names}, EVENT_SCHEMA.names
    )
    kept_rows = np.flatnonzero(~rejected)
    dup_mask = np.zeros(n, dtype=bool)
    dup_mask[kept_rows[dup]] = True
    _reject(report, rejected, dup_mask, "duplicate")
    events = events.filter(pa.array(~dup))
    unit_price = pc.divide(events["value"], events["quantity"])  # every kept quantity is > 0
    unit = (
        pa.table({"k": events["product_id"], "p": unit_price})
        .group_by("k")
        .aggregate([("p", "approximate_median")])
    )
    catalog = (
        pa.table(
            {
                "k": listed,
                "category": pc.cast(products["PROD_CODE_20"], pa.string()),
                "department": pc.cast(products["PROD_CODE_30"], pa.string()),
                "product_type": pc.cast(products["PROD_CODE_10"], pa.string()),
            }
        )
        .join(unit, "k", join_type="left outer")
        .sort_by("k")
    )
    return _finish(report, out, events, catalog, catalog["k"])


def prepare_cdnow(source: Path, out: Path) -> PrepareReport:
    """CDNOW master (Fader & Hardie; 23,570 customers of the Q1 1997 cohort, to 1998-06-30):
    whitespace-separated customer id, date (yyyymmdd), number of CDs and dollar value. The data
    has no product ids, so every purchase is of the one product `cd` (enough for the lifecycle:
    stages, churn risk and BG/NBD use purchase days and value only, not products). Timestamps
    are the dates at midnight; channel `web`.

    Rejected: a date that is no yyyymmdd date (bad_timestamp), zero or negative CDs
    (zero_quantity / negative_quantity)."""
    path = _source_file(source, "CDNOW_master.txt")
    try:
        raw = np.loadtxt(path, dtype=str, skiprows=1, ndmin=2)
    except ValueError as exc:
        raise DataError(f"{path}: not four whitespace-separated columns ({exc})") from None
    if raw.shape[1] != 4:
        raise DataError(f"{path}: {raw.shape[1]} columns, expected 4")
    report = PrepareReport(dataset="cdnow", rows_read=len(raw))
    customer, date, cds, dollars = raw.T
    when = pc.strptime(pa.array(date), format="%Y%m%d", unit="us", error_is_null=True)
    dated = when.is_valid().to_numpy(zero_copy_only=False)
    qty = np.asarray(cds, dtype=float)
    value = np.asarray(dollars, dtype=float)
    reasons = {
        "bad_timestamp": ~dated,
        "zero_quantity": dated & (qty == 0),
        "negative_quantity": dated & (qty < 0),
    }
    keep = ~np.logical_or.reduce(list(reasons.values()))
    report.rejected = {k: int(v.sum()) for k, v in reasons.items() if v.any()}
    n = int(keep.sum())
    events = pa.table(
        {
            "customer_id": pa.array(customer[keep]),
            "product_id": pa.array(np.full(n, "cd")),
            "timestamp": when.filter(pa.array(keep)),
            "event_type": pa.array(np.full(n, "purchase")),
            "quantity": pa.array(qty[keep]),
            "value": pa.array(value[keep]),
            "channel": pa.array(np.full(n, "web")),
        }
    )
    unit = value[keep] / qty[keep]
    products = pa.table(
        {
            "k": ["cd"],
            "category": ["music"],
            "department": ["music"],
            "product_type": ["cd"],
            "p_approximate_median": [float(np.median(unit)) if n else None],
        }
    )
    return _finish(report, out, events, products, pa.array(["CD"]))


DATASETS = {
    "online-retail": prepare_online_retail,
    "complete-journey": prepare_complete_journey,
    "lgsr": prepare_lgsr,
    "cdnow": prepare_cdnow,
}


def prepare(dataset: str, source: str | Path, out: str | Path) -> PrepareReport:
    """Run the adapter named `dataset` on the folder `source`, writing into `out`."""
    if dataset not in DATASETS:
        raise DataError(f"unknown data set {dataset!r} (expected {', '.join(DATASETS)})")
    source = Path(source)
    if not source.is_dir():
        raise DataError(f"{source}: --source is not a directory")
    return DATASETS[dataset](source, Path(out))
