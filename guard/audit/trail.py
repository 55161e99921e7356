"""The audit trail of one gateway process: its spool, its shipper, and the request hooks.

``intent`` runs just before a request is forwarded to MLflow, or a policy change is applied:
it returns only once the record is fsynced, or refuses the request with ``audit_unavailable``.
A read (``is_read``) inside ``DurableAnswerMiddleware`` (and, with ``audit.sync_writes =
"before-response"``, any request there) waits only until its record is written, and is fsynced
while MLflow answers: the answer's first message waits for that fsync, and a failed one answers
``audit_unavailable`` instead, so no byte leaves whose record a power loss could still take.
``outcome`` runs when the response is complete, for every request, refusals included; it writes
the record without waiting for its fsync (what it describes has already happened).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path
from typing import Any, Final

import anyio.to_thread
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.audit import records
from guard.audit.chain import derive_key
from guard.audit.records import Redactor
from guard.audit.shipper import Shipper
from guard.audit.spool import LOOP_FSYNC_LIMIT, Durable, Spool, SpoolError
from guard.audit.store import AuditStore
from guard.edge.ratelimit import FailureLimiter
from guard.errors import Refusal, send_refusal
from guard.settings import Settings

logger = logging.getLogger("guard.audit")

# Probes and metrics scrapes would drown the trail; they change nothing. Only their GET and
# HEAD go unrecorded: any other method on them is refused and recorded like any refusal.
NOT_RECORDED: Final = frozenset({"/guard/health", "/guard/ready", "/guard/metrics"})
PROBE_METHODS: Final = frozenset({"GET", "HEAD"})


def is_probe(scope: Scope) -> bool:
    """A probe or a metrics scrape: answered without credentials and never recorded."""
    return scope.get("path") in NOT_RECORDED and scope.get("method") in PROBE_METHODS


HOLD: Final = "guard.audit_hold"  # scope key: DurableAnswerMiddleware holds this answer

# The POST rows the route table marks read that change nothing in MLflow: searches, batch gets,
# trace metrics and correlations, issuing a presigned download URL (the URL is the answer and
# is held like any), and GraphQL (MLflow's schema has no mutation that writes: its "mutations"
# are two searches and an echo, and guard.authz.graphql forwards queries only). A POST read row
# a new release adds is not here until someone checks it: its intent is fsynced before
# forwarding, as a write's (tests/unit/audit/test_durable_answers.py compares with the table).
READ_POSTS: Final = frozenset({
    "/graphql",
    *(f"/{prefix}/{path}" for prefix in ("api", "ajax-api") for path in (
        "2.0/mlflow/artifacts/presigned-download-url",
        "2.0/mlflow/experiments/search",
        "2.0/mlflow/logged-models/search",
        "2.0/mlflow/registered-models/get-latest-versions",
        "2.0/mlflow/runs/search",
        "3.0/mlflow/datasets/search",
        "3.0/mlflow/issues/search",
        "3.0/mlflow/traces/batchGetInfos",
        "3.0/mlflow/traces/calculate-filter-correlation",
        "3.0/mlflow/traces/metrics",
        "3.0/mlflow/traces/search",
    )),
    "/ajax-api/2.0/mlflow/experiments/search-datasets",
})  # fmt: skip


def is_read(scope: Scope) -> bool:
    """A request that changes nothing in MLflow: its route row's action is read, nothing raised
    it (promotion), and the row is a GET (HEAD is classified as GET) or a POST in READ_POSTS.
    Only the gateway's classification counts, never what the caller says."""
    route = scope.get("guard.route")
    context = scope.get("guard")
    return (
        route is not None
        and context is not None
        and route.action == "read"
        and context.action in ("", "read")
        and not route.refuse
        and (route.method == "GET" or (route.method == "POST" and route.path in READ_POSTS))
    )


class Hold:
    """One request's answer, held (``DurableAnswerMiddleware``) until ``durable`` is done."""

    __slots__ = ("durable", "refused")

    def __init__(self) -> None:
        self.durable: Durable | None = None  # the intent's fsync
        self.refused = False  # the fsync failed: the answer was replaced by a refusal


