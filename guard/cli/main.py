"""The ``mlflow-guard`` command: parses arguments and calls into the package, nothing more.

Exit codes: 0 success, 1 the operation failed, 2 bad configuration or arguments, 3 the gateway
could not start.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import importlib.util
import json
import logging
import os
import pwd
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

from guard.authz.policy import ACTIONS
from guard.settings import Loaded, load_settings, options, parse_duration

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


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--data-dir", dest="storage.data_dir", help="gateway data directory")
    parser.add_argument(
        "--database-uri", dest="storage.database_uri", help="the gateway's own database"
    )


def _serve_flags(parser: argparse.ArgumentParser) -> None:
    for opt in options():
        if opt.flag is None or opt.section == "storage":
            continue
        if opt.type is bool:
            parser.add_argument(
                opt.flag, dest=opt.name, action=argparse.BooleanOptionalAction, help=opt.doc
            )
        else:
            parser.add_argument(opt.flag, dest=opt.name, help=opt.doc)


def _remote_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gateway",
        metavar="URL",
        help="send the command to a running gateway's /guard/api/, which applies your own "
        "rights and records you as the one who asked (credentials: MLFLOW_TRACKING_TOKEN, or "
        "MLFLOW_TRACKING_USERNAME/PASSWORD), instead of using the database directly",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlflow-guard", description="Authentication, authorization and audit for MLflow."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway (and the embedded MLflow)")
    _common(serve)
    _serve_flags(serve)

    check = commands.add_parser("check-config", help="validate the configuration, report all")
    _common(check)
    _serve_flags(check)

    token = commands.add_parser("token", help="manage service tokens")
    token_commands = token.add_subparsers(dest="action", required=True)
    create = token_commands.add_parser("create", help="create a token and print it once")
    _common(create)
    create.add_argument("--name", required=True)
    create.add_argument("--role", required=True, help="a role defined in the policy")
    create.add_argument(
        "--resource", default="*", help="resource pattern the role applies to (default: all)"
    )
    create.add_argument(
        "--expires", help="lifetime such as 90d, 12h (default tokens.default_expiry)"
    )
    create.add_argument("--quiet", action="store_true", help="print only the secret")
    listing = token_commands.add_parser("list", help="list tokens (never their secrets)")
    _common(listing)
    listing.add_argument("--all", action="store_true", help="include revoked tokens")
    listing.add_argument("--format", choices=["table", "json"], default="table")
    revoke = token_commands.add_parser("revoke", help="revoke a token by name")
    _common(revoke)
    revoke.add_argument("name")

    policy = commands.add_parser("policy", help="inspect and change the authorization policy")
    policy_commands = policy.add_subparsers(dest="action", required=True)
    show = policy_commands.add_parser("list", help="print the policy in force")
    _common(show)
    show.add_argument("--format", choices=["csv", "table"], default="table")
    _remote_flag(show)
    export = policy_commands.add_parser("export", help="print the policy as CSV")
    _common(export)
    export.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
    for name, text in (("add", "add rules"), ("remove", "remove rules")):
        sub = policy_commands.add_parser(name, help=f"{text}, e.g. 'p, user:alice, viewer, *'")
        _common(sub)
        sub.add_argument("rows", nargs="+", metavar="ROW")
        _remote_flag(sub)
    load = policy_commands.add_parser("import", help="replace the policy with a CSV file")
    _common(load)
    load.add_argument("file")
    load.add_argument("--dry-run", action="store_true", help="show the diff, change nothing")
    explain = policy_commands.add_parser(
        "explain",
        help="say what the policy decides and why",
        description="Say whether SUBJECT may do ACTION on RESOURCE, and which rule decides. "
        "With --gateway, anyone may ask about themselves (omit --subject), whoever manages "
        "RESOURCE about anyone's decisions on it, and readers of guard:policy about anything.",
    )
    _common(explain)
    explain.add_argument(
        "--subject",
        help="user:NAME, group:NAME or token:NAME (with --gateway, default: yourself; "
        "required without it)",
    )
    explain.add_argument("--action", dest="question_action", required=True, choices=ACTIONS)
    explain.add_argument("--resource", required=True, help="experiment:NAME, model:NAME, ...")
    _remote_flag(explain)

    role = commands.add_parser("role", help="grant or withdraw a role on a resource pattern")
    role_commands = role.add_subparsers(dest="action", required=True)
    for name, text in (
        ("assign", "grant SUBJECT the role on RESOURCE (a manager: on what they manage)"),
        ("unassign", "withdraw a grant made with assign (the same subject, role, resource)"),
    ):
        sub = role_commands.add_parser(name, help=text, description=text[0].upper() + text[1:])
        _common(sub)
        sub.add_argument("--subject", required=True, help="user:NAME, group:NAME or token:NAME")
        sub.add_argument("--role", required=True, help="a role defined in the policy (role list)")
        sub.add_argument("--resource", default="*", help="resource pattern (default: all)")
        sub.add_argument("--deny", action="store_true", help="an explicit deny rule")
        _remote_flag(sub)
    roles = role_commands.add_parser("list", help="the roles and the actions each holds")
    _common(roles)

    audit = commands.add_parser("audit", help="verify, query and export the audit trail")
    audit_commands = audit.add_subparsers(dest="action", required=True)
    check = audit_commands.add_parser("verify", help="check every chain; report the first break")
    _common(check)
    check.add_argument(
        "--spool", action="append", default=[], metavar="DIR",
        help="a spool directory whose head (and unshipped records) to check against; repeat "
        "for each replica (default: this data directory's)",
    )  # fmt: skip
    check.add_argument("--archive", metavar="FILE", help="verify an archive `prune` wrote")
    cut = audit_commands.add_parser(
        "prune", help="move records older than a date into an archive that still verifies"
    )
    _common(cut)
    cut.add_argument("--before", required=True, help="2026-01-01 (UTC) or a full time")
    cut.add_argument(
        "--archive", required=True, metavar="FILE", help="a new file (never overwritten)"
    )
    history = audit_commands.add_parser(
        "history", help="which version held which alias or stage, when, set by whom"
    )
    _common(history)
    history.add_argument("--model", required=True, help="the registered model's name")
    history.add_argument("--format", choices=["table", "csv", "jsonl"], default="table")
    for name, text in (("query", "matching records"), ("export", "every matching record")):
        sub = audit_commands.add_parser(name, help=text)
        _common(sub)
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
    return parser


def _load(args: argparse.Namespace) -> Loaded | None:
    flags = {k: v for k, v in vars(args).items() if "." in k}
    loaded = load_settings(flags, os.environ, args.config)
    if loaded.problems:
        for problem in loaded.problems:
            print(problem, file=sys.stderr)
        print(
            f"{len(loaded.problems)} configuration problem(s); nothing was done.", file=sys.stderr
        )
        return None
    return loaded


def _check_config(loaded: Loaded) -> int:
    problems = list(loaded.problems)
    settings = loaded.settings
    if settings.embedded and importlib.util.find_spec("mlflow") is None:
        problems.append(
            "upstream.url: empty, so the embedded MLflow is used, but mlflow is not installed "
            "(pip install 'mlflow-guard[embedded]', or set upstream.url)"
        )
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{len(problems)} configuration problem(s).", file=sys.stderr)
        return EXIT_CONFIG
    print(f"configuration OK (file: {loaded.config_file or 'none'})")
    for opt in options():
        value = getattr(getattr(settings, opt.section), opt.key)
        print(f"  {opt.name} = {value!r}  [{loaded.sources[opt.name]}]")
    return 0


def _governance(loaded: Loaded) -> Any:
    from guard.admin.governance import Governance
    from guard.authz.store import PolicyStore
    from guard.identity.tokens import TokenStore
    from guard.keys import load_secret_key
    from guard.store.db import build_engine, migrate

    engine = build_engine(loaded.settings.database_uri)
    migrate(engine)
    key = load_secret_key(loaded.settings.secret_key_file, os.environ)
    governance = Governance(TokenStore(engine, key), PolicyStore(engine))
    governance.policies.seed_defaults(cli_actor())
    return governance


def _record(
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


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "-"


def _token(args: argparse.Namespace, loaded: Loaded) -> int:
    governance = _governance(loaded)
    try:
        return _token_command(args, loaded, governance)
    finally:
        governance.tokens.engine.dispose()


def _token_command(args: argparse.Namespace, loaded: Loaded, governance: Any) -> int:
    from guard.identity.tokens import TokenError, utcnow

    store = governance.tokens
    try:
        if args.action == "create":
            lifetime = (
                parse_duration(args.expires)
                if args.expires
                else loaded.settings.tokens.default_expiry
            )
            asked = {"token": args.name, "role": args.role, "resource": args.resource}
            if not _record(loaded, governance, "token_created", "intent", **asked):
                return EXIT_FAILED
            record, secret = governance.create_token(
                args.name, args.role, args.resource, lifetime, cli_actor()
            )
            _record(loaded, governance, "token_created", token=record.name, role=record.role,
                    resource=args.resource, expires=record.expires_at.isoformat())  # fmt: skip
            if args.quiet:
                print(secret)
                return 0
            print(
                f"Created token {record.name!r} (role {record.role}, expires "
                f"{_when(record.expires_at)}). The secret is shown only now:\n\n    {secret}\n\n"
                f"Use it as MLFLOW_TRACKING_TOKEN, or as the password with user name "
                f"{record.name!r} (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)."
            )
        elif args.action == "list":
            now = utcnow()
            records = store.list(include_revoked=args.all)
            if args.format == "json":
                rows = [
                    {
                        "name": r.name, "role": r.role, "state": r.state(now),
                        "created": r.created_at.isoformat(), "expires": r.expires_at.isoformat(),
                        "last_used": r.last_used_at.isoformat() if r.last_used_at else None,
                    }
                    for r in records
                ]  # fmt: skip
                print(json.dumps(rows, indent=2))
                return 0
            table = [("NAME", "ROLE", "STATE", "CREATED", "EXPIRES", "LAST USED")]
            table += [
                (r.name, r.role, r.state(now), _when(r.created_at), _when(r.expires_at),
                 _when(r.last_used_at))
                for r in records
            ]  # fmt: skip
            widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
            for row in table:
                print(
                    "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                )
        else:
            if not _record(loaded, governance, "token_revoked", "intent", token=args.name):
                return EXIT_FAILED
            record = governance.revoke_token(args.name, cli_actor())
            _record(loaded, governance, "token_revoked", token=record.name)
            print(f"Revoked token {record.name!r} and removed its grants.")
    except (TokenError, ValueError) as exc:  # PolicyError is a ValueError
        return _fail(exc)
    return 0


def _fail(exc: Exception) -> int:
    """Print every problem an exception carries, one a line; the operation failed."""
    for problem in getattr(exc, "problems", None) or [str(exc)]:
        print(f"error: {problem}", file=sys.stderr)
    return EXIT_FAILED


def _policy(args: argparse.Namespace, loaded: Loaded) -> int:
    governance = _governance(loaded)
    try:
        return _policy_command(args, loaded, governance)
    finally:
        governance.tokens.engine.dispose()


def _policy_command(args: argparse.Namespace, loaded: Loaded, governance: Any) -> int:
    from guard.authz.engine import PolicyIndex
    from guard.authz.policy import Grant, PolicySet, parse_lines, parse_row

    try:
        if args.command == "role":
            if args.action == "list":
                _, policy = governance.policies.load()
                index = PolicyIndex(policy)
                for role in sorted(policy.role_names()):
                    actions = sorted(a for a in index.actions_of(role) if a in ACTIONS)
                    print(f"{role:<12} {', '.join(actions)}")
                return 0
            grant = Grant(args.subject, args.role, args.resource, "deny" if args.deny else "allow")
            parse_row(grant.row())
            key = "added" if args.action == "assign" else "removed"
            if not _record(loaded, governance, "policy_changed", "intent",
                           changes={key: [", ".join(grant.row())]}):  # fmt: skip
                return EXIT_FAILED
            if args.action == "assign":
                version = governance.change(cli_actor(), add=[grant])
            else:
                version = governance.change(cli_actor(), remove=[grant])
            _record(loaded, governance, "policy_changed",
                    changes={key: [", ".join(grant.row())], "policy_version": version})  # fmt: skip
            print(f"{args.action}ed: {', '.join(grant.row())} (policy version {version})")
            return 0
        if args.action in ("list", "export"):
            version, policy = governance.policies.load()
            if args.action == "export" or args.format == "csv":
                text = f"# mlflow-guard policy, version {version}\n" + policy.to_csv()
                if getattr(args, "output", None):
                    with open(args.output, "w") as out:
                        out.write(text)
                    print(f"wrote {len(policy.rows())} rules to {args.output}")
                else:
                    print(text, end="")
                return 0
            print(f"policy version {version}: {len(policy.rows())} rules")
            for row in policy.rows():
                print("  " + ", ".join(row))
            return 0
        if args.action in ("add", "remove"):
            rules = parse_lines(args.rows)
            key = "added" if args.action == "add" else "removed"
            if not _record(loaded, governance, "policy_changed", "intent",
                           changes={key: [", ".join(r.row()) for r in rules]}):  # fmt: skip
                return EXIT_FAILED
            if args.action == "add":
                version = governance.change(cli_actor(), add=rules)
            else:
                version = governance.change(cli_actor(), remove=rules)
            _record(loaded, governance, "policy_changed", changes={
                key: [", ".join(r.row()) for r in rules], "policy_version": version})  # fmt: skip
            print(f"policy version {version}")
            return 0
        if args.action == "import":
            with open(args.file) as source:
                new = PolicySet.from_csv(source.read())
            _, current = governance.policies.load()
            added, removed = current.diff(new)
            for row in removed:
                print("- " + ", ".join(row))
            for row in added:
                print("+ " + ", ".join(row))
            print(f"{len(added)} to add, {len(removed)} to remove")
            if args.dry_run or not (added or removed):
                return 0
            planned = {"added": [", ".join(r) for r in added],
                       "removed": [", ".join(r) for r in removed]}  # fmt: skip
            if not _record(loaded, governance, "policy_changed", "intent", changes=planned):
                return EXIT_FAILED
            version = governance.replace(new, cli_actor())
            _record(loaded, governance, "policy_changed", changes={
                "added": [", ".join(r) for r in added], "removed": [", ".join(r) for r in removed],
                "policy_version": version})  # fmt: skip
            print(f"applied: policy version {version}")
            return 0
        if not args.subject:
            print("error: policy explain: --subject is required without --gateway (the "
                  "database does not know who you are)", file=sys.stderr)  # fmt: skip
            return EXIT_CONFIG
        _, policy = governance.policies.load()
        decision = PolicyIndex(policy).decide(args.subject, args.resource, args.question_action)
        verdict = "ALLOW" if decision.allowed else "DENY"
        print(f"{verdict}: {args.subject} {args.question_action} {args.resource}")
        if decision.rule is None:
            print("  no grant matched (deny by default)")
        else:
            kind = "explicit deny" if decision.reason == "explicit_deny" else "granted by"
            print(f"  {kind}: {', '.join(decision.rule.row())}")
        return 0 if decision.allowed else EXIT_FAILED
    except (ValueError, OSError) as exc:  # PolicyError is a ValueError
        return _fail(exc)


def _remote(args: argparse.Namespace) -> int:
    """A policy or role command sent to a running gateway, which applies the caller's rights
    (a manager may grant on what they manage) and records the change under their name."""
    from guard.admin.remote import RemoteError, call_api
    from guard.authz.policy import Grant, parse_lines, parse_row

    try:
        if args.command == "role":
            grant = Grant(args.subject, args.role, args.resource, "deny" if args.deny else "allow")
            rule = parse_row(grant.row())
            key = "add" if args.action == "assign" else "remove"
            result = call_api(args.gateway, "POST", "/policy/changes", {key: [list(rule.row())]})
            print(f"{args.action}ed: {', '.join(rule.row())} "
                  f"(policy version {result['policy_version']})")  # fmt: skip
        elif args.action in ("add", "remove"):
            rows = [list(rule.row()) for rule in parse_lines(args.rows)]
            result = call_api(args.gateway, "POST", "/policy/changes", {args.action: rows})
            print(f"policy version {result['policy_version']}")
        elif args.action == "list":
            result = call_api(args.gateway, "GET", "/policy", expect=("policy_version", "rules"))
            if args.format == "csv":
                print(f"# mlflow-guard policy, version {result['policy_version']}")
                print("".join(", ".join(row) + "\n" for row in result["rules"]), end="")
            else:
                print(f"policy version {result['policy_version']}: {len(result['rules'])} rules")
                for row in result["rules"]:
                    print("  " + ", ".join(row))
        else:
            query = {"action": args.question_action, "resource": args.resource}
            if args.subject:  # omitted: the gateway explains the caller's own decision
                query["subject"] = args.subject
            result = call_api(
                args.gateway, "GET", "/policy/explain", query=query,
                expect=("subject", "allowed", "reason", "rule"),
            )  # fmt: skip
            verdict = "ALLOW" if result["allowed"] else "DENY"
            print(f"{verdict}: {result['subject']} {args.question_action} {args.resource}")
            if result["rule"] is None:
                print("  no grant matched (deny by default)")
            else:
                kind = "explicit deny" if result["reason"] == "explicit_deny" else "granted by"
                print(f"  {kind}: {', '.join(result['rule'])}")
            return 0 if result["allowed"] else EXIT_FAILED
    except (RemoteError, ValueError) as exc:
        return _fail(exc)
    return 0


def _audit(args: argparse.Namespace, loaded: Loaded) -> int:
    from pathlib import Path

    from guard.audit.commands import parse_when, query_records, verify_trail, write_records
    from guard.audit.store import Filters
    from guard.audit.trail import cli_spool_dir
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
            ]
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
            spans = [span.row() for span in model_history(engine, args.model, key)]
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
        return _fail(exc)
    finally:
        engine.dispose()


def _lifetime(seconds: float) -> str:
    """A lifetime in the largest unit that divides it: ``90 days``, ``12 hours``."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} seconds"


