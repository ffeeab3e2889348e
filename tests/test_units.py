"""Unit tests: config validation, consent rules, returns netting, metrics with known answers."""

from __future__ import annotations

import datetime as dt

import numpy as np
import pyarrow as pa
import pytest

from nextbest.config import load_settings
from nextbest.data.interactions import build_interactions, cf_matrix, repeat_stats, to_days
from nextbest.errors import ConfigError
from nextbest.evaluation import Relevance, ranking_metrics
from nextbest.policy import consent_state, filter_training_events


def events(rows: list[tuple[str, str, str, str, float]]) -> pa.Table:
    c, p, t, e, q = zip(*rows, strict=True)
    return pa.table(
        {
            "customer_id": list(c),
            "product_id": list(p),
            "timestamp": pa.array([dt.datetime.fromisoformat(x) for x in t], pa.timestamp("us")),
            "event_type": list(e),
            "quantity": list(q),
            "value": pa.nulls(len(c), pa.float64()),
            "channel": pa.nulls(len(c), pa.string()),
        }
    )


def test_config_defaults_file_and_environment(tmp_path):
    s = load_settings(None, environ={})
    assert s.policy.default_consent == "deny" and s.train.cf_model == "als"
    path = tmp_path / "c.toml"
    path.write_text('[train]\nals_factors = 32\n[policy]\nsensitive_categories = ["A"]\n')
    env = {"NEXTBEST_POLICY__DEFAULT_CONSENT": "allow", "NEXTBEST_TRAIN__CANDIDATES": "als,bm25"}
    s = load_settings(path, environ=env)
    assert s.train.als_factors == 32 and s.policy.sensitive_categories == ("A",)
    assert s.policy.default_consent == "allow" and s.train.candidates == ("als", "bm25")


