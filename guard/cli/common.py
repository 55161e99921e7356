"""What every command group shares: exit codes, the flags naming the configuration and the
database, loading the settings, the CLI's own identity, its audit records and error output."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import pwd
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from guard.config import Loaded, load_settings

EXIT_FAILED, EXIT_CONFIG, EXIT_STARTUP = 1, 2, 3


def cli_actor() -> str:
    """Who changes the database from this shell: the process's own OS account (``cli:alice``,
    ``cli:uid:1234`` for a uid without a name), never ``$USER``, which any shell can set."""
    uid = os.geteuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid:{uid}"
    return f"cli:{name}"


def add_storage_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--data-dir", dest="storage.data_dir", help="gateway data directory")
    parser.add_argument(
        "--database-uri", dest="storage.database_uri", help="the gateway's own database"
    )


def add_remote_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gateway",
        metavar="URL",
        help="send the command to a running gateway's /guard/api/, which applies your own "
        "rights and records you as the one who asked (credentials: MLFLOW_TRACKING_TOKEN, or "
        "MLFLOW_TRACKING_USERNAME/PASSWORD), instead of using the database directly",
    )


def load(args: argparse.Namespace, extra: Sequence[str] = ()) -> Loaded | None:
    """The settings, or None after printing every problem (``extra``: the command's own)."""
    flags = {k: v for k, v in vars(args).items() if "." in k}
    loaded = load_settings(flags, os.environ, args.config)
    problems = [*loaded.problems, *extra]
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{len(problems)} configuration problem(s); nothing was done.", file=sys.stderr)
        return None
    return loaded


def open_governance(loaded: Loaded) -> Any:
    from guard.admin.governance import Governance
    from guard.authz.store import PolicyStore
    from guard.identity.tokens import TokenStore
    from guard.keys import load_secret_key
    from guard.store.db import build_engine, migrate

    engine = build_engine(loaded.settings.database_uri)
    migrate(engine)
    key = load_secret_key(loaded.settings.secret_key_file, os.environ)
    workspaces = loaded.settings.upstream.workspaces
    governance = Governance(TokenStore(engine, key), PolicyStore(engine, workspaces=workspaces))
    governance.policies.seed_defaults(cli_actor())
    return governance


@contextlib.contextmanager
def governance_session(loaded: Loaded) -> Iterator[Any]:
    """The governance operations on the configured database; its engine is disposed after."""
    governance = open_governance(loaded)
    try:
        yield governance
    finally:
        governance.tokens.engine.dispose()


def record_change(
    loaded: Loaded, governance: Any, event: str, phase: str = "done", **fields: object
) -> bool:
    """Put a change the CLI makes into the audit trail (its own chain): its ``intent`` before
    the change (if that cannot be written the change is not made) and its outcome after."""
    if not loaded.settings.audit.enabled:
        return True
    from guard.audit.spool import SpoolError
    from guard.audit.trail import record_cli_event

    body = {"event": event, "phase": phase, "principal": cli_actor(), "auth_method": "cli",
            **fields}  # fmt: skip
    store = governance.tokens
    try:
        warning = record_cli_event(loaded.settings, store.engine, store.key, body)
    except (OSError, SpoolError) as exc:
        if phase == "intent":
            print(f"error: audit: cannot record the change, so it is not made: {exc}",
                  file=sys.stderr)  # fmt: skip
            return False
        warning = f"NOT RECORDED: {exc}"
    if warning:
        print(f"warning: audit: {warning}", file=sys.stderr)
    return True


def when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "-"


def fail(exc: Exception) -> int:
    """Print every problem an exception carries, one a line; the operation failed."""
    for problem in getattr(exc, "problems", None) or [str(exc)]:
        print(f"error: {problem}", file=sys.stderr)
    return EXIT_FAILED
