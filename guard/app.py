"""Build the gateway from validated settings: the one place that lists the middleware stack.

Outermost first, every request passes:

0. ``guard.edge.protocol``       uvicorn's HTTP/1.1 parser with the gateway's limits; what it
                                 refuses goes through 1. marked as refused (400/408/414/429/431)
1. ``RequestContextMiddleware``  request id, client address via trusted proxies, last-resort 500,
                                 the audit outcome of every request (``guard.audit``)
1a. ``FloodCountMiddleware``     a refusal of a caller who did not log in is counted before it
                                 is answered (in the spool's head, if a flood summary stands for it)
2. ``SecurityHeadersMiddleware`` nosniff, frame-ancestors, Referrer-Policy, HSTS over TLS
2a. ``SingleValuedHeadersMiddleware`` 400 ambiguous_parameter for a repeated singular header
3. ``AllowedHostsMiddleware``    400 host_not_allowed (the /guard probes are exempt)
4. ``CORSMiddleware``            preflights, CORS headers, cross-site write refusal
5. GET/HEAD on the gateway's probes (``/guard/health``, ``ready``, ``metrics``: no
   credentials); the login pages (``/guard/login``, ``/guard/logout``, ``/guard/static/``,
   ``guard.identity.login``: no credentials, their own CSRF checks); with ``oidc.issuer``, the
   single sign-on routes (``/guard/oidc/login``, ``callback``, ``backchannel-logout``,
   ``guard.identity.sso``: no credentials; state, PKCE and nonce, or a signed logout token);
   ``/guard/api/`` (the
   policy API, ``guard.admin.api``) and every other ``/guard/`` path (401, then 404/405)
   behind the same authentication as below; or:
6. ``AuthenticationMiddleware``  401 unless a provider accepts the credentials
7. ``RouteClassifierMiddleware`` 400/403 unless the route table of the upstream's MLflow
                                 release classifies the canonical path; 503 from the version
                                 gate for an unverified release or an unreachable MLflow
8. ``BodyMiddleware``            400/408/413: framing checked, non-artifact bodies read whole
                                 in time, bodies only where MLflow reads them, lists of ids
                                 counted; artifact uploads stream under the same deadlines
8a. ``ArtifactPathMiddleware``   400 artifact_path_invalid unless every artifact path is canonical
8b. ``WorkspaceMiddleware``      with upstream.workspaces: the request's MLflow workspace; 400
                                 workspace_invalid, 403 workspace_forbidden to non-members
8c. ``DurableAnswerMiddleware`` no answer leaves before its intent record is fsynced (503
                                 audit_unavailable if that fails)
9. ``AuthorizationMiddleware``   403 unless the policy allows the action on the resource
10. ``IntentMiddleware``         503 unless the request's intent record is fsynced first (a
                                 read's: written first, fsynced while MLflow answers, 8c)
11. ``ProxyApp``                 MLflow
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import anyio.to_thread
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from starlette.types import ASGIApp, Receive, Scope, Send

from guard.admin.api import PolicyApi
from guard.admin.governance import Governance
from guard.admin.personal import PersonalTokens
from guard.admin.tokenpage import PATH as TOKEN_PAGE
from guard.admin.tokenpage import TokenPage, TokenPageCsrf
from guard.audit.trail import (
    COUNTED,
    AuditTrail,
    DurableAnswerMiddleware,
    FloodCountMiddleware,
    IntentMiddleware,
    blocks_logins,
    counts_as_failure,
    ship_leftover_spools,
    worker_spool_dir,
)
from guard.authz.authorization import AuthorizationMiddleware
from guard.authz.policy import Grant, PolicyError
from guard.authz.promotion import PromotionRules
from guard.authz.resolve import Resolver
from guard.authz.routes import (
    VERIFIED_MLFLOW_VERSIONS,
    ReleaseTables,
    RouteClassifierMiddleware,
    load_routes,
)
from guard.authz.runtime import PolicyRuntime
from guard.authz.search import SearchFilter
from guard.authz.store import PolicyStore
from guard.authz.workspaces import WorkspaceMiddleware
from guard.edge.artifactpaths import ArtifactPathMiddleware
from guard.edge.bodies import BodyMiddleware
from guard.edge.context import RequestContextMiddleware
from guard.edge.cors import CORSMiddleware
from guard.edge.deadlines import BodyDeadlines
from guard.edge.headers import SecurityHeadersMiddleware, SingleValuedHeadersMiddleware
from guard.edge.hosts import AllowedHostsMiddleware, default_allowed_hosts
from guard.edge.protocol import ProtocolLimits, build_protocol
from guard.edge.ratelimit import FailureLimiter, SharedWindows
from guard.errors import Refusal, send_body, send_refusal
from guard.identity.authentication import AuthenticationMiddleware
from guard.identity.base import IdentityProvider
from guard.identity.bearer import BearerIssuer, BearerProvider
from guard.identity.bindings import IdentityBindings
from guard.identity.blocks import BlockedSubjects
from guard.identity.browser import BrowserSessions
from guard.identity.csrf import LoginCsrf, LogoutCsrf
from guard.identity.ldap import LdapConfig, LdapProvider
from guard.identity.login import PATHS as LOGIN_PATHS
from guard.identity.login import LoginApp
from guard.identity.oidc import Issuer, ProviderHttp
from guard.identity.revocations import Revocations
from guard.identity.sessions import SessionCookie, SessionStore, UserBlocks
from guard.identity.sso import LOGIN_PAGE as SSO_RETURN_PAGE
from guard.identity.sso import PATHS as SSO_PATHS
from guard.identity.sso import SsoConfig, build_sso, origin_of
from guard.identity.throttle import Lock, LoginThrottle
from guard.identity.tokens import TokenError, TokenProvider, TokenStore, validate_bootstrap_token
from guard.keys import load_secret_key
from guard.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from guard.metrics import Metrics
from guard.settings import Settings
from guard.store.db import build_engine, migrate, ping
from guard.store.polling import POLL_CONNECTIONS, wait_for_poll_threads
from guard.upstream.client import UpstreamClient, UpstreamError, UpstreamLimits, VersionGate
from guard.upstream.proxy import ProxyApp
from server.supervisor import EmbeddedConfig, MlflowSupervisor

logger = logging.getLogger("guard")

PROBE_TIMEOUT = 2.0
POLL_SHUTDOWN_WAIT = 5.0  # seconds a poll read left in its thread is waited for at shutdown
CREATOR_ROLE = "manager"
GUARD_PREFIX = "/guard/"
API_PREFIX = "/guard/api/"
# Orchestrators and Prometheus call these by IP: exempt from the Host check, no credentials.
PROBES = frozenset({"/guard/health", "/guard/ready", "/guard/metrics"})
PROBE_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True)
class WorkerRole:
    """One of ``gateway.workers`` processes (``guard.cli.workers``). Its parent ran the
    migrations, made the first admin token and supervises the embedded MLflow; this process only
    serves, forwarding to ``upstream_url``, with its own audit chain (``worker_spool_dir``)."""

    index: int
    count: int
    upstream_url: str
    bootstrapped: bool = False  # the parent made the first admin token: worker 0 records it
    failures_file: str = ""  # every worker's failure windows per address (SharedWindows)
    failures_key: bytes = b""


@dataclass
class Gateway:
    """The ASGI application plus what its lifespan opens and closes."""

    settings: Settings
    app: ASGIApp
    engine: Engine
    tokens: TokenStore
    token_provider: TokenProvider
    policies: PolicyRuntime
    upstream: UpstreamClient
    supervisor: MlflowSupervisor | None
    environ: Mapping[str, str]
    trail: AuditTrail | None = None
    on_bootstrap: Callable[[str], None] = field(default=lambda secret: None)
    ldap_provider: LdapProvider | None = None
    blocked: BlockedSubjects | None = None  # user blocks followed; ended sessions pruned
    revocations: Revocations | None = None  # the revocation counter followed; caches obey it
    provider_http: ProviderHttp | None = None  # OpenID Connect providers' HTTP session
    worker: WorkerRole | None = None  # one of several processes: the parent prepared
    metrics: Metrics | None = None
    poll_engine: Engine | None = None  # the pollers' own connections (guard.store.polling)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        await self.app(scope, receive, send)

    async def prepare(self, workers: int = 1) -> str | None:
        """What happens once per start, whatever the number of processes serving: migrations,
        the first admin token (its banner; returned), and storing what the audit spools of
        workers beyond ``workers`` left behind (a start with fewer ``gateway.workers``)."""
        await anyio.to_thread.run_sync(migrate, self.engine)
        secret = await anyio.to_thread.run_sync(
            Governance(self.tokens, self.policies.store).bootstrap,
            self.settings.tokens.default_expiry,
            self.environ.get("MLFLOW_GUARD_BOOTSTRAP_TOKEN") or None,
            "gateway:bootstrap",
        )
        if secret is not None:
            self.on_bootstrap(secret)
        if self.trail is not None:
            await anyio.to_thread.run_sync(
                ship_leftover_spools, self.settings, self.engine, self.tokens.key, workers
            )
        return secret

    async def startup(self) -> None:
        if self.worker is None:
            created = await self.prepare() is not None
        else:
            created = self.worker.bootstrapped and self.worker.index == 0
        if self.trail is not None:
            await self.trail.start()
            if created:
                self.trail.event({"event": "token_created", "principal": "gateway:bootstrap",
                                  "token": "admin", "role": "admin", "resource": "*"})  # fmt: skip
        await self.policies.start()
        if self.revocations is not None:
            await self.revocations.start()
        if self.blocked is not None:
            await self.blocked.start()
        if self.supervisor is not None:
            await self.supervisor.start()
        self.upstream.open()
        if self.metrics is not None:
            self.metrics.start()
        logger.info("forwarding to MLflow at %s", self.upstream.base_url)

    def begin_shutdown(self) -> None:
        """The server stopped accepting: let the embedded MLflow start its own drain now, in
        parallel with ours, so both are done within the shutdown timeout."""
        if self.supervisor is not None:
            self.supervisor.begin_stop()

    async def shutdown(self) -> None:
        if self.metrics is not None:
            await self.metrics.stop()
        await self.policies.stop()
        if self.revocations is not None:
            await self.revocations.stop()
        if self.blocked is not None:
            await self.blocked.stop()
        await self.upstream.close()
        if self.supervisor is not None:
            await self.supervisor.stop()
        await self.token_provider.drain()
        if self.ldap_provider is not None:
            await anyio.to_thread.run_sync(self.ldap_provider.close)
        if self.provider_http is not None:
            await self.provider_http.close()
        if self.trail is not None:
            await self.trail.stop()
        # A poll read a stopped poller left in its thread (waiting for a lock) gives its
        # connection back first, or is abandoned after POLL_SHUTDOWN_WAIT.
        await anyio.to_thread.run_sync(wait_for_poll_threads, POLL_SHUTDOWN_WAIT)
        if self.poll_engine is not None:
            self.poll_engine.dispose()
        self.engine.dispose()

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"  # noqa: S101 - the ASGI protocol order
        try:
            await self.startup()
        except Exception as exc:  # noqa: BLE001 - reported to the server, which exits
            logger.error("gateway failed to start: %s", exc)
            await self.shutdown()
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        message = await receive()
        await self.shutdown()
        await send({"type": "lifespan.shutdown.complete"})


Endpoint = Callable[[], Awaitable[tuple[int, dict[str, object] | bytes]]]


class GuardRoutes:
    """The gateway's probes (GET or HEAD on an exact path). Anything else under /guard/ is
    refused by ``GuardFallback``, behind authentication."""

    def __init__(self, routes: dict[str, Endpoint]):
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self.routes.get(scope["path"])
        if endpoint is None or scope["method"] not in PROBE_METHODS:
            await GuardFallback(frozenset(self.routes))(scope, receive, send)
            return
        status, payload = await endpoint()
        if isinstance(payload, bytes):  # metrics, in Prometheus' text format
            body, content_type = payload, METRICS_CONTENT_TYPE
        elif status != 200:
            await send_refusal(scope, send, Refusal("not_ready", str(payload.get("detail", ""))))
            return
        else:
            body, content_type = json.dumps(payload).encode(), b"application/json"
        await send_body(scope, send, 200, content_type, body)


class GuardFallback:
    """What is under /guard/ but neither a probe nor the policy API: the pages that need a
    login (``/guard/tokens``), else 405 for another method on a probe, 404 for the rest.
    Mounted behind authentication, so strangers learn nothing (401) and the refusal is
    recorded with who asked."""

    def __init__(self, probes: frozenset[str], pages: Mapping[str, ASGIApp] | None = None) -> None:
        self.probes = probes
        self.pages = dict(pages or {})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (page := self.pages.get(scope["path"])) is not None:
            await page(scope, receive, send)
            return
        reason = "method_not_allowed" if scope["path"] in self.probes else "not_found"
        await send_refusal(scope, send, Refusal(reason))


class SplitByPrefix:
    """One rule for /guard/: GET or HEAD on a probe path goes to the probes and the login pages'
    paths to ``login`` (both without credentials); /guard/api/... to the policy API and every
    other /guard/ path to ``fallback`` (both behind authentication); everything else to the
    protected stack."""

    def __init__(
        self,
        guard: ASGIApp,
        api: ASGIApp,
        protected: ASGIApp,
        fallback: ASGIApp | None = None,
        login: ASGIApp | None = None,
        sso: ASGIApp | None = None,
    ) -> None:
        self.guard = guard
        self.sso = sso
        self.api = api
        self.protected = protected
        self.fallback = fallback or guard
        self.login = login

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if path in PROBES and scope["method"] in PROBE_METHODS:
            app = self.guard
        elif path in LOGIN_PATHS and self.login is not None:
            app = self.login
        elif path in SSO_PATHS and self.sso is not None:
            app = self.sso  # single sign-on; the provider's back-channel logout has no cookie
        elif path.startswith(API_PREFIX):
            app = self.api
        elif path.startswith(GUARD_PREFIX):
            app = self.fallback
        else:
            app = self.protected
        await app(scope, receive, send)


def uvicorn_options(settings: Settings) -> dict[str, object]:
    """How the gateway is served, by one process or each of ``gateway.workers`` (whose shared
    socket is made so that its connections keep TCP_NODELAY: ``guard.cli.workers``)."""
    g = settings.gateway
    limits = ProtocolLimits(
        header_timeout=g.header_timeout,
        max_header_count=g.max_header_count,
        max_header_size=g.max_header_size,
        max_url_length=g.max_url_length,
        max_query_params=g.max_query_params,
        max_connections_per_client=g.max_connections_per_client,
        trusted_proxies=g.trusted_proxies,
    )
    return {
        "lifespan": "on",
        # The gateway judges forwarding headers itself, against gateway.trusted_proxies.
        "proxy_headers": False,
        "server_header": False,
        "access_log": False,
        "log_config": None,
        # httptools with the gateway's limits; what it refuses is answered and recorded.
        "http": build_protocol(limits),
        "ws": "none",  # MLflow serves no WebSocket: the protocol refuses upgrades itself
        "timeout_graceful_shutdown": max(1, round(settings.gateway.shutdown_timeout)),
    }


def build_gateway(
    settings: Settings,
    environ: Mapping[str, str] | None = None,
    on_bootstrap: Callable[[str], None] | None = None,
    worker: WorkerRole | None = None,
) -> Gateway:
    """Assemble the gateway. Opens nothing: connections and the child process wait for startup.
    Raises TokenError for a malformed ``MLFLOW_GUARD_BOOTSTRAP_TOKEN``, whether or not it would
    be used. As one of ``worker.count`` processes, it supervises no MLflow, forwards to the
    parent's, writes its own audit chain, and counts failures per address with the others."""
    environ = dict(os.environ if environ is None else environ)
    if problem := validate_bootstrap_token(environ):
        raise TokenError(problem)
    engine = build_engine(settings.database_uri)
    # What every replica follows (revocations, blocks, the policy) is read through connections
    # of its own: requests holding all of the main pool's (a slow database) must not delay it.
    poll_engine = build_engine(settings.database_uri, connections=POLL_CONNECTIONS)
    store = TokenStore(engine, load_secret_key(settings.secret_key_file, environ))
    revocations = Revocations(poll_engine, settings.authz.revocation_poll_interval)
    token_provider = TokenProvider(store, settings.tokens.cache_ttl, revocations)
    ldap_provider = build_ldap_provider(settings, engine, store.key)
    if ldap_provider is not None:
        ldap_provider.revocations = revocations  # cached logins are dropped at a revocation
    providers: list[IdentityProvider] = [token_provider]  # tokens first: mlg_ secrets are theirs
    if ldap_provider is not None:
        providers.append(ldap_provider)
    provider_http = ProviderHttp()  # one HTTP session for every OpenID Connect provider
    if (bearer := build_bearer_provider(settings, provider_http)) is not None:
        bearer.revocations = revocations
        providers.append(bearer)  # JWTs of trusted issuers (never mlg_: tokens are asked first)
    supervisor = None
    if settings.embedded and worker is None:
        m = settings.mlflow
        supervisor = MlflowSupervisor(
            EmbeddedConfig(
                data_dir=settings.data_dir,
                backend_store_uri=m.backend_store_uri,
                default_artifact_root=m.default_artifact_root,
                artifacts_destination=m.artifacts_destination,
                serve_artifacts=m.serve_artifacts,
                startup_timeout=m.startup_timeout,
                restart_backoff_max=m.restart_backoff_max,
            ),
            environ,
        )
    upstream_url = supervisor.url if supervisor is not None else settings.upstream.url
    if worker is not None:
        upstream_url = worker.upstream_url
    u = settings.upstream
    upstream = UpstreamClient(
        upstream_url,
        UpstreamLimits(
            connect_timeout=u.connect_timeout,
            read_timeout=u.read_timeout,
            pool_timeout=u.pool_timeout,
            max_connections=u.max_connections,
            keepalive_expiry=u.keepalive_expiry,
        ),
    )
    g = settings.gateway

    async def health() -> tuple[int, dict[str, object] | bytes]:
        return 200, {"status": "ok"}

    shared = None  # one of several workers: the failures every worker counted decide
    if worker is not None and worker.failures_file:
        shared = SharedWindows(Path(worker.failures_file), worker.failures_key)
    limiter = FailureLimiter(g.failed_login_limit, g.failed_login_interval, shared=shared)
    trail: AuditTrail | None = None
    if settings.audit.enabled:
        a = settings.audit
        trail = AuditTrail(
            spool_dir=worker_spool_dir(settings, worker.index if worker is not None else 0),
            secret_key=store.key,
            engine=engine,
            segment_size=a.segment_size,
            batch_size=a.batch_size,
            shutdown_grace=a.shutdown_grace,
            limiter=limiter,
            sync_writes=a.sync_writes,
            loop_fsync_limit=a.loop_fsync_limit,
        )
        if ldap_provider is not None and ldap_provider.throttle is not None:
            ldap_provider.throttle.on_locked = login_locked_event(trail, ldap_provider.throttle)

    async def ready() -> tuple[int, dict[str, object] | bytes]:
        checks = await asyncio.gather(_check_database(engine), _check_upstream(upstream))
        result = dict(zip(("database", "upstream"), checks, strict=True))
        if result["upstream"] == "ok" and (refused := await version.check(upstream)):
            # reachable, but every request would be refused (an unverified release, workspaces
            # that do not match the setting): a load balancer must stop sending traffic here
            result["upstream"] = refused.detail or refused.reason
        if trail is not None:
            result["audit"] = trail.problem or "ok"
        failing = [name for name, state in result.items() if state != "ok"]
        if failing:
            return 503, {"detail": "; ".join(f"{n}: {result[n]}" for n in failing)}
        return 200, {"status": "ready", "checks": result}

    policies = PolicyRuntime(
        PolicyStore(engine, workspaces=u.workspaces), settings.authz.poll_interval,
        reads=PolicyStore(poll_engine, workspaces=u.workspaces),
    )  # fmt: skip
    resolver = Resolver(
        upstream,
        settings.authz.cache_size,
        settings.authz.cache_ttl,
        settings.authz.negative_cache_ttl,
    )

    def version_changed(old: str | None, new: str) -> None:
        """The upstream's release changed (or was first read): its route table is served from
        the next request on (RouteClassifierMiddleware); recorded in the audit trail."""
        logger.info("upstream MLflow release: %s -> %s", old or "(unknown)", new)
        if trail is not None:
            trail.event({"event": "upstream_version_changed", "principal": "gateway:upstream",
                         "from": old, "to": new,
                         "verified": new in VERIFIED_MLFLOW_VERSIONS})  # fmt: skip

    version = VersionGate(
        VERIFIED_MLFLOW_VERSIONS, u.allow_unverified_mlflow, strict=u.strict_version,
        on_change=version_changed, workspaces=u.workspaces,
    )  # fmt: skip
    protected: ASGIApp = ProxyApp(client=upstream, version=version)
    if trail is not None:
        protected = IntentMiddleware(protected, trail=trail)

    async def grant_creator(subject: str, resource: str) -> None:
        """Whoever created an experiment or a registered model manages it."""
        if "*" in resource or "?" in resource:  # as a pattern the name would cover others
            logger.warning("no creator grant for %s: its name holds a wildcard", resource)
            return
        grant = Grant(subject, CREATOR_ROLE, resource)
        try:
            await anyio.to_thread.run_sync(
                lambda: policies.store.change("gateway:creator", add=[grant])
            )
        except (PolicyError, sa.exc.SQLAlchemyError) as exc:
            logger.warning("could not grant %s to its creator %s: %s", resource, subject, exc)
            return
        if trail is not None:
            trail.event({"event": "policy_changed", "principal": "gateway:creator",
                         "changes": {"added": [", ".join(grant.row())]}})  # fmt: skip
        await policies.refresh()

    promotion = PromotionRules(settings.authz.protected_aliases, settings.authz.validation_tags)
    protected = AuthorizationMiddleware(
        protected,
        policies=policies,
        resolver=resolver,
        promotion=promotion,
        search=SearchFilter(upstream, store.key, settings.authz.search_max_pages),
        on_created=grant_creator,
        before_search=trail.intent if trail is not None else None,
        max_body_size=g.max_body_size,
    )
    if trail is not None:  # outside authorization: its filtered searches' answers are held too
        protected = DurableAnswerMiddleware(protected, trail=trail)
    if u.workspaces:
        protected = WorkspaceMiddleware(protected, policies=policies)
    protected = ArtifactPathMiddleware(protected)
    deadlines = BodyDeadlines(g.body_timeout, g.body_idle_timeout, g.min_upload_rate)
    protected = BodyMiddleware(
        protected,
        max_body_size=g.max_body_size,
        max_ids_per_request=settings.authz.max_ids_per_request,
        deadlines=deadlines,
    )
    protected = RouteClassifierMiddleware(
        protected, tables=ReleaseTables(load_routes()), gate=version, client=upstream
    )
    session_store = SessionStore(
        engine, store.key, idle_timeout=settings.sessions.idle_timeout,
        absolute_timeout=settings.sessions.absolute_timeout,
    )  # fmt: skip
    session_cookie = SessionCookie(
        store.key, name=settings.sessions.cookie_name,
        secure=settings.public_url.startswith("https:"),
        max_age=round(settings.sessions.absolute_timeout),
    )  # fmt: skip
    blocked = BlockedSubjects(UserBlocks(poll_engine), settings.authz.poll_interval, session_store)
    revocations.listen(blocked.refresh)  # a block moves the counter: re-read who is blocked
    personal = PersonalTokens(
        governance=Governance(store, policies.store), policies=policies,
        max_expiry=settings.tokens.personal_max_expiry,
        default_expiry=settings.tokens.default_expiry, blocked=blocked,
        event=trail.event if trail is not None else None,
        intent=trail.intent if trail is not None else None,
    )  # fmt: skip
    browsers = BrowserSessions(
        session_store, session_cookie, own_origins=settings.own_origins,
        allowed_origins=g.cors_allowed_origins,
        directory=ldap_provider, group_refresh=settings.ldap.group_refresh,
        tokens=store, token_cache_ttl=settings.tokens.cache_ttl, revocations=revocations,
        on_event=trail.event if trail is not None else None,
    )  # fmt: skip

    def authenticated(inner: ASGIApp) -> ASGIApp:
        return AuthenticationMiddleware(
            inner, providers=providers, realm=g.realm, limiter=limiter, sessions=browsers,
            blocked=blocked,
        )  # fmt: skip

    protected = authenticated(protected)
    sso = None
    if (sso_settings := build_sso_config(settings)) is not None:
        o = settings.oidc
        issuer = Issuer(
            sso_settings.issuer, http=provider_http, timeout=o.timeout,
            jwks_refresh_interval=o.jwks_refresh_interval,
        )  # fmt: skip
        sso = build_sso(
            sso_settings, issuer, engine=engine, secret_key=store.key, sessions=session_store,
            cookie=session_cookie, bindings=IdentityBindings(engine), blocked=blocked,
            audit=trail.event if trail is not None else None,
        )  # fmt: skip
    login = LoginApp(
        providers=providers, sessions=session_store, cookie=session_cookie,
        csrf=LoginCsrf(store.key, secure=session_cookie.secure), logout_csrf=LogoutCsrf(store.key),
        origins=frozenset(settings.own_origins), directory=ldap_provider is not None,
        blocked=blocked, limiter=limiter, audit=trail.event if trail is not None else None,
        sso=sso is not None, provider_logout=sso.provider_logout if sso is not None else None,
        provider_origin=origin_of(settings.oidc.issuer) if sso is not None else "",
    )  # fmt: skip
    api: ASGIApp = PolicyApi(
        policies=policies,
        governance=Governance(store, policies.store),
        max_body_size=g.max_body_size,
        audit=trail.store if trail is not None else None,
        intent=trail.intent if trail is not None else None,
        deadlines=deadlines,
        sessions=session_store,
        personal=personal,
    )
    token_page = TokenPage(personal=personal, cookie=session_cookie, csrf=TokenPageCsrf(store.key))
    metrics = Metrics(trail, multiprocess=worker is not None)

    async def scrape() -> tuple[int, dict[str, object] | bytes]:
        return 200, metrics.render()

    def complete(scope: Scope) -> None:
        """Every request, once answered: counted, and recorded (a flood only as a count)."""
        context = scope.get("guard")
        # Refusals and preflights are what anyone can send without logging in: counted (by
        # FloodCountMiddleware before the answer, or here). A 5xx is the gateway failing (the
        # token store down, MLflow gone), not a failed login: it neither feeds the limiter
        # nor hides in a summary; each one is recorded.
        if (
            context is not None
            and not scope.get(COUNTED)
            and counts_as_failure(scope, context.status)
        ):
            blocking = blocks_logins(context.status)
            context.unrecorded = not limiter.refused(context.client, blocking)
        metrics.observe(scope)
        if trail is not None:
            trail.outcome(scope)

    app: ASGIApp = SplitByPrefix(
        GuardRoutes({"/guard/health": health, "/guard/ready": ready, "/guard/metrics": scrape}),
        authenticated(api),
        protected,
        authenticated(GuardFallback(PROBES, {TOKEN_PAGE: token_page})),
        login,
        sso,
    )
    app = CORSMiddleware(app, allowed_origins=g.cors_allowed_origins)
    app = AllowedHostsMiddleware(
        app,
        allowed_hosts=g.allowed_hosts or default_allowed_hosts(g.host),
        exempt_paths=PROBES,
    )
    app = SingleValuedHeadersMiddleware(app)
    app = SecurityHeadersMiddleware(
        app, frame_ancestors=g.frame_ancestors, hsts_max_age=g.hsts_max_age
    )
    if trail is not None:
        app = FloodCountMiddleware(app, trail=trail, limiter=limiter)
    app = RequestContextMiddleware(
        app,
        trusted_proxies=g.trusted_proxies,
        on_complete=complete,
    )
    return Gateway(
        settings=settings,
        app=app,
        engine=engine,
        poll_engine=poll_engine,
        tokens=store,
        token_provider=token_provider,
        policies=policies,
        upstream=upstream,
        supervisor=supervisor,
        environ=environ,
        trail=trail,
        on_bootstrap=on_bootstrap or (lambda secret: None),
        ldap_provider=ldap_provider,
        blocked=blocked,
        revocations=revocations,
        provider_http=provider_http,
        worker=worker,
        metrics=metrics,
    )


