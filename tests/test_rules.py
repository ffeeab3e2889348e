"""The rules that must never regress silently, in process and fast (the tests `make mutate` runs):
who may call what (the README's role table), what is sensitive and what training may learn from
(plain lists written here), request validation, and the consent store's gating and erasure.

Every expected value is written here or read from the README, never computed by the code under
test."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib

import numpy as np
import pyarrow as pa
import pytest
from conftest import readme_roles

from nextbest.auth import OPEN_SERVICES, Gate, new_token, token_sha256
from nextbest.config import ClientToken, load_settings
from nextbest.errors import InvalidRequest
from nextbest.policy import (
    FOR_GOOD,
    ConsentReport,
    ConsentState,
    consent_state,
    erased_rows,
    filter_training_events,
    sensitive_mask,
    still_erased,
)
from nextbest.server import product_query
from nextbest.store.consent_store import AuditRecord, open_store
from nextbest.v1 import consent_pb2
from nextbest.v1 import recommender_pb2 as pb

# --- auth: the README's role table -------------------------------------------------------------

ROLES = ("recommend", "consent", "admin")
TOKENS = {role: new_token() for role in ROLES}
BOTH = new_token()
"""A token of a client holding two roles: recommend and consent."""
CLIENTS = tuple(
    ClientToken(name=f"{role}-client", token_sha256=token_sha256(token), roles=(role,))
    for role, token in TOKENS.items()
) + (ClientToken(name="crm", token_sha256=token_sha256(BOTH), roles=("recommend", "consent")),)
METHODS = {
    "nextbest.v1.Recommender": "RecommendProducts",
    "nextbest.v1.Lifecycle": "NextBestAction",
    "nextbest.v1.Events": "RecordEvents",
    "nextbest.v1.Consent": "ForgetCustomer",
    "nextbest.v1.Admin": "ReloadModel",
    "grpc.health.v1.Health": "Check",
    "grpc.reflection.v1.ServerReflection": "ServerReflectionInfo",
    "grpc.reflection.v1alpha.ServerReflection": "ServerReflectionInfo",
    "*": "Anything",
}
"""One method of each service in the README's table ("*": a service that does not exist)."""


def method_of(service: str) -> str:
    name = "nextbest.v2.Unknown" if service == "*" else service
    return f"/{name}/{METHODS[service]}"


def test_the_readme_table_names_every_service():
    table = readme_roles()
    assert set(table) == set(METHODS)
    assert {s for s, role in table.items() if role is None} == set(OPEN_SERVICES)


@pytest.mark.parametrize("service", sorted(METHODS))
def test_each_role_opens_exactly_the_services_of_the_readme(service):
    needed = readme_roles()[service]
    gate = Gate(CLIENTS)
    method = method_of(service)
    for role, token in TOKENS.items():
        verdict = gate.check(method, f"Bearer {token}")
        assert verdict.allowed == (needed is None or role == needed), (method, role)
        if needed is not None and role != needed:
            assert verdict.problem == "forbidden" and verdict.client == f"{role}-client"
            assert verdict.message == (
                f"client '{role}-client' lacks the '{needed}' role this method needs"
            )
        elif needed is not None:
            assert verdict.client == f"{role}-client" and verdict.problem == ""
    # the two-role client: both its roles, nothing else
    assert gate.check(method, f"Bearer {BOTH}").allowed == (
        needed in (None, "recommend", "consent")
    )


@pytest.mark.parametrize("service", sorted(METHODS))
def test_no_or_unknown_token_is_unauthenticated_except_on_open_services(service):
    gate = Gate(CLIENTS)
    method = method_of(service)
    is_open = readme_roles()[service] is None
    for header in (None, "", "Bearer", "Bearer   ", "Basic abc", "nb_x", "Bearer nb_unknown"):
        verdict = gate.check(method, header)
        assert verdict.allowed == is_open, header
        if not is_open:
            assert verdict.problem == "unauthenticated" and verdict.client == ""
    missing = gate.check("/nextbest.v1.Admin/ReloadModel", None)
    assert missing.message == (
        "authorization: a bearer token is required (metadata `authorization: Bearer <token>`)"
    )
    unknown = gate.check("/nextbest.v1.Admin/ReloadModel", "Bearer nb_unknown")
    assert unknown.message == "authorization: unknown token"


def test_bearer_scheme_is_case_blind_and_spaces_are_trimmed():
    gate = Gate(CLIENTS)
    # a valid token under another scheme is no bearer token
    basic = gate.check("/nextbest.v1.Admin/GetModelInfo", f"Basic {TOKENS['admin']}")
    assert not basic.allowed and basic.problem == "unauthenticated"
    assert basic.message.startswith("authorization: a bearer token is required")
    for header in (f"bearer {TOKENS['admin']}", f"  BEARER   {TOKENS['admin']}  "):
        verdict = gate.check("/nextbest.v1.Admin/GetModelInfo", header)
        assert verdict.allowed and verdict.client == "admin-client", header


def test_without_clients_every_call_is_open():
    gate = Gate(())
    assert not gate.enabled and Gate(CLIENTS).enabled
    for service in METHODS:
        verdict = gate.check(method_of(service), None)
        assert verdict.allowed and verdict.client == ""


