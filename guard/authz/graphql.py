"""Authorizing MLflow's ``/graphql`` field by field: the reads one GraphQL request needs.

MLflow's handler (``_graphql`` in ``mlflow/server/handlers.py``) reads ``query``, ``variables``
and ``operationName`` from the JSON body, for GET as well as POST, and never from the query
string; a JSON list (a batch) or a JSON string body fails there with a 500, so neither is
served. The document is parsed with graphql-core, MLflow's own parser, and read the way
graphql-core executes it: the operation ``operationName`` picks, variables with their defaults,
aliases ignored, every fragment expanded, ``@skip``/``@include`` not evaluated (the field counts).

A run's ``modelVersions`` are found by searching every model's versions, so the field is read on
every registered model, unless its entries carry their ``name``: then ``graphql_plan`` says where
in the response each such list lands (fields merged by response key, as graphql-core merges them)
and ``filter_model_versions`` removes from the response the versions the caller may not read.

Deny by default: every root field and every nested field whose resolver reaches a resource is in
the tables of ``guard.authz.graphql_fields``; any other field that could select data is refused,
and so is any document the gateway cannot read exactly as graphql-core would (many of those
MLflow rejects anyway).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    ListValueNode,
    NullValueNode,
    ObjectValueNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    StringValueNode,
    ValueNode,
    VariableNode,
    parse,
)

from guard.authz.graphql_fields import NESTED_FIELDS, OBJECT_FIELDS, ROOT_FIELDS, Need, RootField
from guard.edge.requestdata import RequestDataError, canonical_experiment_id, parse_json_body
from guard.errors import Refusal


@dataclass(frozen=True, slots=True)
class ModelVersionsPath:
    """Where one run's ``modelVersions`` list lands in the response, to be filtered by name."""

    # Response keys (aliases applied) from ``data`` down to the list. A list met on the way (the
    # runs of a search) has no key of its own: each of its items is walked on with the next key.
    path: tuple[str, ...]
    name_key: str  # the response key holding each version's ``name`` (its model's name)


_QUERY_TYPE: Final = "Query"
_INTROSPECTION: Final = frozenset({"__schema", "__type"})  # reads the schema, never MLflow data
_GRAPHQL_PARAMETERS: Final = frozenset({"query", "variables", "operationName", "extensions"})
# Selections visited at most; fragments spread in fragments can otherwise fan out exponentially.
_MAX_SELECTIONS: Final = 5000
_MISSING: Final = object()  # a variable neither given nor defaulted
_FILTERABLE: Final = ("MlflowRunExtension", "modelVersions")
_EVERY_MODEL: Final = Need("all:model", "")


def _refuse(reason: str, detail: str) -> RequestDataError:
    return RequestDataError(Refusal(reason, detail))


def graphql_needs(method: str, query_string: bytes, body: bytes) -> list[Need]:
    """Every read the document needs when the response is passed on unfiltered: a run's
    ``modelVersions`` then needs read on every model. Raises like ``graphql_plan``."""
    needs, paths = graphql_plan(method, query_string, body)
    if paths and _EVERY_MODEL not in needs:
        needs.append(_EVERY_MODEL)
    return needs


def graphql_plan(
    method: str, query_string: bytes, body: bytes, max_ids: int | None = None
) -> tuple[list[Need], list[ModelVersionsPath]]:
    """The reads the document needs, and the model-version lists ``filter_model_versions`` must
    filter in its response. Raises guard.edge.requestdata.RequestDataError(Refusal(...)) when the
    request cannot be read or authorized, or names more than ``max_ids`` ids (each a lookup)."""
    if method not in ("GET", "POST"):
        raise _refuse("method_not_allowed", "GraphQL is served for GET and POST only.")
    given = {key for key, _ in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)}
    if given & _GRAPHQL_PARAMETERS:
        # A second copy of the document that MLflow ignores but other readers may not.
        raise _refuse("ambiguous_parameter", "MLflow reads GraphQL from the JSON body only.")
    request = _read_body(body)
    document = _parse(request.get("query"))
    variables = request.get("variables")
    if variables is None:
        variables = {}
    if not isinstance(variables, dict):
        raise _refuse("invalid_request_body", "GraphQL variables must be a JSON object.")
    operation_name = request.get("operationName")
    if operation_name is not None and not isinstance(operation_name, str):
        raise _refuse("invalid_request_body", "operationName must be a string.")
    operation, fragments = _select(document, operation_name)
    needs, paths = _walk(operation.selection_set, fragments, _variables(operation, variables))
    if max_ids is not None and sum(not n.field.startswith("all:") for n in needs) > max_ids:
        raise _refuse("too_many_ids", f"The limit is {max_ids}.")
    return needs, paths


