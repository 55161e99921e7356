"""CSRF tokens of the login pages' forms, and the pre-login attempt they belong to.

Before login nothing may be written to the database, so a login attempt lives in a cookie of
its own: ``GET /guard/login`` draws an attempt id (16 hex digits) and a random nonce, and sets
the cookie ``mlflow_guard_csrf_<attempt>`` (``__Host-`` prefixed and Secure over TLS; HttpOnly,
SameSite=Strict, Path=/, ``max_age``) holding the attempt id, the nonce and an optional payload,
signed with a timestamp (itsdangerous, key derived from the gateway's secret key). The form's
hidden ``csrf_token`` field carries ``<attempt>.<HMAC of attempt and nonce>``. A POST needs the
field and exactly that attempt's cookie (double submit, bound to the one attempt), within
``max_age``, and each nonce is accepted once. One cookie per attempt is what lets two tabs hold
two login forms at once; issuing a new attempt clears ours that are expired, forged, spent or
beyond the newest ``max_attempts``, so they never pile up.

OpenID Connect reuses the class with its own cookie name and ``same_site="Lax"`` (the provider's
redirect back is a cross-site navigation): ``issue(headers, {"nonce": ..., "verifier": ...})``
and ``Issued.field`` as ``state``; the callback's ``check(headers, state)`` returns the payload
once.

The seen-set of nonces is per process and bounded, each kept until it would have expired
anyway, so on several replicas a replayed pair could be used once more on each of the others
within ``max_age``; the pair is no secret a third party holds (the cookie is HttpOnly and
SameSite), so single use is defence in depth only.

After login the logout form's token is an HMAC of the session id (its own derived key): it
needs no state and dies with the session.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner

from guard.identity.sessions import HOST_PREFIX, derive_key, read_cookies

CSRF_COOKIE: Final = "mlflow_guard_csrf"
MAX_AGE: Final = 600
MAX_ATTEMPTS: Final = 8  # attempt cookies one browser keeps at a time, the newest
_ATTEMPT: Final = re.compile(r"[0-9a-f]{16}")
_FIELD: Final = re.compile(r"([0-9a-f]{16})\.([0-9a-f]{64})")
_MAX_COOKIE: Final = 3800  # a value the browser stores whole (4096 bytes with name and flags)
_MAX_FIELD: Final = 128
_MAX_CLEARS: Final = 32  # Set-Cookie headers one answer spends on clearing old attempts

Header = tuple[bytes, bytes]


@dataclass(frozen=True, slots=True)
class Issued:
    """A new attempt: the hidden field's value (OIDC: ``state``) and the Set-Cookie headers to
    send (the attempt's cookie, then the clearing of stale ones)."""

    field: str
    headers: tuple[Header, ...]


@dataclass(frozen=True, slots=True)
class _Record:
    attempt: str
    nonce: str
    payload: dict[str, str]
    issued_at: float  # the clock's reading, finer than the signature's timestamp (seconds)


class LoginCsrf:
    """Pre-login attempts: one signed, short-lived, single-use cookie each, with a payload."""

    def __init__(
        self,
        secret_key: bytes,
        *,
        secure: bool,
        name: str = CSRF_COOKIE,
        purpose: str = "login csrf",
        same_site: Literal["Strict", "Lax"] = "Strict",
        max_age: int = MAX_AGE,
        max_attempts: int = MAX_ATTEMPTS,
        max_seen: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.prefix = f"{HOST_PREFIX}{name}_" if secure else f"{name}_"
        self.secure = secure
        self.same_site = same_site
        self.max_age = max_age
        self.max_attempts = max_attempts
        self.max_seen = max_seen
        self.clock = clock
        self._names = re.compile(re.escape(self.prefix) + r"([0-9a-f]{16})")
        self._signer = _ClockSigner(derive_key(secret_key, f"{purpose} cookie"), salt="csrf")
        self._signer.clock = clock
        self._field_key = derive_key(secret_key, f"{purpose} field")
        self._seen: OrderedDict[str, float] = OrderedDict()

    def issue(
        self,
        headers: Iterable[Header],
        payload: Mapping[str, str] | None = None,
        *,
        spent: str = "",
    ) -> Issued:
        """A new attempt carrying ``payload``. The request's ``headers`` say which attempt
        cookies to clear besides: stale ones, the oldest beyond ``max_attempts``, and the one
        named by ``spent`` (the field this request used up)."""
        attempt, nonce = secrets.token_hex(8), secrets.token_urlsafe(24)
        body = json.dumps(
            {"a": attempt, "n": nonce, "t": self.clock(), "p": dict(payload or {})},
            separators=(",", ":"),
        )
        value = self._signer.sign(base64.urlsafe_b64encode(body.encode()).rstrip(b"=")).decode()
        if len(value) > _MAX_COOKIE:
            raise ValueError(f"the attempt's payload is too large ({len(value)} bytes signed)")
        spent_match = _FIELD.fullmatch(spent)
        spent_attempt = spent_match.group(1) if spent_match else None
        cookie = (b"set-cookie", self._attributes(self.prefix + attempt, value, self.max_age))
        clears = (self._clear_named(name) for name in self._stale(headers, spent_attempt))
        return Issued(f"{attempt}.{self._mac(attempt, nonce)}", (cookie, *clears))

    def check(self, headers: Iterable[Header], field: str) -> dict[str, str] | None:
        """The payload of the attempt ``field`` names, once, if its cookie came with the
        request (exactly once), was issued with this field less than ``max_age`` ago and was
        not used before; else None."""
        match = _FIELD.fullmatch(field) if len(field) <= _MAX_FIELD else None
        if match is None:
            return None
        attempt, mac = match.groups()
        values = read_cookies(headers).get(self.prefix + attempt, [])
        if len(values) != 1:
            return None
        record = self._load(values[0], attempt)
        if record is None or not hmac.compare_digest(self._mac(attempt, record.nonce), mac):
            return None
        return record.payload if self._first_use(record.nonce) else None

    def clear(self, field: str) -> Header | None:
        """The Set-Cookie header that removes the attempt ``field`` names (None if it names
        none)."""
        match = _FIELD.fullmatch(field) if len(field) <= _MAX_FIELD else None
        return None if match is None else self._clear_named(self.prefix + match.group(1))

    # -- internals ---------------------------------------------------------------------------

    def _mac(self, attempt: str, nonce: str) -> str:
        message = f"{attempt}.{nonce}".encode()
        return hmac.new(self._field_key, message, hashlib.sha256).hexdigest()

    def _load(self, value: str, attempt: str) -> _Record | None:
        """The signed record in a cookie value, if it is ours, fresh and for ``attempt``."""
        if len(value) > _MAX_COOKIE:
            return None
        try:
            raw = self._signer.unsign(value, max_age=self.max_age)
            data = json.loads(base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4)))
        except (SignatureExpired, BadSignature, binascii.Error, ValueError):
            return None
        if not isinstance(data, dict) or data.get("a") != attempt:
            return None
        nonce, payload, issued_at = data.get("n"), data.get("p"), data.get("t")
        if not isinstance(nonce, str) or not isinstance(payload, dict):
            return None
        if not isinstance(issued_at, int | float):
            return None
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in payload.items()):
            return None
        return _Record(attempt, nonce, payload, float(issued_at))

    def _stale(self, headers: Iterable[Header], spent: str | None) -> list[str]:
        """Our attempt cookies in the request to clear: expired, forged, sent twice, used, the
        spent one, and the oldest of the rest beyond ``max_attempts - 1`` (the new one makes
        ``max_attempts``). At most ``_MAX_CLEARS``; any left over go with the next page."""
        stale: list[str] = []
        live: list[tuple[float, str]] = []
        for name, values in read_cookies(headers).items():
            match = self._names.fullmatch(name)
            if match is None:
                continue
            attempt = match.group(1)
            record = self._load(values[0], attempt) if len(values) == 1 else None
            if record is None or attempt == spent or record.nonce in self._seen:
                stale.append(name)
            else:
                live.append((record.issued_at, name))
        live.sort()
        stale += [name for _, name in live[: max(0, len(live) - (self.max_attempts - 1))]]
        return stale[:_MAX_CLEARS]

    def _first_use(self, nonce: str) -> bool:
        now = self.clock()
        while self._seen:  # forget nonces whose cookie has expired: they fail the signature
            oldest, until = next(iter(self._seen.items()))
            if until > now and len(self._seen) < self.max_seen:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            return False
        self._seen[nonce] = now + self.max_age
        return True

    def _clear_named(self, name: str) -> Header:
        return (b"set-cookie", self._attributes(name, "", 0))

    def _attributes(self, name: str, value: str, max_age: int) -> bytes:
        parts = [f"{name}={value}", "Path=/", f"Max-Age={max_age}", "HttpOnly"]
        parts.append(f"SameSite={self.same_site}")
        if self.secure:
            parts.append("Secure")
        return "; ".join(parts).encode("ascii")


class _ClockSigner(TimestampSigner):
    clock: Callable[[], float] = time.time

    def get_timestamp(self) -> int:
        return int(self.clock())


class LogoutCsrf:
    """The logout form's token: an HMAC of the session id, so it needs no state."""

    def __init__(self, secret_key: bytes) -> None:
        self._key = derive_key(secret_key, "logout csrf")

    def token(self, session_id: str) -> str:
        return hmac.new(self._key, session_id.encode(), hashlib.sha256).hexdigest()

    def check(self, session_id: str, field: str) -> bool:
        if not field or len(field) > _MAX_FIELD:
            return False
        return hmac.compare_digest(self.token(session_id), field)
