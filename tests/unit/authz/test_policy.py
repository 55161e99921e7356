import pytest

from guard.authz.casbin_adapter import default_policy_text
from guard.authz.policy import Grant, Membership, PolicyError, PolicySet, RoleRule, parse_row


def test_default_policy_is_valid_and_round_trips() -> None:
    policy = PolicySet.from_csv(default_policy_text())
    assert policy.role_names() == {"viewer", "editor", "promoter", "manager", "auditor", "admin"}
    assert PolicySet.from_csv(policy.to_csv()) == policy


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (["p", "user:alice", "editor", "experiment:fraud/*"],
         Grant("user:alice", "editor", "experiment:fraud/*")),
        (["p", "group:risk", "promoter", "model:fraud-*", "deny"],
         Grant("group:risk", "promoter", "model:fraud-*", "deny")),
        (["g", "user:alice", "group:risk"], Membership("user:alice", "group:risk")),
        # A machine with an identity provider's token (guard.identity.bearer).
        (["p", "client:ci/mlflow-robot", "promoter", "model:fraud"],
         Grant("client:ci/mlflow-robot", "promoter", "model:fraud")),
        (["g", "client:ci/mlflow-robot", "group:risk"],
         Membership("client:ci/mlflow-robot", "group:risk")),
        (["g2", "lead", "editor"], RoleRule("lead", "editor")),
    ],
)  # fmt: skip
def test_parse_row(row: list[str], expected: object) -> None:
    assert parse_row(row) == expected


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (["p", "alice", "editor", "experiment:x"], "not a subject"),
        (["p", "role:admin", "editor", "experiment:x"], "not a subject"),
        (["p", "user:", "editor", "experiment:x"], "not a subject"),
        (["p", "user:a b", "editor", "experiment:x"], "not a subject"),
        (["p", "client:", "editor", "experiment:x"], "not a subject"),
        (["p", "clients:ci/x", "editor", "experiment:x"], "not a subject"),
        (["g", "group:a", "client:ci/x"], "not a group"),
        (["p", "user:a", "Editor", "experiment:x"], "not a role name"),
        (["p", "user:a", "editor", "experiment:a b "], "not a resource pattern"),
        (["p", "user:a", "editor", "experiment:a\nb"], "not a resource pattern"),
        (["p", "user:a", "editor", "experiment:a,b"], "not a resource pattern"),
        (["p", "user:a", "editor", "runs:x"], "unknown resource kind"),
        (["p", "user:a", "editor", "experiment:x", "maybe"], "allow or deny"),
        (["p", "user:a", "editor"], "a grant is"),
        (["g", "user:a", "user:b"], "not a group"),
        (["g", "group:a", "group:a"], "cannot contain itself"),
        (["g2", "lead"], "a role rule is"),
        (["x", "a"], "unknown row type"),
    ],
)
def test_bad_rows(row: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_row(row)


def test_every_problem_of_a_set_is_reported_at_once() -> None:
    text = """
g2, viewer, read
g2, read, viewer
g2, lead, lead
g2, boss, nothing
p, user:a, ghost, experiment:x
g, group:a, group:b
g, group:b, group:a
p, bad subject, viewer, experiment:x
"""
    with pytest.raises(PolicyError) as info:
        PolicySet.from_csv(text)
    # Row errors come first and alone: the set is not judged until every row parses.
    assert len(info.value.problems) == 1 and "not a subject" in info.value.problems[0]
    with pytest.raises(PolicyError) as info:
        PolicySet.from_csv(text.replace("p, bad subject, viewer, experiment:x\n", ""))
    problems = "\n".join(info.value.problems)
    assert "role 'read': a role may not be named like an action" in problems
    assert "role 'lead' contains itself" in problems
    assert "role 'boss' holds 'nothing'" in problems
    assert "role 'ghost' is not defined" in problems
    assert "group 'group:a' contains itself" in problems


def test_names_with_inner_spaces_are_resources() -> None:
    assert parse_row(["p", "user:a", "viewer", "experiment:My Experiment"]) == Grant(
        "user:a", "viewer", "experiment:My Experiment"
    )


def test_diff() -> None:
    old = PolicySet.from_csv("g2, viewer, read\np, user:a, viewer, experiment:x\n")
    new = PolicySet.from_csv("g2, viewer, read\np, user:b, viewer, experiment:x\n")
    added, removed = old.diff(new)
    assert added == [("p", "user:b", "viewer", "experiment:x", "allow")]
    assert removed == [("p", "user:a", "viewer", "experiment:x", "allow")]


def test_csv_comments_quotes_and_blank_lines() -> None:
    policy = PolicySet.from_csv('# c\n\ng2, viewer, read\n"p", "user:a", viewer, "experiment:x"\n')
    assert policy.grants == {Grant("user:a", "viewer", "experiment:x")}
