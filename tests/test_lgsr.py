"""`nextbest prepare lgsr`: the dunnhumby Let's Get Sort-of-Real sample through the real CLI."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import SHARED_DATA

from nextbest.cli import main
from nextbest.data.adapters import DATASETS, prepare
from nextbest.data.readers import read_catalog, read_content, read_events

LGSR = SHARED_DATA / "dunnhumby_lgsr_sample"


def run_prepare(capsys, source: Path, out: Path) -> tuple[int, str, str]:
    code = main(["-q", "prepare", "lgsr", "--source", str(source), "--out", str(out)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_prepare_lgsr_real_data(tmp_path, capsys):
    code, out, err = run_prepare(capsys, LGSR, tmp_path)
    assert code == 0, err

    # Expected counts, derived here from the raw files (the README's verified counts).
    raw = pq.read_table(LGSR / "transactions.parquet")
    listed = pq.read_table(LGSR / "products.parquet")
    assert raw.num_rows == 2_441_814 and listed.num_rows == 4_997
    customers = pc.count_distinct(raw["CUST_CODE"]).as_py()
    bought = pc.count_distinct(raw["PROD_CODE"]).as_py()
    assert customers == 4_965
    # Lines equal in every event column (customer, product, date, hour, quantity, spend) to an
    # earlier one, in another basket: the adapter drops them as the readers would. Counted by a
    # lexicographic sort of the raw columns and a comparison of neighbours.
    key_columns = ["CUST_CODE", "PROD_CODE", "SHOP_DATE", "SHOP_HOUR", "QUANTITY", "SPEND"]
    keys = [
        pc.dictionary_encode(raw[c].combine_chunks()).indices.to_numpy()
        if pa.types.is_large_string(raw[c].type)
        else raw[c].to_numpy()
        for c in key_columns
    ]
    order = np.lexsort(keys[::-1])
    same = np.ones(raw.num_rows - 1, dtype=bool)
    for k in keys:
        same &= k[order][1:] == k[order][:-1]
    duplicates = int(same.sum())
    bad_quantity = int((raw["QUANTITY"].to_numpy() <= 0).sum())
    unknown = int((~pc.is_in(raw["PROD_CODE"], listed["PROD_CODE"]).to_numpy()).sum())
    assert bad_quantity == 0 and unknown == 0 and raw["CUST_CODE"].null_count == 0

    assert "lgsr: read 2,441,814 rows" in out
    kept = raw.num_rows - duplicates
    assert f"kept {kept:,} (0 returns), rejected {duplicates:,} (duplicate {duplicates:,})" in out
    assert f"{customers:,} customers, 4,997 products in the catalog" in out

    events = pq.read_table(tmp_path / "events.parquet")
    catalog = pq.read_table(tmp_path / "catalog.parquet")
    assert events.num_rows == kept
    assert pc.count_distinct(events["customer_id"]).as_py() == customers
    assert pc.count_distinct(events["product_id"]).as_py() == bought
    assert pc.unique(events["event_type"]).to_pylist() == ["purchase"]
    assert pc.unique(events["channel"]).to_pylist() == ["store"]
    assert (events["quantity"].to_numpy() > 0).all()
    first, last = pc.min_max(events["timestamp"]).values()
    assert first.as_py().date() == dt.date(2006, 4, 10)
    assert last.as_py().date() == dt.date(2008, 7, 6)
    assert first.as_py() == dt.datetime(2006, 4, 10, int(pc.min(raw["SHOP_HOUR"]).as_py()))
    # Spend carried over as the value, in total (only duplicates dropped).
    spend = pc.sum(raw["SPEND"]).as_py()
    assert pc.sum(events["value"]).as_py() == pytest.approx(spend, rel=1e-3)

    assert catalog.num_rows == 4_997
    assert catalog["product_id"].to_pylist() == sorted(listed["PROD_CODE"].to_pylist())
    assert catalog["title"].equals(catalog["product_id"])
    assert pc.count_distinct(catalog["category"]).as_py() == 90  # PROD_CODE_20
    assert pc.count_distinct(catalog["department"]).as_py() == 31  # PROD_CODE_30
    assert catalog["price"].null_count == 0 and pc.min(catalog["price"]).as_py() > 0

    # The project's own readers accept every row.
    read, report = read_events(tmp_path / "events.parquet", known_products=catalog["product_id"])
    assert report.rows_rejected == 0 and read.num_rows == kept
    read, report = read_catalog(tmp_path / "catalog.parquet")
    assert report.rows_rejected == 0 and read.num_rows == 4_997
    content, report = read_content(tmp_path / "content.parquet")
    assert report.rows_rejected == 0 and content.num_rows == 90
    assert "90 generated guides in the content" in out


def write_source(folder: Path, transactions: dict | None, products: dict | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if transactions is not None:
        pq.write_table(pa.table(transactions), folder / "transactions.parquet")
    if products is not None:
        pq.write_table(pa.table(products), folder / "products.parquet")
    return folder


def small_transactions(**override) -> dict:
    rows = {
        "SHOP_WEEK": pa.array([200801] * 6, pa.int32()),
        "SHOP_DATE": pa.array(
            [20080101, 20080101, 20080102, 20080102, 20080103, 20080103], pa.int32()
        ),
        "SHOP_HOUR": pa.array([9, 10, 11, 12, 13, 14], pa.int8()),
        "CUST_CODE": ["CUST1", "CUST1", "CUST2", "CUST2", "CUST3", None],
        "BASKET_ID": ["B1", "B2", "B3", "B4", "B5", "B6"],
        "PROD_CODE": ["PRD1", "PRD2", "PRD1", "PRD9", "PRD2", "PRD1"],
        "QUANTITY": pa.array([2, 1, 0, 1, -1, 1], pa.int32()),
        "SPEND": [3.0, 1.5, 0.0, 2.0, -1.5, 1.5],
        "STORE_CODE": ["S1"] * 6,
    }
    rows.update(override)
    return rows


SMALL_PRODUCTS = {
    "PROD_CODE": ["PRD1", "PRD2", "PRD3"],
    "PROD_CODE_10": ["CL1", "CL2", "CL3"],
    "PROD_CODE_20": ["DEP1", "DEP1", "DEP2"],
    "PROD_CODE_30": ["G1", "G1", "G1"],
    "PROD_CODE_40": ["D1", "D1", "D1"],
}


def test_lgsr_is_a_registered_dataset():
    assert "lgsr" in DATASETS


def test_missing_transactions_file_is_exit_2(tmp_path, capsys):
    source = write_source(tmp_path / "src", None, SMALL_PRODUCTS)
    code, _, err = run_prepare(capsys, source, tmp_path / "out")
    assert code == 2
    assert "transactions.parquet: file not found" in err and "Traceback" not in err


def test_missing_column_is_named(tmp_path, capsys):
    rows = small_transactions()
    del rows["SPEND"]
    source = write_source(tmp_path / "src", rows, SMALL_PRODUCTS)
    code, _, err = run_prepare(capsys, source, tmp_path / "out")
    assert code == 2
    assert "transactions.parquet: missing required column 'SPEND'" in err


def test_missing_product_column_is_named(tmp_path, capsys):
    products = {k: v for k, v in SMALL_PRODUCTS.items() if k != "PROD_CODE_20"}
    source = write_source(tmp_path / "src", small_transactions(), products)
    code, _, err = run_prepare(capsys, source, tmp_path / "out")
    assert code == 2
    assert "products.parquet: missing required column 'PROD_CODE_20'" in err


def test_bad_rows_are_rejected_by_reason(tmp_path, capsys):
    source = write_source(tmp_path / "src", small_transactions(), SMALL_PRODUCTS)
    out = tmp_path / "out"
    report = prepare("lgsr", source, out)
    assert report.rows_read == 6 and report.rows_kept == 2
    assert report.rejected == {
        "missing_customer_id": 1,
        "zero_quantity": 1,
        "negative_quantity": 1,
        "unknown_product": 1,
    }
    events = pq.read_table(out / "events.parquet")
    assert events.to_pylist() == [
        {
            "customer_id": "CUST1",
            "product_id": "PRD1",
            "timestamp": dt.datetime(2008, 1, 1, 9),
            "event_type": "purchase",
            "quantity": 2.0,
            "value": 3.0,
            "channel": "store",
        },
        {
            "customer_id": "CUST1",
            "product_id": "PRD2",
            "timestamp": dt.datetime(2008, 1, 1, 10),
            "event_type": "purchase",
            "quantity": 1.0,
            "value": 1.5,
            "channel": "store",
        },
    ]
    catalog = pq.read_table(out / "catalog.parquet").to_pylist()
    assert [(r["product_id"], r["category"], r["department"]) for r in catalog] == [
        ("PRD1", "DEP1", "G1"),
        ("PRD2", "DEP1", "G1"),
        ("PRD3", "DEP2", "G1"),
    ]
    assert [r["price"] for r in catalog] == [1.5, 1.5, None]  # unit price 3.0 / 2
    # The same run through the CLI: the summary counts every reason.
    code, stdout, err = run_prepare(capsys, source, tmp_path / "cli")
    assert code == 0, err
    assert (
        "rejected 4 (missing_customer_id 1, zero_quantity 1, negative_quantity 1, "
        "unknown_product 1)" in stdout
    )


def test_bad_timestamps_and_duplicates_are_rejected(tmp_path):
    rows = small_transactions(
        SHOP_DATE=pa.array(
            [20080101, 20080101, 20081340, 20080102, 20080101, 20080101], pa.int32()
        ),
        SHOP_HOUR=pa.array([9, 9, 11, 24, 9, 10], pa.int8()),
        CUST_CODE=["CUST1"] * 6,
        PROD_CODE=["PRD1"] * 6,
        QUANTITY=pa.array([1] * 6, pa.int32()),
        SPEND=[1.0, 1.0, 1.0, 1.0, 2.0, 1.0],
    )
    source = write_source(tmp_path / "src", rows, SMALL_PRODUCTS)
    report = prepare("lgsr", source, tmp_path / "out")
    # Row 2 repeats row 1 in another basket; row 3's date and row 4's hour are invalid.
    assert report.rejected == {"bad_timestamp": 2, "duplicate": 1}
    events = pq.read_table(tmp_path / "out" / "events.parquet")
    assert events.num_rows == report.rows_kept == 3
    assert np.array_equal(events["value"].to_numpy(), [1.0, 2.0, 1.0])
