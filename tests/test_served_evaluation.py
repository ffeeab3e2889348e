"""What `nextbest evaluate` scores is what the running server serves.

`nextbest evaluate --export-served FILE --publish DIR` on real data (Online Retail, a time split)
writes the served list of every evaluated customer and publishes the model it evaluated; a real
gRPC server on that model, with its clock at the cutoff, must answer each customer with exactly
that list. Customers of the export are evaluated in one batch of up to 1,024 (the evaluation's
batch) and asked one by one from the server, so the batch and the single call must agree too.
"""

from __future__ import annotations

import subprocess
import sys

import grpc
import pyarrow.csv as pacsv
import pytest
from conftest import SHARED_DATA

from nextbest.config import load_settings
from nextbest.v1 import recommender_pb2 as pb
from nextbest.v1 import recommender_pb2_grpc as rpb

pytestmark = pytest.mark.slow

CUTOFF = "2011-11-01"
DEPTH = 50  # evaluation.SERVED_DEPTH: what the evaluation asks of the serving path
FAST = """
[train]
als_grid = ["64:0.5:2"]
candidates = ["als"]
"""


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("served-eval")
    data = folder / "or"
    source = SHARED_DATA / "online_retail_uci"
    nextbest = [sys.executable, "-m", "nextbest.cli"]
    done = subprocess.run(
        [*nextbest, "prepare", "online-retail", "--source", str(source), "--out", str(data)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    (folder / "nextbest.toml").write_text(FAST)
    done = subprocess.run(
        [*nextbest, "evaluate", "--events", str(data / "events.parquet")]
        + ["--catalog", str(data / "catalog.parquet"), "--cutoff", CUTOFF]
        + ["--default-consent", "allow", "--config", str(folder / "nextbest.toml")]
        + ["--export-served", str(folder / "served.csv"), "--publish", str(folder / "models")]
        + ["--store", f"sqlite:///{folder / 'eval-store.db'}"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "durable rule: 0.00%" in done.stdout
    return folder


def _served_lists(evaluated) -> dict[str, list[str]]:
    """customer → the product ids `--export-served` wrote for them, in rank order."""
    served = pacsv.read_csv(evaluated / "served.csv")
    expected: dict[str, list[str]] = {}
    for c, p in zip(
        served["customer_id"].to_pylist(), served["product_id"].to_pylist(), strict=True
    ):
        expected.setdefault(str(c), []).append(str(p))
    return expected


def _server(evaluated, clock: str, store: str):
    """A real server on the evaluated model, its clock fixed at `clock`, consent allowed."""
    from nextbest.server import create_server

    settings = load_settings(evaluated / "nextbest.toml").with_overrides(
        "serve",
        models_dir=str(evaluated / "models"),
        store=f"sqlite:///{evaluated / store}",
        clock=clock,
        insecure=True,
        port=0,
        metrics_port=-1,
        reload_interval_s=0.0,
    )
    return create_server(settings.with_overrides("policy", default_consent="allow"))


def test_the_server_answers_exactly_the_evaluated_served_lists(evaluated):
    expected = _served_lists(evaluated)
    assert len(expected) > 1024, "more customers than one evaluation batch"
    running = _server(evaluated, CUTOFF, "serve-store.db")
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = rpb.RecommenderStub(channel)
            # Every 7th customer (about 190) keeps the test fast; each is one unary call.
            for customer in sorted(expected)[::7]:
                answer = stub.RecommendProducts(
                    pb.RecommendProductsRequest(
                        customer_id=customer, limit=DEPTH, channel=pb.CHANNEL_EMAIL
                    ),
                    timeout=10,
                )
                assert answer.personalized
                assert [i.product_id for i in answer.items] == expected[customer], customer
    finally:
        running.stop(0)


def test_a_different_clock_changes_the_answer(evaluated):
    """The clock is part of what is compared: answers judged 60 days later differ for some
    customers (so the equality above is not a property of any clock)."""
    expected = _served_lists(evaluated)
    running = _server(evaluated, "2012-01-01", "serve-store-2.db")
    differ = 0
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = rpb.RecommenderStub(channel)
            for customer in sorted(expected)[:60]:
                answer = stub.RecommendProducts(
                    pb.RecommendProductsRequest(customer_id=customer, limit=DEPTH), timeout=10
                )
                differ += [i.product_id for i in answer.items] != expected[customer]
    finally:
        running.stop(0)
    assert differ > 0
