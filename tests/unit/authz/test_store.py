from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from guard.authz.policy import Grant, Membership, PolicyError, PolicySet
from guard.authz.store import PolicyStore
from guard.store.db import build_engine, casbin_rules, migrate


@pytest.fixture
def store(database_uri: str) -> Iterator[PolicyStore]:
    engine = build_engine(database_uri)
    migrate(engine)
    yield PolicyStore(engine)
    engine.dispose()


def test_seed_once_then_load(store: PolicyStore) -> None:
    extra = [Grant("token:admin", "admin", "*")]
    assert store.version() == 0
    assert store.seed_defaults("test", extra) is True
    assert store.seed_defaults("test", extra) is False
    version, policy = store.load()
    assert version == 1
    assert Grant("token:admin", "admin", "*") in policy.grants
    assert "viewer" in policy.role_names()


def test_changes_are_validated_atomic_and_versioned(store: PolicyStore) -> None:
    store.seed_defaults("test")
    alice = Grant("user:alice", "editor", "experiment:fraud/My Experiment *")
    assert store.change("test", add=[alice, Membership("user:alice", "group:risk")]) == 2
    assert store.change("test", add=[alice]) == 2  # no-op: no new version
    with pytest.raises(PolicyError, match="not defined"):
        store.change("test", add=[Grant("user:bob", "ghost", "*")])
    version, policy = store.load()
    assert version == 2
    assert alice in policy.grants
    assert Grant("user:bob", "ghost", "*") not in policy.grants
    assert store.change("test", remove=[alice]) == 3
    assert alice not in store.load()[1].grants


def test_replace(store: PolicyStore) -> None:
    store.seed_defaults("test")
    new = PolicySet.from_csv("g2, viewer, read\np, user:x, viewer, experiment:*\n")
    assert store.replace(new, "importer") == 2
    assert store.load() == (2, new)
    with pytest.raises(PolicyError):
        store.replace(PolicySet.from_rows([["p", "user:x", "ghost", "*"]], validate=False), "x")
    assert store.load() == (2, new)


def test_a_tampered_table_is_refused_not_half_loaded(store: PolicyStore) -> None:
    store.seed_defaults("test")
    with store.engine.begin() as conn:
        conn.execute(
            casbin_rules.insert().values(ptype="p", v0="nobody", v1="x", v2="y", v3="allow")
        )
    with pytest.raises(PolicyError, match="not a subject"):
        store.load()


def test_stored_rows_use_casbins_layout(store: PolicyStore) -> None:
    store.seed_defaults("test")
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(casbin_rules).where(casbin_rules.c.ptype == "p")).first()
    assert row is not None
    assert (row.v0, row.v1, row.v2, row.v3, row.v4) == ("group:admins", "admin", "*", "allow", None)


def test_rules_made_in_code_meet_the_csv_grammar(store: PolicyStore) -> None:
    """An experiment named with a quote must not become a grant no one can load again."""
    store.seed_defaults("test")
    for name in ("alice-it's", 'say "hi"', "a,b", "trailing ", "line\nbreak"):
        with pytest.raises(PolicyError, match="not a resource pattern"):
            store.change("test", add=[Grant("user:alice", "manager", f"experiment:{name}")])
    version, _ = store.load()  # still loadable
    assert version == 1


def test_a_change_judged_on_an_old_version_is_refused(store: PolicyStore) -> None:
    from guard.authz.store import PolicyConflict

    store.seed_defaults("test")
    grant = Grant("user:alice", "viewer", "experiment:x")
    store.change("test", add=[Grant("user:bob", "viewer", "*")])
    with pytest.raises(PolicyConflict):
        store.change("test", add=[grant], expected_version=1)
    assert store.change("test", add=[grant], expected_version=2) == 3


def test_two_concurrent_removals_cannot_remove_the_last_administrator(
    store: PolicyStore,
) -> None:
    """Each removal alone is fine; together they would leave none. The check runs under the
    store's write lock, so one of them must fail, every time."""
    import threading

    from guard.admin.governance import Governance, administrators

    store.seed_defaults("test")
    governance = Governance(None, store)  # type: ignore[arg-type] - tokens are not used here
    admins = [Grant("user:a", "admin", "*"), Grant("user:b", "admin", "*")]
    for _ in range(15):
        governance.change("test", add=admins)
        barrier = threading.Barrier(2)
        outcomes: list[str] = []

        def remove(
            grant: Grant, barrier: threading.Barrier = barrier, outcomes: list[str] = outcomes
        ) -> None:
            barrier.wait()
            try:
                governance.change("test", remove=[grant])
                outcomes.append("removed")
            except PolicyError:
                outcomes.append("refused")

        threads = [threading.Thread(target=remove, args=(g,)) for g in admins]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(outcomes) == ["refused", "removed"]
        assert administrators(store.load()[1])
