"""What every identity provider shares: the credentials it is shown and the principal it returns."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from dataclasses import dataclass
from typing import Literal, Protocol

from guard.errors import Refusal


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller. ``subject`` is namespaced: ``token:ci``, ``user:alice``."""

    subject: str
    name: str
    method: str
    roles: tuple[str, ...]
    expires_at: dt.datetime | None = None
    groups: tuple[str, ...] = ()  # directory groups, source-qualified: ``group:ldap/risk%20team``
    # Where the identity came from, stable across renames: ``ldap:<entryUUID>``, ``token:<id>``.
    identity: str = ""


class DirectorySubject(str):
    """A subject string that also carries the source-qualified groups (``group:ldap/...``) its
    identity source asserted at login. It is the plain subject everywhere a string is expected;
    the policy index (``guard.authz.engine``) reads ``groups`` to apply those groups' grants and
    ``g`` memberships. Only names with a ``/`` after ``group:`` are honoured, so a directory
    group can never be a policy-defined group such as ``group:admins``."""

    groups: tuple[str, ...]

    def __new__(cls, subject: str, groups: tuple[str, ...] = ()) -> DirectorySubject:
        self = super().__new__(cls, subject)
        self.groups = groups
        return self


@dataclass(frozen=True, slots=True)
class Credentials:
    """A parsed ``Authorization`` header."""

    scheme: Literal["bearer", "basic"]
    secret: str  # the bearer token, or the Basic password
    username: str = ""  # Basic only
    client: str = ""  # the caller's address (guard.edge.context), for the login throttle
    # The address is past its limit of failures: answer from what is cached, never ask a
    # directory (a password spray from one address must not reach it).
    cached_only: bool = False


def parse_authorization(headers: list[tuple[bytes, bytes]]) -> Credentials | Refusal | None:
    """Parse the Authorization header; None when absent, a refusal when malformed or repeated."""
    values = [v for k, v in headers if k == b"authorization"]
    if not values:
        return None
    if len(values) > 1:
        return Refusal("malformed_credentials", "Send one Authorization header.")
    scheme, _, rest = values[0].decode("latin-1").strip().partition(" ")
    rest = rest.strip()
    if scheme.lower() == "bearer":
        if not rest or " " in rest:
            return Refusal("malformed_credentials", "Bearer needs exactly one token.")
        return Credentials("bearer", rest)
    if scheme.lower() == "basic":
        try:
            decoded = base64.b64decode(rest, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return Refusal("malformed_credentials", "Basic credentials are not valid base64.")
        username, sep, password = decoded.partition(":")
        if not sep:
            return Refusal("malformed_credentials", "Basic credentials need user:password.")
        return Credentials("basic", password, username)
    return Refusal("malformed_credentials", "Use Bearer or Basic.")


class IdentityProvider(Protocol):
    """One way of logging in. Returns a principal, a refusal, or None if the credentials are
    not its kind (so the next provider may look)."""

    name: str

    async def authenticate(self, credentials: Credentials) -> Principal | Refusal | None: ...