def build_sso_config(settings: Settings) -> SsoConfig | None:
    """The ``[oidc]`` settings resolved for browser single sign-on (the secret read from its
    file, the redirect URI defaulted), or None when ``oidc.issuer`` is unset."""
    c = settings.oidc
    if not c.issuer:
        return None
    secret = c.client_secret
    if c.client_secret_file:
        secret = Path(c.client_secret_file).read_text().rstrip("\r\n")
    return SsoConfig(
        issuer=c.issuer, client_id=c.client_id, client_secret=secret,
        redirect_uri=settings.oidc_redirect_uri,
        post_logout_redirect_uri=settings.public_url + SSO_RETURN_PAGE, alias=c.alias,
        scopes=tuple(c.scopes), username_claim=c.username_claim, groups_claim=c.groups_claim,
        allowed_algorithms=tuple(c.allowed_algorithms),
        end_provider_session=c.end_provider_session, leeway=c.leeway,
    )  # fmt: skip


def build_bearer_provider(settings: Settings, http: ProviderHttp) -> BearerProvider | None:
    """Machine logins with identity-provider JWTs: one trusted issuer per ``[[oidc.bearer]]``
    table, or None when there is none."""
    o = settings.oidc
    if not o.bearer:
        return None
    return BearerProvider([
        BearerIssuer(
            alias=b.alias,
            issuer=Issuer(b.issuer, http=http, timeout=o.timeout,
                          jwks_refresh_interval=o.jwks_refresh_interval),
            audience=b.audience, subject_claim=b.subject_claim, groups_claim=b.groups_claim,
            algorithms=tuple(b.allowed_algorithms), leeway=o.leeway, require_typ=b.require_typ,
        )
        for b in o.bearer
    ])  # fmt: skip


