"""guard.identity.oidc: discovery, keys and every token check, against a small provider on
127.0.0.1 (aiohttp) whose keys are generated here (joserfc). Each refused token is its own test."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import pytest
from aiohttp import web
from joserfc import jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey
from joserfc.jws import JWSRegistry

from guard.identity.oidc import (
    BACKCHANNEL_EVENT,
    Issuer,
    IssuerMisconfigured,
    IssuerUnavailable,
    ProviderHttp,
    TokenInvalid,
    parse_metadata,
    unverified_issuer,
    validate_provider_url,
)

T = TypeVar("T")
CLIENT = "mlflow-gateway"
AUDIENCE = "urn:mlflow-guard"
ALGS = ("RS256", "PS256", "ES256")
NOW = 1_800_000_000


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def raw_sign(header: dict[str, Any], claims: Any, key: Any) -> str:
    """A compact JWS with exactly this header (no typ added, no header checks): forgeries too."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    with warnings.catch_warnings():  # EdDSA: "deprecated via RFC 9864"
        warnings.simplefilter("ignore", SecurityWarning)
        alg = JWSRegistry(algorithms=[header["alg"]]).get_alg(header["alg"])
    return f"{signing_input}.{b64(alg.sign(signing_input.encode(), key))}"


@dataclass
class Provider:
    """A provider on 127.0.0.1: discovery, JWKS, token endpoint; counts hits per path."""

    url: str = ""
    key: RSAKey = field(default_factory=lambda: RSAKey.generate_key(2048, {"kid": "k1"}))
    hits: Counter[str] = field(default_factory=Counter)
    published: list[dict[str, Any]] = field(default_factory=list)
    document: dict[str, Any] = field(default_factory=dict)
    token_answer: tuple[int, dict[str, Any]] = (200, {"token_type": "Bearer", "id_token": "x"})
    token_requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    down: bool = False

    def sign(
        self,
        claims: dict[str, Any],
        header: dict[str, Any] | None = None,
        key: Any = None,
    ) -> str:
        head = {"alg": "RS256", "kid": "k1", **(header or {})}
        return raw_sign(head, claims, key or self.key)

    def claims(self, **extra: Any) -> dict[str, Any]:
        base = {"iss": self.url, "iat": NOW, "exp": NOW + 300}
        return {k: v for k, v in {**base, **extra}.items() if v is not None}


