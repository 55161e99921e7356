"""The revocation counter (guard.identity.revocations): moved by every revocation in its own
transaction, followed by each replica's poll, and obeyed by every cache of credentials."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio.to_thread
import pytest
import sqlalchemy as sa

from guard.admin.governance import Governance
from guard.authz.policy import Grant
from guard.authz.store import PolicyStore
from guard.errors import Refusal
from guard.identity.base import Credentials, Principal
from guard.identity.bindings import IdentityBindings
from guard.identity.blocks import BlockedSubjects
from guard.identity.browser import BrowserSessions
from guard.identity.ldap import Attempt, DirectoryUser, LdapConfig, LdapProvider
from guard.identity.revocations import Counter, RevocableCache, Revocations, bump, read
from guard.identity.sessions import SessionCookie, SessionStore, UserBlocks
from guard.identity.tokens import TokenError, TokenProvider, TokenRecord, TokenStore
from guard.store.db import build_engine, migrate, revocation_state
from guard.store.polling import wait_for_poll_threads

KEY = b"k" * 32
HOUR = 3600.0
ORIGIN = "http://127.0.0.1:8080"


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[sa.Engine]:
    engine = build_engine(f"sqlite:///{tmp_path / 'guard.db'}")
    migrate(engine)
    yield engine
    engine.dispose()


def person(name: str, method: str = "ldap", identity: str = "") -> Principal:
    return Principal(f"user:{name}", name, method, (), identity=identity or f"{method}:{name}")


def sessions(engine: sa.Engine) -> SessionStore:
    return SessionStore(engine, KEY, idle_timeout=HOUR, absolute_timeout=2 * HOUR)


# -- the counter ------------------------------------------------------------------------------


def test_the_counter_starts_at_zero_and_moves_only_with_its_transaction(engine: sa.Engine) -> None:
    assert read(engine) == 0
    with engine.begin() as conn:
        bump(conn)
        bump(conn)
    assert read(engine) == 2

    def failed_revocation() -> None:
        with engine.begin() as conn:
            bump(conn)
            raise RuntimeError("the revocation failed")  # rolled back: the counter with it

    with pytest.raises(RuntimeError):
        failed_revocation()
    assert read(engine) == 2


def test_a_missing_row_is_made_again(engine: sa.Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.delete(revocation_state))
    assert read(engine) == 0
    with engine.begin() as conn:
        bump(conn)
    assert read(engine) == 1


# -- every revocation moves it ----------------------------------------------------------------


def moves(engine: sa.Engine, action: Callable[[], object]) -> int:
    """How far ``action`` moved the counter."""
    before = read(engine)
    action()
    return read(engine) - before


def test_token_revocations_move_the_counter(engine: sa.Engine) -> None:
    store = TokenStore(engine, KEY)
    governance = Governance(store, PolicyStore(engine))
    governance.bootstrap(HOUR, None, "test")  # the first admin token: ci2 is not the last
    store.create("ci", "admin", HOUR)
    store.create_personal("user:alice", "laptop", HOUR)
    assert moves(engine, lambda: store.revoke("ci")) == 1  # CLI token revoke
    assert moves(engine, lambda: store.revoke("alice/laptop", owner="user:alice")) == 1  # own
    governance.create_token("ci2", "admin", "*", HOUR, "test")
    assert moves(engine, lambda: governance.revoke_token("ci2", "test")) == 1  # /guard/api
    before = read(engine)
    with pytest.raises(TokenError):
        store.revoke("nope")
    assert read(engine) == before  # nothing revoked: the counter stays


def test_a_name_changing_hands_revokes_its_personal_tokens_and_moves_the_counter(
    engine: sa.Engine,
) -> None:
    store = TokenStore(engine, KEY)
    bindings = IdentityBindings(engine)
    bindings.claim("user:alice", "ldap", "uuid-a")
    store.create_personal("user:alice", "laptop", HOUR)
    assert moves(engine, lambda: bindings.link("user:alice", "ldap", "uuid-b")) == 1
    assert store.list(owner="user:alice") == []
    assert moves(engine, lambda: bindings.unlink("user:alice")) == 1


def test_session_ends_move_the_counter(engine: sa.Engine) -> None:
    store = sessions(engine)
    one, _ = store.create(person("alice"), client="a")
    assert moves(engine, lambda: store.revoke(one, "logout")) == 1
    assert moves(engine, lambda: store.revoke(one, "logout")) == 0  # already ended: nothing
    _, two = store.create(person("bob"), client="a")
    assert moves(engine, lambda: store.revoke_key(two.key, "admin")) == 1  # session revoke
    store.create(person("carol"), client="a")
    assert moves(engine, lambda: store.revoke_subject("user:carol", "admin")) == 1
    assert moves(engine, lambda: store.revoke_subject("user:carol", "admin")) == 0
    store.create(person("dave", "oidc"), client="a", issuer="https://idp", oidc_sid="s1")
    back_channel = lambda: store.revoke_provider_session("https://idp", sid="s1", sub=None, by="x")  # noqa: E731
    assert moves(engine, back_channel) == 1
    assert moves(engine, back_channel) == 0


def test_a_block_moves_the_counter_even_without_sessions(engine: sa.Engine) -> None:
    blocks = UserBlocks(engine)
    assert moves(engine, lambda: blocks.block("user:alice", "admin")) == 1
    assert moves(engine, lambda: blocks.block("user:alice", "admin")) == 1  # ends new sessions
    assert moves(engine, lambda: blocks.unblock("user:alice")) == 0  # lets in: nothing to drop


# -- the poll ---------------------------------------------------------------------------------


def test_the_poll_follows_the_counter_and_calls_listeners_until_they_succeed(
    sqlite_engine: sa.Engine,
) -> None:
    revocations = Revocations(sqlite_engine, poll_interval=0.01)
    calls: list[int] = []
    failures = [sa.exc.OperationalError("x", {}, Exception("down"))]

    async def listener() -> None:
        calls.append(revocations.counter)
        if failures:
            raise failures.pop()

    revocations.listen(listener)

    async def scenario() -> None:
        assert not await revocations.refresh() and calls == []
        with sqlite_engine.begin() as conn:
            bump(conn)
        with pytest.raises(sa.exc.OperationalError):
            await revocations.refresh()
        assert revocations.counter == 1  # caches stop trusting entries even so
        assert not await revocations.refresh()  # not moved, but the failed listener is owed
        assert calls == [1, 1]
        assert not await revocations.refresh() and calls == [1, 1]
        await revocations.start()
        try:
            with sqlite_engine.begin() as conn:
                bump(conn)
            # (the listeners run in a task of their own: waited for with the counter)
            assert await until(lambda: revocations.counter == 2 and calls[-1] == 2)
        finally:
            await revocations.stop()

    asyncio.run(scenario())


async def until(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    for _ in range(int(seconds / 0.005)):  # bounded
        if condition():
            return True
        await asyncio.sleep(0.005)
    return condition()


def hanging_listener(revocations: Revocations, hangs: int) -> tuple[list[int], asyncio.Event]:
    """A listener added to ``revocations``: the counter at each call, and the gate its call
    number ``hangs`` waits for."""
    calls: list[int] = []
    gate = asyncio.Event()

    async def listener() -> None:
        calls.append(revocations.counter)
        if len(calls) == hangs:
            await gate.wait()

    revocations.listen(listener)
    return calls, gate


def test_a_listener_that_hangs_does_not_stop_the_counter_being_followed(
    sqlite_engine: sa.Engine,
) -> None:
    """The blocked users' read stuck behind a locked table must not keep the replica from
    seeing the next revocation (its caches would trust a revoked token for their whole TTL);
    the listener is called again for the moves seen while it hung."""
    revocations = Revocations(sqlite_engine, poll_interval=0.01)
    calls, gate = hanging_listener(revocations, 2)  # the second call hangs until released

    async def scenario() -> None:
        await revocations.start()
        try:
            for counter in (1, 2, 3):
                with sqlite_engine.begin() as conn:
                    bump(conn)
                assert await until(lambda c=counter: revocations.counter == c)  # type: ignore[misc]
            assert await until(lambda: len(calls) == 2)
            assert calls == [1, 2]  # hung since the second move; the third is seen all the same
            gate.set()
            assert await until(lambda: len(calls) == 3)
            assert calls == [1, 2, 3]  # called again for what it missed
        finally:
            await revocations.stop()

    asyncio.run(scenario())


def test_a_move_seen_after_the_listeners_ended_unwatched_is_followed_at_once(
    sqlite_engine: sa.Engine,
) -> None:
    """The listeners' task outlived one poll's wait and ended before the next poll, which saw
    another move: that poll calls them again itself, not the one after it."""
    revocations = Revocations(sqlite_engine, poll_interval=0.01)
    calls, gate = hanging_listener(revocations, 1)

    async def scenario() -> None:
        with sqlite_engine.begin() as conn:
            bump(conn)
        assert await revocations.refresh()  # waits one interval, the listener still waiting
        gate.set()
        assert await until(
            lambda: revocations._listening is not None and revocations._listening.done()
        )
        with sqlite_engine.begin() as conn:
            bump(conn)
        assert await revocations.refresh()
        assert calls == [1, 2]

    asyncio.run(scenario())


def test_a_revocation_is_seen_while_the_request_paths_threads_are_all_busy(
    sqlite_engine: sa.Engine,
) -> None:
    """Requests whose database lookups hold every thread of anyio's default pool (a slow
    database under load) must not hold back the poll: it has worker threads of its own."""
    revocations = Revocations(sqlite_engine, poll_interval=0.01)
    release = threading.Event()

    async def scenario() -> None:
        await revocations.start()
        default = anyio.to_thread.current_default_thread_limiter()
        busy = [
            asyncio.ensure_future(anyio.to_thread.run_sync(release.wait, 10))
            for _ in range(int(default.total_tokens))
        ]
        try:
            assert await until(lambda: default.borrowed_tokens == default.total_tokens)
            with sqlite_engine.begin() as conn:
                bump(conn)
            assert await until(lambda: revocations.counter == 1)
            assert not any(task.done() for task in busy)  # seen while they all still wait
        finally:
            release.set()
            await asyncio.gather(*busy)
            await revocations.stop()

    asyncio.run(scenario())


@pytest.mark.postgresql
def test_a_locked_block_table_does_not_stop_revocations_on_postgresql(postgres: object) -> None:
    """The same with the real listener: a transaction holding guard_user_block (a migration, a
    LOCK TABLE) makes the blocked users' read wait; revoked tokens are still seen."""
    engine = build_engine(postgres.create_database())  # type: ignore[attr-defined]
    migrate(engine)
    locker = engine.connect()

    def revoke() -> None:
        with engine.begin() as conn:
            bump(conn)

    async def scenario() -> None:
        revocations = Revocations(engine, poll_interval=0.01)
        blocked = BlockedSubjects(UserBlocks(engine), poll_interval=3600)
        revocations.listen(blocked.refresh)
        await blocked.start()
        await revocations.start()
        try:
            with locker.begin():
                locker.exec_driver_sql("LOCK TABLE guard_user_block IN ACCESS EXCLUSIVE MODE")
                await asyncio.to_thread(revoke)
                assert await until(lambda: revocations.counter == 1)
                await asyncio.to_thread(revoke)  # while the listener waits for the lock
                assert await until(lambda: revocations.counter == 2)
        finally:
            await revocations.stop()
            await blocked.stop()

    try:
        asyncio.run(scenario())
    finally:
        locker.close()
        assert wait_for_poll_threads(10)  # the stopped listener's read, done once unlocked
        engine.dispose()


