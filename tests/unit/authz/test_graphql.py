"""GraphQL authorization: every field a document reaches, however it is spelled, is a need.

Three kinds of check: table-driven cases (including the ways around a field check: aliases,
fragments, second operations, variables), the mapping tables against MLflow's real schema, and a
differential run of every case through MLflow's executor, recording the resolvers it would call.
Then a run's model versions: where the plan says they land in the response, and the filter that
removes the unreadable ones, also on responses MLflow's executor and Flask really produce.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

import flask
import graphql
import mlflow
import pytest
from graphene.types.resolver import dict_or_attr_resolver
from graphql import GraphQLInputObjectType, GraphQLList, GraphQLObjectType, get_named_type
from mlflow.server.graphql.graphql_no_batching import check_query_safety
from mlflow.server.graphql.graphql_schema_extensions import schema

from guard.authz.graphql import (
    ModelVersionsPath,
    filter_model_versions,
    graphql_needs,
    graphql_plan,
)
from guard.authz.graphql_fields import NESTED_FIELDS, OBJECT_FIELDS, ROOT_FIELDS, Need
from guard.edge.requestdata import RequestDataError, canonical_experiment_id

RUN = "query($d: MlflowGetRunInput) { mlflowGetRun(input: $d) { run { info { runId } } } }"
MODELS = Need("all:model", "")
EVERY_EXPERIMENT = Need("all:experiment", "")


def run(value: str) -> Need:
    return Need("run_id", value)


def experiment(value: str) -> Need:
    return Need("experiment_id", value)


def get_run(run_id: str, rest: str = "run { info { runId } }") -> str:
    return f'mlflowGetRun(input: {{runId: "{run_id}"}}) {{ {rest} }}'


def body(query: Any, variables: Any = None, operation: Any = None) -> dict[str, Any]:
    request: dict[str, Any] = {"query": query}
    if variables is not None:
        request["variables"] = variables
    if operation is not None:
        request["operationName"] = operation
    return request


def needs_of(request: dict[str, Any], method: str = "POST") -> list[Need]:
    return graphql_needs(method, b"", json.dumps(request).encode())


def refusal(method: str, query_string: bytes, raw: bytes) -> str:
    with pytest.raises(RequestDataError) as info:
        graphql_needs(method, query_string, raw)
    return info.value.refusal.reason


# (id, request body, expected needs in order, or the refusal reason)
CASES: list[tuple[str, dict[str, Any], list[Need] | str]] = [
    ("literal", body("{ " + get_run("r1") + " }"), [run("r1")]),
    ("variable", body(RUN, {"d": {"runId": "r1"}}), [run("r1")]),
    ("run uuid", body(RUN, {"d": {"runUuid": "r1"}}), [run("r1")]),
    ("run id and uuid agree", body(RUN, {"d": {"runId": "r1", "runUuid": "r1"}}), [run("r1")]),
    (
        "variable inside an input object",
        body("query($r: String) { mlflowGetRun(input: {runId: $r}) { run { info { runId } } } }",
             {"r": "r2"}),
        [run("r2")],
    ),
    (
        "variable inside a list",
        body('query($e: String) { mlflowSearchRuns(input: {experimentIds: ["1", $e]}) '
             "{ runs { info { runId } } } }", {"e": "2"}),
        [experiment("1"), experiment("2")],
    ),
    (
        "list variable, ids read as MLflow's store reads them",
        body("query($i: [String]) { mlflowSearchRuns(input: {experimentIds: $i}) "
             "{ runs { info { runId } } } }", {"i": ["3", "04", " 5"]}),
        [experiment("3"), experiment("4"), experiment("5")],
    ),
    (
        "one string stands for a list of one",
        body('{ mlflowSearchRuns(input: {experimentIds: "5"}) { runs { info { runId } } } }'),
        [experiment("5")],
    ),
    (
        "one string variable stands for a list of one",
        body("query($i: [String]) { mlflowSearchRuns(input: {experimentIds: $i}) "
             "{ nextPageToken } }", {"i": "6"}),
        [experiment("6")],
    ),
    (
        "default of the variable definition",
        body('query($d: MlflowGetRunInput = {runId: "dflt"}) { mlflowGetRun(input: $d) '
             "{ run { info { runId } } } }"),
        [run("dflt")],
    ),
    (
        "a given variable overrides its default",
        body('query($d: MlflowGetRunInput = {runId: "dflt"}) { mlflowGetRun(input: $d) '
             "{ run { info { runId } } } }", {"d": {"runId": "given"}}),
        [run("given")],
    ),
    (
        "a given null overrides the default and names no run",
        body('query($d: MlflowGetRunInput = {runId: "dflt"}) { mlflowGetRun(input: $d) '
             "{ run { info { runId } } } }", {"d": None}),
        "graphql_not_authorizable",
    ),
    (
        "variables of another operation do not leak in",
        body('query A($r: String = "a") { test(inputString: $r) { output } } '
             "query B($r: String) { mlflowGetRun(input: {runId: $r}) { apiError { code } } }",
             operation="B"),
        "graphql_not_authorizable",
    ),
    ("missing variable", body(RUN), "graphql_not_authorizable"),
    ("missing variable, non-null", body(RUN.replace("Input)", "Input!)")),
     "graphql_not_authorizable"),
    (
        "missing variable inside a list",
        body("query($e: String) { mlflowSearchRuns(input: {experimentIds: [$e]}) "
             "{ nextPageToken } }"),
        "graphql_not_authorizable",
    ),
    (
        "undefined variable",
        body("{ mlflowGetRun(input: {runId: $r}) { apiError { code } } }", {"r": "r1"}),
        "invalid_request_body",
    ),
    (
        "aliases are read as the fields they name",
        body("{ a: " + get_run("r1") + " b: " + get_run("r2") + " }"),
        [run("r1"), run("r2")],
    ),
    (
        "an alias hiding a root field behind another's name",
        body("{ mlflowGetExperiment: " + get_run("r1") + " }"),
        [run("r1")],
    ),
    (
        "an alias hiding a crossing field",
        body("{ " + get_run("r1", "run { info: modelVersions { name } }") + " }"),
        [run("r1"), MODELS],
    ),
    (
        "a named fragment hiding a root field",
        body("query { ...F } fragment F on Query { " + get_run("r1") + " }"),
        [run("r1")],
    ),
    (
        "a named fragment hiding a crossing field",
        body("{ " + get_run("r1", "run { ...R }") + " } "
             "fragment R on MlflowRunExtension { modelVersions { name } }"),
        [run("r1"), MODELS],
    ),
    (
        "an inline fragment hiding a crossing field",
        body("{ " + get_run("r1", "run { ... on MlflowRunExtension { modelVersions { name } } }")
             + " }"),
        [run("r1"), MODELS],
    ),
    (
        "an inline fragment without a type",
        body("{ ... { " + get_run("r1", "run { ... { modelVersions { name } } }") + " } }"),
        [run("r1"), MODELS],
    ),
    (
        "fragments nested three deep, with the operation's variables",
        body("query($r: String) { ...A } fragment A on Query { ...B } fragment B on Query { ...C }"
             " fragment C on Query { mlflowGetRun(input: {runId: $r}) { run { ...R } } }"
             " fragment R on MlflowRunExtension { experiment { name } modelVersions { name } }",
             {"r": "r3"}),
        [run("r3"), MODELS],
    ),
    (
        "the same fragment spread twice",
        body("query { ...F ... { ...F } } fragment F on Query { " + get_run("r1") + " }"),
        [run("r1")],
    ),
    # MLflow's schema declares only @component, so @skip and @include fail validation there.
    (
        "@skip is not evaluated: the field is needed",
        body("{ " + get_run("r1").replace(") {", ") @skip(if: true) {", 1) + " }"),
        [run("r1")],
    ),
    (
        "@include with a variable is not evaluated",
        body("query($no: Boolean = false) { "
             + get_run("r1", "run { modelVersions @include(if: $no) { name } }") + " }"),
        [run("r1"), MODELS],
    ),
    (
        "operationName picks the operation",
        body('query A { mlflowGetExperiment(input: {experimentId: "1"}) { experiment { name } } }'
             " query B { " + get_run("r1") + " }", operation="B"),
        [run("r1")],
    ),
    (
        "operationName picks the other one",
        body('query A { mlflowGetExperiment(input: {experimentId: "1"}) { experiment { name } } }'
             " query B { " + get_run("r1") + " }", operation="A"),
        [experiment("1")],
    ),
    (
        "several operations and none named",
        body("query A { __typename } query B { " + get_run("r1") + " }"),
        "invalid_request_body",
    ),
    ("operationName names none", body("query A { __typename }", operation="B"),
     "invalid_request_body"),
    ("operationName empty", body("query A { __typename }", operation=""), "invalid_request_body"),
    ("operationName not a string", body("query A { __typename }", operation=1),
     "invalid_request_body"),
    ("two operations share a name",
     body("query A { __typename } query A { " + get_run("r1") + " }", operation="A"),
     "ambiguous_parameter"),
    (
        "a mutation is refused (MLflow would run this search)",
        body('mutation { mlflowSearchRuns(input: {experimentIds: ["1"]}) { nextPageToken } }'),
        "graphql_not_authorizable",
    ),
    (
        "a mutation is refused even when another operation is picked",
        body("query A { __typename } mutation B { testMutation(inputString: \"x\") { output } }",
             operation="A"),
        "graphql_not_authorizable",
    ),
    ("a subscription is refused", body("subscription { __typename }"),
     "graphql_not_authorizable"),
    (
        "a mutation's field in a query",
        body('{ mlflowSearchDatasets(input: {experimentIds: ["1"]}) { apiError { code } } }'),
        "graphql_not_authorizable",
    ),
    ("an unknown root field", body("{ mlflowGetRuns { apiError { code } } }"),
     "graphql_not_authorizable"),
    ("an unknown nested object", body("{ " + get_run("r1", "run { secret { x } }") + " }"),
     "graphql_not_authorizable"),
    ("a nested field with arguments",
     body("{ " + get_run("r1", "run { info(all: true) { runId } }") + " }"),
     "graphql_not_authorizable"),
    ("introspection below the root",
     body("{ " + get_run("r1", "run { __schema { types } }") + " }"), "graphql_not_authorizable"),
    (
        "a fragment on another type",
        body("{ " + get_run("r1", "run { ... on Query { " + get_run("r2") + " } }") + " }"),
        "graphql_not_authorizable",
    ),
    (
        "a named fragment on another type",
        body("{ " + get_run("r1", "run { ...F }") + " } fragment F on Query { "
             + get_run("r2") + " }"),
        "graphql_not_authorizable",
    ),
    ("a fragment cycle",
     body("query { ...A } fragment A on Query { ...B } fragment B on Query { ...A }"),
     "invalid_request_body"),
    ("an undefined fragment", body("query { ...A }"), "invalid_request_body"),
    ("fragments and no operation", body("fragment A on Query { " + get_run("r1") + " }"),
     "invalid_request_body"),
    ("an alias spelled like introspection", body("{ __typename: " + get_run("r1") + " }"),
     [run("r1")]),
    ("two fragments share a name",
     body("query { ...A } fragment A on Query { __typename } fragment A on Query { "
          + get_run("r1") + " }"),
     "ambiguous_parameter"),
    ("an int literal id", body("{ mlflowGetRun(input: {runId: 5}) { apiError { code } } }"),
     "graphql_not_authorizable"),
    ("an int literal experiment id",
     body("{ mlflowGetExperiment(input: {experimentId: 1}) { experiment { name } } }"),
     "graphql_not_authorizable"),
    ("an enum literal id", body("{ mlflowGetRun(input: {runId: R1}) { apiError { code } } }"),
     "graphql_not_authorizable"),
    ("an int in an id list",
     body('{ mlflowSearchRuns(input: {experimentIds: ["1", 2]}) { nextPageToken } }'),
     "graphql_not_authorizable"),
    ("a null in an id list",
     body('{ mlflowSearchRuns(input: {experimentIds: ["1", null]}) { nextPageToken } }'),
     "graphql_not_authorizable"),
    ("an int variable id", body(RUN, {"d": {"runId": 5}}), "graphql_not_authorizable"),
    ("a list for a single id", body(RUN, {"d": {"runId": ["a", "b"]}}),
     "graphql_not_authorizable"),
    ("an object for a single id", body(RUN, {"d": {"runId": {"runId": "a"}}}),
     "graphql_not_authorizable"),
    ("an object in an id list variable",
     body("query($i: [String]) { mlflowSearchRuns(input: {experimentIds: $i}) { nextPageToken } }",
          {"i": [{"a": "1"}]}),
     "graphql_not_authorizable"),
    ("run id and uuid differ", body(RUN, {"d": {"runId": "a", "runUuid": "b"}}),
     "ambiguous_parameter"),
    ("a snake_case input field", body(RUN, {"d": {"run_id": "a"}}), "graphql_not_authorizable"),
    ("an input that is not an object", body(RUN, {"d": "r1"}), "graphql_not_authorizable"),
    ("an input with no id", body(RUN, {"d": {}}), "graphql_not_authorizable"),
    ("an empty run id", body(RUN, {"d": {"runId": ""}}), "graphql_not_authorizable"),
    ("no input at all", body("{ mlflowGetRun { apiError { code } } }"),
     "graphql_not_authorizable"),
    ("an unknown argument",
     body('{ mlflowGetRun(input: {runId: "a"}, as: "admin") { apiError { code } } }'),
     "graphql_not_authorizable"),
    ("the input given twice",
     body('{ mlflowGetRun(input: {runId: "a"}, input: {runId: "b"}) { apiError { code } } }'),
     "ambiguous_parameter"),
    ("an input field given twice",
     body('{ mlflowGetRun(input: {runId: "a", runId: "b"}) { apiError { code } } }'),
     "ambiguous_parameter"),
    ("a variable defined twice",
     body("query($d: MlflowGetRunInput, $d: MlflowGetRunInput) "
          "{ mlflowGetRun(input: $d) { apiError { code } } }", {"d": {"runId": "a"}}),
     "ambiguous_parameter"),
    ("variables not an object", body(RUN, '{"d": {"runId": "a"}}'), "invalid_request_body"),
    ("variables a list", body(RUN, [{"runId": "a"}]), "invalid_request_body"),
    ("no query", {"variables": {}}, "invalid_request_body"),
    ("a query that is not a string", body({"kind": "Document"}), "invalid_request_body"),
    ("a syntax error", body("{ mlflowGetRun("), "invalid_request_body"),
    ("type definitions", body("type Query { x: String } { __typename }"),
     "invalid_request_body"),
    ("a non-numeric experiment id",
     body('{ mlflowGetExperiment(input: {experimentId: "abc"}) { experiment { name } } }'),
     "invalid_request_body"),
    (
        "experiment ids as MLflow's store reads them",
        body('{ a: mlflowGetExperiment(input: {experimentId: "007"}) { experiment { name } } '
             'b: mlflowGetExperiment(input: {experimentId: ""}) { experiment { name } } '
             "c: mlflowGetExperiment(input: {}) { experiment { name } } }"),
        [experiment("7"), experiment("0")],
    ),
    ("a search over model versions",
     body('{ mlflowSearchModelVersions(input: {filter: "name=\'m\'"}) '
          "{ modelVersions { name runId } } }"),
     [MODELS]),
    ("a search over runs of no listed experiment",
     body("{ a: mlflowSearchRuns(input: {experimentIds: []}) { nextPageToken } "
          "b: mlflowSearchRuns(input: {}) { nextPageToken } }"),
     [EVERY_EXPERIMENT]),
    ("runs and their model versions",
     body('{ mlflowSearchRuns(input: {experimentIds: ["1"]}) '
          "{ runs { experiment { name } modelVersions { name } } } }"),
     [experiment("1"), MODELS]),
    ("metric history of listed runs",
     body('{ mlflowGetMetricHistoryBulkInterval(input: {runIds: ["a", "b"], metricKey: "m"}) '
          "{ metrics { runId value } } }"),
     [run("a"), run("b")]),
    ("metric history of no run",
     body("{ mlflowGetMetricHistoryBulkInterval(input: {runIds: []}) { metrics { value } } }"),
     "graphql_not_authorizable"),
    ("artifacts of a run",
     body('{ mlflowListArtifacts(input: {runUuid: "a", path: "x"}) { files { path } } }'),
     [run("a")]),
    ("the same run twice is one need", body("{ a: " + get_run("r1") + " b: " + get_run("r1")
                                             + " }"), [run("r1")]),
    ("introspection reads no MLflow data",
     body('{ __typename __schema { types { name } } __type(name: "MlflowRun") { name } }'), []),
    ("the echo field reads nothing", body('{ test(inputString: "x") { output __typename } }'), []),
    (
        "a document of the UI's shape",
        body('query Q($i: MlflowGetExperimentInput!) @component(name: "MLflow.X") '
             "{ mlflowGetExperiment(input: $i) { __typename experiment { tags { key } } "
             "apiError { code } } }", {"i": {"experimentId": "1"}}, "Q"),
        [experiment("1")],
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("request_body", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_cases(request_body: dict[str, Any], expected: list[Need] | str) -> None:
    if isinstance(expected, str):
        assert refusal("POST", b"", json.dumps(request_body).encode()) == expected
    else:
        assert needs_of(request_body) == expected


def test_get_reads_the_body_as_post_does() -> None:
    request = body(RUN, {"d": {"runId": "r1"}})
    assert needs_of(request, "GET") == needs_of(request, "POST") == [run("r1")]


@pytest.mark.parametrize(
    ("method", "query_string", "raw", "reason"),
    [
        # MLflow ignores the query string (GET with only a query string is a 500 there); a
        # document in it is a second reading the gateway will not choose between.
        ("GET", b"query=%7B__typename%7D", b'{"query": "{ __typename }"}', "ambiguous_parameter"),
        ("GET", b"%71uery=x", b'{"query": "{ __typename }"}', "ambiguous_parameter"),
        ("GET", b"variables=%7B%7D", b'{"query": "{ __typename }"}', "ambiguous_parameter"),
        ("GET", b"operationName=A", b'{"query": "{ __typename }"}', "ambiguous_parameter"),
        ("GET", b"query=%7B__typename%7D", b"", "ambiguous_parameter"),
        ("GET", b"", b"", "invalid_request_body"),
        ("PUT", b"", b'{"query": "{ __typename }"}', "method_not_allowed"),
        # A batch and a double-encoded body fail with a 500 in MLflow; neither is served.
        ("POST", b"", b'[{"query": "{ __typename }"}]', "invalid_request_body"),
        ("POST", b"", b"[]", "invalid_request_body"),
        ("POST", b"", json.dumps(json.dumps({"query": "{ __typename }"})).encode(),
         "invalid_request_body"),
        ("POST", b"", b"{", "invalid_request_body"),
        ("POST", b"", b"\xff", "invalid_request_body"),
        ("POST", b"", b"null", "invalid_request_body"),
        # Flask keeps the last of two keys; the gateway reads neither.
        ("POST", b"", b'{"query": "{ test(inputString: \\"x\\") { output } }", '
                      b'"query": "{ mlflowGetRuns { x } }"}', "invalid_request_body"),
        ("POST", b"", b'{"query": "query($d: MlflowGetRunInput) { mlflowGetRun(input: $d) '
                      b'{ apiError { code } } }", "variables": {"d": {"runId": "a", '
                      b'"runId": "b"}}}', "invalid_request_body"),
    ],
)  # fmt: skip
def test_requests_that_cannot_be_read_one_way(
    method: str, query_string: bytes, raw: bytes, reason: str
) -> None:
    assert refusal(method, query_string, raw) == reason


def test_an_unrelated_query_string_is_ignored_as_mlflow_ignores_it() -> None:
    raw = json.dumps(body(RUN, {"d": {"runId": "r1"}})).encode()
    assert graphql_needs("GET", b"runId=other", raw) == [run("r1")]


def test_fragments_that_fan_out_are_refused_not_expanded() -> None:
    fragments = " ".join(f"fragment F{i} on Query {{ ...F{i + 1} ...F{i + 1} }}" for i in range(30))
    document = "query { ...F0 } " + fragments + " fragment F30 on Query { __typename }"
    assert refusal("POST", b"", json.dumps(body(document)).encode()) == "invalid_request_body"


# --- the documents the MLflow UI sends --------------------------------------------------------

UI_BUILD = Path(mlflow.__file__).parent / "server" / "js" / "build" / "static" / "js"
# The variables each UI query is sent with (from the same bundle), and what it then needs.
UI_QUERIES: dict[str, tuple[dict[str, Any], list[Need]]] = {
    "GetRun": ({"data": {"runId": "r1"}}, [run("r1"), MODELS]),
    "SearchRuns": (
        {"data": {"filter": "attributes.run_id = 'r1'", "experimentIds": ["1"]}},
        [experiment("1"), MODELS],
    ),
    "GetMetricHistoryBulkInterval": (
        {"data": {"runIds": ["r1", "r2"], "metricKey": "loss", "startStep": None,
                  "endStep": None, "maxResults": 320}},
        [run("r1"), run("r2")],
    ),
    "MlflowGetExperimentQuery": ({"input": {"experimentId": "1"}}, [experiment("1")]),
}  # fmt: skip


def ui_documents() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in sorted(UI_BUILD.glob("*.js")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for match in re.finditer(r"`\s*((?:query|mutation|subscription)\s+(\w+)[^`]*)`", text):
            found[match.group(2)] = match.group(1)
    return found


def test_the_ui_sends_exactly_the_documents_listed_here() -> None:
    assert set(ui_documents()) == set(UI_QUERIES)


@pytest.mark.parametrize("name", sorted(UI_QUERIES))
def test_ui_documents(name: str) -> None:
    document = ui_documents()[name]
    variables, expected = UI_QUERIES[name]
    assert not graphql.validate(schema.graphql_schema, graphql.parse(document))
    assert needs_of(body(document, variables, name)) == expected
    # Apollo adds __typename to every selection set.
    with_typenames = document.replace("{", "{ __typename ")
    assert needs_of(body(with_typenames, variables, name)) == expected


# --- the tables against MLflow's schema ---------------------------------------------------------


def has_own_resolver(field: graphql.GraphQLField) -> bool:
    resolve = field.resolve
    return not (isinstance(resolve, functools.partial) and resolve.func is dict_or_attr_resolver)


def reachable_types() -> dict[str, GraphQLObjectType]:
    query = schema.graphql_schema.query_type
    assert query is not None
    seen: dict[str, GraphQLObjectType] = {}
    todo = [get_named_type(f.type) for f in query.fields.values()]
    while todo:
        named = todo.pop()
        assert isinstance(
            named, GraphQLObjectType | graphql.GraphQLScalarType | graphql.GraphQLEnumType
        ), named  # no interfaces or unions
        if isinstance(named, GraphQLObjectType) and named.name not in seen:
            seen[named.name] = named
            todo.extend(get_named_type(f.type) for f in named.fields.values())
    return seen


def test_every_query_field_is_in_the_table() -> None:
    query = schema.graphql_schema.query_type
    assert query is not None and query.name == "Query"
    assert set(query.fields) == set(ROOT_FIELDS)
    for name, field in query.fields.items():
        root = ROOT_FIELDS[name]
        assert get_named_type(field.type).name == root.returns, name
        assert set(field.args) == root.arguments, name
        if "input" not in field.args:
            continue
        input_type = get_named_type(field.args["input"].type)
        assert isinstance(input_type, GraphQLInputObjectType)
        assert set(input_type.fields) == root.inputs, name
        for id_field in root.ids:
            spec = input_type.fields[id_field]
            assert spec.default_value is graphql.Undefined, (name, id_field)
            is_list = isinstance(spec.type, GraphQLList)
            assert is_list == root.many, (name, id_field)
            assert get_named_type(spec.type) is graphql.GraphQLString, (name, id_field)


def test_every_reachable_object_field_is_in_the_table() -> None:
    edges = {
        type_name: {
            field_name: get_named_type(field.type).name
            for field_name, field in object_type.fields.items()
            if isinstance(get_named_type(field.type), GraphQLObjectType)
        }
        for type_name, object_type in reachable_types().items()
    }
    assert {k: v for k, v in edges.items() if v} == OBJECT_FIELDS


def test_every_nested_resolver_is_in_the_table() -> None:
    """A nested field with its own resolver may load another resource: each must be judged."""
    own = {
        (type_name, field_name)
        for type_name, object_type in reachable_types().items()
        for field_name, field in object_type.fields.items()
        if has_own_resolver(field)
    }
    assert own == set(NESTED_FIELDS)
    for object_type in reachable_types().values():
        assert all(not field.args for field in object_type.fields.values()), object_type.name


# --- differential: what MLflow's executor would resolve is covered by the needs -----------------


class Recorder:
    """Graphene middleware recording each resolver with its own code, and standing in for it."""

    STAND_IN: dict[str, Any] = {
        "mlflowGetRun": {"run": {}},
        "mlflowSearchRuns": {"runs": [{}, {}]},
        "mlflowSearchModelVersions": {"model_versions": [{}]},
    }

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def resolve(self, next_: Any, root: Any, info: Any, **args: Any) -> Any:
        key = (info.parent_type.name, info.field_name)
        echo = info.field_name in ("test", "testMutation")
        if info.parent_type.name in ("Query", "Mutation") and not echo:
            self.calls.append((*key, args.get("input")))
            return self.STAND_IN.get(info.field_name, {})
        if key in NESTED_FIELDS:
            self.calls.append((*key, None))
            return [] if info.field_name == "modelVersions" else None
        return next_(root, info, **args)


def mlflow_needs(request: dict[str, Any]) -> set[Need] | None:
    """The needs of what MLflow's ``_graphql`` would run for this body (None: it runs nothing)."""
    document = graphql.parse(request["query"])
    if check_query_safety(document) is not None or graphql.validate(
        schema.graphql_schema, document
    ):
        return None
    recorder = Recorder()
    schema.execute(
        request["query"],
        variables=request.get("variables"),
        operation_name=request.get("operationName"),
        middleware=[recorder],
    )
    needs: set[Need] = set()
    for _, field, given in recorder.calls:
        if field == "modelVersions" or field == "mlflowSearchModelVersions":
            needs.add(MODELS)
        elif given is None:
            continue  # the resolver fails before it reads anything
        elif field == "mlflowGetExperiment":
            needs.add(experiment(canonical_experiment_id(given.experiment_id or "")))
        elif field in ("mlflowGetRun", "mlflowListArtifacts"):
            needs.add(run(given.run_id or given.run_uuid or ""))
        elif field == "mlflowGetMetricHistoryBulkInterval":
            needs.update(run(r) for r in given.run_ids or [])
        elif field in ("mlflowSearchRuns", "mlflowSearchDatasets"):
            ids = given.experiment_ids or []
            needs.update(
                [experiment(canonical_experiment_id(e)) for e in ids] or [EVERY_EXPERIMENT]
            )
    return needs


