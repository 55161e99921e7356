"""Personal tokens in the store and the token provider (SQLite and PostgreSQL): named
``<owner>/<label>``, acting as the owner with the groups of the owner's last login and no role,
Basic naming the owner, revoked by a block and when the name changes hands, and not by a logout."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt

import pytest
import sqlalchemy as sa

from guard.errors import Refusal
from guard.identity.base import Credentials, DirectorySubject, Principal, parse_authorization
from guard.identity.bindings import IdentityBindings
from guard.identity.sessions import SessionStore, UserBlocks
from guard.identity.tokens import (
    PERSONAL_ROLE,
    TokenError,
    TokenExists,
    TokenProvider,
    TokenStore,
    personal_name,
)
from guard.store.db import identities

KEY = b"k" * 32
DAY = 86400.0
ALICE = "user:alice"
GROUPS = ("group:ldap/risk%20team", "group:ldap/staff")


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(engine: sa.Engine, clock: Clock) -> TokenStore:
    return TokenStore(engine, KEY, clock)


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


def login(engine: sa.Engine, subject: str = ALICE, groups: tuple[str, ...] = GROUPS) -> None:
    """What a directory login leaves behind: the binding, with the login's groups."""
    IdentityBindings(engine, ttl=0).claim(subject, "ldap", f"uuid-{subject}", groups=groups)


# -- naming -----------------------------------------------------------------------------------


def test_a_personal_token_is_named_owner_slash_label_and_has_no_role(store: TokenStore) -> None:
    record, secret = store.create_personal(ALICE, "laptop", DAY)
    assert (record.name, record.label, record.owner, record.role) == (
        "alice/laptop", "laptop", ALICE, PERSONAL_ROLE,
    )  # fmt: skip
    assert store.lookup(secret) == record


@pytest.mark.parametrize(
    ("owner", "label"),
    [
        ("token:ci", "x"),  # only people own tokens
        ("group:ldap/staff", "x"),
        ("user:", "x"),
        (ALICE, ""),
        (ALICE, "Laptop"),
        (ALICE, "a/b"),  # a label cannot reach into another namespace
        (ALICE, "../bob"),
        (ALICE, "-x"),
        (ALICE, "x" * 64),  # alice/ + 64 is over the name column's 64
        ("user:" + "a" * 63, "x"),
    ],
)
def test_bad_owners_and_labels_are_refused(store: TokenStore, owner: str, label: str) -> None:
    with pytest.raises(TokenError):
        store.create_personal(owner, label, DAY)
    assert store.list(include_revoked=True) == []


def test_names_are_per_owner_and_never_meet_service_tokens(store: TokenStore) -> None:
    store.create_personal(ALICE, "ci", DAY)
    store.create_personal("user:bob", "ci", DAY)  # the same label, another person: fine
    store.create("ci", "admin", DAY)  # a service token named like the label: fine
    with pytest.raises(TokenExists):
        store.create_personal(ALICE, "ci", DAY)
    with pytest.raises(TokenError):
        store.create("alice/ci", "admin", DAY)  # a service token cannot take a personal name
    assert personal_name("user:alice@example.com", "ci") == "alice@example.com/ci"
    assert [r.name for r in store.list(owner=ALICE)] == ["alice/ci"]
    assert {r.name for r in store.list()} == {"alice/ci", "bob/ci", "ci"}


def test_revoke_with_an_owner_touches_only_that_owners_tokens(store: TokenStore) -> None:
    store.create_personal("user:bob", "ci", DAY)
    with pytest.raises(TokenError):
        store.revoke("bob/ci", owner=ALICE)
    assert store.revoke("bob/ci", owner="user:bob").owner == "user:bob"


# -- what it acts as --------------------------------------------------------------------------


def test_it_acts_as_its_owner_with_the_groups_of_the_last_login(
    engine: sa.Engine, store: TokenStore
) -> None:
    login(engine)
    record, secret = store.create_personal(ALICE, "laptop", DAY)
    provider = TokenProvider(store, cache_ttl=0)
    for credentials in (Credentials("bearer", secret), basic("alice", secret)):
        principal = authenticate(provider, credentials)
        assert isinstance(principal, Principal)
        assert principal.subject == ALICE and isinstance(principal.subject, DirectorySubject)
        assert principal.subject.groups == GROUPS == principal.groups
        assert (principal.name, principal.method, principal.roles) == ("alice", "token", ())
        assert principal.identity == f"token:{record.id}"
        assert principal.expires_at == record.expires_at
    # A later login with other groups: the token follows it.
    login(engine, groups=("group:ldap/staff",))
    principal = authenticate(provider, Credentials("bearer", secret))
    assert isinstance(principal, Principal) and principal.groups == ("group:ldap/staff",)


def test_a_person_who_never_logged_in_has_no_groups(store: TokenStore) -> None:
    _, secret = store.create_personal("user:carol", "ci", DAY)
    principal = authenticate(TokenProvider(store, cache_ttl=0), Credentials("bearer", secret))
    assert isinstance(principal, Principal)
    assert (principal.subject, principal.groups) == ("user:carol", ())
    assert not isinstance(principal.subject, DirectorySubject)


def test_stored_groups_that_could_name_a_policy_group_are_ignored(
    engine: sa.Engine, store: TokenStore
) -> None:
    login(engine)
    with engine.begin() as conn:
        conn.execute(
            identities.update().values(groups='["group:admins", "group:ldap/x", 7, "user:bob"]')
        )
    _, secret = store.create_personal(ALICE, "ci", DAY)
    principal = authenticate(TokenProvider(store, cache_ttl=0), Credentials("bearer", secret))
    assert isinstance(principal, Principal) and principal.groups == ("group:ldap/x",)


