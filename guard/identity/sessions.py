"""Browser sessions: one row per login in ``guard_session``, and a cookie holding only its id.

The id is 32 random bytes, new at every login (no fixation). The cookie carries it signed
(itsdangerous, with a key derived from the gateway's secret key), so a forged or truncated value
is refused without a database round trip; the table holds only an HMAC of the id (``key``), so
reading the table never lets anyone present a session. A session ends when it is idle for
``idle_timeout``, at ``expires_at`` (``absolute_timeout`` after login), or when it is revoked:
by logout, by an administrator (``mlflow-guard session revoke``, ``/guard/api/sessions``), or by
``mlflow-guard user block``. Because the row is the truth, ending a session ends it on every
replica at once. ``last_seen_at`` is written at most once a minute per session.

Blocking (SQLAlchemy): call the store from worker threads.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from itsdangerous import BadSignature, Signer
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError

from guard.identity.base import DirectorySubject, Principal
from guard.identity.revocations import bump
from guard.store.db import sessions as sessions_table
from guard.store.db import tokens as tokens_table
from guard.store.db import user_blocks

TOUCH_INTERVAL: Final = dt.timedelta(minutes=1)
PRUNE_BATCH: Final = 1000  # rows one prune deletes at most: bounded work, a short transaction
_ID_BYTES: Final = 32
_MAX_COOKIE: Final = 256  # a signed id is ~70 characters; anything much longer is not ours
HOST_PREFIX: Final = "__Host-"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def derive_key(secret_key: bytes, purpose: str) -> bytes:
    """A key for one purpose (cookie signing, row keys, CSRF), derived from the gateway's key
    so that one never stands in for another."""
    return hmac.new(secret_key, f"mlflow-guard {purpose}".encode(), hashlib.sha256).digest()


@dataclass(frozen=True, slots=True)
class Session:
    key: str  # HMAC of the id; the id itself is only in the cookie
    subject: str
    name: str
    method: str  # how the person logged in: ldap, token, oidc
    identity: str  # ldap:<entryUUID>, token:<id>, oidc:<issuer>#<sub>
    groups: tuple[str, ...]
    roles: tuple[str, ...]
    client: str
    created_at: dt.datetime
    last_seen_at: dt.datetime
    expires_at: dt.datetime
    groups_checked_at: dt.datetime
    revoked_at: dt.datetime | None = None
    revoked_by: str | None = None
    issuer: str | None = None
    oidc_sub: str | None = None
    oidc_sid: str | None = None

    def idle_expires_at(self, idle_timeout: float) -> dt.datetime:
        return self.last_seen_at + dt.timedelta(seconds=idle_timeout)

    def state(self, now: dt.datetime, idle_timeout: float) -> str:
        """``active``, ``revoked``, ``expired`` (absolute) or ``idle``."""
        if self.revoked_at is not None:
            return "revoked"
        if now >= self.expires_at:
            return "expired"
        if now >= self.idle_expires_at(idle_timeout):
            return "idle"
        return "active"

    def principal(self) -> Principal:
        """The caller this session stands for, with the groups it last read."""
        subject = DirectorySubject(self.subject, self.groups) if self.groups else self.subject
        return Principal(
            subject=subject,
            name=self.name,
            method=f"session:{self.method}",
            roles=self.roles,
            groups=self.groups,
            identity=self.identity,
        )


class SessionStore:
    """The ``guard_session`` table, and the ``guard_user_block`` table sessions obey."""

    def __init__(
        self,
        engine: Engine,
        secret_key: bytes,
        *,
        idle_timeout: float,
        absolute_timeout: float,
        clock: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self._row_key = derive_key(secret_key, "session row")
        self.idle_timeout = idle_timeout
        self.absolute_timeout = absolute_timeout
        self.clock = clock

    def row_key(self, session_id: str) -> str:
        return hmac.new(self._row_key, session_id.encode(), hashlib.sha256).hexdigest()

    def create(
        self,
        principal: Principal,
        *,
        client: str,
        issuer: str | None = None,
        oidc_sub: str | None = None,
        oidc_sid: str | None = None,
        provider_tokens: str | None = None,
    ) -> tuple[str, Session]:
        """A new session for ``principal``: its id (for the cookie only) and its row.
        ``provider_tokens`` (OpenID Connect) is stored as given: encrypt it first."""
        session_id = secrets.token_urlsafe(_ID_BYTES)
        now = self.clock()
        method = principal.method.removeprefix("session:")
        session = Session(
            key=self.row_key(session_id),
            subject=str(principal.subject),
            name=principal.name,
            method=method,
            identity=principal.identity,
            groups=tuple(principal.groups),
            roles=tuple(principal.roles),
            client=client[:64],
            created_at=now,
            last_seen_at=now,
            expires_at=now + dt.timedelta(seconds=self.absolute_timeout),
            groups_checked_at=now,
            issuer=issuer,
            oidc_sub=oidc_sub,
            oidc_sid=oidc_sid,
        )
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(sessions_table).values(
                    **_columns(session), provider_tokens=provider_tokens
                )
            )
        return session_id, session

    def get(self, session_id: str) -> Session | None:
        """The active session with this id, or None (unknown, revoked, expired, idle, or its
        subject is blocked). Writes ``last_seen_at`` when it is a minute old."""
        key = self.row_key(session_id)
        now = self.clock()
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(sessions_table, user_blocks.c.subject.label("blocked"))
                .outerjoin(user_blocks, user_blocks.c.subject == sessions_table.c.subject)
                .where(sessions_table.c.key == key)
            ).first()
        if row is None or row.blocked is not None:
            return None
        session = _session(row)
        if session.state(now, self.idle_timeout) != "active":
            return None
        if now - session.last_seen_at >= TOUCH_INTERVAL:
            with self.engine.begin() as conn:
                conn.execute(
                    sa.update(sessions_table)
                    .where(sessions_table.c.key == key, sessions_table.c.revoked_at.is_(None))
                    .values(last_seen_at=now)
                )
            session = dataclasses.replace(session, last_seen_at=now)
        return session

    def revoke(self, session_id: str, by: str) -> Session | None:
        """End the session with this id (logout); the session as it was, or None."""
        return self.revoke_key(self.row_key(session_id), by)

    def revoke_key(self, key: str, by: str) -> Session | None:
        """End one session by its row key (what ``list`` shows); None if there is none active."""
        now = self.clock()
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(sessions_table).where(sessions_table.c.key == key)).first()
            if row is None or row.revoked_at is not None:
                return None
            conn.execute(
                sa.update(sessions_table)
                .where(sessions_table.c.key == key, sessions_table.c.revoked_at.is_(None))
                .values(revoked_at=now, revoked_by=by[:256])
            )
            bump(conn)
        return dataclasses.replace(_session(row), revoked_at=now, revoked_by=by[:256])

    def take_provider_tokens(self, key: str) -> str | None:
        """The identity provider's tokens stored with the session (encrypted), removed from the
        row as they are read: a logout uses them once."""
        with self.engine.begin() as conn:
            value = conn.execute(
                sa.select(sessions_table.c.provider_tokens).where(sessions_table.c.key == key)
            ).scalar()
            if value is not None:
                conn.execute(
                    sa.update(sessions_table)
                    .where(sessions_table.c.key == key)
                    .values(provider_tokens=None)
                )
        return None if value is None else str(value)

    def revoke_provider_session(
        self, issuer: str, *, sid: str | None, sub: str | None, by: str
    ) -> list[Session]:
        """End the active sessions an OpenID Connect provider's logout names: those of
        ``issuer`` with that ``sid`` (and ``sub`` when both are given), else every one of
        ``sub``; the sessions as they were. Their provider tokens go with them."""
        if sid is None and sub is None:
            return []
        now = self.clock()
        where = [
            sessions_table.c.issuer == issuer,
            sessions_table.c.revoked_at.is_(None),
            sessions_table.c.expires_at > now,
        ]
        if sid is not None:
            where.append(sessions_table.c.oidc_sid == sid)
        if sub is not None:
            where.append(sessions_table.c.oidc_sub == sub)
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(sessions_table).where(*where)).all()
            if not rows:
                return []
            keys = [row.key for row in rows]
            conn.execute(
                sa.update(sessions_table)
                .where(sessions_table.c.key.in_(keys), sessions_table.c.revoked_at.is_(None))
                .values(revoked_at=now, revoked_by=by[:256], provider_tokens=None)
            )
            bump(conn)
        return [dataclasses.replace(_session(r), revoked_at=now, revoked_by=by[:256]) for r in rows]

    def revoke_subject(self, subject: str, by: str) -> int:
        """End every session of ``subject``; how many were still active."""
        now = self.clock()
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.update(sessions_table)
                .where(
                    sessions_table.c.subject == subject,
                    sessions_table.c.revoked_at.is_(None),
                    sessions_table.c.expires_at > now,
                )
                .values(revoked_at=now, revoked_by=by[:256])
            )
            if result.rowcount:
                bump(conn)
        return int(result.rowcount or 0)

    def list(self, subject: str | None = None, include_ended: bool = False) -> list[Session]:
        """Sessions, newest first: active ones, or all kept rows with ``include_ended``."""
        query = sa.select(sessions_table).order_by(sessions_table.c.created_at.desc())
        if subject is not None:
            query = query.where(sessions_table.c.subject == subject)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        now = self.clock()
        found = [_session(row) for row in rows]
        if include_ended:
            return found
        return [s for s in found if s.state(now, self.idle_timeout) == "active"]

    def set_groups(self, key: str, groups: Iterable[str]) -> None:
        """Store the groups a refresh read, and when."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(sessions_table)
                .where(sessions_table.c.key == key)
                .values(groups=json.dumps(sorted(groups)), groups_checked_at=self.clock())
            )

    def prune(self, keep: dt.timedelta = dt.timedelta(days=7), limit: int = PRUNE_BATCH) -> int:
        """Delete at most ``limit`` sessions that ended more than ``keep`` ago; how many. The
        rows are kept a while so ``session list --all`` shows recent logouts and revocations."""
        cutoff = self.clock() - keep
        idle_cutoff = cutoff - dt.timedelta(seconds=self.idle_timeout)
        ended = (
            sa.select(sessions_table.c.key)
            .where(
                sa.or_(
                    sessions_table.c.expires_at < cutoff,
                    sessions_table.c.revoked_at < cutoff,
                    sessions_table.c.last_seen_at < idle_cutoff,
                )
            )
            .limit(limit)
        )
        with self.engine.begin() as conn:
            keys = conn.execute(ended).scalars().all()
            if not keys:
                return 0
            result = conn.execute(sa.delete(sessions_table).where(sessions_table.c.key.in_(keys)))
        return int(result.rowcount or 0)


