"""Same data and seed → same model (README, `train.seed`): two trainings by the real CLI on the
same slice of the real Complete Journey data publish identical arrays, and two real servers on
the two versions answer SimilarProducts and RecommendProducts identically."""

from __future__ import annotations

import shutil

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import OPEN_SERVER_CONFIG, answer_only, prepared_complete_journey, run_cli

from nextbest.config import load_settings
from nextbest.server import create_server
from nextbest.store.artifacts import current_version
from nextbest.v1 import recommender_pb2 as pb
from nextbest.v1 import recommender_pb2_grpc as rpb

HOUSEHOLDS = 300
CONFIG = (
    """
[train]
cf_model = "{kind}"
candidates = ["{kind}"]
tune = false
bpr_iterations = 30
# Every core (0): what varied from run to run was a multi-threaded fit.
num_threads = 0
"""
    + OPEN_SERVER_CONFIG
)


@pytest.fixture(scope="module")
def cj_slice(tmp_path_factory):
    """The first HOUSEHOLDS households (id order) of Complete Journey, prepared by the CLI."""
    d = tmp_path_factory.mktemp("reproducible")
    prepared_complete_journey(d)
    events = pq.read_table(d / "data" / "events.parquet")
    ids = sorted(pc.unique(events["customer_id"]).to_pylist())[:HOUSEHOLDS]
    pq.write_table(
        events.filter(pc.is_in(events["customer_id"], pa.array(ids))), d / "slice.parquet"
    )
    return d


def arrays(folder) -> dict[str, np.ndarray]:
    """Every array of a published version (file:name → array)."""
    out = {}
    for path in sorted(folder.glob("*.np[yz]")):
        if path.suffix == ".npy":
            out[path.name] = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as npz:
                out.update({f"{path.name}:{k}": npz[k] for k in npz.files})
    return out


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal to the bit, NaN where the other has NaN."""
    return np.array_equal(a, b, equal_nan=a.dtype.kind == "f")


def answers(folder, settings, customers: list[str], products: list[str]) -> list:
    settings = settings.with_overrides(
        "serve", models_dir=str(folder), store=f"sqlite:///{folder / 'store.db'}"
    )
    running = create_server(settings)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = rpb.RecommenderStub(channel)
            similar = [
                stub.SimilarProducts(pb.SimilarProductsRequest(product_ids=[p], limit=20))
                for p in products
            ]
            recommended = [
                answer_only(
                    stub.RecommendProducts(pb.RecommendProductsRequest(customer_id=c, limit=20))
                )
                for c in customers
            ]
    finally:
        running.stop(0)
    for answer in (*similar, *recommended):
        answer.model_version = ""  # the two versions' names differ, nothing else may
    return [*similar, *recommended]


@pytest.mark.parametrize("kind", ["als", "bpr", "cosine", "bm25"])
def test_two_trainings_on_the_same_data_give_the_same_model(cj_slice, tmp_path, kind):
    config = tmp_path / "nextbest.toml"
    config.write_text(CONFIG.format(kind=kind))
    models = tmp_path / "models"
    train = [
        "train", "--config", str(config), "--events", str(cj_slice / "slice.parquet"),
        "--catalog", str(cj_slice / "data" / "catalog.parquet"), "--models-dir", str(models),
        "--no-progress", "--store", f"sqlite:///{tmp_path / 'train-store.db'}",
    ]  # fmt: skip
    versions = []
    for copy in ("first", "second"):
        run_cli(*train)
        versions.append(current_version(models))
        shutil.copytree(models, tmp_path / copy)
    assert versions[0] != versions[1]
    first = arrays(tmp_path / "first" / versions[0])
    second = arrays(tmp_path / "second" / versions[1])
    assert first.keys() == second.keys() and first
    differ = [k for k in first if not same(first[k], second[k])]
    assert differ == [], differ

    users, items = first["ids.npz:user_ids"], first["ids.npz:item_ids"]
    customers = [str(c) for c in users[:: len(users) // 20]][:20]
    products = [str(p) for p in items[:: len(items) // 20]][:20]
    settings = load_settings(config)
    a = answers(tmp_path / "first", settings, customers, products)
    b = answers(tmp_path / "second", settings, customers, products)
    assert a == b