def test_a_block_is_seen_by_the_blocked_subjects_when_the_counter_moves(
    sqlite_engine: sa.Engine,
) -> None:
    blocked = BlockedSubjects(UserBlocks(sqlite_engine), poll_interval=3600)
    revocations = Revocations(sqlite_engine)
    revocations.listen(blocked.refresh)

    async def scenario() -> None:
        await blocked.refresh()
        UserBlocks(sqlite_engine).block("user:alice", "admin")
        assert "user:alice" not in blocked  # its own poll is an hour away
        await revocations.refresh()
        assert "user:alice" in blocked

    asyncio.run(scenario())


# -- the cache --------------------------------------------------------------------------------


class Loads:
    """A loader that counts its calls and can be held until released."""

    def __init__(self, value: object = "v") -> None:
        self.calls: list[object] = []
        self.value = value
        self.gate: asyncio.Event | None = None

    def __call__(self, key: object) -> Callable[[], asyncio.Future[object]]:
        async def load() -> object:
            self.calls.append(key)
            if self.gate is not None:
                await self.gate.wait()
            return self.value

        return load  # type: ignore[return-value]


def test_entries_hold_while_the_counter_stays_and_are_read_again_once_it_moves() -> None:
    counter = Counter()
    cache: RevocableCache[str, object] = RevocableCache(counter, ttl=HOUR)
    loads = Loads()

    async def scenario() -> None:
        for _ in range(3):
            assert await cache.get("a", loads("a")) == "v"
        assert loads.calls == ["a"]
        counter.counter += 1
        assert await cache.get("a", loads("a")) == "v"
        assert await cache.get("a", loads("a")) == "v"
        assert loads.calls == ["a", "a"]

    asyncio.run(scenario())


