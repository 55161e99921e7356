"""What an audit record says, and what it never says.

Recorded: who (principal, how they logged in, the client address as seen through trusted proxies
only), what (method, canonical path, query parameters, the MLflow resources, the action, the
declared fields a write sets), the decision (allow or deny, reason code, the deciding rule, the
policy version), and what came of it (status, MLflow's status, bytes, latencies, user agent).

Never recorded: Authorization headers, cookies, passwords, tokens, request or response bodies.
A credential that failed, a page token or any parameter whose name looks secret appears only as
a keyed HMAC (``hmac:`` and 16 hex digits), so an auditor can still see "the same token, 40
times" without the trail holding it.
"""

from __future__ import annotations

import datetime as dt
import hmac
import re
from typing import Any, Final
from urllib.parse import parse_qsl

from starlette.types import Scope

from guard.edge.context import RequestContext
from guard.edge.memo import Memo
from guard.edge.requestdata import RequestData, RequestDataError, _camel
from guard.identity.base import Credentials, parse_authorization

# Body fields a write declares, recorded for mutating calls (model promotion history, renames,
# tag writes). Everything else in a body stays out of the trail.
CHANGE_FIELDS: Final = (
    "name", "new_name", "version", "alias", "stage", "archive_existing_versions", "key", "value",
    "experiment_id", "run_id", "model_id", "trace_id", "status", "run_name", "end_time",
    "artifact_location", "source", "description",
)  # fmt: skip
MAX_VALUE: Final = 256
_SECRET: Final = re.compile(
    r"token|secret|pass|pwd|api[_-]?key|access[_-]?key|private|credential|signature"
    r"|(^|[_-])sig($|[_-])|auth|session|cookie|bearer|jwt",
    re.I,
)
# A user name shown as given: short and plain. Anything longer, or shaped like a token (people
# paste tokens into the user name field), is fingerprinted.
_NAME: Final = re.compile(r"(?!mlg_)[A-Za-z0-9._@+-]{1,32}")
# user:password@ in a URI (s3://KEY:SECRET@bucket, postgresql://u:p@db): the secret is hidden.
_USERINFO: Final = re.compile(r"(?<=://)[^/@\s]*@")


def _short(name: str) -> bool:
    return len(name) <= 128


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="microseconds")


