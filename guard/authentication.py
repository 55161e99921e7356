"""Authentication: turn the request's credentials into a principal, or refuse with 401.

Providers are asked in order; the first that recognizes the credentials decides. No credentials,
or credentials nobody accepts, get 401 with a Basic challenge, so browsers show their login
prompt (and a Bearer one, for API clients).
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.types import ASGIApp, Receive, Scope, Send

from guard.errors import Refusal, send_refusal
from guard.identity.base import IdentityProvider, parse_authorization


class AuthenticationMiddleware:
    def __init__(self, app: ASGIApp, *, providers: Sequence[IdentityProvider], realm: str) -> None:
        self.app = app
        self.providers = tuple(providers)
        quoted = realm.replace("\\", "\\\\").replace('"', '\\"')
        self.challenges = [
            (b"www-authenticate", f'Basic realm="{quoted}", charset="UTF-8"'.encode()),
            (b"www-authenticate", f'Bearer realm="{quoted}"'.encode()),
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        credentials = parse_authorization(scope["headers"])
        if credentials is None:
            await send_refusal(scope, send, Refusal("unauthenticated"), self.challenges)
            return
        if isinstance(credentials, Refusal):
            await send_refusal(scope, send, credentials, self.challenges)
            return
        for provider in self.providers:
            result = await provider.authenticate(credentials)
            if result is None:
                continue
            if isinstance(result, Refusal):
                challenges = self.challenges if result.status == 401 else None
                await send_refusal(scope, send, result, challenges)
                return
            scope["guard"].principal = result
            await self.app(scope, receive, send)
            return
        await send_refusal(scope, send, Refusal("invalid_credentials"), self.challenges)
