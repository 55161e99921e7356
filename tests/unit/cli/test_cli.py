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


@pytest.mark.parametrize("command", ["serve", "check-config"])
@pytest.mark.parametrize("value", ["x" * 47, "MLG_" + "a" * 43, " mlg_" + "a" * 43, "mlg_abc"])
def test_a_bootstrap_token_without_the_prefix_is_reported_with_every_other_problem(
    env: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    value: str,
) -> None:
    import guard.app

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the gateway must not be built")

    monkeypatch.setattr(guard.app, "build_gateway", never)
    monkeypatch.setenv("MLFLOW_GUARD_BOOTSTRAP_TOKEN", value)
    assert main([command, "--port", "0", "--data-dir", str(env / "data")]) == 2
    err = capsys.readouterr().err
    assert "env MLFLOW_GUARD_BOOTSTRAP_TOKEN: " in err
    assert "mlg_ followed by 32-252 characters" in err
    assert "gateway.port" in err and "2 configuration problem(s)" in err
    assert value.strip() not in err
    assert not (env / "data").exists()


def test_a_token_shaped_bootstrap_token_passes_check_config(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_GUARD_BOOTSTRAP_TOKEN", "mlg_" + "0f" * 32)
    assert main(["check-config"]) == 0


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
        "OWNER",
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


def _os_account() -> str:
    import os
    import pwd

    return pwd.getpwuid(os.geteuid()).pw_name


def test_cli_changes_are_attributed_to_the_os_account_not_user(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlalchemy as sa

    from guard.store.db import build_engine, policy_state

    monkeypatch.setenv("MLFLOW_GUARD_SECRET_KEY", "k" * 40)
    monkeypatch.setenv("USER", "someone-else")
    monkeypatch.setenv("LOGNAME", "someone-else")
    args = ["--data-dir", str(env / "data")]
    expected = f"cli:{_os_account()}"
    assert expected != "cli:someone-else"
    assert main(["role", "assign", "--subject", "user:alice", "--role", "viewer", *args]) == 0
    assert main(["token", "create", "--name", "ci", "--role", "viewer", "--quiet", *args]) == 0
    capsys.readouterr()
    assert main(["audit", "query", "--kind", "event", "--format", "jsonl", *args]) == 0
    events = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(events) == 4 and {e["principal"] for e in events} == {expected}
    engine = build_engine(f"sqlite:///{env / 'data' / 'guard.db'}")
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.select(policy_state.c.updated_by)).scalar() == expected
    finally:
        engine.dispose()


def test_an_account_without_a_name_is_its_uid(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from guard.cli import common

    def nameless(uid: int) -> None:
        raise KeyError(uid)

    monkeypatch.setenv("USER", "someone-else")
    monkeypatch.setattr(common.pwd, "getpwuid", nameless)
    assert common.cli_actor() == f"cli:uid:{os.geteuid()}"


def test_explain_without_a_subject_needs_a_gateway(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_GUARD_SECRET_KEY", "k" * 40)
    args = ["--action", "read", "--resource", "experiment:x", "--data-dir", str(env / "data")]
    assert main(["policy", "explain", *args]) == 2
    assert "--subject is required without --gateway" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["policy", "explain", "--subject", "user:a", "--action", "fly", *args[2:]])


def test_every_subcommand_is_documented() -> None:
    import argparse

    from guard.cli.main import build_parser

    def subcommands(
        parser: argparse.ArgumentParser, path: str
    ) -> list[tuple[str, argparse.ArgumentParser, str | None]]:
        found = []
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                helps = {a.dest: a.help for a in action._choices_actions}
                for name, sub in action.choices.items():
                    found.append((f"{path} {name}", sub, helps.get(name)))
                    found += subcommands(sub, f"{path} {name}")
        return found

    found = subcommands(build_parser(), "mlflow-guard")
    assert {"mlflow-guard role assign", "mlflow-guard role unassign"} <= {p for p, _, _ in found}
    undocumented = [path for path, _, text in found if not text]
    assert undocumented == []
    role_help = next(sub for path, sub, _ in found if path == "mlflow-guard role").format_help()
    for name in ("assign", "unassign", "list"):
        line = next(line for line in role_help.splitlines() if line.strip().startswith(name))
        assert len(line.split()) > 1, f"role {name} has no description in role --help"


@pytest.mark.parametrize(
    ("expiry", "says"), [("90d", "It expires in 90 days ("), ("12h", "It expires in 12 hours (")]
)
def test_the_bootstrap_banner_says_when_the_token_expires(
    env: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    expiry: str,
    says: str,
) -> None:
    """`serve` prints the banner with tokens.default_expiry as configured, not a constant."""
    import guard.app
    from guard.keys import SecretKeyError

    def stop_after_bootstrap(settings, environ, on_bootstrap):  # type: ignore[no-untyped-def]
        on_bootstrap("mlg_" + "s" * 43)
        raise SecretKeyError("stop here")

    monkeypatch.setattr(guard.app, "build_gateway", stop_after_bootstrap)
    monkeypatch.setattr("signal.signal", lambda *a: None)
    monkeypatch.setenv("MLFLOW_GUARD_TOKENS_DEFAULT_EXPIRY", expiry)
    assert main(["serve", "--data-dir", str(env / "data")]) == 2
    out = capsys.readouterr().out
    assert "mlg_" + "s" * 43 in out and says in out and "UTC; tokens.default_expiry)" in out


def test_policy_qualify_rewrites_grants_for_workspaces(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before turning workspaces on: unqualified grants move into one workspace, nothing else
    changes; with workspaces on, a grant naming none is refused."""
    args = ["--data-dir", str(env / "data")]
    rows = ["p, group:risk, viewer, experiment:fraud/*", "p, user:bob, editor, model:churn",
            "p, user:eve, viewer, *:x"]  # fmt: skip
    assert main(["policy", "add", *rows, *args]) == 0
    capsys.readouterr()
    assert main(["policy", "qualify", "--workspace", "Team", *args]) == 1
    assert "'Team' is no workspace name" in capsys.readouterr().err
    assert main(["policy", "qualify", "--workspace", "default", "--dry-run", *args]) == 0
    out = capsys.readouterr().out
    assert "- p, group:risk, viewer, experiment:fraud/*, allow" in out
    assert "+ p, group:risk, viewer, default/experiment:fraud/*, allow" in out
    assert "+ p, user:eve, viewer, default/*:x, allow" in out
    assert "3 to add, 3 to remove" in out
    assert "group:admins, admin, *" not in out  # '*' covers every workspace as it is
    # workspaces off: qualified grants could never match, so the change is refused
    assert main(["policy", "qualify", "--workspace", "default", *args]) == 1
    assert "names a workspace, and upstream.workspaces is off" in capsys.readouterr().err
    monkeypatch.setenv("MLFLOW_GUARD_UPSTREAM_WORKSPACES", "true")
    assert main(["policy", "add", "p, user:x, viewer, model:y", *args]) == 1
    assert "names no workspace" in capsys.readouterr().err
    assert main(["policy", "qualify", "--workspace", "default", *args]) == 0
    assert "applied: policy version" in capsys.readouterr().out
    assert main(["policy", "explain", "--subject", "user:bob", "--action", "update",
                 "--resource", "default/model:churn", *args]) == 0  # fmt: skip
    assert main(["policy", "add", "p, user:x, viewer, team-a/model:y", *args]) == 0


def test_check_config_refuses_a_stored_policy_the_gateway_would_not_start_with(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["--data-dir", str(env / "data")]
    assert main(["check-config", *args]) == 0  # no database yet
    assert main(["policy", "add", "p, user:bob, editor, model:churn", *args]) == 0
    assert main(["check-config", *args]) == 0
    capsys.readouterr()
    monkeypatch.setenv("MLFLOW_GUARD_UPSTREAM_WORKSPACES", "true")
    assert main(["check-config", *args]) == 2
    err = capsys.readouterr().err
    assert "stored policy: grant user:bob, editor, model:churn, allow: names no workspace" in err
    assert "mlflow-guard policy qualify --workspace default" in err
    assert main(["policy", "qualify", "--workspace", "default", *args]) == 0
    assert main(["check-config", *args]) == 0