def test_a_revocation_costs_one_lookup_per_cached_key_however_many_requests_wait() -> None:
    counter = Counter()
    cache: RevocableCache[str, object] = RevocableCache(counter, ttl=HOUR)
    loads = Loads()
    keys = [f"k{n}" for n in range(20)]

    async def burst() -> None:
        loads.gate = asyncio.Event()
        waiting = [asyncio.ensure_future(cache.get(k, loads(k))) for k in keys for _ in range(10)]
        await asyncio.sleep(0)
        loads.gate.set()
        assert set(await asyncio.gather(*waiting)) == {"v"}

    async def scenario() -> None:
        await burst()
        assert sorted(map(str, loads.calls)) == sorted(keys)  # 200 requests, 20 lookups
        await burst()
        assert len(loads.calls) == 20  # all cached
        counter.counter += 1
        await burst()
        assert len(loads.calls) == 40  # one more per key

    asyncio.run(scenario())


def test_a_lookup_that_began_before_a_revocation_is_not_joined_nor_trusted_after_it() -> None:
    counter = Counter()
    cache: RevocableCache[str, object] = RevocableCache(counter, ttl=HOUR)
    old, new = Loads("before"), Loads("after")

    async def scenario() -> None:
        old.gate = asyncio.Event()
        slow = asyncio.ensure_future(cache.get("a", old("a")))
        await asyncio.sleep(0)
        counter.counter += 1  # the poll saw a revocation while the old lookup was under way
        assert await cache.get("a", new("a")) == "after"  # a new lookup, not the old one's
        old.gate.set()
        assert await slow == "before"
        assert await cache.get("a", new("a")) == "after"  # the older answer did not win
        assert new.calls == ["a"]

    asyncio.run(scenario())