@asynccontextmanager
async def provider(issuer_path: str = "", host: str = "127.0.0.1") -> AsyncIterator[Provider]:
    p = Provider()
    p.published = [p.key.as_dict(private=False)]

    async def discovery(request: web.Request) -> web.Response:
        p.hits["discovery"] += 1
        if p.down:
            return web.Response(status=503)
        return web.json_response(p.document)

    async def jwks(request: web.Request) -> web.Response:
        p.hits["jwks"] += 1
        if p.down:
            return web.Response(status=503)
        return web.json_response({"keys": p.published})

    async def token(request: web.Request) -> web.Response:
        p.hits["token"] += 1
        form = dict(await request.post())
        p.token_requests.append((request.headers.get("authorization", ""), form))  # type: ignore[arg-type]
        status, body = p.token_answer
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_get(issuer_path + "/.well-known/openid-configuration", discovery)
    app.router.add_get("/jwks", jwks)
    app.router.add_post("/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://{host}:{port}"
    p.url = base + issuer_path
    p.document = {
        "issuer": p.url,
        "authorization_endpoint": f"{base}/auth",
        "token_endpoint": f"{base}/token",
        "jwks_uri": f"{base}/jwks",
        "end_session_endpoint": f"{base}/session/end",
        "authorization_response_iss_parameter_supported": True,
        "code_challenge_methods_supported": ["S256"],
    }
    try:
        yield p
    finally:
        await runner.cleanup()


class Clock:
    def __init__(self) -> None:
        self.wall = float(NOW)
        self.mono = 1000.0


def scenario(body: Callable[[Provider, Issuer, Clock], Awaitable[T]], **issuer_options: Any) -> T:
    async def main() -> T:
        http = ProviderHttp()
        clock = Clock()
        async with provider() as p:
            issuer = Issuer(
                p.url, http=http, timeout=5.0, jwks_refresh_interval=60.0,
                clock=lambda: clock.wall, monotonic=lambda: clock.mono, **issuer_options,
            )  # fmt: skip
            try:
                return await body(p, issuer, clock)
            finally:
                await http.close()

    return asyncio.run(main())


def access(p: Provider, **extra: Any) -> dict[str, Any]:
    return p.claims(
        **{"aud": AUDIENCE, "sub": "mlflow-robot", "client_id": "mlflow-robot", **extra}
    )


async def verify_access(issuer: Issuer, token: str, **options: Any) -> dict[str, Any]:
    return await issuer.verify_access_token(
        token, audience=AUDIENCE, algorithms=ALGS, leeway=30, **options
    )


def refused(check: Callable[[Provider, Issuer], Awaitable[Any]], match: str) -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        with pytest.raises(TokenInvalid, match=match):
            await check(p, issuer)

    scenario(body)


# -- discovery -----------------------------------------------------------------------------------


def test_metadata_is_discovered_and_cached() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        first = await issuer.metadata()
        second = await issuer.metadata()
        assert first is second
        assert first.issuer == p.url
        assert first.token_endpoint == p.document["token_endpoint"]
        assert first.end_session_endpoint == p.document["end_session_endpoint"]
        assert first.iss_parameter_supported is True
        assert first.code_challenge_methods == ("S256",)
        assert first.get("authorization_endpoint") == p.document["authorization_endpoint"]
        assert p.hits["discovery"] == 1

    scenario(body)


def test_issuer_with_a_path_reads_discovery_under_it() -> None:
    async def main() -> None:
        http = ProviderHttp()
        async with provider("/realms/ml") as p:
            metadata = await Issuer(p.url, http=http).metadata()
            assert metadata.issuer.endswith("/realms/ml")
        await http.close()

    run(main())


def test_discovery_naming_another_issuer_is_refused() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        p.document["issuer"] = p.url + "/"
        with pytest.raises(IssuerMisconfigured, match="names issuer"):
            await issuer.metadata()

    scenario(body)


def test_provider_down_is_unavailable_and_not_retried_on_every_call() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        p.down = True
        with pytest.raises(IssuerUnavailable, match="HTTP 503"):
            await issuer.metadata()
        with pytest.raises(IssuerUnavailable, match="moments ago"):
            await issuer.metadata()
        assert p.hits["discovery"] == 1
        clock.mono += 5
        p.down = False
        assert (await issuer.metadata()).issuer == p.url

    scenario(body)


def test_unreachable_provider_is_unavailable() -> None:
    async def main() -> None:
        http = ProviderHttp()
        async with provider() as p:
            url = p.url
        with pytest.raises(IssuerUnavailable):  # the port is closed now
            await Issuer(url, http=http, timeout=2).metadata()
        await http.close()

    run(main())


def test_cached_metadata_survives_an_outage() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        first = await issuer.metadata()
        p.down = True
        clock.mono += 7200
        assert await issuer.metadata() is first

    scenario(body)


@pytest.mark.parametrize(
    "endpoint", ["jwks_uri", "token_endpoint", "authorization_endpoint", "end_session_endpoint"]
)
def test_http_endpoint_of_a_non_loopback_issuer_is_refused(endpoint: str) -> None:
    document = {
        "issuer": "https://idp.example.com",
        "jwks_uri": "https://idp.example.com/jwks",
        "token_endpoint": "https://idp.example.com/token",
        "authorization_endpoint": "https://idp.example.com/auth",
        "end_session_endpoint": "https://idp.example.com/logout",
    }
    assert parse_metadata(document, "https://idp.example.com").jwks_uri.startswith("https:")
    document[endpoint] = document[endpoint].replace("https:", "http:")
    with pytest.raises(IssuerMisconfigured, match="must be https"):
        parse_metadata(document, "https://idp.example.com")


def test_http_is_refused_on_loopback_when_not_allowed() -> None:
    document = {"issuer": "http://127.0.0.1:9", "jwks_uri": "http://127.0.0.1:9/jwks"}
    assert parse_metadata(document, "http://127.0.0.1:9").jwks_uri
    with pytest.raises(IssuerMisconfigured):
        parse_metadata(document, "http://127.0.0.1:9", allow_insecure_loopback=False)


def test_discovery_without_jwks_uri_is_refused() -> None:
    with pytest.raises(IssuerMisconfigured, match="jwks_uri"):
        parse_metadata({"issuer": "https://a.example"}, "https://a.example")


@pytest.mark.parametrize(
    ("url", "ok"),
    [
        ("https://idp.example.com", True),
        ("http://127.0.0.1:8080", True),
        ("http://localhost:8080/realms/x", True),
        ("http://[::1]:8080", True),
        ("http://idp.example.com", False),
        ("http://127.0.0.1.example.com", False),
        ("https://user:pw@idp.example.com", False),
        ("https://idp.example.com/#frag", False),
        ("ftp://idp.example.com", False),
        ("", False),
    ],
)
def test_provider_urls(url: str, ok: bool) -> None:
    assert (validate_provider_url(url) is None) is ok


def test_issuer_must_be_https_except_loopback() -> None:
    with pytest.raises(ValueError, match="https"):
        Issuer("http://idp.example.com", http=ProviderHttp())


# -- access tokens (RFC 9068) --------------------------------------------------------------------


def test_access_token_is_verified() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        claims = await verify_access(issuer, p.sign(access(p), {"typ": "at+jwt"}))
        assert claims["client_id"] == "mlflow-robot"
        assert p.hits["jwks"] == 1
        await verify_access(issuer, p.sign(access(p), {"typ": "application/at+jwt"}))
        await verify_access(issuer, p.sign(access(p)))  # no typ: issuers without RFC 9068
        await verify_access(issuer, p.sign(access(p, aud=["other", AUDIENCE])))
        assert p.hits["jwks"] == 1  # keys cached

    scenario(body)


def test_es256_token_with_its_key() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        ec = ECKey.generate_key("P-256", {"kid": "e1"})
        p.published.append(ec.as_dict(private=False))
        token = p.sign(access(p), {"alg": "ES256", "kid": "e1"}, ec)
        assert (await verify_access(issuer, token))["sub"] == "mlflow-robot"

    scenario(body)


def test_eddsa_token_with_its_key() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        ed = OKPKey.generate_key("Ed25519", {"kid": "ed1"})
        p.published.append(ed.as_dict(private=False))
        token = p.sign(access(p), {"alg": "EdDSA", "kid": "ed1"}, ed)
        claims = await issuer.verify_access_token(
            token, audience=AUDIENCE, algorithms=["EdDSA"], leeway=0
        )
        assert claims["sub"] == "mlflow-robot"

    scenario(body)


def test_unregistered_header_names_are_ignored() -> None:
    # RFC 7515 4: header parameters a recipient does not understand are ignored (unless crit).
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        token = p.sign(access(p), {"x5t": "abc", "vendor": "x", "cty": "JWT"})
        assert (await verify_access(issuer, token))["sub"] == "mlflow-robot"

    scenario(body)


def test_alg_none_is_refused() -> None:
    def none_token(p: Provider) -> str:
        header = b64(json.dumps({"alg": "none", "kid": "k1"}).encode())
        return f"{header}.{b64(json.dumps(access(p)).encode())}.AAAA"

    refused(lambda p, issuer: verify_access(issuer, none_token(p)), "alg 'none'")


def test_alg_none_is_refused_even_if_a_caller_allows_it() -> None:
    def none_token(p: Provider) -> str:
        header = b64(json.dumps({"alg": "none", "kid": "k1"}).encode())
        return f"{header}.{b64(json.dumps(access(p)).encode())}.AAAA"

    refused(
        lambda p, issuer: issuer.verify_access_token(
            none_token(p), audience=AUDIENCE, algorithms=["none", "RS256"], leeway=0
        ),
        "alg 'none'",
    )


def test_hs256_signed_with_the_public_key_is_refused() -> None:
    def forged(p: Provider) -> str:
        # The classic confusion: the verifier's public key (PEM, as published) as HMAC secret.
        header = b64(json.dumps({"alg": "HS256", "kid": "k1"}).encode())
        signing_input = f"{header}.{b64(json.dumps(access(p)).encode())}"
        secret = p.key.as_pem(private=False)
        mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64(mac)}"

    refused(lambda p, issuer: verify_access(issuer, forged(p)), "alg 'HS256'")
    refused(
        lambda p, issuer: issuer.verify_access_token(
            forged(p), audience=AUDIENCE, algorithms=["HS256", "RS256"], leeway=0
        ),
        "alg 'HS256'",
    )


