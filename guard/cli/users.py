"""``user``: the identities user names are bound to (list, link, unlink), and blocks.

A name (``user:alice``) belongs to the first identity that logged in with it (its source and the
entry's stable id); a login from another identity is refused with ``identity_conflict`` until an
administrator frees the name (``unlink``: the next login claims it) or binds it (``link``).
Service tokens (``token:``) are never bound. Every change is recorded in the audit trail.

``block NAME`` stops a person everywhere at once, for offboarding: their sessions end and their
personal tokens are revoked in the same transaction, and everything is refused on every replica
within ``authz.revocation_poll_interval`` (the revocation counter moves with the block; directory
logins get ``user_blocked``). ``unblock`` lifts it
(ended sessions stay ended); ``blocked`` lists who is blocked, since when, by whom and why.
"""

from __future__ import annotations

import argparse
import json
import sys
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
    block = user_commands.add_parser(
        "block", help="stop a person everywhere: end their sessions, refuse their logins"
    )
    add_storage_flags(block)
    block.add_argument("subject", help="user:<name> (or the name, by the naming rule)")
    block.add_argument("--reason", default="", help="why (kept with the block, and audited)")
    unblock = user_commands.add_parser("unblock", help="let a blocked person log in again")
    add_storage_flags(unblock)
    unblock.add_argument("subject", help="user:<name> (or the name)")
    blocked = user_commands.add_parser("blocked", help="list blocked people")
    add_storage_flags(blocked)
    blocked.add_argument("--format", choices=["table", "json"], default="table")


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


def person(value: str) -> str:
    """The subject a block applies to: ``user:<name>``, a bare name by the naming rule
    (``Alice`` is ``user:alice``). Tokens are not people: ``token revoke`` ends them."""
    if value.startswith("user:"):
        subject = value
    elif ":" in value:
        raise ValueError(
            f"{value!r} is not a person: only user:<name> is blocked (revoke a token with "
            "mlflow-guard token revoke)"
        )
    else:
        from guard.identity.ldap import subject_name

        subject = f"user:{subject_name(value)}"
    if subject == "user:":
        raise ValueError("the subject names no user")
    return subject


def run(args: argparse.Namespace, loaded: Loaded) -> int:
    with governance_session(loaded) as governance:
        if args.action in ("block", "unblock", "blocked"):
            return _block_command(args, loaded, governance)
        return _user_command(args, loaded, governance)


def _block_command(args: argparse.Namespace, loaded: Loaded, governance: Any) -> int:
    from guard.identity.sessions import UserBlocks

    blocks = UserBlocks(governance.tokens.engine)
    try:
        if args.action == "blocked":
            found = blocks.blocked()
            if args.format == "json":
                out = [
                    {"subject": subject, "blocked": at.isoformat(), "by": by, "reason": reason}
                    for subject, (at, by, reason) in found.items()
                ]
                print(json.dumps(out, indent=2))
                return 0
            table = [("SUBJECT", "BLOCKED", "BY", "REASON")]
            table += [(s, when(at), by, why) for s, (at, by, why) in found.items()]
            widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
            for row in table:
                print(
                    "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                )
            return 0
        subject = person(args.subject)
        if args.action == "block":
            asked = {"subject": subject, "reason": args.reason}
            if not record_change(loaded, governance, "user_blocked", "intent", **asked):
                return EXIT_FAILED
            new = blocks.block(subject, cli_actor(), args.reason)
            record_change(loaded, governance, "user_blocked", **asked, already=not new)
            print(
                f"Blocked {subject}: its sessions ended and its personal tokens are revoked; its "
                "logins are refused on every replica "
                f"within {loaded.settings.authz.revocation_poll_interval:g} s."
                if new
                else f"{subject} was already blocked; any session it still had is ended."
            )
            return 0
        if not record_change(loaded, governance, "user_unblocked", "intent", subject=subject):
            return EXIT_FAILED
        if not blocks.unblock(subject):
            record_change(loaded, governance, "user_unblocked", "failed", subject=subject)
            print(f"error: {subject} is not blocked", file=sys.stderr)
            return EXIT_FAILED
        record_change(loaded, governance, "user_unblocked", subject=subject)
        print(f"Unblocked {subject}: it may log in again.")
        return 0
    except ValueError as exc:
        return fail(exc)


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