@pytest.mark.parametrize("request_body", [c[1] for c in CASES], ids=[c[0] for c in CASES])
def test_needs_are_what_mlflow_would_resolve(request_body: dict[str, Any]) -> None:
    """For every document MLflow would run, the needs are exactly what its resolvers read."""
    try:
        ours = needs_of(request_body)
    except RequestDataError:
        return  # refused: nothing reaches MLflow
    resolved = mlflow_needs(request_body)
    if resolved is None:
        return  # MLflow rejects the document (here: @skip/@include, which it does not declare)
    assert resolved == set(ours)


@pytest.mark.parametrize(
    "request_body",
    [
        body('mutation { mlflowSearchRuns(input: {experimentIds: ["1"]}) { nextPageToken } }'),
        body(RUN, {"d": {"runId": "a", "runUuid": "b"}}),
    ],
)
def test_refusals_that_matter_mlflow_would_run_these(request_body: dict[str, Any]) -> None:
    with pytest.raises(RequestDataError):
        needs_of(request_body)
    assert mlflow_needs(request_body)


def test_ui_documents_agree_with_mlflow() -> None:
    for name, document in ui_documents().items():
        variables, expected = UI_QUERIES[name]
        request = body(document, variables, name)
        assert mlflow_needs(request) == set(expected) == set(needs_of(request))


