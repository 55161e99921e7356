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
from dataclasses import dataclass
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.authz import otlp, skills, systemtags
from guard.authz.answers import (
    forward_model_versions_filtered,
    forward_scorer_configs_filtered,
    forward_workspaces_filtered,
)
from guard.authz.engine import PolicyIndex, carried_groups
from guard.authz.graphql import graphql_plan
from guard.authz.identifiers import Unresolved, describe, sent
from guard.authz.judge import Judge, Refused
from guard.authz.promotion import PromotionRules, Requirements
from guard.authz.references import references, static_needs
from guard.authz.resolve import Resolver
from guard.authz.routes import Route
from guard.authz.runtime import PolicyRuntime
from guard.authz.search import SearchFilter, search_kind
from guard.edge.requestdata import RequestData, RequestDataError, canonical_experiment_id
from guard.errors import Refusal, conceal, send_refusal

logger = logging.getLogger("guard.authz")

# The policy kind each MLflow resource kind is governed by.
POLICY_KIND: Final = {
    **dict.fromkeys(
        ("experiment", "run", "logged_model", "trace", "dataset", "artifact", "scorer",
         "prompt_optimization"),
        "experiment",
    ),
    **dict.fromkeys(("registered_model", "model_version"), "model"),
    "skill": "skill",
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
# Online-scoring configurations, filtered in the answer rather than judged on the ids asked.
_SCORER_CONFIGS: Final = ("/scorers/online-configs",)
# Creations after which the creator is granted manage on what they made.
_CREATES: Final = ("/experiments/create", "/registered-models/create")
# Routes after which a cached experiment name may be stale.
_RENAMES: Final = ("/experiments/update", "/experiments/delete", "/experiments/restore")
_MODEL_NAME_CHANGES: Final = ("/registered-models/rename", "/registered-models/delete")


OnCreated = Callable[[str, str], Awaitable[None]]
OTLP_PATH: Final = "/v1/traces"
# Scope key: the caller was allowed without the lookups, so the body's references went unread.
_UNCHECKED_REFERENCES: Final = "guard.references_unchecked"


def _headers(scope: Scope) -> dict[str, list[str]]:
    """Each lowercase header name with every value it came with (MLflow reads the first of
    repeats; a single string per name would hide them)."""
    headers: dict[str, list[str]] = {}
    for k, v in scope["headers"]:
        headers.setdefault(k.decode("latin-1").lower(), []).append(v.decode("latin-1"))
    return headers


_UNCONDITIONAL_SIZE: Final = 4096  # remembered shortcuts; all forgotten when full
_ShortcutKey = tuple[int, str, tuple[str, ...], str | None]  # AuthorizationMiddleware._shortcut_key


@dataclass(frozen=True, slots=True)
class _Shortcut:
    """A caller allowed every action of ``route`` everywhere: what its requests record."""

    route: Route  # the row itself (it is remembered by id)
    action: str
    rule: str


def _creates(route: Route) -> bool:
    """A route whose creator is granted manage on what it creates (when MLflow confirms it)."""
    return route.path.endswith(_CREATES) or (route.kind == "skill" and route.action == "create")


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
        max_body_size: int = 16 * 1024**2,  # what an OTLP export may decompress to
    ) -> None:
        self.app = app
        self.max_body_size = max_body_size
        self.policies = policies
        self.resolver = resolver
        self.promotion = promotion
        self.search = search
        self.on_created = on_created
        self.before_search = before_search  # a filtered search reaches MLflow itself: audit it
        # Callers allowed a route's every action on every resource, remembered per policy
        # index: (route, subject, groups, workspace) -> the action and rule to record.
        self._unconditional: dict[_ShortcutKey, _Shortcut] = {}
        self._unconditional_index: PolicyIndex | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route: Route = scope["guard.route"]
        if route.open and self.search is not None and search_kind(route.path) is not None:
            subject = scope["guard"].principal.subject
            index = self._index(scope)
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
        if refusal is not None:
            # A refusal is decided on the newest policy: one swapped in while this request
            # waited for a lookup, or one stored before it arrived and not yet polled (a grant
            # made a moment ago; checks are shared, at most four a second).
            for _ in range(3):
                decided_on = scope["guard"].policy_version
                refreshed = await self.policies.refresh_soon(
                    scope["guard"].started, scope["guard"].principal.subject
                )
                if not refreshed and self.policies.index.version == decided_on:
                    break
                refusal, resources = await self._check(scope, route)
                if refusal is None:
                    break
        if refusal is None and systemtags.applies(route.path):
            refusal = self._attribute(scope)
        if refusal is None and route.path == OTLP_PATH and scope.get(_UNCHECKED_REFERENCES):
            refusal = self._otlp_system_tags(scope)
        scope["guard"].authorization_seconds = time.monotonic() - started
        if refusal is not None:
            await send_refusal(scope, send, refusal)
            return
        created = scope.get("guard.created", resources[:1] if _creates(route) else [])
        if created and self.on_created is not None:
            await self._create(scope, receive, send, created)
        elif filters := scope.get("guard.graphql_filters"):
            await forward_model_versions_filtered(
                self.app, scope, receive, send, self._index(scope), filters
            )
        elif scope.get("guard.filter_workspaces"):
            await forward_workspaces_filtered(self.app, scope, receive, send, self._index(scope))
        elif scope.get("guard.filter_scorer_configs"):
            await forward_scorer_configs_filtered(
                self.app, scope, receive, send, self._index(scope), self._resolver(scope)
            )
        else:
            await self.app(scope, receive, send)
        if route.action == "create":
            self.resolver.created()
        if route.kind == "workspace" and route.method == "DELETE":
            self.resolver.forget_workspace(scope["guard.params"]["workspace_name"])
        if route.path.endswith(_RENAMES):
            self._forget(scope)
        elif route.path.endswith(_MODEL_NAME_CHANGES):
            self._resolver(scope).forget("model", "")
        await self._name_for_audit(scope, route)

    async def _name_for_audit(self, scope: Scope, route: Route) -> None:
        """A caller allowed everything skipped the lookups; once the answer is out, name what
        it acted on for the audit trail (cached lookups, nearly always). Failing is fine."""
        context = scope["guard"]
        if context.resources or route.kind == "server" or route.id_from in ("none", "graphql"):
            return
        try:
            headers: dict[str, list[str]] = {}
            found = await self._resolver(scope).resources(
                route, scope["guard.params"], self._data(scope), headers
            )
            context.resources = [self._index(scope).qualify(r) for r in found]
        except (RequestDataError, Unresolved):
            return

    def _otlp_system_tags(self, scope: Scope) -> Refusal | None:
        """An OTLP export whose spans set MLflow's own trace tags (where a trace's data is read
        from; guard/authz/systemtags.py) is refused like the same tags written any other way.
        Callers whose references were checked met this in ``otlp.trace_ids`` already; those
        allowed to update every experiment skipped that, and meet it here (administrators
        aside, as for every system tag)."""
        subject = scope["guard"].principal.subject
        if self._index(scope).unconditional(subject, "server", "manage"):
            return None
        try:
            otlp.trace_ids(scope.get("guard.body", b""), _headers(scope), self.max_body_size)
        except RequestDataError as exc:
            return exc.refusal
        return None

    def _attribute(self, scope: Scope) -> Refusal | None:
        """Runs are the caller's: their name goes into every new run (administrators' too), and
        nobody else's into a later write of its user tag (administrators may, for imports)."""
        principal = scope["guard"].principal
        path = scope["guard.route"].path
        try:
            data = self._data(scope)
            if not self._index(scope).unconditional(principal.subject, "server", "manage") and (
                refusal := systemtags.refusal(path, data, principal.name)
            ):
                return refusal
            body = systemtags.attribute_run(path, data, principal.name)
        except RequestDataError as exc:
            return exc.refusal
        if body is not None:
            scope["guard.body"] = body
        return None

    async def _create(
        self, scope: Scope, receive: Receive, send: Send, resources: list[str]
    ) -> None:
        """Forward a create; once MLflow confirms it, its creator manages what it made."""
        status = 0

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        subject = scope["guard"].principal.subject
        index = self._index(scope)
        for resource in resources:
            kind = resource.partition(":")[0]
            if status == 200 and not index.unconditional(subject, kind, "manage"):
                assert self.on_created is not None  # noqa: S101 - checked by the caller
                await self.on_created(subject, index.qualify(resource))

    async def _check(self, scope: Scope, route: Route) -> tuple[Refusal | None, list[str]]:
        """A refusal, or None and the resources the request acts on (when they were needed).

        Each thing the request names is resolved and then decided before the next one is
        looked at, and a refusal names it in the caller's own words: whether an id is unknown
        or known and forbidden, the caller gets the same answer (the audit record keeps the
        difference), and a later id's existence cannot change which earlier one is refused.
        """
        kind = POLICY_KIND[route.kind]
        if route.open and kind == "server":
            return None, []  # the reviewed open list: UI files, version, health, server info
        subject = scope["guard"].principal.subject
        index = self._index(scope)
        context = scope["guard"]
        context.policy_version = index.version
        key = self._shortcut_key(scope, route, subject)
        if (known := self._unconditional.get(key)) is not None and known.route is route:
            scope[_UNCHECKED_REFERENCES] = True
            context.action, context.rule = known.action, known.rule
            return None, []
        resolver = self._resolver(scope)
        data: RequestData | None = None
        needs = Requirements()
        try:
            if route.action != "read" and self.promotion.applies(route.path):
                data = self._data(scope)
                needs = self.promotion.requirements(route.path, data)
            elif route.kind == "skill" and route.action != "read":
                data = self._data(scope)
                needs = self._skill_needs(route, scope["guard.params"], data)
            actions = {needs.replace_action or route.action, *needs.actions}
            possible = actions | (
                {"promote"} if needs.version_aliases or needs.skill_version else set()
            )
            if skills.registers(route):
                possible.add("create")  # where the skill does not exist yet
            source_field = next((f for p, f in _SOURCES if route.path.endswith(p)), None)
            if route.kind == "workspace" and route.action == "read" and index.workspace:
                # before any shortcut: reading workspaces is a matter of membership alone
                return self._workspace_read(scope, route, index, subject), []
            if (
                not _creates(route)
                and source_field is None
                and all(index.unconditional(subject, kind, a) for a in possible)
                # GraphQL reads registered models too
                and (route.id_from != "graphql" or index.unconditional(subject, "model", "read"))
                and all(
                    index.unconditional(subject, r.partition(":")[0], a) for r, a in needs.elsewhere
                )
                # what the body links to or copies from may be of another kind (a run's model)
                and all(index.unconditional(subject, k, a) for k, a in static_needs(route))
            ):
                scope[_UNCHECKED_REFERENCES] = True
                context.action = ",".join(sorted(actions))
                context.rule = (
                    f"unconditional {','.join(sorted(actions))} on {index.qualify(f'{kind}:*')}"
                )
                if index.workspace is not None and route.kind == "artifact":
                    return await self._held_here(scope, route, resolver, subject), []
                if data is None:  # decided on the key alone (see _shortcut_key): remember
                    self._remember(key, _Shortcut(route, context.action, context.rule))
                return None, []
            if route.open:
                # Searches are open to all once results are filtered; until then only to those
                # who may read every resource of the kind.
                return Refusal("search_not_filtered", f"Searching needs read on {kind}:*."), []
            if route.path.endswith(_SCORER_CONFIGS):
                # Answered with the configurations of readable experiments only (see
                # answers.forward_scorer_configs_filtered): refusing would tell which scorer ids
                # are configured.
                scope["guard.filter_scorer_configs"] = True
                context.action = "read"
                return None, []
            context.action = ",".join(sorted(actions))
            judge = Judge(index, subject, context)
            headers = _headers(scope)
            # 1. What the request acts on.
            if kind == "server":
                resources = [SERVER_RESOURCE]
                judge.require(resources, sorted(actions), SERVER_RESOURCE)
            elif route.id_from == "graphql":
                resources = await self._graphql(scope, judge)
            else:
                data = data or self._data(scope)
                params = scope["guard.params"]
                label = (
                    skills.label(route, params, data)
                    if route.kind == "skill"
                    else sent(route, params, data, headers)
                )
                resources = await judge.resolve(
                    label, sorted(actions), resolver.resources(route, params, data, headers)
                )
                if skills.registers(route):
                    scope["guard.created"] = await self._registers(
                        judge, resolver, resources, label
                    )
                else:
                    judge.require(resources, sorted(actions), label)
                if _creates(route):
                    await self._unseen_name(judge, resolver, resources, label)
            if (
                needs.version_aliases
                and await resolver.model_version_aliases(*needs.version_aliases)
            ) or (
                needs.skill_version and await resolver.skill_version_aliases(*needs.skill_version)
            ):
                actions.add("promote")  # deleting a version that holds an alias
                context.action = ",".join(sorted(actions))
                judge.require(resources, ["promote"], judge.last_label)
            # 2. What else it names: a rename's new name, as MLflow stores it.
            for resource, action in needs.elsewhere:
                sent_kind, _, name = resource.partition(":")
                label = f"new_name {name!r}" if action == "create" else resource
                target = await judge.resolve(label, [action], self._stored(resolver, resource))
                judge.require(target, [action], label)
                if action == "create":
                    await self._unseen_name(judge, resolver, target, label, sent_kind, name)
            # OTLP traces linked to a run.
            if route.path == "/v1/traces" and "x-mlflow-run-id" in headers:
                label = describe("X-Mlflow-Run-Id", headers["x-mlflow-run-id"])
                run = await judge.resolve(label, ["update"], self._linked_run(resolver, headers))
                judge.require(run, ["update"], label)
            # Other things the body names: linked, copied from or written to (guard/references).
            if kind != "server" and route.id_from != "graphql":
                data, body = data or self._data(scope), scope.get("guard.body", b"")
                limits = self.max_body_size, scope.get("guard.max_ids")
                for ref in references(route, data, headers, resolver, body, *limits):
                    found = await judge.resolve(ref.label, [ref.action], ref.lookup())
                    judge.require(found, [ref.action], ref.label)
            # Artifacts named by address: the caller must be able to read them.
            if source_field is not None:
                data = data or self._data(scope)
                await self._sources(resolver, data, source_field, subject, judge)
        except (RequestDataError, Unresolved) as exc:
            return conceal(exc.refusal, f"{subject} may not {route.action} this."), []
        except Refused as exc:
            return exc.refusal, []
        return None, resources

    async def _held_here(
        self, scope: Scope, route: Route, resolver: Resolver, subject: str
    ) -> Refusal | None:
        """An artifact path, for a caller allowed everything of its kind in the workspace: MLflow
        serves ``X/...`` in workspace W from ``workspaces/W/X/...`` (and, in ``default``, from the
        root) without asking whose experiment X is, and files outlive an experiment moved to
        another workspace or a deleted workspace. So the path's owner must still be one this
        workspace holds (a cached lookup); a listing that names no path stays allowed."""
        data = self._data(scope)  # unreadable: refused by the caller, _check
        try:
            await resolver.resources(route, scope["guard.params"], data, {})
        except (RequestDataError, Unresolved) as exc:
            if exc.refusal.reason == "invalid_request_body" and not data.single("path"):
                return None  # the workspace's root
            return conceal(exc.refusal, f"{subject} may not {route.action} this.")
        return None

    @staticmethod
    def _workspace_read(
        scope: Scope, route: Route, index: PolicyIndex, subject: str
    ) -> Refusal | None:
        """Reading workspaces (with workspaces on): one the caller is a member of, or the list,
        answered with those only (guard.authz.answers); creating, renaming and deleting them
        stays the administrators' (server manage)."""
        context = scope["guard"]
        context.action = "read"
        name = scope["guard.params"].get("workspace_name")
        if name is None:
            scope["guard.filter_workspaces"] = True
            return None
        context.resources = [f"workspace:{name}"]
        if index.member_of(subject, name):
            return None
        return Refusal("workspace_forbidden", f"{subject} may not use workspace {name!r}.")

    async def _unseen_name(
        self,
        judge: Judge,
        resolver: Resolver,
        resources: list[str],
        label: str,
        kind: str | None = None,
        name: str | None = None,
    ) -> None:
        """Creating (or renaming onto) a name that is taken tells whoever may create there that
        it exists; unless they may also read what holds it, they get the answer a name they
        may not use would get."""
        for resource in resources:
            kind_of, _, sent = resource.partition(":")
            kind_of, sent = kind or kind_of, name or sent
            if kind_of == "model":
                stored = await resolver.stored_model_name(sent)
            elif kind_of == "experiment":
                stored = await resolver.stored_experiment_name(sent)
            elif kind_of == "skill":  # MLflow's skill names have one spelling only
                stored = sent if await resolver.skill_exists(resource) else None
            else:
                continue
            if stored is not None:
                judge.require([f"{kind_of}:{stored}"], ["read"], label, shown_action="create")

    def _skill_needs(self, route: Route, params: dict[str, str], data: RequestData) -> Requirements:
        """A protected skill alias is the promoter's, as a model's is; a version set to
        ``status: deleted`` is deleted (MLflow asks MANAGE for it)."""
        needs = Requirements()
        if skills.is_alias_write(route):
            alias = skills.alias(route, params, data)
            if not isinstance(alias, str) or self.promotion.protects_alias(alias):
                needs.replace_action = "promote"
        elif skills.deletes_version(route, data):
            needs.replace_action = "delete"
        if needs.replace_action == "delete" or (
            route.method == "DELETE" and route.path.endswith("/versions/{version}")
        ):  # deleting a version that holds an alias is the promoter's too, as for models
            resource = skills.requested(route, params, data)[0]
            needs.skill_version = (resource, params["version"])
        return needs

    async def _registers(
        self, judge: Judge, resolver: Resolver, resources: list[str], label: str
    ) -> list[str]:
        """Registering versions: update on a skill that exists, create on one that does not
        (MLflow creates it); returns the skills it will create. Whoever may do neither is
        refused before anything is looked up, in the same words either way."""
        created = []
        for resource in resources:
            index, subject = judge.index, judge.subject
            if not (
                index.decide(subject, resource, "update").allowed
                or index.decide(subject, resource, "create").allowed
            ):
                judge.require([resource], ["update"], label)
            exists = await judge.resolve(label, ["update"], resolver.skill_exists(resource))
            judge.require([resource], ["update" if exists else "create"], label, "update")
            if not exists:
                created.append(resource)
        return created

    @staticmethod
    async def _stored(resolver: Resolver, resource: str) -> list[str]:
        kind, _, name = resource.partition(":")
        if kind == "model":
            return [await resolver.model_resource(name)]
        if kind == "experiment":
            return [await resolver.experiment_resource_by_name(name)]
        return [resource]

    @staticmethod
    async def _linked_run(resolver: Resolver, headers: dict[str, list[str]]) -> list[str]:
        """The experiment of the run OTLP traces are linked to (``X-Mlflow-Run-Id``)."""
        values = headers["x-mlflow-run-id"]
        if len(values) != 1:
            raise RequestDataError(Refusal("ambiguous_parameter", "X-Mlflow-Run-Id is repeated."))
        experiment_id = await resolver.run_experiment(values[0])
        if experiment_id is None:
            raise Unresolved(Refusal("resource_unresolved", f"Unknown run {values[0]!r}."))
        return [await resolver.experiment_resource(experiment_id)]

    async def _graphql(self, scope: Scope, judge: Judge) -> list[str]:
        """The experiments a GraphQL document reads; a field that can return anything of a kind
        (a search without ids) needs read on every one of them. A run's model versions are
        filtered out of the answer instead, down to the models the caller may read."""
        subject = judge.subject
        needs, filters = graphql_plan(
            scope["method"],
            scope["query_string"],
            scope.get("guard.body", b""),
            max_ids=scope.get("guard.max_ids"),
        )
        index, resolver = judge.index, self._resolver(scope)
        if filters and not index.unconditional(subject, "model", "read"):
            scope["guard.graphql_filters"] = filters
        resources: list[str] = []
        for need in needs:
            if need.field.startswith("all:"):
                kind = need.field.removeprefix("all:")
                if not index.unconditional(subject, kind, "read"):
                    raise Unresolved(
                        Refusal("permission_denied", f"{subject} may not read {kind}:*.")
                    )
                continue
            label = describe(need.field, [need.value])
            if need.field == "experiment_id":
                found = await judge.resolve(
                    label, ["read"], self._one(resolver.experiment_resource(need.value))
                )
            elif need.field == "run_id":
                found = await judge.resolve(label, ["read"], self._run(resolver, need.value))
            else:  # pragma: no cover - graphql_needs names no other field
                raise Unresolved(Refusal("resource_unresolved", f"Cannot check {need.field}."))
            judge.require(found, ["read"], label)
            resources += found
        return list(dict.fromkeys(resources))

    @staticmethod
    async def _one(resource: Awaitable[str]) -> list[str]:
        return [await resource]

    @staticmethod
    async def _run(resolver: Resolver, run_id: str) -> list[str]:
        experiment_id = await resolver.run_experiment(run_id)
        if experiment_id is None:
            raise Unresolved(Refusal("resource_unresolved", f"Unknown run {run_id!r}."))
        return [await resolver.experiment_resource(experiment_id)]

    @staticmethod
    async def _sources(
        resolver: Resolver, data: RequestData, field: str, subject: str, judge: Judge
    ) -> None:
        """Artifacts named by address must be ones the caller may read; other addresses (files,
        object stores) are for administrators only."""
        uri = data.single(field)
        if uri in (None, ""):
            return
        if not isinstance(uri, str):
            raise RequestDataError(Refusal("invalid_request_body", f"{field} must be a string."))
        label = describe(field, [uri])
        resources = await judge.resolve(label, ["read"], resolver.source_resources(uri))
        if resources is None:
            if judge.index.unconditional(subject, "server", "manage"):
                return
            raise Refused(Refusal("source_not_allowed", f"{field} {uri!r} is not allowed."))
        judge.require(resources, ["read"], label)

    def _shortcut_key(self, scope: Scope, route: Route, subject: str) -> _ShortcutKey:
        """What an unconditional decision is remembered by: the row, the caller with its
        directory groups, and the workspace, under the policy index in force (the memory is
        emptied when it changes). Remembered only when nothing else was read: ``_check``
        stores a shortcut only when it read no request data (no promotion or skill needs), and
        everything it reads before that is the row's (its static needs) or the index's; headers
        and parameters are read only after it."""
        if self.policies.index is not self._unconditional_index:
            self._unconditional, self._unconditional_index = {}, self.policies.index
        return (id(route), subject, carried_groups(subject), scope.get("guard.workspace"))

    def _remember(self, key: _ShortcutKey, shortcut: _Shortcut) -> None:
        if len(self._unconditional) >= _UNCONDITIONAL_SIZE:
            self._unconditional.clear()
        self._unconditional[key] = shortcut

    def _index(self, scope: Scope) -> PolicyIndex:
        """The policy index in force, deciding in the request's MLflow workspace (if any)."""
        index = self.policies.index
        workspace = scope.get("guard.workspace")
        return index if workspace is None else index.in_workspace(workspace)

    def _resolver(self, scope: Scope) -> Resolver:
        """The resolver, looking up in the request's MLflow workspace (if any)."""
        workspace = scope.get("guard.workspace")
        return self.resolver if workspace is None else self.resolver.bound(workspace)

    @staticmethod
    def _data(scope: Scope) -> RequestData:
        route = scope.get("guard.route")
        if route is not None and skills.body_unread(route):
            # Nothing the gateway decides on is in this body, which may be multipart (a skill's
            # uploaded content): MLflow reads it, the gateway does not.
            return RequestData.build(scope["method"], scope["query_string"], b"")
        return RequestData.of(scope)

    def _forget(self, scope: Scope) -> None:
        try:
            data = RequestData.build(scope["method"], b"", scope.get("guard.body", b""))
            experiment_id = data.single("experiment_id")
            if experiment_id is not None:
                self._resolver(scope).forget("experiment", canonical_experiment_id(experiment_id))
        except RequestDataError:
            return
