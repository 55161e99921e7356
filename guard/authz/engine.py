"""The decision index: casbin's semantics without casbin's scan of every row.

casbin's ``enforce`` evaluates the matcher against every ``p`` row (~4 us a row here, ~40 ms
at 100k rows). The index answers the same question from the rows that can matter: the grants of
the subject and of its groups, filed by resource kind, exact names in a dict and patterns in a
short list. ``tests/unit/authz/test_engine.py`` checks it against casbin itself on thousands of
random questions. An index is immutable; a policy change builds a new one and swaps it in.
"""

from __future__ import annotations

import copy
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Final, Literal

from guard.authz.policy import MAX_LINKS, Grant, PolicySet
from guard.authz.workspaces import qualify, reaches
from guard.patterns import (
    SCOPED_KINDS,
    SEALED_KINDS,
    compile_pattern,
    is_pattern,
    resource_kind,
    split_workspace,
    workspace_glob_matches,
)

Reason = Literal["allowed", "explicit_deny", "no_matching_grant"]
MEMO_LIMIT: Final = 100_000  # answers remembered per index (see _remember)
# A group an identity source asserted (guard.identity.base.DirectorySubject): always qualified by
# its source, ``group:ldap/NAME``, so it can never be a policy-defined group like group:admins.
_SOURCED_GROUP: Final = re.compile(r"group:[a-z][a-z0-9-]*/[^\s,\"']+")


def carried_groups(subject: str) -> tuple[str, ...]:
    """The source-qualified groups a subject string carries from its login (none for plain
    strings); anything else it might carry is ignored."""
    groups: tuple[str, ...] = getattr(subject, "groups", ())
    return tuple(sorted(g for g in groups if _SOURCED_GROUP.fullmatch(g)))


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    reason: Reason
    rule: Grant | None  # the grant that decided, or None when nothing matched


@dataclass(slots=True)
class _Bucket:
    exact: dict[str, list[Grant]] = field(default_factory=dict)
    patterns: list[tuple[re.Pattern[str], Grant]] = field(default_factory=list)


def _closure(start: str, edges: dict[str, list[str]]) -> frozenset[str]:
    """``start`` and everything it reaches in at most MAX_LINKS links (as casbin)."""
    seen = {start}
    queue = deque([(start, 0)])
    while queue:
        node, depth = queue.popleft()
        if depth >= MAX_LINKS:
            continue
        for nxt in edges.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                queue.append((nxt, depth + 1))
    return frozenset(seen)


