"""`nextbest evaluate --report`: the metric curves, the activity views, and the HTML report rendered
in headless Chromium (every image loads; a screenshot is kept beside index.html)."""

from __future__ import annotations

import datetime as dt
import html
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
from conftest import evaluate_args

from nextbest.evaluation import (
    METRICS,
    Relevance,
    metric_curves,
    popularity_percentile,
    popularity_profile,
    ranking_metrics,
)
from nextbest.report import active_days_histogram, cohort_retention

NEXTBEST = [sys.executable, "-m", "nextbest.cli"]


def test_metric_curves_are_the_metrics_of_every_prefix():
    rng = np.random.default_rng(3)
    n_users, n_items, depth = 40, 30, 12
    keys, n_relevant = [], []
    for p in range(n_users):
        items = rng.choice(n_items, size=int(rng.integers(1, 6)), replace=False)
        keys.extend(p * n_items + items)
        n_relevant.append(len(items) + int(rng.integers(0, 2)))  # some unknown to the model
    rel = Relevance(
        users=np.arange(n_users), keys=np.sort(np.array(keys)), n_relevant=np.array(n_relevant)
    )
    ids = np.array([rng.choice(n_items, size=depth, replace=False) for _ in range(n_users)])
    ids[::7, -3:] = -1  # empty slots at the end of some rankings
    curves = metric_curves(ids, rel, n_items)
    for k in range(1, depth + 1):
        at_k = ranking_metrics(ids[:, :k], rel, n_items)
        for metric in METRICS:
            assert curves[metric][k - 1] == pytest.approx(at_k[metric], abs=1e-12), (metric, k)
        top = ids[:, :k]
        assert curves["coverage"][k - 1] == len(np.unique(top[top >= 0])) / n_items
    assert np.all(np.diff(curves["recall"]) >= 0) and np.all(np.diff(curves["hit_rate"]) >= 0)


def test_popularity_profile():
    popularity = np.array([50.0, 10, 10, 1, 0, 0, 0, 0, 0, 0])
    percentile = popularity_percentile(popularity)
    assert percentile[0] == 95.0 and percentile[1] == percentile[2] == 80.0
    assert percentile.mean() == pytest.approx(50.0)
    ids = np.array([[0, 1, -1], [0, 4, 5]])
    profile = popularity_profile(ids, popularity, top_share=0.1)
    assert profile["top_share"] == pytest.approx(2 / 5)  # item 0 is the top 10% (1 of 10)
    assert profile["mean_percentile"] == pytest.approx((95 + 80 + 95 + 30 + 30) / 5)


def _events(rows) -> pa.Table:
    customers, days = zip(*rows, strict=True)
    start = dt.datetime(2024, 1, 1)
    return pa.table(
        {
            "customer_id": list(customers),
            "product_id": ["p"] * len(rows),
            "timestamp": pa.array(
                [start + dt.timedelta(days=d, hours=9) for d in days], pa.timestamp("us")
            ),
            "event_type": ["purchase"] * len(rows),
        }
    )


def test_active_days_and_cohort_retention_known_answers():
    # a: January, February (twice the same day) and March; b: February and April; c: April only.
    # The data ends on 2024-04-10 (day 100); the last 30 days are 2024-03-12 .. 2024-04-10.
    events = _events(
        [("a", 5), ("a", 40), ("a", 40), ("a", 75), ("b", 45), ("b", 95), ("c", 91), ("c", 92)]
        + [("c", 100), ("c", 100)]
    )
    returns = _events([("a", 99)]).set_column(3, "event_type", pa.array(["return"]))
    active = active_days_histogram(pa.concat_tables([events, returns]), window=30)
    assert (active.first_day, active.last_day) == (dt.date(2024, 3, 12), dt.date(2024, 4, 10))
    # a: 1 day (03-16; its return on 04-09 is no purchase), b: 1 day (04-05), c: 3 days
    assert active.customers.tolist()[:4] == [2, 0, 1, 0]
    assert active.customers.sum() == 3 and len(active.customers) == 30

    cohorts = cohort_retention(events)
    assert cohorts.months == ["2024-01", "2024-02", "2024-03", "2024-04"]
    assert cohorts.sizes.tolist() == [1, 1, 0, 1]
    assert cohorts.last_month_days == 10
    share = np.where(np.isnan(cohorts.share), -1, cohorts.share)
    assert share.tolist() == [
        [1.0, 1.0, 1.0, 0.0],  # a
        [1.0, 0.0, 1.0, -1],  # b; beyond the data: NaN
        [-1, -1, -1, -1],  # nobody started in March
        [1.0, -1, -1, -1],  # c
    ]


