"""Recommender.ExplainRecommendation through the real server (SQLite and PostgreSQL stores): the
explanation of every item of a RecommendProducts answer agrees with it, the rule that removed an
absent product is named (one constructed customer per rule), a sensitive product is never
described to a customer without sensitive consent, and bad requests name the field."""

from __future__ import annotations

import datetime as dt
import sqlite3

import grpc
import pyarrow.parquet as pq
import pytest
from conftest import served_settings, store_url

from nextbest.server import create_server
from nextbest.store.consent_store import open_store
from nextbest.v1 import consent_pb2, consent_pb2_grpc
from nextbest.v1 import recommender_pb2 as pb
from nextbest.v1 import recommender_pb2_grpc as rpb

CHANNELS = (pb.CHANNEL_EMAIL, pb.CHANNEL_WEB, pb.CHANNEL_APP)


@pytest.fixture(params=["sqlite", "postgresql"])
def server(request, own):
    """A server over a copy of the served model, on an SQLite store (the fixture's, with its
    consent records) or a fresh PostgreSQL schema given the same consent records."""
    settings = served_settings(own, own / "models")
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_store_url")
        with open_store(url) as store:
            store.set_consent("c000", "sensitive", False, source="test")
            store.set_consent("c001", "personalization", False, source="test")
        settings = settings.with_overrides("serve", store=url)
    running = create_server(settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield rpb.RecommenderStub(channel), running
    channel.close()
    running.stop(0)


def explain(stub, customer, product, **fields):
    return stub.ExplainRecommendation(
        pb.ExplainRecommendationRequest(customer_id=customer, product_id=product, **fields),
        timeout=10,
    )


def recommend(stub, customer, **fields):
    return stub.RecommendProducts(
        pb.RecommendProductsRequest(customer_id=customer, **fields), timeout=10
    )


def test_every_item_of_an_answer_is_explained_as_the_answer_has_it(server):
    stub, running = server
    customers = [f"c{k:03d}" for k in range(0, 24)] + ["stranger"]
    checked = personal_terms = 0
    for k, customer in enumerate(customers):
        fields = {"channel": CHANNELS[k % 3], "limit": 5 + k % 6}
        if k % 4 == 1:
            fields["exclude_categories"] = ["pantry"]
        answer = recommend(stub, customer, **fields)
        for rank, item in enumerate(answer.items, 1):
            e = explain(stub, customer, item.product_id, **fields)
            assert e.in_answer and e.rank == rank and e.score == item.score, (customer, rank)
            assert e.removed_by == pb.RULE_UNSPECIFIED
            assert list(e.reasons) == list(item.reasons)
            assert e.personalized == answer.personalized
            assert e.model_version == answer.model_version
            assert (e.title, e.category) == (item.title, item.category)
            if e.HasField("terms"):
                t = e.terms
                assert t.value == pytest.approx(item.score, abs=1e-8)
                rule = (t.relevance_timeliness - t.privacy_loss) * t.trust * t.fatigue
                assert rule == pytest.approx(t.value, abs=1e-12)
                assert t.value >= t.min_value
                personal_terms += 1
            else:  # best sellers: non-personal answers and fill-ins
                assert any(r.kind == pb.REASON_KIND_POPULAR for r in item.reasons)
            checked += 1
        scores = [explain(stub, customer, i.product_id, **fields).score for i in answer.items]
        assert scores == sorted(scores, reverse=True)  # the same rank order
    assert checked > 150 and personal_terms > 100


def test_the_rule_that_removed_an_absent_product_is_named(server, workdir):
    stub, running = server
    events = pq.read_table(workdir / "events.parquet").to_pylist()
    bought = {}
    for e in events:
        bought.setdefault(e["customer_id"], set()).add(e["product_id"])

    # 1. consent: c001 withdrew personalization; a product of their own history is absent.
    answer = recommend(stub, "c001")
    shown = {i.product_id for i in answer.items}
    own = sorted(p for p in bought["c001"] - shown if p not in ("p006", "p007", "p010"))
    e = explain(stub, "c001", own[0])
    assert not e.in_answer and e.removed_by == pb.RULE_CONSENT
    assert not e.personalized and e.not_personalized_reason == pb.NOT_PERSONALIZED_REASON_NO_CONSENT

    # 2. filter: c002's first product, excluded by its category.
    first = recommend(stub, "c002", channel=pb.CHANNEL_WEB).items[0]
    e = explain(
        stub, "c002", first.product_id, channel=pb.CHANNEL_WEB, exclude_categories=[first.category]
    )
    assert e.removed_by == pb.RULE_FILTER and not e.in_answer
    e = explain(stub, "c002", first.product_id, exclude_product_ids=[first.product_id])
    assert e.removed_by == pb.RULE_FILTER

    # 3. already bought: a durable (no buyer bought it on two days) c002 bought.
    days = {}
    for e in events:
        days.setdefault((e["product_id"], e["customer_id"]), set()).add(e["timestamp"].date())
    repeated = {p for (p, _), d in days.items() if len(d) > 1}
    durables = sorted(bought["c002"] - repeated - {"p006", "p007", "p010"})
    assert durables, "the fixture must have bought durables"
    for product in durables:
        e = explain(stub, "c002", product, limit=20)
        assert e.removed_by == pb.RULE_ALREADY_BOUGHT, (product, e)
        again = explain(stub, "c002", product, limit=20, include_purchased=True)
        assert again.removed_by != pb.RULE_ALREADY_BOUGHT

    # 4. a purchase recorded since the model was trained: already bought too.
    from nextbest.v1 import events_pb2, events_pb2_grpc

    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    top = recommend(stub, "c004", limit=3).items[0].product_id
    events_pb2_grpc.EventsStub(channel).RecordEvents(
        events_pb2.RecordEventsRequest(
            events=[events_pb2.Event(customer_id="c004", product_id=top, event_type="purchase")]
        ),
        timeout=10,
    )
    channel.close()
    e = explain(stub, "c004", top, limit=3)
    assert e.removed_by == pb.RULE_ALREADY_BOUGHT and "since the model was trained" in e.detail

    # 5. unavailable: p010 is marked unavailable in the catalog.
    assert explain(stub, "c002", "p010").removed_by == pb.RULE_UNAVAILABLE

    # 6. outranked: the limit-th + 1 product of a longer answer.
    longer = recommend(stub, "c005", limit=8).items
    e = explain(stub, "c005", longer[5].product_id, limit=5)
    assert e.removed_by == pb.RULE_OUTRANKED and e.HasField("terms")
    assert e.terms.value <= recommend(stub, "c005", limit=5).items[-1].score


def test_a_sensitive_product_is_never_described_without_sensitive_consent(server):
    stub, running = server
    # c000 withdrew sensitive consent; p006 / p007 are pharmacy products (sensitive).
    for product in ("p006", "p007"):
        for channel in CHANNELS:
            e = explain(stub, "c000", product, channel=channel, include_purchased=True)
            assert e.removed_by == pb.RULE_SENSITIVITY and not e.in_answer
            assert (e.product_id, e.title, e.category, e.rank, e.score) == ("", "", "", 0, 0.0)
            assert not e.reasons and not e.HasField("terms")
            text = str(e)
            assert product not in text and "Product 6" not in text and "Product 7" not in text
            assert "pharmacy" not in text.lower()
    # The same product for a customer with sensitive consent is described.
    e = explain(stub, "c002", "p006", include_purchased=True)
    assert e.product_id == "p006" and e.removed_by != pb.RULE_SENSITIVITY


def test_fatigue_and_min_value_are_named_with_their_terms(own):
    """A server with fatigue on and a high policy.min_value: a product shown twice without an
    answer is demoted (RULE_FATIGUE), one whose value is below min_value withheld."""
    plain = create_server(served_settings(own, own / "models"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{plain.port}") as ch:
            stub = rpb.RecommenderStub(ch)
            base = {c: recommend(stub, c, limit=10) for c in ("c006", "c007", "c008", "c009")}
    finally:
        plain.stop(0)
    personal = [
        (c, i)
        for c, a in base.items()
        for i in a.items
        if not any(r.kind == pb.REASON_KIND_POPULAR for r in i.reasons)
    ]
    scores = sorted(i.score for _, i in personal)
    threshold = scores[len(scores) // 3]  # a third of the personal items fall below it
    tiring = [(c, i) for c, i in personal if threshold <= i.score < 2 * threshold]
    assert tiring, "no item whose halved value falls below the threshold"
    tired_customer, tired_item = tiring[0]
    with sqlite3.connect(own / "store.db") as db:  # what the first server showed
        db.execute("DELETE FROM nextbest_impressions")
        db.execute("DELETE FROM nextbest_exposure")  # the fatigue read's runs of them
    at = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(hours=1)
    with open_store(store_url(own)) as store:
        store.record_impressions(
            [(tired_customer, tired_item.product_id, ch, at) for ch in ("email", "web")]
        )
    settings = served_settings(own, own / "models").with_overrides(
        "policy", fatigue_demotion=0.5, fatigue_impressions=2, min_value=threshold
    )
    running = create_server(settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            stub = rpb.RecommenderStub(ch)
            e = explain(stub, tired_customer, tired_item.product_id, limit=10)
            assert e.removed_by == pb.RULE_FATIGUE and not e.in_answer, e
            assert e.terms.fatigue == 0.5 and e.terms.times_shown == 2
            assert e.terms.value == pytest.approx(tired_item.score / 2, abs=1e-8)
            low = [(c, i) for c, i in personal if i.score < threshold]
            assert low
            withheld = 0
            for customer, item in low:
                e = explain(stub, customer, item.product_id, limit=10)
                if e.in_answer:  # withheld as a personal item, back as a best seller fill-in
                    assert not e.HasField("terms") and "best seller" in e.detail
                    assert "its value" in e.detail and "below policy.min_value" in e.detail
                    continue
                assert e.removed_by == pb.RULE_BELOW_MIN_VALUE, (customer, item.product_id, e)
                assert e.terms.value == pytest.approx(item.score, abs=1e-8)
                assert e.terms.value < e.terms.min_value == pytest.approx(threshold)
                withheld += 1
            assert withheld >= len(low) // 2
    finally:
        running.stop(0)


@pytest.mark.parametrize(
    "fields, code, message",
    [
        ({"product_id": "p002"}, grpc.StatusCode.INVALID_ARGUMENT, "customer_id is required"),
        ({"customer_id": "c002"}, grpc.StatusCode.INVALID_ARGUMENT, "product_id is required"),
        (
            {"customer_id": "c002", "product_id": "p002", "channel": 9},
            grpc.StatusCode.INVALID_ARGUMENT,
            "channel has an unknown value 9",
        ),
        (
            {"customer_id": "c002", "product_id": "p002", "limit": 0},
            grpc.StatusCode.INVALID_ARGUMENT,
            "limit must be within 1..100",
        ),
        (
            {"customer_id": "c002", "product_id": "p\x00"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "product_id contains a control character",
        ),
        (
            {"customer_id": "c002", "product_id": "no-such-product"},
            grpc.StatusCode.NOT_FOUND,
            "product_id 'no-such-product' is not in model",
        ),
    ],
)
def test_bad_explain_requests_name_the_field(running, fields, code, message):
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        with pytest.raises(grpc.RpcError) as info:
            rpb.RecommenderStub(ch).ExplainRecommendation(
                pb.ExplainRecommendationRequest(**fields), timeout=10
            )
    assert info.value.code() == code
    assert message in info.value.details()


def test_an_erased_customer_gets_the_consent_rule(running):
    with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        consent_pb2_grpc.ConsentStub(ch).ForgetCustomer(
            consent_pb2.ForgetCustomerRequest(customer_id="c030", source="test"), timeout=10
        )
        e = rpb.RecommenderStub(ch).ExplainRecommendation(
            pb.ExplainRecommendationRequest(customer_id="c030", product_id="p030"), timeout=10
        )
    assert not e.personalized and e.not_personalized_reason == pb.NOT_PERSONALIZED_REASON_ERASED
    assert e.in_answer or e.removed_by == pb.RULE_CONSENT
