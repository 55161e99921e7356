"""Machines with identity-provider tokens: the unchanged MLflow client with a client-credentials
JWT from the throwaway OpenID Connect provider (``MLFLOW_TRACKING_TOKEN``) promoting a model
through a real gateway in front of a real ``mlflow server``, granted as ``client:ci/mlflow-robot``
and through its provider group ``group:ci/ci-pipelines``; and real tokens the gateway refuses."""

from __future__ import annotations

import json
import time
import uuid
from base64 import urlsafe_b64encode
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.idp import OidcProvider
from tests.integration.conftest import Gateway, Mlflow, start_gateway

pytestmark = [pytest.mark.integration, pytest.mark.oidc]

ALIAS = "ci"
ROBOT = "client:ci/mlflow-robot"


@dataclass
class World:
    gateway: Gateway
    idp: OidcProvider
    model: str
    other_model: str
    experiment: str
    version: str


def admin_client(gateway: Gateway, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", gateway.token)
    return MlflowClient(tracking_uri=gateway.url, registry_uri=gateway.url)


@pytest.fixture(scope="module")
def world(
    external_mlflow: Mlflow,
    oidc_provider: OidcProvider,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[World]:
    bearer = [{"alias": ALIAS, "issuer": oidc_provider.issuer, "audience": oidc_provider.resource,
               "groups_claim": "groups"}]  # fmt: skip
    gateway = start_gateway(
        tmp_path_factory.mktemp("oidc-bearer"),
        "--upstream-url", external_mlflow.url,
        MLFLOW_GUARD_OIDC_BEARER=json.dumps(bearer),
    )  # fmt: skip
    try:
        suffix = uuid.uuid4().hex[:8]
        model, other = f"fraud-robot-{suffix}", f"other-robot-{suffix}"
        with pytest.MonkeyPatch.context() as mp:
            admin = admin_client(gateway, mp)
            experiment = admin.create_experiment(f"robot-{suffix}")
            run = admin.create_run(experiment).info.run_id
            version = ""
            for name in (model, other):
                admin.create_registered_model(name)
                version = admin.create_model_version(name, f"runs:/{run}/model", run).version
        for rule in (
            f"p, {ROBOT}, promoter, model:{model}",
            f"p, group:{ALIAS}/ci-pipelines, viewer, experiment:robot-{suffix}",
        ):
            added = gateway.cli("policy", "add", rule)
            assert added.returncode == 0, added.stderr
        yield World(gateway, oidc_provider, model, other, experiment, version)
    finally:
        oidc_provider.reset()
        gateway.stop()


@pytest.fixture
def as_robot(world: World, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], MlflowClient]:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)

    def client(token: str) -> MlflowClient:
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", token)
        return MlflowClient(tracking_uri=world.gateway.url, registry_uri=world.gateway.url)

    return client


