"""Authorization remembers, per policy index, callers allowed a route's every action on every
resource (``AuthorizationMiddleware._unconditional``): their next request skips working that
out again. What it remembers must never outlive the grant, pass to another caller, another
set of directory groups or another workspace, or stand for a request whose body decides."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from guard.authz.authorization import AuthorizationMiddleware
from guard.authz.engine import PolicyIndex
from guard.authz.policy import PolicySet, parse_lines
from guard.authz.promotion import PromotionRules
from guard.authz.resolve import Resolver
from guard.authz.routes import Route, load_routes
from guard.authz.runtime import PolicyRuntime
from guard.edge.context import RequestContext
from guard.identity.base import DirectorySubject, Principal

ROLES = ["g2, viewer, read", "g2, editor, read", "g2, editor, update"]


def index(*lines: str, version: int = 1) -> PolicyIndex:
    return PolicyIndex(PolicySet.from_rules(parse_lines([*ROLES, *lines])), version=version)


def route(method: str, path: str) -> Route:
    return next(r for r in load_routes() if r.method == method and r.path == path)


GET_EXPERIMENT = route("GET", "/api/2.0/mlflow/experiments/get")
SET_ALIAS = route("POST", "/api/2.0/mlflow/registered-models/alias")


class Runtime:
    def __init__(self, policy: PolicyIndex) -> None:
        self.index = policy

    async def refresh_soon(self, since: float | None = None, key: str = "") -> bool:
        return False


class Lookups:
    """Every experiment id is exp-1, every model churn."""

    async def resources(self, route: Route, *args: Any) -> list[str]:
        return ["model:churn"] if route.kind == "model" else ["experiment:exp-1"]

    def bound(self, workspace: str) -> Lookups:
        return self

    def created(self) -> None:
        pass

    def forget(self, *args: Any) -> None:
        pass


class Gateway:
    def __init__(self, policy: PolicyIndex, rules: PromotionRules | None = None) -> None:
        self.runtime = Runtime(policy)
        self.forwarded = 0

        async def mlflow(scope: Any, receive: Any, send: Any) -> None:
            self.forwarded += 1
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

        self.app = AuthorizationMiddleware(
            mlflow,
            policies=cast(PolicyRuntime, self.runtime),
            resolver=cast(Resolver, Lookups()),
            promotion=rules or PromotionRules((), ()),
        )

    def request(
        self,
        subject: str,
        row: Route = GET_EXPERIMENT,
        body: bytes = b"",
        query: bytes = b"experiment_id=1",
        workspace: str | None = None,
    ) -> tuple[int, RequestContext]:
        context = RequestContext("r", "127.0.0.1", "127.0.0.1", "http", "gateway")
        context.principal = Principal(subject, str(subject), "test", ())
        scope: dict[str, Any] = {
            "type": "http", "method": row.method, "path": row.path, "headers": [],
            "query_string": query, "guard": context, "guard.route": row, "guard.params": {},
            "guard.body": body,
        }  # fmt: skip
        if workspace is not None:
            scope["guard.workspace"] = workspace
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        asyncio.run(self.app(scope, receive, send))
        return sent[0]["status"], context


def test_a_remembered_shortcut_records_what_working_it_out_records() -> None:
    gateway = Gateway(index("p, user:ada, viewer, experiment:*"))
    first = gateway.request("user:ada")
    second = gateway.request("user:ada")
    assert first[0] == second[0] == 200
    assert (first[1].action, first[1].rule) == (second[1].action, second[1].rule)
    assert second[1].rule == "unconditional read on experiment:*"
    assert second[1].policy_version == 1


def test_a_shortcut_does_not_outlive_the_grant() -> None:
    gateway = Gateway(index("p, user:ada, viewer, experiment:*"))
    assert gateway.request("user:ada")[0] == 200
    gateway.runtime.index = index("p, user:ada, viewer, experiment:other", version=2)
    status, context = gateway.request("user:ada")
    assert status == 403
    assert context.policy_version == 2


def test_a_shortcut_does_not_pass_to_another_caller() -> None:
    gateway = Gateway(index("p, user:ada, viewer, experiment:*"))
    assert gateway.request("user:ada")[0] == 200
    assert gateway.request("user:bob")[0] == 403


def test_a_shortcut_does_not_pass_to_the_same_name_with_other_groups() -> None:
    gateway = Gateway(index("p, group:ldap/admins, viewer, experiment:*"))
    admin = DirectorySubject("user:ada", ("group:ldap/admins",))
    assert gateway.request(admin)[0] == 200
    assert gateway.request(DirectorySubject("user:ada", ()))[0] == 403
    assert gateway.request("user:ada")[0] == 403


def test_a_shortcut_does_not_pass_to_another_workspace() -> None:
    policy = index("p, user:ada, viewer, team-a/*")
    gateway = Gateway(policy)
    assert gateway.request("user:ada", workspace="team-a")[0] == 200
    assert gateway.request("user:ada", workspace="team-b")[0] == 403


def test_a_request_whose_body_decides_is_never_remembered() -> None:
    """An editor of every model may move an ordinary alias; a protected one needs promote."""
    rules = PromotionRules(protected_aliases=("champion",), validation_tags=())
    gateway = Gateway(index("p, user:ada, editor, model:*"), rules)
    dev = b'{"name": "churn", "alias": "dev", "version": "1"}'
    champion = b'{"name": "churn", "alias": "champion", "version": "1"}'
    assert gateway.request("user:ada", SET_ALIAS, dev, b"")[0] == 200
    assert gateway.request("user:ada", SET_ALIAS, dev, b"")[0] == 200
    assert gateway.request("user:ada", SET_ALIAS, champion, b"")[0] == 403
    assert gateway.forwarded == 2


def test_the_memory_is_bounded() -> None:
    gateway = Gateway(index("p, group:ldap/all, viewer, experiment:*"))
    for number in range(5000):
        subject = DirectorySubject(f"user:u{number}", ("group:ldap/all",))
        assert gateway.request(subject)[0] == 200
    assert len(gateway.app._unconditional) <= 4096
