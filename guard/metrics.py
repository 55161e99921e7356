"""Prometheus metrics for ``/guard/metrics`` (never proxied, never audited).

One registry per gateway (no module-level state): requests by decision and status; latency
histograms for the whole request, MLflow's part, the authorization decision and the wait for the
intent record's fsync; and, read from the audit trail when scraped, spool depth, records spooled
and stored, write failures and each chain's head.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import Scope

from guard.audit.trail import AuditTrail
from guard.edge.context import RequestContext

CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_FAST = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)
_SLOW = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class _AuditCollector(Collector):
    def __init__(self, trail: AuditTrail) -> None:
        self.trail = trail

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        spool, shipper = self.trail.spool, self.trail.shipper
        yield GaugeMetricFamily(
            "mlflow_guard_audit_spool_depth", "Spooled records not yet in the database.",
            value=shipper.depth,
        )  # fmt: skip
        yield CounterMetricFamily(
            "mlflow_guard_audit_records_spooled", "Records made durable in the spool.",
            value=spool.spooled,
        )  # fmt: skip
        yield CounterMetricFamily(
            "mlflow_guard_audit_records_stored", "Records moved from the spool into the database.",
            value=shipper.replayed,
        )  # fmt: skip
        yield CounterMetricFamily(
            "mlflow_guard_audit_write_failures", "Records the spool could not write.",
            value=spool.failures,
        )  # fmt: skip
        yield CounterMetricFamily(
            "mlflow_guard_audit_store_failures", "Failed attempts to store a batch.",
            value=shipper.failures,
        )  # fmt: skip
        head = GaugeMetricFamily(
            "mlflow_guard_audit_chain_head", "Sequence number of this writer's newest record; "
            "the label mac is its MAC.", labels=["writer", "mac"],
        )  # fmt: skip
        head.add_metric([spool.head.writer, spool.head.mac], spool.head.seq)
        yield head
        yield GaugeMetricFamily(
            "mlflow_guard_audit_healthy", "1 while the spool can be written.",
            value=0 if self.trail.problem else 1,
        )  # fmt: skip


class Metrics:
    def __init__(self, trail: AuditTrail | None = None) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mlflow_guard_requests", "Requests by decision and HTTP status.",
            ["decision", "status"], registry=self.registry,
        )  # fmt: skip
        self.total = Histogram(
            "mlflow_guard_request_seconds", "Whole requests, as the gateway saw them.",
            buckets=_SLOW, registry=self.registry,
        )  # fmt: skip
        self.upstream = Histogram(
            "mlflow_guard_upstream_seconds", "Until MLflow's response headers arrived.",
            buckets=_SLOW, registry=self.registry,
        )  # fmt: skip
        self.authorization = Histogram(
            "mlflow_guard_authorization_seconds", "Deciding (lookups included).",
            buckets=_FAST, registry=self.registry,
        )  # fmt: skip
        self.audit_write = Histogram(
            "mlflow_guard_audit_write_seconds",
            "Waiting for the intent record's fsync: before forwarding, or (reads) with the "
            "answer held until it.",
            buckets=_FAST, registry=self.registry,
        )  # fmt: skip
        if trail is not None:
            self.registry.register(_AuditCollector(trail))

    def observe(self, scope: Scope) -> None:
        """Count a finished request (called with the audit outcome)."""
        context: RequestContext | None = scope.get("guard")
        if scope.get("type") != "http" or context is None or scope["path"] == "/guard/metrics":
            return
        refusal = context.refusal
        decision = "allow" if refusal is None else "deny" if refusal.status in (401, 403, 429) \
            else "error"  # fmt: skip
        self.requests.labels(decision, str(context.status)).inc()
        self.total.observe(context.elapsed())
        if context.upstream_status:
            self.upstream.observe(context.upstream_seconds)
        if context.authorization_seconds:
            self.authorization.observe(context.authorization_seconds)
        if context.audit_seconds:
            self.audit_write.observe(context.audit_seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
