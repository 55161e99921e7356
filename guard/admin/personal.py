"""Personal tokens: what a person may do with their own tokens, for every surface that offers it
(``/guard/api/tokens``, the ``/guard/tokens`` page). One set of rules, one authorization path:

- Create: only a person (``user:``) who proved who they are with this very request: a directory
  login (LDAP Basic) or a browser session begun with LDAP or single sign-on (``FRESH_METHODS``).
  Never another token, personal or service, and never a session begun with a token: a stolen
  token must not mint more, and nobody makes tokens for someone else here (administrators use
  ``mlflow-guard token create --user NAME``). The expiry is capped by
  ``tokens.personal_max_expiry``.
- List: one's own tokens; policy administrators (``manage`` on ``guard:policy``) any person's
  (``user=NAME``) or every token, service tokens included.
- Revoke: one's own tokens, by label (``laptop``) or full name (``alice/laptop``); policy
  administrators any token by its full name (a service token's grants go with it).

A personal token acts as its owner with no grant of its own (``guard.identity.tokens``), so it
needs nothing in the policy and revoking it changes no rule. Each creation and revocation is an
audit event (``token_created`` / ``token_revoked`` with ``owner``), and its intent is written
before the change (no record, no change) like every change the API makes.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Awaitable, Callable, Container
from typing import Any, Final

import anyio.to_thread
from starlette.types import Scope

from guard.admin.delegation import POLICY, may
from guard.admin.governance import Governance
from guard.authz.runtime import PolicyRuntime
from guard.errors import Refusal
from guard.identity.base import Principal
from guard.identity.tokens import OWNER_PREFIX, TokenError, TokenRecord, personal_name, utcnow

# How a caller proved to be the person this request: a directory password now, or a browser
# session that began with one or with single sign-on. Tokens and token sessions are not here.
FRESH_METHODS: Final = frozenset({"ldap", "session:ldap", "session:oidc"})
_DURATION: Final = re.compile(r"(\d{1,6})([hdw])")
_UNITS: Final = {"h": 3600, "d": 86400, "w": 7 * 86400}

Event = Callable[[dict[str, Any]], None]
Intent = Callable[[Scope], Awaitable[Refusal | None]]


class PersonalTokenError(Exception):
    """A refusal for the surface to render (the API's JSON, the page's message)."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


def token_json(record: TokenRecord, now: Any = None) -> dict[str, Any]:
    """A token as the API and the page show it: never its secret."""
    now = now or utcnow()
    return {
        "name": record.name,
        "label": record.label if record.owner is not None else record.name,
        "owner": record.owner,
        "role": record.role,
        "created": record.created_at.isoformat(timespec="seconds"),
        "expires": record.expires_at.isoformat(timespec="seconds"),
        "last_used": (
            record.last_used_at.isoformat(timespec="seconds") if record.last_used_at else None
        ),
        "state": record.state(now),
    }