def test_algorithm_outside_the_allowed_list_is_refused() -> None:
    refused(
        lambda p, issuer: issuer.verify_access_token(
            p.sign(access(p)), audience=AUDIENCE, algorithms=["ES256"], leeway=0
        ),
        "alg 'RS256' is not allowed",
    )


def test_ps256_header_over_an_rs256_key_mismatch_is_refused() -> None:
    # PS256 allowed, key is RSA: the signature must be PS256's, not RS256's relabelled.
    def relabelled(p: Provider) -> str:
        token = p.sign(access(p))
        _, payload, signature = token.split(".")
        header = b64(json.dumps({"alg": "PS256", "kid": "k1"}).encode())
        return f"{header}.{payload}.{signature}"

    refused(lambda p, issuer: verify_access(issuer, relabelled(p)), "signature|bad")


def test_es256_header_with_an_rsa_kid_is_refused() -> None:
    def wrong(p: Provider) -> str:
        ec = ECKey.generate_key("P-256")
        return p.sign(access(p), {"alg": "ES256", "kid": "k1"}, ec)

    refused(lambda p, issuer: verify_access(issuer, wrong(p)), "not a key for ES256")


@pytest.mark.parametrize("header", ["jwk", "jku", "x5u", "x5c"])
def test_key_carrying_headers_are_refused(header: str) -> None:
    def carrying(p: Provider) -> str:
        attacker = RSAKey.generate_key(2048, {"kid": "k1"})
        value: Any = {
            "jwk": attacker.as_dict(private=False),
            "jku": "http://127.0.0.1:1/attacker-jwks",
            "x5u": "http://127.0.0.1:1/cert.pem",
            "x5c": ["MIIB"],
        }[header]
        return p.sign(access(p), {header: value}, attacker)

    refused(lambda p, issuer: verify_access(issuer, carrying(p)), f"header {header} refused")


