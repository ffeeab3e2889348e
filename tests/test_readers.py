"""Bad-input rules of SPEC §2: one-line errors naming file and column, counted rejects."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nextbest.data.readers import (
    CONTENT_SCHEMA,
    read_catalog,
    read_consent,
    read_content,
    read_events,
)
from nextbest.errors import DataError, RejectShareError

HEADER = "customer_id,product_id,timestamp,event_type,quantity\n"


def _write(tmp_path: Path, text: str, name: str = "events.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_good_rows_are_typed(tmp_path):
    path = _write(tmp_path, HEADER + "c1,p1,2024-01-02 10:00:00,purchase,2\nc2,p2,2024-01-03,,\n")
    table, report = read_events(path)
    assert report.rows_read == 2 and report.rows_kept == 2 and report.rejected == {}
    assert table.schema.field("timestamp").type == pa.timestamp("us")
    assert table["event_type"].to_pylist() == ["purchase", "purchase"]
    assert table["quantity"].to_pylist() == [2.0, 1.0]


@pytest.mark.parametrize("missing", ["customer_id", "product_id", "timestamp"])
def test_missing_required_column_names_file_and_column(tmp_path, missing):
    cols = [c for c in ("customer_id", "product_id", "timestamp") if c != missing]
    path = _write(tmp_path, ",".join(cols) + "\n" + ",".join("x" for _ in cols) + "\n")
    with pytest.raises(DataError) as err:
        read_events(path)
    message = str(err.value)
    assert str(path) in message and f"'{missing}'" in message and "\n" not in message


def test_empty_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="events.csv: file is empty"):
        read_events(_write(tmp_path, ""))
    with pytest.raises(DataError, match="no data rows"):
        read_events(_write(tmp_path, HEADER, "header_only.csv"))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="nope.csv: file not found"):
        read_events(tmp_path / "nope.csv")


def test_bad_rows_are_counted_by_reason_and_written_out(tmp_path):
    text = HEADER + "\n".join(
        [
            "c1,p1,2024-01-02 10:00:00,purchase,1",  # good
            "c1,p1,2024-01-02 10:00:00,purchase,1",  # duplicate of the row above
            "c2,p2,not a date,purchase,1",  # bad timestamp
            "c3,p3,2024-01-02,purchase,-4",  # negative quantity
            "c4,p4,2024-01-02,purchase,0",  # zero quantity
            "c5,p5,2024-01-02,purchase,many",  # bad quantity
            ",p6,2024-01-02,purchase,1",  # no customer
            "c7,p7,2024-01-02,teleport,1",  # unknown event type
            "c8,p404,2024-01-02,purchase,1",  # unknown product
            "c9,p1,2024-01-05,return,1",  # good return
        ]
    )
    rejects = tmp_path / "rejects.csv"
    known = pa.array(["p1", "p2", "p3", "p4", "p5", "p6", "p7"])
    table, report = read_events(
        _write(tmp_path, text + "\n"), known_products=known, rejects_path=rejects
    )
    assert report.rows_read == 10
    assert report.rows_kept == 2
    assert report.rejected == {
        "duplicate": 1,
        "bad_timestamp": 1,
        "negative_quantity": 1,
        "zero_quantity": 1,
        "bad_quantity": 1,
        "missing_customer_id": 1,
        "unknown_event_type": 1,
        "unknown_product": 1,
    }
    written = pacsv.read_csv(rejects)
    assert written.num_rows == 8
    by_row = dict(zip(written["row"].to_pylist(), written["reason"].to_pylist(), strict=True))
    assert (
        by_row[2] == "duplicate" and by_row[3] == "bad_timestamp" and by_row[9] == "unknown_product"
    )
    assert "rejected 8" in report.summary()


def test_reject_share_limit_fails_the_read(tmp_path):
    text = HEADER + "c1,p1,2024-01-02,purchase,1\nc2,p2,garbage,purchase,1\n"
    path = _write(tmp_path, text)
    with pytest.raises(RejectShareError, match=r"50\.0% of 2 rows rejected.*bad_timestamp 1"):
        read_events(path, max_reject_share=0.1)
    table, report = read_events(path, max_reject_share=0.5)
    assert report.rows_kept == 1


def test_iso_timestamps_with_zone_and_parquet_integers(tmp_path):
    import pyarrow.parquet as pq

    path = tmp_path / "events.parquet"
    pq.write_table(
        pa.table(
            {
                "customer_id": pa.array([1, 2], pa.int64()),
                "product_id": pa.array([10.0, 11.0]),
                "timestamp": pa.array(["2024-01-02T10:00:00Z", "2024-01-02T12:00:00+02:00"]),
            }
        ),
        path,
    )
    table, report = read_events(path)
    assert report.rows_kept == 2
    assert table["customer_id"].to_pylist() == ["1", "2"]
    assert table["product_id"].to_pylist() == ["10", "11"]
    hours = [t.hour for t in table["timestamp"].to_pylist()]
    assert hours == [10, 10]  # both are 10:00 UTC


def test_catalog_rules(tmp_path):
    path = _write(
        tmp_path,
        "product_id,title,category,price,available,sensitivity\n"
        "p1,Tea,pantry,2.5,true,0\n"
        "p1,Tea again,pantry,2.5,true,0\n"
        "p2,Pills,pharmacy,-1,yes,1\n"
        "p3,Soap,home,1.0,maybe,0\n"
        "p4,Ointment,pharmacy,3,no,1.5\n"
        "p5,Milk,dairy,,,\n",
        "catalog.csv",
    )
    table, report = read_catalog(path)
    assert report.rejected == {
        "duplicate_product": 1,
        "bad_price": 1,
        "bad_available": 1,
        "bad_sensitivity": 1,
    }
    assert table["product_id"].to_pylist() == ["p1", "p5"]
    assert table["available"].to_pylist() == [True, True]
    assert table["sensitivity"].to_pylist() == [0.0, 0.0]
    with pytest.raises(DataError, match="catalog.csv: missing required column 'product_id'"):
        read_catalog(_write(tmp_path, "sku,title\n1,x\n", "catalog.csv"))


def test_consent_rules(tmp_path):
    path = _write(
        tmp_path,
        "customer_id,purpose,granted,updated_at\n"
        "c1,personalization,true,2024-01-01\n"
        "c1,marketing,true,2024-01-01\n"
        "c2,sensitive,perhaps,2024-01-01\n"
        "c3,Personalization,0,2024-02-01\n",
        "consent.csv",
    )
    table, report = read_consent(path)
    assert report.rejected == {"unknown_purpose": 1, "bad_granted": 1}
    assert table["purpose"].to_pylist() == ["personalization", "personalization"]
    assert table["granted"].to_pylist() == [True, False]
    with pytest.raises(DataError, match="consent.csv: missing required column 'granted'"):
        read_consent(_write(tmp_path, "customer_id,purpose,updated_at\nc,p,2024\n", "consent.csv"))


CONTENT_HEADER = "content_id,title,kind,product_ids,categories,sensitivity,published_at\n"


def test_content_rules(tmp_path):
    path = _write(
        tmp_path,
        CONTENT_HEADER + "g1,Choosing tea,Guide, p1 | p2 ||p3 ,pantry|,0.5,2024-01-02\n"
        "a1,Plain,,,,,\n"
        "v1,Podcast,podcast,p1,,0,\n"
        "s1,Too sensitive,video,,,1.5,\n"
        "s2,Not a number,video,,,high,\n"
        "t1,When,newsletter,,,,yesterday\n"
        "g1,Same id again,guide,,,,\n"
        ",No id,guide,,,,\n"
        "n1,,guide,,,,\n",
        "content.csv",
    )
    rejects = tmp_path / "rejects.csv"
    table, report = read_content(path, rejects_path=rejects)
    assert report.rejected == {
        "unknown_kind": 1,
        "bad_sensitivity": 2,
        "bad_published_at": 1,
        "duplicate_content": 1,
        "missing_content_id": 1,
        "missing_title": 1,
    }
    assert table.schema == CONTENT_SCHEMA
    assert table.to_pylist() == [
        {
            "content_id": "g1",
            "title": "Choosing tea",
            "kind": "guide",
            "product_ids": ["p1", "p2", "p3"],
            "categories": ["pantry"],
            "sensitivity": 0.5,
            "published_at": dt.datetime(2024, 1, 2),
        },
        {
            "content_id": "a1",
            "title": "Plain",
            "kind": "article",
            "product_ids": [],
            "categories": [],
            "sensitivity": 0.0,
            "published_at": None,
        },
    ]
    written = pacsv.read_csv(rejects)
    by_row = dict(zip(written["row"].to_pylist(), written["reason"].to_pylist(), strict=True))
    assert by_row == {
        3: "unknown_kind",
        4: "bad_sensitivity",
        5: "bad_sensitivity",
        6: "bad_published_at",
        7: "duplicate_content",
        8: "missing_content_id",
        9: "missing_title",
    }
    with pytest.raises(RejectShareError, match="content.csv: 77.8% of 9 rows rejected"):
        read_content(path, max_reject_share=0.5)


@pytest.mark.parametrize("missing", ["content_id", "title"])
def test_content_missing_required_column_names_file_and_column(tmp_path, missing):
    cols = [c for c in ("content_id", "title", "kind") if c != missing]
    path = _write(tmp_path, ",".join(cols) + "\n" + ",".join("x" for _ in cols) + "\n", "c.csv")
    with pytest.raises(DataError, match=f"c.csv: missing required column '{missing}'$"):
        read_content(path)


def test_content_parquet_lists_and_strings(tmp_path):
    path = tmp_path / "content.parquet"
    pq.write_table(
        pa.table(
            {
                "content_id": ["x", "y", "z", "w"],
                "title": ["X", "Y", "Z", "W"],
                "kind": ["VIDEO", "guide", None, "comic"],
                "product_ids": pa.array(
                    [[" a", "", None, "b"], None, [], ["c"]], pa.list_(pa.string())
                ),
                "categories": ["c1| c2", None, "", "c3"],
                "published_at": pa.array(
                    [None, "2024-01-01T10:00:00+02:00", "", "2024-02-01"], pa.string()
                ),
            }
        ),
        path,
    )
    rejects = tmp_path / "rejects.csv"
    table, report = read_content(path, rejects_path=rejects)
    assert report.rejected == {"unknown_kind": 1}
    assert table.schema == CONTENT_SCHEMA
    assert table["kind"].to_pylist() == ["video", "guide", "article"]
    assert table["product_ids"].to_pylist() == [["a", "b"], [], []]
    assert table["categories"].to_pylist() == [["c1", "c2"], [], []]
    assert table["published_at"].to_pylist() == [None, dt.datetime(2024, 1, 1, 8), None]
    # A rejected row with a list column still goes to a CSV rejects file ("|"-joined).
    written = pacsv.read_csv(rejects)
    assert written["product_ids"].to_pylist() == ["c"] and written["reason"][0].as_py() == (
        "unknown_kind"
    )


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", None]),
            st.integers(0, 2),
            st.sampled_from([0.5, 1.0, None]),
        ),
        min_size=1,
        max_size=40,
    )
)
def test_duplicate_detection_matches_a_plain_set(rows):
    from nextbest.data.readers import _duplicates

    names, stamps, values = zip(*rows, strict=True)
    columns = {
        "name": pa.array(names, pa.string()),
        "stamp": pa.array(stamps, pa.timestamp("us")),
        "value": pa.array(values, pa.float64()),
    }
    seen: set = set()
    expected = []
    for row in rows:
        expected.append(row in seen)
        seen.add(row)
    assert _duplicates(columns, list(columns)).tolist() == expected
