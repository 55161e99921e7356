"""The decision index against casbin itself, and the semantics governance teams rely on."""

from __future__ import annotations

import random

import pytest

from guard.authz.casbin_adapter import build_enforcer, casbin_decide, default_policy_text
from guard.authz.engine import PolicyIndex
from guard.authz.policy import ACTIONS, Grant, Membership, PolicySet, RoleRule
from guard.patterns import resource_match

DEFAULT = PolicySet.from_csv(default_policy_text())


def random_policy(rng: random.Random, grants: int) -> tuple[PolicySet, list[str], list[str]]:
    users = [f"user:u{i}" for i in range(40)] + [f"token:t{i}" for i in range(10)]
    groups = [f"group:g{i}" for i in range(12)]
    names = [f"fraud-{i}" for i in range(8)] + [f"risk/team-{i}" for i in range(6)] + ["a", "ab"]
    resources = [f"experiment:{n}" for n in names] + [f"model:{n}" for n in names]
    resources += ["server:mlflow", "guard:policy", "guard:audit"]
    patterns = [
        "*", "experiment:*", "model:*", "experiment:fraud-*", "model:fraud-?", "experiment:risk/*",
        "model:*-3", "experiment:a?", "*:fraud-1", "guard:*", "experiment:r*m-*", "mod*",
    ]  # fmt: skip
    roles = set(DEFAULT.roles)
    custom = ["reader", "writer", "lead"]
    roles |= {
        RoleRule("reader", "read"), RoleRule("writer", "reader"), RoleRule("writer", "update"),
        RoleRule("lead", "writer"), RoleRule("lead", "promoter"),
    }  # fmt: skip
    role_names = sorted({r.role for r in roles})
    memberships = set()
    for i, group in enumerate(groups):
        for member in rng.sample(users, 4):
            memberships.add(Membership(member, group))
        if i and rng.random() < 0.6:  # nesting, without cycles: only to lower-numbered groups
            memberships.add(Membership(group, groups[rng.randrange(i)]))
    rules: list[Grant] = []
    for _ in range(grants):
        subject = rng.choice(users + groups)
        resource = rng.choice(resources + patterns)
        effect = "deny" if rng.random() < 0.15 else "allow"
        rules.append(Grant(subject, rng.choice(role_names + custom), resource, effect))  # type: ignore[arg-type]
    policy = PolicySet(frozenset(rules), frozenset(memberships), frozenset(roles))
    assert policy.problems() == []
    return policy, users + groups + ["user:nobody"], [*resources, "experiment:zzz", "model:"]


@pytest.mark.parametrize("seed", [1, 2])
def test_index_agrees_with_casbin_on_random_questions(seed: int) -> None:
    rng = random.Random(seed)
    policy, subjects, resources = random_policy(rng, grants=150)
    enforcer = build_enforcer(policy)
    index = PolicyIndex(policy)
    disagreements = []
    allowed = 0
    for _ in range(5000):
        question = (rng.choice(subjects), rng.choice(resources), rng.choice(ACTIONS))
        expected, _ = casbin_decide(enforcer, *question)
        decision = index.decide(*question)
        allowed += expected
        if decision.allowed != expected:
            disagreements.append((question, expected, decision))
    assert disagreements == []
    assert 500 < allowed < 4500  # the questions exercise both answers


POLICY = PolicySet.from_csv(
    default_policy_text()
    + """
g, user:alice, group:risk
g, group:risk, group:ml
p, user:alice, editor, experiment:fraud/*
p, group:risk, promoter, model:fraud-*
p, token:ci, promoter, model:fraud-detector
p, group:ml, viewer, experiment:*
p, user:alice, editor, experiment:fraud/secret, deny
p, user:editor, admin, guard:policy, deny
p, user:wide, viewer, *:*
"""
)
INDEX = PolicyIndex(POLICY)


@pytest.mark.parametrize(
    ("subject", "resource", "action", "allowed", "reason"),
    [
        ("user:alice", "experiment:fraud/train", "update", True, "allowed"),
        ("user:alice", "experiment:fraud/a/b", "delete", True, "allowed"),  # * crosses /
        ("user:alice", "experiment:other", "read", True, "allowed"),  # via group:risk -> group:ml
        ("user:alice", "experiment:other", "update", False, "no_matching_grant"),
        ("user:alice", "model:fraud-detector", "promote", True, "allowed"),  # inherited group
        ("user:alice", "model:fraud-detector", "delete", False, "no_matching_grant"),
        ("user:alice", "experiment:fraud/secret", "read", False, "explicit_deny"),  # deny wins
        ("token:ci", "model:fraud-detector", "promote", True, "allowed"),
        ("token:ci", "model:fraud-detector2", "promote", False, "no_matching_grant"),
        ("token:ci", "model:fraud-detector", "update", False, "no_matching_grant"),
        # Names that look like roles, groups or patterns gain nothing.
        ("user:admin", "experiment:x", "read", False, "no_matching_grant"),
        ("user:group:risk", "model:fraud-x", "promote", False, "no_matching_grant"),
        # "*" covers MLflow, not the gateway's own resources: those need a guard: grant.
        ("group:admins", "guard:policy", "manage", False, "no_matching_grant"),
        ("group:auditors", "guard:policy", "read", True, "allowed"),
        ("user:wide", "guard:audit", "read", False, "no_matching_grant"),
        ("user:wide", "experiment:x", "read", True, "allowed"),
        ("user:*", "experiment:x", "read", False, "no_matching_grant"),
        ("user:alice", "experiment:fraud/*", "update", True, "allowed"),
    ],
)
def test_semantics(subject: str, resource: str, action: str, allowed: bool, reason: str) -> None:
    decision = INDEX.decide(subject, resource, action)
    assert (decision.allowed, decision.reason) == (allowed, reason)
    assert (decision.rule is None) == (reason == "no_matching_grant")
    assert casbin_decide(build_enforcer(POLICY), subject, resource, action)[0] == allowed


def test_the_deciding_rule_is_named() -> None:
    decision = INDEX.decide("user:alice", "experiment:fraud/secret", "read")
    assert decision.rule == Grant("user:alice", "editor", "experiment:fraud/secret", "deny")


@pytest.mark.parametrize(
    ("resource", "pattern", "matches"),
    [
        ("experiment:a", "*", True),
        ("experiment:a/b/c", "experiment:a/*", True),
        ("experiment:ab", "experiment:a?", True),
        ("experiment:abc", "experiment:a?", False),
        ("experiment:a.b", "experiment:a?b", True),
        ("experiment:axb", "experiment:a.b", False),  # regex characters are literal
        ("experiment:a[b]", "experiment:a[b]", True),
        ("experiment:ab", "experiment:a[b]", False),
        ("model:fraud-x", "experiment:*", False),
        ("model:x\ny", "model:x*", True),
    ],
)
def test_resource_match(resource: str, pattern: str, matches: bool) -> None:
    assert resource_match(resource, pattern) is matches
