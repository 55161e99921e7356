import pytest

from guard.authz.promotion import PromotionRules
from guard.edge.requestdata import RequestData, RequestDataError

RULES = PromotionRules(protected_aliases=("champion", "prod*"), validation_tags=("validation_*",))


def body(method: str, text: str) -> RequestData:
    return RequestData.build(method, b"", text.encode())


@pytest.mark.parametrize(
    ("path", "method", "payload", "actions"),
    [
        ("/api/2.0/mlflow/registered-models/alias", "POST",
         '{"name": "m", "alias": "champion", "version": "1"}', {"promote"}),
        ("/api/2.0/mlflow/registered-models/alias", "DELETE", '{"name": "m", "alias": "prod-eu"}',
         {"promote"}),
        ("/api/2.0/mlflow/registered-models/alias", "POST",
         '{"name": "m", "alias": "scratch", "version": "1"}', set()),
        ("/api/2.0/mlflow/model-versions/set-tag", "POST",
         '{"name": "m", "version": "1", "key": "validation_status", "value": "ok"}', {"promote"}),
        ("/ajax-api/2.0/mlflow/model-versions/delete-tag", "DELETE",
         '{"name": "m", "version": "1", "key": "validation_x"}', {"promote"}),
        ("/api/2.0/mlflow/registered-models/set-tag", "POST",
         '{"name": "m", "key": "validation_status", "value": "ok"}', {"promote"}),
        ("/api/2.0/mlflow/model-versions/set-tag", "POST",
         '{"name": "m", "version": "1", "key": "owner", "value": "x"}', set()),
        ("/api/2.0/mlflow/model-versions/create", "POST",
         '{"name": "m", "source": "s", "tags": [{"key": "a"}, {"key": "validation_status"}]}',
         {"promote"}),
        ("/api/2.0/mlflow/model-versions/create", "POST",
         '{"name": "m", "source": "s", "tags": [{"key": "a"}]}', set()),
        ("/api/2.0/mlflow/model-versions/create", "POST",
         '{"name": "m", "source": "s", "tags": ["not-an-object"]}', {"promote"}),
        ("/ajax-api/2.0/mlflow/registered-models/create", "POST",
         '{"name": "m", "tags": [{"key": "validation_status", "value": "ok"}]}', {"promote"}),
        ("/api/2.0/mlflow/registered-models/create", "POST",
         '{"name": "m", "tags": [{"key": "team", "value": "risk"}]}', set()),
    ],
)  # fmt: skip
def test_what_needs_promote(path: str, method: str, payload: str, actions: set[str]) -> None:
    needs = RULES.requirements(path, body(method, payload))
    effective = needs.actions | ({needs.replace_action} if needs.replace_action else set())
    assert effective == actions
    if "create" not in path:  # alias and tag writes are promote instead of update, not both
        assert needs.actions == set()


def test_a_missing_alias_or_key_is_treated_as_protected() -> None:
    assert (
        RULES.requirements(
            "/api/2.0/mlflow/registered-models/alias", body("POST", '{"name": "m"}')
        ).replace_action
        == "promote"
    )


def test_deleting_a_version_asks_for_its_aliases() -> None:
    needs = RULES.requirements(
        "/api/2.0/mlflow/model-versions/delete", body("DELETE", '{"name": "m", "version": 3}')
    )
    assert needs.version_aliases == ("m", "3")
    with pytest.raises(RequestDataError):
        RULES.requirements("/api/2.0/mlflow/model-versions/delete", body("DELETE", '{"name": 1}'))


def test_rename_needs_delete_here_and_create_there() -> None:
    needs = RULES.requirements(
        "/api/2.0/mlflow/registered-models/rename", body("POST", '{"name": "a", "new_name": "b"}')
    )
    assert needs.replace_action == "delete"
    assert needs.elsewhere == [("model:b", "create")]
    with pytest.raises(RequestDataError):
        RULES.requirements(
            "/api/2.0/mlflow/registered-models/rename", body("POST", '{"name": "a"}')
        )


def test_renaming_an_experiment_needs_delete_here_and_create_there() -> None:
    needs = RULES.requirements(
        "/ajax-api/2.0/mlflow/experiments/update",
        body("POST", '{"experiment_id": "1", "new_name": "fraud/b"}'),
    )
    assert needs.replace_action == "delete"
    assert needs.elsewhere == [("experiment:fraud/b", "create")]
    with pytest.raises(RequestDataError):
        RULES.requirements("/api/2.0/mlflow/experiments/update", body("POST", '{"new_name": 3}'))