def test_a_token_is_compared_by_its_sha256():
    token = new_token()
    assert token.startswith("nb_") and len(token) == 3 + 43
    assert new_token() != token
    assert token_sha256(token) == hashlib.sha256(token.encode()).hexdigest()
    # the last matching entry of the list names the client (every entry is compared)
    twice = (
        ClientToken(name="old", token_sha256=token_sha256(token), roles=("admin",)),
        ClientToken(name="new", token_sha256=token_sha256(token), roles=("admin",)),
    )
    assert Gate(twice).check("/nextbest.v1.Admin/ReloadModel", f"Bearer {token}").client == "new"


# --- policy: sensitivity and the training gate, from plain lists -------------------------------


def policy(**changes):
    return dataclasses.replace(load_settings(None, environ={}).policy, **changes)


CATALOG = pa.table(
    {
        "product_id": ["a", "b", "c", "d", "e", "f", "g", "h"],
        "category": ["Pharmacy", "home", None, "toys", "pantry", " home", "pharmacy ", "toys"],
        "department": ["living", "WELLNESS", "wellness", None, "grocery", "living", "x", "Toys"],
        "sensitivity": [0.0, 0.0, 0.0, 0.4, None, 0.0, 0.0, float("nan")],
    }
)


def sensitive(**changes) -> list[str]:
    mask = sensitive_mask(CATALOG, policy(**changes))
    return [p for p, s in zip(CATALOG["product_id"].to_pylist(), mask, strict=True) if s]


def test_sensitive_products_by_category_department_and_sensitivity():
    # d: sensitivity 0.4; e and h: unknown sensitivity is not sensitive
    assert sensitive() == ["d"]
    # categories match whole, case-blind; the catalog's value is not trimmed, the setting is
    assert sensitive(sensitive_categories=(" PHARMACY ",)) == ["a", "d"]
    assert sensitive(sensitive_categories=("home",)) == ["b", "d"]
    # departments: b (WELLNESS) and c (wellness, without a category)
    assert sensitive(sensitive_departments=("Wellness",)) == ["b", "c", "d"]
    assert sensitive(sensitive_departments=("toys",)) == ["d", "h"]
    assert sensitive(
        sensitive_categories=("pharmacy", "pantry"), sensitive_departments=("wellness",)
    ) == ["a", "b", "c", "d", "e"]


def consent_table(rows) -> pa.Table:
    customers, purposes, granted, times = zip(*rows, strict=True)
    return pa.table(
        {
            "customer_id": list(customers),
            "purpose": list(purposes),
            "granted": list(granted),
            "updated_at": pa.array([dt.datetime(2024, 1, d) for d in times], pa.timestamp("us")),
        }
    )


def test_latest_consent_record_wins_and_the_default_fills_the_rest():
    table = consent_table(
        [
            ("u1", "sensitive", False, 5),
            ("u1", "sensitive", True, 3),  # older: loses although written later
            ("u2", "sensitive", True, 4),
            ("u2", "sensitive", False, 4),  # same time: the later row wins
            ("u3", "behavioral", False, 1),
        ]
    )
    ids = pa.array(["u1", "u2", "u3", "u4"])
    deny = consent_state(table, policy(default_consent="deny"))
    assert deny.allowed("sensitive", ids).tolist() == [False, False, False, False]
    assert deny.allowed("behavioral", ids).tolist() == [False, False, False, False]
    allow = consent_state(table, policy(default_consent="allow"))
    assert allow.allowed("sensitive", ids).tolist() == [False, False, True, True]
    assert allow.allowed("behavioral", ids).tolist() == [True, True, False, True]
    assert allow.allowed("personalization", ids).tolist() == [True, True, True, True]
    assert allow.granted == {
        "sensitive": {"u1": False, "u2": False},
        "behavioral": {"u3": False},
    }
    assert consent_state(None, policy(default_consent="allow")).default_allow
    one = consent_state(table.slice(4, 1), policy(default_consent="allow"))
    assert one.granted == {"behavioral": {"u3": False}}
    assert consent_state(table.slice(0, 0), policy(default_consent="allow")).granted == {}
    assert not consent_state(None, policy(default_consent="deny")).default_allow


EVENTS = pa.table(
    {
        "customer_id": ["ok", "ok", "ok", "ok", "nope", "nope", "gone", "shy", "shy", "shy"],
        "product_id": ["a", "d", "b", "b", "a", "b", "a", "d", "a", "b"],
        "event_type": [
            "purchase",
            "purchase",
            "view",
            "email_click",
            "purchase",
            "view",
            "purchase",
            "purchase",
            "cart",
            "return",
        ],
        "timestamp": pa.array([dt.datetime(2024, 1, 1 + k) for k in range(10)], pa.timestamp("us")),
    }
)
"""ok: consents to all; nope: no personalization; gone: erased; shy: personalization only."""


