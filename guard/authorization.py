"""Authorization: every forwarded request is allowed for a principal, an action and a resource.

The route row gives the action and says where MLflow reads the resource's id; the resolver turns
that id into the policy resource (``experiment:NAME``, ``model:NAME``, ``server:mlflow``); the
policy index decides. A caller allowed the action on every resource of the kind (an admin, say)
skips the lookups. Whatever cannot be determined is refused, never guessed.
"""

from __future__ import annotations

import logging
from typing import Final

from starlette.types import ASGIApp, Receive, Scope, Send

from guard.authz.runtime import PolicyRuntime
from guard.errors import Refusal, send_refusal
from guard.requestdata import RequestData, RequestDataError, canonical_experiment_id
from guard.resolve import Resolver, Unresolved
from guard.routes import Route

logger = logging.getLogger("guard.authz")

# The policy kind each MLflow resource kind is governed by.
POLICY_KIND: Final = {
    **dict.fromkeys(
        ("experiment", "run", "logged_model", "trace", "dataset", "artifact", "scorer",
         "prompt_optimization"),
        "experiment",
    ),
    **dict.fromkeys(("registered_model", "model_version"), "model"),
    **dict.fromkeys(
        ("server", "webhook", "gateway", "job", "assistant", "workspace", "user_admin"), "server"
    ),
}  # fmt: skip
SERVER_RESOURCE: Final = "server:mlflow"
# Routes after which a cached experiment name may be stale.
_RENAMES: Final = ("/experiments/update", "/experiments/delete", "/experiments/restore")


class AuthorizationMiddleware:
    def __init__(self, app: ASGIApp, *, policies: PolicyRuntime, resolver: Resolver) -> None:
        self.app = app
        self.policies = policies
        self.resolver = resolver

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: Route = scope["guard.route"]
        refusal = await self._check(scope, route)
        if refusal is not None and await self.policies.refresh_soon():
            refusal = await self._check(scope, route)
        if refusal is not None:
            await send_refusal(scope, send, refusal)
            return
        await self.app(scope, receive, send)
        if route.path.endswith(_RENAMES):
            self._forget(scope)

    async def _check(self, scope: Scope, route: Route) -> Refusal | None:
        kind = POLICY_KIND[route.kind]
        if route.open and kind == "server":
            return None  # the reviewed open list: UI files, version, health, server info
        subject = scope["guard"].principal.subject
        index = self.policies.index
        if index.unconditional(subject, kind, route.action):
            return None
        if route.open:
            # Searches are open to all once results are filtered; until then only to those
            # who may read every resource of the kind.
            return Refusal("search_not_filtered", f"Searching needs read on {kind}:*.")
        if kind == "server":
            resources = [SERVER_RESOURCE]
        else:
            try:
                data = RequestData.build(
                    scope["method"], scope["query_string"], scope.get("guard.body", b"")
                )
                headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
                resources = await self.resolver.resources(
                    route, scope["guard.params"], data, headers
                )
            except (RequestDataError, Unresolved) as exc:
                return exc.refusal
        for resource in resources:
            decision = index.decide(subject, resource, route.action)
            if not decision.allowed:
                reason = (
                    "explicit_deny" if decision.reason == "explicit_deny" else ("permission_denied")
                )
                return Refusal(reason, f"{subject} may not {route.action} {resource}.")
        return None

    def _forget(self, scope: Scope) -> None:
        try:
            data = RequestData.build(scope["method"], b"", scope.get("guard.body", b""))
            experiment_id = data.single("experiment_id")
            if experiment_id is not None:
                self.resolver.forget("experiment", canonical_experiment_id(experiment_id))
        except RequestDataError:
            return
