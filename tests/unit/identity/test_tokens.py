import asyncio
import base64
import datetime as dt
from collections.abc import Callable, Iterator

import pytest
import sqlalchemy as sa

from guard.errors import Refusal
from guard.identity.base import Credentials, Principal, parse_authorization
from guard.identity.tokens import (
    TOKEN_PREFIX,
    TokenError,
    TokenProvider,
    TokenStore,
    validate_bootstrap_token,
)
from guard.store.db import build_engine, migrate, tokens

KEY = b"k" * 32
DAY = 86400.0


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(database_uri: str, clock: Clock) -> Iterator[TokenStore]:
    engine = build_engine(database_uri)
    migrate(engine)
    migrate(engine)  # idempotent
    yield TokenStore(engine, KEY, clock)
    engine.dispose()


def test_create_returns_a_prefixed_high_entropy_secret_stored_only_as_hmac(
    store: TokenStore,
) -> None:
    record, secret = store.create("ci-promoter", "admin", 90 * DAY)
    assert secret.startswith(TOKEN_PREFIX)
    assert len(secret) - len(TOKEN_PREFIX) >= 43  # 32 random bytes, base64url
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(tokens)).one()
    assert secret not in str(tuple(row))
    assert row.digest == store.digest(secret) != secret
    assert record.expires_at - record.created_at == dt.timedelta(days=90)
    assert record.expires_at.tzinfo is not None


def test_lookup_finds_only_the_exact_secret(store: TokenStore) -> None:
    _, secret = store.create("a", "admin", DAY)
    assert store.lookup(secret) is not None
    assert store.lookup(secret[:-1]) is None
    assert store.lookup(secret + "x") is None
    assert store.lookup("") is None


def test_a_different_key_knows_no_token(store: TokenStore) -> None:
    _, secret = store.create("a", "admin", DAY)
    assert TokenStore(store.engine, b"o" * 32).lookup(secret) is None


@pytest.mark.parametrize("name", ["", "A", "ci:promoter", "-ci", "a" * 65, "ci promoter", "ü"])
def test_bad_names_are_refused(store: TokenStore, name: str) -> None:
    with pytest.raises(TokenError, match="invalid"):
        store.create(name, "admin", DAY)


def test_malformed_role_and_bad_expiry_are_refused(store: TokenStore) -> None:
    # Whether a role exists is the policy's business (guard.admin.governance); the store checks
    # form.
    with pytest.raises(TokenError, match="not a role name"):
        store.create("a", "Super User", DAY)
    with pytest.raises(TokenError, match="future"):
        store.create("a", "admin", 0)


def test_live_names_are_unique_and_reusable_after_revoke(store: TokenStore) -> None:
    _, first = store.create("ci", "admin", DAY)
    with pytest.raises(TokenError, match="already exists"):
        store.create("ci", "admin", DAY)
    store.revoke("ci")
    _, second = store.create("ci", "admin", DAY)
    assert store.lookup(first).revoked_at is not None  # type: ignore[union-attr]
    assert store.lookup(second).revoked_at is None  # type: ignore[union-attr]
    assert [r.name for r in store.list()] == ["ci"]
    assert len(store.list(include_revoked=True)) == 2


def test_revoke_unknown_or_twice(store: TokenStore) -> None:
    with pytest.raises(TokenError, match="no live token"):
        store.revoke("nope")
    store.create("ci", "admin", DAY)
    store.revoke("ci")
    with pytest.raises(TokenError, match="no live token"):
        store.revoke("ci")


def test_bootstrap_only_while_no_token_was_ever_made(store: TokenStore) -> None:
    secret = store.bootstrap(DAY, None)
    assert secret is not None and secret.startswith(TOKEN_PREFIX)
    assert store.bootstrap(DAY, None) is None
    store.revoke("admin")
    assert store.bootstrap(DAY, None) is None  # revoked still counts: the database is not empty


