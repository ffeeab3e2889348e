"""Lifecycle.StreamAudience and `nextbest audience` on the real Complete Journey data: the same
customers with the same actions and products, erased customers in no audience, bad requests."""

from __future__ import annotations

import subprocess
import sys

import grpc
import pyarrow.csv as pacsv
import pytest
from conftest import OPEN_SERVER_CONFIG, prepared_complete_journey, run_cli

from nextbest.config import load_settings
from nextbest.v1 import consent_pb2, consent_pb2_grpc
from nextbest.v1 import lifecycle_pb2 as lpb
from nextbest.v1 import lifecycle_pb2_grpc as lrpc

CONFIG = (
    """
[train]
tune = false
candidates = ["als"]
"""
    + OPEN_SERVER_CONFIG
)
CLI = [sys.executable, "-m", "nextbest.cli"]


run = run_cli


@pytest.fixture(scope="module")
def cj(tmp_path_factory):
    d = tmp_path_factory.mktemp("audience")
    prepared_complete_journey(d)
    (d / "nextbest.toml").write_text(CONFIG)
    run(
        "train", "--config", str(d / "nextbest.toml"), "--events", str(d / "data/events.parquet"),
        "--catalog", str(d / "data/catalog.parquet"), "--content", str(d / "data/content.parquet"),
        "--models-dir", str(d / "models"), "--no-progress",
    )  # fmt: skip
    return d


@pytest.fixture(scope="module")
def server(cj):
    from nextbest.server import create_server

    settings = load_settings(cj / "nextbest.toml").with_overrides(
        "serve", models_dir=str(cj / "models"), store=f"sqlite:///{cj / 'store.db'}"
    )
    running = create_server(settings)
    channel = grpc.insecure_channel(f"127.0.0.1:{running.port}")
    yield channel
    channel.close()
    running.stop(0)


def exported(cj, *args: str) -> list[dict]:
    out = cj / "audience.csv"
    run(
        "audience", "--config", str(cj / "nextbest.toml"), "--models-dir", str(cj / "models"),
        "--store", f"sqlite:///{cj / 'store.db'}", "--output", str(out), *args,
    )  # fmt: skip
    return pacsv.read_csv(out).to_pylist()


def streamed(channel, **fields) -> list[lpb.AudienceMember]:
    stub = lrpc.LifecycleStub(channel)
    return list(stub.StreamAudience(lpb.StreamAudienceRequest(**fields), timeout=600))


def test_stream_audience_matches_the_export_on_complete_journey(cj, server):
    # The export first: the stream records what it sends as impressions (fatigue).
    rows = exported(cj, "--stage", "dormant", "--limit", "5")
    members = streamed(server, stage=lpb.STAGE_DORMANT, limit=5)
    assert len(rows) == len(members) > 10
    for row, m in zip(rows, members, strict=True):
        assert str(row["customer_id"]) == m.customer_id
        assert m.state.stage == lpb.STAGE_DORMANT and row["stage"] == "dormant"
        assert row["action"] == lpb.Action.Name(m.action).removeprefix("ACTION_").lower()
        products = "|".join(p.product_id for p in m.products)
        assert str(row["product_ids"] or "") == products
        assert abs(row["churn_risk"] - m.state.churn_risk) < 1e-6
    # Dormant customers get win-back products or, when valuable, a person.
    assert {m.action for m in members} <= {lpb.ACTION_WIN_BACK, lpb.ACTION_HUMAN_TOUCH}
    assert any(m.action == lpb.ACTION_WIN_BACK and m.products for m in members)


def test_an_erased_customer_is_in_no_audience(server):
    members = streamed(server, stage=lpb.STAGE_DORMANT, limit=3, max_customers=5)
    assert len(members) == 5
    gone = members[0].customer_id
    consent_pb2_grpc.ConsentStub(server).ForgetCustomer(
        consent_pb2.ForgetCustomerRequest(customer_id=gone, source="test"), timeout=10
    )
    for request in (
        {"stage": lpb.STAGE_DORMANT},
        {"action": lpb.ACTION_WIN_BACK},
        {"action": lpb.ACTION_HUMAN_TOUCH},
    ):
        assert gone not in {m.customer_id for m in streamed(server, limit=3, **request)}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "name exactly one of stage and action"),
        ({"stage": lpb.STAGE_DORMANT, "action": lpb.ACTION_REST}, "exactly one of stage"),
        ({"stage": 42}, "stage has an unknown value 42"),
        ({"stage": lpb.STAGE_NEW, "limit": 500}, "limit must be within 1..100"),
        ({"stage": lpb.STAGE_NEW, "max_customers": -1}, "max_customers must be >= 0"),
    ],
)
def test_bad_audience_requests(server, fields, message):
    with pytest.raises(grpc.RpcError) as info:
        streamed(server, **fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in info.value.details()


def test_bad_audience_export_arguments(cj, tmp_path):
    done = subprocess.run(
        [*CLI, "audience", "--models-dir", str(cj / "models"), "--stage", "dormant"]
        + ["--store", f"sqlite:///{tmp_path / 's.db'}", "--output", str(tmp_path / "a.json")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "--output must be a .csv or .parquet file" in done.stderr
    assert "Traceback" not in done.stderr
