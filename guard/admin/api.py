"""The policy API under ``/guard/api/``: the CLI's policy and role commands, over HTTP.

Who may do what:

- Policy administrators change anything: holders of ``manage`` on ``guard:policy``, and every
  administrator (``admin`` on ``*``) whatever deny rules say, so no deny can lock them out.
- Readers of ``guard:policy`` (the ``auditor`` role) list, export and explain; readers of
  ``guard:audit`` (auditors again) query the audit trail.
- Anyone may explain their own decisions; whoever holds ``manage`` on a resource may explain
  anyone's decisions on that resource (and list the grants that apply to it).
- Everyone else may delegate: whoever holds ``manage`` on an experiment or a registered model
  may grant or revoke, on that one resource, a role whose every action they hold there
  themselves. Patterns, deny rules, memberships and role definitions are the administrators'.
  (``guard.admin.delegation`` holds these rules, for every surface that changes the policy.)

Every change is validated as a whole and may not remove the last administrator (see
``guard.admin.governance``); it lands in the database in one transaction, so every replica
follows it within a poll interval and this one at once.

Endpoints (JSON in MLflow's error shape on refusal)::

    GET  /guard/api/me                          the caller and the groups it is in
    GET  /guard/api/roles                       every role and the actions it holds
    GET  /guard/api/policy[?resource=R]         the rules (or the grants that apply to R)
    GET  /guard/api/policy/export               the policy as CSV, as ``policy export`` writes it
    GET  /guard/api/policy/explain?[subject=S&]action=A&resource=R
    GET  /guard/api/audit?principal=&since=&until=&action=&resource=&decision=&cursor=&limit=
                          &order=newest|oldest
    POST /guard/api/policy/changes              {"add": [ROW...], "remove": [ROW...], "dry_run"}
    PUT  /guard/api/policy[?dry_run=true]       replace the whole policy with a CSV body (import)
    GET  /guard/api/sessions[?user=NAME&all=true]   browser sessions (policy administrators)
    DELETE /guard/api/sessions/KEY              end one session (KEY: 8+ hex characters of it)
    DELETE /guard/api/sessions?user=NAME        end every session of a person
    GET  /guard/api/tokens[?user=NAME|all=true]  own personal tokens (administrators: anyone's)
    POST /guard/api/tokens                      {"name": LABEL, "expires": "30d"}: a personal
                                                token of the caller, its secret shown once
    DELETE /guard/api/tokens/NAME               revoke an own token (LABEL or USER/LABEL);
                                                administrators any token by its full name

Personal tokens follow ``guard.admin.personal`` (the ``/guard/tokens`` page uses the same).

A ROW is a policy row as a list of strings: ``["p", "user:bob", "viewer", "experiment:x"]``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Awaitable, Callable
from collections.abc import Set as AbstractSet
from typing import Any
from urllib.parse import parse_qsl

import anyio.to_thread
import sqlalchemy as sa
from starlette.types import Receive, Scope, Send

from guard.admin.delegation import POLICY, delegation_refusal, may
from guard.admin.governance import Governance
from guard.admin.personal import PersonalTokenError, PersonalTokens, token_json
from guard.audit.commands import parse_when
from guard.audit.store import AuditStore, Filters
from guard.authz.policy import ACTIONS, PolicyError, PolicySet, Rule, parse_row
from guard.authz.runtime import PolicyRuntime
from guard.authz.store import PolicyConflict
from guard.edge.bodies import ClientDisconnected, check_framing, read_body, too_large
from guard.edge.deadlines import BodyDeadlines
from guard.edge.requestdata import RequestDataError, parse_json_body
from guard.errors import Refusal, send_body, send_refusal
from guard.identity.sessions import SessionStore, utcnow
from guard.patterns import resource_match

logger = logging.getLogger("guard.api")

PREFIX = "/guard/api"
AUDIT = "guard:audit"
AUDIT_PARAMS = frozenset(
    {"principal", "since", "until", "action", "resource", "decision", "request_id", "kind",
     "cursor", "limit", "order"}
)  # fmt: skip
MAX_AUDIT_PAGE = 1000
SESSION_KEY_SHOWN = 12
SESSION_KEY_MIN = 8
CONFLICT_RETRIES = 5

Payload = dict[str, Any]


class ApiError(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


def _rows(value: Any, field: str) -> list[Rule]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ApiError(Refusal("invalid_request_body", f"{field!r} must be a list of rows."))
    rules: list[Rule] = []
    problems: list[str] = []
    for number, row in enumerate(value, 1):
        if not isinstance(row, list) or not all(isinstance(cell, str) for cell in row):
            problems.append(f"{field} row {number}: a row is a list of strings")
            continue
        try:
            rules.append(parse_row([cell.strip() for cell in row]))
        except ValueError as exc:
            problems.append(f"{field} row {number} ({', '.join(row)}): {exc}")
    if problems:
        raise ApiError(Refusal("policy_invalid", "; ".join(problems)))
    return rules


def _rule_json(rule: Rule) -> list[str]:
    return list(rule.row())


def _by_row(rule: Rule) -> tuple[str, ...]:
    return rule.row()


class PolicyApi:
    """The ASGI app behind authentication for ``/guard/api/``."""

    def __init__(
        self,
        *,
        policies: PolicyRuntime,
        governance: Governance,
        max_body_size: int,
        audit: AuditStore | None = None,
        intent: Callable[[Scope], Awaitable[Refusal | None]] | None = None,
        deadlines: BodyDeadlines = BodyDeadlines(),  # noqa: B008 - frozen, shared
        sessions: SessionStore | None = None,
        personal: PersonalTokens | None = None,
    ) -> None:
        self.sessions = sessions
        self.personal = personal
        self.policies = policies
        self.governance = governance
        self.max_body_size = max_body_size
        self.deadlines = deadlines  # how slowly a body may arrive (408 body_timeout)
        self.audit = audit
        self.intent = intent  # the audit intent, written just before a change is applied
        Handler = Callable[[Scope, Receive], Awaitable[tuple[int, Payload | str]]]
        self.routes: dict[tuple[str, str], Handler] = {
            ("GET", "/me"): self.me,
            ("GET", "/roles"): self.roles,
            ("GET", "/policy"): self.list_policy,
            ("PUT", "/policy"): self.replace_policy,
            ("GET", "/policy/export"): self.export_policy,
            ("GET", "/policy/explain"): self.explain,
            ("POST", "/policy/changes"): self.change_policy,
            ("GET", "/audit"): self.audit_records,
            ("GET", "/sessions"): self.list_sessions,
            ("DELETE", "/sessions"): self.revoke_sessions,
            ("DELETE", "/sessions/{key}"): self.revoke_sessions,
            ("GET", "/tokens"): self.list_tokens,
            ("POST", "/tokens"): self.create_token,
            ("DELETE", "/tokens/{name}"): self.revoke_token,
        }
        self.paths = {path for _, path in self.routes}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"].removeprefix(PREFIX)
        if path.startswith("/sessions/"):
            path = "/sessions/{key}"
        elif path.startswith("/tokens/"):
            path = "/tokens/{name}"
        handler = self.routes.get((scope["method"], path))
        if handler is None:
            reason = "method_not_allowed" if path in self.paths else "not_found"
            await send_refusal(scope, send, Refusal(reason))
            return
        try:
            status, payload = await handler(scope, receive)
        except (ApiError, PersonalTokenError) as exc:
            await send_refusal(scope, send, exc.refusal)
            return
        except RequestDataError as exc:
            await send_refusal(scope, send, exc.refusal)
            return
        except ClientDisconnected:
            return
        except sa.exc.SQLAlchemyError as exc:
            logger.warning("policy store unavailable: %s", exc)
            await send_refusal(scope, send, Refusal("policy_store_unavailable"))
            return
        if isinstance(payload, str):
            body, content_type = payload.encode(), b"text/csv; charset=utf-8"
        else:
            body, content_type = json.dumps(payload).encode(), b"application/json"
        await send_body(scope, send, status, content_type, body)

    # -- endpoints -------------------------------------------------------------------------

    async def me(self, scope: Scope, receive: Receive) -> tuple[int, Payload]:
        principal = scope["guard"].principal
        index = self.policies.index
        groups = [s for s in index.subjects_of(principal.subject) if s != principal.subject]
        return 200, {
            "subject": principal.subject,
            "auth_method": principal.method,
            "groups": groups,
            "policy_administrator": may(index, principal.subject, "manage"),
            "policy_version": index.version,
        }

    async def roles(self, scope: Scope, receive: Receive) -> tuple[int, Payload]:
        index = self.policies.index
        roles = {
            role: sorted(index.actions_of(role) & set(ACTIONS))
            for role in sorted(index.policy.role_names())
        }
        return 200, {"roles": roles, "policy_version": index.version}

    async def list_policy(self, scope: Scope, receive: Receive) -> tuple[int, Payload]:
        """Every rule, for readers of the policy; the grants that apply to one resource, for
        whoever manages it (so a manager sees who has access to what they manage)."""
        subject = scope["guard"].principal.subject
        query = _query(scope, {"resource"})
        resource = query.get("resource")
        reader = await self._may(subject, "read")
        index = self.policies.index
        if not reader:
            if resource is None:
                raise ApiError(Refusal("permission_denied", f"{subject} may not read {POLICY}."))
            if not index.decide(subject, resource, "manage").allowed:
                raise ApiError(
                    Refusal("permission_denied", f"{subject} may not manage {resource}.")
                )
        rules: list[Rule] = index.policy.rules()
        if resource is not None:
            rules = [r for r in index.policy.grants if resource_match(resource, r.resource)]
            rules.sort()
        return 200, {"policy_version": index.version, "rules": [_rule_json(r) for r in rules]}

    async def export_policy(self, scope: Scope, receive: Receive) -> tuple[int, str]:
        subject = scope["guard"].principal.subject
        _query(scope, set())
        if not await self._may(subject, "read"):
            raise ApiError(Refusal("permission_denied", f"{subject} may not read {POLICY}."))
        version, policy = await anyio.to_thread.run_sync(self.governance.policies.load)
        return 200, f"# mlflow-guard policy, version {version}\n" + policy.to_csv()

    async def explain(self, scope: Scope, receive: Receive) -> tuple[int, Payload]:
        """The decision for a question and the rule that made it. Anyone may ask about
        themselves (``subject`` omitted or their own); about others, whoever manages the
        resource asked about (for that resource only) and readers of the policy."""
        caller = scope["guard"].principal.subject
        query = _query(scope, {"subject", "action", "resource"})
        missing = [k for k in ("action", "resource") if not query.get(k)]
        if missing:
            raise ApiError(Refusal("invalid_request_body", f"Missing {', '.join(missing)}."))
        subject = query.get("subject") or caller
        action, resource = query["action"], query["resource"]
        if action not in ACTIONS:
            raise ApiError(Refusal("invalid_request_body", f"Unknown action {action!r}."))
        if (
            subject != caller
            and not await self._may(caller, "manage", resource)
            and not await self._may(caller, "read")
        ):
            # Names only what the caller sent, and is the same whether the resource exists.
            raise ApiError(
                Refusal(
                    "permission_denied",
                    f"{caller} may not explain another subject's decisions on {resource}: that "
                    f"needs manage on it or read on {POLICY}.",
                )
            )
        index = self.policies.index
        decision = index.decide(subject, resource, action)
        return 200, {
            "subject": subject,
            "allowed": decision.allowed,
            "reason": decision.reason,
            "rule": list(decision.rule.row()) if decision.rule is not None else None,
            "policy_version": index.version,
        }

    async def change_policy(self, scope: Scope, receive: Receive) -> tuple[int, Payload]:
        subject = scope["guard"].principal.subject
        _query(scope, set())
        document = parse_json_body(await self._body(scope, receive, b"application/json")) or {}
        if unknown := set(document) - {"add", "remove", "dry_run"}:
            raise ApiError(Refusal("invalid_request_body", f"Unknown keys {sorted(unknown)}."))
        add, remove = _rows(document.get("add"), "add"), _rows(document.get("remove"), "remove")
        dry_run = document.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise ApiError(Refusal("invalid_request_body", "'dry_run' must be true or false."))
        if not add and not remove:
            raise ApiError(Refusal("invalid_request_body", "Nothing to add or remove."))
        for _ in range(CONFLICT_RETRIES):
            # Judge on the newest policy, and write only if it is still the newest: a
            # concurrent change (say, revoking this caller's manage) makes us judge again.
            await self.policies.refresh()
            index = self.policies.index
            if not may(index, subject, "manage"):
                for rule in (*add, *remove):
                    if (refusal := delegation_refusal(index, subject, rule)) is not None:
                        raise ApiError(refusal)
            rules = set(index.policy.rules())
            added = sorted(set(add) - rules, key=_by_row)
            removed = sorted(set(remove) & rules, key=_by_row)
            try:
                if dry_run:
                    await anyio.to_thread.run_sync(lambda: self.governance.preview(add, remove))
                    version = index.version
                else:
                    await self._intend(scope, added, removed)
                    version = await anyio.to_thread.run_sync(
                        functools.partial(
                            self.governance.change, subject, add=add, remove=remove,
                            expected_version=index.version,
                        )
                    )  # fmt: skip
            except PolicyConflict:
                continue
            except PolicyError as exc:
                raise ApiError(Refusal("policy_invalid", "; ".join(exc.problems))) from None
            break
        else:
            raise ApiError(Refusal("policy_store_unavailable", "The policy kept changing; retry."))
        if not dry_run and (added or removed):
            logger.info(
                "policy changed by %s: +%d -%d rules, version %d",
                subject, len(added), len(removed), version,
            )  # fmt: skip
            _record(scope, version, added, removed)
            await self.policies.refresh()
        return 200, {
            "policy_version": version,
            "dry_run": dry_run,
            "added": [_rule_json(r) for r in added],
            "removed": [_rule_json(r) for r in removed],
        }

    async def replace_policy(self, scope: Scope, receive: Receive) -> tuple[int, Payload]:
        """``policy import`` over HTTP: the body is the whole new policy as CSV."""
        subject = scope["guard"].principal.subject
        query = _query(scope, {"dry_run"})
        dry_run = query.get("dry_run", "false")
        if dry_run not in ("true", "false"):
            raise ApiError(Refusal("invalid_request_body", "dry_run must be true or false."))
        await self.policies.refresh()
        if not may(self.policies.index, subject, "manage"):
            raise ApiError(Refusal("permission_denied", f"{subject} may not manage {POLICY}."))
        body = await self._body(scope, receive, b"text/csv")
        try:
            new = PolicySet.from_csv(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise ApiError(Refusal("invalid_request_body", "The CSV is not UTF-8.")) from None
        except PolicyError as exc:
            raise ApiError(Refusal("policy_invalid", "; ".join(exc.problems))) from None
        version, current = await anyio.to_thread.run_sync(self.governance.policies.load)
        added, removed = current.diff(new)
        if dry_run == "false" and (added or removed):
            scope["guard"].changes = {
                "added": [", ".join(r) for r in added], "removed": [", ".join(r) for r in removed]
            }  # fmt: skip
            if self.intent is not None and (refusal := await self.intent(scope)) is not None:
                raise ApiError(refusal)
            try:
                version = await anyio.to_thread.run_sync(
                    lambda: self.governance.replace(new, subject)
                )
            except PolicyError as exc:
                raise ApiError(Refusal("policy_invalid", "; ".join(exc.problems))) from None
            logger.info(
                "policy replaced by %s: +%d -%d rules, version %d",
                subject, len(added), len(removed), version,
            )  # fmt: skip
            scope["guard"].changes = {
                "policy_version": version,
                "added": [", ".join(r) for r in added],
                "removed": [", ".join(r) for r in removed],
            }
            await self.policies.refresh()
        return 200, {
            "policy_version": version,
            "dry_run": dry_run == "true",
            "added": [list(r) for r in added],
            "removed": [list(r) for r in removed],
        }

    async def audit_records(self, scope: Scope, receive: Receive) -> tuple[int, Payload]:
        """The audit trail, filtered, newest stored first (``order=oldest``: oldest first), a
        page at a time (``cursor``, with the same ``order``, continues past the last record of
        the previous page). For auditors and administrators; the query is itself a request, so
        it is recorded like any other."""
        subject = scope["guard"].principal.subject
        query = _query(scope, AUDIT_PARAMS)
        if not await self._may(subject, "read", AUDIT):
            raise ApiError(Refusal("permission_denied", f"{subject} may not read {AUDIT}."))
        if self.audit is None:
            raise ApiError(Refusal("not_found", "The audit trail is off on this gateway."))
        try:
            filters = Filters(
                principal=query.get("principal"), action=query.get("action"),
                resource=query.get("resource"), decision=query.get("decision"),
                request_id=query.get("request_id"), kind=query.get("kind"),
                since=parse_when(query["since"]) if "since" in query else None,
                until=parse_when(query["until"]) if "until" in query else None,
            )  # fmt: skip
            after = int(query.get("cursor", "0"))
            limit = int(query.get("limit", "100"))
        except ValueError as exc:
            raise ApiError(Refusal("invalid_request_body", str(exc))) from None
        order = query.get("order", "newest")
        if not 0 < limit <= MAX_AUDIT_PAGE or after < 0 or order not in ("newest", "oldest"):
            raise ApiError(
                Refusal(
                    "invalid_request_body",
                    f"limit is 1..{MAX_AUDIT_PAGE}, cursor >= 0, order newest or oldest.",
                )
            )
        audit, newest_first = self.audit, order == "newest"
        rows = await anyio.to_thread.run_sync(
            lambda: audit.query(filters, after, limit, newest_first=newest_first)
        )
        return 200, {
            "records": [record for _, record in rows],
            "next_cursor": str(rows[-1][0]) if len(rows) == limit else None,
        }

    async def list_sessions(self, scope: Scope, receive: Receive) -> tuple[int, Payload]:
        """Browser sessions, newest first: active ones, or every kept one with ``all=true``."""
        store = await self._session_admin(scope)
        query = _query(scope, {"user", "all"})
        if query.get("all", "false") not in ("true", "false"):
            raise ApiError(Refusal("invalid_request_body", "all must be true or false."))
        subject = _person(query["user"]) if "user" in query else None
        everything = query.get("all") == "true"
        rows = await anyio.to_thread.run_sync(lambda: store.list(subject, everything))
        now, idle = utcnow(), store.idle_timeout
        return 200, {
            "sessions": [
                {
                    "key": r.key[:SESSION_KEY_SHOWN], "subject": r.subject, "method": r.method,
                    "client": r.client, "created": r.created_at.isoformat(),
                    "last_seen": r.last_seen_at.isoformat(),
                    "ends": min(r.expires_at, r.idle_expires_at(idle)).isoformat(),
                    "state": r.state(now, idle), "revoked_by": r.revoked_by,
                }
                for r in rows
            ]
        }  # fmt: skip

    async def revoke_sessions(self, scope: Scope, receive: Receive) -> tuple[int, Payload]:
        """End one session (``/sessions/KEY``) or every session of ``?user=NAME``."""
        store = await self._session_admin(scope)
        principal = scope["guard"].principal.subject
        prefix = scope["path"].removeprefix(PREFIX + "/sessions").strip("/").lower()
        query = _query(scope, set() if prefix else {"user"})
        if prefix:
            key = await self._session_key(store, prefix)
            scope["guard"].changes = {"session_revoked": key[:SESSION_KEY_SHOWN]}
            if self.intent is not None and (refusal := await self.intent(scope)) is not None:
                raise ApiError(refusal)
            ended = await anyio.to_thread.run_sync(lambda: store.revoke_key(key, principal))
            if ended is None:
                raise ApiError(Refusal("not_found", "That session has already ended."))
            scope["guard"].changes = {
                "session_revoked": key[:SESSION_KEY_SHOWN], "subject": ended.subject
            }  # fmt: skip
            logger.info("session %s of %s revoked by %s", key[:12], ended.subject, principal)
            return 200, {"revoked": 1, "subject": ended.subject}
        if not query.get("user"):
            raise ApiError(Refusal("invalid_request_body", "Name a session key or ?user=NAME."))
        subject = _person(query["user"])
        scope["guard"].changes = {"sessions_revoked_of": subject}
        if self.intent is not None and (refusal := await self.intent(scope)) is not None:
            raise ApiError(refusal)
        count = await anyio.to_thread.run_sync(lambda: store.revoke_subject(subject, principal))
        scope["guard"].changes = {"sessions_revoked_of": subject, "count": count}
        logger.info("%d sessions of %s revoked by %s", count, subject, principal)
        return 200, {"revoked": count, "subject": subject}

    async def list_tokens(self, scope: Scope, receive: Receive) -> tuple[int, Payload]:
        """The caller's live tokens; ``user=NAME`` or ``all=true`` for administrators."""
        personal = self._personal()
        query = _query(scope, {"user", "all"})
        if query.get("all", "false") not in ("true", "false") or len(query) > 1:
            raise ApiError(Refusal("invalid_request_body", "Give user=NAME or all=true."))
        user = "*" if query.get("all") == "true" else None
        if "user" in query:
            user = _person(query["user"])
        records = await personal.list(scope, user)
        return 200, {"tokens": [token_json(r) for r in records]}

    async def create_token(self, scope: Scope, receive: Receive) -> tuple[int, Payload]:
        """A personal token of the caller (see ``guard.admin.personal``): 201 with the secret,
        which is shown this once."""
        personal = self._personal()
        _query(scope, set())
        # Who may is judged before the body is read: a token is refused without it.
        if (refusal := personal.creation_refusal(scope["guard"].principal)) is not None:
            raise ApiError(refusal)
        document = parse_json_body(await self._body(scope, receive, b"application/json")) or {}
        if unknown := set(document) - {"name", "expires"}:
            raise ApiError(Refusal("invalid_request_body", f"Unknown keys {sorted(unknown)}."))
        label, expires = document.get("name"), document.get("expires")
        if not isinstance(label, str) or not isinstance(expires, str | None):
            raise ApiError(
                Refusal("invalid_request_body", "Give 'name' (and 'expires', e.g. \"30d\").")
            )
        record, secret = await personal.create(scope, label, expires)
        logger.info("personal token %s created by its owner", record.name)
        user = (record.owner or "").removeprefix("user:")
        return 201, {
            "token": token_json(record),
            "secret": secret,
            "usage": {
                "MLFLOW_TRACKING_TOKEN": "the secret",
                "MLFLOW_TRACKING_USERNAME": user,
                "MLFLOW_TRACKING_PASSWORD": "the secret",
            },
        }

    async def revoke_token(self, scope: Scope, receive: Receive) -> tuple[int, Payload]:
        personal = self._personal()
        _query(scope, set())
        name = scope["path"].removeprefix(PREFIX + "/tokens/")
        record = await personal.revoke(scope, name)
        logger.info("token %s revoked by %s", record.name, scope["guard"].principal.subject)
        return 200, {"revoked": record.name, "owner": record.owner}

    # -- helpers ---------------------------------------------------------------------------

    def _personal(self) -> PersonalTokens:
        if self.personal is None:
            raise ApiError(Refusal("not_found", "Personal tokens are not served by this gateway."))
        return self.personal

    async def _session_admin(self, scope: Scope) -> SessionStore:
        """The session store, for policy administrators only."""
        subject = scope["guard"].principal.subject
        if not await self._may(subject, "manage"):
            raise ApiError(
                Refusal("permission_denied", f"{subject} may not manage sessions ({POLICY}).")
            )
        if self.sessions is None:
            raise ApiError(Refusal("not_found", "Sessions are not served by this gateway."))
        return self.sessions

    async def _session_key(self, store: SessionStore, prefix: str) -> str:
        if len(prefix) < SESSION_KEY_MIN or any(c not in "0123456789abcdef" for c in prefix):
            raise ApiError(Refusal("invalid_request_body", "A session key is 8+ hex characters."))
        active = await anyio.to_thread.run_sync(store.list)
        found = [s.key for s in active if s.key.startswith(prefix)]
        if len(found) != 1:
            detail = "No active session has that key." if not found else "Give more of the key."
            raise ApiError(Refusal("not_found", detail))
        return found[0]

    async def _intend(self, scope: Scope, added: list[Rule], removed: list[Rule]) -> None:
        """The audit intent of an allowed, valid change: on disk before the change is made."""
        if self.intent is None or not (added or removed):
            return
        scope["guard"].changes = {
            "added": [", ".join(r.row()) for r in added],
            "removed": [", ".join(r.row()) for r in removed],
        }
        if (refusal := await self.intent(scope)) is not None:
            raise ApiError(refusal)

    async def _may(self, subject: str, action: str, resource: str = POLICY) -> bool:
        """``may``, and before saying no, a look for a policy change not yet polled."""
        if may(self.policies.index, subject, action, resource):
            return True
        return await self.policies.refresh_soon(key=subject) and may(
            self.policies.index, subject, action, resource
        )

    async def _body(self, scope: Scope, receive: Receive, content_type: bytes) -> bytes:
        """The whole body, of the one media type the endpoint takes. Requiring it also keeps
        HTML forms out: a browser cannot send JSON or CSV cross-site without a preflight."""
        declared = next((v for k, v in scope["headers"] if k == b"content-type"), b"")
        if declared.split(b";")[0].strip().lower() != content_type:
            raise ApiError(
                Refusal("unsupported_media_type", f"Send Content-Type {content_type.decode()}.")
            )
        refusal, length, chunked = check_framing(scope["headers"])
        if refusal is not None:
            raise ApiError(refusal)
        if length is not None and length > self.max_body_size:
            raise ApiError(too_large(self.max_body_size))
        if not length and not chunked:
            return b""
        body = await read_body(scope, receive, self.max_body_size, self.deadlines)
        if isinstance(body, Refusal):
            raise ApiError(body)
        return body


