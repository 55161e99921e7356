from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from guard.authz.policy import Grant, Membership, PolicyError, PolicySet
from guard.authz.store import PolicyStore
from guard.db import build_engine, casbin_rules, migrate


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
