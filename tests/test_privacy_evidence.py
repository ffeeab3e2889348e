"""SPEC §5 for every servable model (`train.cf_model` als, bpr, cosine, bm25): without sensitive
consent, sensitive purchases are no evidence. Twins with the same non-sensitive history and
different sensitive purchases, learned while sensitive consent was given and withdrawn after
training, get the same answers through the real server, whatever the model."""

from __future__ import annotations

import datetime as dt

import grpc
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from conftest import (
    SERVED_CONFIG,
    answer_only,
    served_catalog,
    served_content,
    served_settings,
    set_consent,
    synthetic_events,
    train,
)

from nextbest.server import create_server
from nextbest.store.artifacts import load_bundle
from nextbest.v1 import consent_pb2 as cpb
from nextbest.v1 import consent_pb2_grpc as crpc
from nextbest.v1 import recommender_pb2 as pb
from nextbest.v1 import recommender_pb2_grpc as rpb

SHARED = ["p002", "p004", "p012", "p020", "p024", "p002", "p004"]
"""The twins' non-sensitive purchases (one a day from 2024-02-01; some bought twice)."""
SENSITIVE = {"twin-a": ["p006", "p006", "p007"], "twin-b": ["p007"]}
"""Their sensitive (pharmacy) purchases: different, on days without another purchase."""


def twin_events() -> pa.Table:
    start = dt.datetime(2024, 2, 1, 10)
    rows = []
    for twin, sensitive in SENSITIVE.items():
        rows += [(twin, p, start + dt.timedelta(days=d)) for d, p in enumerate(SHARED)]
        rows += [(twin, p, start + dt.timedelta(days=20 + d)) for d, p in enumerate(sensitive)]
    customers, products, times = zip(*rows, strict=True)
    extra = pa.table(
        {
            "customer_id": list(customers),
            "product_id": list(products),
            "timestamp": pa.array(times, pa.timestamp("us")),
            "event_type": ["purchase"] * len(rows),
            "quantity": [1.0] * len(rows),
        }
    )
    return pa.concat_tables([synthetic_events(), extra])


def train_twins(workdir, kind: str) -> None:
    """Train a `kind` model (train.cf_model) on the twins' events with the real CLI."""
    (workdir / "nextbest.toml").write_text(
        SERVED_CONFIG.replace(
            'candidates = ["als"]', f'cf_model = "{kind}"\ncandidates = ["{kind}"]'
        )
    )
    pq.write_table(twin_events(), workdir / "events.parquet")
    pacsv.write_csv(served_catalog(), workdir / "catalog.csv")
    pacsv.write_csv(served_content(), workdir / "content.csv")
    train(workdir, workdir / "models")


@pytest.mark.parametrize("kind", ["als", "bpr", "cosine", "bm25"])
def test_sensitive_purchases_are_no_evidence_without_sensitive_consent(tmp_path, kind):
    train_twins(tmp_path, kind)
    bundle = load_bundle(tmp_path / "models")
    assert bundle.cf.kind == kind
    for twin in SENSITIVE:  # learned with their sensitive purchases (default allow)
        user = int(bundle.user_index([twin])[0])
        row = bundle.user_items.indices[
            bundle.user_items.indptr[user] : bundle.user_items.indptr[user + 1]
        ]
        assert bundle.item_sensitive[row].any()
    running = create_server(served_settings(tmp_path, tmp_path / "models"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            consent, stub = crpc.ConsentStub(channel), rpb.RecommenderStub(channel)
            for twin in SENSITIVE:
                set_consent(consent, twin, cpb.PURPOSE_SENSITIVE, False)
            for channel_kind in (pb.CHANNEL_EMAIL, pb.CHANNEL_WEB):
                a, b = (
                    answer_only(
                        stub.RecommendProducts(
                            pb.RecommendProductsRequest(
                                customer_id=twin, limit=12, channel=channel_kind
                            ),
                            timeout=10,
                        )
                    )
                    for twin in SENSITIVE
                )
                assert a.personalized and b.personalized
                a.customer_id = b.customer_id = ""
                assert a == b, kind
            contents = [
                stub.ScoreContent(
                    pb.ScoreContentRequest(
                        customer_id=twin,
                        candidates=[
                            pb.ContentCandidate(content_id=c)
                            for c in ("guide-home", "news-p020", "guide-pantry")
                        ],
                    ),
                    timeout=10,
                )
                for twin in SENSITIVE
            ]
            assert [(c.content_id, c.relevance) for c in contents[0].items] == [
                (c.content_id, c.relevance) for c in contents[1].items
            ]
    finally:
        running.stop(0)


@pytest.mark.parametrize("kind", ["bpr", "cosine", "bm25"])
def test_a_new_customer_becomes_personal_from_recorded_purchases_with_every_model(tmp_path, kind):
    """A customer the model does not know is scored from their recorded purchases as the model
    would score that history (`CFModel.history_scores`), whatever `train.cf_model` (ALS: see
    test_events.py); sensitive ones are no evidence without sensitive consent."""
    from nextbest.v1 import events_pb2 as epb
    from nextbest.v1 import events_pb2_grpc as erpc

    train_twins(tmp_path, kind)
    running = create_server(served_settings(tmp_path, tmp_path / "models"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub, events = rpb.RecommenderStub(channel), erpc.EventsStub(channel)
            consent = crpc.ConsentStub(channel)

            def ask() -> pb.RecommendProductsResponse:
                request = pb.RecommendProductsRequest(customer_id="newcomer", limit=6)
                return stub.RecommendProducts(request, timeout=10)

            assert not ask().personalized
            bought = ["p002", "p004", "p012", "p006"]  # p006: pharmacy, sensitive
            got = events.RecordEvents(
                epb.RecordEventsRequest(
                    events=[
                        epb.Event(customer_id="newcomer", product_id=p, event_type="purchase")
                        for p in bought
                    ]
                ),
                timeout=10,
            )
            assert got.recorded == 4
            answer = ask()
            assert answer.personalized, kind
            assert not {i.product_id for i in answer.items} & set(bought)
            cited = {r.product_id for i in answer.items for r in i.reasons if r.product_id}
            assert cited and cited <= set(bought)
            set_consent(consent, "newcomer", cpb.PURPOSE_SENSITIVE, False)
            plain = ask()
            assert plain.personalized
            assert "p006" not in {r.product_id for i in plain.items for r in i.reasons}
    finally:
        running.stop(0)