def build_ldap_provider(
    settings: Settings, engine: Engine | None = None, key: bytes = b""
) -> LdapProvider | None:
    """The directory login of the ``[ldap]`` settings, or None when ``ldap.urls`` is empty.
    With ``engine``, user names are bound to the first entry that used them; with ``key`` as
    well, credential failures are limited per user name (``gateway.failed_login_user_limit``)."""
    c = settings.ldap
    if not c.urls:
        return None
    g = settings.gateway
    throttle = None
    if engine is not None and key and g.failed_login_user_limit > 0:
        throttle = LoginThrottle(
            engine, key, limit=g.failed_login_user_limit, interval=g.failed_login_user_interval
        )
    password = c.bind_password
    if c.bind_password_file:
        password = Path(c.bind_password_file).read_text().rstrip("\r\n")
    return LdapProvider(
        LdapConfig(
            urls=c.urls, bind_dn=c.bind_dn, bind_password=password, user_base=c.user_base,
            user_filter=c.user_filter, user_attribute=c.user_attribute,
            id_attribute=c.id_attribute, bind_dn_template=c.bind_dn_template,
            name_forms=c.name_forms,
            group_base=c.group_base, group_filter=c.group_filter,
            group_attribute=c.group_attribute, use_memberof=c.use_memberof,
            nested_groups=c.nested_groups, page_size=c.page_size, start_tls=c.start_tls,
            ca_file=c.ca_file, connect_timeout=c.connect_timeout, timeout=c.timeout,
            follow_referrals=c.follow_referrals, pool_size=c.pool_size,
            cache_ttl=c.cache_ttl, cache_size=c.cache_size, ad_in_chain=c.ad_in_chain,
            group_refresh=c.group_refresh,
        ),
        bindings=None if engine is None else IdentityBindings(
            engine, ttl=c.cache_ttl, size=c.cache_size
        ),
        throttle=throttle,
    )  # fmt: skip