class Redactor:
    """Keyed fingerprints for values the trail must not hold."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        # Whether a field or parameter name looks secret (names repeat: run_id, key, ...).
        self._secret: Memo[str, bool] = Memo(
            lambda name: _SECRET.search(name) is not None, size=1024, keep=_short
        )

    def fingerprint(self, value: str) -> str:
        digest = hmac.digest(self.key, value.encode("utf-8", "surrogatepass"), "sha256")
        return "hmac:" + digest.hex()[:16]

    def value(self, name: str, value: object) -> object:
        """``value`` as it may be recorded under the field or tag name ``name``."""
        if isinstance(value, str):
            if self._secret[name]:
                return self.fingerprint(value)
            if "@" in value:
                value = _USERINFO.sub(lambda m: self.fingerprint(m.group(0)) + "@", value)
            return value if len(value) <= MAX_VALUE else value[:MAX_VALUE] + "..."
        if isinstance(value, bool | int | float) or value is None:
            return value
        return "(not a scalar)"

    def query(self, query_string: bytes) -> dict[str, object]:
        params: dict[str, object] = {}
        for key, value in parse_qsl(query_string.decode("latin-1"), keep_blank_values=True):
            shown = self.value(key, value)
            existing = params.get(key)
            if existing is None:
                params[key] = shown
            elif isinstance(existing, list):
                existing.append(shown)
            else:
                params[key] = [existing, shown]
        return params

    def name(self, value: str) -> str:
        """A user name as it may be recorded: itself if short and plain, else its fingerprint."""
        return value if _NAME.fullmatch(value) else self.fingerprint(value)

    def credential(self, headers: list[tuple[bytes, bytes]]) -> dict[str, object]:
        """What identifies a presented credential: the Basic user name (if it looks like one)
        and a fingerprint of a token (bearer, or a gateway token as Basic password). Only for
        requests whose login failed. A person's password is never fingerprinted: failed
        passwords are often near misses of the real one."""
        parsed = parse_authorization(headers)
        if not isinstance(parsed, Credentials):
            return {}
        shown: dict[str, object] = {"scheme": parsed.scheme}
        if parsed.secret and (parsed.scheme == "bearer" or parsed.secret.startswith("mlg_")):
            shown["secret"] = self.fingerprint(parsed.secret)
        if name := parsed.username:
            shown["username"] = self.name(name)
        return shown


def changes(scope: Scope, redactor: Redactor) -> dict[str, object]:
    """The declared fields a write sets, from the body MLflow received."""
    if scope["method"] in ("GET", "HEAD") or not scope.get("guard.body"):
        return {}
    try:
        body = RequestData.of(scope).body or {}
    except RequestDataError:
        return {"body": "(unreadable)"}
    found: dict[str, object] = {}
    for field in CHANGE_FIELDS:
        for spelling in dict.fromkeys((field, _camel(field))):  # MLflow reads both
            if spelling in body:
                # A tag's value is judged by the tag's name; the tag's name itself is shown.
                label = str(body.get("key", "")) if field == "value" else field
                found[field] = redactor.value(label, body[spelling])
    return found


FIELDS: Final = "guard.audit_fields"  # scope key: request_fields, built once per request


def request_fields(scope: Scope, redactor: Redactor) -> dict[str, Any]:
    """What the request itself says (known before anything is decided): built once, by its
    intent or else its outcome, and shared by both (read only)."""
    fields: dict[str, Any] | None = scope.get(FIELDS)
    if fields is None:
        fields = scope[FIELDS] = _request_fields(scope, redactor)
    return fields


def _request_fields(scope: Scope, redactor: Redactor) -> dict[str, Any]:
    context: RequestContext = scope["guard"]
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    agent = next((v.decode("latin-1") for k, v in headers if k == b"user-agent"), "")
    fields: dict[str, Any] = {
        "request_id": context.request_id,
        "client": context.client,
        "peer": context.peer,
        "host": context.host or "",
        "scheme": context.scheme,
        "method": scope.get("method", ""),
        "path": scope.get("path", ""),
        "user_agent": agent[:MAX_VALUE],
    }
    if query := scope.get("query_string", b""):
        fields["query"] = redactor.query(query)
    return fields


def decision_fields(scope: Scope) -> dict[str, Any]:
    """Who asked, what for, and what the gateway decided."""
    context: RequestContext = scope["guard"]
    principal = context.principal
    route = scope.get("guard.route")
    fields: dict[str, Any] = {
        "principal": principal.subject if principal else "",
        "auth_method": principal.method if principal else "",
        "kind_of_resource": route.kind if route is not None else "",
        "action": context.action or (route.action if route is not None else ""),
        "resource": context.resources[0] if context.resources else "",
        "policy_version": context.policy_version,
    }
    if len(context.resources) > 1:
        fields["resources"] = context.resources
    if context.rule:
        fields["rule"] = context.rule
    return fields


def intent(scope: Scope, redactor: Redactor) -> dict[str, Any]:
    """Written, and on disk, before MLflow sees the request."""
    context: RequestContext = scope["guard"]
    found = changes(scope, redactor)
    if found and not context.changes:
        context.changes = found  # the outcome says the same; read the body once
    return {
        "kind": "intent", "time": now(), **request_fields(scope, redactor),
        **decision_fields(scope), "decision": "allow", "changes": found,
    }  # fmt: skip


def outcome(scope: Scope, redactor: Redactor, total_seconds: float) -> dict[str, Any]:
    """Written once the response is out: every request, refusals included."""
    context: RequestContext = scope["guard"]
    refusal = context.refusal
    record: dict[str, Any] = {
        "kind": "outcome",
        "time": now(),
        **request_fields(scope, redactor),
        **decision_fields(scope),
        "decision": "deny" if refusal is not None and refusal.status in (401, 403, 429)
        else "error" if refusal is not None else "allow",
        "reason": refusal.reason if refusal is not None else "",
        "status": context.status,
        "upstream_status": context.upstream_status,
        "bytes_in": context.bytes_in,
        "bytes_out": context.bytes_out,
        "latency_ms": round(total_seconds * 1000, 3),
        "upstream_ms": round(context.upstream_seconds * 1000, 3),
    }  # fmt: skip
    if refusal is not None and refusal.cause is not None:
        # What the caller was not told (an unknown id, a deny rule): for operators only.
        record["true_reason"] = refusal.cause.reason
        record["true_detail"] = refusal.cause.detail[:MAX_VALUE]
    for key, value in refusal.audit if refusal is not None else ():
        # What the refusing layer knew and did not say (a login's name, the directory's reason).
        shown = redactor.name(value) if key == "login_name" else redactor.value(key, value)
        record.setdefault(key, shown)
    if context.changes:
        record["changes"] = context.changes
    elif refusal is None and (found := changes(scope, redactor)):
        record["changes"] = found
    if context.status == 401:  # whose login failed: "the same token, 40 times"
        record["credential"] = redactor.credential(scope.get("headers", []))
    elif (
        refusal is not None
        and context.principal is None
        and (found := redactor.credential(scope.get("headers", [])))
    ):
        # Refused before (or without) authentication: a wrong Host, a cross-site write, the
        # token store down. No lookup just to name the caller; the credential's fingerprint.
        record["credential"] = found
    return record
