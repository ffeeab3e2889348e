"""Consent through the real server: Consent RPCs, changes acting on the next request, erasure end
to end (forget → non-personal → retrain → gone), and two server processes sharing PostgreSQL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import serve_command, served_settings, set_consent, store_url, train
from google.protobuf.timestamp_pb2 import Timestamp

from nextbest.server import create_server
from nextbest.store.artifacts import current_version, load_bundle
from nextbest.store.consent_store import open_store
from nextbest.v1 import consent_pb2 as cpb
from nextbest.v1 import consent_pb2_grpc as crpc
from nextbest.v1 import recommender_pb2 as pb
from nextbest.v1 import recommender_pb2_grpc as rpb

INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture
def server(own):
    running = create_server(served_settings(own, own / "models"))
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield crpc.ConsentStub(channel), rpb.RecommenderStub(channel)
    channel.close()
    running.stop(0)


def recommend(stub, customer_id, **fields):
    return stub.RecommendProducts(
        pb.RecommendProductsRequest(customer_id=customer_id, **fields), timeout=10
    )


def test_set_and_get_consent(server):
    consent, _ = server
    first = set_consent(consent, "c010", cpb.PURPOSE_SENSITIVE, False)
    assert first.changed and not first.consent.granted
    assert first.consent.source == "preference-center" and first.consent.updated_at.seconds > 0
    again = set_consent(consent, "c010", cpb.PURPOSE_SENSITIVE, False)
    assert not again.changed
    got = consent.GetConsent(cpb.GetConsentRequest(customer_id="c010"), timeout=10)
    values = {v.purpose: v for v in got.consents}
    assert set(values) == {
        cpb.PURPOSE_PERSONALIZATION,
        cpb.PURPOSE_BEHAVIORAL,
        cpb.PURPOSE_SENSITIVE,
    }
    assert not values[cpb.PURPOSE_SENSITIVE].granted
    # No record: the configured default (allow in the test config), said to be the default.
    assert values[cpb.PURPOSE_PERSONALIZATION].granted
    assert values[cpb.PURPOSE_PERSONALIZATION].source == "default"
    assert not got.erased


def test_consent_changes_act_on_the_next_request(server):
    consent, stub = server
    assert recommend(stub, "c012").personalized
    set_consent(consent, "c012", cpb.PURPOSE_PERSONALIZATION, False)
    resp = recommend(stub, "c012")
    assert not resp.personalized
    assert resp.not_personalized_reason == pb.NOT_PERSONALIZED_REASON_NO_CONSENT
    content = stub.ScoreContent(
        pb.ScoreContentRequest(
            customer_id="c012", candidates=[pb.ContentCandidate(content_id="guide-pantry")]
        ),
        timeout=10,
    )
    assert not content.personalized
    set_consent(consent, "c012", cpb.PURPOSE_PERSONALIZATION, True)
    assert recommend(stub, "c012").personalized


def test_withdrawn_sensitive_consent_hides_sensitive_products_at_once(server):
    consent, stub = server
    customers = [f"c{c:03d}" for c in range(2, 40)]
    showing = [
        c
        for c in customers
        if any(
            i.category == "pharmacy"
            for i in recommend(stub, c, limit=40, channel=pb.CHANNEL_WEB).items
        )
    ]
    assert showing, "some customers must be shown pharmacy products with sensitive consent"
    for c in showing:
        set_consent(consent, c, cpb.PURPOSE_SENSITIVE, False)
        resp = recommend(stub, c, limit=40, include_purchased=True, channel=pb.CHANNEL_WEB)
        assert resp.personalized
        assert any("no sensitive consent" in d for d in resp.decisions)
        assert all(i.category != "pharmacy" for i in resp.items)
        assert all(r.product_id not in ("p006", "p007") for i in resp.items for r in i.reasons)


@pytest.mark.parametrize(
    ("method", "fields", "field"),
    [
        ("SetConsent", {"purpose": 3, "granted": True, "source": "s"}, "customer_id"),
        ("SetConsent", {"customer_id": "x" * 129, "purpose": 3, "granted": True}, "customer_id"),
        (
            "SetConsent",
            {"customer_id": "c1", "purpose": 0, "granted": True, "source": "s"},
            "purpose",
        ),
        (
            "SetConsent",
            {"customer_id": "c1", "purpose": 9, "granted": True, "source": "s"},
            "purpose",
        ),
        ("SetConsent", {"customer_id": "c1", "purpose": 1, "source": "s"}, "granted"),
        ("SetConsent", {"customer_id": "c1", "purpose": 1, "granted": False}, "source"),
        ("GetConsent", {}, "customer_id"),
        ("GetConsent", {"customer_id": " "}, "customer_id"),
        ("ForgetCustomer", {"customer_id": "c1"}, "source"),
        ("ForgetCustomer", {"source": "gdpr-request"}, "customer_id"),
    ],
)
def test_bad_consent_requests(server, method, fields, field):
    consent, _ = server
    request = {
        "SetConsent": cpb.SetConsentRequest,
        "GetConsent": cpb.GetConsentRequest,
        "ForgetCustomer": cpb.ForgetCustomerRequest,
    }[method](**fields)
    with pytest.raises(grpc.RpcError) as info:
        getattr(consent, method)(request, timeout=10)
    assert info.value.code() == INVALID
    assert info.value.details().startswith(field)


def test_erasure_end_to_end(own, server):
    consent, stub = server
    customer = "c020"
    set_consent(consent, customer, cpb.PURPOSE_SENSITIVE, True)
    assert recommend(stub, customer).personalized
    forgotten = consent.ForgetCustomer(
        cpb.ForgetCustomerRequest(customer_id=customer, source="gdpr-request"), timeout=10
    )
    assert forgotten.consent_rows_deleted == 1 and not forgotten.already_erased
    resp = recommend(stub, customer)
    assert not resp.personalized
    assert resp.not_personalized_reason == pb.NOT_PERSONALIZED_REASON_ERASED
    assert consent.GetConsent(cpb.GetConsentRequest(customer_id=customer), timeout=10).erased
    again = consent.ForgetCustomer(
        cpb.ForgetCustomerRequest(customer_id=customer, source="gdpr-request"), timeout=10
    )
    assert again.already_erased

    # Retrain from the same raw events file (which still holds the customer) with the store.
    before = current_version(own / "models")
    version = train(own, own / "models", "--store", store_url(own))
    assert version != before
    bundle = load_bundle(own / "models", version)
    assert customer not in set(bundle.user_ids.tolist())
    assert "c021" in set(bundle.user_ids.tolist())
    for path in (own / "models" / version).iterdir():
        data = path.read_bytes()
        for encoding in ("utf-8", "utf-32-le"):  # numpy stores str arrays as UTF-32
            assert customer.encode(encoding) not in data, (path.name, encoding)
    assert "c021".encode("utf-32-le") in (own / "models" / version / "ids.npz").read_bytes()
    store = open_store(store_url(own))
    try:
        assert customer in store.tombstones()
        assert store.get_consent(customer) == {}
        assert store.audit(customer) == []
        assert store.events([customer]).num_rows == 0
    finally:
        store.close()


# --- two server processes sharing one PostgreSQL store ----------------------------------------


def start_server(folder: Path, store: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        serve_command(folder, store),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("nextbest serving on "):
        proc.kill()
        proc.wait()
        proc.stdout.close()
        pytest.fail(f"server did not start: {line!r}")
    return proc, line.split()[-1]


def test_two_servers_sharing_postgresql_honour_a_withdrawal_at_once(own, pg_store_url):
    procs = []
    try:
        for _ in range(2):
            procs.append(start_server(own, pg_store_url))
        (_, a), (_, b) = procs
        with grpc.insecure_channel(a) as ch_a, grpc.insecure_channel(b) as ch_b:
            consent_a = crpc.ConsentStub(ch_a)
            rec_b = rpb.RecommenderStub(ch_b)
            for k, customer in enumerate(["c030", "c031", "c032"]):
                assert recommend(rec_b, customer).personalized
                set_consent(consent_a, customer, cpb.PURPOSE_PERSONALIZATION, False)
                resp = recommend(rec_b, customer)  # the very next request, other server
                assert not resp.personalized, k
                assert resp.not_personalized_reason == pb.NOT_PERSONALIZED_REASON_NO_CONSENT
            consent_b = crpc.ConsentStub(ch_b)
            consent_b.ForgetCustomer(
                cpb.ForgetCustomerRequest(customer_id="c033", source="gdpr"), timeout=10
            )
            erased = recommend(rpb.RecommenderStub(ch_a), "c033")
            assert erased.not_personalized_reason == pb.NOT_PERSONALIZED_REASON_ERASED
    finally:
        for proc, _ in procs:
            proc.terminate()
            assert proc.wait(timeout=30) == 0
            proc.stdout.close()
    assert np.all([p.returncode == 0 for p, _ in procs])


def test_consent_cli_import_get_audit_forget(tmp_path):
    store = f"sqlite:///{tmp_path / 'store.db'}"

    def cli(*args):
        done = subprocess.run(
            [sys.executable, "-m", "nextbest.cli", "consent", *args, "--store", store],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    (tmp_path / "consent.csv").write_text(
        "customer_id,purpose,granted,updated_at\n"
        "k1,personalization,true,2025-01-01\n"
        "k1,sensitive,false,2025-01-01\n"
        "k1,sensitive,true,2025-02-01\n"
        "k2,personalization,true,2025-01-01\n"
    )
    out = cli("import", str(tmp_path / "consent.csv"), "--source", "crm")
    assert "4 records: 3 applied, 0 unchanged, 1 older" in out
    got = cli("get", "k1", "--default-consent", "deny")
    assert "personalization  granted  2025-01-01T00:00:00 by crm" in got
    assert "sensitive        granted  2025-02-01T00:00:00 by crm" in got
    assert "behavioral       denied   (default)" in got
    audit = cli("audit", "k1")
    assert "2 consent changes" in audit and "-> granted by crm" in audit
    gone = cli("forget", "k1", "--source", "dsar-7")
    assert "2 consent records, 0 events and 2 audit rows deleted" in gone
    assert "(erased" in cli("get", "k1")
    assert "0 consent changes" in cli("audit", "k1")


def test_training_honours_the_configured_stores_tombstones_without_store_flag(own, monkeypatch):
    store = open_store(store_url(own))
    try:
        store.forget("c040", source="dsar-9")
    finally:
        store.close()
    monkeypatch.setenv("NEXTBEST_SERVE__STORE", store_url(own))  # serve.store of the config
    version = train(own, own / "models")
    ids = set(load_bundle(own / "models", version).user_ids.tolist())
    assert "c040" not in ids and "c041" in ids


# --- an erased customer who comes back -----------------------------------------------------------


def test_an_erased_customer_who_consents_again_is_a_new_customer(own, monkeypatch):
    """The tombstone blocks everything dated at or before the erasure; the customer stays erased
    until personalization consent is set again; from then on they are a new customer, personal
    from what is recorded after the erasure, in serving and in the next training."""
    from nextbest.v1 import events_pb2 as epb
    from nextbest.v1 import events_pb2_grpc as erpc

    customer = "c020"
    old_history = set(load_bundle(own / "models").user_ids.tolist())
    assert customer in old_history
    before = epb.Event(
        customer_id=customer, product_id="p002", timestamp=Timestamp(seconds=1_709_251_200)
    )  # 2024-03-01: the history before the erasure
    new_purchases = ["p003", "p005", "p009", "p013"]  # the other taste group's products
    settings = served_settings(own, own / "models")
    running = create_server(settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            consent, stub = crpc.ConsentStub(channel), rpb.RecommenderStub(channel)
            events = erpc.EventsStub(channel)
            consent.ForgetCustomer(
                cpb.ForgetCustomerRequest(customer_id=customer, source="dsar-1"), timeout=10
            )
            # Erased, no new consent (default allow): nothing stored, whatever its date.
            got = events.RecordEvents(
                epb.RecordEventsRequest(
                    events=[before, epb.Event(customer_id=customer, product_id="p003")]
                ),
                timeout=10,
            )
            assert (got.recorded, got.ignored_without_consent, got.ignored_erased) == (0, 0, 2)
            erased = recommend(stub, customer)
            assert erased.not_personalized_reason == pb.NOT_PERSONALIZED_REASON_ERASED
            # Consent again: a new customer, unknown to the model (its history is gone).
            set_consent(consent, customer, cpb.PURPOSE_PERSONALIZATION, True)
            got = consent.GetConsent(cpb.GetConsentRequest(customer_id=customer), timeout=10)
            assert got.erased
            back = recommend(stub, customer)
            assert not back.personalized
            assert back.not_personalized_reason == pb.NOT_PERSONALIZED_REASON_UNKNOWN_CUSTOMER
            got = events.RecordEvents(
                epb.RecordEventsRequest(
                    events=[
                        before,
                        *(epb.Event(customer_id=customer, product_id=p) for p in new_purchases),
                    ]
                ),
                timeout=10,
            )
            assert (got.recorded, got.ignored_without_consent, got.ignored_erased) == (4, 0, 1)
            assert_personal_from(recommend(stub, customer, limit=8), new_purchases)
        running.stop(0)
        # A server started now (the tombstone read at load) answers the same way.
        running = create_server(settings)
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            assert_personal_from(
                recommend(rpb.RecommenderStub(channel), customer, limit=8), new_purchases
            )
    finally:
        running.stop(0)

    # The next training learns the new history only (the raw events file still holds the old).
    # The customer came back today, years after the events file: a lead that takes today's
    # recorded events (train.max_store_lead_days; tests/test_events.py has the guard).
    monkeypatch.setenv("NEXTBEST_TRAIN__MAX_STORE_LEAD_DAYS", "100000")
    version = train(own, own / "models", "--store", store_url(own))
    bundle = load_bundle(own / "models", version)
    user = int(bundle.user_index(np.asarray([customer]))[0])
    assert user >= 0
    row = bundle.user_items.indices[
        bundle.user_items.indptr[user] : bundle.user_items.indptr[user + 1]
    ]
    assert sorted(bundle.item_ids[row].tolist()) == new_purchases
    running = create_server(served_settings(own, own / "models"))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            answer = recommend(rpb.RecommenderStub(channel), customer, limit=8)
    finally:
        running.stop(0)
    assert answer.personalized
    cited = {r.product_id for i in answer.items for r in i.reasons if r.product_id}
    assert cited <= set(new_purchases) | {i.product_id for i in answer.items}


def assert_personal_from(answer, purchases: list[str]) -> None:
    """A personal answer whose evidence is `purchases` alone (ALS fold-in of the recorded)."""
    assert answer.personalized
    assert not {i.product_id for i in answer.items} & set(purchases)
    assert {r.product_id for i in answer.items for r in i.reasons} <= set(purchases)
