import json
from pathlib import Path

import pytest

from guard.cli import main


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for name in list(__import__("os").environ):
        if name.startswith("MLFLOW_GUARD_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_check_config_ok_prints_every_setting_and_its_source(env: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["check-config", "--port", "6001"]) == 0
    out = capsys.readouterr().out
    assert "configuration OK" in out
    assert "gateway.port = 6001  [flag --port]" in out
    assert "gateway.host = '127.0.0.1'  [default]" in out


def test_check_config_reports_all_problems_and_exits_2(env: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    (env / "bad.toml").write_text("[gateway]\nport = 0\ncors_allowed_origins = ['*']\n")
    assert main(["check-config", "--config", "bad.toml", "--allowed-hosts", "bad host"]) == 2
    err = capsys.readouterr().err
    assert "gateway.port: must be between 1 and 65535" in err
    assert "gateway.cors_allowed_origins: '*' is not an origin" in err
    assert "gateway.allowed_hosts: 'bad host' is not a host pattern" in err
    assert "3 configuration problem(s)." in err


def test_serve_refuses_to_start_on_bad_configuration(env: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["serve", "--port", "0"]) == 2
    assert "gateway.port" in capsys.readouterr().err


def test_token_lifecycle(env: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    args = ["--data-dir", str(env / "data")]
    assert main(["token", "create", "--name", "ci-promoter", "--role", "admin", *args]) == 0
    out = capsys.readouterr().out
    secret = next(line.strip() for line in out.splitlines() if line.strip().startswith("mlg_"))
    assert "shown only now" in out
    assert (env / "data" / "secret.key").stat().st_mode & 0o777 == 0o600

    assert main(["token", "create", "--name", "short", "--role", "admin", "--expires", "12h",
                 "--quiet", *args]) == 0  # fmt: skip
    quiet = capsys.readouterr().out.strip()
    assert quiet.startswith("mlg_") and "\n" not in quiet

    assert main(["token", "list", "--format", "json", *args]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == ["ci-promoter", "short"]
    assert all(r["state"] == "active" and r["last_used"] is None for r in rows)
    assert secret not in json.dumps(rows)

    assert main(["token", "list", *args]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == [
        "NAME",
        "ROLE",
        "STATE",
        "CREATED",
        "EXPIRES",
        "LAST",
        "USED",
    ]
    assert secret not in table

    assert main(["token", "revoke", "ci-promoter", *args]) == 0
    assert main(["token", "revoke", "ci-promoter", *args]) == 1
    assert "no live token named 'ci-promoter'" in capsys.readouterr().err
    assert main(["token", "list", "--all", "--format", "json", *args]) == 0
    states = {r["name"]: r["state"] for r in json.loads(capsys.readouterr().out)}
    assert states == {"ci-promoter": "revoked", "short": "active"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--name", "Bad Name", "--role", "admin"], "is invalid"),
        (["--name", "ok", "--role", "superuser"], "does not exist"),
        (["--name", "ok", "--role", "viewer", "--resource", "runs:x"], "unknown resource kind"),
        (["--name", "ok", "--role", "admin", "--expires", "soon"], "not a duration"),
        (["--name", "ok", "--role", "admin", "--expires", "0d"], "future"),
    ],
)
def test_token_create_errors(env: Path, capsys, extra: list[str], message: str) -> None:  # type: ignore[no-untyped-def]
    assert main(["token", "create", *extra, "--data-dir", str(env / "data")]) == 1
    assert message in capsys.readouterr().err


def test_token_roles_are_grants(env: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    args = ["--data-dir", str(env / "data")]
    assert main(["token", "create", "--name", "ci", "--role", "promoter",
                 "--resource", "model:fraud-*", "--quiet", *args]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["policy", "explain", "--subject", "token:ci", "--action", "promote",
                 "--resource", "model:fraud-detector", *args]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "ALLOW: token:ci promote model:fraud-detector" in out
    assert "granted by: p, token:ci, promoter, model:fraud-*, allow" in out
    assert main(["policy", "explain", "--subject", "token:ci", "--action", "delete",
                 "--resource", "model:fraud-detector", *args]) == 1  # fmt: skip
    assert "no grant matched" in capsys.readouterr().out
    assert main(["token", "revoke", "ci", *args]) == 0
    assert main(["policy", "export", *args]) == 0
    assert "token:ci" not in capsys.readouterr().out  # revoking removed its grants


def test_policy_commands(env: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    args = ["--data-dir", str(env / "data")]
    assert main(["role", "assign", "--subject", "user:root", "--role", "admin", *args]) == 0
    assert main(["role", "assign", "--subject", "user:alice", "--role", "editor",
                 "--resource", "experiment:fraud/*", *args]) == 0  # fmt: skip
    assert main(["policy", "add", "g, user:alice, group:risk",
                 "p, group:risk, viewer, experiment:*", *args]) == 0  # fmt: skip
    assert main(["policy", "add", "p, user:bob, ghost, *", *args]) == 1
    assert "role 'ghost' is not defined" in capsys.readouterr().err
    assert main(["policy", "export", "--output", str(env / "p.csv"), *args]) == 0
    exported = (env / "p.csv").read_text()
    assert "p, user:alice, editor, experiment:fraud/*, allow" in exported
    assert "g, user:alice, group:risk" in exported
    capsys.readouterr()

    edited = exported.replace("p, group:risk, viewer, experiment:*, allow\n", "")
    edited += "p, user:carol, viewer, model:*\n"
    (env / "p.csv").write_text(edited)
    assert main(["policy", "import", str(env / "p.csv"), "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    assert "- p, group:risk, viewer, experiment:*, allow" in out
    assert "+ p, user:carol, viewer, model:*, allow" in out
    assert "1 to add, 1 to remove" in out
    assert (
        main(
            [
                "policy",
                "explain",
                "--subject",
                "user:carol",
                "--action",
                "read",
                "--resource",
                "model:x",
                *args,
            ]
        )
        == 1
    )  # fmt: skip  (dry run changed nothing)
    assert main(["policy", "import", str(env / "p.csv"), *args]) == 0
    assert main(["policy", "explain", "--subject", "user:carol", "--action", "read",
                 "--resource", "model:x", *args]) == 0  # fmt: skip
    (env / "bad.csv").write_text("p, user:x, ghost, *\n")
    assert main(["policy", "import", str(env / "bad.csv"), *args]) == 1
    assert main(["role", "unassign", "--subject", "user:root", "--role", "admin", *args]) == 1
    assert "last administrator" in capsys.readouterr().err
    assert main(["role", "list", *args]) == 0
    assert "promoter     promote, read" in capsys.readouterr().out