def eventually(call: Callable[[], Any], seconds: float = 10.0) -> Any:
    """The gateway polls for policy changes (authz.poll_interval, 1 s)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call()
        except MlflowException as exc:
            if "PERMISSION_DENIED" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def raw(
    world: World, token: str, path: str = "/api/2.0/mlflow/experiments/search"
) -> httpx.Response:
    return httpx.get(
        world.gateway.url + path,
        params={"max_results": "1"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def test_a_client_credentials_token_promotes_a_model(
    world: World, as_robot: Callable[[str], MlflowClient]
) -> None:
    robot = as_robot(world.idp.token_for_robot())
    eventually(lambda: robot.set_registered_model_alias(world.model, "champion", world.version))
    assert robot.get_model_version_by_alias(world.model, "champion").version == world.version
    # Its provider group's grant: reads the experiment.
    assert robot.get_experiment(world.experiment).experiment_id == world.experiment
    # Nothing beyond its grants.
    with pytest.raises(MlflowException) as info:
        robot.set_registered_model_alias(world.other_model, "champion", world.version)
    assert info.value.error_code == "PERMISSION_DENIED"
    assert ROBOT in info.value.message
    with pytest.raises(MlflowException, match="PERMISSION_DENIED"):
        robot.delete_registered_model(world.model)
    with pytest.raises(MlflowException, match="PERMISSION_DENIED"):
        robot.create_experiment(f"robot-new-{uuid.uuid4().hex[:6]}")


def test_the_audit_trail_names_the_client(world: World) -> None:
    response = raw(world, world.idp.token_for_robot())
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = world.gateway.cli("audit", "query", "--request-id", request_id, "--format", "jsonl")
        if found.returncode == 0 and ROBOT in found.stdout:
            break
        time.sleep(0.3)
    assert ROBOT in found.stdout, found.stdout + found.stderr
    assert '"auth_method": "oidc-bearer"' in found.stdout


def test_a_token_for_another_audience_is_refused(world: World) -> None:
    token = world.idp.token_for_robot(resource="urn:another-service")
    response = raw(world, token)
    assert response.status_code == 401
    assert response.headers["x-guard-reason"] == "invalid_credentials"


def test_an_id_token_is_not_an_api_credential(world: World) -> None:
    idp = world.idp
    callback = "http://127.0.0.1:9/callback"
    client_id, secret = idp.register_client([callback])
    verifier, challenge = idp.pkce_pair()
    authorize = httpx.URL(idp.metadata()["authorization_endpoint"]).copy_merge_params({
        "response_type": "code", "client_id": client_id, "redirect_uri": callback,
        "scope": "openid profile groups", "state": "s", "nonce": "n",
        "code_challenge": challenge, "code_challenge_method": "S256",
    })  # fmt: skip
    with httpx.Client(follow_redirects=False, trust_env=False, timeout=10) as browser:
        landed = idp.login(browser, str(authorize), "alice")
    code = dict(httpx.URL(landed).params)["code"]
    tokens = idp.http.post(
        "/token",
        data={"grant_type": "authorization_code", "code": code, "redirect_uri": callback,
              "code_verifier": verifier},
        auth=(client_id, secret),
    ).json()  # fmt: skip
    response = raw(world, tokens["id_token"])
    assert response.status_code == 401
    assert response.headers["x-guard-reason"] == "invalid_credentials"


def test_a_jwt_of_an_untrusted_issuer_is_refused_and_never_forwarded(world: World) -> None:
    # Signed by the provider's own key, but claiming another issuer.
    token = world.idp.sign(
        {"iss": "https://login.example.com", "aud": world.idp.resource, "sub": "mlflow-robot",
         "client_id": "mlflow-robot"},
        header={"typ": "at+jwt"},
    )  # fmt: skip
    response = raw(world, token)
    assert response.status_code == 401
    assert response.headers["x-guard-reason"] == "invalid_credentials"
    assert "not trusted" in response.json()["message"]


@pytest.mark.parametrize(
    ("header", "claims"),
    [
        ({"alg": "none"}, {}),
        ({"typ": "logout+jwt"}, {}),
        ({"kid": None}, {}),
        ({"jku": "http://127.0.0.1:9/jwks"}, {}),
        ({}, {"nonce": "n"}),
        ({}, {"exp": 1}),
        ({}, {"nbf": 4_000_000_000}),
    ],
)
def test_forged_or_wrong_tokens_of_the_trusted_issuer_are_refused(
    world: World, header: dict[str, Any], claims: dict[str, Any]
) -> None:
    idp = world.idp
    body = {"aud": idp.resource, "sub": "mlflow-robot", "client_id": "mlflow-robot", **claims}
    if header.get("alg") == "none":
        payload = idp.sign(body, header={"typ": "at+jwt"}).split(".")[1]
        head = json.dumps({"alg": "none", "typ": "at+jwt", "kid": idp.kids[0]}).encode()
        token = f"{urlsafe_b64encode(head).rstrip(b'=').decode()}.{payload}.AAAA"
    else:
        token = idp.sign(body, header={"typ": "at+jwt", **header})
    response = raw(world, token)
    assert response.status_code == 401, response.text
    assert response.headers["x-guard-reason"] == "invalid_credentials"


def test_key_rotation_is_followed_and_unknown_kids_cost_one_fetch(world: World) -> None:
    idp = world.idp
    try:
        idp.use_keys("key-2", ["key-1", "key-2"])  # rotation: a new kid, published
        assert raw(world, idp.token_for_robot()).status_code == 200
        before = idp.jwks_fetches()
        idp.use_keys("key-3", ["key-1", "key-2"])  # signing with a key nobody published
        for _ in range(5):
            response = raw(world, idp.token_for_robot())
            assert response.status_code == 401
        # At most one refetch for the unknown kid within jwks_refresh_interval (60 s).
        assert idp.jwks_fetches() - before <= 1
    finally:
        idp.reset()


def test_gateway_tokens_still_work_beside_the_bearer_issuer(world: World) -> None:
    assert raw(world, world.gateway.token).status_code == 200