def test_embedded_jwk_signed_by_the_real_key_is_still_refused() -> None:
    refused(
        lambda p, issuer: verify_access(
            issuer, p.sign(access(p), {"jwk": p.key.as_dict(private=False)})
        ),
        "header jwk refused",
    )


def test_crit_header_is_refused() -> None:
    refused(
        lambda p, issuer: verify_access(issuer, p.sign(access(p), {"crit": ["exp"]})),
        "header crit refused",
    )


def test_missing_kid_is_refused() -> None:
    def no_kid(p: Provider) -> str:
        return jwt.encode({"alg": "RS256"}, access(p), p.key)

    refused(lambda p, issuer: verify_access(issuer, no_kid(p)), "no kid")


def test_tampered_payload_is_refused() -> None:
    def tampered(p: Provider) -> str:
        header, _, signature = p.sign(access(p)).split(".")
        payload = b64(json.dumps(access(p, sub="admin")).encode())
        return f"{header}.{payload}.{signature}"

    refused(lambda p, issuer: verify_access(issuer, tampered(p)), "bad signature|signature")


def test_signed_by_another_key_with_a_known_kid_is_refused() -> None:
    other = RSAKey.generate_key(2048, {"kid": "k1"})
    refused(lambda p, issuer: verify_access(issuer, p.sign(access(p), key=other)), "signature")


def test_unknown_kid_refetches_once_then_is_refused_without_a_storm() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        await verify_access(issuer, p.sign(access(p)))
        assert p.hits["jwks"] == 1
        stranger = RSAKey.generate_key(2048, {"kid": "k9"})
        with pytest.raises(TokenInvalid, match="unknown kid"):
            await verify_access(issuer, p.sign(access(p), {"kid": "k9"}, stranger))
        assert p.hits["jwks"] == 2  # one refetch for the unknown kid
        for n in range(20):
            with pytest.raises(TokenInvalid, match="unknown kid"):
                await verify_access(issuer, p.sign(access(p), {"kid": f"x{n}"}, stranger))
        assert p.hits["jwks"] == 2  # no more within the interval
        clock.mono += 61
        with pytest.raises(TokenInvalid, match="unknown kid"):
            await verify_access(issuer, p.sign(access(p), {"kid": "k9"}, stranger))
        assert p.hits["jwks"] == 3

    scenario(body)


