"""GraphQL authorization: every field a document reaches, however it is spelled, is a need.

Three kinds of check: table-driven cases (including the ways around a field check: aliases,
fragments, second operations, variables), the mapping tables against MLflow's real schema, and a
differential run of every case through MLflow's executor, recording the resolvers it would call.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import graphql
import mlflow
import pytest
from graphene.types.resolver import dict_or_attr_resolver
from graphql import GraphQLInputObjectType, GraphQLList, GraphQLObjectType, get_named_type
from mlflow.server.graphql.graphql_no_batching import check_query_safety
from mlflow.server.graphql.graphql_schema_extensions import schema

from guard.graphql import NESTED_FIELDS, OBJECT_FIELDS, ROOT_FIELDS, Need, graphql_needs
from guard.requestdata import RequestDataError, canonical_experiment_id

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
