"""Gateway tokens: service tokens for CI jobs, and personal tokens people make for themselves.

A token is ``mlg_`` plus 32 random bytes (base64url). The database keeps only its
HMAC-SHA256 under the gateway's secret key: tokens carry 256 bits of entropy, so a slow password
hash would add cost per request and no safety, while the key keeps a stolen database useless.
The MLflow client sends a token as ``Authorization: Bearer`` (``MLFLOW_TRACKING_TOKEN``) or as
the Basic password with the token's name as user name (``MLFLOW_TRACKING_USERNAME/PASSWORD``).

A personal token (``owner`` set) acts as its owner, a person (``user:alice``), with the groups
of the owner's last login (``guard_identity.groups``; none for a person who never logged in) and
no grant of its own: its rights are the owner's, at most. Its name is ``<owner's name>/<label>``
(``alice/laptop``), so it never meets a service token's name (those have no ``/``) nor another
person's token; a Basic login with it must name the owner (``alice``), not the token.

The prefix is how a token is recognized everywhere: a secret without it is not a token, so the
provider answers "not mine" (a Basic password then goes to the directory, never to the token
store), and a token supplied from outside (``MLFLOW_GUARD_BOOTSTRAP_TOKEN``) must carry it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final

import anyio.to_thread
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from guard.errors import Refusal
from guard.identity.base import Credentials, DirectorySubject, Principal
from guard.identity.revocations import Counter, RevocableCache, bump
from guard.store.db import identities
from guard.store.db import tokens as tokens_table

logger = logging.getLogger("guard.tokens")

TOKEN_PREFIX: Final = "mlg_"  # noqa: S105 - a public marker, not a secret
BOOTSTRAP_NAME: Final = "admin"
NAME_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
LABEL_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")  # a personal token's own part
PERSONAL_ROLE: Final = "personal"  # the role column of a personal token: it grants nothing
MAX_NAME: Final = 64  # the name column's width (owner's name, "/", label)
OWNER_PREFIX: Final = "user:"
# A token: the prefix, then at least 32 characters (128 bits as hex; generated ones have 43).
_SECRET_PATTERN: Final = re.compile(r"mlg_[A-Za-z0-9._~+/=-]{32,252}")
SECRET_FORM: Final = "mlg_ followed by 32-252 characters of A-Z a-z 0-9 . _ ~ + / = -"  # noqa: S105
BOOTSTRAP_ENV: Final = "MLFLOW_GUARD_BOOTSTRAP_TOKEN"
LAST_USED_EVERY: Final = 60.0

Clock = Callable[[], dt.datetime]


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class TokenError(Exception):
    """A token command cannot be carried out; the message says why and what to do."""


class TokenExists(TokenError):
    """A live token already has this name."""


@dataclass(frozen=True, slots=True)
class TokenRecord:
    id: int
    name: str
    role: str
    created_at: dt.datetime
    expires_at: dt.datetime
    revoked_at: dt.datetime | None
    last_used_at: dt.datetime | None
    owner: str | None = None  # ``user:<name>`` for a personal token
    groups: tuple[str, ...] = ()  # a personal token: the groups of the owner's last login

    @property
    def label(self) -> str:
        """A personal token's own part of its name (``laptop`` of ``alice/laptop``)."""
        return self.name.rpartition("/")[2]

    def state(self, now: dt.datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        return "expired" if now >= self.expires_at else "active"


def validate_name(name: str) -> None:
    """Raise TokenError unless ``name`` can name a token (and be a Basic user name)."""
    if not NAME_PATTERN.fullmatch(name):
        raise TokenError(
            f"token name {name!r} is invalid (use 1-64 of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit)"
        )


def personal_name(owner: str, label: str) -> str:
    """The name of ``owner``'s personal token ``label``: ``alice/laptop``. Raises TokenError
    when the owner is not a person or the label or the whole name cannot be used."""
    owner_name = owner.removeprefix(OWNER_PREFIX)
    if not owner.startswith(OWNER_PREFIX) or not owner_name or "/" in owner_name:
        raise TokenError(f"{owner!r} is not a person (user:<name>): only people own tokens")
    if not LABEL_PATTERN.fullmatch(label):
        raise TokenError(
            f"token name {label!r} is invalid (use 1-64 of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit)"
        )
    name = f"{owner_name}/{label}"
    if len(name) > MAX_NAME:
        raise TokenError(
            f"token name {label!r} is too long for {owner_name!r} (the user name, '/' and "
            f"the token name together are at most {MAX_NAME} characters)"
        )
    return name


def new_secret() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def is_token(secret: str) -> bool:
    """Whether a presented secret is a gateway token's to judge (by its prefix, exactly)."""
    return secret.startswith(TOKEN_PREFIX)


def validate_secret(secret: str) -> str | None:
    """What is wrong with a supplied token secret, or None when it has a token's shape."""
    if not is_token(secret):
        return f"does not start with {TOKEN_PREFIX!r} (a gateway token is {SECRET_FORM})"
    if not _SECRET_PATTERN.fullmatch(secret):
        return f"is not a gateway token (expected {SECRET_FORM})"
    return None


def validate_bootstrap_token(environ: Mapping[str, str]) -> str | None:
    """The configuration problem with ``MLFLOW_GUARD_BOOTSTRAP_TOKEN``, if any. Unset or empty
    is fine: the first admin token is then generated. The value is never echoed."""
    value = environ.get(BOOTSTRAP_ENV)
    if not value or (problem := validate_secret(value)) is None:
        return None
    return (
        f"env {BOOTSTRAP_ENV}: {problem}; generate one with: "
        "python -c 'import secrets; print(\"mlg_\" + secrets.token_urlsafe(32))'"
    )


class TokenStore:
    """Token rows in the gateway database. Synchronous: call it from a thread in async code."""

    def __init__(self, engine: Engine, key: bytes, clock: Clock = utcnow) -> None:
        self.engine = engine
        self.key = key
        self.clock = clock

    def digest(self, secret: str) -> str:
        return hmac.new(self.key, secret.encode(), hashlib.sha256).hexdigest()

    def create(
        self, name: str, role: str, lifetime: float, secret: str | None = None
    ) -> tuple[TokenRecord, str]:
        """Create a service token; returns its record and the secret (shown once, never
        stored)."""
        validate_name(name)
        return self._insert(name, role, lifetime, secret, None)

    def create_personal(self, owner: str, label: str, lifetime: float) -> tuple[TokenRecord, str]:
        """Create ``owner``'s personal token ``label`` (named ``<owner's name>/<label>``);
        its record and its secret (shown once). Who may ask is the caller's question."""
        return self._insert(personal_name(owner, label), PERSONAL_ROLE, lifetime, None, owner)

    def _insert(
        self, name: str, role: str, lifetime: float, secret: str | None, owner: str | None
    ) -> tuple[TokenRecord, str]:
        if not re.fullmatch(r"[a-z][a-z0-9_-]{0,63}", role):
            raise TokenError(f"{role!r} is not a role name")
        if not lifetime > 0:
            raise TokenError("the expiry must be in the future (e.g. --expires 90d)")
        if secret is None:
            secret = new_secret()
        elif problem := validate_secret(secret):
            raise TokenError(f"the supplied token {problem}")
        now = self.clock()
        expires_at = now + dt.timedelta(seconds=lifetime)
        row = {"name": name, "role": role, "digest": self.digest(secret), "owner": owner}
        try:
            with self.engine.begin() as conn:
                insert = tokens_table.insert().values(**row, created_at=now, expires_at=expires_at)
                token_id = conn.execute(insert).inserted_primary_key
        except IntegrityError:
            raise TokenExists(
                f"a live token named {name!r} already exists (revoke it first or pick another name)"
            ) from None
        assert token_id is not None  # noqa: S101 - an insert always has a key
        record = TokenRecord(token_id[0], name, role, now, expires_at, None, None, owner)
        return record, secret

    def bootstrap(self, lifetime: float, secret: str | None) -> str | None:
        """Create the first admin token if no token was ever made; its secret, else None."""
        with self.engine.connect() as conn:
            if conn.execute(sa.select(sa.func.count()).select_from(tokens_table)).scalar():
                return None
        try:
            return self.create(BOOTSTRAP_NAME, "admin", lifetime, secret)[1]
        except TokenExists:
            return None  # another replica bootstrapped at the same moment

    def list(self, include_revoked: bool = False, owner: str | None = None) -> list[TokenRecord]:
        """Tokens, oldest first: every one, or only ``owner``'s personal tokens."""
        query = sa.select(tokens_table).order_by(tokens_table.c.created_at, tokens_table.c.id)
        if not include_revoked:
            query = query.where(tokens_table.c.revoked_at.is_(None))
        if owner is not None:
            query = query.where(tokens_table.c.owner == owner)
        with self.engine.connect() as conn:
            return [_record(row) for row in conn.execute(query)]

    def revoke(self, name: str, owner: str | None = None) -> TokenRecord:
        """Revoke the live token ``name`` (only if ``owner`` owns it, when given)."""
        now = self.clock()
        live = sa.and_(tokens_table.c.name == name, tokens_table.c.revoked_at.is_(None))
        if owner is not None:
            live = sa.and_(live, tokens_table.c.owner == owner)
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(tokens_table).where(live)).first()
            if row is None:
                raise TokenError(f"no live token named {name!r} (see: mlflow-guard token list)")
            conn.execute(
                tokens_table.update().where(tokens_table.c.id == row.id).values(revoked_at=now)
            )
            bump(conn)  # every replica drops its cached token rows at its next poll
        return _record(row)

    def lookup(self, secret: str) -> TokenRecord | None:
        """The token whose secret this is, revoked and expired ones included (a personal
        token with its owner's groups, read in the same query)."""
        digest = self.digest(secret)
        with self.engine.connect() as conn:
            row = conn.execute(_with_groups().where(tokens_table.c.digest == digest)).first()
        # The lookup is by an HMAC the caller cannot steer; compare anyway, in constant time.
        if row is None or not hmac.compare_digest(row.digest, digest):
            return None
        return _record(row)

    def by_id(self, token_id: int) -> TokenRecord | None:
        """The token with this id (a session that began with it asks whether it still holds)."""
        with self.engine.connect() as conn:
            row = conn.execute(_with_groups().where(tokens_table.c.id == token_id)).first()
        return None if row is None else _record(row)

    def touch(self, token_id: int, when: dt.datetime) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                tokens_table.update().where(tokens_table.c.id == token_id).values(last_used_at=when)
            )


