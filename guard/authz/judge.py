"""One request's decisions: asks the policy index for every action on every resource, records
what decided in the request context, and words refusals so that a thing that does not exist
reads like one the caller may not touch, naming only what the request sent.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from guard.authz.engine import PolicyIndex
from guard.authz.identifiers import Unresolved
from guard.edge.context import RequestContext
from guard.errors import Refusal, conceal


class Refused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


T = TypeVar("T")


class Judge:
    """Decides one request on one policy index, and words its refusals: the same for a thing
    that does not exist as for one the caller may not touch, naming only what was sent."""

    def __init__(self, index: PolicyIndex, subject: str, context: RequestContext) -> None:
        self.index = index
        self.subject = subject
        self.context = context
        self.last_label = "what this request names"
        self.checked: list[str] = []

    def refusal(self, cause: Refusal, action: str, label: str) -> Refusal:
        return conceal(cause, f"{self.subject} may not {action} {label}.")

    async def resolve(self, label: str, actions: list[str], lookup: Awaitable[T]) -> T:
        """Await a lookup; an unknown id is refused like a forbidden one."""
        self.last_label = label
        try:
            return await lookup
        except Unresolved as exc:
            if exc.refusal.reason != "resource_unresolved":
                raise
            raise Refused(self.refusal(exc.refusal, ",".join(actions), label)) from None

    def require(
        self, resources: list[str], actions: list[str], label: str, shown_action: str = ""
    ) -> None:
        """Every action on every resource, or a refusal naming ``label``."""
        context = self.context
        for resource in resources:
            if (named := self.index.qualify(resource)) not in self.checked:
                self.checked.append(named)  # as decided on: with its workspace, if any
            for action in actions:
                decision = self.index.decide(self.subject, resource, action)
                if decision.rule is not None:
                    context.rule = ", ".join(decision.rule.row())
                if not decision.allowed:
                    context.resources = [self.index.qualify(resource)]
                    context.action = action
                    reason = (
                        "explicit_deny"
                        if decision.reason == "explicit_deny"
                        else ("permission_denied")
                    )
                    cause = Refusal(reason, f"{self.subject} may not {action} {resource}.")
                    raise Refused(self.refusal(cause, shown_action or action, label))
        context.resources = list(self.checked)
