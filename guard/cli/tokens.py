"""``token``: create, list and revoke service tokens, and people's personal tokens.

``token create --user NAME --name LABEL`` makes a personal token for a person (``NAME/LABEL``,
acting as ``user:NAME`` with the groups of their last login; expiry capped by
``tokens.personal_max_expiry``); a blocked person gets none. ``list`` shows each token's owner;
``revoke NAME/LABEL`` revokes a personal token.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from guard.cli.common import (
    EXIT_FAILED,
    add_storage_flags,
    cli_actor,
    fail,
    governance_session,
    record_change,
    when,
)
from guard.config import Loaded
from guard.settings import parse_duration


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``token``."""
    token = commands.add_parser("token", help="manage service and personal tokens")
    token_commands = token.add_subparsers(dest="action", required=True)
    create = token_commands.add_parser("create", help="create a token and print it once")
    add_storage_flags(create)
    create.add_argument("--name", required=True, help="the token's name (with --user: its label)")
    create.add_argument("--role", help="a role defined in the policy (service tokens)")
    create.add_argument(
        "--resource", help="resource pattern the role applies to (default: all; service tokens)"
    )
    create.add_argument(
        "--user",
        help="make a personal token of this person (user:NAME or NAME): it acts as them, with "
        "their rights and no role of its own",
    )
    create.add_argument(
        "--expires", help="lifetime such as 90d, 12h (default tokens.default_expiry)"
    )
    create.add_argument("--quiet", action="store_true", help="print only the secret")
    listing = token_commands.add_parser("list", help="list tokens (never their secrets)")
    add_storage_flags(listing)
    listing.add_argument("--all", action="store_true", help="include revoked tokens")
    listing.add_argument("--format", choices=["table", "json"], default="table")
    revoke = token_commands.add_parser(
        "revoke", help="revoke a token by name (a personal token: USER/LABEL)"
    )
    add_storage_flags(revoke)
    revoke.add_argument("name")


def run(args: argparse.Namespace, loaded: Loaded) -> int:
    with governance_session(loaded) as governance:
        return _token_command(args, loaded, governance)


def _token_command(args: argparse.Namespace, loaded: Loaded, governance: Any) -> int:
    from guard.identity.tokens import TokenError, utcnow

    store = governance.tokens
    try:
        if args.action == "create" and args.user is not None:
            return _create_personal(args, loaded, governance)
        if args.action == "create":
            if not args.role:
                raise TokenError("--role is required for a service token (or give --user)")
            args.resource = args.resource or "*"
            lifetime = (
                parse_duration(args.expires)
                if args.expires
                else loaded.settings.tokens.default_expiry
            )
            asked = {"token": args.name, "role": args.role, "resource": args.resource}
            if not record_change(loaded, governance, "token_created", "intent", **asked):
                return EXIT_FAILED
            record, secret = governance.create_token(
                args.name, args.role, args.resource, lifetime, cli_actor()
            )
            record_change(
                loaded,
                governance,
                "token_created",
                token=record.name,
                role=record.role,
                resource=args.resource,
                expires=record.expires_at.isoformat(),
            )
            if args.quiet:
                print(secret)
                return 0
            print(
                f"Created token {record.name!r} (role {record.role}, expires "
                f"{when(record.expires_at)}). The secret is shown only now:\n\n    {secret}\n\n"
                f"Use it as MLFLOW_TRACKING_TOKEN, or as the password with user name "
                f"{record.name!r} (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)."
            )
        elif args.action == "list":
            now = utcnow()
            records = store.list(include_revoked=args.all)
            if args.format == "json":
                rows = [
                    {
                        "name": r.name, "role": r.role, "owner": r.owner, "state": r.state(now),
                        "created": r.created_at.isoformat(), "expires": r.expires_at.isoformat(),
                        "last_used": r.last_used_at.isoformat() if r.last_used_at else None,
                    }
                    for r in records
                ]  # fmt: skip
                print(json.dumps(rows, indent=2))
                return 0
            table = [("NAME", "ROLE", "OWNER", "STATE", "CREATED", "EXPIRES", "LAST USED")]
            table += [
                (r.name, r.role, r.owner or "-", r.state(now), when(r.created_at),
                 when(r.expires_at), when(r.last_used_at))
                for r in records
            ]  # fmt: skip
            widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
            for row in table:
                print(
                    "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                )
        else:
            if not record_change(loaded, governance, "token_revoked", "intent", token=args.name):
                return EXIT_FAILED
            if "/" in args.name:  # a personal token: no grants of its own
                record = store.revoke(args.name)
                record_change(
                    loaded, governance, "token_revoked", token=record.name, owner=record.owner
                )
                print(f"Revoked personal token {record.name!r} of {record.owner}.")
                return 0
            record = governance.revoke_token(args.name, cli_actor())
            record_change(loaded, governance, "token_revoked", token=record.name)
            print(f"Revoked token {record.name!r} and removed its grants.")
    except (TokenError, ValueError) as exc:  # PolicyError is a ValueError
        return fail(exc)
    return 0


def _create_personal(args: argparse.Namespace, loaded: Loaded, governance: Any) -> int:
    """``token create --user NAME --name LABEL``: a personal token, made by an administrator."""
    from guard.cli.users import person
    from guard.identity.sessions import UserBlocks
    from guard.identity.tokens import TokenError, personal_name

    if args.role or args.resource:
        raise TokenError("a personal token has no role or resource: it acts as its owner")
    owner = person(args.user)
    name = personal_name(owner, args.name)
    tokens = loaded.settings.tokens
    lifetime = parse_duration(args.expires) if args.expires else tokens.default_expiry
    if not args.expires:
        lifetime = min(lifetime, tokens.personal_max_expiry)
    if lifetime > tokens.personal_max_expiry:
        raise TokenError(
            f"a personal token lives at most {tokens.personal_max_expiry / 86400:g} days "
            "(tokens.personal_max_expiry)"
        )
    if UserBlocks(governance.tokens.engine).is_blocked(owner):
        raise TokenError(f"{owner} is blocked: unblock them first (mlflow-guard user unblock)")
    if not record_change(loaded, governance, "token_created", "intent", token=name, owner=owner):
        return EXIT_FAILED
    record, secret = governance.tokens.create_personal(owner, args.name, lifetime)
    record_change(
        loaded, governance, "token_created", token=record.name, owner=owner,
        expires=record.expires_at.isoformat(),
    )  # fmt: skip
    if args.quiet:
        print(secret)
        return 0
    user = owner.removeprefix("user:")
    print(
        f"Created personal token {record.name!r} for {owner} (expires {when(record.expires_at)}); "
        f"it acts as them, with their rights. The secret is shown only now:\n\n    {secret}\n\n"
        f"Use it as MLFLOW_TRACKING_TOKEN, or as the password with user name {user!r} "
        "(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)."
    )
    return 0