# --- a run's model versions: where they land in the response, and the filter -----------------

GOT = ("mlflowGetRun", "run", "modelVersions")
SEARCHED = ("mlflowSearchRuns", "runs", "modelVersions")
SEARCH = '{ mlflowSearchRuns(input: {experimentIds: ["1"]}) { runs { %s } } }'


def versions_at(path: tuple[str, ...], name_key: str = "name") -> ModelVersionsPath:
    return ModelVersionsPath(path, name_key)


def plan_of(request: dict[str, Any]) -> tuple[list[Need], set[ModelVersionsPath]]:
    needs, paths = graphql_plan("POST", b"", json.dumps(request).encode())
    assert len(paths) == len(set(paths))
    return needs, set(paths)


# (id, request body, expected needs, expected paths; or the refusal reason)
PLANS: list[tuple[str, dict[str, Any], tuple[list[Need], set[ModelVersionsPath]] | str]] = [
    ("name selected", body("{ " + get_run("r1", "run { modelVersions { name version } }") + " }"),
     ([run("r1")], {versions_at(GOT)})),
    ("name not selected: every model",
     body("{ " + get_run("r1", "run { modelVersions { version source } }") + " }"),
     ([run("r1"), MODELS], set())),
    ("only __typename: every model",
     body("{ " + get_run("r1", "run { modelVersions { __typename } }") + " }"),
     ([run("r1"), MODELS], set())),
    ("an alias hiding modelVersions behind another field's key",
     body("{ " + get_run("r1", "run { info: modelVersions { name } }") + " }"),
     ([run("r1")], {versions_at(("mlflowGetRun", "run", "info"))})),
    ("an alias on name", body("{ " + get_run("r1", "run { modelVersions { n: name } }") + " }"),
     ([run("r1")], {versions_at(GOT, "n")})),
    ("aliases all the way down",
     body('{ g: mlflowGetRun(input: {runId: "r1"}) { r: run { v: modelVersions { n: name } } } }'),
     ([run("r1")], {versions_at(("g", "r", "v"), "n")})),
    ("another field answers as name; name itself under another key",
     body("{ " + get_run("r1", "run { modelVersions { name: version n: name } }") + " }"),
     ([run("r1")], {versions_at(GOT, "n")})),
    ("name and version swap keys",
     body("{ " + get_run("r1", "run { modelVersions { version: name name: version } }") + " }"),
     ([run("r1")], {versions_at(GOT, "version")})),
    ("__typename answers as name; name itself under another key",
     body("{ " + get_run("r1", "run { modelVersions { name: __typename n: name } }") + " }"),
     ([run("r1")], {versions_at(GOT, "n")})),
    ("name selected twice under two keys: either will do",
     body("{ " + get_run("r1", "run { modelVersions { b: name a: name name } }") + " }"),
     ([run("r1")], {versions_at(GOT, "a")})),
    ("two keys of modelVersions, one without name",
     body("{ " + get_run("r1", "run { a: modelVersions { name } b: modelVersions { version } }")
          + " }"),
     ([run("r1"), MODELS], {versions_at(("mlflowGetRun", "run", "a"))})),
    ("two keys of modelVersions, both with name",
     body("{ " + get_run("r1", "run { a: modelVersions { x: name } modelVersions { name } }")
          + " }"),
     ([run("r1")], {versions_at(("mlflowGetRun", "run", "a"), "x"), versions_at(GOT)})),
    ("modelVersions twice under one key: their selections merge",
     body("{ " + get_run("r1", "run { modelVersions { version } modelVersions { name } }") + " }"),
     ([run("r1")], {versions_at(GOT)})),
    ("name only in a fragment on the version",
     body("{ " + get_run("r1", "run { modelVersions { version ...V } }") + " } "
          "fragment V on MlflowModelVersion { m: name }"),
     ([run("r1")], {versions_at(GOT, "m")})),
    ("modelVersions in a named fragment, name merged in from an inline one",
     body("{ " + get_run("r1", "run { ...R ... on MlflowRunExtension { modelVersions { name } } }")
          + " } fragment R on MlflowRunExtension { modelVersions { version } }"),
     ([run("r1")], {versions_at(GOT)})),
    ("the same run field twice: one place in the response",
     body("{ " + get_run("r1", "run { modelVersions { name } } run { modelVersions { n: name } }")
          + " }"),
     ([run("r1")], {versions_at(GOT, "n")})),
    ("root fields merged through fragments",
     body("{ ...A ...B } fragment A on Query { g: " + get_run("r1", "run { modelVersions { v: "
          "version } }") + " } fragment B on Query { g: " + get_run("r1", "run { modelVersions "
          "{ name } }") + " }"),
     ([run("r1")], {versions_at(("g", "run", "modelVersions"))})),
    ("the runs of a search are a list",
     body(SEARCH % "info { runId } modelVersions { name }"),
     ([experiment("1")], {versions_at(SEARCHED)})),
    ("search and get in one document",
     body("{ s: " + SEARCH[2:-2] % "mv: modelVersions { name }" + " "
          + get_run("r1", "run { modelVersions { name } }") + " }"),
     ([experiment("1"), run("r1")],
      {versions_at(("s", "runs", "mv")), versions_at(GOT)})),
    ("a model-version search is no run's: every model",
     body('{ mlflowSearchModelVersions(input: {}) { modelVersions { name } } }'),
     ([MODELS], set())),
    ("two fields answer as name",
     body("{ " + get_run("r1", "run { modelVersions { name name: version } }") + " }"),
     "ambiguous_parameter"),
    ("two fields answer as name, one from a fragment",
     body("{ " + get_run("r1", "run { modelVersions { name ...V } }") + " } "
          "fragment V on MlflowModelVersion { name: source }"),
     "ambiguous_parameter"),
    ("__typename and name answer as name",
     body("{ " + get_run("r1", "run { modelVersions { name name: __typename } }") + " }"),
     "ambiguous_parameter"),
    ("two fields answer as name in merged runs",
     body("{ " + get_run("r1", "run { modelVersions { name } } run { modelVersions { "
          "name: runId } }") + " }"),
     "ambiguous_parameter"),
    ("another field answers as modelVersions",
     body("{ " + get_run("r1", "run { modelVersions { name } modelVersions: info { runId } }")
          + " }"),
     "ambiguous_parameter"),
    ("another root field answers at the same key",
     body('{ a: mlflowGetRun(input: {runId: "r1"}) { run { modelVersions { name } } } '
          'a: test(inputString: "x") { output } }'),
     "ambiguous_parameter"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("request_body", "expected"), [c[1:] for c in PLANS], ids=[c[0] for c in PLANS]
)
def test_plans(
    request_body: dict[str, Any], expected: tuple[list[Need], set[ModelVersionsPath]] | str
) -> None:
    if isinstance(expected, str):
        assert refusal("POST", b"", json.dumps(request_body).encode()) == expected
        return
    assert plan_of(request_body) == expected
    # A caller that does not filter still needs read on every model.
    needs = expected[0] + [MODELS] if expected[1] and MODELS not in expected[0] else expected[0]
    assert needs_of(request_body) == needs


@pytest.mark.parametrize("request_body", [c[1] for c in PLANS], ids=[c[0] for c in PLANS])
def test_plans_are_what_mlflow_would_resolve(request_body: dict[str, Any]) -> None:
    """The refusals among these are documents MLflow's validation rejects too."""
    try:
        ours = needs_of(request_body)
    except RequestDataError:
        assert mlflow_needs(request_body) is None
        return
    assert mlflow_needs(request_body) == set(ours)


@pytest.mark.parametrize(("name", "path"), [("GetRun", GOT), ("SearchRuns", SEARCHED)])
def test_the_ui_run_pages_are_filtered_not_refused(name: str, path: tuple[str, ...]) -> None:
    document = ui_documents()[name]
    variables, expected = UI_QUERIES[name]
    for text in (document, document.replace("{", "{ __typename ")):
        assert plan_of(body(text, variables, name)) == (
            [need for need in expected if need != MODELS],
            {versions_at(path)},
        )


def readable(name: str) -> bool:
    return name.startswith("ok")


def dumped(value: Any) -> bytes:
    return json.dumps(value).encode()


def version(name: str, **more: Any) -> dict[str, Any]:
    return {"name": name, "version": "1", **more}


def got(versions: Any) -> dict[str, Any]:
    return {"data": {"mlflowGetRun": {"run": {"info": {"runId": "r1"}, "modelVersions": versions},
                                      "apiError": None}}, "errors": None}  # fmt: skip


def test_the_filter_keeps_only_readable_versions_and_everything_else() -> None:
    response = got([version("ok1"), version("no", source="s3://x"), version("ok2")])
    filtered = filter_model_versions(dumped(response), [versions_at(GOT)], readable)
    assert filtered is not None
    assert json.loads(filtered) == got([version("ok1"), version("ok2")])
    assert filtered == dumped(got([version("ok1"), version("ok2")])).replace(b", ", b",").replace(
        b": ", b":"
    )  # same keys in the same order, compact


def test_the_filter_reads_the_key_name_was_given_not_the_key_called_name() -> None:
    # `modelVersions { name: version  n: name }`: "name" holds a version, "n" the model.
    response = got([{"name": "ok-looking", "n": "no"}, {"name": "1", "n": "ok"}])
    filtered = filter_model_versions(dumped(response), [versions_at(GOT, "n")], readable)
    assert filtered is not None
    assert json.loads(filtered) == got([{"name": "1", "n": "ok"}])


def test_the_filter_walks_every_run_of_a_search() -> None:
    runs = [
        {"modelVersions": [version("no"), version("ok")]},
        {"modelVersions": None},
        None,
        {"modelVersions": []},
        {"info": {}},
        {"modelVersions": [version("no2")]},
    ]
    response = {"data": {"mlflowSearchRuns": {"runs": runs}}, "errors": None}
    filtered = filter_model_versions(dumped(response), [versions_at(SEARCHED)], readable)
    assert filtered is not None
    kept = json.loads(filtered)["data"]["mlflowSearchRuns"]["runs"]
    assert kept == [{"modelVersions": [version("ok")]}, {"modelVersions": None}, None,
                    {"modelVersions": []}, {"info": {}}, {"modelVersions": []}]  # fmt: skip


def test_the_filter_filters_every_path() -> None:
    response = {"data": {"mlflowGetRun": {"run": {"a": [version("no")], "b": [{"x": "no"}]}}}}
    paths = [
        versions_at(("mlflowGetRun", "run", "a")),
        versions_at(("mlflowGetRun", "run", "b"), "x"),
    ]
    filtered = filter_model_versions(dumped(response), paths, readable)
    assert filtered is not None
    assert json.loads(filtered) == {"data": {"mlflowGetRun": {"run": {"a": [], "b": []}}}}


@pytest.mark.parametrize(
    "response",
    [
        got([version("ok")]),
        got([]),
        got(None),
        {"data": {"mlflowGetRun": {"run": None, "apiError": {"code": "RESOURCE_DOES_NOT_EXIST"}}}},
        {"data": {"mlflowGetRun": None}, "errors": ["boom"]},
        {"data": None, "errors": ["Cannot query field"]},
        {"errors": ["no data at all"]},
        {"data": {}},
    ],
    ids=["all readable", "none", "null list", "run not found", "root null", "data null",
         "data missing", "field missing"],
)  # fmt: skip
def test_nothing_to_remove_is_the_same_bytes(response: dict[str, Any]) -> None:
    raw = json.dumps(response, indent=1).encode() + b"\n"
    assert filter_model_versions(raw, [versions_at(GOT)], readable) == raw


def test_no_paths_means_the_response_is_not_read() -> None:
    assert filter_model_versions(b"not json", [], readable) == b"not json"


def test_a_filtered_body_keeps_non_ascii_names_and_the_final_newline() -> None:
    raw = dumped(got([version("ok-é"), version("no-ü")])) + b"\n"
    filtered = filter_model_versions(raw, [versions_at(GOT)], readable)
    assert filtered is not None and filtered.endswith(b"}\n")
    assert json.loads(filtered) == got([version("ok-é")])


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"",
        b"\xff\xfe{",
        b"[]",
        b"null",
        dumped(json.dumps(got([version("no")]))),  # a JSON string holding the response
        b'{"data": {"mlflowGetRun": {"run": {"modelVersions": []}}}, "data": null}',
        b'{"data": {"mlflowGetRun": {"run": {"modelVersions": [{"name": "ok", "name": "no"}]}}}}',
        b'{"data": {"mlflowGetRun": {"run": {"modelVersions": [], "modelVersions": '
        b'[{"name": "no"}]}}}}',
        b'{"data": {"mlflowGetRun": {"run": {"modelVersions": [{"name": "no", "tags": '
        b'{"k": 1, "k": 2}}]}}}}',
        b"[" * 100_000 + b"]" * 100_000,
        dumped({"data": [got([version("no")])["data"]]}),  # data is not an object
        dumped({"data": "x"}),
        dumped(got([{"version": "1"}])),  # an entry without the name
        dumped(got([version("ok"), {"version": "1"}])),
        dumped(got([{"name": None}])),
        dumped(got([{"name": 5}])),
        dumped(got([{"name": ["ok"]}])),
        dumped(got([None])),
        dumped(got(["ok"])),
        dumped(got([[version("no")]])),  # a list of lists
        dumped(got({"name": "no"})),  # an object for the list
        dumped(got("no")),
        dumped({"data": {"mlflowGetRun": {"run": "no"}}}),
        dumped({"data": {"mlflowGetRun": {"run": 1}}}),
        dumped({"data": {"mlflowGetRun": True}}),
    ],
)
def test_responses_that_cannot_be_read_one_way(raw: bytes) -> None:
    assert filter_model_versions(raw, [versions_at(GOT)], readable) is None