class AuditTrail:
    def __init__(
        self,
        *,
        spool_dir: Path,
        secret_key: bytes,
        engine: Engine,
        segment_size: int,
        batch_size: int,
        shutdown_grace: float,
        limiter: FailureLimiter | None = None,
        sync_writes: str = "before-forward",
        loop_fsync_limit: float = LOOP_FSYNC_LIMIT,
    ) -> None:
        self.limiter = limiter
        self.writes_overlap = sync_writes == "before-response"
        self.redactor = Redactor(derive_key(secret_key, "audit-redact"))
        self.chain_key = derive_key(secret_key, "audit-chain")
        self.spool = Spool(
            spool_dir, self.chain_key, segment_size=segment_size, loop_fsync_limit=loop_fsync_limit
        )
        self.store = AuditStore(engine)
        self.shipper = Shipper(self.spool, self.store, batch_size=batch_size)
        self.spool.on_commit = self.shipper.notify
        self.shutdown_grace = shutdown_grace

    async def start(self) -> None:
        await anyio.to_thread.run_sync(self.spool.open)
        await self.shipper.start()

    async def stop(self) -> None:
        """Summarize what is counted and fsync everything written, then ship what the grace
        period allows."""
        if self.limiter is not None:
            for summary in self.limiter.summaries(final=True):
                self._summarize(summary)
        await anyio.to_thread.run_sync(self.spool.close)
        await self.shipper.stop(self.shutdown_grace)

    @property
    def problem(self) -> str:
        """Why requests are being refused right now ("" when the spool is writable)."""
        return "" if self.spool.healthy and not self.spool.broken else self.spool.error

    async def intent(self, scope: Scope) -> Refusal | None:
        """The request's intent record: fsynced before this returns, or (a read whose answer
        ``DurableAnswerMiddleware`` holds; any such request with sync_writes before-response)
        written, its fsync left to that middleware; else the refusal to answer instead."""
        started = time.monotonic()
        try:
            hold: Hold | None = scope.get(HOLD)
            if (
                hold is not None
                and scope.get("guard.route") is not None
                and (self.writes_overlap or is_read(scope))
            ):
                hold.durable = await self.spool.write(records.intent(scope, self.redactor))
            else:
                await self.spool.append(records.intent(scope, self.redactor))
        except SpoolError as exc:
            logger.error("request %s refused: %s", scope["guard"].request_id, exc)
            return Refusal("audit_unavailable")
        finally:
            scope["guard"].audit_seconds += time.monotonic() - started
        return None

    async def durable(self, scope: Scope, done: Durable) -> Refusal | None:
        """Wait for the fsync of an intent ``intent`` only wrote; the refusal to answer instead
        if it failed."""
        started = time.monotonic()
        try:
            await self.spool.durable(done)
        except SpoolError as exc:
            logger.error("request %s answered 503: %s", scope["guard"].request_id, exc)
            return Refusal("audit_unavailable")
        finally:
            scope["guard"].audit_seconds += time.monotonic() - started
        return None

    def outcome(self, scope: Scope) -> None:
        if scope.get("type") != "http" or is_probe(scope):
            return
        context = scope.get("guard")
        if context is None:
            return
        if context.unrecorded:  # one of a flood: counted in the spool's head, summarized later
            if not scope.get(COUNTED):  # (FloodCountMiddleware counted it before answering)
                self.spool.tally(context.client)
        else:
            self.spool.append_nowait(records.outcome(scope, self.redactor, context.elapsed()))
        if self.limiter is not None:
            for summary in self.limiter.summaries():
                self._summarize(summary)

    def _summarize(self, summary: dict[str, Any]) -> None:
        body = {"kind": "event", "time": records.now(), "event": "unauthenticated_refusals"}
        self.spool.summarize({**body, **summary}, summary["client"], summary["unrecorded"])

    def event(self, body: dict[str, Any]) -> None:
        """Something that is not a request: a token made or revoked by the gateway itself."""
        self.spool.append_nowait({"kind": "event", "time": records.now(), **body})


COUNTED: Final = "guard.counted"  # scope key: the limiter has counted this request


def counts_as_failure(scope: Scope, status: int) -> bool:
    """A refusal (or preflight) of a caller who did not log in: what the failure limiter counts.
    That includes a refusal answered as a redirect (a browser navigation without a session,
    sent 303 to the login page: anyone can send those by the thousand). A 5xx is the gateway
    failing (the token store down, MLflow gone), not a failed login."""
    context = scope.get("guard")
    return (
        context is not None
        and context.principal is None
        and status < 500
        and (
            status >= 400
            or scope.get("method") == "OPTIONS"
            or (status == 303 and context.refusal is not None)
        )
    )


def blocks_logins(status: int) -> bool:
    """Whether a counted refusal counts toward blocking its address (429 for logins): not a
    page load sent to the login page (see ``guard.edge.ratelimit``)."""
    return status != 303


class FloodCountMiddleware:
    """Counts a refusal of a caller who did not log in before its answer goes out; one the
    flood summary stands for is in the spool's head before the answer leaves, so no crash
    loses it. (Refusals answered outside it, by the protocol layer, are counted on
    completion.)"""

    def __init__(self, app: ASGIApp, *, trail: AuditTrail, limiter: FailureLimiter) -> None:
        self.app = app
        self.trail = trail
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if (
                message["type"] == "http.response.start"
                and not scope.get(COUNTED)
                and counts_as_failure(scope, message["status"])
            ):
                scope[COUNTED] = True
                context = scope["guard"]
                blocking = blocks_logins(message["status"])
                context.unrecorded = not self.limiter.refused(context.client, blocking)
                if context.unrecorded:
                    await self.trail.spool.count(context.client)
            await send(message)

        await self.app(scope, receive, counting_send)


