"""Consent.ExportCustomerData through the real server, on SQLite and PostgreSQL: the export is
valid against its JSON Schema and equals, field by field, what plain SQL finds in the store and
numpy finds in the model files; after ForgetCustomer it holds only the tombstone; it needs the
`consent` role; every export is in the access log; bad requests name the field; `nextbest
consent export` writes the same document."""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import jsonschema
import numpy as np
import pyarrow.parquet as pq
import pytest
import test_lifecycle
from conftest import PG_URL, served_settings, store_url
from test_security import TOKENS, Pki, secure_settings

from nextbest.client import Client
from nextbest.export import SCHEMA_PATH
from nextbest.server import create_server
from nextbest.store.artifacts import current_version
from nextbest.v1 import consent_pb2, consent_pb2_grpc, events_pb2
from nextbest.v1 import lifecycle_pb2 as lpb

lifecycle_running = test_lifecycle.lifecycle_running  # the fixture: a model with lifecycle state
SCHEMA = json.loads(SCHEMA_PATH.read_text())
EPOCH = dt.datetime(1970, 1, 1)
PURPOSES = ("personalization", "behavioral", "sensitive")
HEADER = {"schema_version", "customer_id", "exported_at", "requested_by", "tombstone"}


def validate(document: dict) -> None:
    jsonschema.Draft202012Validator.check_schema(SCHEMA)
    jsonschema.Draft202012Validator(SCHEMA).validate(document)


def iso(value) -> str | None:
    """A stored time (SQLite: integer microseconds; PostgreSQL: a datetime) as ISO 8601 Z."""
    if value is None:
        return None
    if isinstance(value, int):
        value = EPOCH + dt.timedelta(microseconds=value)
    return value.isoformat(timespec="microseconds") + "Z"


class Sql:
    """Plain SQL on the store's database, without nextbest's store code."""

    def __init__(self, url: str):
        if url.startswith("sqlite:///"):
            self.conn = sqlite3.connect(url[len("sqlite:///") :])
            self.mark = "?"
        else:
            import psycopg

            schema = url.split("schema=")[1]
            self.conn = psycopg.connect(PG_URL, autocommit=True)
            self.conn.execute(f"SET search_path TO {schema}")
            self.mark = "%s"

    def rows(self, sql: str, *params) -> list[tuple]:
        return list(self.conn.execute(sql.replace("?", self.mark), params).fetchall())

    def close(self) -> None:
        self.conn.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request, own):
    url = store_url(own) if request.param == "sqlite" else request.getfixturevalue("pg_store_url")
    running = create_server(served_settings(own, own / "models").with_overrides("serve", store=url))
    sql = Sql(url)
    yield running, sql, own
    sql.close()
    running.stop(0)


def record_history(nb: Client, customer: str) -> None:
    """Consent changes, events (more than one page of them) and impressions of `customer`."""
    nb.set_consent(customer, "sensitive", True, source="preference-centre")
    nb.set_consent(customer, "behavioral", False, source="preference-centre")
    nb.set_consent(customer, "behavioral", True, source="crm-import")
    at = dt.datetime(2024, 5, 2, 9, 30, 0, 123456)
    purchases = [
        events_pb2.Event(customer_id=customer, product_id=p, event_type=kind, channel=ch)
        for p, kind, ch in (("p002", "purchase", "web"), ("p004", "return", ""))
    ]
    purchases[0].timestamp.FromDatetime(at)
    purchases[0].quantity = 2.0
    nb.record_events(purchases)
    views = [
        events_pb2.Event(customer_id=customer, product_id=f"p{k % 40:03d}", event_type="view")
        for k in range(1200)
    ]
    nb.record_events(views[:1000])
    nb.record_events(views[1000:])
    nb.recommend(customer, limit=4, channel="web")
    nb.recommend(customer, limit=3, channel="email")