def test_an_unreadable_response_is_refused_even_when_the_first_path_is_fine() -> None:
    response = {"data": {"mlflowGetRun": {"run": {"a": [version("ok")], "b": [{"n": 1}]}}}}
    paths = [
        versions_at(("mlflowGetRun", "run", "a")),
        versions_at(("mlflowGetRun", "run", "b"), "n"),
    ]
    assert filter_model_versions(dumped(response), paths, readable) is None


class VersionsStandIn(Recorder):
    """MLflow's executor with the resolvers stood in for, and each run's ``modelVersions``
    answering versions of two models, as MLflow's search by run id finds them."""

    VERSIONS: tuple[dict[str, Any], ...] = (
        # The readable model's version is spelled like the other model and back, so a filter
        # reading the wrong key keeps the wrong version.
        {"name": "ok-model", "version": "no-model", "source": "s3://ok"},
        {"name": "no-model", "version": "ok-model", "source": "s3://no"},
    )

    def resolve(self, next_: Any, root: Any, info: Any, **args: Any) -> Any:
        if (info.parent_type.name, info.field_name) == ("MlflowRunExtension", "modelVersions"):
            return copy.deepcopy(list(self.VERSIONS))
        return super().resolve(next_, root, info, **args)


def mlflow_response(request: dict[str, Any]) -> bytes:
    """The body MLflow's ``_graphql`` answers: its executor's result through Flask's jsonify."""
    result = schema.execute(
        request["query"],
        variables=request.get("variables"),
        operation_name=request.get("operationName"),
        middleware=[VersionsStandIn()],
    )
    assert not result.errors, result.errors
    with flask.Flask(__name__).app_context():
        return flask.jsonify({"data": result.data, "errors": None}).get_data()