def gate(**kwargs):
    state = ConsentState(
        default_allow=True,
        granted={
            "personalization": {"nope": False},
            "sensitive": {"shy": False},
            "behavioral": {"shy": False, "gone": False},
        },
    )
    kept, report = filter_training_events(
        EVENTS, state, sensitive_products=pa.array(["d"], pa.string()), **kwargs
    )
    pairs = zip(kept["customer_id"].to_pylist(), kept["product_id"].to_pylist(), strict=True)
    return list(pairs), report


def test_training_gate_drops_what_consent_does_not_allow():
    kept, report = gate(erased={"gone": FOR_GOOD})
    assert kept == [("ok", "a"), ("ok", "d"), ("ok", "b"), ("ok", "b"), ("shy", "b")]
    assert report == ConsentReport(
        customers_without_personalization=1,
        customers_erased=1,
        events_without_personalization=2,
        events_erased=1,
        sensitive_events_dropped=1,  # shy's purchase of d (sensitive)
        behavioral_events_dropped=1,  # shy's cart of a
    )
    assert report.summary() == (
        "consent: 1 customers without personalization consent (2 events), 1 erased (1 events), "
        "1 sensitive and 1 behavioral events dropped"
    )


def test_training_gate_without_erasures():
    kept, report = gate()
    assert ("gone", "a") in kept and report.customers_erased == report.events_erased == 0
    assert report.events_without_personalization == 2
    empty, report = gate(erased={})
    assert empty == kept and report.events_erased == 0
    elsewhere, report = gate(erased={"nobody-here": FOR_GOOD})
    assert elsewhere == kept and report.customers_erased == report.events_erased == 0


def test_training_gate_counts_a_customer_once_and_not_twice_over_erasure():
    # erased and without personalization: counted as erased only
    state = ConsentState(default_allow=False)
    kept, report = filter_training_events(
        EVENTS, state, sensitive_products=pa.array([], pa.string()), erased={"gone": FOR_GOOD}
    )
    assert kept.num_rows == 0
    assert report.customers_erased == 1 and report.events_erased == 1
    assert report.customers_without_personalization == 3
    assert report.events_without_personalization == 9
    assert report.sensitive_events_dropped == report.behavioral_events_dropped == 0


def test_an_erased_customer_who_consents_again_is_a_new_customer_to_the_training_gate():
    # "ok" was erased on 2024-01-02 (after its first two events); every record of it in the
    # state is from after the erasure (the store's, or a consent file's that erased_rows kept).
    erased = {"ok": dt.datetime(2024, 1, 2), "gone": dt.datetime(2024, 1, 7)}
    back = ConsentState(default_allow=True, granted={"personalization": {"ok": True}})
    kept, report = filter_training_events(
        EVENTS, back, sensitive_products=pa.array([], pa.string()), erased=erased
    )
    ids = kept["customer_id"].to_pylist()
    # ok: the history before the erasure is gone, after it is learned; gone: never came back
    # (no personalization recorded since), so nothing of it, even under default allow.
    assert ids.count("ok") == 2 and "gone" not in ids
    assert kept.filter(pa.array([c == "ok" for c in ids]))["timestamp"].to_pylist() == [
        dt.datetime(2024, 1, 3),
        dt.datetime(2024, 1, 4),
    ]
    assert report.customers_erased == 2 and report.events_erased == 3
    # Without the new record, ok stays erased: nothing of it is learned.
    kept, _ = filter_training_events(
        EVENTS,
        ConsentState(default_allow=True),
        sensitive_products=pa.array([], pa.string()),
        erased=erased,
    )
    assert "ok" not in kept["customer_id"].to_pylist()


def test_erased_rows_and_still_erased():
    at = dt.datetime(2024, 1, 2)
    customers = pa.array(["a", "a", "b", "a"])
    times = pa.array([dt.datetime(2024, 1, 1), at, at, dt.datetime(2024, 1, 3)], pa.timestamp("us"))
    assert erased_rows(customers, times, {"a": at}).tolist() == [True, True, False, False]
    assert erased_rows(customers, times, {}).tolist() == [False] * 4
    state = ConsentState(default_allow=True, granted={"sensitive": {"a": True}})
    assert still_erased(state, pa.array(["a", "b"]), {"a": at}).tolist() == [True, False]
    state = ConsentState(default_allow=False, granted={"personalization": {"a": False}})
    assert still_erased(state, pa.array(["a", "b"]), {"a": at}).tolist() == [False, False]


def test_consent_state_lookup_of_customers_without_records():
    state = ConsentState(default_allow=False, granted={"sensitive": {"a": True, "b": False}})
    ids = pa.array(["b", "z", "a", "a"])
    assert state.allowed("sensitive", ids).tolist() == [False, False, True, True]
    assert state.allowed("behavioral", ids).tolist() == [False] * 4
    assert ConsentState(default_allow=True).allowed("sensitive", ids).tolist() == [True] * 4


# --- request validation ------------------------------------------------------------------------


def query(**fields):
    return product_query(pb.RecommendProductsRequest(**{"customer_id": "c1", **fields}))


