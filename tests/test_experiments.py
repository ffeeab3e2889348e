"""Experiments through the real server: assignment (stable across restarts and replicas, shares
within binomial tolerance, nobody without consent), the control holdout, the arm and attribution
id in answers and impressions, the report against an independent count of the stored rows,
erasure, the sample-ratio check and refused configs."""

from __future__ import annotations

import datetime as dt
import json
import math
import sqlite3
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from conftest import answer_only, serve_command, served_settings, store_url, train
from google.protobuf.timestamp_pb2 import Timestamp

from nextbest.config import load_settings
from nextbest.errors import ConfigError
from nextbest.experiments.attribution import Purchase, attribute
from nextbest.server import create_server
from nextbest.store.consent_store import Impression
from nextbest.v1 import (
    consent_pb2,
    consent_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    lifecycle_pb2,
    lifecycle_pb2_grpc,
)
from nextbest.v1 import recommender_pb2 as pb
from nextbest.v1 import recommender_pb2_grpc as rpb

EXPERIMENT = """
[[experiments]]
name = "ab"
attribution_days = 7

[[experiments.variants]]
name = "served"
share = {served}

[[experiments.variants]]
name = "control"
share = {control}
control = true
"""
WINDOW = dt.timedelta(days=7)


def with_experiment(folder: Path, served: float = 0.5, control: float = 0.5) -> Path:
    config = folder / "nextbest.toml"
    base = config.read_text().split("\n[[experiments]]")[0]
    config.write_text(base + EXPERIMENT.format(served=served, control=control))
    return config


def start(folder: Path, store: str | None = None):
    settings = served_settings(folder, folder / "models")
    if store is not None:
        settings = settings.with_overrides("serve", store=store)
    return create_server(settings)


def ask(port: int, customer: str, channel=pb.CHANNEL_WEB, limit: int = 5):
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return rpb.RecommenderStub(ch).RecommendProducts(
            pb.RecommendProductsRequest(customer_id=customer, limit=limit, channel=channel),
            timeout=10,
        )


def record(port: int, rows: list[tuple[str, str, dt.datetime, float | None]]) -> int:
    events = []
    for customer, product, at, value in rows:
        ts = Timestamp()
        ts.FromDatetime(at)
        e = events_pb2.Event(customer_id=customer, product_id=product, timestamp=ts)
        if value is not None:
            e.value = value
        events.append(e)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        reply = events_pb2_grpc.EventsStub(ch).RecordEvents(
            events_pb2.RecordEventsRequest(events=events), timeout=10
        )
    return reply.recorded


def report(folder: Path, store: str, config: Path | None = None) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "nextbest.cli", "experiments", "report", "--json"]
        + ["--config", str(config or folder / "nextbest.toml"), "--store", store],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def arms_of(data: dict, name: str = "ab") -> dict[str, dict]:
    [experiment] = [e for e in data["experiments"] if e["name"] == name]
    return {a["variant"]: a for a in experiment["arms"]}


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(tzinfo=None)


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (EXPERIMENT.format(served=0.5, control=0.4), "experiments[0].variants shares sum to 0.9"),
        (
            EXPERIMENT.format(served=0.5, control=0.5).replace('name = "ab"', 'name = "a b"'),
            "experiments[0].name must be",
        ),
        (
            EXPERIMENT.format(served=0.5, control=0.5).replace(
                'share = 0.5\n\n[[experiments.variants]]\nname = "control"',
                'share = 0.5\npolicy = { default_consent = "allow" }\n\n'
                '[[experiments.variants]]\nname = "control"',
            ),
            "experiments[0].variants[0].policy has an unknown key default_consent",
        ),
        (
            EXPERIMENT.format(served=0.5, control=0.5).replace(
                'share = 0.5\n\n[[experiments.variants]]\nname = "control"',
                "share = 0.5\npolicy = { min_value = -1.0 }\n\n"
                '[[experiments.variants]]\nname = "control"',
            ),
            "experiments[0].variants[0].policy.min_value",
        ),
        (
            EXPERIMENT.format(served=0.5, control=0.5).replace("control = true", "control = 1"),
            "experiments[0].variants[1].control must be true or false",
        ),
        (
            EXPERIMENT.format(served=0.5, control=0.5).replace(
                "attribution_days = 7", "attribution_days = 0"
            ),
            "experiments[0].attribution_days must be in (0, 365]",
        ),
        (
            EXPERIMENT.format(served=0.5, control=0.5) * 2,
            "experiments has two experiments with one name",
        ),
        (
            EXPERIMENT.format(served=1.0, control=0.0).split(
                '[[experiments.variants]]\nname = "control"'
            )[0],
            "experiments[0].variants needs two or more",
        ),
    ],
)
def test_bad_experiment_configs_name_the_key(tmp_path, text, message) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as raised:
        load_settings(path, environ={})
    assert message in str(raised.value)