@pytest.mark.parametrize(
    "user", ["alice/laptop", "Alice", "bob", "", "laptop", "alice ", "user%3Aalice"]
)
def test_basic_must_name_the_owner(store: TokenStore, user: str) -> None:
    _, secret = store.create_personal(ALICE, "laptop", DAY)
    result = authenticate(TokenProvider(store, cache_ttl=0), basic(user, secret))
    assert isinstance(result, Refusal) and result.reason == "invalid_credentials"


def test_expiry_and_revocation_end_it(store: TokenStore, clock: Clock) -> None:
    _, secret = store.create_personal(ALICE, "laptop", DAY)
    provider = TokenProvider(store, cache_ttl=0)
    store.revoke("alice/laptop", owner=ALICE)
    result = authenticate(provider, Credentials("bearer", secret))
    assert isinstance(result, Refusal) and result.reason == "token_revoked"
    _, other = store.create_personal(ALICE, "laptop", DAY)
    clock.now += dt.timedelta(days=1)
    result = authenticate(provider, Credentials("bearer", other))
    assert isinstance(result, Refusal) and result.reason == "token_expired"


# -- block, logout, the name changing hands ---------------------------------------------------


def test_a_block_revokes_the_owners_tokens_for_good(engine: sa.Engine, store: TokenStore) -> None:
    _, secret = store.create_personal(ALICE, "laptop", DAY)
    _, bobs = store.create_personal("user:bob", "laptop", DAY)
    _, service = store.create("ci", "admin", DAY)
    blocks = UserBlocks(engine)
    assert blocks.block(ALICE, "cli:root", "left")
    provider = TokenProvider(store, cache_ttl=0)
    result = authenticate(provider, Credentials("bearer", secret))
    assert isinstance(result, Refusal) and result.reason == "token_revoked"
    assert blocks.unblock(ALICE)
    result = authenticate(provider, Credentials("bearer", secret))  # unblocking revives nothing
    assert isinstance(result, Refusal) and result.reason == "token_revoked"
    for other in (bobs, service):  # nobody else's
        assert isinstance(authenticate(provider, Credentials("bearer", other)), Principal)


def test_a_logout_leaves_the_token_alone(engine: sa.Engine, store: TokenStore) -> None:
    sessions = SessionStore(engine, KEY, idle_timeout=3600, absolute_timeout=86400)
    session_id, _ = sessions.create(
        Principal(ALICE, "alice", "ldap", (), identity="ldap:u"), client="127.0.0.1"
    )
    _, secret = store.create_personal(ALICE, "ci", DAY)
    sessions.revoke(session_id, "logout")
    assert sessions.revoke_subject(ALICE, "cli:root") == 0
    principal = authenticate(TokenProvider(store, cache_ttl=0), Credentials("bearer", secret))
    assert isinstance(principal, Principal) and principal.subject == ALICE


@pytest.mark.parametrize("how", ["unlink", "link-elsewhere"])
def test_the_name_changing_hands_revokes_its_tokens(
    engine: sa.Engine, store: TokenStore, how: str
) -> None:
    login(engine)
    _, secret = store.create_personal(ALICE, "ci", DAY)
    bindings = IdentityBindings(engine, ttl=0)
    if how == "unlink":
        assert bindings.unlink(ALICE)
    else:
        bindings.link(ALICE, "oidc", "another-person")
    result = authenticate(TokenProvider(store, cache_ttl=0), Credentials("bearer", secret))
    assert isinstance(result, Refusal) and result.reason == "token_revoked"


def test_linking_the_same_identity_again_keeps_its_tokens(
    engine: sa.Engine, store: TokenStore
) -> None:
    login(engine)
    _, secret = store.create_personal(ALICE, "ci", DAY)
    IdentityBindings(engine, ttl=0).link(ALICE, "ldap", f"uuid-{ALICE}")
    assert isinstance(
        authenticate(TokenProvider(store, cache_ttl=0), Credentials("bearer", secret)), Principal
    )


# -- groups of the last login -------------------------------------------------------------------


def test_claim_stores_the_groups_and_writes_only_when_they_change(engine: sa.Engine) -> None:
    bindings = IdentityBindings(engine, ttl=60)
    assert bindings.claim(ALICE, "ldap", "u1", groups=GROUPS) is None
    assert bindings.groups(ALICE) == GROUPS
    queries = bindings.queries
    assert bindings.claim(ALICE, "ldap", "u1", groups=reversed(GROUPS)) is None  # same set
    assert bindings.claim(ALICE, "ldap", "u1") is None  # no groups given: nothing to store
    assert bindings.queries == queries  # both answered from the cache
    assert bindings.claim(ALICE, "ldap", "u1", groups=()) is None  # changed: stored
    assert bindings.queries == queries + 1
    assert bindings.groups(ALICE) == ()
    # Another identity presenting the name stores nothing.
    assert bindings.claim(ALICE, "ldap", "u2", groups=("group:ldap/x",)) is not None
    assert bindings.groups(ALICE) == ()


def test_record_groups_for_single_sign_on(engine: sa.Engine) -> None:
    bindings = IdentityBindings(engine, ttl=60)
    assert not bindings.record_groups("user:nobody", ["group:oidc/x"])
    bindings.claim(ALICE, "oidc", "issuer#sub")
    assert bindings.record_groups(ALICE, ["group:oidc/b", "group:oidc/a"])
    assert bindings.groups(ALICE) == ("group:oidc/a", "group:oidc/b")
    assert bindings.groups("user:never") == ()
