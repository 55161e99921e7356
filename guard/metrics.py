"""Prometheus metrics for ``/guard/metrics`` (never proxied, never audited).

One registry per gateway (no module-level state): requests by decision and status; latency
histograms for the whole request, MLflow's part, the authorization decision and the wait for the
intent record's fsync; and, read from the audit trail when scraped, spool depth, records spooled
and stored, write failures and each chain's head.

With ``gateway.workers`` above 1 (``multiprocess``, and ``PROMETHEUS_MULTIPROC_DIR`` set by the
parent), prometheus-client's multiprocess mode adds up every worker's requests and histograms
in that directory; each worker publishes its audit figures there once a second (and when it
answers a scrape) as gauges summed over the live workers; the chain head is one gauge per
writer, without the MAC label (a label per MAC would grow the shared files by one entry per
record).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
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


PUBLISH_INTERVAL = 1.0  # seconds between a worker's audit figures in the shared files


class _AuditGauges:
    """A worker's audit figures, written where every worker's scrape reads them."""

    def __init__(self, trail: AuditTrail, registry: CollectorRegistry) -> None:
        self.trail = trail

        def gauge(name: str, doc: str, mode: str, labels: tuple[str, ...] = ()) -> Gauge:
            return Gauge(name, doc, labels, registry=registry, multiprocess_mode=mode)  # type: ignore[arg-type]

        self.depth = gauge(
            "mlflow_guard_audit_spool_depth", "Spooled records not yet in the database.", "livesum"
        )
        self.spooled = gauge(
            "mlflow_guard_audit_records_spooled",
            "Records made durable in the spools (live workers, since their start).",
            "livesum",
        )
        self.stored = gauge(
            "mlflow_guard_audit_records_stored",
            "Records moved from the spools into the database (live workers, since their start).",
            "livesum",
        )
        self.write_failures = gauge(
            "mlflow_guard_audit_write_failures", "Records the spools could not write.", "livesum"
        )
        self.store_failures = gauge(
            "mlflow_guard_audit_store_failures", "Failed attempts to store a batch.", "livesum"
        )
        self.head = gauge(
            "mlflow_guard_audit_chain_head",
            "Sequence number of each writer's newest record.",
            "livemax",
            ("writer",),
        )
        self.healthy = gauge(
            "mlflow_guard_audit_healthy", "1 while every worker's spool can be written.", "livemin"
        )

    def publish(self) -> None:
        spool, shipper = self.trail.spool, self.trail.shipper
        self.depth.set(shipper.depth)
        self.spooled.set(spool.spooled)
        self.stored.set(shipper.replayed)
        self.write_failures.set(spool.failures)
        self.store_failures.set(shipper.failures)
        if spool.head.writer:
            self.head.labels(spool.head.writer).set(spool.head.seq)
        self.healthy.set(0 if self.trail.problem else 1)


class Metrics:
    def __init__(self, trail: AuditTrail | None = None, multiprocess: bool = False) -> None:
        self.directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "") if multiprocess else ""
        self.registry = CollectorRegistry()
        self._audit: _AuditGauges | None = None
        self._task: asyncio.Task[None] | None = None
        self.requests = Counter(
            "mlflow_guard_requests", "Requests by decision and HTTP status.",
            ["decision", "status"], registry=self.registry,
        )  # fmt: skip
        self._by_outcome: dict[tuple[str, int], Counter] = {}  # the labelled children
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
        if trail is not None and self.directory:
            self._audit = _AuditGauges(trail, self.registry)
        elif trail is not None:
            self.registry.register(_AuditCollector(trail))

    def start(self) -> None:
        """A worker's audit figures, published once a second from now on."""
        if self._audit is not None and self._task is None:
            self._task = asyncio.ensure_future(self._publish())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _publish(self) -> None:
        assert self._audit is not None  # noqa: S101 - started only with one
        while True:
            self._audit.publish()
            await asyncio.sleep(PUBLISH_INTERVAL)

    def observe(self, scope: Scope) -> None:
        """Count a finished request (called with the audit outcome)."""
        context: RequestContext | None = scope.get("guard")
        if scope.get("type") != "http" or context is None or scope["path"] == "/guard/metrics":
            return
        refusal = context.refusal
        decision = "allow" if refusal is None else "deny" if refusal.status in (401, 403, 429) \
            else "error"  # fmt: skip
        key = (decision, context.status)
        counter = self._by_outcome.get(key)
        if counter is None:  # labels() takes a lock and builds a key: once per pair
            counter = self._by_outcome[key] = self.requests.labels(decision, str(context.status))
        counter.inc()
        self.total.observe(context.elapsed())
        if context.upstream_status:
            self.upstream.observe(context.upstream_seconds)
        if context.authorization_seconds:
            self.authorization.observe(context.authorization_seconds)
        if context.audit_seconds:
            self.audit_write.observe(context.audit_seconds)

    def render(self) -> bytes:
        if not self.directory:
            return generate_latest(self.registry)
        if self._audit is not None:
            self._audit.publish()
        every_worker = CollectorRegistry()
        MultiProcessCollector(every_worker, self.directory)  # type: ignore[no-untyped-call]
        return generate_latest(every_worker)