class IntentMiddleware:
    """No request passes unrecorded: its intent is on disk before the inner app runs."""

    def __init__(self, app: ASGIApp, *, trail: AuditTrail) -> None:
        self.app = app
        self.trail = trail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (refusal := await self.trail.intent(scope)) is not None:
            await send_refusal(scope, send, refusal)
            return
        await self.app(scope, receive, send)


class DurableAnswerMiddleware:
    """No answer leaves before its request's intent record is durable. Inside it, a read's
    intent is only written before forwarding (``AuditTrail.intent``) and fsynced while MLflow
    answers; the answer's ``http.response.start`` waits here for that fsync (a streamed download
    holds only its start). A failed fsync answers 503 ``audit_unavailable`` instead and drops
    the rest of MLflow's answer: nothing of it is served."""

    def __init__(self, app: ASGIApp, *, trail: AuditTrail) -> None:
        self.app = app
        self.trail = trail

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        hold = scope[HOLD] = Hold()

        async def held_send(message: Message) -> None:
            if hold.refused:
                return  # MLflow's answer, after its start was replaced by the refusal
            if hold.durable is not None and message["type"] == "http.response.start":
                done, hold.durable = hold.durable, None
                if (refusal := await self.trail.durable(scope, done)) is not None:
                    hold.refused = True
                    await send_refusal(scope, send, refusal)
                    return
            await send(message)

        await self.app(scope, receive, held_send)


def cli_spool_dir(settings: Settings) -> Path:
    """The CLI's own spool, beside the gateway's: the CLI is a writer with its own chain."""
    spool = settings.audit_spool_dir
    return spool.with_name(spool.name + "-cli")


def _spool_at(directory: Path, settings: Settings, secret_key: bytes) -> Spool:
    """The spool in ``directory`` (not opened), as the gateway's own writers have theirs."""
    key = derive_key(secret_key, "audit-chain")
    return Spool(directory, key, segment_size=settings.audit.segment_size)


def record_cli_event(
    settings: Settings, engine: Engine, secret_key: bytes, body: dict[str, Any]
) -> str:
    """Record a change the CLI made (a token, a policy change): fsynced into the CLI's chain,
    then stored with whatever that chain has not stored yet. Returns a warning, or ""."""
    spool = _spool_at(cli_spool_dir(settings), settings, secret_key)
    spool.open(wait=True)  # two CLI runs take turns
    try:
        asyncio.run(spool.append({"kind": "event", "time": records.now(), **body}))
    finally:
        spool.close()
    try:
        Shipper(spool, AuditStore(engine)).ship_all()
    except (sa.exc.SQLAlchemyError, OSError) as exc:
        return f"recorded in {spool.directory}; it reaches the database next time ({exc})"
    return ""


WORKER_PREFIX: Final = "worker-"


def worker_spool_dir(settings: Settings, index: int) -> Path:
    """Worker ``index``'s spool (``gateway.workers``): the first writes the spool a single
    process writes, so one worker continues its chain; worker i > 0 writes ``worker-<i>``
    inside it, a writer with its own chain."""
    spool = settings.audit_spool_dir
    return spool if index == 0 else spool / f"{WORKER_PREFIX}{index}"


def worker_spool_dirs(settings: Settings) -> dict[int, Path]:
    """The spools of workers i > 0 that exist, by index."""
    found: dict[int, Path] = {}
    with contextlib.suppress(FileNotFoundError):
        for path in settings.audit_spool_dir.iterdir():
            number = path.name.removeprefix(WORKER_PREFIX)
            if path.name.startswith(WORKER_PREFIX) and number.isdigit() and path.is_dir():
                found[int(number)] = path
    return found


def ship_leftover_spools(
    settings: Settings, engine: Engine, secret_key: bytes, workers: int
) -> int:
    """Store what the spools of workers ``workers`` and beyond hold (a start with fewer
    workers than the last): each is opened as its writer would (a crash's open intents get
    their ``outcome_unknown``) and shipped whole. Returns the records stored; what the database
    does not take now waits in its spool for the next start."""
    stored = 0
    for index, directory in sorted(worker_spool_dirs(settings).items()):
        if index < workers:
            continue
        spool = _spool_at(directory, settings, secret_key)
        try:
            spool.open()
        except SpoolError as exc:
            logger.error("audit spool of worker %d not shipped: %s", index, exc)
            continue
        spool.close()
        try:
            count = Shipper(spool, AuditStore(engine)).ship_all()
            stored += count
            logger.info("stored %d audit records left in the spool of worker %d", count, index)
        except (sa.exc.SQLAlchemyError, OSError) as exc:
            logger.error(
                "audit spool %s not stored yet (%s); the next start retries", directory, exc
            )
    return stored
