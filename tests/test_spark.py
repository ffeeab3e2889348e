"""The Spark engine (`train.engine = "spark"`): ALS fitted by Apache Spark MLlib on the matrix
training.py prepares, published in the usual format and served by the real server.

Tests marked `spark` need the `spark` extra (pyspark) and Java 17+; they share one local[2]
SparkSession (Spark takes a while to start). Without pyspark or Java they are skipped, and fail
when CI is true. The other tests here check the one-line errors and that serving never imports
pyspark; they need neither.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import scipy.sparse as sp
from conftest import (
    SERVED_CONFIG,
    served_catalog,
    served_content,
    served_settings,
    synthetic_events,
    train,
)
from test_models import CFContract

from nextbest.config import TrainSettings, load_settings
from nextbest.errors import ConfigError, EngineError
from nextbest.store.artifacts import load_bundle, read_manifest
from nextbest.training import fit_cf

MASTER = "local[2]"


@pytest.fixture(scope="module")
def spark_session(tmp_path_factory):
    """One local[2] SparkSession for every Spark test of this module (its JVM stopped after)."""
    try:
        from nextbest.spark_engine import check_available

        check_available()
    except EngineError as exc:
        pytest.skip(f"{exc}; the Spark tests must run in CI")  # a failure there (conftest.py)
    from nextbest.spark_engine import _stop_jvm, start_session

    log = tmp_path_factory.mktemp("spark") / "jvm.log"
    settings = TrainSettings(spark_master=MASTER, spark_driver_memory="1g")
    spark, started = start_session(settings, log)
    yield spark
    spark.stop()
    if started:
        _stop_jvm()


# --- the fit: implicit's contract on a tiny matrix with known answers -----------------------------


@pytest.mark.spark
class TestSparkALS(CFContract):
    """Every CF contract of test_models.py, with ALS fitted by Spark (one fit for the class)."""

    kind = "als"
    fitted: dict = {}

    @pytest.fixture(autouse=True)
    def _engine(self, spark_session, tmp_path_factory):
        from nextbest.spark_engine import SparkALS

        if not self.fitted:
            checkpoints = tmp_path_factory.mktemp("checkpoints")
            settings = TrainSettings(
                engine="spark", spark_master=MASTER, spark_checkpoint_dir=str(checkpoints)
            )
            with SparkALS(settings, session=spark_session) as engine:
                model, matrix = self._fit_with(engine)
                described = engine.describe()
            self.fitted.update(
                model=model, matrix=matrix, checkpoints=checkpoints, described=described
            )

    def _fit_with(self, engine):
        from test_models import tiny_matrix

        settings = load_settings(None, environ={}).with_overrides(
            "train", als_iterations=15, engine="spark", spark_master=MASTER
        )
        matrix = tiny_matrix()
        return fit_cf("als", matrix, settings, als=(2, 0.01, 10.0), engine=engine), matrix

    def fit(self):
        return self.fitted["model"], self.fitted["matrix"]

    def test_factors_are_plain_float32_arrays_in_matrix_order(self):
        model, matrix = self.fit()
        arrays = model.arrays()
        assert arrays["user_factors"].shape == (matrix.shape[0], 2)
        assert arrays["item_factors"].shape == (matrix.shape[1], 2)
        assert arrays["user_factors"].dtype == np.float32
        # Users of one block agree with each other and not with the other block.
        uf = arrays["user_factors"] / np.linalg.norm(arrays["user_factors"], axis=1, keepdims=True)
        cos = uf @ uf.T
        assert cos[0, 1] > 0.9 and cos[0, 5] < 0.5

    def test_checkpoints_are_removed_and_the_fit_is_described(self):
        assert list(self.fitted["checkpoints"].iterdir()) == []
        described = self.fitted["described"]
        assert described["engine"] == "spark" and described["master"] == MASTER
        (fit,) = described["fits"]
        # 3 pairs per customer in the tiny matrix: regParam = 0.01 / 3; implicit's confidence
        # alpha·r comes through the ratings, Spark's alpha is 1.
        assert fit["factors"] == 2 and fit["alpha"] == 10.0 and fit["spark_alpha"] == 1.0
        assert fit["reg_param"] == pytest.approx(0.01 / 3)


def test_spark_inputs_reproduce_implicits_confidence_and_regularization():
    from nextbest.spark_engine import MIN_RATING, spark_inputs

    matrix = sp.csr_matrix(np.array([[0.5, 2.0, 0.0], [0.05, 0.0, 0.0]], dtype=np.float32))
    ratings, reg_param, alpha = spark_inputs(matrix, 0.3, 10.0)
    # Spark's confidence 1 + alpha·rating equals implicit's 10·r (floored near 1 for small r).
    assert np.allclose(1.0 + alpha * ratings, [5.0, 20.0, 1.0 + MIN_RATING])
    assert reg_param == pytest.approx(0.3 / 1.5)  # 3 pairs over 2 customers


# --- end to end: nextbest train --engine spark, then the real server answers through gRPC -------


@pytest.fixture(scope="module")
def spark_trained(spark_session, tmp_path_factory) -> Path:
    """A model trained and published by `nextbest train --engine spark` (a real process)."""
    d = tmp_path_factory.mktemp("spark-served")
    (d / "nextbest.toml").write_text(SERVED_CONFIG)
    pq.write_table(synthetic_events(), d / "events.parquet")
    pacsv.write_csv(served_catalog(), d / "catalog.csv")
    pacsv.write_csv(served_content(), d / "content.csv")
    train(d, d / "models", "--engine", "spark", "--spark-master", MASTER, "--store", store(d))
    return d


def store(d: Path) -> str:
    return f"sqlite:///{d / 'store.db'}"


@pytest.mark.spark
def test_a_spark_trained_model_is_published_and_served_through_grpc(spark_trained):
    from nextbest.server import create_server
    from nextbest.v1 import recommender_pb2 as pb
    from nextbest.v1 import recommender_pb2_grpc as rpb

    models = spark_trained / "models"
    bundle = load_bundle(models)
    manifest = read_manifest(models, bundle.version)
    assert manifest["cf_model"] == "als"
    assert manifest["params"]["als_engine"] == "spark"
    spark = manifest["params"]["spark"]
    assert spark["master"] == MASTER and len(spark["fits"]) == 2  # the grid's one entry + final
    assert np.abs(bundle.cf.arrays()["item_factors"]).sum() > 0
    running = create_server(served_settings(spark_trained, models))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = rpb.RecommenderStub(channel)
            answers = {
                c: stub.RecommendProducts(
                    pb.RecommendProductsRequest(customer_id=f"c{c:03d}", limit=5), timeout=30
                )
                for c in range(2, 42)
            }
            similar = stub.SimilarProducts(
                pb.SimilarProductsRequest(product_ids=["p004"], limit=5), timeout=30
            )
    finally:
        running.stop(0)
    answer = answers[2]
    assert answer.personalized and answer.model_version == bundle.version
    assert len(answer.items) == 5
    scores = [item.score for item in answer.items]
    assert scores == sorted(scores, reverse=True)
    # Two taste groups in the synthetic data (even and odd customers buy even and odd products):
    # the recommendations keep to the customer's group, 90 % of them as with implicit.
    own = [int(i.product_id[1:]) % 2 == c % 2 for c, a in answers.items() for i in a.items]
    assert len(own) == 200 and sum(own) / len(own) >= 0.8
    assert sum(int(item.product_id[1:]) % 2 == 0 for item in similar.items) >= 4


# --- no Spark needed: one-line errors, and serving never imports pyspark ------------------------


def _cli(script: str, tmp_path: Path, env: dict[str, str] | None = None):
    events = tmp_path / "events.parquet"
    pq.write_table(synthetic_events(), events)
    args = ["train", "--events", str(events), "--models-dir", str(tmp_path / "models")]
    args += ["--default-consent", "allow", "--engine", "spark"]
    code = f"{script}\nfrom nextbest.cli import main\nraise SystemExit(main({args!r}))"
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_without_pyspark_train_stops_with_one_line_naming_the_extra(tmp_path):
    done = _cli("import sys; sys.modules['pyspark'] = None", tmp_path)
    assert done.returncode == 2
    assert done.stderr == "error: --engine spark needs pyspark: pip install 'nextbest[spark]'\n"
    assert not (tmp_path / "models").exists()


def test_without_java_train_stops_with_one_line(tmp_path):
    fake_pyspark = "import sys, types; sys.modules['pyspark'] = types.ModuleType('pyspark')"
    done = _cli(fake_pyspark, tmp_path, env={"JAVA_HOME": str(tmp_path / "no-java")})
    assert done.returncode == 2
    assert done.stderr.startswith("error: --engine spark needs Java 17 or 21: no $JAVA_HOME")
    assert done.stderr.count("\n") == 1


def test_serving_and_implicit_training_never_import_pyspark():
    code = (
        "import sys\n"
        "import nextbest.cli, nextbest.server, nextbest.service, nextbest.training\n"
        "import nextbest.store.artifacts\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] in ('pyspark', 'py4j')\n"
        "          or m == 'nextbest.spark_engine']\n"
        "print(loaded)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_engine_settings_are_validated():
    settings = load_settings(None, environ={})
    assert settings.train.engine == "implicit" and settings.train.spark_master == "local[*]"
    with pytest.raises(ConfigError, match="train.engine must be implicit or spark"):
        settings.with_overrides("train", engine="flink")
    with pytest.raises(ConfigError, match="fits ALS only"):
        settings.with_overrides("train", engine="spark", cf_model="bm25")
    with pytest.raises(ConfigError, match="spark_driver_memory"):
        settings.with_overrides("train", spark_driver_memory="two gigs")