def test_serve_refuses_a_bad_experiment_config_at_start(own) -> None:
    """`nextbest serve` exits with the key named, before it listens."""
    config = with_experiment(own, 0.5, 0.4)
    done = subprocess.run(serve_command(own, store_url(own)), capture_output=True, text=True)
    assert done.returncode != 0 and "nextbest serving on" not in done.stdout
    assert "experiments[0].variants shares sum to 0.9, not 1" in done.stderr
    assert "Traceback" not in done.stderr
    config = with_experiment(own, 0.5, 0.5)
    text = config.read_text().replace("control = true", 'model_version = "no-such-version"')
    config.write_text(text)
    done = subprocess.run(serve_command(own, store_url(own)), capture_output=True, text=True)
    assert done.returncode != 0
    assert "experiments[0].variants[1].model_version: 'no-such-version' is not a model" in (
        done.stderr
    )
    assert "Traceback" not in done.stderr


# --- assignment -----------------------------------------------------------------------------


def test_assignment_is_stable_across_restarts_and_replicas(own, pg_store_url) -> None:
    """Two replicas on one PostgreSQL agree on every customer's arm, and so does a restarted
    one; over 1,000 customers the shares are within 4 standard deviations of the config's."""
    with_experiment(own, 0.7, 0.3)
    customers = [f"c{k:03d}" for k in range(2, 80)] + [f"new-{k:04d}" for k in range(922)]
    a, b = start(own, pg_store_url), start(own, pg_store_url)
    try:
        arm_a = {c: ask(a.port, c).experiment.variant for c in customers}
        arm_b = {c: ask(b.port, c).experiment.variant for c in customers}
    finally:
        a.stop(0)
    c = start(own, pg_store_url)
    try:
        arm_c = {x: ask(c.port, x).experiment.variant for x in customers}
    finally:
        c.stop(0)
        b.stop(0)
    assert arm_a == arm_b == arm_c
    served = sum(v == "served" for v in arm_a.values())
    n = len(customers)
    assert set(arm_a.values()) == {"served", "control"}
    assert abs(served - 0.7 * n) <= 4 * math.sqrt(n * 0.7 * 0.3), served


def test_the_control_gets_best_sellers_and_no_consent_means_no_experiment(own) -> None:
    with_experiment(own)
    running = start(own)
    try:
        answers = {c: ask(running.port, c) for c in [f"c{k:03d}" for k in range(2, 40)]}
        served = [r for r in answers.values() if r.experiment.variant == "served"]
        control = [r for r in answers.values() if r.experiment.variant == "control"]
        assert served and control
        assert all(r.personalized and r.experiment.experiment == "ab" for r in served)
        assert all(len(r.attribution_id) == 32 for r in served + control)
        for r in control:
            assert not r.personalized
            assert r.not_personalized_reason == pb.NOT_PERSONALIZED_REASON_HOLDOUT
            assert "not personalized: holdout" in r.decisions
        # c001 has no personalization consent (the fixture's consent file): outside every
        # experiment, nothing recorded; its best sellers are the control's.
        outside = ask(running.port, "c001")
        assert not outside.HasField("experiment") and outside.attribution_id == ""
        assert outside.not_personalized_reason == pb.NOT_PERSONALIZED_REASON_NO_CONSENT
        assert [i.product_id for i in outside.items] == [i.product_id for i in control[0].items]
        # The same arm on every channel.
        for r in served[:3] + control[:3]:
            other = ask(running.port, r.customer_id, channel=pb.CHANNEL_EMAIL)
            assert other.experiment == r.experiment
        # NextBestAction and ScoreContent carry the arm too.
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            who = served[0].customer_id
            nba = lifecycle_pb2_grpc.LifecycleStub(ch).NextBestAction(
                lifecycle_pb2.NextBestActionRequest(customer_id=who), timeout=10
            )
            assert nba.experiment.variant == "served"
            scored = rpb.RecommenderStub(ch).ScoreContent(
                pb.ScoreContentRequest(
                    customer_id=control[0].customer_id,
                    candidates=[pb.ContentCandidate(content_id="guide-home")],
                ),
                timeout=10,
            )
            assert scored.experiment.variant == "control" and not scored.personalized
        running.impressions.flush()
        shown = running.store.impressions()
    finally:
        running.stop(0)
    assert "c001" not in {i.customer_id for i in shown}
    by_id = {}
    for i in shown:
        by_id.setdefault(i.attribution_id, []).append(i)
    for r in served + control:
        rows = sorted(by_id[r.attribution_id], key=lambda i: i.rank)
        assert [i.product_id for i in rows] == [x.product_id for x in r.items]
        assert [i.rank for i in rows] == list(range(1, len(r.items) + 1))
        assert {(i.experiment, i.variant, i.channel, i.model_version) for i in rows} == {
            ("ab", r.experiment.variant, "web", r.model_version)
        }