def _with_groups() -> sa.Select[tuple[object, ...]]:
    """Token rows with the groups of their owner's last login (NULL for service tokens)."""
    return sa.select(tokens_table, identities.c.groups.label("owner_groups")).outerjoin(
        identities, identities.c.subject == tokens_table.c.owner
    )


def _record(row: sa.Row[tuple[object, ...]]) -> TokenRecord:
    m = row._mapping
    groups = m.get("owner_groups")
    return TokenRecord(
        m["id"],
        m["name"],
        m["role"],
        m["created_at"],
        m["expires_at"],
        m["revoked_at"],
        m["last_used_at"],
        m["owner"],
        _groups(groups) if m["owner"] is not None else (),
    )


def _groups(value: object) -> tuple[str, ...]:
    """The stored groups of a login: only source-qualified ones (``group:<source>/<name>``),
    so a stored value can never stand for a policy-defined group."""
    if not isinstance(value, str) or not value:
        return ()
    try:
        found = json.loads(value)
    except ValueError:
        return ()
    if not isinstance(found, list):
        return ()
    return tuple(
        sorted({g for g in found if isinstance(g, str) and g.startswith("group:") and "/" in g})
    )


def personal_principal(record: TokenRecord) -> Principal:
    """What a personal token acts as: its owner, with the groups of the owner's last login and
    no role of its own (``method`` is ``token``, ``identity`` the token's id)."""
    assert record.owner is not None  # noqa: S101 - only personal tokens come here
    groups = record.groups
    return Principal(
        subject=DirectorySubject(record.owner, groups) if groups else record.owner,
        name=record.owner.removeprefix(OWNER_PREFIX),
        method="token",
        roles=(),
        expires_at=record.expires_at,
        groups=groups,
        identity=f"token:{record.id}",
    )