def login_locked_event(trail: AuditTrail, throttle: LoginThrottle) -> Callable[[str, Lock], None]:
    """The audit event of a user name the login throttle just locked."""
    window = throttle.interval.total_seconds()

    def record(name: str, lock: Lock) -> None:
        trail.event({
            "event": "login_locked", "name": trail.redactor.name(name),
            "name_key": lock.name_key, "failures": lock.failures, "window_seconds": window,
            "locked_until": lock.until.isoformat(timespec="seconds"),
            "clients": list(lock.clients),
        })  # fmt: skip

    return record


async def _check_database(engine: Engine) -> str:
    try:
        await asyncio.wait_for(anyio.to_thread.run_sync(ping, engine), PROBE_TIMEOUT)
    except TimeoutError:
        return "timed out"
    except sa.exc.SQLAlchemyError as exc:
        return f"unavailable ({type(exc).__name__})"
    return "ok"


async def _check_upstream(upstream: UpstreamClient) -> str:
    try:
        response = await asyncio.wait_for(
            upstream.request("GET", "/health", [("host", upstream.host_header)], None),
            PROBE_TIMEOUT,
        )
    except TimeoutError:
        return "timed out"
    except UpstreamError as exc:
        return exc.refusal.reason
    async with response:
        async for _ in response.body():
            pass
        return "ok" if response.status == 200 else f"status {response.status}"