def model_names(value: Any, name_key: str) -> list[str]:
    """Every value under ``name_key`` anywhere in a response, in order."""
    if isinstance(value, list):
        return [name for item in value for name in model_names(item, name_key)]
    if isinstance(value, dict):
        own = [value[name_key]] if isinstance(value.get(name_key), str) else []
        return own + [name for item in value.values() for name in model_names(item, name_key)]
    return []


TRICKY = body(
    "query Q($e: [String]) { "
    "s: mlflowSearchRuns(input: {experimentIds: $e}) { runs { ...R info { runId } } } "
    'g: mlflowGetRun(input: {runId: "r1"}) { run { v: modelVersions { name: version m: name } } }'
    " } "
    "fragment R on MlflowRunExtension { modelVersions { version ...V } w: modelVersions { name } }"
    " fragment V on MlflowModelVersion { m: name source }",
    {"e": ["1"]},
    "Q",
)


def test_a_real_response_keeps_only_the_readable_model() -> None:
    request = TRICKY
    assert not graphql.validate(schema.graphql_schema, graphql.parse(request["query"]))
    needs, paths = plan_of(request)
    assert needs == [experiment("1"), run("r1")]
    assert paths == {
        versions_at(("s", "runs", "modelVersions"), "m"),
        versions_at(("s", "runs", "w")),
        versions_at(("g", "run", "v"), "m"),
    }
    raw = mlflow_response(request)
    filtered = filter_model_versions(raw, list(paths), readable)
    assert filtered is not None
    before, after = json.loads(raw), json.loads(filtered)
    assert len(before["data"]["s"]["runs"]) == 2
    assert sorted(set(model_names(before, "m"))) == ["no-model", "ok-model"]
    assert after == {
        "data": {
            "g": {"run": {"v": [{"m": "ok-model", "name": "no-model"}]}},
            "s": {"runs": [
                {"info": None, "modelVersions": [
                    {"m": "ok-model", "source": "s3://ok", "version": "no-model"}
                ], "w": [{"name": "ok-model"}]},
            ] * 2},
        },
        "errors": None,
    }  # fmt: skip
    assert list(after["data"]) == list(before["data"])  # Flask's key order is kept


@pytest.mark.parametrize("name", ["GetRun", "SearchRuns"])
def test_the_ui_run_pages_show_only_readable_versions(name: str) -> None:
    variables, _ = UI_QUERIES[name]
    request = body(ui_documents()[name], variables, name)
    _, paths = graphql_plan("POST", b"", json.dumps(request).encode())
    raw = mlflow_response(request)
    filtered = filter_model_versions(raw, paths, readable)
    assert filtered is not None
    assert "no-model" in model_names(json.loads(raw), "name")
    names = model_names(json.loads(filtered), "name")
    assert "no-model" not in names and "ok-model" in names
    assert filter_model_versions(raw, paths, lambda _: True) == raw
