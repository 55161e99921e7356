"""A throwaway OpenID Connect provider for SSO and bearer-token tests: the npm package
``oidc-provider`` (pinned in tests/idp/package-lock.json, installed by ``make test`` with
``npm ci``) run by ``node tests/idp/server.mjs`` on a free loopback port.

What it offers (see ``OidcProvider``):

* Authorization code flow with PKCE required (S256 only), the RFC 9207 ``iss`` parameter on the
  callback, ``response_type=code`` only, no consent page (first-party: the requested scopes are
  granted at login), refresh tokens for every client allowed the ``refresh_token`` grant,
  rotated at every refresh; a used refresh token presented again revokes the whole grant
  (reuse detection: ``invalid_grant``, "refresh token already used").
* Claims: ``openid`` -> sub; ``profile`` -> preferred_username, name; ``email`` -> email,
  email_verified; ``groups`` -> groups. All of them are in the ID token too (not only /me), so
  ask for the ``groups`` scope to get groups (``oidc.scopes`` does not by default).
* ``ACCOUNTS`` below: log in with the account id (it becomes ``sub``) and any password on the
  provider's dev login page; unknown names log in too (preferred_username = the name, no
  groups). ``set_account`` changes claims at run time (a rename keeps ``sub``).
* Dynamic client registration (the gateway's port differs per test): ``register_client``.
  Registered clients are ``client_secret_basic`` with back-channel logout sid required.
* The static robot ``mlflow-robot`` (client credentials, groups ``["ci-pipelines"]``):
  ``token_for_robot`` returns an RFC 9068 JWT access token (header ``typ: at+jwt``, ``aud``
  ``urn:mlflow-guard`` unless another ``resource`` is asked for, claims sub = client_id =
  the client's id, scope, groups, jti, iat, exp = iat + 600).
* Keys: three RSA keys made here (``key-1`` signs and is the only one in /jwks at start,
  ``key-2`` and ``key-3`` are unpublished); ``use_keys`` switches the signing key and what
  /jwks publishes (ID, logout and access tokens alike), and ``sign`` makes any token with any
  of them (expired, wrong ``aud``, ``nonce`` in a logout token, ...). ``jwks_fetches`` counts
  GET /jwks.
* Back-channel logout: the real thing (browser logout at the provider with ``logout=yes``
  POSTs a logout token to every client of the session), or ``backchannel_logout`` to make the
  provider send one to a client now. ``events`` lists what happened (backchannel.success/error
  with the error text, grant.success, end_session.success, server_error).
* ``fail`` makes chosen paths answer an error, drop the connection or answer late.
* ``login`` walks the login page with an httpx client (no browser) and returns the callback
  URL the provider redirects to.

Traps (see also /work/shared/reference/test-components.md sections 2, 6 and 7):

* Cookies ignore ports: the issuer is ``http://localhost:PORT`` (the server is still bound to
  127.0.0.1 only), so the provider's cookies (``_session``, ``_interaction``) and the gateway's
  (on 127.0.0.1) never reach each other. Always talk to it through ``issuer``: the endpoints in
  the discovery document are built from the request's Host, so asking 127.0.0.1 gives
  127.0.0.1 endpoints (and cookies on 127.0.0.1).
* oidc-provider sends outgoing requests through an SSRF-guarded dispatcher that drops
  127.0.0.0/8: without the ``fetch`` override in server.mjs a back-channel logout to a gateway on
  loopback silently never arrives (only a ``backchannel.error`` event: "fetch failed"). Start
  with ``allow_loopback_fetch=False`` to see it. The receiver must answer 200 or 204, else it is
  a ``backchannel.error``; the provider never retries.
* ``sid`` is in ID and logout tokens only with ``backchannel_logout_session_required`` (on for
  ``register_client``). A logout token has ``typ: logout+jwt``, ``events``, ``jti``, ``iat``,
  ``exp`` (+120 s), never ``nonce``.
* No resource scopes in client metadata (``invalid_client_metadata``), and no default resource
  for the code flow: an auth-code access token bound to a resource is a JWT that /me refuses.
* Node 20 makes oidc-provider print "Unsupported runtime" and dev-adapter WARNINGs on stderr:
  harmless; readiness is our own ``ready`` line on stdout (stdout and stderr go to a log file,
  never a pipe nobody reads, which would block the provider once full).
* Everything (sessions, codes, registered clients, account changes) lives in the process's
  memory: it is one process per test session, so tests register their own clients and use
  distinct account ids when they change claims.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

IDP_DIR = Path(__file__).resolve().parent / "idp"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
ADMIN_TOKEN = "test-admin-token"  # also the initial access token for dynamic registration
ROBOT_CLIENT_ID = "mlflow-robot"
ROBOT_CLIENT_SECRET = "robot-secret"
ROBOT_GROUPS = ("ci-pipelines",)
RESOURCE = "urn:mlflow-guard"
RESOURCE_SCOPES = ("mlflow:read", "mlflow:write")
KIDS = ("key-1", "key-2", "key-3")
LOGIN_STEPS = 10  # redirects and forms one login may take

# Account id (= sub, and what is typed on the login page) -> claims.
ACCOUNTS: dict[str, dict[str, Any]] = {
    "alice": {
        "preferred_username": "alice", "name": "Alice Admin", "email": "alice@example.org",
        "email_verified": True, "groups": ["mlflow-admins", "mlflow-users"],
    },
    "bob": {
        "preferred_username": "bob", "name": "Bob User", "email": "bob@example.org",
        "email_verified": True, "groups": ["mlflow-users"],
    },
    "carol": {
        "preferred_username": "carol", "name": "Carol Nogroups", "email": "carol@example.org",
        "email_verified": True, "groups": [],
    },
    # preferred_username "dave" is also a user of the LDAP seed (tests/slapd.py): with both
    # providers on, whoever logs in second meets identity_conflict.
    "oidc-dave": {
        "preferred_username": "dave", "name": "Dave Elsewhere", "email": "dave@elsewhere.example",
        "email_verified": True, "groups": ["mlflow-users"],
    },
    # No preferred_username and an unverified email: the name falls back to sub ("unverified").
    "unverified": {
        "email": "unverified@example.org", "email_verified": False, "groups": ["mlflow-users"],
    },
    # No preferred_username, a verified email: the name falls back to the email.
    "verified-email": {
        "email": "verified@example.org", "email_verified": True, "groups": ["mlflow-users"],
    },
    # Keycloak-style group paths: "/" and a space in group names.
    "kc": {
        "preferred_username": "kc", "email": "kc@example.org", "email_verified": True,
        "groups": ["/org/risk team", "/org/ml/admins", "mlflow-users"],
    },
}  # fmt: skip


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int(value: int) -> str:
    return _b64(value.to_bytes((value.bit_length() + 7) // 8, "big"))


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str) -> dict[str, str]:
    """A private RSA JWK (``use: sig``, no ``alg``: the provider signs RS256 and PS256 with it)."""
    private = key.private_numbers()
    public = private.public_numbers
    return {
        "kty": "RSA", "kid": kid, "use": "sig", "n": _int(public.n), "e": _int(public.e),
        "d": _int(private.d), "p": _int(private.p), "q": _int(private.q),
        "dp": _int(private.dmp1), "dq": _int(private.dmq1), "qi": _int(private.iqmp),
    }  # fmt: skip


def public_jwk(jwk: dict[str, str]) -> dict[str, str]:
    return {name: jwk[name] for name in ("kty", "kid", "use", "n", "e")}


class _Forms(HTMLParser):
    """The forms of a page: action, method and the named inputs' values."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append({"action": a.get("action", ""), "method": a.get("method", "get"),
                               "fields": {}})  # fmt: skip
        elif tag in {"input", "button"} and self.forms and a.get("name"):
            if tag == "button" and a.get("type", "submit") == "submit":
                return  # buttons are chosen by the caller, not sent all at once
            self.forms[-1]["fields"][a["name"]] = a.get("value", "")


