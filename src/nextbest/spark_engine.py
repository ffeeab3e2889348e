"""Apache Spark MLlib ALS as a second training engine (`train.engine = "spark"`).

Only the ALS fit moves to Spark. `training.py` prepares the data exactly as for implicit (consent,
tombstones, sensitivity, event weights, recency decay, log1p) and hands the weighted user×item
matrix to `SparkALS.fit`, which sends it to Spark as an Arrow table of (user, item, rating) with
the matrix's 0..n-1 row and column indices as ids, fits `pyspark.ml.recommendation.ALS` with
implicit preferences and returns the factors as numpy arrays ordered by those indices. The bundle,
its artifacts and the server do not know which engine fitted the factors.

    with SparkALS(settings.train) as engine:          # starts Spark on first use, stops it at exit
        user_factors, item_factors = engine.fit(matrix, factors=64, regularization=0.05, alpha=10)

How the parameters relate (see `spark_inputs`): implicit solves each user's factors with
confidence alpha·r on observed pairs (1 on the others) and a fixed L2 weight λ; Spark uses
confidence 1 + alpha'·r' and weighs regParam by the user's (item's) number of observed pairs
(ALS-WR). So Spark gets r' = alpha·r − 1 (at least 0.001) with alpha' = 1, which reproduces
implicit's confidence, and regParam = λ / the mean number of pairs per customer, which
regularizes an average customer as implicit regularizes every one.

Imported only when the Spark engine is chosen: the serving path never imports pyspark.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from nextbest.config import TrainSettings
from nextbest.errors import EngineError

__all__ = ["PYSPARK_VERSION", "SparkALS", "check_available", "spark_inputs", "start_session"]

logger = logging.getLogger(__name__)

PYSPARK_VERSION = "4.3.0"
"""The pyspark release of the `spark` extra (pyproject.toml pins the same)."""
JAVA_VERSIONS = (17, 21)
"""Java releases Spark 4 runs on."""
_INSTALL_HINT = "pip install 'nextbest[spark]'"


def _java() -> str | None:
    home = os.environ.get("JAVA_HOME")
    if home:
        candidate = Path(home) / "bin" / "java"
        return str(candidate) if os.access(candidate, os.X_OK) else None
    return shutil.which("java")


def _under_spark_submit() -> bool:
    """True when this process is a driver started by spark-submit (its JVM is already running)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def check_available() -> None:
    """EngineError, one line, when pyspark or a suitable Java is missing (before any data is read).
    Costs one `java -version`; nothing when running under spark-submit, which found Java itself."""
    try:
        import pyspark
    except ImportError:
        raise EngineError(f"--engine spark needs pyspark: {_INSTALL_HINT}") from None
    if _under_spark_submit():
        return
    java = _java()
    where = "$JAVA_HOME/bin/java" if os.environ.get("JAVA_HOME") else "java on PATH"
    if java is None:
        raise EngineError(
            f"--engine spark needs Java {' or '.join(map(str, JAVA_VERSIONS))}: no {where} "
            "(install a JRE, e.g. Debian's openjdk-17-jre-headless, or set JAVA_HOME)"
        )
    try:
        done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise EngineError(f"--engine spark: {java} -version failed ({exc})") from None
    found = re.search(r'version "(\d+)(?:\.(\d+))?', done.stderr + done.stdout)
    major = int(found.group(1)) if found else 0
    if major == 1 and found and found.group(2):  # "1.8.0": Java 8
        major = int(found.group(2))
    if major < min(JAVA_VERSIONS):
        raise EngineError(
            f"--engine spark needs Java {' or '.join(map(str, JAVA_VERSIONS))}: {java} is "
            f"Java {major or 'of an unknown version'} (set JAVA_HOME to a newer one)"
        )
    if pyspark.__version__ != PYSPARK_VERSION:
        logger.warning(
            "pyspark %s installed, nextbest is tested with %s (%s)",
            pyspark.__version__,
            PYSPARK_VERSION,
            _INSTALL_HINT,
        )


def _is_local(master: str) -> bool:
    return master == "local" or master.startswith("local[")


