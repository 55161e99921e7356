"""User names bound to identities: ``user:<name>`` belongs to the first identity that used it.

An identity is its source (``ldap``) and the stable id the source gives the person (the entry's
``entryUUID`` / ``objectGUID``; for OIDC, issuer and ``sub``). The first login of a name claims
it (one row of ``guard_identity``; the subject is the primary key, so of two first logins at once
one wins and the other is then compared with it). A later login of the name from another
identity is refused with ``identity_conflict`` until an administrator frees the name
(``mlflow-guard user unlink``) or binds it (``user link``): one source, or a re-created entry
with the same name, never takes over another's grants. Service tokens (``token:``) are not
bound. Bindings this process has confirmed are cached for ``ttl`` seconds, so a burst of logins
costs no database round trip; a change made elsewhere is seen once that entry expires.

A login also stores the person's source-qualified groups (``claim(..., groups=...)``, or
``record_groups``): personal tokens act with the groups of their owner's last login. Freeing or
re-binding a name revokes its personal tokens: they were made by the identity that held it.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from guard.identity.revocations import bump
from guard.store.db import identities
from guard.store.db import tokens as tokens_table

LAST_SEEN_EVERY: Final = dt.timedelta(minutes=1)  # last_seen is written at most this often


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class Binding:
    subject: str
    source: str
    stable_id: str
    created_at: dt.datetime
    last_seen_at: dt.datetime


class IdentityBindings:
    """The ``guard_identity`` table. Blocking (SQLAlchemy): call from worker threads."""

    def __init__(
        self,
        engine: Engine,
        *,
        ttl: float = 60.0,
        size: int = 10000,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], dt.datetime] = utcnow,
    ) -> None:
        self.engine = engine
        self.ttl = ttl
        self.size = size
        self.clock = clock
        self.now = now
        # subject -> (source, stable id, cached until, the groups stored as JSON)
        self._cache: OrderedDict[str, tuple[str, str, float, str | None]] = OrderedDict()
        self._lock = threading.Lock()
        self.queries = 0  # database round trips made by claim(), for tests

    def claim(
        self, subject: str, source: str, stable_id: str, groups: Iterable[str] | None = None
    ) -> Binding | None:
        """None when ``subject`` is (now) bound to this identity; else the other binding.
        With ``groups`` (the login's source-qualified groups) they are stored with the
        binding, for the personal tokens of ``subject``."""
        stored = None if groups is None else _groups_json(groups)
        with self._lock:
            cached = self._cache.get(subject)
            if (
                cached is not None
                and cached[:2] == (source, stable_id)
                and self.clock() < cached[2]
                and (stored is None or cached[3] == stored)
            ):
                return None
        self.queries += 1
        now = self.now()
        current = stored  # what the row holds once this claim is done
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(identities).where(identities.c.subject == subject)).first()
            if row is None:
                try:
                    with conn.begin_nested():
                        conn.execute(
                            identities.insert().values(
                                subject=subject, source=source, stable_id=stable_id,
                                created_at=now, last_seen_at=now, groups=stored,
                            )
                        )  # fmt: skip
                except sa.exc.IntegrityError:  # another login claimed it first
                    row = conn.execute(
                        sa.select(identities).where(identities.c.subject == subject)
                    ).first()
            if row is not None:
                if (row.source, row.stable_id) != (source, stable_id):
                    return Binding(
                        row.subject, row.source, row.stable_id, row.created_at, row.last_seen_at
                    )
                current = row.groups
                changes: dict[str, object] = {}
                if now - row.last_seen_at >= LAST_SEEN_EVERY:
                    changes["last_seen_at"] = now
                if stored is not None and row.groups != stored:
                    changes["groups"] = current = stored
                if changes:
                    where = identities.c.subject == subject
                    conn.execute(identities.update().where(where).values(**changes))
        if self.ttl > 0:
            with self._lock:
                self._cache[subject] = (source, stable_id, self.clock() + self.ttl, current)
                self._cache.move_to_end(subject)
                while len(self._cache) > self.size:
                    self._cache.popitem(last=False)
        return None

    def record_groups(self, subject: str, groups: Iterable[str]) -> bool:
        """Store the groups of ``subject``'s login (already bound: call after ``claim``);
        False when the name is bound to nobody."""
        stored = _groups_json(groups)
        with self.engine.begin() as conn:
            result = conn.execute(
                identities.update().where(identities.c.subject == subject).values(groups=stored)
            )
        self.forget(subject)
        return bool(result.rowcount)

    def groups(self, subject: str) -> tuple[str, ...]:
        """The groups stored by ``subject``'s last login (none when it never logged in)."""
        with self.engine.connect() as conn:
            value = conn.execute(
                sa.select(identities.c.groups).where(identities.c.subject == subject)
            ).scalar()
        return tuple(json.loads(value)) if isinstance(value, str) else ()

    def forget(self, subject: str) -> None:
        with self._lock:
            self._cache.pop(subject, None)

    # Administration (the CLI) ----------------------------------------------------------------

    def all(self) -> list[Binding]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(identities).order_by(identities.c.subject)).all()
        return [
            Binding(r.subject, r.source, r.stable_id, r.created_at, r.last_seen_at) for r in rows
        ]

    def get(self, subject: str) -> Binding | None:
        with self.engine.connect() as conn:
            r = conn.execute(sa.select(identities).where(identities.c.subject == subject)).first()
        return (
            None
            if r is None
            else Binding(r.subject, r.source, r.stable_id, r.created_at, r.last_seen_at)
        )

    def find(self, source: str, stable_id: str) -> Binding | None:
        """The name this identity claimed first (the oldest of its bindings), or None: an
        OpenID Connect account keeps that name when its claims are renamed."""
        with self.engine.connect() as conn:
            r = conn.execute(
                sa.select(identities)
                .where(identities.c.source == source, identities.c.stable_id == stable_id)
                .order_by(identities.c.created_at, identities.c.subject)
                .limit(1)
            ).first()
        return (
            None
            if r is None
            else Binding(r.subject, r.source, r.stable_id, r.created_at, r.last_seen_at)
        )

    def unlink(self, subject: str) -> bool:
        """Free the name (the next login claims it); False when it was not bound."""
        self.forget(subject)
        with self.engine.begin() as conn:
            deleted = conn.execute(identities.delete().where(identities.c.subject == subject))
            _revoke_personal_tokens(conn, subject, self.now())
        return deleted.rowcount > 0

    def link(self, subject: str, source: str, stable_id: str) -> Binding | None:
        """Bind the name to this identity, replacing any binding; returns the one replaced."""
        if not subject.startswith("user:") or not source or not stable_id:
            raise ValueError("link needs a user:<name> subject, a source and an id")
        self.forget(subject)
        previous = self.get(subject)
        now = self.now()
        with self.engine.begin() as conn:
            conn.execute(identities.delete().where(identities.c.subject == subject))
            conn.execute(
                identities.insert().values(
                    subject=subject, source=source, stable_id=stable_id,
                    created_at=now, last_seen_at=now,
                )
            )  # fmt: skip
            if previous is not None and (previous.source, previous.stable_id) != (
                source, stable_id
            ):  # fmt: skip
                _revoke_personal_tokens(conn, subject, now)
        return previous


def _groups_json(groups: Iterable[str]) -> str:
    return json.dumps(sorted(set(groups)))


def _revoke_personal_tokens(conn: sa.Connection, subject: str, now: dt.datetime) -> None:
    """The name changes hands: the tokens its former identity made stop acting as it."""
    conn.execute(
        tokens_table.update()
        .where(tokens_table.c.owner == subject, tokens_table.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    bump(conn)  # every replica drops its cached token rows at its next poll
