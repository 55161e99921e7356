"""``mlflow-guard session list|revoke`` and ``user block|unblock|blocked`` on a real database,
with the audit events they write."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guard.cli.main import main
from guard.identity.base import Principal
from guard.identity.sessions import SessionStore
from guard.store.db import build_engine, migrate


@pytest.fixture
def data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(__import__("os").environ):
        if name.startswith("MLFLOW_GUARD_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MLFLOW_GUARD_SECRET_KEY", "k" * 40)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "data"


def sessions(data: Path) -> tuple[SessionStore, dict[str, str]]:
    """Alice twice, Bob once (as the login page would create them); their cookie ids."""
    data.mkdir(exist_ok=True)
    engine = build_engine(f"sqlite:///{data / 'guard.db'}")
    migrate(engine)
    store = SessionStore(engine, b"x" * 32, idle_timeout=3600, absolute_timeout=43200)
    ids = {}
    for who, client in (("alice", "10.0.0.1"), ("alice", "10.0.0.2"), ("bob", "10.0.0.3")):
        principal = Principal(f"user:{who}", who, "ldap", (), identity=f"ldap:{who}")
        ids[f"{who}@{client}"] = store.create(principal, client=client)[0]
    return store, ids


def run(data: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main([*args, "--data-dir", str(data)])
    out, err = capsys.readouterr()
    return code, out, err


def events(data: Path, capsys: pytest.CaptureFixture[str]) -> list[dict[str, object]]:
    _, out, _ = run(data, capsys, "audit", "query", "--kind", "event", "--format", "jsonl")
    return [json.loads(line) for line in reversed(out.splitlines())]  # oldest first


def test_session_list_and_revoke(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, ids = sessions(data)
    code, out, _ = run(data, capsys, "session", "list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "KEY", "SUBJECT", "METHOD", "CLIENT", "CREATED", "LAST", "SEEN", "ENDS", "STATE",
    ]  # fmt: skip
    assert len(lines) == 4 and all("active" in line for line in lines[1:])
    assert all(session_id not in out for session_id in ids.values())  # never the cookie's id
    code, out, _ = run(data, capsys, "session", "list", "--user", "Alice", "--format", "json")
    listed = json.loads(out)
    assert {r["subject"] for r in listed} == {"user:alice"} and len(listed) == 2
    assert {r["client"] for r in listed} == {"10.0.0.1", "10.0.0.2"}

    key = next(r["key"] for r in listed if r["client"] == "10.0.0.1")
    code, out, _ = run(data, capsys, "session", "revoke", key[:8])
    assert code == 0 and f"Ended session {key}" in out
    assert store.get(ids["alice@10.0.0.1"]) is None
    assert store.get(ids["alice@10.0.0.2"]) is not None
    code, _, err = run(data, capsys, "session", "revoke", key)
    assert code == 1 and "no active session" in err

    code, out, _ = run(data, capsys, "session", "revoke", "--user", "bob")
    assert code == 0 and "Ended 1 session(s) of user:bob" in out
    assert store.get(ids["bob@10.0.0.3"]) is None

    code, out, _ = run(data, capsys, "session", "list", "--all", "--format", "json")
    states = sorted((r["subject"], r["state"]) for r in json.loads(out))
    assert states == [("user:alice", "active"), ("user:alice", "revoked"), ("user:bob", "revoked")]

    revoked = [e for e in events(data, capsys) if e["event"] == "session_revoked"]
    assert [(e["phase"], e.get("session"), e.get("subject")) for e in revoked] == [
        ("intent", key, None), ("done", key, "user:alice"),
        ("intent", None, "user:bob"), ("done", None, "user:bob"),
    ]  # fmt: skip
    assert all(str(e["principal"]).startswith("cli:") for e in revoked)
    store.engine.dispose()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "name one session KEY or --user NAME"),
        (["abcdef0123", "--user", "bob"], "name one session KEY or --user NAME"),
        (["abc"], "8+ hex characters"),
        (["zzzzzzzzzz"], "8+ hex characters"),
    ],
)
def test_session_revoke_errors(
    data: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    sessions(data)[0].engine.dispose()
    code, _, err = run(data, capsys, "session", "revoke", *args)
    assert code == 1 and message in err


def test_block_ends_sessions_and_is_listed(data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store, ids = sessions(data)
    code, out, _ = run(data, capsys, "user", "block", "Alice", "--reason", "left the company")
    assert code == 0 and out.startswith("Blocked user:alice")
    assert store.get(ids["alice@10.0.0.1"]) is None and store.get(ids["alice@10.0.0.2"]) is None
    assert store.get(ids["bob@10.0.0.3"]) is not None
    code, out, _ = run(data, capsys, "user", "block", "user:alice")
    assert code == 0 and "already blocked" in out
    code, out, _ = run(data, capsys, "user", "blocked", "--format", "json")
    [entry] = json.loads(out)
    assert entry["subject"] == "user:alice" and entry["reason"] == "left the company"
    assert entry["by"].startswith("cli:")
    code, out, _ = run(data, capsys, "user", "blocked")
    assert "user:alice" in out and "left the company" in out

    code, _, err = run(data, capsys, "user", "block", "token:ci")
    assert code == 1 and "token revoke" in err

    code, out, _ = run(data, capsys, "user", "unblock", "alice")
    assert code == 0 and "Unblocked user:alice" in out
    code, _, err = run(data, capsys, "user", "unblock", "alice")
    assert code == 1 and "not blocked" in err
    assert store.get(ids["alice@10.0.0.1"]) is None  # ended sessions stay ended

    recorded = [
        (e["event"], e["phase"], e["subject"])
        for e in events(data, capsys)
        if e["event"] in ("user_blocked", "user_unblocked")
    ]
    assert recorded == [
        ("user_blocked", "intent", "user:alice"), ("user_blocked", "done", "user:alice"),
        ("user_blocked", "intent", "user:alice"), ("user_blocked", "done", "user:alice"),
        ("user_unblocked", "intent", "user:alice"), ("user_unblocked", "done", "user:alice"),
        ("user_unblocked", "intent", "user:alice"), ("user_unblocked", "failed", "user:alice"),
    ]  # fmt: skip
    store.engine.dispose()