def _read_body(body: bytes) -> dict[str, Any]:
    """The JSON object Flask's ``get_json`` hands MLflow: no second decoding, no batches."""
    try:
        shape = json.loads(body)
    except (ValueError, RecursionError):  # includes UnicodeDecodeError; absurd nesting
        raise _refuse("invalid_request_body", "The body is not valid JSON.") from None
    if isinstance(shape, list):
        raise _refuse("invalid_request_body", "Batched GraphQL requests fail in MLflow.")
    if not isinstance(shape, dict):
        raise _refuse("invalid_request_body", "The body is not a GraphQL request object.")
    return parse_json_body(body) or {}  # read again to refuse duplicate keys like every route


def _parse(query: Any) -> DocumentNode:
    if not isinstance(query, str):
        raise _refuse("invalid_request_body", "The body has no GraphQL query string.")
    try:
        return parse(query)
    except GraphQLError:
        raise _refuse("invalid_request_body", "The GraphQL document does not parse.") from None


def _select(
    document: DocumentNode, operation_name: str | None
) -> tuple[OperationDefinitionNode, dict[str, FragmentDefinitionNode]]:
    """The operation graphql-core would execute, and the fragments it may spread."""
    operations: list[OperationDefinitionNode] = []
    fragments: dict[str, FragmentDefinitionNode] = {}
    for definition in document.definitions:
        if isinstance(definition, FragmentDefinitionNode):
            if definition.name.value in fragments:
                raise _refuse("ambiguous_parameter", "Two fragments share a name.")
            fragments[definition.name.value] = definition
        elif isinstance(definition, OperationDefinitionNode):
            if definition.operation is not OperationType.QUERY:
                kind = definition.operation.value
                raise _refuse("graphql_not_authorizable", f"Only queries are served, not {kind}.")
            operations.append(definition)
        else:
            raise _refuse("invalid_request_body", "The document defines types; it cannot run.")
    names = [op.name.value if op.name else None for op in operations]
    if len(set(names)) != len(names):
        raise _refuse("ambiguous_parameter", "Two operations share a name.")
    if operation_name is None:
        if len(operations) != 1:
            raise _refuse("invalid_request_body", "Exactly one operation, or an operationName.")
        return operations[0], fragments
    # graphql-core compares names exactly: "" names no operation.
    chosen = [op for op, name in zip(operations, names, strict=True) if name == operation_name]
    if not chosen:
        raise _refuse("invalid_request_body", f"No operation is named {operation_name!r}.")
    return chosen[0], fragments


def _variables(operation: OperationDefinitionNode, given: dict[str, Any]) -> dict[str, Any]:
    """Each defined variable as graphql-core sees it: the JSON value (even null), else the
    definition's default, else missing."""
    values: dict[str, Any] = {}
    for definition in operation.variable_definitions:
        name = definition.variable.name.value
        if name in values:
            raise _refuse("ambiguous_parameter", f"The variable ${name} is defined twice.")
        if name in given:
            values[name] = given[name]
        elif definition.default_value is not None:
            values[name] = _value(definition.default_value, {})
        else:
            values[name] = _MISSING
    return values


def _value(node: ValueNode, variables: dict[str, Any]) -> Any:
    """A literal as the JSON value it stands for. Numbers, booleans and enums stay nodes, which
    no id check accepts (graphql-core refuses them for a String too)."""
    if isinstance(node, VariableNode):
        if node.name.value not in variables:
            raise _refuse("invalid_request_body", f"The variable ${node.name.value} is undefined.")
        return variables[node.name.value]
    if isinstance(node, StringValueNode):
        return node.value
    if isinstance(node, NullValueNode):
        return None
    if isinstance(node, ListValueNode):
        return [_value(item, variables) for item in node.values]
    if isinstance(node, ObjectValueNode):
        names = [field.name.value for field in node.fields]
        if len(set(names)) != len(names):
            raise _refuse("ambiguous_parameter", "An input object names a field twice.")
        return {field.name.value: _value(field.value, variables) for field in node.fields}
    return node


