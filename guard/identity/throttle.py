"""Credential failures per user name, shared by every replica through the gateway's database.

A directory locks a person's corporate account after a few wrong passwords. The gateway must
never be the way someone gets there, so it stops asking the directory about a name once that
name has had ``limit`` credential failures in the last ``interval`` (the directory's own lockout
threshold is never reached through the gateway). Only credential failures count: a wrong
password or an unknown name, never a directory outage or a request without credentials.

Each failure is one row of ``guard_login_failure``; the name in it is an HMAC of the folded name
(never the name, never the password). Folding is generous (compatibility forms, case, accents,
invisible characters and spaces go), because a directory compares names loosely (``ALICE``,
`` alice`` and a fullwidth ``alice`` are one entry to slapd): names the directory may take for
one are always counted as one, and two names that merely look alike share a limit, which costs
nothing.

Race-free across replicas: an attempt first *reserves* its row (committed), then counts the rows
in the window; more than ``limit`` means the name is locked, and the reservation is withdrawn.
Since every attempt's row is committed before it counts, of attempts racing on several replicas
at most ``limit`` reach the directory. A failed attempt's row stays (it is the failure), a
successful or undecided one is withdrawn. A success does not erase earlier failures: not every
directory resets its own count on a successful bind, and they age out with the window anyway.

Cheap when healthy: the provider consults the throttle only for a real directory bind, never
for a login its cache answers. A lock this replica saw is remembered in memory until it ends,
so a locked name costs no database round trip here. Old rows are pruned in bounded batches.
Blocking database work runs in worker threads.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import re
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import anyio.to_thread
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from guard.store.db import login_failures

PRUNE_BATCH: Final = 500  # rows one prune deletes at most
MAX_CLIENT: Final = 64  # the column's size
_SPACES: Final = re.compile(r"\s+")
# Mapped to nothing by LDAP's string preparation (RFC 4518 2.2) or invisible anyway: format and
# control characters, combining marks (accents) and variation selectors.
_DROPPED: Final = frozenset({"Cf", "Cc", "Mn", "Me"})


def fold_name(name: str) -> str:
    """The name as the throttle counts it: compatibility forms and case folded, accents and
    invisible characters dropped, spaces removed."""
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", name).casefold())
    kept = "".join(c for c in text if unicodedata.category(c) not in _DROPPED)
    return _SPACES.sub("", unicodedata.normalize("NFKC", kept).casefold())


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class Reservation:
    """One attempt's row. ``wait`` > 0: the name is locked for that many seconds and nothing
    was reserved (``row_id`` 0)."""

    name_key: str
    row_id: int = 0
    wait: float = 0.0


@dataclass(frozen=True, slots=True)
class Lock:
    """A name that just became locked: what the ``login_locked`` audit event says."""

    name_key: str
    failures: int
    until: dt.datetime
    clients: tuple[str, ...]


class LoginThrottle:
    """``limit`` credential failures per folded user name per ``interval`` seconds, counted in
    the database. ``on_locked(name, lock)`` runs in the event loop when a failure locks a name."""

    def __init__(
        self,
        engine: Engine,
        key: bytes,
        *,
        limit: int,
        interval: float,
        now: Callable[[], dt.datetime] = utcnow,
        on_locked: Callable[[str, Lock], None] | None = None,
        cache_size: int = 10000,
    ) -> None:
        if limit < 1 or interval <= 0:
            raise ValueError("a login throttle needs limit >= 1 and interval > 0")
        self.engine = engine
        self.limit = limit
        self.interval = dt.timedelta(seconds=interval)
        self.now = now
        self.on_locked = on_locked
        self.cache_size = cache_size
        self._key = hmac.new(key, b"mlflow-guard login failures", hashlib.sha256).digest()
        self._locked: OrderedDict[str, dt.datetime] = OrderedDict()  # name key -> until
        self._lock = threading.Lock()
        self._next_prune = dt.datetime.min.replace(tzinfo=dt.UTC)
        self.queries = 0  # database statements run, for tests

    def name_key(self, name: str) -> str:
        """The HMAC a name is counted under (64 hex digits)."""
        return hmac.new(self._key, fold_name(name).encode("utf-8", "surrogatepass"),
                        hashlib.sha256).hexdigest()  # fmt: skip

    # What the provider calls (in the event loop) ------------------------------------------------

    async def reserve(self, name: str, client: str) -> Reservation:
        """Before a directory bind of ``name``: a reservation, or how long the name is locked.
        Raises SQLAlchemyError when the database cannot answer (the caller refuses: without
        the count, the directory's threshold is not guarded)."""
        name_key = self.name_key(name)
        if (wait := self._cached_wait(name_key)) > 0:
            return Reservation(name_key, wait=wait)
        return await anyio.to_thread.run_sync(self._reserve, name_key, client[:MAX_CLIENT])

    async def failed(self, reservation: Reservation, name: str) -> None:
        """The directory refused the credentials: the reservation stays, as the failure. If it
        locks the name, ``on_locked`` hears of it."""
        lock = await anyio.to_thread.run_sync(self._failed, reservation)
        if lock is not None and self.on_locked is not None:
            self.on_locked(name, lock)

    async def release(self, reservation: Reservation) -> None:
        """The attempt succeeded, or was not decided (the directory unreachable): no failure."""
        if reservation.row_id:
            await anyio.to_thread.run_sync(self._release, reservation)

    def seconds_locked(self, name: str) -> float:
        """Blocking: how long ``name`` stays locked (0: it is not)."""
        name_key = self.name_key(name)
        return self._cached_wait(name_key) or self._wait(self._recent(name_key), name_key)

    # Blocking side (worker threads) ------------------------------------------------------------

    def _reserve(self, name_key: str, client: str) -> Reservation:
        now = self.now()
        self.queries += 2
        with self.engine.begin() as conn:
            row_id = int(
                conn.execute(
                    sa.insert(login_failures)
                    .values(name_key=name_key, client=client, failed_at=now)
                    .returning(login_failures.c.id)
                ).scalar_one()
            )
        # Counted after the commit: an attempt racing on another replica sees this row, or this
        # count sees its row (whichever commits later), so at most ``limit`` pass.
        others = [row for row in self._recent(name_key) if row.id != row_id]
        if len(others) >= self.limit:
            self._delete(row_id)
            return Reservation(name_key, wait=self._wait(others, name_key))
        self._prune(now)
        return Reservation(name_key, row_id)

    def _failed(self, reservation: Reservation) -> Lock | None:
        rows = self._recent(reservation.name_key)
        if len(rows) < self.limit:
            return None
        until = rows[self.limit - 1].failed_at + self.interval
        if not self._remember(reservation.name_key, until):
            return None  # already known locked here: one event per lock
        clients = tuple(dict.fromkeys(row.client for row in rows))
        return Lock(reservation.name_key, len(rows), until, clients)

    def _release(self, reservation: Reservation) -> None:
        self._delete(reservation.row_id)

    def _recent(self, name_key: str) -> list[Any]:
        """The name's newest failures in the window, at most ``limit + 1``, newest first."""
        self.queries += 1
        since = self.now() - self.interval
        query = (
            sa.select(login_failures.c.id, login_failures.c.client, login_failures.c.failed_at)
            .where(login_failures.c.name_key == name_key, login_failures.c.failed_at > since)
            .order_by(login_failures.c.failed_at.desc(), login_failures.c.id.desc())
            .limit(self.limit + 1)
        )
        with self.engine.connect() as conn:
            return list(conn.execute(query).all())

    def _wait(self, rows: list[Any], name_key: str) -> float:
        """Seconds until fewer than ``limit`` of ``rows`` are in the window (remembered)."""
        if len(rows) < self.limit:
            return 0.0
        until: dt.datetime = rows[self.limit - 1].failed_at + self.interval
        self._remember(name_key, until)
        return max(0.0, (until - self.now()).total_seconds())

    def _delete(self, row_id: int) -> None:
        self.queries += 1
        with self.engine.begin() as conn:
            conn.execute(sa.delete(login_failures).where(login_failures.c.id == row_id))

    def _prune(self, now: dt.datetime) -> None:
        """Delete rows out of every window, at most PRUNE_BATCH at a time; due again at once
        after a full batch, else after an interval."""
        with self._lock:
            if now < self._next_prune:
                return
            self._next_prune = now + self.interval
        old = (
            sa.select(login_failures.c.id)
            .where(login_failures.c.failed_at <= now - self.interval)
            .limit(PRUNE_BATCH)
        )
        self.queries += 1
        with self.engine.begin() as conn:
            deleted = conn.execute(
                sa.delete(login_failures).where(login_failures.c.id.in_(old.scalar_subquery()))
            ).rowcount
        if deleted >= PRUNE_BATCH:
            with self._lock:
                self._next_prune = now

    # The in-memory locks -----------------------------------------------------------------------

    def _cached_wait(self, name_key: str) -> float:
        with self._lock:
            until = self._locked.get(name_key)
            if until is None:
                return 0.0
            wait = (until - self.now()).total_seconds()
            if wait <= 0:
                del self._locked[name_key]
                return 0.0
            return wait

    def _remember(self, name_key: str, until: dt.datetime) -> bool:
        """Remember a lock until ``until``; False if it was already known."""
        with self._lock:
            known = self._locked.get(name_key)
            if known is not None and known >= until and known > self.now():
                return False
            self._locked[name_key] = until
            self._locked.move_to_end(name_key)
            while len(self._locked) > self.cache_size:
                self._locked.popitem(last=False)
            return True