def test_an_arm_can_pin_an_older_model_version(own) -> None:
    old = train(own, own / "models")
    new = train(own, own / "models")
    assert old != new
    config = with_experiment(own)
    config.write_text(config.read_text().replace("control = true", f'model_version = "{old}"'))
    running = start(own)
    try:
        answers = [ask(running.port, f"c{k:03d}") for k in range(2, 30)]
    finally:
        running.stop(0)
    pinned = [r for r in answers if r.experiment.variant == "control"]
    latest = [r for r in answers if r.experiment.variant == "served"]
    assert pinned and latest
    assert {r.model_version for r in pinned} == {old}
    assert {r.model_version for r in latest} == {new}
    assert all(r.personalized for r in pinned)


# --- attribution and the report ---------------------------------------------------------------


def independent_count(store: str, days: float = 7.0) -> dict[str, dict[str, float]]:
    """Per variant of experiment `ab`: customers, impressions, last-touch purchases, their
    value and any-touch purchases, by plain SQL on the stored rows and a loop."""
    if store.startswith("sqlite"):
        conn = sqlite3.connect(store.removeprefix("sqlite:///"))
        to_dt = dt.datetime.fromtimestamp  # stored as integer microseconds? converted below
    else:
        import psycopg

        base, _, schema = store.partition("?schema=")
        conn = psycopg.connect(base, options=f"-c search_path={schema}")
        to_dt = None
    cur = conn.cursor()
    cur.execute(
        "SELECT customer_id, product_id, shown_at, variant FROM nextbest_impressions "
        "WHERE experiment = 'ab'"
    )
    impressions = cur.fetchall()
    cur.execute(
        'SELECT customer_id, product_id, "timestamp", value FROM nextbest_events '
        "WHERE event_type = 'purchase'"
    )
    purchases = cur.fetchall()
    conn.close()

    def when(x):
        if isinstance(x, dt.datetime):
            return x
        return dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=int(x))

    del to_dt
    out: dict[str, dict[str, float]] = {}
    for variant in ("served", "control"):
        rows = [i for i in impressions if i[3] == variant]
        out[variant] = {
            "customers": len({i[0] for i in rows}),
            "impressions": len(rows),
            "attributed_purchases": 0,
            "attributed_value": 0.0,
            "any_touch_purchases": 0,
        }
    for customer, product, at, value in purchases:
        at = when(at)
        touches = [
            (when(i[2]), i[3])
            for i in impressions
            if i[0] == customer and i[1] == product and at - WINDOW <= when(i[2]) <= at
        ]
        if not touches:
            continue
        last = max(touches)[1]
        out[last]["attributed_purchases"] += 1
        out[last]["attributed_value"] += value or 0.0
        for variant in {v for _, v in touches}:
            out[variant]["any_touch_purchases"] += 1
    return out


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_report_equals_an_independent_count_and_erasure_changes_it(
    own, backend, request
) -> None:
    store = store_url(own) if backend == "sqlite" else request.getfixturevalue("pg_store_url")
    with_experiment(own)
    running = start(own, store)
    try:
        answers = {c: ask(running.port, c) for c in [f"c{k:03d}" for k in range(2, 60)]}
        t = now() + dt.timedelta(minutes=1)
        rows = []
        for k, (c, r) in enumerate(sorted(answers.items())):
            shown = [i.product_id for i in r.items]
            if k % 3 == 0:
                rows.append((c, shown[0], t, 2.5))  # shown: attributed, value known
            if k % 3 == 1:
                rows.append((c, shown[-1], t, None))  # shown, value unknown
                rows.append((c, shown[1], t + dt.timedelta(days=8), 1.0))  # after the window
            rows.append((c, "p039" if "p039" not in shown else "p038", t, 9.0))  # not shown
        assert record(running.port, rows) == len(rows)
        running.impressions.flush()
        metric = {
            v: running.metrics.attributed_purchases.labels("ab", v)._value.get()
            for v in ("served", "control")
        }
    finally:
        running.stop(0)
    expected = independent_count(store)
    got = arms_of(report(own, store))
    for variant in ("served", "control"):
        for key, value in expected[variant].items():
            assert got[variant][key] == pytest.approx(value, abs=1e-9), (variant, key)
        assert got[variant]["customers"] > 0 and got[variant]["attributed_purchases"] > 0
    # The counter counts at RecordEvents what the report finds (last touch).
    assert metric == {v: got[v]["attributed_purchases"] for v in ("served", "control")}
    # The served arm's lift is reported against the control, with an interval around it.
    lift = got["served"]["purchases_lift"]
    assert lift["low"] <= lift["value"] <= lift["high"]
    assert got["control"]["purchases_lift"]["value"] is None

    # Erase one attributed customer of the served arm: their impressions and attributions go.
    victim = next(
        c for k, (c, r) in enumerate(sorted(answers.items()))
        if k % 3 == 0 and r.experiment.variant == "served"
    )  # fmt: skip
    running = start(own, store)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            consent_pb2_grpc.ConsentStub(ch).ForgetCustomer(
                consent_pb2.ForgetCustomerRequest(customer_id=victim, source="dsar"), timeout=10
            )
    finally:
        running.stop(0)
    after = arms_of(report(own, store))
    assert after["served"]["customers"] == got["served"]["customers"] - 1
    assert after["served"]["attributed_purchases"] == got["served"]["attributed_purchases"] - 1
    assert after["served"]["impressions"] == got["served"]["impressions"] - 5
    assert independent_count(store)["served"]["customers"] == after["served"]["customers"]


