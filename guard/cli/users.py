"""``user``: the identities user names are bound to (list, link, unlink).

A name (``user:alice``) belongs to the first identity that logged in with it (its source and the
entry's stable id); a login from another identity is refused with ``identity_conflict`` until an
administrator frees the name (``unlink``: the next login claims it) or binds it (``link``).
Service tokens (``token:``) are never bound. Every change is recorded in the audit trail.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from guard.cli.common import (
    EXIT_FAILED,
    add_storage_flags,
    fail,
    governance_session,
    record_change,
    when,
)
from guard.config import Loaded


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``user``."""
    user = commands.add_parser("user", help="the identities user names are bound to")
    user_commands = user.add_subparsers(dest="action", required=True)
    listing = user_commands.add_parser(
        "list", help="list bound names (subject, source, id, created, last seen)"
    )
    add_storage_flags(listing)
    listing.add_argument("--format", choices=["table", "json"], default="table")
    unlink = user_commands.add_parser("unlink", help="free a name: its next login claims it")
    add_storage_flags(unlink)
    unlink.add_argument("subject", help="user:<name> (or the bare name)")
    link = user_commands.add_parser("link", help="bind a name to an identity explicitly")
    add_storage_flags(link)
    link.add_argument("subject", help="user:<name> (or the bare name)")
    link.add_argument("--source", required=True, help="the identity source, e.g. ldap")
    link.add_argument("--id", required=True, dest="stable_id", help="the entry's stable id")


def user_subject(value: str) -> str:
    """``user:<name>`` for ``value``; a token or another kind of subject is refused."""
    if value.startswith("user:"):
        subject = value
    elif ":" in value:
        raise ValueError(f"{value!r} is not a user: only user:<name> subjects are bound")
    else:
        subject = f"user:{value}"
    if subject == "user:":
        raise ValueError("the subject names no user")
    return subject


def run(args: argparse.Namespace, loaded: Loaded) -> int:
    with governance_session(loaded) as governance:
        return _user_command(args, loaded, governance)


def _user_command(args: argparse.Namespace, loaded: Loaded, governance: Any) -> int:
    from guard.identity.bindings import IdentityBindings

    bindings = IdentityBindings(governance.tokens.engine, ttl=0)
    try:
        if args.action == "list":
            rows = bindings.all()
            if args.format == "json":
                out = [
                    {
                        "subject": b.subject, "source": b.source, "id": b.stable_id,
                        "created": b.created_at.isoformat(),
                        "last_seen": b.last_seen_at.isoformat(),
                    }
                    for b in rows
                ]  # fmt: skip
                print(json.dumps(out, indent=2))
                return 0
            table = [("SUBJECT", "SOURCE", "ID", "CREATED", "LAST SEEN")]
            table += [
                (b.subject, b.source, b.stable_id, when(b.created_at), when(b.last_seen_at))
                for b in rows
            ]
            widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
            for row in table:
                print(
                    "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                )
            return 0
        subject = user_subject(args.subject)
        if args.action == "unlink":
            if not record_change(loaded, governance, "user_unlinked", "intent", subject=subject):
                return EXIT_FAILED
            if not bindings.unlink(subject):
                record_change(loaded, governance, "user_unlinked", "failed", subject=subject)
                print(f"error: {subject} is not bound to any identity", file=sys.stderr)
                return EXIT_FAILED
            record_change(loaded, governance, "user_unlinked", subject=subject)
            print(f"Freed {subject}: its next login binds it.")
            return 0
        if not args.source or not args.stable_id:
            raise ValueError("link needs --source and --id")
        asked = {"subject": subject, "source": args.source, "id": args.stable_id}
        if not record_change(loaded, governance, "user_linked", "intent", **asked):
            return EXIT_FAILED
        previous = bindings.link(subject, args.source, args.stable_id)
        replaced = (
            {"replaced_source": previous.source, "replaced_id": previous.stable_id}
            if previous is not None
            else {}
        )
        record_change(loaded, governance, "user_linked", **asked, **replaced)
        print(f"Bound {subject} to {args.source} {args.stable_id}.")
        return 0
    except ValueError as exc:
        return fail(exc)
