"""Policies as data: grants, group memberships and role definitions, and their CSV form.

The CSV is casbin's: ``p, SUBJECT, ROLE, RESOURCE, allow|deny`` grants, ``g, MEMBER, GROUP``
memberships, ``g2, ROLE, ACTION-or-ROLE`` role definitions. Teams keep it in git
(``policies/``); the gateway database holds the copy in force. A policy set is validated as a
whole and every problem is reported at once, so a malformed import changes nothing.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from guard.patterns import resource_kind, split_workspace

ACTIONS: Final = ("read", "create", "update", "delete", "manage", "promote")
SUBJECT_KINDS: Final = ("user", "group", "token", "client")
RESOURCE_KINDS: Final = ("experiment", "model", "skill", "server", "guard")
# casbin's role manager follows at most 9 links (its max_hierarchy_level of 10 counts the start);
# the index follows the same number, so both answer alike even for absurdly deep nesting.
MAX_LINKS: Final = 9

_SUBJECT: Final = re.compile(r"(user|group|token|client):[^\s,\"']+")
_ROLE: Final = re.compile(r"[a-z][a-z0-9_-]{0,63}")
# Names may hold inner spaces ("experiment:My Experiment"); commas and quotes would break
# casbin's row format, and leading or trailing blanks are lost by it.
_RESOURCE: Final = re.compile(r"[^\s,\"'](?:[^,\"'\r\n\t]*[^\s,\"'])?")

Effect = Literal["allow", "deny"]


class PolicyError(ValueError):
    """A policy set is malformed; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass(frozen=True, order=True, slots=True)
class Grant:
    subject: str
    role: str
    resource: str
    effect: Effect = "allow"

    def row(self) -> tuple[str, ...]:
        return ("p", self.subject, self.role, self.resource, self.effect)


@dataclass(frozen=True, order=True, slots=True)
class Membership:
    member: str
    group: str

    def row(self) -> tuple[str, ...]:
        return ("g", self.member, self.group)


@dataclass(frozen=True, order=True, slots=True)
class RoleRule:
    role: str
    holds: str  # an action, or another role

    def row(self) -> tuple[str, ...]:
        return ("g2", self.role, self.holds)


Rule = Grant | Membership | RoleRule


@dataclass(frozen=True)
class PolicySet:
    grants: frozenset[Grant] = frozenset()
    memberships: frozenset[Membership] = frozenset()
    roles: frozenset[RoleRule] = frozenset()

    @classmethod
    def from_rules(cls, rules: Iterable[Rule]) -> PolicySet:
        items = list(rules)
        return cls(
            frozenset(r for r in items if isinstance(r, Grant)),
            frozenset(r for r in items if isinstance(r, Membership)),
            frozenset(r for r in items if isinstance(r, RoleRule)),
        )

    @classmethod
    def from_rows(cls, rows: Iterable[Sequence[str]], *, validate: bool = True) -> PolicySet:
        """Build from casbin-style rows; raises PolicyError naming every bad row."""
        rules: list[Rule] = []
        problems: list[str] = []
        for number, row in enumerate(rows, 1):
            try:
                rules.append(parse_row(row))
            except ValueError as exc:
                problems.append(f"row {number} ({', '.join(row)}): {exc}")
        if problems:
            raise PolicyError(problems)
        policy = cls.from_rules(rules)
        if validate and (problems := policy.problems()):
            raise PolicyError(problems)
        return policy

    @classmethod
    def from_csv(cls, text: str) -> PolicySet:
        rows = [
            [cell.strip() for cell in row]
            for row in csv.reader(io.StringIO(text), skipinitialspace=True)
            if row and row[0].strip() and not row[0].lstrip().startswith("#")
        ]
        return cls.from_rows(rows)

    def rules(self) -> list[Rule]:
        return [*sorted(self.roles), *sorted(self.memberships), *sorted(self.grants)]

    def rows(self) -> list[tuple[str, ...]]:
        return [rule.row() for rule in self.rules()]

    def to_csv(self) -> str:
        return "".join(", ".join(row) + "\n" for row in self.rows())

    def role_names(self) -> set[str]:
        return {r.role for r in self.roles}

    def problems(self) -> list[str]:
        """Everything wrong with the set as a whole (unknown roles, cycles, shadowed names)."""
        problems = []
        for rule in self.rules():  # rules made in code (a creator's grant) meet the CSV grammar
            try:
                parse_row(rule.row())
            except ValueError as exc:
                problems.append(f"{', '.join(rule.row())}: {exc}")
        roles = self.role_names()
        for rule in sorted(self.roles):
            if rule.role in ACTIONS:
                problems.append(f"role {rule.role!r}: a role may not be named like an action")
            if rule.holds not in ACTIONS and rule.holds not in roles:
                problems.append(
                    f"role {rule.role!r} holds {rule.holds!r}, which is neither an action "
                    f"({', '.join(ACTIONS)}) nor a defined role"
                )
        for role in sorted(roles):
            if _reaches(role, role, {r.role: [] for r in self.roles} | _edges(self.roles)):
                problems.append(f"role {role!r} contains itself (a cycle of g2 rows)")
        for grant in sorted(self.grants):
            if grant.role not in roles:
                problems.append(
                    f"grant {', '.join(grant.row()[1:])}: role {grant.role!r} is not defined"
                )
        groups = _edges_members(self.memberships)
        for group in sorted({m.group for m in self.memberships}):
            if _reaches(group, group, groups):
                problems.append(f"group {group!r} contains itself (a cycle of g rows)")
        return problems

    def diff(self, other: PolicySet) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
        """Rows to add and to remove to turn ``self`` into ``other``."""
        mine, theirs = set(self.rows()), set(other.rows())
        return sorted(theirs - mine), sorted(mine - theirs)


