"""``audit``: verify, prune, query and export the audit trail, and a model's alias history."""

from __future__ import annotations

import argparse
import os
import sys

from guard.authz.policy import ACTIONS
from guard.cli.common import EXIT_FAILED, add_storage_flags, fail
from guard.config import Loaded


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``audit``."""
    audit = commands.add_parser("audit", help="verify, query and export the audit trail")
    audit_commands = audit.add_subparsers(dest="action", required=True)
    check = audit_commands.add_parser("verify", help="check every chain; report the first break")
    add_storage_flags(check)
    check.add_argument(
        "--spool", action="append", default=[], metavar="DIR",
        help="a spool directory whose head (and unshipped records) to check against; repeat "
        "for each replica (default: this data directory's)",
    )  # fmt: skip
    check.add_argument("--archive", metavar="FILE", help="verify an archive `prune` wrote")
    cut = audit_commands.add_parser(
        "prune", help="move records older than a date into an archive that still verifies"
    )
    add_storage_flags(cut)
    cut.add_argument("--before", required=True, help="2026-01-01 (UTC) or a full time")
    cut.add_argument(
        "--archive", required=True, metavar="FILE", help="a new file (never overwritten)"
    )
    history = audit_commands.add_parser(
        "history", help="which version held which alias or stage, when, set by whom"
    )
    add_storage_flags(history)
    history.add_argument("--model", required=True, help="the registered model's name")
    history.add_argument(
        "--workspace", help="the MLflow workspace the model is in (with upstream.workspaces)"
    )
    history.add_argument("--format", choices=["table", "csv", "jsonl"], default="table")
    for name, text in (("query", "matching records"), ("export", "every matching record")):
        sub = audit_commands.add_parser(name, help=text)
        add_storage_flags(sub)
        sub.add_argument("--principal", help="user:alice, token:ci, ...")
        sub.add_argument("--since", help="2026-01-01 or 2026-01-01T12:00 (UTC)")
        sub.add_argument("--until", help="exclusive, same forms as --since")
        sub.add_argument("--action", dest="audit_action", choices=ACTIONS)
        sub.add_argument("--resource", help="a resource or pattern: model:fraud-*")
        sub.add_argument("--decision", choices=["allow", "deny", "error"])
        sub.add_argument("--request-id")
        sub.add_argument("--kind", choices=["intent", "outcome", "event"])
        default = "table" if name == "query" else "jsonl"
        sub.add_argument("--format", choices=["table", "csv", "jsonl"], default=default)
        order = "newest" if name == "query" else "oldest"
        sub.add_argument(
            "--order", choices=["newest", "oldest"], default=order,
            help=f"newest or oldest stored first (default {order})",
        )  # fmt: skip
        if name == "query":
            sub.add_argument(
                "--limit", type=int, default=100, help="most records, newest unless --order "
                "oldest (default 100)",
            )  # fmt: skip
        else:
            sub.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")


def run(args: argparse.Namespace, loaded: Loaded) -> int:
    from pathlib import Path

    from guard.audit.commands import parse_when, query_records, verify_trail, write_records
    from guard.audit.store import Filters
    from guard.audit.trail import cli_spool_dir, worker_spool_dirs
    from guard.keys import SecretKeyError, load_secret_key
    from guard.store.db import build_engine, migrate

    settings = loaded.settings
    engine = build_engine(settings.database_uri)
    try:
        migrate(engine)
        if args.action == "prune":
            from guard.audit.prune import prune

            key = load_secret_key(settings.secret_key_file, os.environ, create=False)
            count = prune(engine, key, parse_when(args.before), Path(args.archive))
            print(f"archived {count} records to {args.archive} and removed them from the table")
            return 0
        if args.action == "verify":
            from guard.audit.prune import verify_archive

            key = load_secret_key(settings.secret_key_file, os.environ, create=False)
            spools = [Path(s) for s in args.spool] or [
                p for p in (settings.audit_spool_dir, cli_spool_dir(settings)) if p.exists()
            ] + [p for _, p in sorted(worker_spool_dirs(settings).items())]
            unchecked: list[str] = []
            if args.archive:
                checked, problems = verify_archive(key, Path(args.archive))
            else:
                checked, problems = verify_trail(engine, key, spools, unchecked)
            for writer in unchecked:
                print(
                    f"UNCHECKED: {writer}: no head to compare with, so records cut from its end "
                    "(or the whole chain) would not show; pass its spool with --spool"
                )
            for problem in problems:
                print(f"BROKEN: {problem}")
            if problems:
                return EXIT_FAILED
            print(f"OK: {checked} records, every chain intact")
            return 0
        if args.action == "history":
            from guard.audit.history import model_history

            key = load_secret_key(settings.secret_key_file, os.environ, create=False)
            spans = [span.row() for span in model_history(engine, args.model, key, args.workspace)]
            columns = ("holds", "version", "since", "until", "set_by", "rule")
            write_records(spans, args.format, sys.stdout, columns)
            return 0
        filters = Filters(
            principal=args.principal, action=args.audit_action, resource=args.resource,
            decision=args.decision, request_id=args.request_id, kind=args.kind,
            since=parse_when(args.since) if args.since else None,
            until=parse_when(args.until) if args.until else None,
        )  # fmt: skip
        records = query_records(
            engine, filters, getattr(args, "limit", None), newest_first=args.order == "newest"
        )
        if getattr(args, "output", None):
            with open(args.output, "w", newline="") as out:
                count = write_records(records, args.format, out)
            print(f"wrote {count} records to {args.output}", file=sys.stderr)
        else:
            write_records(records, args.format, sys.stdout)
        return 0
    except (ValueError, OSError, SecretKeyError) as exc:  # a bad --since, no key, no --output
        return fail(exc)
    finally:
        engine.dispose()