def test_parallel_unknown_kids_share_one_refetch() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        await verify_access(issuer, p.sign(access(p)))
        stranger = RSAKey.generate_key(2048, {"kid": "k9"})
        tokens = [p.sign(access(p), {"kid": f"z{n}"}, stranger) for n in range(10)]
        results = await asyncio.gather(
            *(verify_access(issuer, t) for t in tokens), return_exceptions=True
        )
        assert all(isinstance(r, TokenInvalid) for r in results)
        assert p.hits["jwks"] == 2

    scenario(body)


def test_rotated_key_is_found_by_the_refetch() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        await verify_access(issuer, p.sign(access(p)))
        new = RSAKey.generate_key(2048, {"kid": "k2"})
        p.published.append(new.as_dict(private=False))
        claims = await verify_access(issuer, p.sign(access(p), {"kid": "k2"}, new))
        assert claims["sub"] == "mlflow-robot"
        assert p.hits["jwks"] == 2

    scenario(body)


def test_keys_are_bounded_and_only_public_signing_keys_with_a_kid_are_kept() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        extra = [RSAKey.generate_key(2048, {"kid": f"r{n}"}) for n in range(4)]
        oct_key = OctKey.generate_key(256, {"kid": "hmac"})
        p.published = [
            oct_key.as_dict(),
            {**extra[0].as_dict(private=False), "use": "enc"},
            {k: v for k, v in extra[1].as_dict(private=False).items() if k != "kid"},
            p.key.as_dict(private=False),
            *(k.as_dict(private=False) for k in extra[2:]),
        ]
        await verify_access(issuer, p.sign(access(p)))
        assert issuer._keys is not None
        assert list(issuer._keys) == ["k1", "r2"]  # max_keys=2: r3 dropped
        hs = raw_sign({"alg": "HS256", "kid": "hmac"}, access(p), oct_key)
        with pytest.raises(TokenInvalid, match="alg 'HS256'"):
            await verify_access(issuer, hs)
        with pytest.raises(TokenInvalid, match=r"unknown kid|alg"):
            await issuer.verify_access_token(
                hs, audience=AUDIENCE, algorithms=["HS256", "RS256"], leeway=0
            )

    scenario(body, max_keys=2)


def test_keys_unreachable_is_unavailable() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        await issuer.metadata()
        p.down = True
        with pytest.raises(IssuerUnavailable):
            await verify_access(issuer, p.sign(access(p)))

    scenario(body)


def test_cached_keys_survive_an_outage_when_stale() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        await verify_access(issuer, p.sign(access(p)))
        p.down = True
        clock.mono += 7200
        clock.wall += 0
        assert (await verify_access(issuer, p.sign(access(p))))["sub"] == "mlflow-robot"

    scenario(body)


def test_expired_access_token_is_refused() -> None:
    refused(
        lambda p, issuer: verify_access(issuer, p.sign(access(p, iat=NOW - 400, exp=NOW - 31))),
        "expired",
    )


def test_expiry_within_leeway_is_accepted() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        await verify_access(issuer, p.sign(access(p, iat=NOW - 400, exp=NOW - 29)))

    scenario(body)


def test_missing_exp_is_refused() -> None:
    refused(lambda p, issuer: verify_access(issuer, p.sign(access(p, exp=None))), "exp")


def test_not_yet_valid_access_token_is_refused() -> None:
    refused(
        lambda p, issuer: verify_access(issuer, p.sign(access(p, nbf=NOW + 31))),
        "nbf|not yet valid",
    )


def test_issued_in_the_future_is_refused() -> None:
    refused(lambda p, issuer: verify_access(issuer, p.sign(access(p, iat=NOW + 60))), "iat|future")


def test_wrong_iss_is_refused() -> None:
    refused(lambda p, issuer: verify_access(issuer, p.sign(access(p, iss=p.url + "/other"))), "iss")


def test_wrong_aud_is_refused() -> None:
    refused(
        lambda p, issuer: verify_access(issuer, p.sign(access(p, aud="urn:other"))),
        "aud does not name this gateway",
    )


def test_missing_aud_is_refused() -> None:
    refused(lambda p, issuer: verify_access(issuer, p.sign(access(p, aud=None))), "aud")


