"""guard.admin.delegation: a manager delegates on the one experiment, model or skill they
manage, never beyond it."""

from __future__ import annotations

import pytest

from guard.admin.delegation import delegation_refusal
from guard.authz.engine import PolicyIndex
from guard.authz.policy import Grant, PolicySet

POLICY = """
g2, viewer, read
g2, editor, viewer
g2, editor, update
g2, manager, editor
g2, manager, manage
g2, promoter, viewer
g2, promoter, promote
g2, admin, manager
g2, admin, promoter
p, token:admin, admin, *
p, user:mia, manager, skill:@acme/reviewer
p, user:mia, manager, model:fraud
"""


@pytest.mark.parametrize(
    ("resource", "allowed"),
    [
        ("skill:@acme/reviewer", True),
        ("model:fraud", True),
        ("skill:reviewer", False),  # the org-less skill of the same name is another resource
        ("skill:@acme/*", False),  # a pattern: administrators only
        ("skill:@acme/other", False),  # not managed by mia
        ("model:fraud*", False),
    ],
)
def test_a_manager_delegates_on_what_they_manage(resource: str, allowed: bool) -> None:
    index = PolicyIndex(PolicySet.from_csv(POLICY))
    refusal = delegation_refusal(index, "user:mia", Grant("user:bob", "editor", resource))
    assert (refusal is None) == allowed, refusal


def test_a_manager_cannot_delegate_a_role_they_do_not_hold() -> None:
    index = PolicyIndex(PolicySet.from_csv(POLICY))
    grant = Grant("user:bob", "promoter", "skill:@acme/reviewer")  # mia may not promote
    assert delegation_refusal(index, "user:mia", grant) is not None