def _conf(settings: TrainSettings) -> list[tuple[str, str]]:
    conf = [
        ("spark.app.name", "nextbest-train"),
        ("spark.master", settings.spark_master),
        ("spark.driver.memory", settings.spark_driver_memory),
        ("spark.ui.enabled", "false"),
        ("spark.ui.showConsoleProgress", "false"),
        # Larger Arrow batches than the default 10,000 rows when the matrix is sent to the JVM.
        ("spark.sql.execution.arrow.maxRecordsPerBatch", "131072"),
    ]
    if _is_local(settings.spark_master):
        # Everything on this machine: listen on the loopback only (no hostname lookup warning).
        conf += [("spark.driver.host", "127.0.0.1"), ("spark.driver.bindAddress", "127.0.0.1")]
    return conf


def start_session(settings: TrainSettings, jvm_log: str | Path | None = None):
    """A SparkSession for `settings` (master, driver memory), and whether its JVM was started here.

    The JVM's own console output (start-up banner, log4j, native BLAS notices) goes to `jvm_log`
    instead of this process's stdout and stderr; Spark's log level is WARN. Under spark-submit,
    or when a SparkContext already runs in this process, that session is used as it is."""
    from pyspark import SparkConf, SparkContext
    from pyspark.sql import SparkSession

    if _under_spark_submit() or SparkContext._active_spark_context is not None:
        spark = SparkSession.builder.getOrCreate()
        spark.sparkContext.setLogLevel("WARN")
        return spark, False
    conf = SparkConf(loadDefaults=False).setAll(_conf(settings))
    started = False
    if SparkContext._gateway is None:
        from pyspark.java_gateway import launch_gateway

        out = open(jvm_log, "ab") if jvm_log else subprocess.DEVNULL
        try:
            gateway = launch_gateway(
                conf, popen_kwargs={"stdout": out, "stderr": subprocess.STDOUT}
            )
        except Exception as exc:  # pyspark raises its own PySparkRuntimeError, not an OSError
            raise EngineError(
                f"Spark did not start ({type(exc).__name__}: {str(exc).splitlines()[0]})"
                + (f"; its output: {jvm_log}" if jvm_log else "")
            ) from None
        finally:
            if jvm_log:
                out.close()  # the JVM has its own descriptor
        SparkContext._gateway, SparkContext._jvm = gateway, gateway.jvm
        started = True
    sc = SparkContext(conf=conf)
    sc.setLogLevel("WARN")
    return SparkSession(sc), started


def _stop_jvm() -> None:
    """Shut down the py4j gateway and wait for its JVM (so its memory is freed and counted)."""
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    SparkContext._gateway, SparkContext._jvm = None, None
    if gateway is None:
        return
    proc = getattr(gateway, "proc", None)
    try:
        gateway.shutdown()
    except Exception as exc:  # a JVM that died already
        logger.debug("py4j shutdown: %s", exc)
    if proc is not None:
        if proc.stdin:
            proc.stdin.close()  # the gateway JVM exits when its stdin closes
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


MIN_RATING = 1e-3
"""Spark reads a rating <= 0 as 'not preferred': pairs whose implicit confidence is below 1
(heavily decayed) get this, i.e. a confidence of about 1, still preferred."""


def spark_inputs(
    matrix: sp.csr_matrix, regularization: float, alpha: float
) -> tuple[np.ndarray, float, float]:
    """(ratings for the matrix's stored pairs, regParam, alpha) that make Spark's implicit ALS
    solve the problem implicit's ALS solves with `regularization` and `alpha` on `matrix`.

    Confidence: implicit weighs an observed pair by alpha·r, Spark by 1 + alpha'·|r'|, so
    r' = alpha·r − 1 with alpha' = 1 gives the same weights (r' floored at MIN_RATING).
    Regularization: Spark (ALS-WR) multiplies regParam by each customer's (product's) number of
    pairs, implicit uses λ as it is, so regParam = λ / mean pairs per customer. Measured on
    Complete Journey, ALS alone, NDCG@10 all / new against implicit's: 0.97 / 0.97 at both
    64:0.05:10 and 64:0.5:2; passing λ and alpha unchanged gave 1.02 / 1.00 and 0.86 / 0.89,
    and matching only the confidence 1.10 / 1.02 and 0.79 / 0.73 (EVALUATION.md)."""
    ratings = np.maximum(alpha * matrix.data.astype(np.float64) - 1.0, MIN_RATING)
    customers = max(int(np.count_nonzero(np.diff(matrix.indptr))), 1)
    per_customer = max(matrix.nnz / customers, 1.0)
    return ratings.astype(np.float32), float(regularization / per_customer), 1.0


