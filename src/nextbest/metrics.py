"""Prometheus metrics of a server, on their own HTTP port (prometheus-client).

Every server gets its own registry (several servers may run in one process, as in the tests).
Nothing here names a customer: labels are RPC methods, status codes, reasons and purposes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, start_http_server

__all__ = ["Metrics"]

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
        self.model = Info("nextbest_model", "The model version being served", registry=r)
        self.reload_failures = Counter(
            "nextbest_model_reload_failures", "Model versions refused at load", registry=r
        )
        self._http = None

    def answered(self, answers) -> None:
        """Count what product answers did (non-personal reasons, withheld items)."""
        for a in answers:
            if not a.personalized:
                self.non_personal.labels(a.not_personalized_reason or "unknown").inc()
            if a.withheld:
                self.withheld.inc(a.withheld)

    def serve_http(self, host: str, port: int) -> int:
        """Expose /metrics on `host:port` (0 = any free port); returns the port."""
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return int(server.server_port)

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
