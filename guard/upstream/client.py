"""The one connection pool to MLflow, over aiohttp.

httpx's client was measured here at ~2.0 ms CPU per request at c=8 and even its request objects
on top of an aiohttp transport at ~0.3-0.6 ms, against ~0.13 ms for aiohttp itself; the whole
gateway budget is ~1 ms. So this module speaks aiohttp directly, and keeps the things a proxy
needs explicit: no cookie jar (a shared jar would replay one caller's cookies to the next), no
automatic headers or decompression (bytes pass through as MLflow sent them), real timeouts, and
a bounded pool whose exhaustion is a clear 503 rather than a hang.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from guard.errors import Refusal

logger = logging.getLogger("guard.upstream")

# Headers aiohttp would invent when a request lacks them. Most requests carry all of them, and
# telling aiohttp to skip costs it a sort and a copy per request, so it is told only when needed.
_NO_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
_AUTO_NAMES = frozenset(name.lower() for name in _NO_AUTO_HEADERS)
CHUNK_SIZE = 256 * 1024


class UpstreamError(Exception):
    """The upstream failed before answering; carries the refusal to send instead."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


@dataclass(frozen=True, slots=True)
class UpstreamLimits:
    connect_timeout: float
    read_timeout: float
    pool_timeout: float
    max_connections: int
    keepalive_expiry: float


