"""Machine logins with identity-provider tokens: ``Authorization: Bearer <JWT>`` from a trusted
``[[oidc.bearer]]`` issuer (a CI pipeline's client-credentials token, a Kubernetes service
account's token) instead of a long-lived gateway token.

Only a Bearer secret with a JWT's shape (three base64url parts) is this provider's; anything
else is "not mine" (``mlg_`` gateway tokens never get here: the token provider is asked first).
The token's unverified ``iss`` picks the trusted issuer whose keys and rules must then accept
everything else (``guard.identity.oidc.Issuer.verify_access_token``: allowed algorithms, kid,
iss, the pinned ``audience``, exp/nbf with leeway, no ``nonce``, ``typ`` at+jwt when sent); a
JWT of any other issuer is refused with 401 ``invalid_credentials``, never passed on to another
provider or upstream. A provider that cannot be reached is 503 ``identity_unavailable``.

The principal is ``client:<alias>/<subject>``: the subject from ``subject_claim`` (default
``client_id``, else ``azp``, else ``sub``), and groups ``group:<alias>/<name>`` from
``groups_claim``, both by the directory naming rule (``guard.identity.ldap.subject_name``), so an
issuer's names can never be a policy-defined group or a person (``user:``) or a gateway token
(``token:``). The groups ride on the subject (``DirectorySubject``) like LDAP's.

A verified token is cached until its ``exp`` (keyed by its SHA-256; at most ``cache_size``
tokens, expired ones dropped first) and only until the revocation counter moves
(``guard.identity.revocations``), so the hot path is one hash and one dict lookup. Refused
tokens are not cached (no memory to flood); a made-up ``kid`` costs no fetch after the first
per interval (``Issuer``).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from guard.errors import Refusal
from guard.identity.base import Credentials, DirectorySubject, Principal
from guard.identity.ldap import subject_name
from guard.identity.oidc import (
    Issuer,
    IssuerUnavailable,
    TokenInvalid,
    looks_like_jwt,
    unverified_issuer,
)
from guard.identity.revocations import Counter

logger = logging.getLogger("guard.identity.bearer")

METHOD: Final = "oidc-bearer"
SUBJECT_CLAIMS: Final = ("client_id", "azp", "sub")  # when subject_claim is empty, in order
MAX_NAME: Final = 200  # characters of a subject or group name; longer ones are refused/skipped
MAX_GROUPS: Final = 256


@dataclass(frozen=True, slots=True)
class BearerIssuer:
    """One ``[[oidc.bearer]]`` table, with its ``Issuer``."""

    alias: str
    issuer: Issuer
    audience: str
    subject_claim: str = ""
    groups_claim: str = ""
    algorithms: tuple[str, ...] = ("RS256", "PS256", "ES256")
    leeway: float = 60.0
    require_typ: bool = False  # the issuer sends typ at+jwt: a token without it is refused


def machine_name(claims: Mapping[str, Any], claim: str = "") -> str | None:
    """The machine's name: ``claim``, or when empty the first of client_id, azp, sub that is a
    non-blank string of at most MAX_NAME characters."""
    for name in (claim,) if claim else SUBJECT_CLAIMS:
        value = claims.get(name)
        if isinstance(value, str) and value.strip() and len(value) <= MAX_NAME:
            return value
    return None


def group_subjects(claims: Mapping[str, Any], claim: str, alias: str) -> tuple[str, ...]:
    """``group:<alias>/<name>`` for each group in ``claim`` (a list of strings, or one)."""
    if not claim:
        return ()
    value = claims.get(claim)
    names = [value] if isinstance(value, str) else value if isinstance(value, list) else []
    return tuple(
        sorted(
            {
                f"group:{alias}/{subject_name(g)}"
                for g in names[:MAX_GROUPS]
                if isinstance(g, str) and g and len(g) <= MAX_NAME
            }
        )
    )


class BearerProvider:
    """Authenticates ``Authorization: Bearer <JWT>`` from trusted issuers (module docstring)."""

    name = "oidc-bearer"

    def __init__(
        self,
        issuers: Sequence[BearerIssuer],
        *,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.time,
        revocations: Counter | None = None,
    ) -> None:
        self.issuers = {entry.issuer.issuer: entry for entry in issuers}
        self.cache_size = cache_size
        self.clock = clock
        self.revocations = revocations or Counter()
        # A verified token: its principal, its exp, and the revocation counter it was checked under.
        self._cache: dict[bytes, tuple[Principal, float, int]] = {}

    async def authenticate(self, credentials: Credentials) -> Principal | Refusal | None:
        if credentials.scheme != "bearer" or not looks_like_jwt(credentials.secret):
            return None
        token = credentials.secret
        key = hashlib.sha256(token.encode("ascii")).digest()
        stamp = self.revocations.counter
        cached = self._cache.get(key)
        if cached is not None:
            if self.clock() < cached[1] and cached[2] == stamp:
                return cached[0]
            del self._cache[key]
        iss = unverified_issuer(token)
        entry = self.issuers.get(iss) if iss is not None else None
        if entry is None:
            return _refused(
                "the token's issuer is not trusted", "The token's issuer is not trusted."
            )
        try:
            claims = await entry.issuer.verify_access_token(
                token, audience=entry.audience, algorithms=entry.algorithms,
                leeway=entry.leeway, require_typ=entry.require_typ,
            )  # fmt: skip
        except TokenInvalid as exc:
            logger.debug("bearer token from %s refused: %s", entry.alias, exc)  # audited
            return _refused(str(exc))
        except IssuerUnavailable as exc:
            logger.warning("bearer token from %s not checked: %s", entry.alias, exc)
            return Refusal("identity_unavailable", "The token's issuer cannot be reached.")
        name = machine_name(claims, entry.subject_claim)
        if name is None:
            claim = entry.subject_claim or "/".join(SUBJECT_CLAIMS)
            return _refused(f"no usable {claim} claim")
        groups = group_subjects(claims, entry.groups_claim, entry.alias)
        expires = float(claims["exp"])
        principal = Principal(
            subject=DirectorySubject(f"client:{entry.alias}/{subject_name(name)}", groups),
            name=f"{entry.alias}/{name}",
            method=METHOD,
            roles=(),
            expires_at=dt.datetime.fromtimestamp(expires, dt.UTC),
            groups=groups,
            identity=f"oidc:{entry.issuer.issuer}#{claims.get('sub', name)}",
        )
        self._remember(key, principal, expires, stamp)
        return principal

    def _remember(self, key: bytes, principal: Principal, expires: float, stamp: int) -> None:
        if len(self._cache) >= self.cache_size:
            now = self.clock()
            for stale in [k for k, (_, until, _) in self._cache.items() if until <= now]:
                del self._cache[stale]
            while len(self._cache) >= self.cache_size:  # the oldest entries go first
                del self._cache[next(iter(self._cache))]
        self._cache[key] = (principal, expires, stamp)


def _refused(why: str, detail: str = "") -> Refusal:
    return Refusal("invalid_credentials", detail, audit=(("login_failure", why[:200]),))
