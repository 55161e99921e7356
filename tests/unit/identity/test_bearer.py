"""guard.identity.bearer: IdP-issued JWT access tokens as machine credentials, against the small
provider of test_oidc (keys made in the test, served on 127.0.0.1)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from joserfc.jwk import RSAKey

from guard.authz.engine import PolicyIndex
from guard.authz.policy import PolicySet
from guard.errors import Refusal
from guard.identity.base import Credentials, Principal
from guard.identity.bearer import BearerIssuer, BearerProvider, group_subjects, machine_name
from guard.identity.oidc import Issuer, ProviderHttp
from tests.unit.identity.test_oidc import NOW, Clock, Provider, provider

T = TypeVar("T")
AUDIENCE = "urn:mlflow-guard"


def robot(p: Provider, **extra: Any) -> dict[str, Any]:
    claims = {
        "aud": AUDIENCE, "sub": "mlflow-robot", "client_id": "mlflow-robot",
        "groups": ["ci-pipelines", "/org/risk team"], "jti": "j", **extra,
    }  # fmt: skip
    return p.claims(**claims)


def bearer(token: str) -> Credentials:
    return Credentials("bearer", token)


Body = Callable[[Provider, BearerProvider, Clock], Awaitable[T]]


def scenario(body: Body[T], **entry: Any) -> T:
    async def main() -> T:
        http = ProviderHttp()
        clock = Clock()
        async with provider() as p:
            issuer = Issuer(
                p.url, http=http, clock=lambda: clock.wall, monotonic=lambda: clock.mono
            )
            options = {"subject_claim": "", "groups_claim": "groups", "leeway": 30.0, **entry}
            provider_ = BearerProvider(
                [BearerIssuer("ci", issuer, AUDIENCE, **options)],
                cache_size=4,
                clock=lambda: clock.wall,
            )
            try:
                return await body(p, provider_, clock)
            finally:
                await http.close()

    return asyncio.run(main())


def test_a_trusted_token_is_a_client_principal_with_its_groups() -> None:
    async def body(p: Provider, bp: BearerProvider, clock: Clock) -> Principal | Refusal | None:
        return await bp.authenticate(bearer(p.sign(robot(p), {"typ": "at+jwt"})))

    principal = scenario(body)
    assert isinstance(principal, Principal)
    assert principal.subject == "client:ci/mlflow-robot"
    assert principal.groups == ("group:ci/%2Forg%2Frisk%20team", "group:ci/ci-pipelines")
    assert getattr(principal.subject, "groups", ()) == principal.groups
    assert principal.method == "oidc-bearer"
    assert principal.name == "ci/mlflow-robot"
    assert principal.expires_at == dt.datetime.fromtimestamp(NOW + 300, dt.UTC)
    assert principal.identity.endswith("#mlflow-robot")


def test_the_policy_grants_a_client_and_its_issuer_groups() -> None:
    async def body(p: Provider, bp: BearerProvider, clock: Clock) -> Principal | Refusal | None:
        return await bp.authenticate(bearer(p.sign(robot(p))))

    principal = scenario(body)
    assert isinstance(principal, Principal)
    index = PolicyIndex(
        PolicySet.from_csv(
            "g2, promoter, read\ng2, promoter, promote\n"
            "p, client:ci/mlflow-robot, promoter, model:fraud\n"
            "p, group:ci/ci-pipelines, promoter, model:churn\n"
            "p, group:ci-pipelines, promoter, model:other\n"
        )
    )
    assert index.decide(principal.subject, "model:fraud", "promote").allowed
    assert index.decide(principal.subject, "model:churn", "promote").allowed
    # A policy-defined group of the same name is not the issuer's group.
    assert not index.decide(principal.subject, "model:other", "promote").allowed
    # A person or gateway token of the same name gets nothing of the machine's.
    assert not index.decide("user:mlflow-robot", "model:fraud", "promote").allowed
    assert not index.decide("token:mlflow-robot", "model:fraud", "promote").allowed


def test_verified_tokens_are_cached_until_they_expire() -> None:
    async def body(p: Provider, bp: BearerProvider, clock: Clock) -> None:
        token = p.sign(robot(p))
        first = await bp.authenticate(bearer(token))
        p.down = True  # the cache answers: no key lookup, no provider
        bp.issuers[p.url].issuer._keys = {}
        assert await bp.authenticate(bearer(token)) is first
        clock.wall = NOW + 300  # exp reached: verified again (and now refused: keys gone)
        result = await bp.authenticate(bearer(token))
        assert isinstance(result, Refusal)

    scenario(body)


def test_the_cache_is_bounded() -> None:
    async def body(p: Provider, bp: BearerProvider, clock: Clock) -> None:
        for n in range(10):
            assert isinstance(
                await bp.authenticate(bearer(p.sign(robot(p, jti=str(n))))), Principal
            )
        assert len(bp._cache) == 4

    scenario(body)


def test_refused_tokens_are_not_cached() -> None:
    async def body(p: Provider, bp: BearerProvider, clock: Clock) -> None:
        for n in range(10):
            result = await bp.authenticate(bearer(p.sign(robot(p, aud=f"urn:x{n}"))))
            assert isinstance(result, Refusal)
        assert bp._cache == {}

    scenario(body)


@pytest.mark.parametrize(
    "secret", ["mlg_" + "a" * 43, "opaque-token", "a.b", "a.b.c.d", "e30.e30.", "eyJ.e30.e30 x"]
)
def test_what_is_not_a_jwt_is_not_mine(secret: str) -> None:
    async def body(p: Provider, bp: BearerProvider, clock: Clock) -> Principal | Refusal | None:
        return await bp.authenticate(bearer(secret))

    assert scenario(body) is None


def test_basic_credentials_are_not_mine() -> None:
    async def body(p: Provider, bp: BearerProvider, clock: Clock) -> Principal | Refusal | None:
        return await bp.authenticate(Credentials("basic", p.sign(robot(p)), "mlflow-robot"))

    assert scenario(body) is None


def refusal(make: Callable[[Provider], str], **entry: Any) -> Refusal:
    async def body(p: Provider, bp: BearerProvider, clock: Clock) -> Principal | Refusal | None:
        return await bp.authenticate(bearer(make(p)))

    result = scenario(body, **entry)
    assert isinstance(result, Refusal), result
    return result


def test_a_jwt_of_an_untrusted_issuer_is_refused_not_passed_on() -> None:
    found = refusal(lambda p: p.sign(robot(p, iss="https://attacker.example")))
    assert (found.reason, found.status) == ("invalid_credentials", 401)
    assert "not trusted" in found.detail
    assert found.audit == (("login_failure", "the token's issuer is not trusted"),)


def test_a_jwt_without_iss_is_refused() -> None:
    found = refusal(lambda p: p.sign(robot(p, iss=None)))
    assert found.reason == "invalid_credentials"


def test_a_trusted_iss_signed_by_a_stranger_is_refused() -> None:
    stranger = RSAKey.generate_key(2048, {"kid": "k1"})
    found = refusal(lambda p: p.sign(robot(p), key=stranger))
    assert found.reason == "invalid_credentials"
    assert "signature" in dict(found.audit)["login_failure"]


def test_a_token_for_another_audience_is_refused() -> None:
    found = refusal(lambda p: p.sign(robot(p, aud="urn:other")))
    assert "aud" in dict(found.audit)["login_failure"]


def test_an_id_token_is_refused() -> None:
    found = refusal(lambda p: p.sign(robot(p, nonce="n")))
    assert "nonce" in dict(found.audit)["login_failure"]


def test_an_expired_token_is_refused() -> None:
    found = refusal(lambda p: p.sign(robot(p, exp=NOW - 31)))
    assert "expired" in dict(found.audit)["login_failure"]


def test_a_not_yet_valid_token_is_refused() -> None:
    found = refusal(lambda p: p.sign(robot(p, nbf=NOW + 60)))
    assert "nbf" in dict(found.audit)["login_failure"]


def test_a_token_without_a_usable_subject_is_refused() -> None:
    found = refusal(lambda p: p.sign(robot(p, client_id=None, sub=None)))
    assert "no usable" in dict(found.audit)["login_failure"]


def test_a_configured_subject_claim_has_no_fallback() -> None:
    found = refusal(lambda p: p.sign(robot(p)), subject_claim="workload")
    assert "no usable workload claim" in dict(found.audit)["login_failure"]


def test_algorithm_not_allowed_for_this_issuer_is_refused() -> None:
    found = refusal(lambda p: p.sign(robot(p)), algorithms=("ES256",))
    assert "alg" in dict(found.audit)["login_failure"]


def test_an_unreachable_issuer_is_unavailable() -> None:
    async def body(p: Provider, bp: BearerProvider, clock: Clock) -> Principal | Refusal | None:
        p.down = True
        return await bp.authenticate(bearer(p.sign(robot(p))))

    result = scenario(body)
    assert isinstance(result, Refusal)
    assert (result.reason, result.status) == ("identity_unavailable", 503)


def test_subject_claim_rules() -> None:
    assert machine_name({"client_id": "a", "azp": "b", "sub": "c"}) == "a"
    assert machine_name({"azp": "b", "sub": "c"}) == "b"
    assert machine_name({"sub": "system:serviceaccount:ml:trainer"}) == (
        "system:serviceaccount:ml:trainer"
    )
    assert machine_name({"client_id": " ", "sub": "c"}) == "c"
    assert machine_name({"client_id": 7, "sub": "c"}) == "c"
    assert machine_name({"client_id": "x" * 201, "sub": "c"}) == "c"
    assert machine_name({"sub": "c"}, "workload") is None
    assert machine_name({"workload": "w", "sub": "c"}, "workload") == "w"


def test_kubernetes_subjects_are_encoded_by_the_naming_rule() -> None:
    async def body(p: Provider, bp: BearerProvider, clock: Clock) -> Principal | Refusal | None:
        claims = robot(p, client_id=None, sub="system:serviceaccount:ml:Trainer")
        return await bp.authenticate(bearer(p.sign(claims)))

    principal = scenario(body)
    assert isinstance(principal, Principal)
    assert principal.subject == "client:ci/system%3Aserviceaccount%3Aml%3Atrainer"


def test_group_rules() -> None:
    assert group_subjects({"groups": "one"}, "groups", "ci") == ("group:ci/one",)
    assert group_subjects({"groups": ["b", "a", "a", 3, "", "x" * 201]}, "groups", "ci") == (
        "group:ci/a",
        "group:ci/b",
    )
    assert group_subjects({"groups": {"a": 1}}, "groups", "ci") == ()
    assert group_subjects({"groups": ["a"]}, "", "ci") == ()
    many = {"groups": [f"g{n}" for n in range(1000)]}
    assert len(group_subjects(many, "groups", "ci")) == 256


def test_the_app_builds_one_issuer_per_bearer_table() -> None:
    from guard.app import build_bearer_provider
    from guard.settings import OidcBearerSettings, OidcSettings, Settings

    http = ProviderHttp()
    assert build_bearer_provider(Settings(), http) is None
    tables = (
        OidcBearerSettings(alias="ci", issuer="https://idp.example.com", audience="urn:a",
                           groups_claim="groups"),
        OidcBearerSettings(alias="k8s", issuer="https://kubernetes.default.svc", audience="urn:a",
                           subject_claim="sub", allowed_algorithms=("ES256",)),
    )  # fmt: skip
    settings = Settings(oidc=OidcSettings(bearer=tables, leeway=10, jwks_refresh_interval=120))
    built = build_bearer_provider(settings, http)
    assert built is not None
    entries = built.issuers
    assert list(entries) == ["https://idp.example.com", "https://kubernetes.default.svc"]
    k8s = entries["https://kubernetes.default.svc"]
    assert (k8s.alias, k8s.audience, k8s.subject_claim, k8s.algorithms, k8s.leeway) == (
        "k8s",
        "urn:a",
        "sub",
        ("ES256",),
        10,
    )
    assert k8s.issuer.jwks_refresh_interval == 120
    assert entries["https://idp.example.com"].groups_claim == "groups"


def test_require_typ_refuses_a_token_without_the_rfc9068_type() -> None:
    async def body(p: Provider, bp: BearerProvider, clock: Clock) -> list[Any]:
        typed = await bp.authenticate(bearer(p.sign(robot(p), {"typ": "at+jwt"})))
        plain = await bp.authenticate(bearer(p.sign(robot(p, jti="k"), {"typ": "JWT"})))
        untyped = await bp.authenticate(bearer(p.sign(robot(p, jti="l"))))
        return [typed, plain, untyped]

    typed, plain, untyped = scenario(body, require_typ=True)
    assert isinstance(typed, Principal)
    for refused in (plain, untyped):
        assert isinstance(refused, Refusal) and refused.reason == "invalid_credentials"
    loose = scenario(body)  # off: a generic JWT or no typ is accepted
    assert all(isinstance(result, Principal) for result in loose)