class UpstreamResponse:
    """An upstream answer whose body has not been read; iterate ``body()`` or ``close()``."""

    def __init__(self, response: aiohttp.ClientResponse, slot: asyncio.Semaphore) -> None:
        self.status = response.status
        self.headers: tuple[tuple[bytes, bytes], ...] = response.raw_headers
        self._response = response
        self._slot: asyncio.Semaphore | None = slot
        self._complete = False

    async def body(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_chunked(CHUNK_SIZE):
                yield chunk
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise UpstreamError(_refusal_for(exc)) from exc
        self._complete = True

    def close(self) -> None:
        """Return the connection to the pool if the body was read whole, else drop it."""
        if self._complete or self._response.content.is_eof():
            self._response.release()
        else:
            self._response.close()
        if self._slot is not None:
            self._slot.release()
            self._slot = None

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _refusal_for(exc: BaseException) -> Refusal:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return Refusal("upstream_unreachable")
    if isinstance(exc, TimeoutError):  # connect, read and aiohttp's ServerTimeoutError
        return Refusal("upstream_timeout")
    return Refusal("upstream_unreachable")  # disconnected mid-answer, reset, protocol error


class UpstreamClient:
    """Sends requests to one MLflow base URL. Create it inside the running event loop."""

    def __init__(self, base_url: str, limits: UpstreamLimits) -> None:
        self.base_url = base_url.rstrip("/")
        self.host_header = urlsplit(
            self.base_url
        ).netloc  # a Host MLflow allows, never the caller's
        self.limits = limits
        self._slots = asyncio.Semaphore(limits.max_connections)
        self._session: aiohttp.ClientSession | None = None
        # Connections to MLflow that failed: the version gate reads /version again after one.
        self.connection_failures = 0

    def open(self) -> None:
        """Create the connection pool; call from inside the running event loop."""
        connector = aiohttp.TCPConnector(
            limit=self.limits.max_connections,
            limit_per_host=0,
            keepalive_timeout=self.limits.keepalive_expiry,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(
                total=None,
                sock_connect=self.limits.connect_timeout,
                sock_read=self.limits.read_timeout,
            ),
            trust_env=False,
        )

    async def request(
        self,
        method: str,
        target: str,
        headers: list[tuple[str, str]],
        body: bytes | AsyncIterator[bytes] | None,
    ) -> UpstreamResponse:
        """Send a request; ``target`` is the path plus query. Raises UpstreamError."""
        if self._session is None:
            raise UpstreamError(Refusal("upstream_unreachable", "The gateway is not started."))
        slot = self._slots
        if slot.locked():  # only a full pool pays for a timed wait
            try:
                await asyncio.wait_for(slot.acquire(), self.limits.pool_timeout)
            except TimeoutError:
                raise UpstreamError(Refusal("upstream_busy")) from None
        else:
            await slot.acquire()
        try:
            needed = _AUTO_NAMES if body is not None else _AUTO_NAMES - {"content-type"}
            present = {name for name, _ in headers if name in needed}
            response = await self._session.request(
                method,
                URL(self.base_url + target, encoded=True),  # already canonical: no requoting
                headers=CIMultiDict(headers),
                data=body,
                allow_redirects=False,
                compress=None,
                skip_auto_headers=None if present == needed else _NO_AUTO_HEADERS,
            )
        except (TimeoutError, aiohttp.ClientError) as exc:
            slot.release()
            if isinstance(exc, aiohttp.ClientConnectionError):
                self.connection_failures += 1
            raise UpstreamError(_refusal_for(exc)) from exc
        except BaseException:
            slot.release()
            raise
        return UpstreamResponse(response, slot)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


VERSION_RECHECK = 60.0  # seconds between two reads of the upstream's /version


def _minor(version: str) -> tuple[str, ...]:
    return tuple(version.strip().split(".")[:2])


class VersionGate:
    """Forward only to an MLflow release the route table was verified against.

    The upstream's ``/version`` is read before the first forwarded request, again after any
    failed connection to MLflow (a restart may bring another release) and every
    ``recheck`` seconds. A verified release is served; an unverified patch release of a
    verified minor (3.18.1 when 3.18.0 is verified) is served with a loud warning unless
    ``strict``; any other release is refused with ``upstream_unverified`` unless the operator
    allowed it, which is logged loudly. ``on_change(old, new)`` is called when the release
    read differs from the last one (the app logs and audits it; the route classifier serves the
    new release's table from the next request on).
    """

    def __init__(
        self,
        verified: frozenset[str],
        allow_unverified: bool,
        *,
        strict: bool = False,
        recheck: float = VERSION_RECHECK,
        on_change: Callable[[str | None, str], None] | None = None,
        workspaces: bool = False,
    ) -> None:
        self.verified = verified
        self.workspaces = workspaces  # upstream.workspaces, compared with MLflow's server-info
        self.mismatch = ""  # why MLflow's workspaces disagree with the setting, if they do
        self.allow_unverified = allow_unverified
        self.strict = strict
        self.recheck = recheck
        self.on_change = on_change
        self.version: str | None = None
        self._read_at = -recheck
        self._failures_seen = 0
        self._lock = asyncio.Lock()

    def _stale(self, client: UpstreamClient) -> bool:
        return (
            self.version is None
            or client.connection_failures != self._failures_seen
            or time.monotonic() - self._read_at >= self.recheck
        )

    async def check(self, client: UpstreamClient) -> Refusal | None:
        if self._stale(client):
            async with self._lock:
                if self._stale(client):
                    failures = client.connection_failures
                    try:
                        version = await self._read(client)
                        self._compare_workspaces(await self._workspaces_enabled(client))
                    except UpstreamError as exc:
                        self._read_at = -self.recheck  # read again on the next request
                        return exc.refusal
                    self._failures_seen, self._read_at = failures, time.monotonic()
                    if version != self.version:
                        old, self.version = self.version, version
                        self._report()
                        if self.on_change is not None:
                            self.on_change(old, version)
        current = self.version
        if current is None:  # another request's first read failed meanwhile
            return Refusal("upstream_unreachable")
        if self.mismatch:
            return Refusal("upstream_misconfigured", self.mismatch)
        if self.accepts(current):
            return None
        return Refusal(
            "upstream_unverified",
            f"MLflow {current} is not a verified release "
            f"({', '.join(sorted(self.verified))}); see --allow-unverified-mlflow.",
        )

    def patch_of_verified(self, version: str) -> bool:
        """An unverified release of a verified minor (3.18.1 when 3.18.0 is verified)."""
        return version not in self.verified and _minor(version) in {
            _minor(v) for v in self.verified
        }

    def accepts(self, version: str) -> bool:
        if version in self.verified or self.allow_unverified:
            return True
        return self.patch_of_verified(version) and not self.strict

    @staticmethod
    async def _get(client: UpstreamClient, path: str) -> tuple[int, bytes]:
        """GET ``path`` from MLflow: its status and whole body."""
        response = await client.request("GET", path, [("host", client.host_header)], None)
        async with response:
            return response.status, b"".join([chunk async for chunk in response.body()])

    async def _read(self, client: UpstreamClient) -> str:
        status, body = await self._get(client, "/version")
        if status != 200:
            raise UpstreamError(Refusal("upstream_unverified", "MLflow has no /version."))
        return body.decode("utf-8", "replace").strip()

    async def _workspaces_enabled(self, client: UpstreamClient) -> bool:
        """Whether MLflow serves workspaces (server-info's ``workspaces_enabled``; an MLflow
        without the field, or without server-info, serves none)."""
        status, body = await self._get(client, "/api/3.0/mlflow/server-info")
        if status != 200:
            return False
        try:
            info = json.loads(body)
        except (ValueError, RecursionError):
            return False
        return isinstance(info, dict) and info.get("workspaces_enabled") is True

    def _compare_workspaces(self, enabled: bool) -> None:
        mismatch = ""
        if enabled and not self.workspaces:
            mismatch = (
                "MLflow runs with workspaces and upstream.workspaces is off: turn it on (and "
                "qualify the policy's grants) or start MLflow without --enable-workspaces."
            )
        elif self.workspaces and not enabled:
            mismatch = (
                "upstream.workspaces is on but MLflow runs without workspaces: start it with "
                "--enable-workspaces or turn the setting off."
            )
        if mismatch and mismatch != self.mismatch:
            logger.error("refusing to forward: %s", mismatch)
        elif self.mismatch and not mismatch:
            logger.info("MLflow's workspaces now match upstream.workspaces")
        self.mismatch = mismatch

    def _report(self) -> None:
        verified = ", ".join(sorted(self.verified))
        if self.version in self.verified:
            logger.info("upstream MLflow %s (verified)", self.version)
        elif self.version is not None and self.patch_of_verified(self.version) and not self.strict:
            logger.warning(
                "UPSTREAM MLFLOW %s IS NOT A VERIFIED RELEASE (verified: %s); forwarding because "
                "it is a patch release of a verified minor, with that release's route table: "
                "routes it added or changed may be misclassified (upstream.strict_version = true "
                "refuses it)", self.version, verified,
            )  # fmt: skip
        elif self.allow_unverified:
            logger.warning(
                "UPSTREAM MLFLOW %s IS NOT A VERIFIED RELEASE (verified: %s); forwarding anyway "
                "because --allow-unverified-mlflow is set: routes it added or changed may be "
                "misclassified", self.version, verified,
            )  # fmt: skip
        else:
            logger.error(
                "upstream MLflow %s is not a verified release (verified: %s); refusing to "
                "forward (start with --allow-unverified-mlflow to override)",
                self.version, verified,
            )  # fmt: skip
