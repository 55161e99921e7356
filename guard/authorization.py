"""Authorization: every forwarded request is allowed for a principal, an action and a resource.

The route row gives the action and says where MLflow reads the resource's id; the resolver turns
that id into the policy resource (``experiment:NAME``, ``model:NAME``, ``server:mlflow``); the
policy index decides. A caller allowed the action on every resource of the kind (an admin, say)
skips the lookups. Whatever cannot be determined is refused, never guessed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard import systemtags
from guard.authz.runtime import PolicyRuntime
from guard.errors import Refusal, send_refusal
from guard.graphql import ModelVersionsPath, filter_model_versions, graphql_plan
from guard.promotion import PromotionRules, Requirements
from guard.requestdata import RequestData, RequestDataError, canonical_experiment_id
from guard.resolve import Resolver, Unresolved
from guard.routes import Route
from guard.search import SearchFilter, search_kind

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
# Requests that point MLflow at artifacts by address: (route suffix, the field holding it).
_SOURCES: Final = (
    ("/model-versions/create", "source"),
    ("/experiments/create", "artifact_location"),
)
# Creations after which the creator is granted manage on what they made.
_CREATES: Final = ("/experiments/create", "/registered-models/create")
# Routes after which a cached experiment name may be stale.
_RENAMES: Final = ("/experiments/update", "/experiments/delete", "/experiments/restore")
_MODEL_NAME_CHANGES: Final = ("/registered-models/rename", "/registered-models/delete")


OnCreated = Callable[[str, str], Awaitable[None]]


class AuthorizationMiddleware:
    def __init__(
        self,
        app: ASGIApp,
        *,
        policies: PolicyRuntime,
        resolver: Resolver,
        promotion: PromotionRules,
        search: SearchFilter | None = None,
        on_created: OnCreated | None = None,
        before_search: Callable[[Scope], Awaitable[Refusal | None]] | None = None,
    ) -> None:
        self.app = app
        self.policies = policies
        self.resolver = resolver
        self.promotion = promotion
        self.search = search
        self.on_created = on_created
        self.before_search = before_search  # a filtered search reaches MLflow itself: audit it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: Route = scope["guard.route"]
        if route.open and self.search is not None and search_kind(route.path) is not None:
            subject = scope["guard"].principal.subject
            index = self.policies.index
            if not index.unconditional(subject, POLICY_KIND[route.kind], "read"):
                try:
                    data = self._data(scope)
                except RequestDataError as exc:
                    await send_refusal(scope, send, exc.refusal)
                    return
                scope["guard"].action, scope["guard"].policy_version = "read", index.version
                if (
                    self.before_search is not None
                    and (refusal := await self.before_search(scope)) is not None
                ):
                    await send_refusal(scope, send, refusal)
                    return
                await self.search.respond(scope, send, subject, index, data)
                return
        started = time.monotonic()
        refusal, resources = await self._check(scope, route)
        if refusal is not None and await self.policies.refresh_soon():
            refusal, resources = await self._check(scope, route)
        if refusal is None and systemtags.applies(route.path):
            refusal = self._attribute(scope)
        scope["guard"].authorization_seconds = time.monotonic() - started
        if refusal is not None:
            await send_refusal(scope, send, refusal)
            return
        if route.path.endswith(_CREATES) and resources and self.on_created is not None:
            await self._create(scope, receive, send, resources[0])
        elif filters := scope.get("guard.graphql_filters"):
            await self._filtered(scope, receive, send, filters)
        else:
            await self.app(scope, receive, send)
        if route.path.endswith(_RENAMES):
            self._forget(scope)
        elif route.path.endswith(_MODEL_NAME_CHANGES):
            self.resolver.forget("model", "")
        await self._name_for_audit(scope, route)

    async def _name_for_audit(self, scope: Scope, route: Route) -> None:
        """A caller allowed everything skipped the lookups; once the answer is out, name what
        it acted on for the audit trail (cached lookups, nearly always). Failing is fine."""
        context = scope["guard"]
        if context.resources or route.kind == "server" or route.id_from in ("none", "graphql"):
            return
        try:
            headers: dict[str, list[str]] = {}
            context.resources = await self.resolver.resources(
                route, scope["guard.params"], self._data(scope), headers
            )
        except (RequestDataError, Unresolved):
            return

    async def _filtered(
        self, scope: Scope, receive: Receive, send: Send, filters: list[ModelVersionsPath]
    ) -> None:
        """Forward a GraphQL query and drop, from its answer, the model versions of models the
        caller may not read. An answer that cannot be filtered exactly is not sent at all."""
        subject = scope["guard"].principal.subject
        index = self.policies.index
        start: Message | None = None
        chunks: list[bytes] = []

        def may_read(name: str) -> bool:
            return index.decide(subject, f"model:{name}", "read").allowed

        async def capture(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False) or start is None:
                return
            body = b"".join(chunks)
            headers = [
                (k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"
            ]
            encoded = any(k.lower() == b"content-encoding" for k, _ in headers)
            if start["status"] == 200:
                filtered = None if encoded else filter_model_versions(body, filters, may_read)
                if filtered is None:
                    await send_refusal(
                        scope,
                        send,
                        Refusal("graphql_not_authorizable", "The answer cannot be filtered."),
                    )
                    return
                body = filtered
            headers.append((b"content-length", str(len(body)).encode()))
            await send({**start, "headers": headers})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, capture)

    def _attribute(self, scope: Scope) -> Refusal | None:
        """Runs are the caller's: their name goes into a new run, nobody else's into a later
        write of its user tag (administrators excepted)."""
        principal = scope["guard"].principal
        if self.policies.index.unconditional(principal.subject, "server", "manage"):
            return None
        path = scope["guard.route"].path
        try:
            data = self._data(scope)
            if (refusal := systemtags.refusal(path, data, principal.name)) is not None:
                return refusal
            body = systemtags.attribute_run(path, data, principal.name)
        except RequestDataError as exc:
            return exc.refusal
        if body is not None:
            scope["guard.body"] = body
        return None

    async def _create(self, scope: Scope, receive: Receive, send: Send, resource: str) -> None:
        """Forward a create; once MLflow confirms it, its creator manages the new resource."""
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        subject = scope["guard"].principal.subject
        kind = resource.partition(":")[0]
        if status == 200 and not self.policies.index.unconditional(subject, kind, "manage"):
            assert self.on_created is not None  # noqa: S101 - checked by the caller
            await self.on_created(subject, resource)

    async def _check(self, scope: Scope, route: Route) -> tuple[Refusal | None, list[str]]:
        """A refusal, or None and the resources the request acts on (when they were needed)."""
        kind = POLICY_KIND[route.kind]
        if route.open and kind == "server":
            return None, []  # the reviewed open list: UI files, version, health, server info
        subject = scope["guard"].principal.subject
        index = self.policies.index
        data: RequestData | None = None
        needs = Requirements()
        try:
            if self.promotion.applies(route.path):
                data = self._data(scope)
                needs = self.promotion.requirements(route.path, data)
            actions = {needs.replace_action or route.action, *needs.actions}
            possible = actions | ({"promote"} if needs.version_aliases else set())
            source_field = next((f for p, f in _SOURCES if route.path.endswith(p)), None)
            if (
                not route.path.endswith(_CREATES)
                and source_field is None
                and all(index.unconditional(subject, kind, a) for a in possible)
                # GraphQL reads registered models too
                and (route.id_from != "graphql" or index.unconditional(subject, "model", "read"))
                and all(
                    index.unconditional(subject, r.partition(":")[0], a) for r, a in needs.elsewhere
                )
            ):
                context = scope["guard"]
                context.policy_version, context.action = index.version, ",".join(sorted(actions))
                context.rule = f"unconditional {','.join(sorted(actions))} on {kind}:*"
                return None, []
            if route.open:
                # Searches are open to all once results are filtered; until then only to those
                # who may read every resource of the kind.
                return Refusal("search_not_filtered", f"Searching needs read on {kind}:*."), []
            if kind == "server":
                resources = [SERVER_RESOURCE]
            elif route.id_from == "graphql":
                resources = await self._graphql(scope, subject)
            else:
                data = data or self._data(scope)
                headers: dict[str, list[str]] = {}
                for k, v in scope["headers"]:  # every value: MLflow reads the first of repeats
                    headers.setdefault(k.decode("latin-1").lower(), []).append(v.decode("latin-1"))
                resources = await self.resolver.resources(
                    route, scope["guard.params"], data, headers
                )
                if route.path == "/v1/traces" and "x-mlflow-run-id" in headers:
                    needs.elsewhere.append((await self._linked_run(headers), "update"))
            if needs.version_aliases and await self.resolver.model_version_aliases(
                *needs.version_aliases
            ):
                actions.add("promote")  # deleting a version that holds an alias
            # Names in the request (a rename's new name) as MLflow stores them; artifact sources
            # come back from the resolver that way already.
            elsewhere = [
                (await self._stored(r) if a != "read" else r, a) for r, a in needs.elsewhere
            ]
            if source_field is not None:
                refusal, read = await self._sources(
                    data or self._data(scope), source_field, subject
                )
                if refusal is not None:
                    return refusal, []
                elsewhere.extend((r, "read") for r in read)
        except (RequestDataError, Unresolved) as exc:
            return exc.refusal, []
        checks = [(r, a) for r in resources for a in sorted(actions)] + elsewhere
        context = scope["guard"]
        context.policy_version = index.version
        context.action = ",".join(sorted(actions))
        context.resources = list(dict.fromkeys(r for r, _ in checks))
        for resource, action in checks:
            decision = index.decide(subject, resource, action)
            if decision.rule is not None:
                context.rule = ", ".join(decision.rule.row())
            if not decision.allowed:
                explicit = decision.reason == "explicit_deny"
                reason = "explicit_deny" if explicit else "permission_denied"
                context.action, context.resources = action, [resource]
                return Refusal(reason, f"{subject} may not {action} {resource}."), []
        return None, resources

    async def _stored(self, resource: str) -> str:
        kind, _, name = resource.partition(":")
        if kind == "model":
            return await self.resolver.model_resource(name)
        if kind == "experiment":
            return await self.resolver.experiment_resource_by_name(name)
        return resource

    async def _linked_run(self, headers: dict[str, list[str]]) -> str:
        """The experiment of the run OTLP traces are linked to (``X-Mlflow-Run-Id``)."""
        values = headers["x-mlflow-run-id"]
        if len(values) != 1:
            raise RequestDataError(Refusal("ambiguous_parameter", "X-Mlflow-Run-Id is repeated."))
        experiment_id = await self.resolver.run_experiment(values[0])
        if experiment_id is None:
            raise Unresolved(Refusal("resource_unresolved", f"Unknown run {values[0]!r}."))
        return await self.resolver.experiment_resource(experiment_id)

    async def _graphql(self, scope: Scope, subject: str) -> list[str]:
        """The experiments a GraphQL document reads; a field that can return anything of a kind
        (a search without ids) needs read on every one of them. A run's model versions are
        filtered out of the answer instead, down to the models the caller may read."""
        needs, filters = graphql_plan(
            scope["method"], scope["query_string"], scope.get("guard.body", b"")
        )
        if filters and not self.policies.index.unconditional(subject, "model", "read"):
            scope["guard.graphql_filters"] = filters
        resources: list[str] = []
        for need in needs:
            if need.field.startswith("all:"):
                kind = need.field.removeprefix("all:")
                if not self.policies.index.unconditional(subject, kind, "read"):
                    raise Unresolved(
                        Refusal("permission_denied", f"{subject} may not read {kind}:*.")
                    )
            elif need.field == "experiment_id":
                resources.append(await self.resolver.experiment_resource(need.value))
            elif need.field == "run_id":
                experiment_id = await self.resolver.run_experiment(need.value)
                if experiment_id is None:
                    raise Unresolved(Refusal("resource_unresolved", f"Unknown run {need.value!r}."))
                resources.append(await self.resolver.experiment_resource(experiment_id))
            else:  # pragma: no cover - graphql_needs names no other field
                raise Unresolved(Refusal("resource_unresolved", f"Cannot check {need.field}."))
        return list(dict.fromkeys(resources))

    async def _sources(
        self, data: RequestData, field: str, subject: str
    ) -> tuple[Refusal | None, list[str]]:
        """Artifacts named by address must be ones the caller may read; other addresses (files,
        object stores) are for administrators only."""
        uri = data.single(field)
        if uri in (None, ""):
            return None, []
        if not isinstance(uri, str):
            return Refusal("invalid_request_body", f"{field} must be a string."), []
        resources = await self.resolver.source_resources(uri)
        if resources is None:
            if self.policies.index.unconditional(subject, "server", "manage"):
                return None, []
            return Refusal("source_not_allowed", f"{field} {uri!r} is not allowed."), []
        return None, resources

    @staticmethod
    def _data(scope: Scope) -> RequestData:
        return RequestData.of(scope)

    def _forget(self, scope: Scope) -> None:
        try:
            data = RequestData.build(scope["method"], b"", scope.get("guard.body", b""))
            experiment_id = data.single("experiment_id")
            if experiment_id is not None:
                self.resolver.forget("experiment", canonical_experiment_id(experiment_id))
        except RequestDataError:
            return