def _walk(
    selection_set: SelectionSetNode,
    fragments: dict[str, FragmentDefinitionNode],
    variables: dict[str, Any],
) -> tuple[list[Need], list[ModelVersionsPath]]:
    """The needs of every field the operation selects, through fragments of any depth, and
    where a run's model versions land in the response."""
    needs: dict[Need, None] = {}  # ordered and without repeats
    # Response path (keys from the root) -> the field answering there. graphql-core merges every
    # field with one key in one object, so a path is one place in the response, whatever
    # fragments the fields came from.
    fields: dict[tuple[str, ...], str] = {}
    versions: dict[tuple[str, ...], None] = {}  # paths of a run's modelVersions
    names: dict[tuple[str, ...], list[str]] = {}  # path -> the keys of its `name` fields
    stack: list[tuple[SelectionSetNode, str, tuple[str, ...], frozenset[str]]]
    stack = [(selection_set, _QUERY_TYPE, (), frozenset())]
    budget = _MAX_SELECTIONS
    while stack:
        selections, parent, at, spread = stack.pop()
        for selection in selections.selections:
            budget -= 1
            if budget < 0:
                raise _refuse("invalid_request_body", "The document is too large to authorize.")
            if isinstance(selection, FieldNode):
                name, key = selection.name.value, (selection.alias or selection.name).value
                path = (*at, key)
                if fields.setdefault(path, name) != name:
                    # Validation forbids it; graphql-core would answer with only one of them.
                    raise _refuse("ambiguous_parameter", f"Two fields answer as {key!r}.")
                if (parent, name) == _FILTERABLE:
                    versions[path] = None
                elif name == "name":
                    names.setdefault(at, []).append(key)
                child = _field(selection, parent, variables, needs)
                if child is not None and selection.selection_set is not None:
                    stack.append((selection.selection_set, child, path, spread))
                continue
            inside = spread
            if isinstance(selection, InlineFragmentNode):
                condition, inner = selection.type_condition, selection.selection_set
            elif isinstance(selection, FragmentSpreadNode):
                name = selection.name.value
                if name in spread:
                    raise _refuse("invalid_request_body", f"The fragment {name} spreads itself.")
                if name not in fragments:
                    raise _refuse("invalid_request_body", f"The fragment {name} is undefined.")
                condition, inner = fragments[name].type_condition, fragments[name].selection_set
                inside = spread | {name}
            else:
                raise _refuse("invalid_request_body", "The document has an unknown selection.")
            # MLflow's schema has no interfaces or unions: a fragment fits exactly one type.
            if condition is not None and condition.name.value != parent:
                raise _refuse(
                    "graphql_not_authorizable",
                    f"A fragment on {condition.name.value} is spread in {parent}.",
                )
            stack.append((inner, parent, at, inside))
    paths: list[ModelVersionsPath] = []
    for path in versions:
        if path in names:
            paths.append(ModelVersionsPath(path, min(names[path])))  # any copy of `name` will do
        else:
            needs[_EVERY_MODEL] = None  # nothing in the response says whose version it is
    return list(needs), paths


def _field(
    node: FieldNode, parent: str, variables: dict[str, Any], needs: dict[Need, None]
) -> str | None:
    """Add one field's needs; return the type its selection set is read as (None: not read)."""
    name = node.name.value
    if name == "__typename" or (parent == _QUERY_TYPE and name in _INTROSPECTION):
        return None
    if parent == _QUERY_TYPE:
        root = ROOT_FIELDS.get(name)
        if root is None:
            raise _refuse("graphql_not_authorizable", f"The query field {name!r} is not mapped.")
        needs.update(dict.fromkeys(_root_needs(name, root, node, variables)))
        return root.returns
    children = OBJECT_FIELDS.get(parent, {})
    if node.arguments or name.startswith("__") or (node.selection_set and name not in children):
        raise _refuse("graphql_not_authorizable", f"The field {parent}.{name} is not mapped.")
    crossing, _ = NESTED_FIELDS.get((parent, name), (None, ""))
    if crossing is not None and (parent, name) != _FILTERABLE:  # decided by _walk
        needs[crossing] = None
    return children.get(name)


