"""The operator's page: `/dashboard` (HTML) and `/dashboard.json` (the same figures) beside
`/metrics` on the server's HTTP port (`serve.metrics_port`, bound to `serve.host`).

Aggregates only, never a customer id: the live model version and its validation figures, the
experiments with their lift and interval (the same report as `nextbest experiments report`),
lifecycle stage counts of the model, consent figures of the last 30 days, and calls and refusals
per RPC. With `[[serve.clients]]` configured, both paths need an `admin` bearer token
(`Authorization: Bearer <token>`), like the Admin service. Plain server-rendered HTML with inline
SVG; no scripts."""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable
from html import escape
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from nextbest.auth import Gate
from nextbest.config import Settings
from nextbest.errors import ModelError
from nextbest.experiments.html import experiments_section
from nextbest.experiments.report import report_json, store_report
from nextbest.lifecycle.stages import STAGES
from nextbest.store.artifacts import current_version, read_manifest
from nextbest.store.consent_store import StoreError, open_store

__all__ = ["Dashboard", "serve_http"]

logger = logging.getLogger(__name__)

CONSENT_DAYS = 30


def _rpc(method: str) -> str:
    """`/nextbest.v1.Recommender/RecommendProducts` → `Recommender/RecommendProducts`."""
    return method.rsplit(".", 1)[-1]


def _calls(registry: CollectorRegistry) -> dict[str, dict[str, float]]:
    """RPC → calls by status code and refusals, from the server's own metrics."""
    out: dict[str, dict[str, float]] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == "nextbest_rpc_calls_total":
                row = out.setdefault(_rpc(sample.labels["method"]), {})
                code = sample.labels["code"]
                row[code] = row.get(code, 0.0) + sample.value
            elif sample.name == "nextbest_refused_calls_total":
                row = out.setdefault(_rpc(sample.labels["method"]), {})
                row["refused"] = row.get("refused", 0.0) + sample.value
    return dict(sorted(out.items()))


def _model(settings: Settings) -> tuple[dict | None, dict | None]:
    """(the CURRENT model's figures, its lifecycle's), from its manifest."""
    try:
        version = current_version(settings.serve.models_dir)
        m = read_manifest(settings.serve.models_dir, version)
    except ModelError:
        return None, None
    validation = {
        protocol: {name: round(float(v.get("ndcg", 0.0)), 4) for name, v in models.items()}
        for protocol, models in m.get("metrics", {}).get("validation", {}).items()
        if isinstance(models, dict)
    }
    model = {
        "version": version,
        "created_at": m.get("created_at", ""),
        "reference_time": m.get("reference_time", ""),
        "cf_model": m.get("cf_model", ""),
        "customers": m.get("customers", 0),
        "products": m.get("products", 0),
        "validation_ndcg_at_10": validation,
    }
    life = m.get("lifecycle")
    lifecycle = None
    if isinstance(life, dict):
        lifecycle = {
            "risk_model": life.get("risk_model", ""),
            "risk_validation_auc": life.get("risk_validation_auc", {}),
            "stages": {  # in lifecycle order (the manifest's JSON sorts its keys)
                name: life["stages"][name] for name in STAGES if name in life.get("stages", {})
            },
            "as_of": m.get("reference_time", ""),
        }
    return model, lifecycle


class Dashboard:
    """Computes the figures on each request (an operator's page, not a hot path)."""

    def __init__(self, settings: Settings, registry: CollectorRegistry):
        self.settings = settings
        self.registry = registry
        self.gate = Gate(settings.serve.clients)

    def figures(self) -> dict:
        settings = self.settings
        model, lifecycle = _model(settings)
        since = dt.datetime.now(dt.UTC).replace(tzinfo=None) - dt.timedelta(days=CONSENT_DAYS)
        with open_store(settings.serve.store) as store:
            consent = store.consent_summary(since)
            experiments = report_json(store_report(settings, store))["experiments"]
        return {
            "version": 1,
            "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "model": model,
            "experiments": experiments,
            "lifecycle": lifecycle,
            "consent": {"days": CONSENT_DAYS, **consent},
            "calls": _calls(self.registry),
        }

    def allowed(self, authorization: str | None) -> tuple[bool, str]:
        verdict = self.gate.check_role("admin", authorization)
        return verdict.allowed, verdict.message


def _table(head: list[str], rows: list[list[object]]) -> str:
    out = "<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in head) + "</tr>"
    for row in rows:
        out += "<tr>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>"
    return out + "</table>"


def _bars(counts: dict[str, int], label: str) -> str:
    top = max([*counts.values(), 1])
    rows = []
    for k, (name, n) in enumerate(counts.items()):
        y = 6 + k * 28
        w = 300 * n / top
        rows.append(
            f'<text x="0" y="{y + 15}" font-size="12">{escape(name)}</text>'
            f'<rect x="80" y="{y}" width="{w:.1f}" height="20" fill="#2f855a"/>'
            f'<text x="{84 + w:.1f}" y="{y + 15}" font-size="12">{n}</text>'
        )
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="460" height="{6 + 28 * len(counts)}" '
        f'role="img" aria-label="{escape(label)}">' + "".join(rows) + "</svg>"
    )


