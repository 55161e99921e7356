"""The policy API under /guard/api/: who may read and change what, through the real gateway.

Callers: the bootstrap admin; ``token:mgr`` manages experiment ``exp-1`` (through a pattern
grant on ``exp-1*``) and is denied manage on ``exp-1b``; ``token:aud`` holds ``auditor`` on the
policy; ``token:nobody`` holds nothing. Every refusal is checked for its reason code.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from guard.admin.governance import Governance
from guard.app import Gateway, build_gateway
from guard.authz.policy import parse_lines
from guard.config import load_settings
from tests.servers import ServerThread, read_request_body, send_response

ADMIN = "mlg_" + "b" * 43
MANAGER = "mlg_" + "m" * 43
AUDITOR = "mlg_" + "u" * 43
NOBODY = "mlg_" + "n" * 43
API = "/guard/api"


async def fake_mlflow(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await read_request_body(receive)
    await send_response(send, 200, b"3.17.2" if scope["path"] == "/version" else b"{}")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    data = tmp_path_factory.mktemp("api")
    with ServerThread(fake_mlflow, lifespan="off") as upstream:
        settings = load_settings(
            {
                "upstream.url": upstream.url,
                "storage.data_dir": str(data),
                "gateway.max_body_size": "64KiB",
                "gateway.cors_allowed_origins": "https://ui.example",
            },
            {},
            None,
        ).settings
        env = {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": ADMIN, "MLFLOW_GUARD_SECRET_KEY": "k" * 40}
        gateway = build_gateway(settings, env)
        with ServerThread(gateway) as server:
            g = Governance(gateway.tokens, gateway.policies.store)
            for name, secret in (("mgr", MANAGER), ("aud", AUDITOR), ("nobody", NOBODY)):
                g.tokens.create(name, "viewer", 3600, secret)
            g.change(
                "test",
                add=parse_lines(
                    [
                        "p, token:mgr, manager, experiment:exp-1*",
                        "p, token:mgr, manager, experiment:exp-1b, deny",
                        "p, token:aud, auditor, guard:policy",
                    ]
                ),
            )
            deadline = time.monotonic() + 10
            while gateway.policies.index.version != gateway.policies.store.version():
                assert time.monotonic() < deadline, "the policy change was not picked up"
                time.sleep(0.05)
            yield gateway, server.url


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10) as c:
        yield c


def call(
    http: httpx.Client, url: str, token: str | None, method: str, path: str, **kwargs: Any
) -> httpx.Response:
    headers = dict(kwargs.pop("headers", {}))
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return http.request(method, url + API + path, headers=headers, **kwargs)


def change(http: httpx.Client, url: str, token: str, **document: Any) -> httpx.Response:
    return call(http, url, token, "POST", "/policy/changes", json=document)


def refused(response: httpx.Response, status: int, reason: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["x-guard-reason"] == reason
    body: dict[str, Any] = response.json()
    assert body["reason"] == reason and body["error_code"] and body["message"]
    return body


def grants(gateway: Gateway) -> set[tuple[str, ...]]:
    return {g.row() for g in gateway.policies.index.policy.grants}


def test_me_names_the_caller(running: tuple[Gateway, str], http: httpx.Client) -> None:
    _, url = running
    me = call(http, url, MANAGER, "GET", "/me").json()
    assert me["subject"] == "token:mgr" and me["policy_administrator"] is False
    assert call(http, url, ADMIN, "GET", "/me").json()["policy_administrator"] is True


def test_every_endpoint_needs_credentials(running: tuple[Gateway, str], http: httpx.Client) -> None:
    _, url = running
    for method, path in (("GET", "/me"), ("GET", "/policy"), ("POST", "/policy/changes")):
        response = call(http, url, None, method, path, json={})
        refused(response, 401, "unauthenticated")
        assert response.headers.get_list("www-authenticate")
    refused(call(http, url, "mlg_" + "x" * 43, "GET", "/me"), 401, "invalid_credentials")


def test_unknown_paths_and_methods(running: tuple[Gateway, str], http: httpx.Client) -> None:
    _, url = running
    refused(call(http, url, ADMIN, "GET", "/nope"), 404, "not_found")
    refused(call(http, url, ADMIN, "DELETE", "/policy"), 405, "method_not_allowed")
    refused(call(http, url, ADMIN, "GET", "/policy/"), 404, "not_found")


def test_roles_are_listed_for_anyone(running: tuple[Gateway, str], http: httpx.Client) -> None:
    _, url = running
    roles = call(http, url, NOBODY, "GET", "/roles").json()["roles"]
    assert roles["viewer"] == ["read"]
    assert set(roles["manager"]) == {"read", "create", "update", "delete", "manage"}


def test_reading_the_policy(running: tuple[Gateway, str], http: httpx.Client) -> None:
    gateway, url = running
    for token in (ADMIN, AUDITOR):
        listed = call(http, url, token, "GET", "/policy").json()
        assert ["p", "token:aud", "auditor", "guard:policy", "allow"] in listed["rules"]
        assert listed["policy_version"] == gateway.policies.index.version
        export = call(http, url, token, "GET", "/policy/export")
        assert export.headers["content-type"].startswith("text/csv")
        assert "p, token:mgr, manager, experiment:exp-1*, allow" in export.text
    refused(call(http, url, NOBODY, "GET", "/policy"), 403, "permission_denied")
    refused(call(http, url, MANAGER, "GET", "/policy"), 403, "permission_denied")
    refused(call(http, url, NOBODY, "GET", "/policy/export"), 403, "permission_denied")


def test_a_manager_sees_who_has_access_to_what_they_manage(
    running: tuple[Gateway, str], http: httpx.Client
) -> None:
    _, url = running
    listed = call(http, url, MANAGER, "GET", "/policy", params={"resource": "experiment:exp-1"})
    rules = listed.json()["rules"]
    assert ["p", "token:mgr", "manager", "experiment:exp-1*", "allow"] in rules
    assert all(r[0] == "p" for r in rules) and ["p", "token:aud", "auditor"] not in rules
    for resource in ("experiment:exp-2", "experiment:exp-1b", "guard:policy"):
        response = call(http, url, MANAGER, "GET", "/policy", params={"resource": resource})
        refused(response, 403, "permission_denied")


def test_explain(running: tuple[Gateway, str], http: httpx.Client) -> None:
    _, url = running
    question = {"subject": "token:mgr", "action": "delete", "resource": "experiment:exp-1b"}
    answer = call(http, url, AUDITOR, "GET", "/policy/explain", params=question).json()
    assert answer["allowed"] is False and answer["reason"] == "explicit_deny"
    assert answer["rule"] == ["p", "token:mgr", "manager", "experiment:exp-1b", "deny"]
    # Anyone may ask about themselves, nobody without policy read about others.
    own = {"action": "update", "resource": "experiment:exp-1"}
    assert call(http, url, MANAGER, "GET", "/policy/explain", params=own).json()["allowed"]
    response = call(http, url, NOBODY, "GET", "/policy/explain", params=question)
    refused(response, 403, "permission_denied")
    bad = {"action": "fly", "resource": "experiment:exp-1"}
    refused(
        call(http, url, ADMIN, "GET", "/policy/explain", params=bad), 400, "invalid_request_body"
    )
    refused(
        call(http, url, ADMIN, "GET", "/policy/explain?action=read&action=delete&resource=x"),
        400,
        "ambiguous_parameter",
    )
    refused(
        call(http, url, ADMIN, "GET", "/policy/explain", params={**own, "as": "token:x"}),
        400,
        "invalid_request_body",
    )


def test_a_manager_explains_anyones_decisions_on_what_they_manage_only(
    running: tuple[Gateway, str], http: httpx.Client
) -> None:
    _, url = running
    about_bob = {"subject": "token:bob", "action": "update"}
    answer = call(http, url, MANAGER, "GET", "/policy/explain",
                  params={**about_bob, "resource": "experiment:exp-1"})  # fmt: skip
    assert answer.status_code == 200, answer.text
    assert answer.json()["subject"] == "token:bob" and answer.json()["allowed"] is False
    # Anything the manager's pattern covers is theirs to explain, nothing else is: not a
    # resource they do not manage, not one they are denied manage on, not the policy itself.
    bodies = []
    for resource in ("experiment:exp-2", "experiment:exp-1b", "experiment:no-such-thing",
                     "model:exp-1", "guard:policy", "*", "experiment:*"):  # fmt: skip
        question = {**about_bob, "resource": resource}
        response = call(http, url, MANAGER, "GET", "/policy/explain", params=question)
        body = refused(response, 403, "permission_denied")
        message = body["message"].replace(f"decisions on {resource}:", "decisions on R:")
        assert resource not in message.replace("read on guard:policy", "")
        bodies.append((message, sorted(response.headers.keys())))
    # "Exists" (rules name it) and "does not exist" get the same answer.
    assert len(set(map(str, bodies))) == 1
    refused(
        call(http, url, NOBODY, "GET", "/policy/explain",
             params={**about_bob, "resource": "experiment:exp-1"}),
        403, "permission_denied",
    )  # fmt: skip
    # Omitted or empty, the subject is the caller.
    for mine in ({}, {"subject": ""}, {"subject": "token:nobody"}):
        question = {**mine, "action": "read", "resource": "experiment:exp-1"}
        answer = call(http, url, NOBODY, "GET", "/policy/explain", params=question).json()
        assert answer["subject"] == "token:nobody" and answer["allowed"] is False


def test_a_manager_grants_and_revokes_what_they_hold_on_what_they_manage(
    running: tuple[Gateway, str], http: httpx.Client
) -> None:
    gateway, url = running
    row = ["p", "token:bob", "editor", "experiment:exp-1"]
    response = change(http, url, MANAGER, add=[row])
    assert response.status_code == 200, response.text
    assert response.json()["added"] == [[*row, "allow"]]
    # The replica that took the change applies it before answering.
    assert ("p", "token:bob", "editor", "experiment:exp-1", "allow") in grants(gateway)
    assert gateway.policies.index.decide("token:bob", "experiment:exp-1", "update").allowed
    again = change(http, url, MANAGER, add=[row]).json()
    assert again["added"] == [] and again["policy_version"] == response.json()["policy_version"]
    response = change(http, url, MANAGER, remove=[row])
    assert response.json()["removed"] == [[*row, "allow"]]
    assert not gateway.policies.index.decide("token:bob", "experiment:exp-1", "read").allowed


@pytest.mark.parametrize(
    ("row", "reason", "names"),
    [
        # an action the manager does not hold there
        (["p", "token:bob", "promoter", "experiment:exp-1"], "permission_denied", "promote"),
        # a resource they do not manage, or are denied on
        (["p", "token:bob", "viewer", "experiment:exp-2"], "permission_denied", "exp-2"),
        (["p", "token:bob", "viewer", "experiment:exp-1b"], "explicit_deny", "exp-1b"),
        # patterns, even ones inside what they manage
        (["p", "token:bob", "viewer", "experiment:exp-1*"], "permission_denied", "exact name"),
        (["p", "token:bob", "viewer", "experiment:exp-1?"], "permission_denied", "exact name"),
        (["p", "token:bob", "viewer", "*"], "permission_denied", "exact name"),
        (["p", "token:bob", "viewer", "guard:policy"], "permission_denied", "exact name"),
        (["p", "token:bob", "viewer", "server:mlflow"], "permission_denied", "exact name"),
        # deny rules, memberships, role definitions
        (["p", "token:bob", "viewer", "experiment:exp-1", "deny"], "permission_denied", "deny"),
        (["g", "token:mgr", "group:admins"], "permission_denied", "group:admins"),
        (["g2", "viewer", "manage"], "permission_denied", "g2"),
        # a role they cannot know the actions of
        (["p", "token:mgr", "admin", "experiment:exp-1"], "permission_denied", "promote"),
    ],
)
def test_a_manager_cannot_delegate_beyond_their_rights(
    running: tuple[Gateway, str], http: httpx.Client, row: list[str], reason: str, names: str
) -> None:
    gateway, url = running
    before = gateway.policies.store.version()
    for document in ({"add": [row]}, {"remove": [row]}):
        body = refused(change(http, url, MANAGER, **document), 403, reason)
        assert names in body["message"]
    # One refused row refuses the whole change.
    ok = ["p", "token:bob", "viewer", "experiment:exp-1"]
    refused(change(http, url, MANAGER, add=[ok, row]), 403, reason)
    assert gateway.policies.store.version() == before
    refused(change(http, url, NOBODY, add=[ok]), 403, "permission_denied")
    refused(change(http, url, AUDITOR, add=[ok]), 403, "permission_denied")


def test_malformed_changes_change_nothing(running: tuple[Gateway, str], http: httpx.Client) -> None:
    gateway, url = running
    before = gateway.policies.store.version()
    for document, reason in (
        ({"add": [["p", "token:bob", "no-such-role", "experiment:x"]]}, "policy_invalid"),
        ({"add": [["p", "bob", "viewer", "experiment:x"]]}, "policy_invalid"),
        ({"add": [["x", "y"]]}, "policy_invalid"),
        ({"add": ["p, token:bob, viewer, experiment:x"]}, "policy_invalid"),
        ({"add": [["p", "token:bob", "viewer", 7]]}, "policy_invalid"),
        ({"add": {"p": 1}}, "invalid_request_body"),
        ({"add": []}, "invalid_request_body"),
        ({"rows": []}, "invalid_request_body"),
        ({"add": [["p", "token:b", "viewer", "experiment:x"]], "dry_run": "no"},
         "invalid_request_body"),
        ({"add": [["g2", "viewer", "viewer"]]}, "policy_invalid"),
    ):  # fmt: skip
        refused(change(http, url, ADMIN, **document), 400, reason)
    headers = {"content-type": "application/json"}
    for body in (b"{", b"[]", b'{"add": [], "add": []}'):
        response = call(http, url, ADMIN, "POST", "/policy/changes", content=body, headers=headers)
        refused(response, 400, "invalid_request_body")
    assert gateway.policies.store.version() == before


def test_bodies_must_be_json_and_bounded(running: tuple[Gateway, str], http: httpx.Client) -> None:
    _, url = running
    document = json.dumps({"add": [["p", "token:bob", "viewer", "experiment:x"]]})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", ""):
        response = call(
            http, url, ADMIN, "POST", "/policy/changes",
            content=document, headers={"content-type": content_type},
        )  # fmt: skip
        refused(response, 415, "unsupported_media_type")
    big = json.dumps({"add": [["p", "token:bob", "viewer", "experiment:" + "x" * 70_000]]})
    response = call(
        http, url, ADMIN, "POST", "/policy/changes",
        content=big, headers={"content-type": "application/json"},
    )  # fmt: skip
    refused(response, 413, "body_too_large")


def test_cross_site_writes_are_refused(running: tuple[Gateway, str], http: httpx.Client) -> None:
    _, url = running
    response = call(
        http, url, ADMIN, "POST", "/policy/changes",
        json={"add": [["p", "token:bob", "viewer", "experiment:x"]]},
        headers={"origin": "https://evil.example"},
    )  # fmt: skip
    assert response.status_code == 403
    assert response.headers["x-guard-reason"] == "cors_origin_not_allowed"


def test_dry_run_reports_and_changes_nothing(
    running: tuple[Gateway, str], http: httpx.Client
) -> None:
    gateway, url = running
    before = gateway.policies.store.version()
    row = ["p", "token:bob", "viewer", "experiment:x", "allow"]
    answer = change(http, url, ADMIN, add=[row], dry_run=True).json()
    assert answer == {"policy_version": before, "dry_run": True, "added": [row], "removed": []}
    assert gateway.policies.store.version() == before
    bad = [["p", "token:bob", "no-such-role", "experiment:x"]]
    refused(change(http, url, ADMIN, add=bad, dry_run=True), 400, "policy_invalid")


def test_the_last_administrator_cannot_be_removed(
    running: tuple[Gateway, str], http: httpx.Client
) -> None:
    gateway, url = running
    admin = ["p", "token:admin", "admin", "*", "allow"]
    assert tuple(admin) in grants(gateway)
    body = refused(change(http, url, ADMIN, remove=[admin]), 400, "policy_invalid")
    assert "last administrator" in body["message"]
    refused(change(http, url, ADMIN, remove=[admin], dry_run=True), 400, "policy_invalid")
    assert tuple(admin) in grants(gateway)


def test_deny_rules_never_lock_administrators_out(
    running: tuple[Gateway, str], http: httpx.Client
) -> None:
    gateway, url = running
    denies = [["p", "token:admin", "admin", "*", "deny"], ["p", "token:admin", "admin",
              "guard:policy", "deny"]]  # fmt: skip
    assert change(http, url, ADMIN, add=denies).status_code == 200
    assert not gateway.policies.index.decide("token:admin", "guard:policy", "manage").allowed
    assert call(http, url, ADMIN, "GET", "/policy").status_code == 200
    response = change(http, url, ADMIN, remove=denies)
    assert response.status_code == 200, response.text
    assert call(http, url, ADMIN, "GET", "/me").json()["policy_administrator"] is True


def test_a_grant_on_everything_does_not_cover_the_policy(
    running: tuple[Gateway, str], http: httpx.Client
) -> None:
    """manager on * (or *:*) manages every experiment and model, not the policy itself."""
    gateway, url = running
    wide = [["p", "token:mgr", "manager", "*"], ["p", "token:mgr", "manager", "*:*"]]
    assert change(http, url, ADMIN, add=wide).status_code == 200
    try:
        assert gateway.policies.index.decide("token:mgr", "experiment:any", "manage").allowed
        refused(call(http, url, MANAGER, "GET", "/policy"), 403, "permission_denied")
        escalate = [["p", "token:mgr", "admin", "*"]]
        refused(change(http, url, MANAGER, add=escalate), 403, "permission_denied")
        assert call(http, url, MANAGER, "GET", "/me").json()["policy_administrator"] is False
    finally:
        assert change(http, url, ADMIN, remove=wide).status_code == 200


def test_importing_a_whole_policy(running: tuple[Gateway, str], http: httpx.Client) -> None:
    gateway, url = running
    csv = call(http, url, ADMIN, "GET", "/policy/export").text
    extra = "p, token:carol, viewer, model:fraud-*, allow\n"
    headers = {"content-type": "text/csv"}
    preview = call(
        http, url, ADMIN, "PUT", "/policy?dry_run=true", content=csv + extra, headers=headers
    ).json()
    assert preview["added"] == [["p", "token:carol", "viewer", "model:fraud-*", "allow"]]
    assert preview["removed"] == [] and preview["dry_run"] is True
    assert ("p", "token:carol", "viewer", "model:fraud-*", "allow") not in grants(gateway)
    applied = call(http, url, ADMIN, "PUT", "/policy", content=csv + extra, headers=headers)
    assert applied.status_code == 200, applied.text
    assert ("p", "token:carol", "viewer", "model:fraud-*", "allow") in grants(gateway)
    before = gateway.policies.store.version()
    for text, reason in (
        (csv + "p, token:carol, no-such-role, model:x\n", "policy_invalid"),
        ("g2, viewer, read\n", "policy_invalid"),  # no administrator left
    ):
        response = call(http, url, ADMIN, "PUT", "/policy", content=text, headers=headers)
        refused(response, 400, reason)
    response = call(http, url, ADMIN, "PUT", "/policy", content=b"\xff\xfe", headers=headers)
    refused(response, 400, "invalid_request_body")
    refused(call(http, url, AUDITOR, "PUT", "/policy", content=csv, headers=headers), 403,
            "permission_denied")  # fmt: skip
    refused(call(http, url, MANAGER, "PUT", "/policy", content=csv, headers=headers), 403,
            "permission_denied")  # fmt: skip
    assert gateway.policies.store.version() == before
    restore = call(http, url, ADMIN, "PUT", "/policy", content=csv, headers=headers)
    assert restore.json()["removed"] == [["p", "token:carol", "viewer", "model:fraud-*", "allow"]]


def test_the_cli_delegates_through_the_gateway(
    running: tuple[Gateway, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`role assign --gateway URL` applies the caller's own rights, not the database's."""
    from guard.cli.main import main

    gateway, url = running
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", MANAGER)
    base = ["--subject", "token:dave", "--role", "viewer", "--gateway", url]
    assert main(["role", "assign", "--resource", "experiment:exp-1", *base]) == 0
    assert "assigned: p, token:dave, viewer, experiment:exp-1, allow" in capsys.readouterr().out
    assert gateway.policies.index.decide("token:dave", "experiment:exp-1", "read").allowed
    assert main(["role", "assign", "--resource", "experiment:exp-2", *base]) == 1
    error = capsys.readouterr().err
    assert "may not manage experiment:exp-2" in error and "(permission_denied, HTTP 403)" in error
    assert main(["role", "unassign", "--resource", "experiment:exp-1", *base]) == 0
    assert not gateway.policies.index.decide("token:dave", "experiment:exp-1", "read").allowed
    question = ["--subject", "token:mgr", "--action", "manage", "--resource", "experiment:exp-1"]
    assert main(["policy", "explain", *question, "--gateway", url]) == 0
    assert "granted by: p, token:mgr, manager, experiment:exp-1*, allow" in capsys.readouterr().out
    assert main(["policy", "list", "--gateway", url]) == 1  # a manager may not read the policy
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "aud")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", AUDITOR)  # Basic wins, as in MLflow's client
    assert main(["policy", "list", "--format", "csv", "--gateway", url]) == 0
    assert "p, token:aud, auditor, guard:policy, allow" in capsys.readouterr().out
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "")
    monkeypatch.delenv("MLFLOW_TRACKING_TOKEN")
    assert main(["policy", "list", "--gateway", url]) == 1
    assert "no credentials" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", AUDITOR)
    assert main(["policy", "list", "--gateway", "file:///etc/passwd"]) == 1
    assert "must be an http(s) URL" in capsys.readouterr().err
    assert main(["policy", "list", "--gateway", "http://127.0.0.1:9"]) == 1
    assert "cannot reach the gateway" in capsys.readouterr().err


