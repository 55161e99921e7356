"""CSRF tokens of the login pages' forms.

Before login nothing may be written to the database, so the login form's token lives in a
cookie: ``GET /guard/login`` draws a random nonce and sets it, signed with a timestamp
(itsdangerous, key derived from the gateway's secret key), in a short-lived cookie
(``mlflow_guard_csrf``; ``__Host-`` prefixed and Secure over TLS; HttpOnly, SameSite=Strict,
Path=/), and puts an HMAC of the same nonce in the form's hidden ``csrf_token`` field. A POST
needs both (double submit, bound to that one attempt), within ``max_age``, and each nonce is
accepted once: a bounded in-memory set of the nonces seen, each kept until it would have
expired anyway. That set is per process, so on several replicas a replayed pair could be used
once more on each of the others within ``max_age``; the pair is no secret a third party holds
(the cookie is HttpOnly and SameSite=Strict), so single use is defence in depth only.

After login the logout form's token is an HMAC of the session id (its own derived key): it
needs no state and dies with the session.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Final

from itsdangerous import BadSignature, SignatureExpired, TimestampSigner

from guard.identity.sessions import HOST_PREFIX, derive_key, read_cookies

CSRF_COOKIE: Final = "mlflow_guard_csrf"
MAX_AGE: Final = 600
_MAX_COOKIE: Final = 200
_MAX_FIELD: Final = 128


class LoginCsrf:
    """Issue and check the login form's double-submit token."""

    def __init__(
        self,
        secret_key: bytes,
        *,
        secure: bool,
        max_age: int = MAX_AGE,
        max_seen: int = 100_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = f"{HOST_PREFIX}{CSRF_COOKIE}" if secure else CSRF_COOKIE
        self.secure = secure
        self.max_age = max_age
        self.max_seen = max_seen
        self.clock = clock
        self._signer = _ClockSigner(derive_key(secret_key, "login csrf cookie"), salt="csrf")
        self._signer.clock = clock
        self._field_key = derive_key(secret_key, "login csrf field")
        self._seen: OrderedDict[str, float] = OrderedDict()

    def _field(self, nonce: str) -> str:
        return hmac.new(self._field_key, nonce.encode(), hashlib.sha256).hexdigest()

    def issue(self) -> tuple[tuple[bytes, bytes], str]:
        """A fresh token: (its Set-Cookie header, the hidden field's value)."""
        nonce = secrets.token_urlsafe(24)
        signed = self._signer.sign(nonce).decode("ascii")
        return (b"set-cookie", self._attributes(signed, self.max_age)), self._field(nonce)

    def clear(self) -> tuple[bytes, bytes]:
        return (b"set-cookie", self._attributes("", 0))

    def check(self, headers: Iterable[tuple[bytes, bytes]], field: str) -> bool:
        """True once for a cookie and field issued together less than ``max_age`` ago."""
        values = read_cookies(headers).get(self.name, [])
        if len(values) != 1 or not field or len(field) > _MAX_FIELD:
            return False
        value = values[0]
        if len(value) > _MAX_COOKIE:
            return False
        try:
            nonce = self._signer.unsign(value, max_age=self.max_age).decode("ascii")
        except (SignatureExpired, BadSignature, UnicodeError):
            return False
        if not hmac.compare_digest(self._field(nonce), field):
            return False
        return self._first_use(nonce)

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

    def _attributes(self, value: str, max_age: int) -> bytes:
        parts = [f"{self.name}={value}", "Path=/", f"Max-Age={max_age}", "HttpOnly"]
        parts.append("SameSite=Strict")
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