def render(f: dict) -> str:
    """The figures as one HTML page."""
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>nextbest dashboard</title>",
        "<style>body{font-family:sans-serif;margin:2em;max-width:70em}table{border-collapse:"
        "collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.2em .6em;text-align:right}"
        "th{background:#f4f4f4}table{font-size:90%}.srm{color:#c53030}</style></head><body>",
        f"<h1>nextbest</h1><p>Generated {escape(f['generated_at'])}. Aggregates only.</p>",
    ]
    m = f["model"]
    parts.append('<section id="model"><h2>Model</h2>')
    if m is None:
        parts.append("<p>No model published yet.</p>")
    else:
        parts.append(
            f'<p>Serving <code id="model-version">{escape(m["version"])}</code> '
            f"({escape(str(m['cf_model']))}; {m['customers']} customers, {m['products']} "
            f"products; data up to {escape(str(m['reference_time']))}).</p>"
        )
        validation = m["validation_ndcg_at_10"]
        names = sorted({n for v in validation.values() for n in v})
        parts.append("<p>Validation NDCG@10 by protocol:</p>")
        parts.append(
            _table(
                ["model", *validation],
                [[n, *[validation[p].get(n, "") for p in validation]] for n in names],
            )
        )
    parts.append("</section>")
    parts.append(experiments_section_from_json(f["experiments"]))
    life = f["lifecycle"]
    parts.append('<section id="lifecycle"><h2>Lifecycle</h2>')
    if not life or not life["stages"]:
        parts.append("<p>The served model has no lifecycle stage counts.</p>")
    else:
        parts.append(
            f"<p>Customers per stage at {escape(str(life['as_of']))} (churn risk by "
            f"{escape(str(life['risk_model']))}).</p>"
        )
        parts.append(_bars(life["stages"], "customers per lifecycle stage"))
        parts.append(_table(["stage", "customers"], [[k, v] for k, v in life["stages"].items()]))
    parts.append("</section>")
    c = f["consent"]
    parts.append(f'<section id="consent"><h2>Consent (last {c["days"]} days)</h2>')
    parts.append(
        _table(
            [
                "personalization granted (records now)",
                "withheld (records now)",
                "values granted",
                "values withdrawn",
                "customers erased",
            ],
            [
                [
                    c["personalization_granted"],
                    c["personalization_withheld"],
                    c["granted_since"],
                    c["withdrawn_since"],
                    c["erased_since"],
                ]
            ],
        )
    )
    parts.append("</section>")
    codes = sorted({k for row in f["calls"].values() for k in row} - {"refused"})
    parts.append('<section id="calls"><h2>Calls per RPC</h2>')
    parts.append(
        _table(
            ["RPC", *codes, "refused"],
            [
                [method, *[int(row.get(k, 0)) for k in codes], int(row.get("refused", 0))]
                for method, row in f["calls"].items()
            ],
        )
        if f["calls"]
        else "<p>No calls yet.</p>"
    )
    parts.append("</section></body></html>")
    return "".join(parts)


def experiments_section_from_json(experiments: list[dict]) -> str:
    """`experiments_section` of the JSON report (what the page shows is what JSON says)."""
    from nextbest.experiments.report import from_json

    return experiments_section(from_json(experiments))


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base's name
        pass


def _app(registry: CollectorRegistry, dashboard: Dashboard | None) -> Callable:
    metrics = make_wsgi_app(registry)

    def app(environ, start_response):
        path = environ.get("PATH_INFO", "")
        if dashboard is None or path not in ("/dashboard", "/dashboard.json"):
            return metrics(environ, start_response)
        ok, why = dashboard.allowed(environ.get("HTTP_AUTHORIZATION"))
        if not ok:
            start_response(
                "401 Unauthorized",
                [("Content-Type", "text/plain"), ("WWW-Authenticate", "Bearer")],
            )
            return [f"{why}\n".encode()]
        try:
            figures = dashboard.figures()
        except StoreError as exc:
            start_response("503 Service Unavailable", [("Content-Type", "text/plain")])
            return [f"the store cannot be read: {exc}\n".encode()]
        if path == "/dashboard.json":
            body, kind = json.dumps(figures, indent=2).encode(), "application/json"
        else:
            body, kind = render(figures).encode(), "text/html; charset=utf-8"
        start_response("200 OK", [("Content-Type", kind), ("Cache-Control", "no-store")])
        return [body]

    return app


def serve_http(
    host: str, port: int, registry: CollectorRegistry, dashboard: Dashboard | None = None
):
    """/metrics (and the dashboard) on `host:port` (0 = a free port) in a daemon thread;
    returns (the server, its port)."""
    import socket
    import threading

    cls = _Server
    if ":" in host:  # an IPv6 address

        class _Server6(_Server):
            address_family = socket.AF_INET6

        cls = _Server6
    server = make_server(host, port, _app(registry, dashboard), cls, handler_class=_Quiet)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    return server, int(server.server_port)