class PersonalTokens:
    """The operations (see the module docstring). ``scope`` is the request's: its principal
    decides, and its audit record carries the change."""

    def __init__(
        self,
        *,
        governance: Governance,
        policies: PolicyRuntime,
        max_expiry: float,
        default_expiry: float,
        blocked: Container[str] = frozenset(),
        event: Event | None = None,
        intent: Intent | None = None,
    ) -> None:
        self.governance = governance
        self.store = governance.tokens
        self.policies = policies
        self.max_expiry = max_expiry
        self.default_expiry = min(default_expiry, max_expiry)
        self.blocked = blocked
        self.event = event
        self.intent = intent

    # -- who may --------------------------------------------------------------------------

    @staticmethod
    def creation_refusal(principal: Principal) -> Refusal | None:
        """Why ``principal`` may not create a personal token now, or None."""
        subject = str(principal.subject)
        if not subject.startswith(OWNER_PREFIX):
            return Refusal(
                "permission_denied",
                "Only people create personal tokens (service tokens are made with "
                "mlflow-guard token create).",
            )
        if principal.method not in FRESH_METHODS:
            return Refusal(
                "permission_denied",
                "A personal token is created after logging in with your password or single "
                "sign-on, never with a token.",
            )
        return None

    async def is_admin(self, subject: str) -> bool:
        """A policy administrator, checking for a change not yet polled before saying no."""
        index = self.policies.index
        if may(index, subject, "manage", POLICY):
            return True
        return await self.policies.refresh_soon(key=subject) and may(
            self.policies.index, subject, "manage", POLICY
        )

    # -- operations -------------------------------------------------------------------------

    async def list(self, scope: Scope, user: str | None = None) -> list[TokenRecord]:
        """The caller's own live tokens; for administrators, ``user``'s (a subject) or, with
        ``user`` "*", every live token."""
        subject = str(scope["guard"].principal.subject)
        if user is not None and user != subject and not await self.is_admin(subject):
            raise PersonalTokenError(
                Refusal("permission_denied", f"{subject} may list only its own tokens.")
            )
        owner = subject if user is None else (None if user == "*" else user)
        return await anyio.to_thread.run_sync(functools.partial(self.store.list, owner=owner))

    def lifetime(self, expires: str | None) -> float:
        """Seconds of the expiry asked for (``30d``, ``12h``; default: the default expiry,
        capped), refused beyond ``tokens.personal_max_expiry``."""
        if not expires:
            return self.default_expiry
        match = _DURATION.fullmatch(expires.strip())
        if match is None:
            raise PersonalTokenError(
                Refusal("invalid_request_body", "Write the expiry as days or hours: 30d, 12h.")
            )
        seconds = int(match.group(1)) * _UNITS[match.group(2)]
        if not seconds > 0:
            raise PersonalTokenError(
                Refusal("invalid_request_body", "The expiry must be in the future.")
            )
        if seconds > self.max_expiry:
            days = math.floor(self.max_expiry / 86400)
            longest = f"{days} days" if days else f"{self.max_expiry:g} seconds"
            raise PersonalTokenError(
                Refusal(
                    "invalid_request_body",
                    f"A personal token lives at most {longest} (tokens.personal_max_expiry).",
                )
            )
        return seconds

    async def create(
        self, scope: Scope, label: str, expires: str | None
    ) -> tuple[TokenRecord, str]:
        """A personal token of the caller; its record and its secret (shown once)."""
        context = scope["guard"]
        principal: Principal = context.principal
        if (refusal := self.creation_refusal(principal)) is not None:
            raise PersonalTokenError(refusal)
        owner = str(principal.subject)
        if owner in self.blocked:
            raise PersonalTokenError(Refusal("user_blocked", f"({owner})"))
        lifetime = self.lifetime(expires)
        try:
            name = personal_name(owner, label)
        except TokenError as exc:
            raise PersonalTokenError(Refusal("invalid_request_body", str(exc))) from None
        context.changes = {"token_created": name, "owner": owner}
        if self.intent is not None and (refusal := await self.intent(scope)) is not None:
            raise PersonalTokenError(refusal)
        try:
            record, secret = await anyio.to_thread.run_sync(
                self.store.create_personal, owner, label, lifetime
            )
        except TokenError as exc:
            raise PersonalTokenError(Refusal("token_exists", str(exc))) from None
        context.changes = {
            "token_created": record.name, "owner": owner,
            "expires": record.expires_at.isoformat(timespec="seconds"),
        }  # fmt: skip
        self._event("token_created", owner, record, owner, context.request_id)
        return record, secret

    async def revoke(self, scope: Scope, name: str) -> TokenRecord:
        """Revoke the caller's token ``name`` (its label or full name); administrators any
        token by its full name. Another person's token is "not found" to everyone else."""
        context = scope["guard"]
        subject = str(context.principal.subject)
        own = subject.startswith(OWNER_PREFIX)
        full = name
        if own and "/" not in name:
            full = f"{subject.removeprefix(OWNER_PREFIX)}/{name}"
        admin = await self.is_admin(subject)
        mine = own and full.startswith(subject.removeprefix(OWNER_PREFIX) + "/")
        if not mine and not admin:
            raise PersonalTokenError(Refusal("not_found", "You have no live token of that name."))
        context.changes = {"token_revoked": full}
        if self.intent is not None and (refusal := await self.intent(scope)) is not None:
            raise PersonalTokenError(refusal)
        try:
            if mine:
                record = await anyio.to_thread.run_sync(
                    functools.partial(self.store.revoke, full, owner=subject)
                )
            else:
                record = await self._revoke_any(full, subject)
        except TokenError:
            raise PersonalTokenError(
                Refusal("not_found", "There is no live token of that name.")
            ) from None
        context.changes = {"token_revoked": record.name, "owner": record.owner}
        self._event("token_revoked", record.owner, record, subject, context.request_id)
        return record

    async def _revoke_any(self, name: str, actor: str) -> TokenRecord:
        """An administrator's revocation: a service token loses its grants too."""
        records = await anyio.to_thread.run_sync(self.store.list)
        found = next((r for r in records if r.name == name), None)
        if found is None:
            raise TokenError(name)
        if found.owner is not None:
            return await anyio.to_thread.run_sync(self.store.revoke, name)
        record = await anyio.to_thread.run_sync(self.governance.revoke_token, name, actor)
        await self.policies.refresh()
        return record

    def _event(
        self, event: str, owner: str | None, record: TokenRecord, actor: str, request_id: str
    ) -> None:
        if self.event is None:
            return
        body: dict[str, Any] = {
            "event": event, "principal": actor, "token": record.name, "owner": owner,
            "request_id": request_id,
        }  # fmt: skip
        if event == "token_created":
            body["expires"] = record.expires_at.isoformat(timespec="seconds")
        self.event(body)
