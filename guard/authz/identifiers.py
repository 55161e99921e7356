"""The ids a request names, read exactly as MLflow reads them, before anything is looked up.

The route table says where a route's id is (``id_from``: a path parameter, a query or body field
in either spelling, a nested body path, a header); this reads every value given there and
refuses what MLflow might read otherwise (two spellings that disagree, a repeated singular
parameter or header, a nested path that is not made of the objects and lists it should be).
``guard.authz.resolve`` turns the values into the resources policies speak of.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from guard.authz.routes import Route
from guard.edge.requestdata import RequestData, RequestDataError, member
from guard.errors import Refusal

_HEADER_PREFIX: Final = "x-mlflow-"  # MLflow's headers are x-mlflow-<field>
# Routes whose handler reads an empty id as "no filter" (``request_message.experiment_id or
# None``, ``elif request_message.experiment_id``) and then acts on every experiment: there an
# empty value names nothing (elsewhere an empty experiment id is the default experiment, 0).
EMPTY_MEANS_EVERY: Final = {
    "experiment_id": ("/3.0/mlflow/issues/search", "/3.0/mlflow/scorers/list"),
}

Headers = Mapping[str, str | list[str]]


class Unresolved(Exception):
    """The resource cannot be determined; carries the refusal to send."""

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


def named(
    route: Route, params: dict[str, str], data: RequestData, headers: Headers
) -> tuple[str, list[Any]]:
    """The id field the route reads and every value the request gives it, exactly as
    MLflow reads them (the field is named as the route table names it)."""
    spec = route.id_from
    if spec == "none":
        raise Unresolved(Refusal("resource_unresolved", "This route names no resource."))
    source, _, field_spec = spec.partition(":")
    if source == "artifact_path":
        return "path", [params.get("artifact_path") or data.single("path") or ""]
    # F+G is a composite key: F names the resource (the experiment), G a thing inside it.
    key = field_spec.split("+", 1)[0]
    if "." in key:
        return key.rsplit(".", 1)[1], _nested(source, key, data)
    if source == "header":
        field = key.lower().removeprefix(_HEADER_PREFIX).replace("-", "_")
        return field, _header_values(headers, key)
    fields = key.removesuffix("[]").split("|")
    values = field_values(source, fields, key.endswith("[]"), params, data)
    # F|G names the field given: G may be another kind of id (run_id|model_id), looked up as such.
    given = next((f for f in fields if values and _given(source, f, params, data)), fields[0])
    if values and not any(values) and route.path.endswith(EMPTY_MEANS_EVERY.get(given, ())):
        return given, []  # names nothing: refused as such, never read as experiment 0
    return given, values


def _given(source: str, field: str, params: dict[str, str], data: RequestData) -> bool:
    if source == "path":
        return field in params
    return bool(field_values(source, [field], True, params, data))


def sent(route: Route, params: dict[str, str], data: RequestData, headers: Headers) -> str:
    """What the request names, in the caller's own words, for a refusal's message."""
    try:
        field, values = named(route, params, data, headers)
    except (Unresolved, RequestDataError):
        return "what this request names"
    return describe(field, values)


def field_values(
    source: str,
    fields: list[str],
    is_list: bool,
    params: dict[str, str],
    data: RequestData,
) -> list[Any]:
    found: list[tuple[str, list[Any]]] = []
    for field in fields:
        if source == "path":
            values: list[Any] = [params[field]] if field in params else []
        elif source == "query" and data.method not in ("GET", "HEAD"):
            # A query field on a POST (upload-artifact): that handler reads the query only.
            values = data.query_only().values(field)
        else:
            values = data.values(field)
        if values:
            found.append((field, values))
    # The MLflow client sends run_id and the legacy run_uuid with the same value; two
    # different values leave open which one MLflow acts on.
    if len(found) > 1 and any(values != found[0][1] for _, values in found[1:]):
        raise RequestDataError(
            Refusal("ambiguous_parameter", f"Both {found[0][0]!r} and {found[1][0]!r} given.")
        )
    if not found:
        return []
    if len(found[0][1]) > 1 and not is_list:
        raise RequestDataError(
            Refusal("ambiguous_parameter", f"The parameter {found[0][0]!r} is repeated.")
        )
    return found[0][1]


def describe(field: str, values: list[Any], limit: int = 120) -> str:
    """``field 'value'`` (or a list of values), shortened: a refusal's words for an id."""
    if not values:
        return f"no {field}"
    shown = repr(values[0]) if len(values) == 1 else repr(values)
    if len(shown) > limit:
        shown = shown[:limit] + "..."
    return f"{field} {shown}"


def _nested(source: str, path: str, data: RequestData) -> list[str]:
    """Every string at a nested body path (``locations[].mlflow_experiment.experiment_id``),
    read as MLflow's protobuf JSON parser reads it or refused where it might read otherwise.

    Each step takes either spelling (both is ambiguous); ``[]`` steps must be lists and the
    others objects, since the parser would otherwise read a partial message and MLflow act on
    it anyway. Absent or null means unset: at the top the request names nothing, further down
    an element (a trace location that is no MLflow experiment, say) names no resource.
    """
    if source != "body" or data.from_query or data.body is None:
        return []
    nodes: list[Any] = [data.body]
    for depth, segment in enumerate(path.split(".")):
        name, is_list = segment.removesuffix("[]"), segment.endswith("[]")
        found: list[Any] = []
        for node in nodes:
            if not isinstance(node, dict):
                raise _malformed(f"{path!r} does not lead through JSON objects.")
            value = member(node, name)
            if value is None:
                if depth == 0:
                    return []
                raise Unresolved(Refusal("resource_unresolved", f"An element names no {path}."))
            if isinstance(value, list) != is_list:
                raise _malformed(f"{name!r} must {'' if is_list else 'not '}be a list.")
            found.extend(value if is_list else [value])
        nodes = found
    if not all(isinstance(node, str) for node in nodes):  # protobuf's string fields
        raise _malformed(f"Every {path!r} must be a string.")
    return nodes


def _header_values(headers: Headers, name: str) -> list[str]:
    """Every value of a request header. MLflow (Starlette) reads the first of a repeated one,
    so repeats are ambiguous; a single string per name may have folded them away already."""
    value = headers.get(name.lower())
    if value is None:
        return []
    if isinstance(value, str):
        raise Unresolved(Refusal("resource_unresolved", f"{name} may be repeated."))
    if len(value) > 1:
        raise RequestDataError(Refusal("ambiguous_parameter", f"The header {name} is repeated."))
    return list(value)


def _malformed(message: str) -> RequestDataError:
    return RequestDataError(Refusal("invalid_request_body", message))


def as_id(value: Any) -> str:
    """An id as the request gives it: a JSON string or integer, never a boolean."""
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise RequestDataError(Refusal("invalid_request_body", "An id is malformed."))
    return str(value)
