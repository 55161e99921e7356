"""Answers filtered on their way back: what MLflow answers is held whole and only what the caller
may read is sent on (a GraphQL answer's model versions, online-scoring configurations). An
answer that cannot be filtered exactly is refused, never sent as it is.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guard.authz.engine import PolicyIndex
from guard.authz.graphql import ModelVersionsPath, filter_model_versions
from guard.authz.identifiers import Unresolved
from guard.authz.resolve import Resolver
from guard.edge.requestdata import RequestDataError
from guard.errors import Refusal, send_refusal


async def forward_model_versions_filtered(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    index: PolicyIndex,
    filters: list[ModelVersionsPath],
) -> None:
    """Forward a GraphQL query and drop, from its answer, the model versions of models the
    caller may not read. An answer that cannot be filtered exactly is not sent at all."""
    subject = scope["guard"].principal.subject

    def may_read(name: str) -> bool:
        return index.decide(subject, f"model:{name}", "read").allowed

    async def transform(body: bytes) -> bytes | None:
        return filter_model_versions(body, filters, may_read)

    await forward_filtered(app, scope, receive, send, transform, "graphql_not_authorizable")


async def forward_scorer_configs_filtered(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    index: PolicyIndex,
    resolver: Resolver,
) -> None:
    """Forward a request for online-scoring configurations and keep, in the answer, those of
    experiments the caller may read: MLflow answers nothing for a scorer without one, so a
    configuration in a forbidden experiment must look like none at all."""
    subject = scope["guard"].principal.subject

    async def transform(body: bytes) -> bytes | None:
        try:
            answer = json.loads(body)
            configs = answer["configs"]
            kept = []
            for config in configs:
                experiment = await resolver.experiment_resource(str(config["experiment_id"]))
                if index.decide(subject, experiment, "read").allowed:
                    kept.append(config)
        except (ValueError, RecursionError, TypeError, KeyError, Unresolved, RequestDataError):
            return None
        return json.dumps({**answer, "configs": kept}).encode()

    await forward_filtered(app, scope, receive, send, transform, "permission_denied")


async def forward_workspaces_filtered(
    app: ASGIApp, scope: Scope, receive: Receive, send: Send, index: PolicyIndex
) -> None:
    """Forward a list of MLflow workspaces and keep, in the answer, those the caller is a
    member of (guard.authz.workspaces): another workspace's name is not theirs to learn."""
    subject = scope["guard"].principal.subject

    async def transform(body: bytes) -> bytes | None:
        try:
            answer = json.loads(body)
            listed = answer.get("workspaces", [])  # protobuf JSON leaves an empty list out
            kept = [w for w in listed if index.member_of(subject, w["name"])]
        except (ValueError, RecursionError, TypeError, KeyError):
            return None
        return json.dumps({**answer, "workspaces": kept}).encode()

    await forward_filtered(app, scope, receive, send, transform, "permission_denied")


async def forward_filtered(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    transform: Callable[[bytes], Awaitable[bytes | None]],
    reason: str,
) -> None:
    """Forward, hold MLflow's answer whole, and send ``transform``'s version of a 200 (a
    refusal if it returns None); other answers pass as they are. The answer is changed only
    once MLflow's connection is back in the pool, so lookups made meanwhile cannot wait on
    a pool held by answers waiting on them."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def capture(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
        else:
            chunks.append(message.get("body", b""))

    await app(scope, receive, capture)
    if start is None:
        return
    body = b"".join(chunks)
    headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
    if start["status"] == 200:
        encoded = any(k.lower() == b"content-encoding" for k, _ in headers)
        changed = None if encoded else await transform(body)
        if changed is None:
            refusal = Refusal(reason, "The answer cannot be filtered.")
            await send_refusal(scope, send, refusal)
            return
        body = changed
    headers.append((b"content-length", str(len(body)).encode()))
    await send({**start, "headers": headers})
    await send({"type": "http.response.body", "body": body})
