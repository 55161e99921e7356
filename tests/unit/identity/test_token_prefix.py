"""Through the real gateway (fake MLflow): a secret without the ``mlg_`` prefix never reaches the
token store, yet its refusal is still a failed login (401 ``invalid_credentials``, counted by the
failure limiter, audited with fingerprints only); and a bootstrap token without the prefix stops
the gateway from being built."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from guard.app import Gateway, build_gateway
from guard.audit.store import AuditStore, Filters
from guard.config import load_settings
from guard.identity.tokens import TokenError
from tests.servers import ServerThread, read_request_body, send_response

ADMIN = "mlg_" + "b" * 43
KEY = "k" * 40
API = "/api/2.0/mlflow/experiments/search"
AJAX = "/ajax-api/2.0/mlflow/experiments/search"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


# What no provider recognizes while no directory is configured: (Authorization, path).
NOT_TOKENS = [
    (basic("alice", "hunter2"), API),
    (basic("admin", "MLG_" + ADMIN[4:]), "/version"),
    (basic("admin", "mlg" + ADMIN[4:]), AJAX),
    (basic("admin", " " + ADMIN), "/version"),
    (basic("admin", ""), API),
    (basic(ADMIN, "hunter2"), AJAX),  # the token in the user name field
    ("Bearer hunter2", API),
    ("Bearer MLG_" + ADMIN[4:], AJAX),
    ("Bearer mlg" + ADMIN[4:], "/version"),
]


async def fake_mlflow(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await read_request_body(receive)
    await send_response(send, 200, b"3.17.2" if scope["path"] == "/version" else b"{}")


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[tuple[Gateway, str]]:
    with ServerThread(fake_mlflow, lifespan="off") as upstream:
        settings = load_settings(
            {"upstream.url": upstream.url, "storage.data_dir": str(tmp_path),
             "gateway.failed_login_limit": str(len(NOT_TOKENS)),
             "gateway.failed_login_interval": "60s", "tokens.cache_ttl": "0s"}, {}, None,
        ).settings  # fmt: skip
        built = build_gateway(
            settings, {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": ADMIN, "MLFLOW_GUARD_SECRET_KEY": KEY}
        )
        with ServerThread(built) as server:
            yield built, server.url


def wait_stored(gateway: Gateway, request_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = [r for _, r in AuditStore(gateway.engine).query(Filters(request_id=request_id))]
        if found:
            (record,) = found
            return record
        time.sleep(0.05)
    raise AssertionError(f"no audit record for {request_id}")


def test_secrets_without_the_prefix_never_reach_the_token_store_and_are_failed_logins(
    gateway: tuple[Gateway, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    built, url = gateway
    store = built.token_provider.store
    lookups: list[str] = []
    lookup = store.lookup

    def counted(secret: str) -> object:
        lookups.append(secret)
        return lookup(secret)

    monkeypatch.setattr(store, "lookup", counted)
    answers = [httpx.get(url + path, headers={"Authorization": auth}) for auth, path in NOT_TOKENS]
    assert lookups == []
    for answer in answers:
        assert answer.status_code == 401
        assert answer.headers["x-guard-reason"] == "invalid_credentials"
        assert len(answer.headers.get_list("www-authenticate")) == 2
    # Counted like any failed login: the address is now past its limit.
    over = httpx.get(url + "/version", headers={"Authorization": "Bearer hunter2"})
    assert (over.status_code, over.headers["x-guard-reason"]) == (429, "too_many_failures")
    assert lookups == []

    # Audited on their own, with fingerprints: no password, no token in clear.
    records = [wait_stored(built, a.headers["x-request-id"]) for a in answers]
    for record, (auth, _) in zip(records, NOT_TOKENS, strict=True):
        assert (record["status"], record["reason"]) == (401, "invalid_credentials")
        credential = record["credential"]
        assert credential["scheme"] == auth.split()[0].lower()
        text = json.dumps(record)
        assert "hunter2" not in text and ADMIN[4:] not in text
    assert records[0]["credential"]["username"] == "alice"
    assert "secret" not in records[0]["credential"]  # a person's password: not even hashed
    assert records[6]["credential"]["secret"].startswith("hmac:")  # a bearer is
    assert records[5]["credential"]["username"].startswith("hmac:")  # the token, as a name
    assert "secret" not in records[4]["credential"]  # an empty password has no fingerprint

    # The token itself still works, by Bearer and by Basic, from the same address.
    for auth in (
        f"Bearer {ADMIN}",
        "Basic " + base64.b64encode(f"admin:{ADMIN}".encode()).decode(),
    ):
        assert httpx.get(url + "/version", headers={"Authorization": auth}).status_code == 200
    assert lookups == [ADMIN, ADMIN]


@pytest.mark.parametrize(
    "value", ["x" * 47, "MLG_" + "a" * 43, "mlg" + "a" * 44, " " + ADMIN, ADMIN + "\n", "mlg_abc"]
)
def test_a_bootstrap_token_without_the_prefix_stops_the_gateway_being_built(
    tmp_path: Path, value: str
) -> None:
    settings = load_settings({"storage.data_dir": str(tmp_path / "data")}, {}, None).settings
    environ = {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": value, "MLFLOW_GUARD_SECRET_KEY": KEY}
    with pytest.raises(TokenError, match=r"MLFLOW_GUARD_BOOTSTRAP_TOKEN: .*mlg_ followed by"):
        build_gateway(settings, environ)
    assert not (tmp_path / "data").exists()  # refused before anything was created