class OidcProvider:
    """``node tests/idp/server.mjs`` on a free loopback port, with ``ISSUER=http://localhost:PORT``.

    Started with ``start()``, stopped by its pid with ``stop()``; ``log()`` is its output.
    """

    admin_token = ADMIN_TOKEN
    robot_client_id = ROBOT_CLIENT_ID
    robot_client_secret = ROBOT_CLIENT_SECRET
    robot_groups = ROBOT_GROUPS
    resource = RESOURCE
    resource_scopes = RESOURCE_SCOPES
    accounts = ACCOUNTS
    kids = KIDS

    def __init__(self, port: int, allow_loopback_fetch: bool = True) -> None:
        node = shutil.which("node")
        if not node:
            raise RuntimeError("node is not installed (make test installs nodejs)")
        self.node: str = node
        if not (IDP_DIR / "node_modules" / "oidc-provider").is_dir():
            raise RuntimeError("tests/idp/node_modules is missing (make test runs npm ci there)")
        self.port = port
        self.issuer = f"http://localhost:{port}"
        self.allow_loopback_fetch = allow_loopback_fetch
        self.dir = Path(tempfile.mkdtemp(prefix="guard-idp-"))
        self.private_jwks = {
            kid: rsa_jwk(rsa.generate_private_key(public_exponent=65537, key_size=2048), kid)
            for kid in KIDS
        }
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0
        self._metadata: dict[str, Any] | None = None
        self._http: httpx.Client | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        began = time.monotonic()
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.dir),
            "PORT": str(self.port),
            "HOST": "127.0.0.1",
            "ISSUER": self.issuer,
            "ADMIN_TOKEN": ADMIN_TOKEN,
            "ROBOT_SECRET": ROBOT_CLIENT_SECRET,
            "IDP_JWKS": json.dumps({"keys": [self.private_jwks[kid] for kid in KIDS]}),
            "IDP_PUBLISHED": KIDS[0],
            "IDP_ACCOUNTS": json.dumps(ACCOUNTS),
            "ALLOW_LOOPBACK_FETCH": "1" if self.allow_loopback_fetch else "0",
            "NODE_ENV": "test",
        }
        with open(self.dir / "idp.log", "wb") as log:
            self.process = subprocess.Popen(
                [self.node, "server.mjs"],
                cwd=IDP_DIR,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while not re.search(r"^ready$", self.log(0), re.MULTILINE):
            if self.process.poll() is not None:
                raise RuntimeError(f"the IdP exited with {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the IdP was not ready in {START_TIMEOUT} s: {self.log()}")
            time.sleep(0.02)
        self._http = httpx.Client(base_url=self.issuer, trust_env=False, timeout=10.0)
        self.startup_seconds = time.monotonic() - began

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT)
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self, limit: int = 4000) -> str:
        """The end of the provider's output (all of it with ``limit=0``)."""
        try:
            return (self.dir / "idp.log").read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    @property
    def http(self) -> httpx.Client:
        """A client for the provider (base URL = issuer, no cookies kept between tests)."""
        if self._http is None:
            raise RuntimeError("the IdP is not started")
        return self._http

    def _admin(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self.http.request(
            method, path, json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        if response.status_code >= 400 and path != "/test/backchannel-logout":
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json()

    # -- discovery and clients -------------------------------------------------------------

    def metadata(self) -> dict[str, Any]:
        """The discovery document (read once)."""
        if self._metadata is None:
            response = self.http.get("/.well-known/openid-configuration")
            response.raise_for_status()
            self._metadata = response.json()
        return self._metadata

    def register_client(
        self,
        redirect_uris: Sequence[str] = (),
        post_logout_redirect_uris: Sequence[str] = (),
        backchannel_logout_uri: str | None = None,
        *,
        grant_types: Sequence[str] = ("authorization_code", "refresh_token"),
        token_endpoint_auth_method: str = "client_secret_basic",  # noqa: S107 - a method name
        backchannel_logout_session_required: bool = True,
        **metadata: Any,
    ) -> tuple[str, str]:
        """Register a client (RFC 7591) and return ``(client_id, client_secret)``.

        For the gateway: ``redirect_uris=[f"{gateway}/guard/oidc/callback"]``,
        ``backchannel_logout_uri=f"{gateway}/guard/oidc/backchannel-logout"``. A client for
        client credentials only: ``grant_types=["client_credentials"]`` (and ``groups=[...]``
        for the groups claim of its tokens). Other RFC 7591 metadata as keyword arguments.
        """
        body: dict[str, Any] = {
            "redirect_uris": list(redirect_uris),
            "post_logout_redirect_uris": list(post_logout_redirect_uris),
            "grant_types": list(grant_types),
            "response_types": ["code"] if "authorization_code" in grant_types else [],
            "token_endpoint_auth_method": token_endpoint_auth_method,
            **metadata,
        }
        if backchannel_logout_uri is not None:
            body["backchannel_logout_uri"] = backchannel_logout_uri
            body["backchannel_logout_session_required"] = backchannel_logout_session_required
        response = self.http.post(
            "/reg", json=body, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        )
        if response.status_code != 201:
            raise RuntimeError(f"registration failed: {response.status_code} {response.text}")
        client = response.json()
        return client["client_id"], client.get("client_secret", "")

    def token_for_robot(
        self,
        scope: str = "mlflow:read mlflow:write",
        *,
        client_id: str = ROBOT_CLIENT_ID,
        client_secret: str = ROBOT_CLIENT_SECRET,
        resource: str | None = None,
    ) -> str:
        """A client-credentials JWT access token (``typ: at+jwt``, ``aud`` = ``resource``,
        default urn:mlflow-guard) for the robot, or for a client registered with
        ``grant_types=["client_credentials"]``."""
        data = {"grant_type": "client_credentials", "scope": scope}
        if resource is not None:
            data["resource"] = resource
        response = self.http.post("/token", data=data, auth=(client_id, client_secret))
        if response.status_code != 200:
            raise RuntimeError(f"token request failed: {response.status_code} {response.text}")
        return str(response.json()["access_token"])

    # -- test controls ---------------------------------------------------------------------

    def set_account(self, account_id: str, **claims: Any) -> None:
        """Create or replace an account's claims (``sub`` stays ``account_id``)."""
        self._admin("POST", "/test/accounts", {"id": account_id, "claims": claims})

    def use_keys(
        self,
        signing_kid: str = KIDS[0],
        published_kids: Iterable[str] = (KIDS[0],),
        access_token_alg: str = "RS256",  # noqa: S107 - an algorithm name
    ) -> None:
        """Which key signs (ID, logout and access tokens) and which keys GET /jwks lists. A
        rotation: ``use_keys("key-2", ["key-1", "key-2"])``; an unknown kid:
        ``use_keys("key-3", ["key-1"])``. ``access_token_alg``: RS256 or PS256."""
        self._admin(
            "POST",
            "/test/keys",
            {"signing_kid": signing_kid, "published_kids": list(published_kids),
             "access_token_alg": access_token_alg},
        )  # fmt: skip

    def reset(self) -> None:
        """Back to the start: key-1 signs and is the only key published, no failures."""
        self.use_keys()
        self.fail([])

    def fail(self, paths: Iterable[str], status: int | None = 503, delay: float = 0.0) -> None:
        """Requests to these paths (e.g. ``/jwks``, ``/token``, ``/.well-known/openid-
        configuration``) wait ``delay`` seconds, then get ``status`` (0: the connection is
        dropped; None: the normal answer). ``fail([])`` ends it. Admin paths never fail."""
        self._admin("POST", "/test/failure", {"paths": list(paths), "status": status,
                                              "delay": delay})  # fmt: skip

    @contextlib.contextmanager
    def failing(
        self, paths: Iterable[str], status: int | None = 503, delay: float = 0.0
    ) -> Iterator[None]:
        self.fail(paths, status, delay)
        try:
            yield
        finally:
            self.fail([])

    def backchannel_logout(
        self, client_id: str, sub: str, sid: str | None = None
    ) -> dict[str, Any]:
        """Make the provider send ``client_id`` a logout token for ``sub`` now (``sid``: the
        given one, else that of the last ID token it issued to the client for ``sub``).
        Returns ``{"sent": bool, "sid": ..., "error": ...}``."""
        body: dict[str, Any] = {"client_id": client_id, "sub": sub}
        if sid is not None:
            body["sid"] = sid
        return dict(self._admin("POST", "/test/backchannel-logout", body))

    def events(self) -> list[dict[str, Any]]:
        """What the provider did: backchannel.success/error, grant.success, end_session.success,
        server_error, each with ``at`` (epoch seconds) and details."""
        return list(self._admin("GET", "/test/events")["events"])

    def sessions(self) -> list[dict[str, Any]]:
        """``{"client_id", "sub", "sid"}`` of every ID token issued, oldest first."""
        return list(self._admin("GET", "/test/events")["sessions"])

    def jwks_fetches(self) -> int:
        """How many times GET /jwks was asked since the start."""
        return int(self._admin("GET", "/test/events")["jwks_fetches"])

    def wait_for_event(
        self, type_: str, since: float = 0.0, timeout: float = 5.0
    ) -> dict[str, Any]:
        """The first event of this type at or after ``since`` (epoch seconds), polled until
        ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events():
                if event["type"] == type_ and event["at"] >= since:
                    return event
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {type_} event within {timeout} s: {self.events()}")
            time.sleep(0.05)

    # -- tokens made here ------------------------------------------------------------------

    def public_jwks(self, kids: Iterable[str] = KIDS) -> dict[str, Any]:
        return {"keys": [public_jwk(self.private_jwks[kid]) for kid in kids]}

    def private_key(self, kid: str = KIDS[0]) -> rsa.RSAPrivateKey:
        jwk = self.private_jwks[kid]

        def number(name: str) -> int:
            return int.from_bytes(base64.urlsafe_b64decode(jwk[name] + "=" * (-len(jwk[name]) % 4)))

        public = rsa.RSAPublicNumbers(number("e"), number("n"))
        return rsa.RSAPrivateNumbers(
            number("p"), number("q"), number("d"), number("dp"), number("dq"), number("qi"), public
        ).private_key()

    def sign(
        self,
        claims: dict[str, Any],
        *,
        kid: str | None = KIDS[0],
        alg: str = "RS256",
        header: dict[str, Any] | None = None,
        key: str | None = None,
    ) -> str:
        """A JWS made with the provider's own key ``key`` (default: the one named ``kid``):
        RS256 or PS256. ``header`` entries are added to (or, as None, removed from)
        ``{"alg", "typ": "JWT", "kid"}``, e.g. ``{"typ": "at+jwt"}`` or ``{"kid": None}``.
        Default claims: ``iss`` = issuer, ``iat`` = now, ``exp`` = now + 300."""
        now = int(time.time())
        body = {"iss": self.issuer, "iat": now, "exp": now + 300, **claims}
        head: dict[str, Any] = {"alg": alg, "typ": "JWT", "kid": kid}
        for name, value in (header or {}).items():
            head[name] = value
        head = {k: v for k, v in head.items() if v is not None}
        signing_input = (
            f"{_b64(json.dumps(head).encode())}.{_b64(json.dumps(body).encode())}".encode()
        )
        private = self.private_key(key or kid or KIDS[0])
        if alg == "RS256":
            signature = private.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        elif alg == "PS256":
            pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
            signature = private.sign(signing_input, pss, hashes.SHA256())
        else:
            raise ValueError(f"sign() makes RS256 and PS256 only, not {alg}")
        return f"{signing_input.decode()}.{_b64(signature)}"

    # -- logging in without a browser ------------------------------------------------------

    def login(
        self,
        client: httpx.Client,
        url: str,
        username: str,
        password: str = "any",  # noqa: S107 - the dev login page takes any password
    ) -> str:
        """Follow ``url`` (the provider's authorization URL, or a gateway URL redirecting
        there) through the provider's pages with ``client`` (``follow_redirects=False``; it
        keeps the provider's cookies, so a second login in the same client is silent), typing
        ``username``; returns the first URL outside the provider it redirects to (the
        callback with ``code``, ``state`` and ``iss``, or with ``error``)."""
        origin = f"{urlsplit(self.issuer).scheme}://{urlsplit(self.issuer).netloc}"
        response = client.get(url)
        for _ in range(LOGIN_STEPS):
            if response.is_redirect:
                target = urljoin(str(response.url), response.headers["location"])
                if not target.startswith(origin + "/"):
                    return target
                response = client.get(target)
                continue
            parser = _Forms()
            parser.feed(response.text)
            if response.status_code != 200 or not parser.forms:
                raise RuntimeError(
                    f"unexpected page at {response.url}: {response.status_code} "
                    f"{response.text[:500]}"
                )
            form = parser.forms[0]
            fields = dict(form["fields"])
            if "login" in fields or form["fields"].get("prompt") == "login":
                fields.update({"login": username, "password": password})
            action = urljoin(str(response.url), form["action"])
            response = client.post(action, data=fields)
        raise RuntimeError(f"login did not leave the provider in {LOGIN_STEPS} steps")

    def pkce_pair(self) -> tuple[str, str]:
        """``(verifier, S256 challenge)`` for driving the provider directly in tests."""
        verifier = _b64(os.urandom(32))
        return verifier, _b64(hashlib.sha256(verifier.encode()).digest())
