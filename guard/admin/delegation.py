"""Who may change the policy, whatever surface they use (the ``/guard/api/`` today, the console
next): policy administrators change anything; everyone else may only delegate, on one
experiment, registered model or skill they manage, a role whose every action they hold there.
"""

from __future__ import annotations

from functools import lru_cache

from guard.admin.governance import administrators
from guard.authz.engine import PolicyIndex
from guard.authz.policy import ACTIONS, Grant, Rule
from guard.authz.workspaces import valid_name
from guard.errors import Refusal
from guard.patterns import split_workspace

POLICY = "guard:policy"
DELEGABLE_KINDS = ("experiment", "model", "skill")


@lru_cache(maxsize=2)
def _administrators(index: PolicyIndex) -> frozenset[str]:
    return frozenset(administrators(index.policy))


def is_administrator(index: PolicyIndex, subject: str) -> bool:
    """Holds ``admin`` on ``*`` itself or through a group. Deny rules do not count here."""
    admins = _administrators(index)
    return any(who in admins for who in index.subjects_of(subject))


def may(index: PolicyIndex, subject: str, action: str, resource: str = POLICY) -> bool:
    """May ``subject`` read or manage the policy (or read the audit trail)?"""
    return is_administrator(index, subject) or index.decide(subject, resource, action).allowed


def delegation_refusal(index: PolicyIndex, subject: str, rule: Rule) -> Refusal | None:
    """Why ``subject``, not a policy administrator, may not add or remove ``rule``; or None."""
    text = ", ".join(rule.row())
    if not isinstance(rule, Grant) or rule.effect != "allow":
        return Refusal("permission_denied", f"Only policy administrators may change: {text}.")
    workspace, resource = split_workspace(rule.resource)  # in a workspace: WORKSPACE/KIND:NAME
    kind, sep, name = resource.partition(":")
    if (
        kind not in DELEGABLE_KINDS
        or not sep
        or not name
        or "*" in name
        or "?" in name
        or (workspace is not None and not valid_name(workspace))  # one workspace, by its name
    ):
        return Refusal(
            "permission_denied",
            f"Only policy administrators may grant on {rule.resource!r}; managers grant on one "
            "experiment, model or skill by its exact name (in one workspace, by its name).",
        )
    for action in ("manage", *sorted(index.actions_of(rule.role) & set(ACTIONS))):
        decision = index.decide(subject, rule.resource, action)
        if not decision.allowed:
            reason = "explicit_deny" if decision.reason == "explicit_deny" else "permission_denied"
            return Refusal(
                reason,
                f"{subject} may not {action} {rule.resource}, so may not grant or revoke "
                f"{rule.role} there.",
            )
    return None