def test_kept_values_ttl_size_and_failures() -> None:
    counter = Counter()
    now = [0.0]
    cache: RevocableCache[str, object] = RevocableCache(
        counter, ttl=5, size=2, keep=lambda v: v is not None, clock=lambda: now[0]
    )
    none, some = Loads(None), Loads()

    async def failing() -> object:
        raise sa.exc.OperationalError("x", {}, Exception("down"))

    async def scenario() -> None:
        assert await cache.get("unknown", none("unknown")) is None
        assert await cache.get("unknown", none("unknown")) is None
        assert len(none.calls) == 2  # not kept: asked each time
        await cache.get("a", some("a"))
        now[0] = 5.0  # ttl over: asked again
        await cache.get("a", some("a"))
        assert some.calls == ["a", "a"]
        await cache.get("b", some("b"))
        await cache.get("c", some("c"))
        assert len(cache) == 2  # the oldest went
        with pytest.raises(sa.exc.OperationalError):
            await cache.get("d", failing)
        assert await cache.get("d", some("d")) == "v"  # a failure is not remembered

    asyncio.run(scenario())

    zero: RevocableCache[str, object] = RevocableCache(counter, ttl=0)
    every = Loads()

    async def asks_every_time() -> None:
        await zero.get("a", every("a"))
        await zero.get("a", every("a"))

    asyncio.run(asks_every_time())
    assert every.calls == ["a", "a"] and len(zero) == 0


