"""Personal tokens of directory users, end to end: a gateway process with the real slapd in front
of a real MLflow. A person logs in (LDAP Basic, or the login page), makes a token, and the
unchanged MLflow client uses it as ``MLFLOW_TRACKING_TOKEN`` and as
``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD``: it has the person's group grants and
nothing more, cannot make more tokens, outlives the person's logout and dies with a block."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from tests.integration.conftest import Gateway, Mlflow, start_gateway
from tests.slapd import GROUPS, PEOPLE, SERVICE_DN, Slapd

pytestmark = [pytest.mark.integration, pytest.mark.ldap]

API = "/guard/api/tokens"


@pytest.fixture(scope="module")
def ldap_gateway(
    external_mlflow: Mlflow, slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gateway = start_gateway(
        tmp_path_factory.mktemp("personal-tokens"),
        "--upstream-url", external_mlflow.url,
        MLFLOW_GUARD_LDAP_URLS=slapd.url,
        MLFLOW_GUARD_LDAP_BIND_DN=slapd.service_dn,
        MLFLOW_GUARD_LDAP_BIND_PASSWORD=slapd.service_password,
        MLFLOW_GUARD_LDAP_USER_BASE=PEOPLE,
        MLFLOW_GUARD_LDAP_USE_MEMBEROF="true",
    )  # fmt: skip
    try:
        added = gateway.cli(
            "policy", "add", "p, group:ldap/risk%20team, manager, experiment:ptok-*"
        )
        assert added.returncode == 0, added.stderr
        yield gateway
    finally:
        gateway.stop()


@pytest.fixture(autouse=True)
def no_client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    for name in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)


def use(monkeypatch: pytest.MonkeyPatch, spelling: str, user: str, secret: str) -> None:
    for name in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    if spelling == "token":
        monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", secret)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)


def retry_while_denied(action, seconds: float = 10.0):  # type: ignore[no-untyped-def]
    """The gateway polls for a policy change made by the CLI (1 s)."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            return action()
        except MlflowException as exc:
            if "PERMISSION_DENIED" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.mark.parametrize("spelling", ["token", "basic"])
def test_the_mlflow_client_acts_as_the_person_with_their_group_grants_only(
    ldap_gateway: Gateway, monkeypatch: pytest.MonkeyPatch, spelling: str
) -> None:
    url = ldap_gateway.url
    with httpx.Client(base_url=url, timeout=30) as http:
        # bob (in "Risk Team") makes a token with his directory password: a fresh login.
        made = http.post(API, json={"name": f"ci-{spelling}", "expires": "7d"},
                         auth=("bob", "bob-password"))  # fmt: skip
        assert made.status_code == 201, made.text
        secret = made.json()["secret"]
        assert made.json()["token"]["name"] == f"bob/ci-{spelling}"
        # The token cannot make more, by either spelling.
        for auth in ({"Authorization": f"Bearer {secret}"},):
            refused = http.post(API, json={"name": "more"}, headers=auth)
            assert refused.status_code == 403 and refused.headers["x-guard-reason"] == (
                "permission_denied"
            )
        refused = http.post(API, json={"name": "more"}, auth=("bob", secret))
        assert refused.status_code == 403
        # An experiment outside the group's grant, made by the administrator.
        other = http.post(
            "/api/2.0/mlflow/experiments/create",
            json={"name": f"other-{uuid.uuid4().hex[:8]}"},
            headers={"Authorization": f"Bearer {ldap_gateway.token}"},
        )
        assert other.status_code == 200, other.text
        other_id = other.json()["experiment_id"]

    use(monkeypatch, spelling, "bob", secret)
    client = MlflowClient(tracking_uri=url)
    name = f"ptok-{spelling}-{uuid.uuid4().hex[:8]}"
    experiment_id = retry_while_denied(lambda: client.create_experiment(name))
    run = client.create_run(experiment_id)
    client.log_param(run.info.run_id, "lr", "0.01")
    client.log_metric(run.info.run_id, "auc", 0.9)
    assert client.get_run(run.info.run_id).data.params == {"lr": "0.01"}
    # Nothing more than bob's rights: not another experiment, not a new one outside the grant.
    with pytest.raises(MlflowException, match="PERMISSION_DENIED"):
        client.get_experiment(other_id)
    with pytest.raises(MlflowException, match="PERMISSION_DENIED"):
        client.create_experiment(f"elsewhere-{uuid.uuid4().hex[:8]}")
    # Basic must name the owner: the token under another user name is not a login.
    use(monkeypatch, "basic", "alice", secret)
    with pytest.raises(MlflowException, match="UNAUTHENTICATED"):
        client.get_experiment(experiment_id)
    # alice's own token has alice's rights, which do not reach bob's experiment.
    with httpx.Client(base_url=url, timeout=30) as http:
        alice = http.post(API, json={"name": f"ci-{spelling}"}, auth=("alice", "alice-password"))
        assert alice.status_code == 201, alice.text
    use(monkeypatch, spelling, "alice", alice.json()["secret"])
    with pytest.raises(MlflowException, match="PERMISSION_DENIED"):
        client.get_experiment(experiment_id)


