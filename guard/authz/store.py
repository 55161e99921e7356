"""Policies in the gateway database: read through casbin's adapter, written atomically.

Every change replaces rows and bumps ``guard_policy_state.version`` in one transaction, so a
replica that sees a new version sees the whole change; a change that would leave the set
malformed is refused before anything is written.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from guard.authz.casbin_adapter import default_policy_text, load_rows
from guard.authz.policy import PolicyError, PolicySet, Rule
from guard.authz.workspaces import problems as workspace_problems
from guard.store.db import casbin_rules, policy_state

Check = Callable[[PolicySet, PolicySet], list[str]]


class PolicyConflict(Exception):
    """Another change landed first; decide again on the newer policy."""

    def __init__(self, version: int) -> None:
        super().__init__(f"the policy moved on to version {version}")
        self.version = version


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class PolicyStore:
    def __init__(self, engine: Engine, *, workspaces: bool = False) -> None:
        self.engine = engine
        # upstream.workspaces: a change must leave every grant naming its workspace (or none).
        self.workspaces = workspaces

    def _problems(self, policy: PolicySet) -> list[str]:
        return [*policy.problems(), *workspace_problems(policy, self.workspaces)]

    def version(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(policy_state.c.version)).scalar() or 0)

    def load(self) -> tuple[int, PolicySet]:
        """The policy in force and its version; raises PolicyError if the stored set is bad."""
        for _ in range(5):
            before = self.version()
            rows = load_rows(self.engine)
            if self.version() == before:  # no change landed while reading
                return before, PolicySet.from_rows(rows)
        raise PolicyError(["the policy kept changing while it was read; try again"])

    def replace(self, policy: PolicySet, actor: str, check: Check | None = None) -> int:
        """Make ``policy`` the whole policy in force; returns the new version. ``check`` judges
        (current, new) under the write lock, so no concurrent change slips in between."""
        if problems := self._problems(policy):
            raise PolicyError(problems)
        with self.engine.begin() as conn:
            version = self._lock(conn)
            if check is not None:
                current = PolicySet.from_rows(_rows(conn), validate=False)
                if problems := check(current, policy):
                    raise PolicyError(problems)
            conn.execute(casbin_rules.delete())
            self._insert(conn, policy)
            return self._bump(conn, version, actor)

    def change(
        self,
        actor: str,
        add: Iterable[Rule] = (),
        remove: Iterable[Rule] = (),
        check: Check | None = None,
        expected_version: int | None = None,
    ) -> int:
        """Add and remove rules against the current policy, validated as a whole. ``check``
        judges (current, new) under the write lock; with ``expected_version`` the change is
        made only if no other change landed since that version (``PolicyConflict``)."""
        add, remove = list(add), list(remove)
        with self.engine.begin() as conn:
            version = self._lock(conn)
            if expected_version is not None and version != expected_version:
                raise PolicyConflict(version)
            current = PolicySet.from_rows(_rows(conn), validate=False)
            rules = (set(current.rules()) - set(remove)) | set(add)
            updated = PolicySet.from_rules(rules)
            if problems := self._problems(updated):
                raise PolicyError(problems)
            if check is not None and (problems := check(current, updated)):
                raise PolicyError(problems)
            if updated == current:
                return version
            conn.execute(casbin_rules.delete())
            self._insert(conn, updated)
            return self._bump(conn, version, actor)

    def seed_defaults(self, actor: str, extra: Iterable[Rule] = ()) -> bool:
        """Install the shipped default policy (plus ``extra``) if no policy was ever stored."""
        with self.engine.begin() as conn:
            if conn.execute(sa.select(policy_state.c.version)).first() is not None:
                return False
            version = self._lock(conn)
            policy = PolicySet.from_rules(
                [*PolicySet.from_csv(default_policy_text()).rules(), *extra]
            )
            self._insert(conn, policy)
            self._bump(conn, version, actor)
        return True

    @staticmethod
    def _lock(conn: Connection) -> int:
        """The current version, with the state row locked against concurrent writers."""
        query = sa.select(policy_state.c.version).where(policy_state.c.id == 1)
        if conn.dialect.name == "postgresql":
            query = query.with_for_update()
        else:  # SQLite: take the write lock now, not at the first write
            conn.execute(policy_state.update().where(sa.false()).values(version=0))
        version = conn.execute(query).scalar()
        if version is None:
            conn.execute(
                policy_state.insert().values(id=1, version=0, updated_at=_now(), updated_by="")
            )
            return 0
        return int(version)

    @staticmethod
    def _insert(conn: Connection, policy: PolicySet) -> None:
        values = []
        for row in policy.rows():
            entry: dict[str, str | None] = {"ptype": row[0]}
            for i in range(6):
                entry[f"v{i}"] = row[i + 1] if i + 1 < len(row) else None
            values.append(entry)
        if values:
            conn.execute(casbin_rules.insert(), values)

    @staticmethod
    def _bump(conn: Connection, version: int, actor: str) -> int:
        conn.execute(
            policy_state.update()
            .where(policy_state.c.id == 1)
            .values(version=version + 1, updated_at=_now(), updated_by=actor)
        )
        return version + 1


def _rows(conn: Connection) -> list[tuple[str, ...]]:
    result = []
    for row in conn.execute(sa.select(casbin_rules).order_by(casbin_rules.c.id)):
        values = [row.v0, row.v1, row.v2, row.v3, row.v4, row.v5]
        result.append((row.ptype, *[v for v in values if v is not None]))
    return result