def test_export_equals_the_store_and_the_model_files_field_by_field(server):
    running, sql, own = server
    customer = "c004"
    with Client(f"127.0.0.1:{running.port}") as nb:
        record_history(nb, customer)
        running.impressions.flush()
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            chunks = list(
                consent_pb2_grpc.ConsentStub(ch).ExportCustomerData(
                    consent_pb2.ExportCustomerDataRequest(customer_id=customer, source="dpo"),
                    timeout=30,
                )
            )
        doc = nb.export(customer, source="dpo-test")
        state = nb.customer_state(customer)
    validate(doc)
    assert [c.section for c in chunks if c.section == "events" and c.page].__len__() >= 2
    assert doc["schema_version"] == 1 and doc["customer_id"] == customer
    assert doc["requested_by"] == {"client": "", "source": "dpo-test"}
    assert doc["tombstone"] is None

    stored = {
        p: (bool(g), iso(u), s)
        for p, g, u, s in sql.rows(
            "SELECT purpose, granted, updated_at, source FROM nextbest_consent "
            "WHERE customer_id = ?",
            customer,
        )
    }
    expected = []
    for purpose in PURPOSES:  # the served config's default_consent is allow
        granted, updated, source = stored.get(purpose, (True, None, "default"))
        expected.append(
            {"purpose": purpose, "granted": granted, "updated_at": updated, "source": source}
        )
    assert doc["consent"] == expected
    assert {c["source"] for c in doc["consent"]} == {"default", "preference-centre", "crm-import"}

    audit = sql.rows(
        "SELECT purpose, old_granted, new_granted, changed_at, source FROM nextbest_consent_audit "
        "WHERE customer_id = ? ORDER BY changed_at, id",
        customer,
    )
    assert doc["consent_history"] == [
        {
            "purpose": p,
            "old_granted": None if o is None else bool(o),
            "new_granted": None if n is None else bool(n),
            "changed_at": iso(at),
            "source": s,
        }
        for p, o, n, at, s in audit
    ]
    assert len(doc["consent_history"]) == 3

    events = sql.rows(
        'SELECT product_id, "timestamp", event_type, quantity, value, channel FROM nextbest_events '
        "WHERE customer_id = ? ORDER BY id",
        customer,
    )
    assert doc["events"] == [
        {
            "product_id": p,
            "timestamp": iso(t),
            "event_type": k,
            "quantity": q,
            "value": v,
            "channel": c,
        }
        for p, t, k, q, v, c in events
    ]
    assert len(doc["events"]) == 1202
    assert doc["events"][0]["timestamp"] == "2024-05-02T09:30:00.123456Z"
    assert doc["events"][0]["quantity"] == 2.0 and doc["events"][0]["channel"] == "web"

    shown = sql.rows(
        "SELECT product_id, channel, shown_at, attribution_id, rank, model_version, reasons "
        "FROM nextbest_impressions WHERE customer_id = ? ORDER BY shown_at, product_id, channel",
        customer,
    )
    assert doc["impressions"] == [
        {
            "product_id": p,
            "channel": c,
            "shown_at": iso(at),
            "experiment": None,
            "variant": None,
            "attribution_id": a,
            "rank": r,
            "model_version": m,
            "reasons": why.split(","),
        }
        for p, c, at, a, r, m, why in shown
    ]
    assert len({i["attribution_id"] for i in doc["impressions"]}) == 2  # two answers
    assert {i["model_version"] for i in doc["impressions"]} == {running.holder.current.version}
    # No experiment configured: in none. The purchase of p002 came before anything was shown.
    assert doc["experiment_assignment"] == {
        "in_experiment": False,
        "reason": "not_in_an_experiment",
        "experiment": None,
        "variant": None,
        "control": None,
    }
    assert doc["attributions"] == []
    assert {i["channel"] for i in doc["impressions"]} == {"web", "email"}
    assert len(doc["impressions"]) == 7

    log = sql.rows(
        "SELECT requested_at, what, client, source FROM nextbest_access_log "
        "WHERE customer_id = ? ORDER BY id",
        customer,
    )
    assert [(w, c, s) for _, w, c, s in log] == [("export", "", "dpo"), ("export", "", "dpo-test")]
    assert iso(log[-1][0]) == doc["exported_at"]

    # The model files, read with numpy, and the training events they were fitted on.
    version = current_version(own / "models")
    folder = own / "models" / version
    with np.load(folder / "ids.npz", allow_pickle=False) as ids:
        row = int(np.flatnonzero(ids["user_ids"] == customer)[0])
    with np.load(folder / "history.npz", allow_pickle=False) as history:
        first, last = history["first_day"][row], history["last_day"][row]
        count, bits = int(history["events"][row]), int(history["purposes"][row])
    model = doc["model"]
    assert model["version"] == version and model["contains_customer"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert model["trained_at"] == manifest["created_at"]
    assert model["default_consent"] == manifest["consent"]["default_consent"] == "allow"
    learned = model["history"]
    assert learned["first_event_at"] == iso(EPOCH + dt.timedelta(days=float(first)))
    assert learned["last_event_at"] == iso(EPOCH + dt.timedelta(days=float(last)))
    assert learned["events"] == count
    assert learned["purposes"] == [p for k, p in enumerate(PURPOSES) if bits & (1 << k)]
    trained = [
        e for e in pq.read_table(own / "events.parquet").to_pylist() if e["customer_id"] == customer
    ]
    times = [e["timestamp"] for e in trained]
    assert count == len(trained)
    assert abs(
        dt.datetime.fromisoformat(learned["first_event_at"][:-1]) - min(times)
    ) < dt.timedelta(milliseconds=1)
    assert abs(
        dt.datetime.fromisoformat(learned["last_event_at"][:-1]) - max(times)
    ) < dt.timedelta(milliseconds=1)
    sensitive = any(e["product_id"] in ("p006", "p007") for e in trained)  # pharmacy
    assert learned["purposes"] == ["personalization"] + (["sensitive"] if sensitive else [])

    # This model has no lifecycle state (too little history to fit risk): the export says so.
    assert not state.personalized
    assert doc["lifecycle"] == {"computed": False, "reason": state.not_personalized_reason}


def test_the_lifecycle_section_is_get_customer_state(lifecycle_running):
    with Client(f"127.0.0.1:{lifecycle_running.port}") as nb:
        for customer in ("weekly-gone", "quarterly", "newbie"):
            doc = nb.export(customer, source="dpo")
            state = nb.customer_state(customer)
            validate(doc)
            life = doc["lifecycle"]
            assert life["computed"] and state.personalized
            assert life["stage"] == lpb.Stage.Name(state.stage).removeprefix("STAGE_").lower()
            assert life["churn_risk"] == pytest.approx(state.churn_risk)
            assert life["reasons"] == list(state.reasons) and len(life["reasons"]) == 3
            assert (life["risk_model"], life["horizon_days"]) == (
                state.risk_model,
                state.horizon_days,
            )
            assert life["purchase_days"] == state.purchase_days
            assert life["days_since_last_purchase"] == state.days_since_last_purchase
            assert life["expected_value"] == pytest.approx(state.expected_value)


def test_after_forget_customer_the_export_holds_only_the_tombstone(server):
    running, sql, own = server
    with Client(f"127.0.0.1:{running.port}") as nb:
        record_history(nb, "c005")
        running.impressions.flush()
        assert len(nb.export("c005", source="before")["events"]) == 1202
        nb.forget("c005", source="erasure-request")
        doc = nb.export("c005", source="after")
    validate(doc)
    assert set(doc) == HEADER
    [(erased_at, source)] = sql.rows(
        "SELECT erased_at, source FROM nextbest_tombstones WHERE customer_id = ?", "c005"
    )
    assert doc["tombstone"] == {"erased_at": iso(erased_at), "source": "erasure-request"}
    for table in (
        "nextbest_consent",
        "nextbest_events",
        "nextbest_impressions",
        "nextbest_exposure",
    ):
        assert sql.rows(f"SELECT COUNT(*) FROM {table} WHERE customer_id = ?", "c005") == [(0,)]
    # The access log: the erasure deleted the earlier requests; this one is there.
    log = sql.rows("SELECT source FROM nextbest_access_log WHERE customer_id = ?", "c005")
    assert log == [("after",)]


def test_an_unknown_customer_gets_the_defaults_and_nothing_else(running):
    with Client(f"127.0.0.1:{running.port}") as nb:
        doc = nb.export("never-seen", source="dpo")
    validate(doc)
    assert [c["source"] for c in doc["consent"]] == ["default"] * 3
    assert doc["events"] == doc["impressions"] == doc["consent_history"] == []
    assert doc["lifecycle"] == {"computed": False, "reason": "no_lifecycle_model"}
    assert doc["model"]["contains_customer"] is False and doc["model"]["history"] is None


def test_export_needs_the_consent_role(own, tmp_path):
    """On its own copy of the store: it counts the access log's rows of c002, which the
    module's other tests add to in any order."""
    (tmp_path / "pki").mkdir()
    pki = Pki(tmp_path / "pki")
    running = create_server(secure_settings(own, pki))
    try:
        address = f"127.0.0.1:{running.port}"
        with Client(address, ca=pki.ca, token=TOKENS["recommend"]) as nb:
            with pytest.raises(grpc.RpcError) as refused:
                nb.export("c002", source="dpo")
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "lacks the 'consent' role" in refused.value.details()
        with Client(address, ca=pki.ca) as anonymous:
            with pytest.raises(grpc.RpcError) as unknown:
                anonymous.export("c002", source="dpo")
            assert unknown.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert [r.source for r in running.store.access_log("c002")] == []  # refused: not logged
        with Client(address, ca=pki.ca, token=TOKENS["consent"]) as nb:
            doc = nb.export("c002", source="dpo")
        assert doc["requested_by"] == {"client": "consent-client", "source": "dpo"}
        [logged] = running.store.access_log("c002")
        assert (logged.client, logged.source, logged.what) == ("consent-client", "dpo", "export")
    finally:
        running.stop(0)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"source": "dpo"}, "customer_id is required"),
        ({"customer_id": "c002"}, "source is required"),
        ({"customer_id": "c\x00", "source": "dpo"}, "customer_id contains a control character"),
        ({"customer_id": "c" * 129, "source": "dpo"}, "customer_id is longer than 128"),
    ],
)
def test_bad_export_requests_name_the_field(running, fields, message):
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        with pytest.raises(grpc.RpcError) as info:
            list(
                consent_pb2_grpc.ConsentStub(ch).ExportCustomerData(
                    consent_pb2.ExportCustomerDataRequest(**fields), timeout=10
                )
            )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_cli_export_writes_the_same_document(running, module_own, tmp_path):
    out = tmp_path / "c002.json"
    done = subprocess.run(
        [sys.executable, "-m", "nextbest.cli", "consent", "export", "c002", "--output", str(out)]
        + ["--config", str(module_own / "nextbest.toml"), "--store", store_url(module_own)]
        + ["--models-dir", str(module_own / "models"), "--source", "dpo:cli"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"exported customer c002 to {out}: 3 consent")
    written = json.loads(Path(out).read_text())
    validate(written)
    assert written["requested_by"] == {"client": "cli", "source": "dpo:cli"}
    with Client(f"127.0.0.1:{running.port}") as nb:
        served = nb.export("c002", source="dpo")
    for key in ("exported_at", "requested_by"):
        written.pop(key), served.pop(key)
    assert written == served
    bad = subprocess.run(
        [sys.executable, "-m", "nextbest.cli", "consent", "export", "c002"]
        + ["--store", store_url(module_own), "--output", str(tmp_path / "x.txt")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "--output: export needs a .json file" in bad.stderr


def test_customer_history_says_what_each_purpose_was_used_for():
    import pyarrow as pa

    from nextbest.history import customer_history

    at = [dt.datetime(2024, 1, d) for d in (1, 2, 3, 4, 5)]
    events = pa.table(
        {
            "customer_id": ["a", "a", "b", "b", "zz"],
            "product_id": ["p1", "p2", "p1", "gone", "p1"],
            "timestamp": pa.array(at, pa.timestamp("us")),
            "event_type": ["purchase", "view", "purchase", "return", "purchase"],
        }
    )
    users, items = np.array(["a", "b", "c"]), np.array(["p1", "p2"])
    history = customer_history(events, users, items, np.array([False, True]))
    assert history.purposes_of(0) == ("personalization", "behavioral", "sensitive")
    assert history.purposes_of(1) == ("personalization",)  # "gone": unknown to the model
    assert history.purposes_of(2) == () and history.events.tolist() == [2, 2, 0]
    day = (at[0] - EPOCH) / dt.timedelta(days=1)
    assert history.first_day[0] == day and history.last_day[1] == day + 3


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_impressions_and_events_come_in_pages_without_repeats(kind, tmp_path, request):
    from nextbest.store.consent_store import open_store

    url = (
        f"sqlite:///{tmp_path / 's.db'}"
        if kind == "sqlite"
        else request.getfixturevalue("pg_store_url")
    )
    start = dt.datetime(2024, 3, 1)
    rows = [
        ("c1", f"p{k % 7}", ("email", "web", "app")[k % 3], start + dt.timedelta(seconds=k // 4))
        for k in range(2500)
    ]
    with open_store(url) as store:
        store.record_impressions(rows + [("other", "p1", "web", start)])
        pages, offset = [], 0
        while offset >= 0:
            page, offset = store.impressions_page("c1", offset, 1000)
            pages.append(page)
        assert [len(p) for p in pages] == [1000, 1000, 500]
        got = [row for page in pages for row in page]
        got = [(i.product_id, i.channel, i.shown_at) for i in got]
        assert sorted(got) == sorted((p, ch, at) for _, p, ch, at in rows)
        assert got == sorted(got, key=lambda r: (r[2], r[0], r[1]))
        assert store.events_page("c1", 0, 1000) == ([], -1)