def _root_needs(
    name: str, root: RootField, node: FieldNode, variables: dict[str, Any]
) -> list[Need]:
    """The needs of one root field, from the ids its ``input`` argument names."""
    arguments: dict[str, Any] = {}
    for argument in node.arguments:
        key = argument.name.value
        if key not in root.arguments:
            raise _refuse("graphql_not_authorizable", f"{name} has no argument {key!r}.")
        if key in arguments:
            raise _refuse("ambiguous_parameter", f"{name} is given {key!r} twice.")
        arguments[key] = _value(argument.value, variables)
    given = arguments.get("input")
    given = {} if given is None or given is _MISSING else given
    if not isinstance(given, dict) or not set(given) <= root.inputs:
        raise _refuse("graphql_not_authorizable", f"The input of {name} is not understood.")
    if not root.ids:
        return [Need(root.need, "")] if root.need else []
    ids = _ids(name, root, given)
    if root.need == "experiment_id":
        if not ids:  # a search over no listed experiment: MLflow finds none; not relied upon
            return [Need("all:experiment", "")] if root.many else [Need(root.need, "0")]
        return [Need(root.need, canonical_experiment_id(value)) for value in ids]
    if not ids or "" in ids:
        raise _refuse("graphql_not_authorizable", f"{name} names no run.")
    return [Need(root.need, value) for value in ids]


def _ids(name: str, root: RootField, given: dict[str, Any]) -> list[str]:
    """The ids an input names, coerced as graphql-core coerces a String or a [String]."""
    present = [given[k] for k in root.ids if given.get(k) is not None and given[k] is not _MISSING]
    if root.many:
        value = present[0] if present else []
        ids = value if isinstance(value, list) else [value]  # one item stands for a list of one
    else:
        ids = present
    if any(not isinstance(value, str) for value in ids):
        raise _refuse("graphql_not_authorizable", f"{name} must name its ids as strings.")
    if not root.many and len(set(ids)) > 1:
        raise _refuse("ambiguous_parameter", f"{name} names two different runs.")
    return ids if root.many else ids[:1]


def filter_model_versions(
    response: bytes, paths: list[ModelVersionsPath], may_read: Callable[[str], bool]
) -> bytes | None:
    """MLflow's GraphQL response without the model versions of models ``may_read`` refuses:
    the body itself when nothing is removed, None when it cannot be read one way."""
    if not paths:
        return response
    try:
        # Not requestdata.parse_json_body: a body that is a JSON string it would decode again.
        document = json.loads(response, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError):  # includes UnicodeDecodeError and duplicate keys
        return None
    if not isinstance(document, dict):
        return None
    data = document.get("data")  # null when the operation failed: nothing to filter
    if data is not None and not isinstance(data, dict):
        return None
    removed = False
    for plan in paths:
        lists = _lists_at(data, plan.path)
        if lists is None:
            return None
        for entries in lists:
            kept = []
            for entry in entries:
                name = entry.get(plan.name_key) if isinstance(entry, dict) else None
                if not isinstance(name, str):
                    return None
                if may_read(name):
                    kept.append(entry)
            removed = removed or len(kept) < len(entries)
            entries[:] = kept
    if not removed:
        return response
    # The compact form Flask's jsonify writes in production, keys in the order MLflow sent.
    end = b"\n" if response.endswith(b"\n") else b""
    return json.dumps(document, separators=(",", ":")).encode() + end


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise ValueError("A JSON key appears twice.")
    return dict(pairs)


def _lists_at(data: Any, path: tuple[str, ...]) -> list[list[Any]] | None:
    """Every list at ``path``, walking on from each item of a list met on the way; a missing or
    null value holds none. None when a value has a shape that does not fit the path."""
    found: list[list[Any]] = []
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if value is None:
            continue
        if depth == len(path):
            if not isinstance(value, list):
                return None
            found.append(value)
        elif isinstance(value, list):
            stack.extend((item, depth) for item in value)
        elif isinstance(value, dict):
            stack.append((value.get(path[depth]), depth + 1))
        else:
            return None
    return found