def test_bootstrap_uses_a_supplied_secret(store: TokenStore) -> None:
    supplied = "mlg_s3cr3t-" + "x" * 40
    assert store.bootstrap(DAY, supplied) == supplied
    assert store.lookup(supplied).name == "admin"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "supplied",
    [
        "short",
        "mlg_short",
        "mlg_",
        "x" * 47,  # long enough, but not a gateway token
        "MLG_" + "a" * 43,
        "Mlg_" + "a" * 43,
        "mlg" + "a" * 44,
        "mlg-" + "a" * 43,
        " mlg_" + "a" * 43,
        "mlg_" + "a" * 43 + "\n",
        "mlg_" + "a" * 43 + "!",
        "mlg_" + "a" * 31,
        "mlg_" + "a" * 253,
        "\uff4dlg_" + "a" * 43,  # a fullwidth m
    ],
)
def test_bootstrap_refuses_a_supplied_secret_that_is_not_a_token(
    store: TokenStore, supplied: str
) -> None:
    with pytest.raises(TokenError, match="mlg_ followed by 32-252 characters") as caught:
        store.bootstrap(DAY, supplied)
    assert len(supplied) < 8 or supplied.strip() not in str(caught.value)  # never echoed
    with store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(tokens)).scalar() == 0


@pytest.mark.parametrize("supplied", ["mlg_" + "a" * 32, "mlg_" + "a" * 252, "mlg_" + "0f" * 32])
def test_bootstrap_accepts_every_token_shaped_secret(store: TokenStore, supplied: str) -> None:
    assert store.bootstrap(DAY, supplied) == supplied


def basic(user: str, password: str) -> Credentials:
    result = parse_authorization(
        [(b"authorization", b"Basic " + base64.b64encode(f"{user}:{password}".encode()))]
    )
    assert isinstance(result, Credentials)
    return result


def authenticate(provider: TokenProvider, credentials: Credentials) -> Principal | Refusal | None:
    async def run() -> Principal | Refusal | None:
        result = await provider.authenticate(credentials)
        await provider.drain()
        return result

    return asyncio.run(run())


def test_provider_accepts_bearer_and_basic_with_matching_name(store: TokenStore) -> None:
    _, secret = store.create("ci", "admin", DAY)
    provider = TokenProvider(store, cache_ttl=0)
    for credentials in (Credentials("bearer", secret), basic("ci", secret)):
        principal = authenticate(provider, credentials)
        assert isinstance(principal, Principal)
        assert (principal.subject, principal.method, principal.roles) == (
            "token:ci",
            "token",
            ("admin",),
        )


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda s: basic("someone-else", s), "invalid_credentials"),
        (lambda s: basic("", s), "invalid_credentials"),
        (lambda s: basic("CI", s), "invalid_credentials"),
        (lambda s: Credentials("bearer", s + "x"), "invalid_credentials"),
        (lambda s: Credentials("bearer", s[:-1]), "invalid_credentials"),
    ],
)
def test_provider_refusals(store: TokenStore, make, reason: str) -> None:  # type: ignore[no-untyped-def]
    _, secret = store.create("ci", "admin", DAY)
    result = authenticate(TokenProvider(store, cache_ttl=0), make(secret))
    assert isinstance(result, Refusal) and result.reason == reason


def test_expired_and_revoked_tokens_are_refused(store: TokenStore, clock: Clock) -> None:
    _, secret = store.create("ci", "admin", DAY)
    provider = TokenProvider(store, cache_ttl=3600)
    assert isinstance(authenticate(provider, Credentials("bearer", secret)), Principal)
    clock.now += dt.timedelta(days=1)  # expiry is exact even with a cached record
    result = authenticate(provider, Credentials("bearer", secret))
    assert isinstance(result, Refusal) and result.reason == "token_expired"
    _, other = store.create("ci2", "admin", DAY)
    store.revoke("ci2")
    result = authenticate(TokenProvider(store, cache_ttl=0), Credentials("bearer", other))
    assert isinstance(result, Refusal) and result.reason == "token_revoked"