def test_a_valid_request_becomes_a_query():
    q = product_query(
        pb.RecommendProductsRequest(
            customer_id="  c1 ",
            limit=100,
            include_categories=["home"],
            exclude_categories=[" toys"],
            exclude_product_ids=["p1", "p2"],
            include_purchased=True,
            channel=pb.CHANNEL_WEB,
            request_id="r" * 128,
        )
    )
    assert (q.customer_id, q.limit, q.include_purchased, q.channel) == ("c1", 100, True, "web")
    assert q.include_categories == ("home",) and q.exclude_categories == ("toys",)
    assert q.exclude_product_ids == ("p1", "p2")
    assert query().limit == 10 and query().channel == "email" and not query().include_purchased
    assert query(limit=1).limit == 1
    assert query(channel=pb.CHANNEL_EMAIL).channel == "email"
    assert query(channel=pb.CHANNEL_APP).channel == "app"


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"customer_id": ""}, "customer_id is required"),
        ({"customer_id": "   "}, "customer_id is required"),
        ({"customer_id": "c" * 129}, "customer_id is longer than 128 characters"),
        ({"customer_id": "c001\x00"}, "customer_id contains a control character"),
        ({"customer_id": "c\x1f1"}, "customer_id contains a control character"),
        ({"customer_id": "c\x7f1"}, "customer_id contains a control character"),
        ({"request_id": "r" * 129}, "request_id is longer than 128 characters"),
        ({"limit": 0}, r"limit must be within 1\.\.100 \(got 0\)"),
        ({"limit": 101}, r"limit must be within 1\.\.100 \(got 101\)"),
        ({"limit": -3}, r"limit must be within 1\.\.100 \(got -3\)"),
        ({"channel": 9}, "channel has an unknown value 9"),
        ({"include_categories": ["x"] * 101}, "include_categories has 101 entries, more than 100"),
        ({"exclude_categories": ["x"] * 101}, "exclude_categories has 101 entries, more than 100"),
        (
            {"exclude_product_ids": ["x"] * 1001},
            "exclude_product_ids has 1001 entries, more than 1000",
        ),
        ({"include_categories": ["ok", " "]}, r"include_categories\[1\] is required"),
        ({"exclude_categories": ["\n"]}, r"exclude_categories\[0\] is required"),
        ({"exclude_product_ids": ["p", "x\x00"]}, r"exclude_product_ids\[1\] contains a control"),
    ],
)
def test_bad_requests_name_the_field(fields, message):
    request = pb.RecommendProductsRequest(**{"customer_id": "c1", **fields})
    with pytest.raises(InvalidRequest, match=f"^{message}"):
        product_query(request)


def test_limits_at_the_edges_pass():
    assert query(customer_id="c" * 128).customer_id == "c" * 128
    assert len(query(include_categories=["x"] * 100).include_categories) == 100
    assert len(query(exclude_categories=["x"] * 100).exclude_categories) == 100
    assert len(query(exclude_product_ids=["x"] * 1000).exclude_product_ids) == 1000
    assert query(request_id="").customer_id == "c1"  # request_id is optional


def test_consent_purposes_are_validated():
    from nextbest.server import _purpose

    assert _purpose(consent_pb2.PURPOSE_PERSONALIZATION) == "personalization"
    assert _purpose(consent_pb2.PURPOSE_BEHAVIORAL) == "behavioral"
    assert _purpose(consent_pb2.PURPOSE_SENSITIVE) == "sensitive"
    for bad in (consent_pb2.PURPOSE_UNSPECIFIED, 99):
        with pytest.raises(
            InvalidRequest,
            match=rf"^purpose must be one of personalization, behavioral, sensitive \(got {bad}\)$",
        ):
            _purpose(bad)


# --- the consent store: gating and erasure (SQLite; tests/test_store.py runs both back ends) ----

T0 = dt.datetime(2024, 5, 1, 12)


@pytest.fixture
def store(tmp_path):
    s = open_store(f"sqlite:///{tmp_path / 'rules.db'}")
    yield s
    s.close()


def events_of(customer: str, *days: int) -> pa.Table:
    return pa.table(
        {
            "customer_id": [customer] * len(days),
            "product_id": [f"p{d}" for d in days],
            "timestamp": pa.array([T0 + dt.timedelta(days=d) for d in days], pa.timestamp("us")),
            "event_type": ["purchase"] * len(days),
            "quantity": [1.0] * len(days),
        }
    )


