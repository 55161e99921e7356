"""``mlflow-guard token create --user NAME``: administrators make a person's personal token."""

import json
from pathlib import Path

import pytest

from guard.cli.main import main


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(__import__("os").environ):
        if name.startswith("MLFLOW_GUARD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_personal_token_lifecycle(env: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    args = ["--data-dir", str(env / "data")]
    assert main(["token", "create", "--user", "Alice", "--name", "ci", *args]) == 0
    out = capsys.readouterr().out
    assert "'alice/ci' for user:alice" in out and "user name 'alice'" in out
    assert any(line.strip().startswith("mlg_") for line in out.splitlines())
    assert main(["token", "create", "--user", "user:bob", "--name", "ci", "--expires", "1d",
                 "--quiet", *args]) == 0  # fmt: skip
    assert capsys.readouterr().out.strip().startswith("mlg_")
    assert main(["token", "list", "--format", "json", *args]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["alice/ci"]["owner"] == "user:alice" and rows["alice/ci"]["role"] == "personal"
    assert rows["bob/ci"]["owner"] == "user:bob"
    assert main(["token", "list", *args]) == 0
    table = capsys.readouterr().out
    assert "user:alice" in table.splitlines()[-2] + table.splitlines()[-1]
    assert main(["token", "revoke", "alice/ci", *args]) == 0
    assert "Revoked personal token 'alice/ci' of user:alice" in capsys.readouterr().out
    assert main(["token", "revoke", "alice/ci", *args]) == 1


def test_a_blocked_person_gets_no_token(env: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    args = ["--data-dir", str(env / "data")]
    assert main(["token", "create", "--user", "carol", "--name", "ci", "--quiet", *args]) == 0
    assert main(["user", "block", "carol", *args]) == 0
    capsys.readouterr()
    assert main(["token", "list", "--all", "--format", "json", *args]) == 0
    [row] = [r for r in json.loads(capsys.readouterr().out) if r["name"] == "carol/ci"]
    assert row["state"] == "revoked"  # the block revoked it
    assert main(["token", "create", "--user", "carol", "--name", "new", *args]) == 1
    assert "is blocked" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--user", "alice", "--name", "ci", "--role", "admin"], "no role or resource"),
        (["--user", "alice", "--name", "ci", "--resource", "*"], "no role or resource"),
        (["--user", "token:ci", "--name", "ci"], "is not a person"),
        (["--user", "alice", "--name", "Bad"], "is invalid"),
        (["--user", "alice", "--name", "ci", "--expires", "91d"], "at most 90 days"),
        (["--name", "ci"], "--role is required"),
    ],
)
def test_personal_token_errors(env: Path, capsys, extra: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    assert main(["token", "create", *extra, "--data-dir", str(env / "data")]) == 1
    assert message in capsys.readouterr().err