def login_form(client: httpx.Client) -> str:
    page = client.get("/guard/login")
    assert page.status_code == 200
    match = re.search(r'name="csrf_token" value="([0-9a-f]{16}\.[0-9a-f]{64})"', page.text)
    assert match
    return match.group(1)


def test_made_on_the_page_it_outlives_the_logout_and_dies_with_a_block(
    ldap_gateway: Gateway, slapd: Slapd, monkeypatch: pytest.MonkeyPatch
) -> None:
    uid = f"ptok-{uuid.uuid4().hex[:8]}"
    user_dn, group_cn = f"uid={uid},{PEOPLE}", f"ptok-team-{uid[5:]}"
    slapd.modify(
        f"dn: {user_dn}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {uid}\nsn: {uid}\n"
        f"userPassword: {uid}-password\n\n"
        f"dn: cn={group_cn},{GROUPS}\nobjectClass: groupOfNames\ncn: {group_cn}\n"
        f"member: {user_dn}\nmember: {SERVICE_DN}\n",
        add=True,
    )
    experiment = f"ptok-page-{uid[5:]}"
    grant = ldap_gateway.cli(
        "policy", "add", f"p, group:ldap/{group_cn}, manager, experiment:{experiment}"
    )
    assert grant.returncode == 0, grant.stderr
    url = ldap_gateway.url
    with httpx.Client(base_url=url, timeout=30, headers={"origin": url}) as browser:
        form = {"username": uid, "password": f"{uid}-password", "csrf_token": login_form(browser)}
        assert browser.post("/guard/login", data=form).status_code == 303
        page = browser.get("/guard/tokens")
        assert page.status_code == 200 and "no live tokens" in page.text
        token = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', page.text)
        assert token
        created = browser.post("/guard/tokens", data={
            "csrf_token": token.group(1), "action": "create", "name": "nightly", "expires": "7d",
        })  # fmt: skip
        assert created.status_code == 201, created.text
        [secret] = set(re.findall(r"(mlg_[A-Za-z0-9_-]{43})", created.text))
        assert secret not in browser.get("/guard/tokens").text  # shown once
        logout_page = browser.get("/guard/logout")
        logout_token = re.search(r'name="csrf_token" value="([0-9a-f]{64})"', logout_page.text)
        assert logout_token
        assert (
            browser.post("/guard/logout", data={"csrf_token": logout_token.group(1)}).status_code
            == 303
        )
        assert browser.get("/guard/tokens").status_code == 401  # the session is gone

    use(monkeypatch, "basic", uid, secret)
    client = MlflowClient(tracking_uri=url)
    experiment_id = retry_while_denied(lambda: client.create_experiment(experiment))
    use(monkeypatch, "token", uid, secret)
    assert client.get_experiment(experiment_id).name == experiment  # after the logout

    blocked = ldap_gateway.cli("user", "block", uid, "--reason", "left")
    assert blocked.returncode == 0, blocked.stderr
    deadline = time.monotonic() + 10  # tokens.cache_ttl (0.5 s here)
    bearer = {"Authorization": f"Bearer {secret}"}
    while (answer := httpx.get(f"{url}/guard/api/me", headers=bearer)).status_code == 200:
        assert time.monotonic() < deadline, "the token outlived its owner's block"
        time.sleep(0.2)
    assert answer.headers["x-guard-reason"] in ("token_revoked", "user_blocked")
    with pytest.raises(MlflowException, match=r"UNAUTHENTICATED|PERMISSION_DENIED"):
        client.get_experiment(experiment_id)
    listed = ldap_gateway.cli("token", "list", "--all", "--format", "json")
    assert f'"name": "{uid}/nightly"' in listed.stdout and '"state": "revoked"' in listed.stdout
