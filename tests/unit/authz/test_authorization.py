"""The authorization layer on its own: which policy a refusal is decided on."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from guard.authz.authorization import AuthorizationMiddleware
from guard.authz.engine import PolicyIndex
from guard.authz.policy import PolicySet, parse_lines
from guard.authz.promotion import PromotionRules
from guard.authz.resolve import Resolver
from guard.authz.routes import load_routes
from guard.authz.runtime import PolicyRuntime
from guard.edge.context import RequestContext
from guard.identity.base import Principal

ROLES = ["g2, viewer, read"]
BEFORE = PolicyIndex(PolicySet.from_rules(parse_lines(ROLES)), version=1)
AFTER = PolicyIndex(
    PolicySet.from_rules(parse_lines([*ROLES, "p, user:bob, viewer, experiment:exp-1"])),
    version=2,
)
GET_EXPERIMENT = next(
    r for r in load_routes() if r.method == "GET" and r.path == "/api/2.0/mlflow/experiments/get"
)


class Runtime:
    """A policy runtime whose poll has just run (so it will not look again) and that swaps in
    a newer policy while a request waits for a lookup."""

    def __init__(self) -> None:
        self.index = BEFORE

    async def refresh_soon(self, since: float | None = None, key: str = "") -> bool:
        return False


class SlowResolver:
    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def sent(self, *args: Any) -> str:
        return "experiment_id '1'"

    async def resources(self, *args: Any) -> list[str]:
        await asyncio.sleep(0)
        self.runtime.index = AFTER  # the poll swapped the policy meanwhile
        return ["experiment:exp-1"]

    def created(self) -> None:
        pass


def test_a_refusal_is_decided_on_the_newest_policy() -> None:
    """A grant made a moment ago: the request read the old index, the poll swapped in the new
    one during the lookup, and no early re-check was due. It must still be allowed."""
    runtime = Runtime()
    forwarded: list[str] = []

    async def mlflow(scope: Any, receive: Any, send: Any) -> None:
        forwarded.append(scope["path"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    app = AuthorizationMiddleware(
        mlflow,
        policies=cast(PolicyRuntime, runtime),
        resolver=cast(Resolver, SlowResolver(runtime)),
        promotion=PromotionRules((), ()),
    )
    context = RequestContext("r", "127.0.0.1", "127.0.0.1", "http", "gateway")
    context.principal = Principal("user:bob", "bob", "test", ())
    scope = {
        "type": "http", "method": "GET", "path": GET_EXPERIMENT.path, "headers": [],
        "query_string": b"experiment_id=1", "guard": context, "guard.route": GET_EXPERIMENT,
        "guard.params": {}, "guard.body": b"",
    }  # fmt: skip
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    assert forwarded == [GET_EXPERIMENT.path], sent
    assert context.policy_version == 2
