"""Reading a request's parameters exactly as MLflow reads them, or refusing.

MLflow (``mlflow/server/handlers.py``) reads GET parameters from the query string and, only when
the query string is empty, from a JSON body; other methods from a JSON body, which PATCH and
DELETE parse whatever the Content-Type. Singular fields take the first query value; protobuf
JSON accepts ``snake_case`` and ``lowerCamelCase``. Where MLflow would pick one of several
readings, the gateway refuses instead: duplicate JSON keys, both spellings of a field, a repeated
singular query parameter. What is authorized is then exactly what MLflow acts on.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any
from urllib.parse import parse_qsl

from guard.errors import Refusal


class RequestDataError(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


@lru_cache(maxsize=1024)  # field names the route table and the code know: a few hundred
def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicate = next(k for k in keys if keys.count(k) > 1)
        raise RequestDataError(
            Refusal("invalid_request_body", f"The JSON key {duplicate!r} appears twice.")
        )
    return dict(pairs)


def parse_json_body(body: bytes) -> dict[str, Any] | None:
    """The body as MLflow sees it: JSON (a JSON string holding JSON is decoded again)."""
    if not body.strip():
        return None
    try:
        value = json.loads(body, object_pairs_hook=_no_duplicates)
        if isinstance(value, str):  # legacy clients double-encode
            value = json.loads(value, object_pairs_hook=_no_duplicates)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: absurd nesting
        raise RequestDataError(
            Refusal("invalid_request_body", "The body is not valid JSON.")
        ) from None
    if not isinstance(value, dict):
        raise RequestDataError(Refusal("invalid_request_body", "The body is not a JSON object."))
    return value


@dataclass(frozen=True)
class RequestData:
    """Parameters of one request, from the source MLflow would read them from."""

    method: str
    query: dict[str, list[str]]
    body: dict[str, Any] | None
    from_query: bool  # True when MLflow reads this request's fields from the query string

    def query_only(self) -> RequestData:
        """The request as a handler that reads only its query string (``request.args``) sees it."""
        return RequestData(self.method, self.query, None, True)

    @classmethod
    def build(cls, method: str, query_string: bytes, body: bytes) -> RequestData:
        query: dict[str, list[str]] = {}
        try:
            # Werkzeug leaves an escape that is not UTF-8 (%ff) as it was, where the default
            # here would read U+FFFD: the gateway would authorize another name than MLflow's.
            pairs = parse_qsl(query_string.decode("ascii"), keep_blank_values=True, errors="strict")
        except UnicodeDecodeError:
            raise RequestDataError(
                Refusal("invalid_request_body", "The query string is not UTF-8 once decoded.")
            ) from None
        for key, value in pairs:
            query.setdefault(key, []).append(value)
        parsed = parse_json_body(body) if body else None
        from_query = method in ("GET", "HEAD") and bool(query_string)
        return cls(method, query, parsed, from_query)

    @classmethod
    def of(cls, scope: MutableMapping[str, Any]) -> RequestData:
        """The request's data, read once per body: authorization's checks and the audit
        records share it. A body rewritten on the way (run attribution) is read again."""
        body = scope.get("guard.body", b"")
        cached = scope.get("guard.data")
        if cached is not None and cached[0] is body:
            data: RequestData = cached[1]
            return data
        otlp = getattr(scope.get("guard.route"), "path", None) == "/v1/traces"
        # OTLP spans are no MLflow JSON message: guard/authz/otlp.py reads them.
        data = cls.build(scope["method"], scope["query_string"], b"" if otlp else body)
        scope["guard.data"] = (body, data)
        return data

    def values(self, field: str) -> list[Any]:
        """Every value MLflow would see for ``field`` (either spelling); refuses ambiguity."""
        names = [field] if _camel(field) == field else [field, _camel(field)]
        if self.from_query:
            found = [(n, self.query[n]) for n in names if n in self.query]
            if len(found) > 1:
                raise RequestDataError(
                    Refusal("ambiguous_parameter", f"Both {names[0]!r} and {names[1]!r} given.")
                )
            return list(found[0][1]) if found else []
        if self.body is None:
            return []
        found_body = [(n, self.body[n]) for n in names if n in self.body]
        if len(found_body) > 1:
            raise RequestDataError(
                Refusal("ambiguous_parameter", f"Both {names[0]!r} and {names[1]!r} given.")
            )
        if not found_body:
            return []
        value = found_body[0][1]
        return list(value) if isinstance(value, list) else [value]

    def check_id_count(self, fields: Iterable[str], limit: int) -> None:
        """Refuse (``too_many_ids``) a request whose lists of ids ``fields`` (either spelling,
        read from where MLflow reads them) hold more than ``limit`` values in all. Called before
        anything is looked up: each id is a lookup."""
        count = 0
        for field in fields:
            count += len(self.values(field))
            if count > limit:
                raise RequestDataError(Refusal("too_many_ids", f"The limit is {limit}."))

    def single(self, field: str) -> Any | None:
        """One value of a singular field; a repeated query parameter is refused."""
        values = self.values(field)
        if len(values) > 1 and self.from_query:
            raise RequestDataError(
                Refusal("ambiguous_parameter", f"The parameter {field!r} is repeated.")
            )
        return values[0] if values else None


def member(node: dict[str, Any], name: str) -> Any:
    """``node[name]`` in either protobuf JSON spelling, None when absent; both is ambiguous."""
    present = [n for n in dict.fromkeys((name, _camel(name))) if n in node]
    if len(present) > 1:
        raise RequestDataError(
            Refusal("ambiguous_parameter", f"Both {present[0]!r} and {present[1]!r} given.")
        )
    return node[present[0]] if present else None


def canonical_experiment_id(value: Any) -> str:
    """Experiment ids as MLflow's SQL store reads them: ``int()``, so ``01``, ``+1`` and
    `` 1`` all name experiment 1; an empty id names experiment 0 (the default)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise RequestDataError(Refusal("invalid_request_body", "An experiment id is malformed."))
    text = str(value)
    if not text.strip():
        return "0"
    try:
        return str(int(text))
    except ValueError:
        raise RequestDataError(
            Refusal("invalid_request_body", f"{text!r} is not an experiment id.")
        ) from None
