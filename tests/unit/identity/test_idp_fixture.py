"""The test OpenID Connect provider (tests/idp.py) does what the SSO and bearer tests rely on."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import httpx
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.conftest import free_port
from tests.idp import OidcProvider

pytestmark = pytest.mark.oidc

BACKCHANNEL_EVENT = "http://schemas.openid.net/event/backchannel-logout"


def part(token: str, index: int) -> dict[str, Any]:
    segment = token.split(".")[index]
    return dict(json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))))


def verify(token: str, jwks: dict[str, Any]) -> dict[str, Any]:
    """Check an RS256/PS256 signature against the key the header names; return the claims."""
    header = part(token, 0)
    (jwk,) = [k for k in jwks["keys"] if k["kid"] == header["kid"]]

    def number(name: str) -> int:
        return int.from_bytes(base64.urlsafe_b64decode(jwk[name] + "=" * (-len(jwk[name]) % 4)))

    key = rsa.RSAPublicNumbers(number("e"), number("n")).public_key()
    head, body, signature = token.split(".")
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    pad = (
        padding.PKCS1v15()
        if header["alg"] == "RS256"
        else padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    )
    key.verify(raw, f"{head}.{body}".encode(), pad, hashes.SHA256())
    return part(token, 1)


class Receiver:
    """A loopback HTTP listener that records back-channel logout POSTs and answers 200."""

    def __init__(self) -> None:
        received: list[dict[str, list[str]]] = []
        self.received = received
        self.arrived = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                received.append(parse_qs(self.rfile.read(length).decode()))
                outer.arrived.set()
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:
                pass

        outer = self
        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def idp(oidc_provider: OidcProvider) -> Iterator[OidcProvider]:
    try:
        yield oidc_provider
    finally:
        oidc_provider.reset()


def authorize_url(idp: OidcProvider, client_id: str, redirect_uri: str, **extra: str) -> str:
    params = {
        "client_id": client_id,
        "response_type": "code",
        "scope": "openid profile email groups",
        "redirect_uri": redirect_uri,
        "state": "the-state",
        "nonce": "the-nonce",
        **extra,
    }
    return f"{idp.metadata()['authorization_endpoint']}?{urlencode(params)}"


def code_flow(
    idp: OidcProvider, client: httpx.Client, client_id: str, secret: str, rp: str, user: str
) -> dict[str, Any]:
    """Log ``user`` in for a registered client; the token response."""
    verifier, challenge = idp.pkce_pair()
    redirect_uri = f"{rp}/guard/oidc/callback"
    url = authorize_url(
        idp, client_id, redirect_uri, code_challenge=challenge, code_challenge_method="S256"
    )
    callback = idp.login(client, url, user)
    query = parse_qs(urlsplit(callback).query)
    assert callback.startswith(redirect_uri + "?")
    assert query["state"] == ["the-state"] and query["iss"] == [idp.issuer]
    response = httpx.post(
        idp.metadata()["token_endpoint"],
        data={"grant_type": "authorization_code", "code": query["code"][0],
              "redirect_uri": redirect_uri, "code_verifier": verifier},
        auth=(client_id, secret),
        trust_env=False,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    return dict(response.json())


def test_discovery(idp: OidcProvider) -> None:
    meta = idp.metadata()
    port = idp.port
    assert meta["issuer"] == f"http://localhost:{port}"
    for endpoint in (
        "authorization_endpoint",
        "token_endpoint",
        "jwks_uri",
        "end_session_endpoint",
        "registration_endpoint",
        "userinfo_endpoint",
    ):
        assert meta[endpoint].startswith(f"http://localhost:{port}/"), endpoint  # fmt: skip
    assert meta["code_challenge_methods_supported"] == ["S256"]
    assert meta["response_types_supported"] == ["code"]
    assert meta["authorization_response_iss_parameter_supported"] is True
    assert meta["backchannel_logout_supported"] is True
    assert meta["backchannel_logout_session_supported"] is True
    assert {"openid", "profile", "email", "groups"} <= set(meta["scopes_supported"])
    jwks = idp.http.get(meta["jwks_uri"]).json()
    assert [k["kid"] for k in jwks["keys"]] == ["key-1"]
    assert all("d" not in k for k in jwks["keys"])
    assert jwks == idp.public_jwks(["key-1"])


def test_robot_gets_a_jwt_access_token(idp: OidcProvider) -> None:
    token = idp.token_for_robot("mlflow:read")
    header = part(token, 0)
    assert header == {"alg": "RS256", "typ": "at+jwt", "kid": "key-1"}
    claims = verify(token, idp.public_jwks())
    assert claims["iss"] == idp.issuer and claims["aud"] == "urn:mlflow-guard"
    assert claims["sub"] == claims["client_id"] == "mlflow-robot"
    assert claims["scope"] == "mlflow:read" and claims["groups"] == ["ci-pipelines"]
    assert claims["exp"] - claims["iat"] == 600 and "nonce" not in claims and claims["jti"]
    other = part(idp.token_for_robot(resource="urn:something-else"), 1)
    assert other["aud"] == "urn:something-else"
    with pytest.raises(RuntimeError, match="invalid_client"):
        idp.token_for_robot(client_secret="wrong")


def test_registered_robot_client(idp: OidcProvider) -> None:
    client_id, secret = idp.register_client(grant_types=["client_credentials"], groups=["deploy"])
    claims = part(idp.token_for_robot(client_id=client_id, client_secret=secret), 1)
    assert claims["client_id"] == client_id and claims["groups"] == ["deploy"]


def test_registered_client_logs_in_with_pkce(idp: OidcProvider) -> None:
    rp = f"http://127.0.0.1:{free_port()}"
    client_id, secret = idp.register_client(
        [f"{rp}/guard/oidc/callback"], [f"{rp}/"], f"{rp}/guard/oidc/backchannel-logout"
    )
    assert client_id and secret
    with httpx.Client(follow_redirects=False, trust_env=False) as browser:
        tokens = code_flow(idp, browser, client_id, secret, rp, "kc")
        assert {"id_token", "access_token", "refresh_token"} <= set(tokens)
        claims = verify(tokens["id_token"], idp.public_jwks())
        assert claims["aud"] == client_id and claims["nonce"] == "the-nonce" and claims["sid"]
        assert claims["sub"] == "kc" and claims["preferred_username"] == "kc"
        assert claims["groups"] == ["/org/risk team", "/org/ml/admins", "mlflow-users"]
        assert {"sub": "kc", "client_id": client_id, "sid": claims["sid"]} in idp.sessions()
        # The provider's cookies are on localhost, never on the gateway's 127.0.0.1.
        # (http.cookiejar spells a dotless host's domain "<host>.local").
        assert {c.domain for c in browser.cookies.jar} == {"localhost.local"}
        # PKCE is required: no code_challenge is an error sent back to the client.
        callback = idp.login(
            browser, authorize_url(idp, client_id, f"{rp}/guard/oidc/callback"), "kc"
        )
        assert parse_qs(urlsplit(callback).query)["error"] == ["invalid_request"]


def test_refresh_tokens_rotate_and_reuse_revokes_the_grant(idp: OidcProvider) -> None:
    rp = f"http://127.0.0.1:{free_port()}"
    client_id, secret = idp.register_client([f"{rp}/guard/oidc/callback"])
    with httpx.Client(follow_redirects=False, trust_env=False) as browser:
        first = code_flow(idp, browser, client_id, secret, rp, "bob")["refresh_token"]

    def refresh(token: str) -> httpx.Response:
        return idp.http.post(
            "/token", data={"grant_type": "refresh_token", "refresh_token": token},
            auth=(client_id, secret),
        )  # fmt: skip

    answer = refresh(first)
    assert answer.status_code == 200, answer.text
    second = answer.json()["refresh_token"]
    assert second != first and "id_token" in answer.json()
    reused = refresh(first)
    assert reused.status_code == 400 and reused.json()["error"] == "invalid_grant"
    assert refresh(second).json()["error"] == "invalid_grant"  # the grant is gone


def test_accounts_and_claim_changes(idp: OidcProvider) -> None:
    rp = f"http://127.0.0.1:{free_port()}"
    client_id, secret = idp.register_client([f"{rp}/guard/oidc/callback"])
    with httpx.Client(follow_redirects=False, trust_env=False) as browser:
        claims = part(code_flow(idp, browser, client_id, secret, rp, "unverified")["id_token"], 1)
    assert claims["sub"] == "unverified" and "preferred_username" not in claims
    assert claims["email_verified"] is False
    idp.set_account("renamed-later", preferred_username="before", groups=["g1"])
    with httpx.Client(follow_redirects=False, trust_env=False) as browser:
        first = part(code_flow(idp, browser, client_id, secret, rp, "renamed-later")["id_token"], 1)
    idp.set_account("renamed-later", preferred_username="after", groups=[])
    with httpx.Client(follow_redirects=False, trust_env=False) as browser:
        second = part(
            code_flow(idp, browser, client_id, secret, rp, "renamed-later")["id_token"], 1
        )
    assert (first["sub"], first["preferred_username"], first["groups"]) == (
        "renamed-later", "before", ["g1"],
    )  # fmt: skip
    assert (second["sub"], second["preferred_username"], second["groups"]) == (
        "renamed-later", "after", [],
    )  # fmt: skip


def test_backchannel_logout_reaches_a_loopback_receiver(
    idp: OidcProvider, receiver: Receiver
) -> None:
    rp = receiver.url
    client_id, secret = idp.register_client(
        [f"{rp}/guard/oidc/callback"], [f"{rp}/logged-out"], f"{rp}/guard/oidc/backchannel-logout"
    )
    with httpx.Client(follow_redirects=False, trust_env=False) as browser:
        tokens = code_flow(idp, browser, client_id, secret, rp, "alice")
        sid = part(tokens["id_token"], 1)["sid"]
        # The person logs out at the provider (RP-initiated logout, "Yes, sign me out").
        params = {"id_token_hint": tokens["id_token"], "state": "bye",
                  "post_logout_redirect_uri": f"{rp}/logged-out"}  # fmt: skip
        page = browser.get(f"{idp.metadata()['end_session_endpoint']}?{urlencode(params)}")
        assert page.status_code == 200
        xsrf = page.text.split('name="xsrf" value="')[1].split('"')[0]
        done = browser.post(
            f"{idp.issuer}/session/end/confirm", data={"xsrf": xsrf, "logout": "yes"}
        )
        assert done.status_code == 303
        assert done.headers["location"] == f"{rp}/logged-out?state=bye"
    assert receiver.arrived.wait(5), idp.events()
    (form,) = receiver.received
    token = form["logout_token"][0]
    assert part(token, 0)["typ"] == "logout+jwt"
    claims = verify(token, idp.public_jwks())
    assert claims["iss"] == idp.issuer and claims["aud"] == client_id
    assert claims["sub"] == "alice" and claims["sid"] == sid and claims["jti"]
    assert claims["events"] == {BACKCHANNEL_EVENT: {}} and "nonce" not in claims
    # And on demand, without a browser.
    receiver.arrived.clear()
    assert idp.backchannel_logout(client_id, "alice") == {"sent": True, "sid": sid}
    assert receiver.arrived.wait(5)
    assert part(receiver.received[1]["logout_token"][0], 1)["sid"] == sid


def test_key_rotation_and_jwks_fetch_count(idp: OidcProvider) -> None:
    before = idp.jwks_fetches()
    idp.use_keys("key-2", ["key-1", "key-2"])
    token = idp.token_for_robot()
    assert part(token, 0)["kid"] == "key-2"
    jwks = idp.http.get("/jwks").json()
    assert [k["kid"] for k in jwks["keys"]] == ["key-1", "key-2"]
    verify(token, jwks)
    assert idp.jwks_fetches() == before + 1
    # A kid the provider signs with but does not publish.
    idp.use_keys("key-3", ["key-1"], access_token_alg="PS256")
    token = idp.token_for_robot()
    assert (part(token, 0)["kid"], part(token, 0)["alg"]) == ("key-3", "PS256")
    assert "key-3" not in {k["kid"] for k in idp.http.get("/jwks").json()["keys"]}
    verify(token, idp.public_jwks())  # it is a real key-3 signature all the same
    idp.reset()
    assert part(idp.token_for_robot(), 0)["kid"] == "key-1"


def test_tokens_signed_here(idp: OidcProvider) -> None:
    token = idp.sign({"sub": "x", "aud": "urn:mlflow-guard"}, header={"typ": "at+jwt"})
    assert part(token, 0) == {"alg": "RS256", "typ": "at+jwt", "kid": "key-1"}
    assert verify(token, idp.public_jwks())["iss"] == idp.issuer
    no_kid = idp.sign({"sub": "x"}, kid=None)
    assert "kid" not in part(no_kid, 0)
    # A header naming key-1 over a key-2 signature does not verify with key-1.
    forged = idp.sign({"sub": "x"}, kid="key-1", key="key-2", alg="PS256")
    with pytest.raises(InvalidSignature):
        verify(forged, idp.public_jwks())


def test_injected_failures(idp: OidcProvider) -> None:
    with idp.failing(["/jwks"], 503):
        assert idp.http.get("/jwks").status_code == 503
        assert idp.http.get("/.well-known/openid-configuration").status_code == 200
    with idp.failing(["/token"], 0), pytest.raises(httpx.TransportError):
        idp.http.post("/token", data={"grant_type": "client_credentials"})
    assert idp.http.get("/jwks").status_code == 200


def test_without_the_fetch_override_loopback_backchannel_is_dropped(receiver: Receiver) -> None:
    """The trap the fetch override in server.mjs avoids: oidc-provider's SSRF guard."""
    idp = OidcProvider(free_port(), allow_loopback_fetch=False)
    idp.start()
    try:
        client_id, _ = idp.register_client(
            [f"{receiver.url}/cb"], backchannel_logout_uri=f"{receiver.url}/bcl"
        )
        result = idp.backchannel_logout(client_id, "alice", sid="some-sid")
        assert result["sent"] is False and "fetch failed" in result["error"]
        assert receiver.received == []
    finally:
        idp.stop()
