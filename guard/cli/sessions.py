"""``session``: list and revoke browser sessions.

A session is shown by a prefix of its key (the HMAC of the id its cookie holds, never the id
itself), with its subject, login method, client address, when it began, when it was last seen
and when it ends (idle or absolute, whichever comes first). ``revoke`` takes that prefix or
``--user NAME`` (every session of the person); the session ends on every replica at its next
request. Every revocation is recorded in the audit trail.
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

KEY_SHOWN = 12  # hex characters of the key shown and accepted (48 bits: unique in practice)
MIN_PREFIX = 8


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``session``."""
    session = commands.add_parser("session", help="list and revoke browser sessions")
    session_commands = session.add_subparsers(dest="action", required=True)
    listing = session_commands.add_parser(
        "list", help="active sessions (key, subject, method, client, created, last seen, ends)"
    )
    add_storage_flags(listing)
    listing.add_argument("--user", help="only this person's sessions (user:<name> or the name)")
    listing.add_argument("--all", action="store_true", help="include ended sessions still kept")
    listing.add_argument("--format", choices=["table", "json"], default="table")
    revoke = session_commands.add_parser("revoke", help="end a session, or all of a person's")
    add_storage_flags(revoke)
    revoke.add_argument("key", nargs="?", help="the key (or its first 8+ characters) from list")
    revoke.add_argument("--user", help="end every session of this person")


def user_subject(value: str) -> str:
    """``user:<name>`` by the naming rule (``Alice`` is ``user:alice``); an explicit subject
    of another kind (``token:ci``) is taken as it is."""
    if ":" in value:
        return value
    from guard.identity.ldap import subject_name

    if not value:
        raise ValueError("the subject names no user")
    return f"user:{subject_name(value)}"


def run(args: argparse.Namespace, loaded: Loaded) -> int:
    with governance_session(loaded) as governance:
        return _session_command(args, loaded, governance)


def _session_command(args: argparse.Namespace, loaded: Loaded, governance: Any) -> int:
    from guard.identity.sessions import SessionStore, utcnow

    s = loaded.settings.sessions
    store = SessionStore(
        governance.tokens.engine, governance.tokens.key,
        idle_timeout=s.idle_timeout, absolute_timeout=s.absolute_timeout,
    )  # fmt: skip
    try:
        if args.action == "list":
            subject = user_subject(args.user) if args.user else None
            now = utcnow()
            rows = store.list(subject, include_ended=args.all)
            described = [
                {
                    "key": r.key[:KEY_SHOWN], "subject": r.subject, "method": r.method,
                    "client": r.client, "created": r.created_at.isoformat(),
                    "last_seen": r.last_seen_at.isoformat(),
                    "ends": min(r.expires_at, r.idle_expires_at(s.idle_timeout)).isoformat(),
                    "state": r.state(now, s.idle_timeout),
                    "revoked_by": r.revoked_by,
                }
                for r in rows
            ]  # fmt: skip
            if args.format == "json":
                print(json.dumps(described, indent=2))
                return 0
            table = [
                ("KEY", "SUBJECT", "METHOD", "CLIENT", "CREATED", "LAST SEEN", "ENDS", "STATE")
            ]
            table += [
                (r.key[:KEY_SHOWN], r.subject, r.method, r.client, when(r.created_at),
                 when(r.last_seen_at), when(min(r.expires_at, r.idle_expires_at(s.idle_timeout))),
                 r.state(now, s.idle_timeout))
                for r in rows
            ]  # fmt: skip
            widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
            for row in table:
                print(
                    "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                )
            return 0
        if bool(args.key) == bool(args.user):
            raise ValueError("name one session KEY or --user NAME")
        actor = cli_actor()
        if args.user:
            subject = user_subject(args.user)
            if not record_change(loaded, governance, "session_revoked", "intent", subject=subject):
                return EXIT_FAILED
            count = store.revoke_subject(subject, actor)
            record_change(loaded, governance, "session_revoked", subject=subject, count=count)
            print(f"Ended {count} session(s) of {subject}.")
            return 0
        key = _full_key(store, args.key.lower())
        if not record_change(loaded, governance, "session_revoked", "intent", session=key[:12]):
            return EXIT_FAILED
        ended = store.revoke_key(key, actor)
        if ended is None:
            record_change(loaded, governance, "session_revoked", "failed", session=key[:12])
            print(f"error: session {key[:KEY_SHOWN]} has already ended", file=sys.stderr)
            return EXIT_FAILED
        record_change(
            loaded, governance, "session_revoked", session=key[:12], subject=ended.subject
        )
        print(f"Ended session {key[:KEY_SHOWN]} of {ended.subject}.")
        return 0
    except ValueError as exc:
        return fail(exc)


def _full_key(store: Any, prefix: str) -> str:
    """The one active session whose key starts with ``prefix``."""
    if len(prefix) < MIN_PREFIX or any(c not in "0123456789abcdef" for c in prefix):
        raise ValueError(f"a session key is {MIN_PREFIX}+ hex characters (see: session list)")
    found = [s.key for s in store.list() if s.key.startswith(prefix)]
    if not found:
        raise ValueError(f"no active session {prefix!r} (see: mlflow-guard session list)")
    if len(found) > 1:
        raise ValueError(f"{prefix!r} names {len(found)} sessions; give more of the key")
    return str(found[0])