def _print_bootstrap(secret: str, lifetime: float) -> None:
    """The first admin token's banner; ``lifetime`` is the ``tokens.default_expiry`` it was
    created with."""
    supplied = secret == os.environ.get("MLFLOW_GUARD_BOOTSTRAP_TOKEN")
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=lifetime)
    lines = ["", "=" * 72]
    if supplied:
        lines.append("mlflow-guard: created token 'admin' from MLFLOW_GUARD_BOOTSTRAP_TOKEN.")
    else:
        lines += [
            "mlflow-guard: created the first admin token. It is shown only now:",
            "",
            f"    {secret}",
            "",
            "Clients: export MLFLOW_TRACKING_TOKEN=<the token>",
            "Browser: user name 'admin', password <the token>",
        ]
    lines += [
        f"It expires in {_lifetime(lifetime)} ({_when(expires)}; tokens.default_expiry).",
        "Make your own: mlflow-guard token create --name NAME --role ROLE [--resource PATTERN]",
        "then retire this one: mlflow-guard token revoke admin",
        "=" * 72,
        "",
    ]
    print("\n".join(lines), flush=True)


def _serve(loaded: Loaded) -> int:
    import uvicorn

    from guard.app import build_gateway, uvicorn_options
    from guard.keys import SecretKeyError

    settings = loaded.settings
    # A file grown past RLIMIT_FSIZE must fail the write (the spool then refuses requests with
    # audit_unavailable), not kill the gateway with SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    logging.basicConfig(
        level=settings.gateway.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        banner = functools.partial(_print_bootstrap, lifetime=settings.tokens.default_expiry)
        gateway = build_gateway(settings, os.environ, on_bootstrap=banner)
    except SecretKeyError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    config = uvicorn.Config(
        gateway,
        host=settings.gateway.host,
        port=settings.gateway.port,
        **uvicorn_options(settings),  # type: ignore[arg-type]
    )

    class GatewayServer(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            gateway.begin_shutdown()
            await super().shutdown(sockets)

    server = GatewayServer(config)
    server.run()
    return 0 if server.started else EXIT_STARTUP


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        flags = {k: v for k, v in vars(args).items() if "." in k}
        return _check_config(load_settings(flags, os.environ, args.config))
    if getattr(args, "gateway", None):
        return _remote(args)
    loaded = _load(args)
    if loaded is None:
        return EXIT_CONFIG
    if args.command == "serve":
        return _serve(loaded)
    if args.command in ("policy", "role"):
        return _policy(args, loaded)
    if args.command == "audit":
        return _audit(args, loaded)
    return _token(args, loaded)


if __name__ == "__main__":
    sys.exit(main())