def test_set_consent_ignores_stale_decisions(store):
    first = store.set_consent("u", "sensitive", True, source="crm", at=T0)
    assert (first.old_granted, first.new_granted) == (None, True)
    before = T0 - dt.timedelta(1)
    older = store.set_consent("u", "sensitive", False, source="crm", at=before)
    assert older == AuditRecord("u", "sensitive", True, True, before, "crm")
    assert not older.changed and first.changed
    assert store.get_consent("u")["sensitive"].granted is True
    same_time = store.set_consent("u", "sensitive", False, source="app", at=T0)
    assert (same_time.old_granted, same_time.new_granted) == (True, False)
    record = store.get_consent("u")["sensitive"]
    assert (record.granted, record.updated_at, record.source) == (False, T0, "app")
    again = store.set_consent("u", "sensitive", False, source="web", at=T0 + dt.timedelta(1))
    assert (again.old_granted, again.new_granted) == (False, False)
    assert store.get_consent("u")["sensitive"].source == "web"  # moved forward
    assert [(a.old_granted, a.new_granted) for a in store.audit("u")] == [
        (None, True),
        (True, False),
    ]
    aware = dt.datetime(2024, 5, 3, 14, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    store.set_consent("u", "sensitive", True, source="tz", at=aware)
    assert store.get_consent("u")["sensitive"].updated_at == dt.datetime(2024, 5, 3, 12)


def test_set_consent_refuses_bad_input(store):
    for args, message in (
        (("", "sensitive", True), "customer_id: must not be empty"),
        ((" ", "sensitive", True), "customer_id: must not be empty"),
        ((None, "sensitive", True), "customer_id: must not be empty"),
        (
            ("u", "marketing", True),
            r"purpose: unknown purpose 'marketing' \(expected personalization, behavioral, "
            r"sensitive\)$",
        ),
        (("u", "sensitive", "yes"), "granted: must be true or false, got 'yes'"),
        (("u", "sensitive", 1), "granted: must be true or false, got 1"),
    ):
        with pytest.raises(InvalidRequest, match=f"^{message}"):
            store.set_consent(*args, source="crm")
    for source in ("", "  ", None):
        with pytest.raises(InvalidRequest, match="^source: must not be empty$"):
            store.set_consent("u", "sensitive", True, source=source)
    with pytest.raises(InvalidRequest, match="^at: expected a datetime, got str$"):
        store.set_consent("u", "sensitive", True, source="crm", at="2024-01-01")
    assert store.set_consent("u", "sensitive", np.bool_(True), source="crm").new_granted is True
    assert store.get_consent("nobody") == {}
    with pytest.raises(InvalidRequest, match="^customer_id: must not be empty$"):
        store.get_consent("")


def test_consent_state_of_a_batch(store):
    store.set_consent("a", "sensitive", False, source="crm", at=T0)
    store.set_consent("b", "behavioral", True, source="crm", at=T0)
    state = store.consent_state(["a", "b", "c", "", None], default_allow=True)
    assert state.default_allow is True
    assert state.granted == {"sensitive": {"a": False}, "behavioral": {"b": True}}
    assert store.consent_state([], default_allow=False) == ConsentState(default_allow=False)
    # ids that are not strings are no customers (ignored, not an error)
    assert store.consent_state(["a", 7, b"a"], default_allow=True).granted == {
        "sensitive": {"a": False}
    }
    assert store.consent_state(["a"], default_allow=0).default_allow is False


def test_forget_erases_everything_and_later_replays_are_refused(store):
    store.set_consent("u", "sensitive", True, source="crm", at=T0)
    store.set_consent("u", "behavioral", True, source="crm", at=T0)
    store.set_consent("v", "sensitive", True, source="crm", at=T0)
    assert store.record_events(events_of("u", 0, 1)) == 2
    assert store.record_events(events_of("v", 0)) == 1
    store.record_impressions([("u", "p0", "email", T0)])
    report = store.forget("u", source="dsr")
    assert (report.customer_id, report.consent_rows, report.events, report.audit_rows) == (
        "u",
        2,
        2,
        2,
    )
    assert not report.already_erased
    assert store.get_consent("u") == {} and store.audit("u") == []
    assert store.events(["u"]).num_rows == 0 and store.events(["v"]).num_rows == 1
    assert store.unanswered_impressions(["u"], since=T0 - dt.timedelta(1)) == {}
    erased_at = store.erased(["u", "v", ""])["u"]
    assert set(store.erased(["u", "v"])) == {"u"} and store.erased([]) == {}
    assert set(store.erased(["u", 7, None])) == {"u"}
    assert store.tombstones() == {"u": erased_at}
    # consent decided before the erasure, or events dated before it: erased data replayed
    stale = store.set_consent("u", "sensitive", True, source="crm", at=erased_at)
    assert (stale.old_granted, stale.new_granted) == (None, None)
    assert store.get_consent("u") == {}
    assert store.record_events(events_of("u", -1, 0)) == 0
    later = erased_at + dt.timedelta(seconds=1)
    assert store.set_consent("u", "sensitive", False, source="crm", at=later).new_granted is False
    after = events_of("u", 0).set_column(2, "timestamp", pa.array([later], pa.timestamp("us")))
    mixed = pa.concat_tables([events_of("u", -3), after, events_of("v", -3)])
    assert store.record_events(mixed) == 2  # u's later event and v's
    assert store.events(["u"])["timestamp"].to_pylist() == [later]
    again = store.forget("u", source="dsr")
    assert again.already_erased and again.consent_rows == 1 and again.events == 1
    assert store.erased(["u"])["u"] >= erased_at
    with pytest.raises(InvalidRequest, match="^source: must not be empty$"):
        store.forget("v", source=" ")
    with pytest.raises(InvalidRequest, match="^customer_id: must not be empty$"):
        store.forget("", source="dsr")
    assert store.erased(["v"]) == {}


def test_events_of_selected_customers(store):
    store.record_events(pa.concat_tables([events_of("a", 2, 1), events_of("b", 0)]))
    assert store.events(["a"])["product_id"].to_pylist() == ["p1", "p2"]  # by time
    assert store.events([]).num_rows == 0 and store.events(["", None]).num_rows == 0
    assert store.events(["a", 7])["product_id"].to_pylist() == ["p1", "p2"]
    assert store.events()["customer_id"].to_pylist() == ["b", "a", "a"]
    assert store.record_events(events_of("a")) == 0


# --- the value rule (SPEC §5): value = (relevance − sensitivity × exposure) × trust ------------


@pytest.fixture(scope="module")
def valued(tmp_path_factory):
    """A small model served with plain numbers: p002 sensitivity 0.5, p003 0.25, p006/p007
    sensitive by category (level 1), p010 unavailable, email exposure 0.5, min_value 0.25,
    fatigue from 2 impressions (value halved), no discovery places (the answer is in value
    order)."""
    from conftest import synthetic_catalog, synthetic_events, write_csv

    from nextbest.data.readers import read_catalog
    from nextbest.service import ServedModel, fixed_consent
    from nextbest.training import train

    folder = tmp_path_factory.mktemp("rules")
    plain = synthetic_catalog()
    levels = {"p002": 0.5, "p003": 0.25}
    ids = plain["product_id"].to_pylist()
    plain = plain.append_column("sensitivity", pa.array([levels.get(p, 0.0) for p in ids]))
    plain = plain.append_column("available", pa.array([p != "p010" for p in ids]))
    catalog, _ = read_catalog(write_csv(plain, folder / "catalog.csv"))
    s = load_settings(None, environ={})
    s = s.with_overrides(
        "train", tune=False, candidates=("als",), als_factors=4, candidate_pool=10, num_threads=1
    )
    s = s.with_overrides(
        "policy",
        default_consent="allow",
        sensitive_categories=("pharmacy",),
        channel_exposure={"email": 0.5, "web": 0.25, "app": 0.0},
        min_value=0.25,
        fatigue_impressions=2,
        fatigue_demotion=0.5,
        fatigue_days=7.0,
    )
    s = s.with_overrides("serve", discovery_share=0.0)
    bundle, _, _ = train(synthetic_events(), catalog, s)
    return ServedModel(bundle, s, fixed_consent(ConsentState(default_allow=True)))


def rule(
    model,
    products,
    relevance,
    *,
    popular=None,
    shown=None,
    trust=1.0,
    limit=3,
    sensitive_ok=True,
    mask=None,
    bought=(),
    recorded=None,
    fetch=None,
    **query,
):
    from nextbest.service import ProductQuery, Reason

    items = model.bundle.item_index(np.asarray(products))
    assert (items >= 0).all()
    q = ProductQuery(customer_id="c004", limit=limit, **query)
    return model._privacy_rule(
        shown or {},
        q,
        items,
        np.asarray(relevance, dtype=float),
        np.zeros(len(items), bool) if popular is None else np.asarray(popular),
        [(Reason("predicted_interest", f"for {p}"),) for p in products],
        trust,
        sensitive_ok,
        mask,
        np.sort(model.bundle.item_index(np.asarray(bought, dtype=str))).astype(np.int64),
        limit,
        **({"recorded": recorded} if recorded is not None else {}),
        **({"fetch": fetch} if fetch is not None else {}),
    )


def test_value_is_relevance_less_exposed_sensitivity_times_trust(valued):
    # email (exposure 0.5): p004 0.75; p002 0.875 - 0.25 = 0.625; p003 0.5 - 0.125 = 0.375;
    # p006 (category) 0.75 - 0.5 = 0.25 (= min_value: kept); p008 0.125 (withheld)
    answer = rule(
        valued, ["p004", "p002", "p003", "p006", "p008"], [0.75, 0.875, 0.5, 0.75, 0.125], limit=4
    )
    assert [(i.product_id, i.score) for i in answer.items] == [
        ("p004", 0.75),
        ("p002", 0.625),
        ("p003", 0.375),
        ("p006", 0.25),
    ]
    assert answer.withheld == 1 and answer.personalized and answer.customer_id == "c004"
    assert answer.decisions == ("1 items withheld: value below 0.25 on the email channel",)
    assert answer.items[0].reasons[0].text == "for p004"
    # the app channel exposes nothing: value = relevance; trust scales every value
    app = rule(valued, ["p002", "p004"], [0.875, 0.75], channel="app", trust=0.5, limit=2)
    assert [(i.product_id, i.score) for i in app.items] == [("p002", 0.4375), ("p004", 0.375)]
    assert app.withheld == 0 and app.decisions == ()
    web = rule(valued, ["p006", "p003"], [0.5, 0.5], channel="web", limit=2)
    assert [(i.product_id, i.score) for i in web.items] == [("p003", 0.4375), ("p006", 0.25)]


def test_withheld_counts_personal_items_only(valued):
    answer = rule(
        valued, ["p004", "p008", "p012"], [0.5, 0.125, 0.0625], popular=[False, True, False]
    )
    assert answer.withheld == 1  # p012; p008 is a best seller placed by popularity
    assert [i.product_id for i in answer.items][0] == "p004"


def test_fatigue_halves_the_value_of_products_shown_too_often(valued):
    answer = rule(
        valued,
        ["p004", "p012", "p014"],
        [0.75, 0.625, 0.5],
        shown={"p004": 2, "p012": 1, "p014": 5},
        limit=3,
    )
    # p004 0.75 → 0.375 (shown twice); p012 once: not tired; p014 0.5 → 0.25 (kept)
    assert [(i.product_id, i.score) for i in answer.items] == [
        ("p012", 0.625),
        ("p004", 0.375),
        ("p014", 0.25),
    ]
    tired = {i.product_id: i.reasons[-1] for i in answer.items}
    assert tired["p004"].kind == "fatigue" and tired["p004"].days == 7.0
    assert tired["p004"].text == ("shown 2 times in 7 days without a click or purchase: demoted")
    assert tired["p014"].text.startswith("shown 5 times")
    assert tired["p012"].kind == "predicted_interest" and len(answer.items[0].reasons) == 1
    assert answer.decisions == ("2 items demoted for fatigue",)
    # from one impression on: only the products shown are demoted, not the others
    from nextbest.service import ServedModel

    once = ServedModel(
        valued.bundle,
        valued.settings.with_overrides("policy", fatigue_impressions=1),
        valued.consent,
    )
    answer = rule(once, ["p004", "p012"], [0.75, 0.625], shown={"p012": 1}, limit=2)
    assert [(i.product_id, i.score) for i in answer.items] == [("p004", 0.75), ("p012", 0.3125)]


def test_equal_values_keep_the_ranking_order(valued):
    products = [f"p{k:03d}" for k in range(12, 32, 2)]  # ten products, none sensitive
    relevance = [0.5, 0.75] * 5
    answer = rule(valued, products, relevance, limit=10, channel="app")
    assert [i.product_id for i in answer.items] == products[1::2] + products[::2]


def test_a_short_list_is_filled_with_best_sellers_never_sensitive(valued):
    b = valued.bundle
    answer = rule(valued, ["p004", "p008"], [0.75, 0.125], limit=6)
    ids = [i.product_id for i in answer.items]
    assert ids[0] == "p004" and "p008" not in ids and len(ids) == 6
    fill = answer.items[1:]
    assert all(i.reasons[0].kind == "popular" for i in fill)
    sensitive = {"p002", "p003", "p006", "p007"}  # by level or by the pharmacy category
    assert not sensitive & set(ids[1:])
    # the fill follows the best sellers (sensitive and unavailable ones left out), just below
    # the last personal score, decreasing
    order = [str(b.item_ids[i]) for i in b.best_sellers]
    expected = [p for p in order if p not in sensitive | {"p004", "p008"}][:5]
    assert ids[1:] == expected
    scores = [i.score for i in answer.items]
    assert all(a > c for a, c in zip(scores, scores[1:], strict=False))
    assert 0.75 * (1 - 1e-3) < scores[-1] < 0.75
    assert scores[1] == round(0.75 * (1 - 1 / 6 * 1e-3), 9)
    assert answer.decisions == (
        "1 items withheld: value below 0.25 on the email channel",
        "5 best sellers added to fill the list",
    )
    nothing = rule(valued, ["p008"], [0.125], limit=2)
    assert [i.score for i in nothing.items] == [round(0.25 * (1 - k / 3 * 1e-3), 9) for k in (1, 2)]


def test_the_fill_leaves_out_bought_and_filtered_products(valued):
    b = valued.bundle
    order = [str(b.item_ids[i]) for i in b.best_sellers]
    sensitive = {"p002", "p003", "p006", "p007"}
    top = [p for p in order if p not in sensitive | {"p004"}]
    bought, filtered = top[0], top[1]
    mask = np.ones(len(b.item_ids), bool)
    mask[b.item_index(np.asarray([filtered]))] = False
    answer = rule(valued, ["p004"], [0.75], limit=4, bought=[bought], mask=mask, sensitive_ok=False)
    assert [i.product_id for i in answer.items[1:]] == top[2:5]
    assert answer.decisions == (
        "sensitive products neither used nor shown: no sensitive consent",
        "3 best sellers added to fill the list",
    )
    again = rule(valued, ["p004"], [0.75], limit=4, bought=[bought], include_purchased=True)
    assert [i.product_id for i in again.items[1:]] == top[:3]
    # a product bought before is placed by value like any other (no discovery places here)
    kept = rule(valued, ["p012", "p004"], [0.5, 0.75], limit=2, bought=["p004"])
    assert [i.product_id for i in kept.items] == ["p004", "p012"]


def test_an_aware_time_is_stored_as_utc_whatever_the_local_zone(store, monkeypatch):
    import time

    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        aware = dt.datetime(2024, 5, 3, 14, tzinfo=dt.timezone(dt.timedelta(hours=2)))
        store.set_consent("tz", "sensitive", True, source="crm", at=aware)
        assert store.get_consent("tz")["sensitive"].updated_at == dt.datetime(2024, 5, 3, 12)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_bad_tables_are_refused_naming_the_table(store):
    no_quantity = events_of("a", 1).drop_columns(["quantity"])
    with pytest.raises(InvalidRequest, match="^quantity: missing column in events table$"):
        store.record_events(no_quantity)
    with pytest.raises(InvalidRequest, match="^events table: expected a pyarrow Table, got list$"):
        store.record_events([])
    consent = consent_table([("u", "sensitive", True, 1)])
    with pytest.raises(InvalidRequest, match="^granted: missing column in consent table$"):
        store.import_consent(consent.drop_columns(["granted"]), source="file")
    with pytest.raises(InvalidRequest, match="^consent table: expected a pyarrow Table"):
        store.import_consent({}, source="file")
    bad = consent_table([("u", "sensitive", True, 1), ("u", "ads", True, 2)])
    with pytest.raises(InvalidRequest, match=r"^purpose \(row 1\): unknown purpose 'ads'"):
        store.import_consent(bad, source="file")
    assert store.import_consent(consent, source="file") == {
        "applied": 1,
        "unchanged": 0,
        "older": 0,
    }


def test_discovery_places_go_to_products_new_to_the_customer(valued):
    from nextbest.service import ServedModel

    settings = valued.settings.with_overrides("serve", discovery_share=0.5)
    model = ServedModel(valued.bundle, settings, valued.consent)
    products, relevance = ["p004", "p012", "p014", "p016"], [0.875, 0.75, 0.625, 0.5]
    # limit 2, half of it for products not bought before: the best fresh one takes a place
    bought = ["p004", "p012"]
    answer = rule(model, products, relevance, limit=2, bought=bought)
    assert [i.product_id for i in answer.items] == ["p004", "p014"]
    fresh = rule(model, products, relevance, limit=2)  # nothing bought: all are new
    assert [i.product_id for i in fresh.items] == ["p004", "p012"]
    last = rule(model, products, relevance, limit=3, bought=["p016"])  # the last id bought
    assert [i.product_id for i in last.items] == ["p004", "p012", "p014"]
    first = rule(model, products, relevance, limit=4, bought=["p004", "p014", "p016"])
    assert [i.product_id for i in first.items] == ["p004", "p012", "p014", "p016"]
    few = rule(model, products, relevance, limit=3, bought=["p012", "p014", "p016"])
    assert [i.product_id for i in few.items] == ["p004", "p012", "p014"]
    two = rule(model, products, relevance, limit=2, bought=["p004", "p012", "p014"])
    assert [i.product_id for i in two.items] == ["p004", "p016"]


def test_a_long_fill_skips_unavailable_sensitive_and_chosen_products(valued):
    b = valued.bundle
    order = [str(b.item_ids[i]) for i in b.best_sellers]
    top = order[0]  # the best seller, chosen personally: not again in the fill
    answer = rule(valued, [top], [0.75], limit=40)
    ids = [i.product_id for i in answer.items]
    assert ids[0] == top and ids.count(top) == 1
    unavailable = {"p010"}  # the catalog's only unavailable product
    sensitive = {"p002", "p003", "p006", "p007"}
    assert ids[1:] == [p for p in order if p not in sensitive | unavailable | {top}]


def test_the_trace_holds_the_value_rule_terms_as_computed(valued):
    """ExplainRecommendation's trace (asked for with `recorded`): every term of the rule for
    every candidate, what was chosen, and what the request brought; none without asking."""
    assert rule(valued, ["p004"], [0.5]).trace is None
    assert rule(valued, ["p004"], [0.5], recorded=np.zeros(0, np.int64)).trace.fetch == 0
    items = valued.bundle.item_index(np.asarray(["p004", "p002", "p008"]))
    recorded = valued.bundle.item_index(np.asarray(["p020"]))
    mask = np.ones(valued.bundle.shape[1], bool)
    answer = rule(
        valued,
        ["p004", "p002", "p008"],
        [0.75, 0.875, 0.125],
        shown={"p002": 2},
        trust=0.8,
        mask=mask,
        bought=["p001"],
        recorded=recorded,
        fetch=7,
    )
    t = answer.trace
    assert t.personalized is True and t.sensitive_ok is True and t.fetch == 7
    assert t.mask is mask and t.recorded.tolist() == recorded.tolist()
    assert t.bought.tolist() == valued.bundle.item_index(np.asarray(["p001"])).tolist()
    assert t.candidates.tolist() == items.tolist()
    v = t.valued
    # email exposure 0.5: p002's sensitivity 0.5 costs 0.25; trust 0.8; p002 shown twice:
    # tired, its value halved.
    assert v.relevance.tolist() == [0.75, 0.875, 0.125]
    assert v.privacy_loss.tolist() == [0.0, 0.25, 0.0]
    assert v.trust == 0.8
    assert v.shown.tolist() == [0, 2, 0]
    assert v.fatigue.tolist() == [1.0, 0.5, 1.0]
    assert v.before_fatigue.tolist() == pytest.approx([0.6, 0.5, 0.1])
    assert v.value.tolist() == pytest.approx([0.6, 0.25, 0.1])
    # p004 (0.6) and p002 (0.25 = min_value) kept, p008 withheld: chosen in answer order.
    assert t.chosen.tolist() == [0, 1]
    assert [i.product_id for i in answer.items][:2] == ["p004", "p002"]