class TokenProvider:
    """Authenticates Bearer tokens and Basic ``name:token`` pairs against the token store.

    A secret without the ``mlg_`` prefix is not a token: the answer is None ("not mine") and the
    store is not asked, so a directory password never reaches it. Token rows are cached for
    ``cache_ttl`` and only while the revocation counter has not moved (``revocations``).
    """

    name = "token"

    def __init__(
        self, store: TokenStore, cache_ttl: float, revocations: Counter | None = None
    ) -> None:
        self.store = store
        self.cache_ttl = cache_ttl
        # Unknown secrets are not cached: no memory to flood.
        self._cache: RevocableCache[str, TokenRecord | None] = RevocableCache(
            revocations or Counter(), cache_ttl, keep=lambda record: record is not None
        )
        self._touched: dict[int, float] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._failing = False  # the token store is unreachable: its traceback was logged once

    async def authenticate(self, credentials: Credentials) -> Principal | Refusal | None:
        secret = credentials.secret
        if not is_token(secret):
            return None
        if not _SECRET_PATTERN.fullmatch(secret):
            return Refusal("invalid_credentials")  # no token has this shape: no lookup
        try:
            record = await self._lookup(secret)
        except sa.exc.SQLAlchemyError as exc:
            # One line per request; the traceback once per outage, not once per request.
            logger.warning(
                "token lookup failed: database unavailable (%s)", type(exc).__name__,
                exc_info=not self._failing,
            )  # fmt: skip
            self._failing = True
            return Refusal("identity_unavailable", "The token store cannot be reached.")
        if record is None:
            return Refusal("invalid_credentials")
        # Basic names the token (a service token) or its owner (a personal token).
        expected = record.name if record.owner is None else record.owner.removeprefix(OWNER_PREFIX)
        if credentials.scheme == "basic" and not hmac.compare_digest(
            credentials.username.encode(), expected.encode()
        ):
            return Refusal("invalid_credentials")
        now = self.store.clock()
        if record.revoked_at is not None:
            return Refusal("token_revoked")
        if now >= record.expires_at:
            return Refusal("token_expired")
        self._note_use(record, now)
        if record.owner is not None:
            return personal_principal(record)
        return Principal(
            subject=f"token:{record.name}",
            name=record.name,
            method="token",
            roles=(record.role,),
            expires_at=record.expires_at,
            identity=f"token:{record.id}",
        )

    async def _lookup(self, secret: str) -> TokenRecord | None:
        async def load() -> TokenRecord | None:
            record = await anyio.to_thread.run_sync(self.store.lookup, secret)
            if self._failing:
                self._failing = False
                logger.warning("token store reachable again")
            return record

        return await self._cache.get(self.store.digest(secret), load)

    def _note_use(self, record: TokenRecord, now: dt.datetime) -> None:
        """Record last use at most once a minute per token, off the request path."""
        last = self._touched.get(record.id)
        if last is None and record.last_used_at is not None:
            last = record.last_used_at.timestamp()
        if last is not None and now.timestamp() - last < LAST_USED_EVERY:
            return
        self._touched[record.id] = now.timestamp()
        task = asyncio.ensure_future(self._touch(record.id, now))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _touch(self, token_id: int, now: dt.datetime) -> None:
        try:
            await anyio.to_thread.run_sync(self.store.touch, token_id, now)
        except sa.exc.SQLAlchemyError as exc:
            logger.warning(
                "could not record last use of token %d (%s)", token_id, type(exc).__name__
            )

    async def drain(self) -> None:
        """Wait for pending last-used writes (on shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