# -- the caches obey it -----------------------------------------------------------------------


def test_a_cached_token_is_refused_once_the_counter_moves(sqlite_engine: sa.Engine) -> None:
    store = TokenStore(sqlite_engine, KEY)
    _, secret = store.create("ci", "admin", HOUR)
    revocations = Revocations(sqlite_engine)
    provider = TokenProvider(store, cache_ttl=HOUR, revocations=revocations)
    credentials = Credentials("bearer", secret)

    async def scenario() -> None:
        await revocations.refresh()
        assert isinstance(await provider.authenticate(credentials), Principal)
        TokenStore(sqlite_engine, KEY).revoke("ci")  # another replica, or the CLI
        assert isinstance(await provider.authenticate(credentials), Principal)  # not polled yet
        await revocations.refresh()
        result = await provider.authenticate(credentials)
        assert isinstance(result, Refusal) and result.reason == "token_revoked"

    asyncio.run(scenario())


def test_a_blocked_persons_personal_token_is_refused_once_the_counter_moves(
    sqlite_engine: sa.Engine,
) -> None:
    store = TokenStore(sqlite_engine, KEY)
    _, secret = store.create_personal("user:alice", "laptop", HOUR)
    revocations = Revocations(sqlite_engine)
    provider = TokenProvider(store, cache_ttl=HOUR, revocations=revocations)

    async def scenario() -> None:
        await revocations.refresh()
        assert isinstance(await provider.authenticate(Credentials("bearer", secret)), Principal)
        UserBlocks(sqlite_engine).block("user:alice", "admin")
        await revocations.refresh()
        result = await provider.authenticate(Credentials("bearer", secret))
        assert isinstance(result, Refusal) and result.reason == "token_revoked"

    asyncio.run(scenario())


class CountedTokens:
    def __init__(self, store: TokenStore) -> None:
        self.store = store
        self.calls = 0

    def by_id(self, token_id: int) -> TokenRecord | None:
        self.calls += 1
        return self.store.by_id(token_id)


def test_a_token_session_ends_once_the_counter_moves(sqlite_engine: sa.Engine) -> None:
    store = TokenStore(sqlite_engine, KEY)
    record, _ = store.create_personal("user:alice", "laptop", HOUR)
    session_store = sessions(sqlite_engine)
    session_id, _ = session_store.create(person("alice", "token", f"token:{record.id}"), client="a")
    tokens = CountedTokens(store)
    revocations = Revocations(sqlite_engine)
    browsers = BrowserSessions(
        session_store, SessionCookie(KEY, name="s", secure=False, max_age=3600),
        own_origins=[ORIGIN], tokens=tokens, token_cache_ttl=HOUR, revocations=revocations,
    )  # fmt: skip

    async def scenario() -> None:
        await revocations.refresh()
        assert isinstance(await browsers.authenticate(session_id), Principal)
        assert isinstance(await browsers.authenticate(session_id), Principal)
        assert tokens.calls == 1  # cached
        store.revoke("alice/laptop", owner="user:alice")
        assert isinstance(await browsers.authenticate(session_id), Principal)  # not polled yet
        await revocations.refresh()
        assert await browsers.authenticate(session_id) is None
        assert tokens.calls == 2

    asyncio.run(scenario())
    assert session_store.list(subject="user:alice") == []  # the session row ended too