def test_access_token_with_a_nonce_is_refused() -> None:
    refused(lambda p, issuer: verify_access(issuer, p.sign(access(p, nonce="n"))), "nonce claim")


@pytest.mark.parametrize("typ", ["logout+jwt", "id_token+jwt", "secevent+jwt", "JOSE"])
def test_access_token_of_another_typ_is_refused(typ: str) -> None:
    refused(
        lambda p, issuer: verify_access(issuer, p.sign(access(p), {"typ": typ})), "not at\\+jwt"
    )


def test_require_typ_refuses_a_generic_jwt() -> None:
    refused(
        lambda p, issuer: verify_access(
            issuer, p.sign(access(p), {"typ": "JWT"}), require_typ=True
        ),
        "not at\\+jwt",
    )


@pytest.mark.parametrize(
    "token", ["mlg_abc", "a.b", "a.b.c.d", "e30.e30.", "e30.e30.e30 ", "ünïcode.e30.e30"]
)
def test_not_a_jwt_is_refused(token: str) -> None:
    refused(lambda p, issuer: verify_access(issuer, token), "not a signed JWT")


def test_payload_that_is_not_an_object_is_refused() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        listed = raw_sign({"alg": "RS256", "kid": "k1"}, [1, 2], p.key)  # signed JSON list
        with pytest.raises(TokenInvalid, match="not a JSON object"):
            await verify_access(issuer, listed)

    scenario(body)


def test_unverified_issuer_reads_iss_only() -> None:
    token = jwt.encode({"alg": "RS256"}, {"iss": "https://a"}, RSAKey.generate_key(2048))
    assert unverified_issuer(token) == "https://a"
    assert unverified_issuer("mlg_x") is None
    assert unverified_issuer("e30.bm90LWpzb24.e30") is None
    assert unverified_issuer(f"e30.{b64(b'[1]')}.e30") is None


# -- ID tokens -----------------------------------------------------------------------------------


def id_claims(p: Provider, **extra: Any) -> dict[str, Any]:
    return p.claims(**{"aud": CLIENT, "sub": "alice", "nonce": "n-123", "sid": "s-1", **extra})


async def verify_id(issuer: Issuer, token: str, nonce: str = "n-123") -> dict[str, Any]:
    return await issuer.verify_id_token(
        token, client_id=CLIENT, nonce=nonce, algorithms=ALGS, leeway=30
    )


def test_id_token_is_verified() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        claims = await verify_id(issuer, p.sign(id_claims(p), {"typ": "JWT"}))
        assert claims["sub"] == "alice"
        claims = await verify_id(issuer, p.sign(id_claims(p, aud=[CLIENT, "x"], azp=CLIENT)))
        assert claims["azp"] == CLIENT

    scenario(body)


def test_id_token_without_nonce_is_refused() -> None:
    refused(lambda p, issuer: verify_id(issuer, p.sign(id_claims(p, nonce=None))), "nonce")


def test_id_token_with_another_nonce_is_refused() -> None:
    refused(lambda p, issuer: verify_id(issuer, p.sign(id_claims(p, nonce="n-999"))), "nonce")


def test_id_token_check_needs_a_nonce() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        with pytest.raises(ValueError, match="nonce"):
            await verify_id(issuer, p.sign(id_claims(p)), nonce="")

    scenario(body)


def test_id_token_for_another_audience_is_refused() -> None:
    refused(
        lambda p, issuer: verify_id(issuer, p.sign(id_claims(p, aud="other-client"))),
        "aud does not name this client",
    )


def test_id_token_with_several_audiences_and_no_azp_is_refused() -> None:
    refused(
        lambda p, issuer: verify_id(issuer, p.sign(id_claims(p, aud=[CLIENT, "other"]))),
        "azp",
    )


def test_id_token_with_another_azp_is_refused() -> None:
    refused(
        lambda p, issuer: verify_id(
            issuer, p.sign(id_claims(p, aud=[CLIENT, "other"], azp="other"))
        ),
        "azp",
    )


def test_id_token_wrong_iss_is_refused() -> None:
    refused(
        lambda p, issuer: verify_id(issuer, p.sign(id_claims(p, iss="http://127.0.0.1:1"))),
        "iss",
    )