def test_revocation_is_seen_once_the_cache_expires(store: TokenStore) -> None:
    _, secret = store.create("ci", "admin", DAY)
    provider = TokenProvider(store, cache_ttl=0)
    assert isinstance(authenticate(provider, Credentials("bearer", secret)), Principal)
    store.revoke("ci")
    result = authenticate(provider, Credentials("bearer", secret))
    assert isinstance(result, Refusal) and result.reason == "token_revoked"


def test_last_used_is_written_at_most_once_a_minute(store: TokenStore, clock: Clock) -> None:
    _, secret = store.create("ci", "admin", DAY)
    provider = TokenProvider(store, cache_ttl=0)
    first = clock.now
    authenticate(provider, Credentials("bearer", secret))
    assert store.lookup(secret).last_used_at == first  # type: ignore[union-attr]
    clock.now += dt.timedelta(seconds=30)
    authenticate(provider, Credentials("bearer", secret))
    assert store.lookup(secret).last_used_at == first  # type: ignore[union-attr]
    clock.now += dt.timedelta(seconds=31)
    authenticate(provider, Credentials("bearer", secret))
    assert store.lookup(secret).last_used_at == clock.now  # type: ignore[union-attr]


def test_unreachable_database_is_a_clear_refusal(clock: Clock, tmp_path) -> None:  # type: ignore[no-untyped-def]
    engine = build_engine("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=1")
    provider = TokenProvider(TokenStore(engine, KEY, clock), cache_ttl=0)
    result = authenticate(provider, Credentials("bearer", "mlg_" + "x" * 43))
    engine.dispose()
    assert isinstance(result, Refusal) and result.reason == "identity_unavailable"


# -- the prefix decides whose a secret is: "not mine" costs the token store nothing -------------


class Spy:
    """Counts what reaches the token store: digests (the cache key) and lookups."""

    def __init__(self, store: TokenStore, monkeypatch: pytest.MonkeyPatch) -> None:
        self.lookups: list[str] = []
        self.digests: list[str] = []
        lookup, digest = store.lookup, store.digest

        def counted_lookup(secret: str) -> object:
            self.lookups.append(secret)
            return lookup(secret)

        def counted_digest(secret: str) -> str:
            self.digests.append(secret)
            return digest(secret)

        monkeypatch.setattr(store, "lookup", counted_lookup)
        monkeypatch.setattr(store, "digest", counted_digest)


NOT_TOKENS = [
    pytest.param(lambda s: "hunter2", id="a-password"),
    pytest.param(lambda s: "", id="empty"),
    pytest.param(lambda s: "MLG_" + s[4:], id="uppercase-prefix"),
    pytest.param(lambda s: "Mlg_" + s[4:], id="mixed-case-prefix"),
    # A token may itself go on with "_" ("mlg__x..."): drop those too, or it is mlg_ again.
    pytest.param(lambda s: "mlg" + s[4:].lstrip("_"), id="no-underscore"),
    pytest.param(lambda s: "mlg-" + s[4:], id="dash-for-underscore"),
    pytest.param(lambda s: " " + s, id="leading-space"),
    pytest.param(lambda s: "\t" + s, id="leading-tab"),
    pytest.param(lambda s: "\uff4d" + s[1:], id="fullwidth-m"),
    pytest.param(lambda s: "x" + s[4:], id="token-without-prefix"),
    pytest.param(lambda s: "x" * 47, id="token-length-no-prefix"),
]


@pytest.mark.parametrize("password", NOT_TOKENS)
def test_a_basic_password_without_the_prefix_is_not_mine_and_never_looked_up(
    store: TokenStore, monkeypatch: pytest.MonkeyPatch, password: Callable[[str], str]
) -> None:
    _, secret = store.create("ci", "admin", DAY)
    spy = Spy(store, monkeypatch)
    provider = TokenProvider(store, cache_ttl=3600)
    for user in ("ci", "", secret):  # the token's name, none, the token in the user name field
        assert authenticate(provider, basic(user, password(secret))) is None
    assert authenticate(provider, Credentials("bearer", password(secret))) is None
    assert spy.lookups == [] and spy.digests == []