def test_a_cached_directory_login_is_checked_again_once_the_counter_moves() -> None:
    counter = Counter()
    provider = LdapProvider(LdapConfig(urls=("ldap://127.0.0.1:1",)), revocations=counter)
    attempts: list[str] = []
    user = DirectoryUser("uid=alice,dc=x", "alice", (), stable_id="uuid-a")

    async def attempt(name: str, password: str, client: str) -> Attempt:
        attempts.append(name)
        return Attempt(user)

    provider._attempt = attempt  # type: ignore[method-assign]
    credentials = Credentials("basic", "secret", "alice")

    async def scenario() -> None:
        for _ in range(3):
            assert isinstance(await provider.authenticate(credentials), Principal)
        assert attempts == ["alice"]
        counter.counter += 1
        assert isinstance(await provider.authenticate(credentials), Principal)
        assert isinstance(await provider.authenticate(credentials), Principal)
        assert attempts == ["alice", "alice"]

    asyncio.run(scenario())
    provider.close()


def test_a_cached_jwt_is_verified_again_once_the_counter_moves() -> None:
    from tests.unit.identity.test_bearer import bearer, robot, scenario
    from tests.unit.identity.test_oidc import NOW, Clock, Provider

    async def body(p: Provider, bp: object, clock: Clock) -> None:
        from guard.identity.bearer import BearerProvider

        assert isinstance(bp, BearerProvider)
        counter = bp.revocations = Counter()
        token = p.sign(robot(p))
        first = await bp.authenticate(bearer(token))
        assert isinstance(first, Principal)
        bp.issuers[p.url].issuer._keys = {}  # only a cached answer can accept it now
        p.down = True
        assert await bp.authenticate(bearer(token)) is first
        counter.counter += 1
        assert isinstance(await bp.authenticate(bearer(token)), Refusal)
        assert clock.wall < NOW + 300  # not expired: the counter alone dropped it

    scenario(body)


def test_the_policy_version_is_not_the_revocation_counter(sqlite_engine: sa.Engine) -> None:
    policies = PolicyStore(sqlite_engine)
    policies.seed_defaults("test", [])
    policies.change("test", add=[Grant("user:alice", "viewer", "*")])
    version = policies.version()
    store = TokenStore(sqlite_engine, KEY)
    store.create("ci", "admin", HOUR)
    store.revoke("ci")
    UserBlocks(sqlite_engine).block("user:bob", "admin")
    assert policies.version() == version  # no policy rebuild for a revocation
    assert read(sqlite_engine) == 2


def test_a_directory_login_joined_after_a_revocation_is_not_cached_under_the_new_counter() -> None:
    counter = Counter()
    provider = LdapProvider(LdapConfig(urls=("ldap://127.0.0.1:1",)), revocations=counter)
    attempts: list[str] = []
    user = DirectoryUser("uid=alice,dc=x", "alice", (), stable_id="uuid-a")
    gate = asyncio.Event()

    async def attempt(name: str, password: str, client: str) -> Attempt:
        attempts.append(name)
        await gate.wait()  # the bind began before the revocation below
        return Attempt(user)

    provider._attempt = attempt  # type: ignore[method-assign]
    credentials = Credentials("basic", "secret", "alice")

    async def scenario() -> None:
        first = asyncio.ensure_future(provider.authenticate(credentials))
        await asyncio.sleep(0)
        counter.counter += 1
        joined = asyncio.ensure_future(provider.authenticate(credentials))
        await asyncio.sleep(0)
        gate.set()
        assert isinstance(await first, Principal) and isinstance(await joined, Principal)
        assert attempts == ["alice"]  # one bind for both
        assert isinstance(await provider.authenticate(credentials), Principal)
        assert attempts == ["alice", "alice"]  # its answer predates the revocation: bound again

    asyncio.run(scenario())
    provider.close()
