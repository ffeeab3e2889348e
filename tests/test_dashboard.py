"""The operator's dashboard on the metrics port, against a live server that served an
experiment and recorded purchases: rendered by headless Chromium (a screenshot is kept in
reports/dashboard.png), its figures equal `nextbest experiments report --json`, no customer id
in its HTML, and an admin token needed once tokens are on."""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import urllib.error
import urllib.request

from conftest import REPO, store_url
from test_experiments import ask, now, record, report, start, with_experiment
from test_report import _chromium, _headless

from nextbest.auth import new_token, token_sha256


def fetch(url: str, token: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_dashboard_shows_the_report_and_no_customer_id(own, tmp_path) -> None:
    chromium = _chromium()
    with_experiment(own)
    running = start(own)
    customers = [f"c{k:03d}" for k in range(2, 50)]
    try:
        answers = {c: ask(running.port, c) for c in customers}
        t = now() + dt.timedelta(minutes=1)
        rows = [(c, r.items[0].product_id, t, 3.0) for c, r in answers.items()][::2]
        assert record(running.port, rows) == len(rows)
        running.impressions.flush()
        base = f"http://127.0.0.1:{running.metrics_port}"
        status, body = fetch(base + "/dashboard.json")
        assert status == 200
        figures = json.loads(body)
        dom = _headless(chromium, tmp_path / "profile", "--dump-dom", base + "/dashboard")
        shot = tmp_path / "dashboard.png"
        _headless(
            chromium,
            tmp_path / "profile",
            f"--screenshot={shot}",
            "--window-size=1200,1500",
            base + "/dashboard",
        )
        assert fetch(base + "/metrics")[0] == 200  # /metrics is still there
    finally:
        running.stop(0)
    assert dom.returncode == 0, dom.stderr
    html = dom.stdout
    # The figures are the report's.
    assert figures["experiments"] == report(own, store_url(own))["experiments"]
    assert figures["model"]["version"] == answers["c002"].model_version
    assert figures["calls"]["Recommender/RecommendProducts"]["OK"] == len(customers)
    assert figures["calls"]["Events/RecordEvents"]["OK"] == 1
    assert figures["consent"]["personalization_withheld"] == 1  # c001 (the fixture's file)
    # The page shows them.
    assert f'<code id="model-version">{figures["model"]["version"]}</code>' in html
    for arm in figures["experiments"][0]["arms"]:
        row = re.search(rf'<tr data-variant="{arm["variant"]}">(.*?)</tr>', html).group(1)
        assert f'<td class="customers">{arm["customers"]}</td>' in row
        assert f'<td class="attributed">{arm["attributed_purchases"]}</td>' in row
        assert f'<td class="per-customer">{arm["purchases_per_customer"]:.4f}</td>' in row
    assert "<svg" in html and "Calls per RPC" in html and "Consent (last 30 days)" in html
    # Aggregates only: no customer id anywhere.
    for c in [*customers, "c000", "c001"]:
        assert c not in html and c not in json.dumps(figures)
    assert shot.stat().st_size > 10_000
    kept = REPO / "reports" / "dashboard.png"
    kept.parent.mkdir(exist_ok=True)
    shutil.copy(shot, kept)


def test_dashboard_needs_an_admin_token_when_tokens_are_on(own) -> None:
    admin, other = new_token(), new_token()
    config = own / "nextbest.toml"
    config.write_text(
        config.read_text()
        + f'\n[[serve.clients]]\nname = "ops"\ntoken_sha256 = "{token_sha256(admin)}"\n'
        'roles = ["admin"]\n'
        f'\n[[serve.clients]]\nname = "web"\ntoken_sha256 = "{token_sha256(other)}"\n'
        'roles = ["recommend"]\n'
    )
    running = start(own)
    try:
        url = f"http://127.0.0.1:{running.metrics_port}/dashboard"
        status, body = fetch(url)
        assert status == 401 and "bearer token is required" in body
        status, body = fetch(url, token="not-a-token")
        assert status == 401 and "unknown token" in body
        status, body = fetch(url, token=other)
        assert status == 401 and "lacks the 'admin' role" in body
        assert fetch(url + ".json", token=other)[0] == 401
        status, body = fetch(url, token=admin)
        assert status == 200 and "<h2>Experiments</h2>" in body
    finally:
        running.stop(0)