def test_id_token_expired_is_refused() -> None:
    refused(lambda p, issuer: verify_id(issuer, p.sign(id_claims(p, exp=NOW - 60))), "expired")


def test_id_token_not_yet_valid_is_refused() -> None:
    refused(
        lambda p, issuer: verify_id(issuer, p.sign(id_claims(p, nbf=NOW + 120))),
        "nbf|not yet valid",
    )


def test_id_token_without_sub_is_refused() -> None:
    refused(lambda p, issuer: verify_id(issuer, p.sign(id_claims(p, sub=None))), "sub")


def test_id_token_without_iat_is_refused() -> None:
    refused(lambda p, issuer: verify_id(issuer, p.sign(id_claims(p, iat=None))), "iat")


@pytest.mark.parametrize("typ", ["at+jwt", "logout+jwt", "application/logout+jwt"])
def test_other_kinds_of_jwt_are_not_id_tokens(typ: str) -> None:
    refused(lambda p, issuer: verify_id(issuer, p.sign(id_claims(p), {"typ": typ})), "typ")


def test_id_token_alg_none_is_refused() -> None:
    def none_token(p: Provider) -> str:
        header = b64(json.dumps({"alg": "none", "kid": "k1"}).encode())
        return f"{header}.{b64(json.dumps(id_claims(p)).encode())}."

    refused(lambda p, issuer: verify_id(issuer, none_token(p)), "not a signed JWT|alg")


# -- logout tokens -------------------------------------------------------------------------------


def logout_claims(p: Provider, **extra: Any) -> dict[str, Any]:
    base = p.claims(
        aud=CLIENT, sub="alice", sid="s-1", jti="j-1", exp=NOW + 120,
        events={BACKCHANNEL_EVENT: {}},
    )  # fmt: skip
    return {k: v for k, v in {**base, **extra}.items() if v is not None}


async def verify_logout(issuer: Issuer, token: str) -> dict[str, Any]:
    return await issuer.verify_logout_token(
        token, client_id=CLIENT, algorithms=ALGS, leeway=30, max_age=120
    )


def logout(p: Provider, typ: str | None = "logout+jwt", **extra: Any) -> str:
    return p.sign(logout_claims(p, **extra), {"typ": typ} if typ else {})


def test_logout_token_is_verified() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        assert (await verify_logout(issuer, logout(p)))["sid"] == "s-1"
        assert (await verify_logout(issuer, logout(p, typ=None)))["jti"] == "j-1"
        assert "sub" not in await verify_logout(issuer, logout(p, sub=None))
        assert "sid" not in await verify_logout(issuer, logout(p, sid=None))
        await verify_logout(issuer, logout(p, typ="application/logout+jwt"))

    scenario(body)


def test_logout_token_signed_by_another_key_is_refused() -> None:
    other = RSAKey.generate_key(2048, {"kid": "k1"})
    refused(
        lambda p, issuer: verify_logout(
            issuer, p.sign(logout_claims(p), {"typ": "logout+jwt"}, other)
        ),
        "signature",
    )


def test_logout_token_wrong_iss_is_refused() -> None:
    refused(lambda p, issuer: verify_logout(issuer, logout(p, iss="https://evil")), "iss")


def test_logout_token_wrong_aud_is_refused() -> None:
    refused(lambda p, issuer: verify_logout(issuer, logout(p, aud="other")), "aud")


def test_logout_token_without_iat_is_refused() -> None:
    refused(lambda p, issuer: verify_logout(issuer, logout(p, iat=None)), "iat")


def test_logout_token_without_exp_is_refused() -> None:
    # exp is REQUIRED in the final Back-Channel Logout 1.0 (2022).
    refused(lambda p, issuer: verify_logout(issuer, logout(p, exp=None)), "exp")


def test_stale_logout_token_is_refused() -> None:
    refused(
        lambda p, issuer: verify_logout(issuer, logout(p, iat=NOW - 200, exp=NOW + 100)),
        "iat is more than",
    )


def test_logout_token_from_the_future_is_refused() -> None:
    refused(lambda p, issuer: verify_logout(issuer, logout(p, iat=NOW + 120)), "iat|future")


def test_expired_logout_token_is_refused() -> None:
    refused(
        lambda p, issuer: verify_logout(issuer, logout(p, iat=NOW - 100, exp=NOW - 40)),
        "expired",
    )


