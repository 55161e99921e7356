"""The MLflow route table (``routes.toml``) and the layer that applies it.

A path is first checked to be canonical, then matched against the table; what the table does not
forward never reaches MLflow. The canonical path is what gets forwarded, so the decision is made
on exactly the string MLflow routes on.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Final, Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from guard.errors import Refusal, send_refusal

FORWARDED_METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"})


@dataclass(frozen=True, slots=True)
class RouteRule:
    path: str
    match: Literal["exact", "prefix"]
    action: Literal["forward", "refuse"]
    body: Literal["buffer", "stream"]
    why: str

    def matches(self, path: str) -> bool:
        return path == self.path if self.match == "exact" else path.startswith(self.path)


def load_rules(text: str | None = None) -> tuple[RouteRule, ...]:
    """Parse the route table (the packaged ``routes.toml`` unless ``text`` is given)."""
    if text is None:
        text = resources.files("guard").joinpath("routes.toml").read_text()
    rules = []
    for i, row in enumerate(tomllib.loads(text).get("rule", [])):
        unknown = set(row) - {"path", "match", "action", "body", "why"}
        path = row.get("path")
        if unknown or not isinstance(path, str) or not path.startswith("/"):
            raise ValueError(f"route rule {i}: bad keys or path: {row!r}")
        match, action, body = row.get("match"), row.get("action"), row.get("body", "buffer")
        if match not in {"exact", "prefix"} or action not in {"forward", "refuse"}:
            raise ValueError(f"route rule {i} ({path}): match/action invalid")
        if body not in {"buffer", "stream"} or not row.get("why"):
            raise ValueError(f"route rule {i} ({path}): body invalid or no 'why'")
        rules.append(RouteRule(path, match, action, body, row["why"]))
    return tuple(rules)


def validate_path(path: str) -> bool:
    """True for a canonical absolute path: no empty, '.' or '..' segment, no '\\' or controls.

    The ASGI server has already percent-decoded the path once, so ``%2e%2e`` and ``%2F`` arrive
    here as ``..`` and ``/`` and are judged like their plain spellings.
    """
    if not path.startswith("/") or "\\" in path or "//" in path:
        return False
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in path):
        return False
    return all(segment not in {".", ".."} for segment in path.split("/"))


def validate_query(query: bytes) -> bool:
    """True for a query string that can be forwarded byte for byte: printable ASCII only."""
    return all(0x20 < b < 0x7F for b in query)


class RouteTable:
    def __init__(self, rules: tuple[RouteRule, ...]) -> None:
        self.rules = rules

    def classify(self, path: str) -> RouteRule | None:
        """The first rule matching ``path``, or None."""
        for rule in self.rules:
            if rule.matches(path):
                return rule
        return None


class RouteClassifierMiddleware:
    """Refuse non-canonical paths and routes the table does not forward; tag the rest."""

    def __init__(self, app: ASGIApp, *, table: RouteTable) -> None:
        self.app = app
        self.table = table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        if not validate_path(path) or not validate_query(scope["query_string"]):
            await send_refusal(scope, send, Refusal("path_not_canonical"))
            return
        rule = self.table.classify(path)
        if rule is None or rule.action != "forward":
            await send_refusal(scope, send, Refusal("route_not_classified"))
            return
        if scope["method"] not in FORWARDED_METHODS:
            await send_refusal(scope, send, Refusal("method_not_allowed"))
            return
        scope["guard.route"] = rule
        await self.app(scope, receive, send)
