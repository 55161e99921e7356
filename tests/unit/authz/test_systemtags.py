import json

import pytest

from guard.authz import systemtags
from guard.edge.requestdata import RequestData, RequestDataError

CREATE = "/api/2.0/mlflow/runs/create"


def data(payload: object, method: str = "POST") -> RequestData:
    return RequestData.build(method, b"", json.dumps(payload).encode())


def test_a_new_run_is_attributed_to_the_caller_whatever_it_claims() -> None:
    body = systemtags.attribute_run(
        CREATE,
        data({"experiment_id": "1", "userId": "root", "tags": [
            {"key": "mlflow.user", "value": "root"}, {"key": "team", "value": "risk"},
            {"key": "mlflow.user", "value": "bob"}]}),
        "alice",
    )  # fmt: skip
    assert body is not None
    sent = json.loads(body)
    assert sent["user_id"] == "alice" and "userId" not in sent
    assert sent["tags"] == [
        {"key": "team", "value": "risk"},
        {"key": "mlflow.user", "value": "alice"},
    ]
    assert sent["experiment_id"] == "1"


def test_a_new_run_without_tags_gets_one() -> None:
    body = systemtags.attribute_run(CREATE, data({"experiment_id": "1"}), "ci")
    assert body is not None and json.loads(body)["tags"] == [{"key": "mlflow.user", "value": "ci"}]
    with pytest.raises(RequestDataError):
        systemtags.attribute_run(CREATE, data({"experiment_id": "1", "tags": "x"}), "ci")


@pytest.mark.parametrize(
    ("path", "payload", "refused"),
    [
        ("/api/2.0/mlflow/runs/set-tag", {"run_id": "r", "key": "mlflow.user", "value": "bob"},
         True),
        ("/api/2.0/mlflow/runs/set-tag", {"run_id": "r", "key": "mlflow.user", "value": "alice"},
         False),
        ("/api/2.0/mlflow/runs/set-tag", {"run_id": "r", "key": "mlflow.user"}, True),
        ("/ajax-api/2.0/mlflow/runs/set-tag", {"run_id": "r", "key": "team", "value": "bob"},
         False),
        ("/api/2.0/mlflow/runs/log-batch", {"run_id": "r", "tags": [
            {"key": "a", "value": "1"}, {"key": "mlflow.user", "value": "bob"}]}, True),
        ("/api/2.0/mlflow/runs/log-batch", {"run_id": "r", "tags": [
            {"key": "mlflow.user", "value": "alice"}]}, False),
        ("/api/2.0/mlflow/runs/log-batch", {"run_id": "r", "metrics": []}, False),
        ("/api/2.0/mlflow/runs/delete-tag", {"run_id": "r", "key": "mlflow.user"}, True),
        ("/api/2.0/mlflow/runs/delete-tag", {"run_id": "r", "key": "team"}, False),
    ],
)  # fmt: skip
def test_later_writes_of_the_user_tag(path: str, payload: object, refused: bool) -> None:
    refusal = systemtags.refusal(path, data(payload), "alice")
    assert (refusal is not None) == refused
    if refusal is not None:
        assert refusal.reason == "system_tag_not_allowed"


def test_a_value_that_merely_converts_to_the_name_is_refused() -> None:
    path = "/api/2.0/mlflow/runs/set-tag"
    refusal = systemtags.refusal(path, data({"run_id": "r", "key": "mlflow.user", "value": 7}), "7")
    assert refusal is not None


def test_prompt_lab_runs_are_attributed_too() -> None:
    path = "/ajax-api/2.0/mlflow/runs/create-promptlab-run"
    assert systemtags.applies(path)
    body = systemtags.attribute_run(path, data({"experiment_id": "1", "user_id": "carol"}), "alice")
    assert body is not None and json.loads(body)["user_id"] == "alice"