class PolicyIndex:
    """Answers (subject, resource, action) for one immutable policy set."""

    # The MLflow workspace this index decides in (``in_workspace``); None: workspaces are off.
    workspace: str | None = None

    def __init__(self, policy: PolicySet, version: int = 0) -> None:
        self.policy = policy
        self.version = version
        self._views: dict[str, PolicyIndex] = {}
        role_edges: dict[str, list[str]] = {}
        for rule in policy.roles:
            role_edges.setdefault(rule.role, []).append(rule.holds)
        self._role_edges = role_edges
        self._actions: dict[str, frozenset[str]] = {}
        self._group_edges: dict[str, list[str]] = {}
        for m in policy.memberships:
            self._group_edges.setdefault(m.member, []).append(m.group)
        self._subjects: dict[tuple[str, tuple[str, ...]], tuple[str, ...]] = {}
        self._unconditional: dict[tuple[str, tuple[str, ...], str, str], bool] = {}
        self._grants: dict[str, dict[str, _Bucket]] = {}
        for grant in policy.grants:
            bucket = self._grants.setdefault(grant.subject, {}).setdefault(
                resource_kind(grant.resource), _Bucket()
            )
            if is_pattern(grant.resource):
                bucket.patterns.append((compile_pattern(grant.resource), grant))
            else:
                bucket.exact.setdefault(grant.resource, []).append(grant)

    def in_workspace(self, workspace: str) -> PolicyIndex:
        """This index deciding in an MLflow workspace: every experiment, model and skill it is
        asked about is ``WORKSPACE/KIND:NAME`` (``guard.authz.workspaces``). Shares the grants
        and the memo of this one; a few views are kept."""
        view = self._views.get(workspace)
        if view is None:
            view = copy.copy(self)
            view.workspace = workspace
            if len(self._views) < 1024:
                self._views[workspace] = view
        return view

    def qualify(self, resource: str) -> str:
        """The resource this index decides on for ``resource``: qualified with its workspace."""
        return resource if self.workspace is None else qualify(resource, self.workspace)

    def actions_of(self, role: str) -> frozenset[str]:
        """What a role holds: itself (as casbin's g2 does) and all it reaches."""
        held = self._actions.get(role)
        if held is None:
            held = self._actions[role] = _closure(role, self._role_edges)
        return held

    def subjects_of(self, subject: str) -> tuple[str, ...]:
        """The subject and every group it belongs to, directly or through other groups; the
        directory groups it carries (``carried_groups``) count as direct memberships."""
        key = (str(subject), carried_groups(subject))
        found = self._subjects.get(key)
        if found is None:
            reached = set().union(*(_closure(s, self._group_edges) for s in (key[0], *key[1])))
            found = self._subjects[key] = tuple(sorted(reached))
        return found

    def decide(self, subject: str, resource: str, action: str) -> Decision:
        """Allowed if some grant allows and no grant denies; the deciding grant comes along."""
        if self.workspace is not None:
            resource = qualify(resource, self.workspace)
        kind = resource_kind(resource)
        allowed_by: Grant | None = None
        for who in self.subjects_of(subject):
            buckets = self._grants.get(who)
            if buckets is None:
                continue
            wide = buckets.get("*") if kind not in ("*", *SEALED_KINDS) else None
            for bucket in (buckets.get(kind), wide):
                if bucket is None:
                    continue
                for grant in bucket.exact.get(resource, ()):
                    if action in self.actions_of(grant.role):
                        if grant.effect == "deny":
                            return Decision(False, "explicit_deny", grant)
                        allowed_by = allowed_by or grant
                for pattern, grant in bucket.patterns:
                    if action in self.actions_of(grant.role) and pattern.fullmatch(resource):
                        if grant.effect == "deny":
                            return Decision(False, "explicit_deny", grant)
                        allowed_by = allowed_by or grant
        if allowed_by is not None:
            return Decision(True, "allowed", allowed_by)
        return Decision(False, "no_matching_grant", None)

    def member_of(self, subject: str, workspace: str) -> bool:
        """Whether ``subject`` may use an MLflow workspace: some grant of its own or of its
        groups allows something there (``team-a/*``, ``team-a/experiment:x``, ``*``...), and no
        deny takes everything there away (a deny of read on ``*``, ``*:*`` or ``GLOB/*`` naming
        it). What it may do inside is decided resource by resource."""
        key = (str(subject), carried_groups(subject), "workspace member", workspace)
        known = self._unconditional.get(key)
        if known is None:
            grants = [
                grant
                for who in self.subjects_of(subject)
                for bucket in self._grants.get(who, {}).values()
                for grant in (
                    *(g for _, g in bucket.patterns),
                    *(g for gs in bucket.exact.values() for g in gs),
                )
            ]
            known = not any(
                g.effect == "deny" and "read" in self.actions_of(g.role) and _all_of(g, workspace)
                for g in grants
            ) and any(g.effect == "allow" and reaches(g.resource, workspace) for g in grants)
            self._remember(key, known)
        return known

    def _remember(self, key: tuple[str, tuple[str, ...], str, str], value: bool) -> None:
        """Memoize; workspace names come from callers, so the memo is bounded (emptied when
        full, then refilled by what is asked)."""
        if len(self._unconditional) >= MEMO_LIMIT:
            self._unconditional.clear()
        self._unconditional[key] = value

    def unconditional(self, subject: str, kind: str, action: str) -> bool:
        """True when ``action`` is allowed on every resource of ``kind``: an allow on ``*`` or
        ``KIND:*`` and no deny that could apply. Then nothing needs resolving (or filtering)."""
        if self.workspace is not None and kind in SCOPED_KINDS:
            kind = f"{self.workspace}/{kind}"
        key = (str(subject), carried_groups(subject), kind, action)
        known = self._unconditional.get(key)
        if known is None:
            known = self._compute_unconditional(subject, kind, action)
            self._remember(key, known)
        return known

    def _compute_unconditional(self, subject: str, kind: str, action: str) -> bool:
        sealed = kind in SEALED_KINDS
        everything: tuple[str, ...] = (f"{kind}:*",) if sealed else ("*", "*:*", f"{kind}:*")
        workspace, slash, base = kind.partition("/")
        if slash:  # in a workspace: everything in it, or every workspace's KIND
            everything += (f"{workspace}/*", f"*/{base}:*", f"{workspace}/*:*")
        allowed = False
        for who in self.subjects_of(subject):
            for bucket_kind, bucket in self._grants.get(who, {}).items():
                if bucket_kind not in ((kind,) if sealed else (kind, "*")):
                    continue
                grants = [g for _, g in bucket.patterns] + [
                    g for gs in bucket.exact.values() for g in gs
                ]
                for grant in grants:
                    if action not in self.actions_of(grant.role):
                        continue
                    if grant.effect == "deny":
                        return False
                    allowed = allowed or grant.resource in everything
        return allowed


def _all_of(grant: Grant, workspace: str) -> bool:
    """Whether a grant's resource covers everything in ``workspace``."""
    if grant.resource in ("*", "*:*"):
        return True
    glob, rest = split_workspace(grant.resource)
    return glob is not None and rest in ("*", "*:*") and workspace_glob_matches(glob, workspace)


EMPTY: Final = PolicyIndex(PolicySet())