class SparkALS:
    """ALS fits on one Spark session, started on the first fit and stopped by `close()` (or at
    the end of a `with` block), checkpoint directory included. With `session`, that session is
    used and left running (tests share one)."""

    def __init__(self, settings: TrainSettings, *, session=None) -> None:
        self.settings = settings
        self._spark = session
        self._own_jvm = False
        self._own_session = session is None
        self._tmp: Path | None = None
        self._jvm_log: Path | None = None
        self.fits: list[dict[str, object]] = []
        """What each fit was given and took (for the manifest)."""

    def __enter__(self) -> SparkALS:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(failed=exc_type is not None)

    @property
    def spark(self):
        """The session (started here on first use)."""
        if self._spark is None:
            check_available()
            # Beside the temporary directory, not in it: kept after a failure. (Under spark-submit
            # the JVM is spark-submit's, and so is its output.)
            if not _under_spark_submit():
                self._jvm_log = Path(tempfile.gettempdir()) / f"nextbest-spark-{os.getpid()}.log"
            clock = time.perf_counter()
            self._spark, self._own_jvm = start_session(self.settings, self._jvm_log)
            logger.info(
                "Spark %s started (master %s) in %.1f s; its JVM output: %s",
                self._spark.version,
                self._spark.sparkContext.master,
                time.perf_counter() - clock,
                self._jvm_log or "spark-submit's",
            )
        return self._spark

    def describe(self) -> dict[str, object]:
        """The engine and its parameters, for the manifest."""
        import pyspark

        spark = self._spark
        return {
            "engine": "spark",
            "pyspark": pyspark.__version__,
            "master": spark.sparkContext.master if spark else self.settings.spark_master,
            "checkpoint_interval": self.settings.spark_checkpoint_interval,
            "reg_param": "regularization / mean pairs per customer (Spark weighs it by counts)",
            "rating": "max(alpha * log1p(weight) - 1, 0.001) with Spark's alpha 1 (confidence "
            "alpha * log1p(weight), as implicit's)",
            "fits": self.fits,
        }

    def _checkpoint_dir(self) -> str:
        base = self.settings.spark_checkpoint_dir
        if not base:
            if self._tmp is None:
                self._tmp = Path(tempfile.mkdtemp(prefix="nextbest-spark-"))
            return str(self._tmp / f"checkpoints-{uuid.uuid4().hex[:8]}")
        return f"{base.rstrip('/')}/nextbest-{uuid.uuid4().hex}"

    def _delete(self, directory: str) -> None:
        """Remove a directory through Hadoop's FileSystem (local, hdfs://, s3a://, ...)."""
        try:
            jvm = self._spark.sparkContext._jvm
            path = jvm.org.apache.hadoop.fs.Path(directory)
            path.getFileSystem(self._spark.sparkContext._jsc.hadoopConfiguration()).delete(
                path, True
            )
        except Exception as exc:  # never hide the fit's own outcome behind a clean-up failure
            logger.warning("could not remove Spark checkpoints %s: %s", directory, exc)

    def fit(
        self,
        matrix: sp.csr_matrix,
        *,
        factors: int,
        regularization: float,
        alpha: float,
        iterations: int,
        seed: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(user factors, item factors), float32, one row per matrix row / column, from Spark's
        ALS with implicit preferences on `matrix` (values r = log1p(weight), as implicit's ALS
        gets them) with implicit's `regularization` and `alpha`, translated by `spark_inputs`."""
        from pyspark.ml.recommendation import ALS

        spark = self.spark
        n_users, n_items = matrix.shape
        matrix = matrix.copy()
        matrix.eliminate_zeros()  # a stored zero is no observed pair
        values, reg_param, spark_alpha = spark_inputs(matrix, regularization, alpha)
        blocks = self.settings.spark_blocks or spark.sparkContext.defaultParallelism
        # Ids are the matrix's 0..n-1 row and column indices (int32, as Spark's ALS requires).
        rows = np.repeat(np.arange(n_users, dtype=np.int32), np.diff(matrix.indptr))
        ratings = pa.table(
            {
                "user": pa.array(rows),
                "item": pa.array(matrix.indices.astype(np.int32)),
                "rating": pa.array(values),
            }
        )
        checkpoints = self._checkpoint_dir()
        # Without a checkpoint directory ALS cannot cut its lineage and a long run can end in a
        # StackOverflowError; with one it checkpoints every checkpointInterval iterations.
        spark.sparkContext.setCheckpointDir(checkpoints)
        clock = time.perf_counter()
        logger.info(
            "Spark ALS: %d factors, regParam %.3g (regularization %g), alpha %g, %d iterations "
            "on %d × %d (%d pairs), %d blocks",
            factors,
            reg_param,
            regularization,
            alpha,
            iterations,
            n_users,
            n_items,
            matrix.nnz,
            blocks,
        )
        frame = None
        try:
            frame = spark.createDataFrame(ratings)
            als = ALS(
                rank=factors,
                maxIter=iterations,
                regParam=reg_param,
                alpha=spark_alpha,
                implicitPrefs=True,
                nonnegative=False,
                seed=seed,
                checkpointInterval=self.settings.spark_checkpoint_interval,
                numUserBlocks=blocks,
                numItemBlocks=blocks,
                userCol="user",
                itemCol="item",
                ratingCol="rating",
            )
            model = als.fit(frame)
            user_factors = _dense(model.userFactors.toArrow(), n_users, factors)
            item_factors = _dense(model.itemFactors.toArrow(), n_items, factors)
        except Exception as exc:
            if isinstance(exc, EngineError):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise EngineError(
                f"Spark ALS failed ({type(exc).__name__}: {first[:300]})"
                + (f"; Spark's output: {self._jvm_log}" if self._jvm_log else "")
            ) from exc
        finally:
            if frame is not None:
                frame.unpersist()
            self._delete(checkpoints)
        seconds = time.perf_counter() - clock
        logger.info("Spark ALS fitted in %.1f s", seconds)
        self.fits.append(
            {
                "factors": factors,
                "reg_param": reg_param,
                "spark_alpha": spark_alpha,
                "regularization": regularization,
                "alpha": alpha,
                "iterations": iterations,
                "blocks": blocks,
                "seconds": round(seconds, 2),
            }
        )
        return user_factors, item_factors

    def close(self, *, failed: bool = False) -> None:
        """Stop the session (if started here) and its JVM, and remove the temporary directory
        and the JVM's output file; after a failure that file is kept and named in the log."""
        try:
            if self._spark is not None and self._own_session:
                self._spark.stop()
                if self._own_jvm:
                    _stop_jvm()
        finally:
            self._spark = None if self._own_session else self._spark
            if self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
            log, self._jvm_log = self._jvm_log, None
            if log is not None and log.exists():
                if failed:
                    logger.error("Spark's JVM output is kept in %s", log)
                else:
                    log.unlink(missing_ok=True)


def _dense(table: pa.Table, rows: int, factors: int) -> np.ndarray:
    """Spark's (id, features) factor table → a (rows, factors) float32 array in id order; ids
    absent from the table (users or items without any observed pair) stay zero, as in implicit."""
    out = np.zeros((rows, factors), dtype=np.float32)
    if table.num_rows:
        ids = table["id"].to_numpy()
        values = pc.list_flatten(table["features"]).to_numpy(zero_copy_only=False)
        out[ids] = values.astype(np.float32).reshape(len(ids), factors)
    return out
