"""Prometheus metrics of a server, on their own HTTP port (prometheus-client).

Every server gets its own registry (several servers may run in one process, as in the tests).
Nothing here names a customer: labels are RPC methods, status codes, reasons, purposes and
the names of `[[serve.clients]]`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.multiprocess import MultiProcessCollector

__all__ = ["Metrics", "serve_multiprocess_http"]

LATENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


class Metrics:
    """The server's metrics; `serve_http` exposes them at `/metrics`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter(
            "nextbest_rpc_calls",
            "Calls answered, by RPC and status code",
            ["method", "code"],
            registry=r,
        )
        self.latency = Histogram(
            "nextbest_rpc_latency_seconds",
            "Time to answer a call (a stream: the whole stream), by RPC",
            ["method"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.non_personal = Counter(
            "nextbest_non_personal_answers",
            "Product answers that were not personalized, by reason",
            ["reason"],
            registry=r,
        )
        self.withheld = Counter(
            "nextbest_withheld_items", "Items withheld by the privacy rule", registry=r
        )
        self.consent_changes = Counter(
            "nextbest_consent_changes",
            "Consent values changed through the Consent service, by purpose and new value",
            ["purpose", "granted"],
            registry=r,
        )
        self.erasures = Counter("nextbest_erasures", "Customers forgotten", registry=r)
        self.experiment_impressions = Counter(
            "nextbest_experiment_impressions",
            "Products shown to customers in an experiment, by experiment and variant",
            ["experiment", "variant"],
            registry=r,
        )
        self.attributed_purchases = Counter(
            "nextbest_attributed_purchases",
            "Purchases recorded through Events of a product shown to the customer within the "
            "attribution window (last touch), by experiment and variant ('' outside experiments)",
            ["experiment", "variant"],
            registry=r,
        )
        self.model = Gauge(
            "nextbest_model_info",
            "The model version being served: 1 while a server process serves it, else 0",
            ["version", "cf_model"],
            multiprocess_mode="livemax",
            registry=r,
        )
        self._serving: tuple[str, str] | None = None
        self.dashboard = None
        """The /dashboard of `serve_http` (its gate follows SIGHUP's clients)."""
        self.admitted = Counter(
            "nextbest_admitted_calls", "Unary calls admitted to run, by RPC", ["method"], registry=r
        )
        self.refused = Counter(
            "nextbest_refused_calls",
            "Unary calls refused before any work, by RPC and reason (overloaded, deadline)",
            ["method", "reason"],
            registry=r,
        )
        self.rate_limited = Counter(
            "nextbest_rate_limited_calls",
            "Calls refused because their client was over its [[serve.clients]] rate_per_s, by "
            "client",
            ["client"],
            registry=r,
        )
        self.admission_limit = Gauge(
            "nextbest_admission_limit",
            "Unary calls the server computes at once (serve.max_running_calls, summed over "
            "processes)",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.reload_failures = Counter(
            "nextbest_model_reload_failures", "Model versions refused at load", registry=r
        )
        self._http = None

    def serving(self, version: str, cf_model: str) -> None:
        """Record the model version now served (the previous one drops to 0)."""
        if self._serving is not None:
            self.model.labels(*self._serving).set(0)
        self.model.labels(version, cf_model).set(1)
        self._serving = (version, cf_model)

    def answered(self, answers) -> None:
        """Count what product answers did (non-personal reasons, withheld items)."""
        for a in answers:
            if not a.personalized:
                self.non_personal.labels(a.not_personalized_reason or "unknown").inc()
            if a.withheld:
                self.withheld.inc(a.withheld)

    def serve_http(self, host: str, port: int, settings=None) -> int:
        """Expose /metrics (and, given the server's `settings`, /dashboard) on `host:port`
        (0 = any free port); returns the port."""
        from nextbest.dashboard import Dashboard, serve_http

        self.dashboard = Dashboard(settings, self.registry) if settings is not None else None
        server, bound = serve_http(host, port, self.registry, self.dashboard)
        self._http = server
        return bound

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


def serve_multiprocess_http(host: str, port: int, path: str, settings=None):
    """Expose the sum of every process's metrics (prometheus-client's multiprocess files in
    `path`) at /metrics on `host:port`, and the dashboard given `settings`; returns (the HTTP
    server, its port)."""
    from nextbest.dashboard import Dashboard, serve_http

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    dashboard = Dashboard(settings, registry) if settings is not None else None
    return serve_http(host, port, registry, dashboard)
