import pytest

from guard.edge.requestdata import RequestData, RequestDataError, canonical_experiment_id


def data(method: str, query: bytes = b"", body: bytes = b"") -> RequestData:
    return RequestData.build(method, query, body)


def reason(call) -> str:  # type: ignore[no-untyped-def]
    with pytest.raises(RequestDataError) as info:
        call()
    return info.value.refusal.reason


def test_get_reads_the_query_string_and_falls_back_to_the_body() -> None:
    assert data("GET", b"run_id=a").single("run_id") == "a"
    assert data("GET", b"run_id=a", b'{"run_id": "b"}').single("run_id") == "a"  # body ignored
    assert data("GET", b"", b'{"run_id": "b"}').single("run_id") == "b"  # empty query: body
    assert data("GET", b"other=1", b'{"run_id": "b"}').single("run_id") is None


def test_other_methods_read_the_body() -> None:
    assert data("POST", b"run_id=a", b'{"run_id": "b"}').single("run_id") == "b"
    assert data("DELETE", b"", b'{"name": "m"}').single("name") == "m"


def test_camel_case_is_the_same_field() -> None:
    assert data("GET", b"runId=a").single("run_id") == "a"
    assert data("POST", b"", b'{"experimentIds": ["1", "2"]}').values("experiment_ids") == [
        "1",
        "2",
    ]
    assert (
        reason(lambda: data("GET", b"run_id=a&runId=b").single("run_id")) == "ambiguous_parameter"
    )
    body = b'{"run_id": "a", "runId": "a"}'
    assert reason(lambda: data("POST", b"", body).single("run_id")) == "ambiguous_parameter"


def test_repeated_singular_parameters_are_refused_lists_are_not() -> None:
    assert reason(lambda: data("GET", b"run_id=a&run_id=b").single("run_id")) == (
        "ambiguous_parameter"
    )
    assert data("GET", b"run_ids=a&run_ids=b").values("run_ids") == ["a", "b"]


@pytest.mark.parametrize(
    "body",
    [b'{"a": 1, "a": 2}', b'{"x": {"a": 1, "a": 1}}', b"\xff", b"{", b"[1]", b'"not json"', b"1"],
)
def test_bodies_that_cannot_be_read_one_way(body: bytes) -> None:
    assert reason(lambda: data("POST", b"", body)) == "invalid_request_body"


def test_double_encoded_json_is_decoded_again() -> None:
    assert data("POST", b"", b'"{\\"run_id\\": \\"a\\"}"').single("run_id") == "a"


@pytest.mark.parametrize(
    ("value", "canonical"),
    [("1", "1"), ("01", "1"), ("+1", "1"), (" 1", "1"), ("1 ", "1"), (1, "1"), ("", "0"),
     ("  ", "0"), ("007", "7")],
)  # fmt: skip
def test_experiment_ids_as_mlflow_reads_them(value: object, canonical: str) -> None:
    assert canonical_experiment_id(value) == canonical


@pytest.mark.parametrize("value", ["x", "1.0", "1e3", None, True, [1], {"a": 1}])
def test_malformed_experiment_ids(value: object) -> None:
    assert reason(lambda: canonical_experiment_id(value)) == "invalid_request_body"


def test_a_body_is_read_once_per_request_and_again_when_rewritten() -> None:
    scope = {"method": "POST", "query_string": b"", "guard.body": b'{"run_id": "a"}'}
    first = RequestData.of(scope)
    assert RequestData.of(scope) is first
    scope["guard.body"] = b'{"run_id": "b"}'
    assert RequestData.of(scope).single("run_id") == "b"


@pytest.mark.parametrize(
    ("method", "query", "body", "counted"),
    [
        ("POST", b"", b'{"experiment_ids": ["1", "2", "3"]}', 3),
        ("POST", b"", b'{"experimentIds": ["1", "2", "3"]}', 3),
        ("POST", b"", b'{"experiment_ids": "1"}', 1),
        ("POST", b"experiment_ids=1&experiment_ids=2", b"{}", 0),  # MLflow reads the body
        ("GET", b"experiment_ids=1&experiment_ids=2", b"", 2),
        ("GET", b"", b'{"experiment_ids": ["1", "2"]}', 2),  # the body, as MLflow falls back
        ("GET", b"x=1", b'{"experiment_ids": ["1", "2"]}', 0),
    ],
)
def test_ids_are_counted_where_mlflow_reads_them(
    method: str, query: bytes, body: bytes, counted: int
) -> None:
    data = RequestData.build(method, query, body)
    data.check_id_count(["experiment_ids"], counted)
    if counted:
        with pytest.raises(RequestDataError) as caught:
            data.check_id_count(["experiment_ids"], counted - 1)
        assert caught.value.refusal.reason == "too_many_ids"


def test_ids_are_counted_over_every_list_named() -> None:
    data = RequestData.build("POST", b"", b'{"run_ids": ["a", "b"], "experiment_ids": ["1"]}')
    data.check_id_count(["run_ids", "experiment_ids"], 3)
    with pytest.raises(RequestDataError):
        data.check_id_count(["run_ids", "experiment_ids"], 2)
    with pytest.raises(RequestDataError) as caught:  # both spellings: MLflow's choice is unclear
        RequestData.build("POST", b"", b'{"run_ids": ["a"], "runIds": ["b"]}').check_id_count(
            ["run_ids"], 10
        )
    assert caught.value.refusal.reason == "ambiguous_parameter"


@pytest.mark.parametrize(
    "query", [b"name=team-a-%ff", b"name=%c3", b"na%ffme=x", b"run_id=%ed%a0%80"]
)
def test_a_query_that_is_not_utf8_once_decoded_is_refused(query: bytes) -> None:
    """MLflow (Werkzeug) would act on the escape as written, the gateway on U+FFFD: refused."""
    with pytest.raises(RequestDataError) as caught:
        RequestData.build("GET", query, b"")
    assert caught.value.refusal.reason == "invalid_request_body"


def test_a_query_in_utf8_is_read() -> None:
    data = RequestData.build("GET", b"name=caf%C3%A9+x&name2=%2F", b"")
    assert data.values("name") == ["café x"] and data.values("name2") == ["/"]
