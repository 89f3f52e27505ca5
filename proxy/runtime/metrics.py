"""The Prometheus text endpoint (prometheus-client): what operators graph and alert on.

What it is for: live sessions, active grants and pending requests (read from the running service
at scrape time), auth failures and certificate issuance (counted from audit events as they are
written), and how late sessions are closed after their grant's end (teardown lag).
What it must not do: listen anywhere the configuration does not say (keep it on a local address),
expose names of users or targets as label values, or block the event loop.
"""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily


class _StateCollector:
    def __init__(self, service: Any):
        self.service = service
        self.pending = 0  # refreshed by the daemon (the store is async)

    def collect(self):
        live = GaugeMetricFamily("jit_proxy_live_sessions", "Sessions in progress",
                                 labels=["kind"])
        counts: dict[str, int] = {"shell": 0, "exec": 0, "subsystem": 0, "postgres": 0}
        for session in list(self.service.live_sessions.values()):
            counts[session.record.kind] = counts.get(session.record.kind, 0) + 1
        for kind, n in sorted(counts.items()):
            live.add_metric([kind], n)
        yield live
        yield GaugeMetricFamily("jit_proxy_active_grants", "Grants in force",
                                value=len(self.service.active))
        yield GaugeMetricFamily("jit_proxy_pending_requests", "Requests waiting for approval",
                                value=self.pending)


class Metrics:
    def __init__(self, service: Any, address: str):
        self.registry = CollectorRegistry()
        self.state = _StateCollector(service)
        self.registry.register(self.state)
        self.auth_failures = Counter("jit_proxy_auth_failures", "Failed logins",
                                     ["protocol"], registry=self.registry)
        self.certificates = Counter("jit_proxy_certificates_issued",
                                    "Certificates minted by the internal CA", ["kind"],
                                    registry=self.registry)
        self.teardown_lag = Histogram("jit_proxy_teardown_lag_seconds",
                                      "From a grant's end to its sessions being closed",
                                      buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
                                      registry=self.registry)
        host, _, port = address.rpartition(":")
        self.server, self.thread = start_http_server(int(port), host.strip("[]"),
                                                     registry=self.registry)
        service.audit.observers.append(self.observe)
        bound = self.server.server_address  # the port the OS chose for port 0
        self.address = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"

    def observe(self, event: dict) -> None:
        kind = event["type"]
        if kind == "auth.failure":
            self.auth_failures.labels("postgres" if event.get("method") == "scram"
                                      else "ssh").inc()
        elif kind == "auth.failure.suppressed":
            self.auth_failures.labels("any").inc(event.get("count", 0))
        elif kind == "ca.certificate.issued":
            self.certificates.labels(event.get("kind", "user")).inc()
        elif kind == "access.grant.sessions_closed" and "lag" in event:
            self.teardown_lag.observe(event["lag"])

    def shutdown(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_metrics(service: Any, daemon: Any, address: str) -> Metrics:
    return Metrics(service, address)