def parse_lines(lines: Iterable[str]) -> list[Rule]:
    """Rules from CSV lines such as ``p, user:alice, viewer, *``; no whole-set validation."""
    rules = []
    for line in lines:
        for row in csv.reader([line], skipinitialspace=True):
            if row:
                rules.append(parse_row([cell.strip() for cell in row]))
    return rules


def parse_row(row: Sequence[str]) -> Rule:
    """One casbin-style row as a rule; ValueError says what is wrong."""
    kind, *values = row
    if kind == "p":
        if len(values) == 3:
            values = [*values, "allow"]
        if len(values) != 4:
            raise ValueError("a grant is p, SUBJECT, ROLE, RESOURCE[, allow|deny]")
        subject, role, resource, effect = values
        _check_subject(subject)
        if not _ROLE.fullmatch(role):
            raise ValueError(f"{role!r} is not a role name")
        _check_resource(resource)
        if effect not in ("allow", "deny"):
            raise ValueError(f"effect {effect!r} must be allow or deny")
        return Grant(subject, role, resource, effect)  # type: ignore[arg-type]
    if kind == "g":
        if len(values) != 2:
            raise ValueError("a membership is g, MEMBER, GROUP")
        member, group = values
        _check_subject(member)
        if not group.startswith("group:") or not _SUBJECT.fullmatch(group):
            raise ValueError(f"{group!r} is not a group (write group:NAME)")
        if member == group:
            raise ValueError("a group cannot contain itself")
        return Membership(member, group)
    if kind == "g2":
        if len(values) != 2:
            raise ValueError("a role rule is g2, ROLE, ACTION-or-ROLE")
        role, holds = values
        if not _ROLE.fullmatch(role) or not _ROLE.fullmatch(holds):
            raise ValueError("role and action names are lower-case words")
        return RoleRule(role, holds)
    raise ValueError(f"unknown row type {kind!r} (use p, g or g2)")


def _check_subject(subject: str) -> None:
    if not _SUBJECT.fullmatch(subject):
        raise ValueError(
            f"{subject!r} is not a subject (write user:NAME, group:NAME, token:NAME or "
            "client:ISSUER/NAME)"
        )


def _check_resource(resource: str) -> None:
    if not _RESOURCE.fullmatch(resource):
        raise ValueError(
            f"{resource!r} is not a resource pattern (no commas, quotes, line breaks, or blanks "
            "at either end)"
        )
    kind = resource_kind(resource)
    if (
        resource != "*"
        and kind != "*"
        and kind not in RESOURCE_KINDS
        and split_workspace(resource)[0] is None  # WORKSPACE/KIND:NAME (guard.patterns)
    ):
        raise ValueError(
            f"unknown resource kind {kind!r} (known: {', '.join(RESOURCE_KINDS)}; in an MLflow "
            "workspace: WORKSPACE/experiment, WORKSPACE/model, WORKSPACE/skill)"
        )


def _edges(roles: Iterable[RoleRule]) -> dict[str, list[str]]:
    edges: dict[str, list[str]] = {}
    for rule in roles:
        edges.setdefault(rule.role, []).append(rule.holds)
    return edges


def _edges_members(memberships: Iterable[Membership]) -> dict[str, list[str]]:
    edges: dict[str, list[str]] = {}
    for m in memberships:
        edges.setdefault(m.member, []).append(m.group)
    return edges


def _reaches(start: str, target: str, edges: dict[str, list[str]]) -> bool:
    seen: set[str] = set()
    stack = list(edges.get(start, ()))
    while stack:
        node = stack.pop()
        if node == target:
            return True
        if node not in seen:
            seen.add(node)
            stack.extend(edges.get(node, ()))
    return False
