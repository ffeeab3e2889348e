"""Events.RecordEvents through the real server: recorded purchases leave the next answer, a new
customer becomes personal through ALS fold-in, consent gates what is stored, bad input, and
`nextbest train --store` learns from recorded events."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

import grpc
import pytest
from conftest import served_settings, store_url, train
from google.protobuf.timestamp_pb2 import Timestamp

from nextbest.server import create_server
from nextbest.store.artifacts import load_bundle
from nextbest.store.consent_store import open_store
from nextbest.v1 import events_pb2 as epb
from nextbest.v1 import events_pb2_grpc as erpc
from nextbest.v1 import recommender_pb2 as pb
from nextbest.v1 import recommender_pb2_grpc as rpb


@pytest.fixture
def server(own):
    running = create_server(served_settings(own, own / "models"))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield erpc.EventsStub(channel), rpb.RecommenderStub(channel)
    channel.close()
    running.stop(0)


def record(events, *rows, **fields):
    return events.RecordEvents(
        epb.RecordEventsRequest(events=[epb.Event(**r) for r in rows], **fields), timeout=10
    )


def recommend(stub, customer_id, limit=10):
    return stub.RecommendProducts(
        pb.RecommendProductsRequest(customer_id=customer_id, limit=limit), timeout=10
    )


def test_a_recorded_purchase_leaves_the_next_answer(server):
    events, stub = server
    before = recommend(stub, "c004")
    new = [i.product_id for i in before.items if i.reasons[0].kind == pb.REASON_KIND_BOUGHT_RELATED]
    assert new, "the answer must hold products the customer never bought"
    got = record(events, {"customer_id": "c004", "product_id": new[0], "channel": "web"})
    assert (got.recorded, got.ignored_without_consent) == (1, 0)
    after = recommend(stub, "c004")
    assert after.personalized
    assert new[0] not in [i.product_id for i in after.items]
    assert [i.product_id for i in after.items if i.product_id != new[0]][:5] == [
        i.product_id for i in before.items if i.product_id != new[0]
    ][:5]


def test_a_new_customer_becomes_personal_from_recorded_purchases(server):
    events, stub = server
    first = recommend(stub, "newcomer")
    assert not first.personalized
    assert first.not_personalized_reason == pb.NOT_PERSONALIZED_REASON_UNKNOWN_CUSTOMER
    bought = ["p002", "p004", "p008", "p012"]
    got = record(events, *({"customer_id": "newcomer", "product_id": p} for p in bought))
    assert got.recorded == 4
    resp = recommend(stub, "newcomer", limit=8)
    assert resp.personalized and len(resp.items) == 8
    ids = [i.product_id for i in resp.items]
    assert not set(ids) & set(bought)
    assert all(i.reasons[0].kind == pb.REASON_KIND_BOUGHT_RELATED for i in resp.items)
    assert {i.reasons[0].product_id for i in resp.items} <= set(bought)
    assert all(i.reasons[0].text.startswith("because you bought Product ") for i in resp.items)
    scores = [i.score for i in resp.items]
    assert scores == sorted(scores, reverse=True) and all(0 < s <= 1 for s in scores)
    assert ids != [i.product_id for i in first.items]


def test_consent_decides_what_is_stored(server, own):
    events, _ = server
    got = record(
        events,
        {"customer_id": "c001", "product_id": "p003"},  # c001: no personalization consent
        {"customer_id": "c002", "product_id": "p003", "event_type": "view"},
        {"customer_id": "c002", "product_id": "p005", "event_type": "return"},
    )
    assert (got.recorded, got.ignored_without_consent) == (2, 1)
    store = open_store(store_url(own))
    try:
        assert store.events(["c001"]).num_rows == 0
        assert store.events(["c002"]).num_rows == 2
    finally:
        store.close()


def test_unknown_products_are_stored_and_reported(server):
    events, _ = server
    got = record(events, {"customer_id": "c003", "product_id": "brand-new-product"})
    assert got.recorded == 1 and list(got.unknown_product_ids) == ["brand-new-product"]


BAD = [
    ([], "events"),
    ([{"product_id": "p1"}], "events[0].customer_id"),
    ([{"customer_id": "c1"}], "events[0].product_id"),
    (
        [{"customer_id": "c1", "product_id": "p1"}, {"customer_id": "x" * 129, "product_id": "p"}],
        "events[1].customer_id",
    ),
    ([{"customer_id": "c1", "product_id": "p1", "event_type": "like"}], "events[0].event_type"),
    ([{"customer_id": "c1", "product_id": "p1", "quantity": 0}], "events[0].quantity"),
    ([{"customer_id": "c1", "product_id": "p1", "quantity": -2}], "events[0].quantity"),
    ([{"customer_id": "c1", "product_id": "p1", "channel": "c" * 33}], "events[0].channel"),
    ([{"customer_id": "c1", "product_id": "p1"}] * 1001, "events"),
]


@pytest.mark.parametrize(("rows", "field"), BAD)
def test_bad_events_are_refused_whole(server, own, rows, field):
    events, _ = server
    with pytest.raises(grpc.RpcError) as info:
        record(events, *rows)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().startswith(field)
    store = open_store(store_url(own))
    try:
        assert store.events(["c1"]).num_rows == 0
    finally:
        store.close()


def test_timestamps_are_kept(server, own):
    events, _ = server
    when = Timestamp(seconds=1_800_000_000)
    record(events, {"customer_id": "c009", "product_id": "p011", "timestamp": when})
    store = open_store(store_url(own))
    try:
        table = store.events(["c009"])
    finally:
        store.close()
    assert table.num_rows == 1
    assert table["timestamp"][0].as_py() == when.ToDatetime()


def test_training_with_the_store_learns_recorded_customers(server, own):
    events, _ = server
    when = Timestamp()
    when.FromDatetime(dt.datetime(2024, 4, 30, 12))  # the events file ends on 2024-04-29
    rows = [
        {"customer_id": "store-only", "product_id": p, "timestamp": when}
        for p in ("p002", "p004", "p006")
    ]
    assert record(events, *rows).recorded == 3
    version = train(own, own / "models", "--store", store_url(own))
    bundle = load_bundle(own / "models", version)
    assert "store-only" in set(bundle.user_ids.tolist())
    assert bundle.reference_day == pytest.approx(to_day(dt.datetime(2024, 4, 30, 12)))


def to_day(at: dt.datetime) -> float:
    return (at - dt.datetime(1970, 1, 1)) / dt.timedelta(days=1)


def test_recorded_events_far_after_the_events_file_do_not_move_the_models_clock(server, own):
    """A replay of historic data through RecordEvents without timestamps: the events are dated
    by the server's clock, years after the events file; the trainer leaves them out (a warning
    names the store) instead of moving the model's clock (serve.clock = "model") to today."""
    events, _ = server
    before = load_bundle(own / "models")
    rows = [{"customer_id": "replayed", "product_id": p} for p in ("p002", "p004", "p006")]
    assert record(events, *rows).recorded == 3
    cmd = [sys.executable, "-m", "nextbest.cli", "train", "--config", str(own / "nextbest.toml")]
    cmd += ["--events", str(own / "events.parquet"), "--catalog", str(own / "catalog.csv")]
    cmd += ["--models-dir", str(own / "models"), "--store", store_url(own), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"{store_url(own)}: 3 recorded events dated after 2024-07-" in done.stderr
    assert "train.max_store_lead_days = 90" in done.stderr
    bundle = load_bundle(own / "models")
    assert bundle.version != before.version
    assert bundle.reference_day == before.reference_day  # the events file's newest event
    assert "replayed" not in set(bundle.user_ids.tolist())
    assert bundle.manifest["data"]["store_events_beyond_lead"] == 3
    # A longer lead takes them, and the clock moves with them.
    env = {**os.environ, "NEXTBEST_TRAIN__MAX_STORE_LEAD_DAYS": "100000"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    bundle = load_bundle(own / "models")
    assert "replayed" in set(bundle.user_ids.tolist())
    assert bundle.reference_day > before.reference_day + 365


def test_fatigue_demotes_products_shown_again_and_again_until_answered(own):
    settings = served_settings(own, own / "models").with_overrides(
        "policy", fatigue_demotion=0.5, fatigue_impressions=2, fatigue_days=7.0
    )
    running = create_server(settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = rpb.RecommenderStub(channel)
            first = stub.RecommendProducts(
                pb.RecommendProductsRequest(customer_id="c004", limit=5), timeout=10
            )
            assert not any("fatigue" in d for d in first.decisions)
            running.impressions.flush()
            second = stub.RecommendProducts(
                pb.RecommendProductsRequest(customer_id="c004", limit=5, channel=pb.CHANNEL_WEB),
                timeout=10,
            )
            assert [i.product_id for i in second.items] == [i.product_id for i in first.items]
            running.impressions.flush()
            # Shown twice (email, web): demoted on any channel, with the reason said.
            third = stub.RecommendProducts(
                pb.RecommendProductsRequest(customer_id="c004", limit=5, channel=pb.CHANNEL_APP),
                timeout=10,
            )
            assert any("demoted for fatigue" in d for d in third.decisions)
            tired = {
                i.product_id: i
                for i in third.items
                if any(r.kind == pb.REASON_KIND_FATIGUE for r in i.reasons)
            }
            fresh = [i.product_id for i in third.items if i.product_id not in tired]
            assert fresh, "new products must come up while the shown ones are demoted"
            assert not set(fresh) & {i.product_id for i in first.items}
            for item in tired.values():
                fatigue = next(r for r in item.reasons if r.kind == pb.REASON_KIND_FATIGUE)
                assert fatigue.text.startswith("shown 2 times in 7 days")
            # A click answers the impressions: the clicked product is no longer demoted.
            clicked = first.items[0].product_id
            erpc.EventsStub(channel).RecordEvents(
                epb.RecordEventsRequest(
                    events=[
                        epb.Event(customer_id="c004", product_id=clicked, event_type="email_click")
                    ]
                ),
                timeout=10,
            )
            running.impressions.flush()
            fourth = stub.RecommendProducts(
                pb.RecommendProductsRequest(customer_id="c004", limit=10), timeout=10
            )
            again = next((i for i in fourth.items if i.product_id == clicked), None)
            assert again is not None
            assert not any(r.kind == pb.REASON_KIND_FATIGUE for r in again.reasons)
            # Nothing is kept of what customers without consent (or unknown) were shown.
            for customer in ("c001", "someone-new"):
                stub.RecommendProducts(pb.RecommendProductsRequest(customer_id=customer))
            running.impressions.flush()
            seen = running.store.unanswered_impressions(
                ["c001", "someone-new", "c004"], since=dt.datetime(2000, 1, 1)
            )
            assert set(seen) == {"c004"}
    finally:
        running.stop(0)
