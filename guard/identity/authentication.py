"""Authentication: turn the request's credentials into a principal, or refuse with 401.

Providers are asked in order; the first that recognizes the credentials decides (a gateway
token, by its ``mlg_`` prefix, is only the token provider's; any other secret is not). No
credentials, or credentials nobody accepts or recognizes, get 401 with a Basic challenge, so
browsers show their login prompt (and a Bearer one, for API clients); that 401 is counted and
fingerprinted like any failed login.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from guard.edge.ratelimit import FailureLimiter
from guard.errors import Refusal, send_refusal
from guard.identity.base import IdentityProvider, parse_authorization


class AuthenticationMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        providers: Sequence[IdentityProvider],
        realm: str,
        limiter: FailureLimiter | None = None,
    ) -> None:
        self.app = app
        self.providers = tuple(providers)
        self.limiter = limiter
        quoted = realm.replace("\\", "\\\\").replace('"', '\\"')
        self.challenges = [
            (b"www-authenticate", f'Basic realm="{quoted}", charset="UTF-8"'.encode()),
            (b"www-authenticate", f'Bearer realm="{quoted}"'.encode()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        credentials = parse_authorization(scope["headers"])
        if credentials is None:
            await self._unauthorized(scope, send, Refusal("unauthenticated"))
            return
        if isinstance(credentials, Refusal):
            await self._unauthorized(scope, send, credentials)
            return
        for provider in self.providers:
            result = await provider.authenticate(credentials)
            if result is None:
                continue
            if isinstance(result, Refusal):
                if result.status == 401:
                    await self._unauthorized(scope, send, result)
                else:
                    await send_refusal(scope, send, result)
                return
            scope["guard"].principal = result
            await self.app(scope, receive, send)
            return
        await self._unauthorized(scope, send, Refusal("invalid_credentials"))

    async def _unauthorized(self, scope: Scope, send: Send, refusal: Refusal) -> None:
        """401 with challenges, or 429 for an address past its limit of failures."""
        wait = self.limiter.blocked(scope["guard"].client) if self.limiter is not None else 0.0
        if wait > 0:
            retry = [(b"retry-after", str(max(1, round(wait))).encode())]
            await send_refusal(scope, send, Refusal("too_many_failures"), retry)
            return
        await send_refusal(scope, send, refusal, self.challenges)
