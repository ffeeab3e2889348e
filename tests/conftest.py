"""Shared fixtures: small synthetic purchase logs written as real CSV/Parquet files."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from nextbest.config import load_settings
from nextbest.store.artifacts import current_version

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


# --- one skip policy: in CI nothing is skipped ---------------------------------------------------


def in_ci() -> bool:
    """Is `CI` set to a true value (true, 1 or yes, any case)? `.ci/run` sets CI=true."""
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def _skip_fails_in_ci(report) -> None:
    if report.skipped and in_ci() and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"CI={os.environ['CI']}: a skip is a failure in CI ({reason})"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI every skip (a missing PostgreSQL, Java, node or chromium) fails the test."""
    outcome = yield
    _skip_fails_in_ci(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """...and so does a module skipped as a whole."""
    outcome = yield
    _skip_fails_in_ci(outcome.get_result())


def readme_roles() -> dict[str, str | None]:
    """The README's role table: service → the role it needs (None = open; key `*` = any other
    service). Read from the README, not from `nextbest.auth`, so a changed role in the code
    fails the tests that use it."""
    text = (REPO / "README.md").read_text()
    start = text.index("| service | role |")
    roles: dict[str, str | None] = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        service, role = (cell.strip() for cell in line.strip("|").split("|"))
        key = "*" if service == "any other service" else service.strip("`")
        roles[key] = None if role == "open" else role.split()[0].strip("`")
    return roles


def synthetic_events(
    n_customers: int = 80, n_products: int = 40, days: int = 120, seed: int = 7
) -> pa.Table:
    """Two taste groups (even / odd products), a few consumables bought every ~10 days, and
    one-off durable purchases; timestamps spread over `days` from 2024-01-01."""
    rng = np.random.default_rng(seed)
    start = dt.datetime(2024, 1, 1)
    rows = {"customer_id": [], "product_id": [], "timestamp": [], "event_type": [], "quantity": []}
    for c in range(n_customers):
        group = c % 2
        taste = [p for p in range(n_products) if p % 2 == group]
        consumable = taste[0]  # product 0 or 1: bought every ~10 days
        for day in range(int(rng.integers(0, 8)), days, 10):
            rows["customer_id"].append(f"c{c:03d}")
            rows["product_id"].append(f"p{consumable:03d}")
            rows["timestamp"].append(start + dt.timedelta(days=day, hours=int(rng.integers(8, 20))))
            rows["event_type"].append("purchase")
            rows["quantity"].append(1.0)
        for p in rng.choice(taste[1:], size=6, replace=False):
            rows["customer_id"].append(f"c{c:03d}")
            rows["product_id"].append(f"p{p:03d}")
            rows["timestamp"].append(start + dt.timedelta(days=int(rng.integers(0, days))))
            rows["event_type"].append("purchase")
            rows["quantity"].append(float(rng.integers(1, 3)))
    return pa.table(
        {
            "customer_id": rows["customer_id"],
            "product_id": rows["product_id"],
            "timestamp": pa.array(rows["timestamp"], pa.timestamp("us")),
            "event_type": rows["event_type"],
            "quantity": rows["quantity"],
        }
    )


def synthetic_catalog(n_products: int = 40) -> pa.Table:
    return pa.table(
        {
            "product_id": [f"p{p:03d}" for p in range(n_products)],
            "title": [f"Product {p}" for p in range(n_products)],
            "category": [
                "pantry" if p < 2 else ("pharmacy" if p in (6, 7) else "home")
                for p in range(n_products)
            ],
            "price": [1.0 + p for p in range(n_products)],
        }
    )


def evaluate_args(events_file: Path, catalog_file: Path, config: Path) -> list:
    """`nextbest evaluate` of the synthetic data at its usual cutoff, consent allowed (options
    are appended by the caller)."""
    return [
        "evaluate",
        "--events",
        events_file,
        "--catalog",
        catalog_file,
        "--config",
        config,
        "--cutoff",
        "2024-04-10",
        "--default-consent",
        "allow",
    ]


def write_csv(table: pa.Table, path: Path) -> Path:
    pacsv.write_csv(table, path)
    return path


def answer_only(response):
    """A copy of a RecommendProducts response without its attribution id (new for every answer),
    for comparing two answers; asserts the id is set on a personalized answer."""
    if response.personalized:
        assert len(response.attribution_id) == 32
    out = type(response)()
    out.CopyFrom(response)
    out.attribution_id = ""
    return out


@pytest.fixture
def events_file(tmp_path: Path) -> Path:
    path = tmp_path / "events.parquet"
    pq.write_table(synthetic_events(), path)
    return path


@pytest.fixture
def catalog_file(tmp_path: Path) -> Path:
    return write_csv(synthetic_catalog(), tmp_path / "catalog.csv")


@pytest.fixture
def small_config(tmp_path: Path) -> Path:
    """A config that trains fast on the synthetic data (small factors, short validation)."""
    path = tmp_path / "nextbest.toml"
    path.write_text(
        """
[train]
validation_days = 20
als_factors = 8
als_grid = ["8:0.05:10", "16:0.1:5"]
bpr_factors = 8
bpr_iterations = 20
item_neighbours = 10
candidate_pool = 20
num_threads = 1
"""
    )
    return path


# --- a served model: trained once per session by the real CLI, with a consent store -----------

SERVED_CONFIG = """
[train]
validation_days = 20
als_factors = 8
als_grid = ["8:0.05:10"]
candidates = ["als"]
bpr_factors = 8
bpr_iterations = 10
item_neighbours = 10
candidate_pool = 20
num_threads = 1

[policy]
default_consent = "allow"
sensitive_categories = ["pharmacy"]
# Fatigue off: these tests ask for the same customers again and again (test_events turns it on).
fatigue_demotion = 1.0

[serve]
host = "127.0.0.1"
port = 0
# Plaintext without tokens (tests/test_security.py covers TLS and tokens).
insecure = true
metrics_port = 0
reload_interval_s = 0.2
# One process: these tests count one server's log lines and metrics (tests/test_processes.py
# runs several).
processes = 1
"""
UNAVAILABLE_PRODUCT = "p010"
OPEN_SERVER_CONFIG = """
[policy]
default_consent = "allow"

[serve]
port = 0
insecure = true
metrics_port = -1
reload_interval_s = 0
processes = 1
"""
"""The [policy] and [serve] of tests that train their own model: every customer consents, one
plaintext process on a free port without metrics or reloads."""


def served_catalog() -> pa.Table:
    cat = synthetic_catalog()
    available = [p != UNAVAILABLE_PRODUCT for p in cat["product_id"].to_pylist()]
    return cat.append_column("available", pa.array(available))


def served_content() -> pa.Table:
    return pa.table(
        {
            "content_id": ["guide-pantry", "guide-home", "guide-pharmacy", "news-p020"],
            "title": ["Pantry guide", "Home guide", "Pharmacy guide", "About product 20"],
            "kind": ["guide", "guide", "guide", "article"],
            "product_ids": ["", "", "", "p020"],
            "categories": ["pantry", "home", "pharmacy", ""],
            "sensitivity": [0.0, 0.0, 1.0, 0.0],
        }
    )


def train(workdir: Path, models: Path, *extra: str) -> str:
    """Train and publish with the real CLI; returns the new version."""
    cmd = [
        sys.executable,
        "-m",
        "nextbest.cli",
        "train",
        "--config",
        str(workdir / "nextbest.toml"),
        "--events",
        str(workdir / "events.parquet"),
        "--catalog",
        str(workdir / "catalog.csv"),
        "--content",
        str(workdir / "content.csv"),
        "--models-dir",
        str(models),
        *extra,
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return current_version(models)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("serve")
    (d / "nextbest.toml").write_text(SERVED_CONFIG)
    pq.write_table(synthetic_events(), d / "events.parquet")
    pacsv.write_csv(served_catalog(), d / "catalog.csv")
    pacsv.write_csv(served_content(), d / "content.csv")
    pacsv.write_csv(
        pa.table(
            {
                "customer_id": ["c000", "c001"],
                "purpose": ["sensitive", "personalization"],
                "granted": ["false", "false"],
                "updated_at": ["2024-01-01", "2024-01-01"],
            }
        ),
        d / "consent.csv",
    )
    done = subprocess.run(
        [sys.executable, "-m", "nextbest.cli", "consent", "import", str(d / "consent.csv")]
        + ["--store", store_url(d), "--source", "test-fixture"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "2 applied" in done.stdout
    train(d, d / "models")
    before = _store_rows(d)
    yield d
    # Shared by the whole session: a test that writes consent, events or impressions must work
    # on a copy (`own`, `module_own`), or the order of the tests would change what others see.
    assert _store_rows(d) == before, "a test wrote to the session's store: use a copy"


def _store_rows(folder: Path) -> dict[str, int]:
    """Rows per table of the store in `folder` (read only)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(f"file:{folder / 'store.db'}?mode=ro", uri=True)) as db:
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        return {t: db.execute(f'SELECT COUNT(*) FROM "{t}"').fetchone()[0] for t in tables}


PG_URL = os.environ.get("NEXTBEST_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
"""The PostgreSQL of the tests, the one setting every test reads: `NEXTBEST_TEST_POSTGRES`, by
default the machine's (and CI's) at 127.0.0.1:5432 (trust auth, database `test`)."""


@pytest.fixture
def pg_schema():
    """A fresh PostgreSQL schema name (dropped afterwards); skipped when PG is unreachable (a
    failure in CI: see `pytest_runtest_makereport`)."""
    from nextbest.store.consent_store import StoreError, open_store

    schema = f"nextbest_test_{uuid.uuid4().hex[:10]}"
    try:
        open_store(f"{PG_URL}?schema={schema}").close()
    except StoreError as exc:
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    yield schema
    import psycopg

    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def pg_store_url(pg_schema) -> str:
    """The store URL of a fresh PostgreSQL schema (see `pg_schema`)."""
    return f"{PG_URL}?schema={pg_schema}"


def serve_command(folder: Path, store: str) -> list[str]:
    """`nextbest serve` on a free port over `folder` (its config and models) and `store`."""
    return (
        [sys.executable, "-m", "nextbest.cli", "serve", "--port", "0"]
        + ["--config", str(folder / "nextbest.toml"), "--models-dir", str(folder / "models")]
        + ["--store", store]
    )


def store_url(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'store.db'}"


def copy_workdir(workdir: Path, dest: Path) -> Path:
    """A copy of the trained model, the store and the inputs in `dest`: a server writing
    consent, events or impressions there leaves the session's store as it was."""
    shutil.copytree(workdir / "models", dest / "models")
    shutil.copy(workdir / "store.db", dest / "store.db")
    for name in ("nextbest.toml", "events.parquet", "catalog.csv", "content.csv", "consent.csv"):
        shutil.copy(workdir / name, dest / name)
    return dest


@pytest.fixture
def own(workdir, tmp_path):
    """A copy of the trained model and of the store, so that changes stay in this test."""
    return copy_workdir(workdir, tmp_path)


@pytest.fixture(scope="module")
def module_own(workdir, tmp_path_factory):
    """Like `own`, shared by one test module (its module-scoped server writes there)."""
    return copy_workdir(workdir, tmp_path_factory.mktemp("module"))


@pytest.fixture(scope="module")
def running(module_own):
    """A real server on a free port over `module_own`, shared by one test module."""
    from nextbest.server import create_server

    running = create_server(served_settings(module_own, module_own / "models"))
    yield running
    running.stop(0)


def served_settings(workdir: Path, models: Path):
    s = load_settings(workdir / "nextbest.toml")
    return s.with_overrides("serve", models_dir=str(models), store=store_url(workdir))


def set_consent(consent, customer_id, purpose, granted, source="preference-center"):
    """Consent.SetConsent through a ConsentStub."""
    from nextbest.v1 import consent_pb2 as cpb

    return consent.SetConsent(
        cpb.SetConsentRequest(
            customer_id=customer_id, purpose=purpose, granted=granted, source=source
        ),
        timeout=10,
    )


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`nextbest ARGS...` as a subprocess; asserts it succeeded."""
    done = subprocess.run(
        [sys.executable, "-m", "nextbest.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return done


def prepared_complete_journey(folder: Path) -> Path:
    """`nextbest prepare complete-journey` of ../shared/data into `folder`/data (skipped when the
    data set is missing); returns that folder."""
    source = SHARED_DATA / "dunnhumby_complete_journey"
    if not source.exists():
        pytest.skip("needs ../shared/data/dunnhumby_complete_journey")
    run_cli("prepare", "complete-journey", "--source", str(source), "--out", str(folder / "data"))
    return folder / "data"