@pytest.mark.parametrize(
    "events",
    [
        None,
        {},
        {"http://schemas.openid.net/event/other": {}},
        {BACKCHANNEL_EVENT: "yes"},
        [BACKCHANNEL_EVENT],
    ],
)
def test_logout_token_without_the_backchannel_event_is_refused(events: Any) -> None:
    def token(p: Provider) -> str:
        claims = logout_claims(p)
        if events is None:
            del claims["events"]
        else:
            claims["events"] = events
        return p.sign(claims, {"typ": "logout+jwt"})

    refused(lambda p, issuer: verify_logout(issuer, token(p)), "events")


def test_logout_token_with_a_nonce_is_refused() -> None:
    refused(lambda p, issuer: verify_logout(issuer, logout(p, nonce="n")), "nonce")


def test_logout_token_without_sid_and_sub_is_refused() -> None:
    refused(
        lambda p, issuer: verify_logout(issuer, logout(p, sid=None, sub=None)),
        "neither sid nor sub",
    )


def test_logout_token_with_a_non_string_sid_is_refused() -> None:
    refused(lambda p, issuer: verify_logout(issuer, logout(p, sid=12)), "sid")


def test_logout_token_without_jti_is_refused() -> None:
    refused(lambda p, issuer: verify_logout(issuer, logout(p, jti=None)), "jti")


@pytest.mark.parametrize("typ", ["JWT", "at+jwt", "id_token+jwt"])
def test_logout_token_of_another_typ_is_refused(typ: str) -> None:
    refused(lambda p, issuer: verify_logout(issuer, logout(p, typ=typ)), "not logout\\+jwt")


def test_id_token_is_not_a_logout_token() -> None:
    refused(lambda p, issuer: verify_logout(issuer, p.sign(id_claims(p))), "events|nonce")


def test_logout_token_alg_none_is_refused() -> None:
    def none_token(p: Provider) -> str:
        header = b64(json.dumps({"alg": "none", "kid": "k1", "typ": "logout+jwt"}).encode())
        return f"{header}.{b64(json.dumps(logout_claims(p)).encode())}.AAAA"

    refused(lambda p, issuer: verify_logout(issuer, none_token(p)), "alg 'none'")


# -- the token endpoint --------------------------------------------------------------------------


async def exchange(issuer: Issuer) -> dict[str, Any]:
    return await issuer.exchange_code(
        "code-1", redirect_uri="http://127.0.0.1:5000/guard/oidc/callback",
        code_verifier="v" * 43, client_id="mlflow gateway", client_secret="s:cr3t&",
    )  # fmt: skip


def test_code_exchange_posts_the_grant_with_basic_auth() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        answer = await exchange(issuer)
        assert answer["id_token"] == "x"
        auth, form = p.token_requests[0]
        assert auth == "Basic " + base64.b64encode(b"mlflow+gateway:s%3Acr3t%26").decode()
        assert form == {
            "grant_type": "authorization_code", "code": "code-1",
            "redirect_uri": "http://127.0.0.1:5000/guard/oidc/callback", "code_verifier": "v" * 43,
        }  # fmt: skip

    scenario(body)


def test_code_exchange_refused_is_token_invalid() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        p.token_answer = (400, {"error": "invalid_grant"})
        with pytest.raises(TokenInvalid, match="invalid_grant"):
            await exchange(issuer)

    scenario(body)


def test_code_exchange_without_bearer_token_type_is_refused() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        p.token_answer = (200, {"token_type": "DPoP", "id_token": "x"})
        with pytest.raises(TokenInvalid, match="token_type"):
            await exchange(issuer)

    scenario(body)


def test_code_exchange_server_error_is_unavailable() -> None:
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        p.token_answer = (502, {})
        with pytest.raises(IssuerUnavailable):
            await exchange(issuer)

    scenario(body)


def test_untrusted_issuer_in_a_token_does_not_pick_its_keys() -> None:
    # A token claiming another issuer fails this issuer's iss check, whatever it is signed with.
    async def body(p: Provider, issuer: Issuer, clock: Clock) -> None:
        with pytest.raises(TokenInvalid, match="iss"):
            await verify_access(issuer, p.sign(access(p, iss="https://attacker.example")))
        assert time.time() > 0

    scenario(body)