def test_the_sample_ratio_check_fires_on_a_skewed_assignment(own) -> None:
    """Served with a 90/10 split but reported against a 50/50 config: a mismatch; against the
    split it was served with: none."""
    with_experiment(own, 0.9, 0.1)
    running = start(own)
    try:
        for k in range(300):
            ask(running.port, f"srm-{k:04d}")
        running.impressions.flush()
    finally:
        running.stop(0)
    served_with = report(own, store_url(own))["experiments"][0]
    assert not served_with["sample_ratio_mismatch"] and served_with["srm_p"] > 0.001
    claimed = own / "claimed.toml"
    claimed.write_text(EXPERIMENT.format(served=0.5, control=0.5))
    skewed = report(own, store_url(own), config=claimed)["experiments"][0]
    assert skewed["sample_ratio_mismatch"] and skewed["srm_p"] < 1e-6
    text = subprocess.run(
        [sys.executable, "-m", "nextbest.cli", "experiments", "report"]
        + ["--config", str(claimed), "--store", store_url(own)],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "SAMPLE RATIO MISMATCH" in text


def test_record_events_refuses_a_bad_value(own) -> None:
    running = start(own)
    try:
        with pytest.raises(grpc.RpcError) as raised:
            record(running.port, [("c002", "p001", now(), -1.0)])
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert raised.value.details() == "events[0].value must be >= 0 (got -1.0)"
    finally:
        running.stop(0)


def test_attribution_windows_and_touches() -> None:
    t0 = dt.datetime(2024, 1, 10)
    shown = [
        Impression("c", "p", "web", t0 - dt.timedelta(days=9), "short", "a", "x1", 1),
        Impression("c", "p", "email", t0 - dt.timedelta(days=3), "long", "b", "x2", 2),
        Impression("c", "p", "web", t0 - dt.timedelta(days=1), "short", "a", "x3", 1),
        Impression("c", "p", "web", t0 + dt.timedelta(days=1), "short", "a", "x4", 1),  # after
        Impression("d", "p", "web", t0 - dt.timedelta(days=1), "short", "a", "x5", 1),
    ]
    got = attribute(
        [Purchase("c", "p", t0, 1.0, 3.0), Purchase("c", "q", t0), Purchase("e", "p", t0)],
        shown,
        {"short": 2.0, "long": 10.0},
    )
    assert len(got) == 1
    assert got[0].last_touch.attribution_id == "x3"
    assert [i.attribution_id for i in got[0].touches] == ["x2", "x3"]  # x1 is past its 2 days
    # An event dated in year 1 does not break the window arithmetic.
    assert attribute([Purchase("c", "p", dt.datetime(1, 1, 1))], shown, {}) == []


def test_answers_without_attribution_ids_compare_equal(own) -> None:
    """Two answers to one customer differ only in their attribution ids."""
    with_experiment(own)
    running = start(own)
    try:
        a, b = ask(running.port, "c005"), ask(running.port, "c005")
    finally:
        running.stop(0)
    assert a.attribution_id != b.attribution_id
    assert answer_only(a) == answer_only(b)


def test_the_report_attributes_purchases_of_a_training_file_too(own) -> None:
    """`--events FILE`: purchases in the next training data count; one also recorded through
    Events counts once."""
    with_experiment(own)
    running = start(own)
    try:
        answers = {c: ask(running.port, c) for c in ("c002", "c003", "c004", "c005")}
        running.impressions.flush()
        t = now() + dt.timedelta(minutes=1)
        first = [(c, r.items[0].product_id, t, 1.0) for c, r in answers.items()]
        assert record(running.port, first[:2]) == 2
    finally:
        running.stop(0)
    before = arms_of(report(own, store_url(own)))
    path = own / "next-training.csv"
    lines = ["customer_id,product_id,timestamp,event_type,quantity,value"]
    lines += [f"{c},{p},{at.isoformat()},purchase,1,1.0" for c, p, at, _ in first]
    path.write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "nextbest.cli", "experiments", "report", "--json"]
        + ["--config", str(own / "nextbest.toml"), "--store", store_url(own)]
        + ["--events", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    after = arms_of(json.loads(done.stdout))
    total = sum(a["attributed_purchases"] for a in before.values())
    assert total == 2
    assert sum(a["attributed_purchases"] for a in after.values()) == 4


def test_the_export_holds_the_arm_and_the_attributions_until_erasure(own) -> None:
    """ExportCustomerData (issue #17) of a customer in an experiment: their arm as the answers
    carry it, their impressions with arm, attribution id, rank and reasons, and the purchase
    attributed to the answer that showed it; after ForgetCustomer only the tombstone."""
    from nextbest.client import Client

    with_experiment(own)
    running = start(own)
    try:
        answer = ask(running.port, "c006", limit=3)
        running.impressions.flush()
        bought = answer.items[1].product_id
        assert record(running.port, [("c006", bought, now() + dt.timedelta(minutes=1), 4.5)])
        with Client(f"127.0.0.1:{running.port}") as nb:
            doc = nb.export("c006", source="dpo")
            outside = nb.export("c001", source="dpo")  # no personalization consent
            nb.forget("c006", source="dsar")
            erased = nb.export("c006", source="dpo")
    finally:
        running.stop(0)
    arm = answer.experiment
    assert doc["experiment_assignment"] == {
        "in_experiment": True,
        "reason": "",
        "experiment": arm.experiment,
        "variant": arm.variant,
        "control": arm.variant == "control",
    }
    assert [(i["product_id"], i["rank"], i["variant"]) for i in doc["impressions"]] == sorted(
        [(x.product_id, k, arm.variant) for k, x in enumerate(answer.items, start=1)],
        key=lambda t: t[0],
    )
    assert {i["attribution_id"] for i in doc["impressions"]} == {answer.attribution_id}
    assert all(i["reasons"] for i in doc["impressions"])
    [attributed] = doc["attributions"]
    assert attributed["product_id"] == bought and attributed["value"] == 4.5
    assert attributed["last_touch"]["attribution_id"] == answer.attribution_id
    assert attributed["last_touch"]["rank"] == 2 and attributed["touches"] == 1
    assert outside["experiment_assignment"]["reason"] == "no_consent"
    assert outside["impressions"] == [] and outside["attributions"] == []
    assert set(erased) - {"schema_version", "customer_id", "exported_at", "requested_by"} == {
        "tombstone"
    }