def _record(scope: Scope, version: int, added: list[Rule], removed: list[Rule]) -> None:
    """What the change did, for the request's audit record."""
    scope["guard"].changes = {
        "policy_version": version,
        "added": [", ".join(r.row()) for r in added],
        "removed": [", ".join(r.row()) for r in removed],
    }


def _person(value: str) -> str:
    """The subject of the ``user`` parameter: ``user:<name>`` by the naming rule for a bare
    name (``Alice`` is ``user:alice``), an explicit subject (``token:ci``) as it is."""
    if not value or value.endswith(":"):
        raise ApiError(Refusal("invalid_request_body", "user names nobody."))
    if ":" in value:
        return value
    from guard.identity.ldap import subject_name  # python-ldap: only when a name is given

    return f"user:{subject_name(value)}"


def _query(scope: Scope, allowed: AbstractSet[str]) -> dict[str, str]:
    """The query string as single values: an unknown or repeated parameter is refused."""
    query: dict[str, str] = {}
    try:
        pairs = parse_qsl(scope["query_string"].decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise ApiError(Refusal("invalid_request_body", "The query string is not UTF-8.")) from None
    for key, value in pairs:
        if key not in allowed:
            raise ApiError(Refusal("invalid_request_body", f"Unknown parameter {key!r}."))
        if key in query:
            raise ApiError(Refusal("ambiguous_parameter", f"The parameter {key!r} is repeated."))
        query[key] = value
    return query