class UserBlocks:
    """``mlflow-guard user block|unblock``: a blocked subject's sessions end at once, its
    personal tokens are revoked (for good: an unblock does not bring them back, as it does not
    bring back sessions), and it cannot log in anywhere until unblocked."""

    def __init__(self, engine: Engine, clock: Callable[[], dt.datetime] = utcnow) -> None:
        self.engine = engine
        self.clock = clock

    def block(self, subject: str, by: str, reason: str = "") -> bool:
        """Block ``subject``, end its sessions and revoke its personal tokens; False if it was
        already blocked."""
        now = self.clock()
        try:
            with self.engine.begin() as conn:
                exists = conn.execute(
                    sa.select(user_blocks.c.subject).where(user_blocks.c.subject == subject)
                ).first()
                if exists is None:
                    conn.execute(
                        sa.insert(user_blocks).values(
                            subject=subject, blocked_at=now, blocked_by=by[:256],
                            reason=reason[:512],
                        )
                    )  # fmt: skip
                self._end_sessions(conn, subject, by, now)
        except IntegrityError:  # blocked at the same moment elsewhere: its sessions still end
            with self.engine.begin() as conn:
                self._end_sessions(conn, subject, by, now)
            return False
        return exists is None

    @staticmethod
    def _end_sessions(conn: sa.Connection, subject: str, by: str, now: dt.datetime) -> None:
        conn.execute(
            sa.update(sessions_table)
            .where(sessions_table.c.subject == subject, sessions_table.c.revoked_at.is_(None))
            .values(revoked_at=now, revoked_by=by[:256])
        )
        conn.execute(
            sa.update(tokens_table)
            .where(tokens_table.c.owner == subject, tokens_table.c.revoked_at.is_(None))
            .values(revoked_at=now)
        )
        bump(conn)  # cached logins and token rows are dropped, the block list re-read

    def unblock(self, subject: str) -> bool:
        with self.engine.begin() as conn:
            result = conn.execute(sa.delete(user_blocks).where(user_blocks.c.subject == subject))
        return bool(result.rowcount)

    def blocked(self) -> dict[str, tuple[dt.datetime, str, str]]:
        """Every blocked subject: when, by whom, why."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(user_blocks).order_by(user_blocks.c.subject)).all()
        return {r.subject: (r.blocked_at, r.blocked_by, r.reason) for r in rows}

    def subjects(self) -> frozenset[str]:
        """Every blocked subject (what each replica keeps in memory, refreshed by a poll)."""
        with self.engine.connect() as conn:
            return frozenset(conn.execute(sa.select(user_blocks.c.subject)).scalars())

    def is_blocked(self, subject: str) -> bool:
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(user_blocks.c.subject).where(user_blocks.c.subject == subject)
            ).first()
        return row is not None


class SessionCookie:
    """The session cookie: its name, flags, and the signed id it carries.

    Over TLS (``gateway.public_url`` is https) the cookie is ``Secure`` and named with the
    ``__Host-`` prefix (no Domain, Path=/: a sibling subdomain cannot plant one), and only that
    name is read, so a cookie set over plain HTTP by a man in the middle is ignored."""

    def __init__(self, secret_key: bytes, *, name: str, secure: bool, max_age: int) -> None:
        self.name = f"{HOST_PREFIX}{name}" if secure else name
        self.secure = secure
        self.max_age = max_age
        self._signer = Signer(
            derive_key(secret_key, "session cookie"), salt="session", digest_method=hashlib.sha256
        )

    def encode(self, session_id: str) -> str:
        return self._signer.sign(session_id).decode("ascii")

    def decode(self, value: str) -> str | None:
        if not value or len(value) > _MAX_COOKIE:
            return None
        try:
            return self._signer.unsign(value).decode("ascii")
        except (BadSignature, UnicodeError):
            return None

    def read(self, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """The session id from the request's cookies, if one is there and signed by us. Several
        cookies of our name (a planted duplicate) count as none."""
        values = read_cookies(headers).get(self.name, [])
        if len(values) != 1:
            return None
        return self.decode(values[0])

    def present(self, headers: Iterable[tuple[bytes, bytes]]) -> bool:
        """Whether the request carries our cookie at all (valid or not)."""
        return self.name in read_cookies(headers)

    def set(self, session_id: str) -> tuple[bytes, bytes]:
        return (b"set-cookie", self._attributes(self.encode(session_id), self.max_age))

    def clear(self) -> tuple[bytes, bytes]:
        return (b"set-cookie", self._attributes("", 0))

    def _attributes(self, value: str, max_age: int) -> bytes:
        parts = [f"{self.name}={value}", "Path=/", f"Max-Age={max_age}", "HttpOnly"]
        parts.append("SameSite=Lax")
        if self.secure:
            parts.append("Secure")
        return "; ".join(parts).encode("ascii")


def read_cookies(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, list[str]]:
    """Every cookie of the request, by name (a name sent twice keeps both values). Malformed
    pairs are skipped, not fatal: the browser may hold other sites' odd cookies for this host."""
    found: dict[str, list[str]] = {}
    for key, value in headers:
        if key != b"cookie":
            continue
        for pair in value.decode("latin-1").split(";"):
            name, sep, content = pair.strip().partition("=")
            if not sep or not name:
                continue
            found.setdefault(name, []).append(_unquote(content.strip()))
    return found


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def _columns(session: Session) -> dict[str, object]:
    return {
        "key": session.key,
        "subject": session.subject,
        "name": session.name[:256],
        "method": session.method[:16],
        "identity": session.identity[:640],
        "groups": json.dumps(list(session.groups)),
        "roles": json.dumps(list(session.roles)),
        "issuer": session.issuer,
        "oidc_sub": session.oidc_sub,
        "oidc_sid": session.oidc_sid,
        "client": session.client,
        "created_at": session.created_at,
        "last_seen_at": session.last_seen_at,
        "expires_at": session.expires_at,
        "groups_checked_at": session.groups_checked_at,
        "revoked_at": session.revoked_at,
        "revoked_by": session.revoked_by,
    }


def _session(row: sa.Row[tuple[object, ...]]) -> Session:
    m = row._mapping
    return Session(
        key=str(m["key"]),
        subject=str(m["subject"]),
        name=str(m["name"]),
        method=str(m["method"]),
        identity=str(m["identity"]),
        groups=tuple(json.loads(str(m["groups"]))),
        roles=tuple(json.loads(str(m["roles"]))),
        client=str(m["client"]),
        created_at=m["created_at"],
        last_seen_at=m["last_seen_at"],
        expires_at=m["expires_at"],
        groups_checked_at=m["groups_checked_at"],
        revoked_at=m["revoked_at"],
        revoked_by=m["revoked_by"],
        issuer=m["issuer"],
        oidc_sub=m["oidc_sub"],
        oidc_sid=m["oidc_sid"],
    )