@pytest.mark.parametrize(
    "presented",
    [
        pytest.param(lambda s: "mlg_", id="prefix-only"),
        pytest.param(lambda s: "mlg_short", id="too-short"),
        pytest.param(lambda s: s + " ", id="trailing-space"),
        pytest.param(lambda s: s + "\n", id="trailing-newline"),
        pytest.param(lambda s: s[:10] + "!" + s[11:], id="foreign-character"),
        pytest.param(lambda s: s + "a" * 253, id="too-long"),
    ],
)
def test_a_prefixed_secret_of_the_wrong_shape_is_refused_without_a_lookup(
    store: TokenStore, monkeypatch: pytest.MonkeyPatch, presented: Callable[[str], str]
) -> None:
    """Ours by its prefix, so no other provider may judge it; no token has its shape."""
    _, secret = store.create("ci", "admin", DAY)
    spy = Spy(store, monkeypatch)
    provider = TokenProvider(store, cache_ttl=0)
    for credentials in (basic("ci", presented(secret)), Credentials("bearer", presented(secret))):
        result = authenticate(provider, credentials)
        assert isinstance(result, Refusal) and result.reason == "invalid_credentials"
    assert spy.lookups == []


def test_a_token_in_the_user_name_field_with_a_password_is_not_a_token_login(
    store: TokenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, secret = store.create("ci", "admin", DAY)
    spy = Spy(store, monkeypatch)
    provider = TokenProvider(store, cache_ttl=0)
    assert authenticate(provider, basic(secret, "hunter2")) is None
    assert authenticate(provider, basic(secret, "")) is None
    assert spy.lookups == []


def test_a_valid_token_still_works_by_bearer_and_basic_and_is_looked_up(
    store: TokenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, secret = store.create("ci", "admin", DAY)
    spy = Spy(store, monkeypatch)
    provider = TokenProvider(store, cache_ttl=0)
    for credentials in (Credentials("bearer", secret), basic("ci", secret)):
        principal = authenticate(provider, credentials)
        assert isinstance(principal, Principal) and principal.subject == "token:ci"
    assert spy.lookups == [secret, secret]
    unknown = "mlg_" + "z" * 43  # token-shaped but nobody's: looked up, then refused
    result = authenticate(provider, Credentials("bearer", unknown))
    assert isinstance(result, Refusal) and result.reason == "invalid_credentials"
    assert spy.lookups[-1] == unknown


@pytest.mark.parametrize(
    "value",
    [
        "x" * 47,
        "MLG_" + "a" * 43,
        "mlg" + "a" * 44,
        " mlg_" + "a" * 43,
        "mlg_" + "a" * 43 + "\n",
        "mlg_short",
        "mlg_" + "a" * 253,
    ],
)
def test_a_bootstrap_token_that_is_not_a_token_is_a_configuration_problem(value: str) -> None:
    problem = validate_bootstrap_token({"MLFLOW_GUARD_BOOTSTRAP_TOKEN": value})
    assert problem is not None
    assert problem.startswith("env MLFLOW_GUARD_BOOTSTRAP_TOKEN: ")
    assert "mlg_ followed by 32-252 characters" in problem
    assert value.strip() not in problem


@pytest.mark.parametrize("value", [None, "", "mlg_" + "a" * 43, "mlg_" + "0f" * 32])
def test_an_unset_empty_or_token_shaped_bootstrap_token_is_fine(value: str | None) -> None:
    environ = {} if value is None else {"MLFLOW_GUARD_BOOTSTRAP_TOKEN": value}
    assert validate_bootstrap_token(environ) is None