# --- the report through the real CLI, rendered by headless Chromium ----------------------------

IMAGE_CHECK = """
<script>
window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "image-check";
  out.textContent = JSON.stringify([...document.images].map(
    (img) => ({src: img.getAttribute("src"), complete: img.complete, width: img.naturalWidth})));
  document.body.appendChild(out);
});
</script>
"""


def _chromium() -> str:
    path = shutil.which(os.environ.get("CHROMIUM", "chromium"))
    if path is None:
        reason = "chromium is not installed (`make chromium` installs Debian's package)"
        pytest.skip(reason)  # a failure in CI (conftest.py)
    return path


def _headless(chromium: str, profile, *args: str) -> subprocess.CompletedProcess:
    sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium refuses root otherwise
    return subprocess.run(
        [chromium, "--headless", "--disable-gpu", f"--user-data-dir={profile}", *sandbox, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_evaluate_report_renders_in_headless_chromium(
    tmp_path, events_file, catalog_file, small_config
):
    chromium = _chromium()
    report = tmp_path / "report"
    args = [
        *evaluate_args(events_file, catalog_file, small_config),
        "--k",
        "5",
        "--report",
        report,
    ]
    proc = subprocess.run([*NEXTBEST, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"report: {report / 'index.html'}" in proc.stdout
    assert "new-to-customer purchases within 30 days (k=5" in proc.stdout  # tables still printed

    page = (report / "index.html").read_text()
    assert "<title>nextbest evaluation: " in page and "cutoff 2024-04-10" in page
    assert "--report" in page and "nextbest evaluate" in page  # the command line
    assert "served (RecommendProducts)" in page and "NDCG@5" in page
    assert "next basket" in page and "TIFU-KNN" in page and "served NDCG@5 / best baseline" in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 10 and len(set(sources)) == 10
    assert {
        "metric-ndcg.png",
        "popularity.png",
        "cohort-retention.png",
        "lifecycle-stages.png",
    } <= set(sources)
    assert "Customer lifecycle at the cutoff" in page and '<table class="transitions">' in page
    assert all("/" not in s and (report / s).is_file() for s in sources)  # relative, beside it
    assert len(re.findall(r"<figcaption>", page)) == len(sources)

    # Every image loads in a real browser: a copy of the page marks naturalWidth into the DOM.
    check = report / "_image-check.html"
    check.write_text(page.replace("</body>", IMAGE_CHECK + "</body>"))
    try:
        dom = _headless(chromium, tmp_path / "profile", "--dump-dom", check.as_uri())
    finally:
        check.unlink()
    found = re.search(r'<pre id="image-check">(.*?)</pre>', dom.stdout, re.S)
    assert found, f"no image check in the DOM:\n{dom.stdout[-2000:]}\n{dom.stderr[-2000:]}"
    images = json.loads(html.unescape(found.group(1)))
    assert [i["src"] for i in images] == sources
    assert all(i["complete"] and i["width"] > 0 for i in images), images

    shot = report / "screenshot.png"
    _headless(
        chromium,
        tmp_path / "profile",
        f"--screenshot={shot}",
        "--window-size=1200,3000",
        "--hide-scrollbars",
        (report / "index.html").as_uri(),
    )
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from matplotlib.image import imread

    pixels = imread(shot)[..., :3]
    assert pixels.shape[:2] == (3000, 1200)
    assert pixels.std() > 0.05  # not blank
    assert (pixels.min(axis=2) < 0.5).mean() > 0.01  # dark text and lines on the page