def test_the_cli_explains_for_a_manager_through_the_gateway(
    running: tuple[Gateway, str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`policy explain --gateway`: a manager about anyone on what they manage; without
    --subject, about the caller."""
    from guard.cli.main import main

    _, url = running
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", MANAGER)
    question = ["--action", "update", "--gateway", url]
    assert main(["policy", "explain", "--subject", "token:bob", "--resource",
                 "experiment:exp-1", *question]) == 1  # fmt: skip
    out = capsys.readouterr()
    assert "DENY: token:bob update experiment:exp-1" in out.out and not out.err
    assert main(["policy", "explain", "--subject", "token:bob", "--resource",
                 "experiment:exp-2", *question]) == 1  # fmt: skip
    error = capsys.readouterr().err
    assert "may not explain another subject's decisions on experiment:exp-2" in error
    assert "(permission_denied, HTTP 403)" in error
    assert main(["policy", "explain", "--resource", "experiment:exp-1", *question]) == 0
    out = capsys.readouterr().out
    assert "ALLOW: token:mgr update experiment:exp-1" in out
    assert "granted by: p, token:mgr, manager, experiment:exp-1*, allow" in out


def test_gateway_changes_are_recorded_under_the_callers_principal_only(
    running: tuple[Gateway, str],
    http: httpx.Client,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Neither the CLI's environment nor anything a client sends besides its credentials
    changes who a change is recorded as."""
    import sqlalchemy as sa

    from guard.cli.main import main
    from guard.store.db import policy_state

    gateway, url = running

    def recorded_actor() -> str:
        with gateway.engine.connect() as conn:
            return str(conn.execute(sa.select(policy_state.c.updated_by)).scalar())

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", MANAGER)
    monkeypatch.setenv("USER", "admin")
    monkeypatch.setenv("LOGNAME", "admin")
    base = ["--subject", "token:fred", "--role", "viewer", "--resource", "experiment:exp-1"]
    assert main(["role", "assign", *base, "--gateway", url]) == 0
    assert recorded_actor() == "token:mgr"
    assert main(["role", "unassign", *base, "--gateway", url]) == 0
    capsys.readouterr()
    row = ["p", "token:fred", "viewer", "experiment:exp-1"]
    spoofed = {"x-forwarded-user": "token:admin", "x-webauth-user": "admin",
               "remote-user": "token:admin", "x-guard-actor": "token:admin",
               "x-mlflow-user": "admin", "user-agent": "admin"}  # fmt: skip
    for action in ("add", "remove"):
        response = change_with(http, url, MANAGER, spoofed, {action: [row]})
        assert response.status_code == 200, response.text
        assert recorded_actor() == "token:mgr"
    for extra in ({"actor": "token:admin"}, {"principal": "token:admin"}, {"as": "x"}):
        response = change_with(http, url, MANAGER, {}, {"add": [row], **extra})
        refused(response, 400, "invalid_request_body")
    response = call(http, url, MANAGER, "POST", "/policy/changes?actor=token:admin",
                    json={"add": [row]})  # fmt: skip
    refused(response, 400, "invalid_request_body")
    assert recorded_actor() == "token:mgr"


def change_with(
    http: httpx.Client, url: str, token: str, headers: dict[str, str], document: dict[str, Any]
) -> httpx.Response:
    return call(http, url, token, "POST", "/policy/changes", json=document, headers=headers)


def test_the_audit_api_pages_newest_first_by_default_and_oldest_on_request(
    running: tuple[Gateway, str], http: httpx.Client
) -> None:
    import datetime as dt

    from guard.audit.store import AuditStore

    gateway, url = running
    now = dt.datetime.now(dt.UTC).isoformat()
    AuditStore(gateway.engine).insert(
        [{"writer": "pager", "seq": n, "time": now, "kind": "event", "principal": "user:pager",
          "event": "test"} for n in range(1, 8)]
    )  # fmt: skip

    def walk(**order: str) -> list[int]:
        seen: list[int] = []
        cursor = None
        for _ in range(10):
            params = {"principal": "user:pager", "limit": "3", **order,
                      **({"cursor": cursor} if cursor else {})}  # fmt: skip
            page = call(http, url, ADMIN, "GET", "/audit", params=params)
            assert page.status_code == 200, page.text
            seen += [r["seq"] for r in page.json()["records"]]
            cursor = page.json()["next_cursor"]
            if cursor is None:
                return seen
        raise AssertionError("the cursor did not end")

    assert walk() == [7, 6, 5, 4, 3, 2, 1]
    assert walk(order="newest") == [7, 6, 5, 4, 3, 2, 1]
    assert walk(order="oldest") == [1, 2, 3, 4, 5, 6, 7]
    first = call(http, url, ADMIN, "GET", "/audit", params={"principal": "user:pager",
                                                            "limit": "1"}).json()  # fmt: skip
    assert [r["seq"] for r in first["records"]] == [7]
    for bad in ({"order": "random"}, {"order": "NEWEST"}, {"order": ""}):
        refused(call(http, url, ADMIN, "GET", "/audit", params=bad), 400, "invalid_request_body")
    refused(call(http, url, ADMIN, "GET", "/audit?order=newest&order=oldest"), 400,
            "ambiguous_parameter")  # fmt: skip


def test_a_change_may_mix_rule_types(running: tuple[Gateway, str], http: httpx.Client) -> None:
    _, url = running
    rows = [["g", "token:erin", "group:readers"], ["p", "group:readers", "viewer", "model:x"]]
    response = change(http, url, ADMIN, add=rows)
    assert response.status_code == 200, response.text
    assert len(response.json()["added"]) == 2
    assert change(http, url, ADMIN, remove=rows).status_code == 200


def test_deeply_nested_json_is_refused_not_a_500(
    running: tuple[Gateway, str], http: httpx.Client
) -> None:
    _, url = running
    body = b"[" * 30_000 + b"]" * 30_000  # within the 64 KiB limit, far past the recursion limit
    headers = {"content-type": "application/json"}
    response = call(http, url, ADMIN, "POST", "/policy/changes", content=body, headers=headers)
    refused(response, 400, "invalid_request_body")


def test_the_cli_never_follows_a_redirect_with_credentials(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A gateway URL that redirects elsewhere must not receive (or forward) the token."""
    from guard.cli.main import main

    seen: list[str | None] = []

    async def elsewhere(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_request_body(receive)
        headers = dict(scope["headers"])
        seen.append(headers.get(b"authorization", b"").decode() or None)
        if scope["path"].startswith("/guard/api"):
            location = f"http://127.0.0.1:{scope['server'][1]}/stolen".encode()
            await send_response(send, 307, b"", [(b"location", location)])
        else:
            await send_response(send, 200, b"{}")

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "mlg_secret")
    with ServerThread(elsewhere, lifespan="off") as server:
        assert main(["policy", "list", "--gateway", server.url]) == 1
        assert main(["role", "assign", "--subject", "token:x", "--role", "viewer",
                     "--resource", "experiment:x", "--gateway", server.url]) == 1  # fmt: skip
    assert "redirect (307)" in capsys.readouterr().err
    assert seen == ["Bearer mlg_secret", "Bearer mlg_secret"]  # only the URL given, never /stolen