@pytest.mark.parametrize(
    "text, message",
    [
        ("[train]\nals_factor = 3\n", "unknown key train.als_factor"),
        ("[train]\nals_factors = 'many'\n", "train.als_factors has an invalid value"),
        ("[policy]\ndefault_consent = 'maybe'\n", "policy.default_consent must be allow or deny"),
        ("[trian]\n", "unknown section [trian]"),
        ("[train\n", "not valid TOML"),
        ("[train]\nals_grid = ['64:x']\n", "train.als_grid entry '64:x'"),
        ("[serve]\nclock = '2011-13-01'\n", "serve.clock must be model, wall, replay or a date"),
        ("[serve]\nclock = 'yesterday'\n", "serve.clock must be model, wall, replay or a date"),
        ("[serve]\ndiscovery_share = 1.5\n", "serve.discovery_share must be in [0, 1]"),
        ("[serve]\ndurable_repeat_rate = -0.1\n", "serve.durable_repeat_rate must be in [0, 1]"),
        ("[serve]\nconsumable_repeat_rate = 0.3\n", "serve.consumable_repeat_rate was removed"),
        ("[serve]\ndue_fraction = 0.5\n", "serve.due_fraction was removed: the learned blend"),
        ("[serve]\nswitch_interval_ms = 0\n", "serve.switch_interval_ms must be > 0 and <= 1000"),
    ],
)
def test_config_errors_name_the_key(tmp_path, text, message):
    """Every bad value names its key; a key of an earlier version says what replaced it."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(path, environ={})
    assert message in str(err.value)


def test_returns_cancel_purchases():
    table = events(
        [
            ("a", "x", "2024-01-01", "purchase", 2.0),
            ("a", "x", "2024-01-03", "return", 2.0),  # fully returned: the pair disappears
            ("a", "y", "2024-01-01", "purchase", 4.0),
            ("a", "y", "2024-01-02", "return", 1.0),  # a quarter returned
            ("b", "y", "2024-01-01", "purchase", 1.0),
        ]
    )
    inter = build_interactions(table, {"purchase": 1.0})
    assert inter.item_ids.tolist() == ["y"]  # x is gone everywhere
    m = cf_matrix(inter, half_life_days=1e9, reference_day=inter.last_day)
    assert m.toarray().ravel().tolist() == pytest.approx([0.75, 1.0])


def test_recency_half_life_and_repeat_stats():
    table = events(
        [
            ("a", "x", "2024-01-01", "purchase", 1.0),
            ("a", "x", "2024-01-11", "purchase", 1.0),
            ("a", "x", "2024-01-21", "purchase", 1.0),
            ("b", "x", "2024-01-21", "purchase", 1.0),
        ]
    )
    inter = build_interactions(table, {"purchase": 1.0})
    ref = float(to_days(pa.array([dt.datetime(2024, 1, 21)], pa.timestamp("us")))[0])
    m = cf_matrix(inter, half_life_days=10.0, reference_day=ref)
    assert m[0, 0] == pytest.approx(1.0 + 0.5 + 0.25)
    rs = repeat_stats(inter, half_life_days=10.0, reference_day=ref + 0.5)
    assert rs.days_bought[0, 0] == 3 and rs.days_bought[1, 0] == 1
    assert rs.item_interval_days[0] == pytest.approx(10.0)
    assert rs.user_days.tolist() == [3.0, 1.0]


def test_season_window_is_the_coming_month_one_year_earlier():
    table = events(
        [
            ("a", "x", "2023-01-10", "purchase", 1.0),  # in the season window
            ("a", "x", "2023-01-12", "purchase", 1.0),  # in it too
            ("a", "y", "2023-03-01", "purchase", 1.0),  # after it
            ("b", "x", "2023-01-03", "purchase", 1.0),  # before it: starts the history
            ("b", "y", "2024-01-01", "purchase", 1.0),
            ("b", "x", "2024-01-01", "purchase", 1.0),
        ]
    )
    inter = build_interactions(table, {"purchase": 1.0})
    ref = float(to_days(pa.array([dt.datetime(2024, 1, 5)], pa.timestamp("us")))[0])
    rs = repeat_stats(inter, half_life_days=10.0, reference_day=ref)
    x, y = inter.item_ids.tolist().index("x"), inter.item_ids.tolist().index("y")
    assert rs.season_covered
    assert rs.season_days[0, x] == 2 and rs.season_days[0, y] == 0 and rs.season_days[1, x] == 0
    assert rs.item_season_buyers[x] == 1 and rs.item_season_buyers[y] == 0
    # The same purchases without b's first one: the history starts inside the window, so the
    # season is unknown (all 0), not "nothing bought then".
    later = table.filter(pa.array([True, True, True, False, True, True]))
    inter = build_interactions(later, {"purchase": 1.0})
    rs = repeat_stats(inter, half_life_days=10.0, reference_day=ref)
    assert not rs.season_covered
    assert rs.season_days.sum() == 0 and rs.item_season_buyers.sum() == 0


def test_consent_latest_record_wins_and_default_applies():
    policy = load_settings(None, environ={}).policy
    consent = pa.table(
        {
            "customer_id": ["a", "a", "b"],
            "purpose": ["personalization"] * 3,
            "granted": [True, False, True],
            "updated_at": pa.array(
                [dt.datetime(2024, 1, 1), dt.datetime(2024, 2, 1), dt.datetime(2024, 1, 1)],
                pa.timestamp("us"),
            ),
        }
    )
    state = consent_state(consent, policy)
    allowed = state.allowed("personalization", pa.array(["a", "b", "c"]))
    assert allowed.tolist() == [False, True, False]  # c: no record, default deny
    table = events(
        [
            ("a", "x", "2024-01-01", "purchase", 1.0),
            ("b", "x", "2024-01-01", "purchase", 1.0),
            ("b", "s", "2024-01-01", "purchase", 1.0),
            ("b", "x", "2024-01-02", "view", 1.0),
            ("c", "x", "2024-01-01", "purchase", 1.0),
        ]
    )
    kept, report = filter_training_events(table, state, sensitive_products=pa.array(["s"]))
    assert kept["customer_id"].to_pylist() == ["b"]
    assert kept["product_id"].to_pylist() == ["x"]
    assert report.customers_without_personalization == 2
    assert report.sensitive_events_dropped == 1 and report.behavioral_events_dropped == 1


def test_ranking_metrics_known_answers():
    # User 0: relevant {1, 3} (+1 product unknown to the model); ranking [1, 2, 3].
    # User 1: relevant {0}; ranking [2, 0, -1].
    rel = Relevance(users=np.array([0, 1]), keys=np.array([1, 3, 10]), n_relevant=np.array([3, 1]))
    ids = np.array([[1, 2, 3], [2, 0, -1]])
    m = ranking_metrics(ids, rel, n_items=10)
    assert m["precision"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["recall"] == pytest.approx((2 / 3 + 1) / 2)
    dcg0 = 1 + 1 / np.log2(4)
    idcg0 = 1 + 1 / np.log2(3) + 1 / np.log2(4)
    assert m["ndcg"] == pytest.approx((dcg0 / idcg0 + (1 / np.log2(3)) / 1.0) / 2)
    assert m["map"] == pytest.approx(((1 + 2 / 3) / 3 + 0.5) / 2)
    assert m["hit_rate"] == 1.0
    assert m["coverage"] == pytest.approx(4 / 10)


def test_generated_guides_link_each_categorys_best_sellers():
    from nextbest.data.adapters import GUIDE_PRODUCTS, generated_guides
    from nextbest.data.readers import CONTENT_SCHEMA

    # Category "Cups & Mugs": p0..p6 bought by 7..1 distinct customers, p7 never (only returned);
    # c9 buys p6 three times (still one buyer) and returns p0 (returns do not count).
    rows = [
        (f"c{c}", f"p{p}", "2024-01-01", "purchase", 1.0) for p in range(7) for c in range(7 - p)
    ]
    rows += [("c9", "p6", "2024-01-02", "purchase", 1.0)] * 3
    rows += [("c9", "p0", "2024-01-03", "return", 1.0), ("c9", "p7", "2024-01-03", "return", 1.0)]
    rows += [("c1", "q1", "2024-01-01", "purchase", 1.0)]
    catalog = pa.table(
        {
            "product_id": [f"p{p}" for p in range(8)] + ["q1", "q2", "r1"],
            "category": ["Cups & Mugs"] * 8 + ["TEA", "TEA", None],
            "sensitivity": [0.0] * 8 + [0.0, 0.8, 1.0],
        }
    )
    content = generated_guides(events(rows), catalog)
    assert content.schema == CONTENT_SCHEMA
    assert content.to_pylist() == [
        {
            "content_id": "guide-cups-mugs",
            "title": "How to choose and use Cups & Mugs (generated guide)",
            "kind": "guide",
            "product_ids": [f"p{p}" for p in range(GUIDE_PRODUCTS)],
            "categories": ["Cups & Mugs"],
            "sensitivity": 0.0,
            "published_at": None,
        },
        {
            "content_id": "guide-tea",
            "title": "How to choose and use TEA (generated guide)",
            "kind": "guide",
            "product_ids": ["q1", "q2"],
            "categories": ["TEA"],
            "sensitivity": 0.8,
            "published_at": None,
        },
    ]


def _pem(der: bytes) -> bytes:
    import base64

    body = base64.b64encode(der).decode()
    return f"-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n".encode()


def test_a_client_certificate_maps_to_its_client_and_roles():
    """`Gate` (auth.py): a listed certificate's fingerprint (SHA-256 of the DER bytes) names its
    client; an unlisted one is refused naming its fingerprint; a token decides over the
    certificate; without certificate entries, certificates are not read."""
    import hashlib

    from nextbest.auth import Gate
    from nextbest.config import ClientToken

    web_der, stranger_der = bytes(range(40)), bytes(range(1, 41))
    ops = ClientToken(
        name="ops", token_sha256=hashlib.sha256(b"ops-token").hexdigest(), roles=("admin",)
    )
    web = ClientToken(
        name="web", certificate_sha256=hashlib.sha256(web_der).hexdigest(), roles=("recommend",)
    )
    gate = Gate((web, ops))
    method = "/nextbest.v1.Recommender/RecommendProducts"
    ok = gate.check(method, None, _pem(web_der))
    assert ok.allowed and ok.client == "web"
    stranger = gate.check(method, None, _pem(stranger_der))
    assert not stranger.allowed and stranger.problem == "unauthenticated" and not stranger.client
    assert hashlib.sha256(stranger_der).hexdigest() in stranger.message
    assert stranger.message.endswith("is not listed in [[serve.clients]] certificate_sha256")
    none = gate.check(method, None, None)
    assert not none.allowed and none.problem == "unauthenticated"
    assert none.message.startswith("authorization: a bearer token is required")
    token_wins = gate.check(method, "Bearer ops-token", _pem(web_der))
    assert not token_wins.allowed and token_wins.client == "ops"
    assert token_wins.problem == "forbidden"
    admin = gate.check_role("admin", None, _pem(web_der))
    assert not admin.allowed and admin.client == "web" and admin.problem == "forbidden"
    tokens_only = Gate((ops,)).check(method, None, _pem(web_der))
    assert not tokens_only.allowed and "sha256" not in tokens_only.message


def test_the_erasure_rules_answer_one_bool_per_row_even_with_nothing_erased():
    """`policy.erased_rows` and `policy.still_erased` with no tombstone, or no customer: a bool
    array of the right length (callers combine it with `|` and `~`)."""
    from nextbest.policy import ConsentState, erased_rows, still_erased

    customers = pa.array(["c1", "c2"], pa.string())
    times = pa.array([dt.datetime(2024, 1, 1)] * 2, pa.timestamp("us"))
    for got in (
        erased_rows(customers, times, {}),
        still_erased(ConsentState(default_allow=True), customers, {}),
    ):
        assert got.dtype == bool and got.tolist() == [False, False]
    empty = pa.array([], pa.string())
    erased = {"c1": dt.datetime(2024, 2, 1)}
    for got in (
        erased_rows(empty, pa.array([], pa.timestamp("us")), erased),
        still_erased(ConsentState(default_allow=True), empty, erased),
    ):
        assert got.dtype == bool and len(got) == 0
    assert erased_rows(customers, times, erased).tolist() == [True, False]
    assert still_erased(ConsentState(default_allow=True), customers, erased).tolist() == [
        True,
        False,
    ]


def test_a_certificate_fingerprint_is_of_the_first_certificate_of_the_pem():
    """`auth.certificate_sha256`: SHA-256 of the DER bytes of the first certificate in the
    text (bytes or str, other text around it ignored); anything else is refused."""
    import hashlib

    from nextbest.auth import certificate_sha256

    first, second = bytes(range(42)), bytes(range(1, 43))  # no base64 padding: see below
    # 42 bytes: base64 without "=" padding, after which a decoder would stop reading and so
    # hide a slice that ran on into the second certificate.
    chain = _pem(first) + _pem(second)
    expected = hashlib.sha256(first).hexdigest()
    assert certificate_sha256(chain) == expected
    assert certificate_sha256(chain.decode()) == expected  # a str as well as bytes
    noisy = "é -----END CERTIFICATE----- before\n".encode() + chain  # not ASCII, a stray END
    assert certificate_sha256(noisy) == expected
    for bad in (b"no certificate here", _pem(first).split(b"-----END")[0]):
        with pytest.raises(ValueError) as info:
            certificate_sha256(bad)
        assert str(info.value) == "not a PEM certificate"
