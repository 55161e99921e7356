"""Operations that span tokens and policies, shared by the CLI, startup and the admin API.

A token's rights are ordinary grants to ``token:NAME``; creating a token adds its grant and
revoking it removes every rule that names it, so a later token of the same name starts empty.
No change may leave the gateway without an administrator.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from guard.authz.policy import Grant, PolicyError, PolicySet, Rule, parse_row
from guard.authz.store import PolicyStore
from guard.identity.tokens import (
    BOOTSTRAP_NAME,
    TokenError,
    TokenRecord,
    TokenStore,
    validate_name,
)

ADMIN_ROLE = "admin"


def administrators(policy: PolicySet) -> set[str]:
    """Subjects holding ``admin`` on every resource: users, tokens, or non-empty groups."""
    members = {m.group for m in policy.memberships}
    return {
        g.subject
        for g in policy.grants
        if g.role == ADMIN_ROLE and g.resource == "*" and g.effect == "allow"
        and (not g.subject.startswith("group:") or g.subject in members)
    }  # fmt: skip


def keeps_an_administrator(current: PolicySet, after: PolicySet) -> list[str]:
    """The problem with a change that leaves no administrator where there was one."""
    if administrators(current) and not administrators(after):
        return ["this change would remove the last administrator (p, SUBJECT, admin, *)"]
    return []


def rules_naming(policy: PolicySet, subject: str) -> list[Rule]:
    rules: list[Rule] = [g for g in policy.grants if g.subject == subject]
    rules += [m for m in policy.memberships if subject in (m.member, m.group)]
    return rules


class Governance:
    def __init__(self, tokens: TokenStore, policies: PolicyStore) -> None:
        self.tokens = tokens
        self.policies = policies

    def preview(self, add: Iterable[Rule] = (), remove: Iterable[Rule] = ()) -> PolicySet:
        """The policy a change would leave; raises PolicyError if it may not be made."""
        _, current = self.policies.load()
        after = PolicySet.from_rules((set(current.rules()) - set(remove)) | set(add))
        if problems := after.problems() or keeps_an_administrator(current, after):
            raise PolicyError(problems)
        return after

    def change(
        self,
        actor: str,
        add: Iterable[Rule] = (),
        remove: Iterable[Rule] = (),
        expected_version: int | None = None,
    ) -> int:
        """Change the policy unless that would leave no administrator (judged under the
        store's write lock, so two concurrent removals cannot both pass)."""
        return self.policies.change(
            actor, add=add, remove=remove, check=keeps_an_administrator,
            expected_version=expected_version,
        )  # fmt: skip

    def replace(self, policy: PolicySet, actor: str) -> int:
        return self.policies.replace(policy, actor, check=keeps_an_administrator)

    def create_token(
        self, name: str, role: str, resource: str, lifetime: float, actor: str
    ) -> tuple[TokenRecord, str]:
        """A new token holding ``role`` on ``resource``; the secret is returned once."""
        validate_name(name)
        _, policy = self.policies.load()
        if role not in policy.role_names():
            known = ", ".join(sorted(policy.role_names()))
            raise TokenError(f"role {role!r} does not exist (known: {known})")
        try:
            grant = parse_row(Grant(f"token:{name}", role, resource).row())
        except ValueError as exc:
            raise TokenError(str(exc)) from None
        record, secret = self.tokens.create(name, role, lifetime)
        try:
            self.change(actor, add=[grant])
        except PolicyError:
            self.tokens.revoke(name)
            raise
        return record, secret

    def revoke_token(self, name: str, actor: str) -> TokenRecord:
        _, policy = self.policies.load()
        self.change(actor, remove=rules_naming(policy, f"token:{name}"))
        return self.tokens.revoke(name)

    def bootstrap(self, lifetime: float, secret: str | None, actor: str) -> str | None:
        """First start: the shipped policy, grants for tokens made before policies existed, and
        the first admin token. Returns that token's secret when one was created."""
        created = self.tokens.bootstrap(lifetime, secret)
        live = [t for t in self.tokens.list() if t.expires_at > dt.datetime.now(dt.UTC)]
        self.policies.seed_defaults(actor, [Grant(f"token:{t.name}", t.role, "*") for t in live])
        if created is not None:
            self.policies.change(actor, add=[Grant(f"token:{BOOTSTRAP_NAME}", ADMIN_ROLE, "*")])
        return created
