"""Every refusal the gateway can give: one closed vocabulary of reason codes, one table.

A reason code is stable (operators grep for it, clients may branch on it); its HTTP status and
MLflow ``error_code`` come only from ``REASONS``. 401 means "who are you", 403 "you may not".
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Final

from starlette.types import Scope, Send


@dataclass(frozen=True, slots=True)
class ReasonInfo:
    status: int
    error_code: str
    message: str


REASONS: Final[dict[str, ReasonInfo]] = {
    # 400: the request itself is unacceptable.
    "host_not_allowed": ReasonInfo(400, "BAD_REQUEST", "The Host header is not allowed."),
    "path_not_canonical": ReasonInfo(
        400, "BAD_REQUEST", "The request path is not in canonical form."
    ),
    "artifact_path_invalid": ReasonInfo(
        400, "INVALID_PARAMETER_VALUE", "The artifact path is not a canonical relative path."
    ),
    "invalid_body_framing": ReasonInfo(
        400, "BAD_REQUEST", "Conflicting or invalid Content-Length / Transfer-Encoding."
    ),
    "body_not_allowed": ReasonInfo(
        400, "BAD_REQUEST", "This request may not carry a body: send its parameters one way."
    ),
    "too_many_ids": ReasonInfo(
        400, "INVALID_PARAMETER_VALUE", "The request names more ids than one request may."
    ),
    "malformed_request": ReasonInfo(400, "BAD_REQUEST", "The request is not valid HTTP/1.1."),
    "too_many_parameters": ReasonInfo(
        400, "INVALID_PARAMETER_VALUE", "The query string has too many parameters."
    ),
    "oidc_state_invalid": ReasonInfo(
        400,
        "BAD_REQUEST",
        "The single sign-on attempt is unknown, expired or already used: start the login again.",
    ),
    "logout_token_invalid": ReasonInfo(
        400, "INVALID_PARAMETER_VALUE", "The back-channel logout token is not valid."
    ),
    # 401: who are you?
    "invalid_request_body": ReasonInfo(
        400, "INVALID_PARAMETER_VALUE", "The request body cannot be read unambiguously."
    ),
    "ambiguous_parameter": ReasonInfo(
        400, "INVALID_PARAMETER_VALUE", "A parameter is given more than once or in two spellings."
    ),
    "workspace_invalid": ReasonInfo(
        400, "INVALID_PARAMETER_VALUE", "X-MLflow-Workspace does not name a workspace."
    ),
    "otlp_unreadable": ReasonInfo(
        400, "INVALID_PARAMETER_VALUE", "The OTLP span export cannot be read."
    ),
    "policy_invalid": ReasonInfo(
        400, "INVALID_PARAMETER_VALUE", "The policy change is malformed or not allowed."
    ),
    "malformed_credentials": ReasonInfo(
        401, "UNAUTHENTICATED", "The Authorization header could not be parsed."
    ),
    "unauthenticated": ReasonInfo(401, "UNAUTHENTICATED", "Credentials are required."),
    "invalid_credentials": ReasonInfo(401, "UNAUTHENTICATED", "The credentials are not valid."),
    "token_expired": ReasonInfo(401, "UNAUTHENTICATED", "The token has expired."),
    "token_revoked": ReasonInfo(401, "UNAUTHENTICATED", "The token has been revoked."),
    "login_throttled": ReasonInfo(
        401,
        "UNAUTHENTICATED",
        "Too many failed logins for this user name: the gateway does not check it for a while "
        "(the directory account itself is not locked).",
    ),
    "oidc_provider_error": ReasonInfo(
        401, "UNAUTHENTICATED", "The identity provider did not log you in."
    ),
    "oidc_response_invalid": ReasonInfo(
        401, "UNAUTHENTICATED", "The identity provider's answer could not be verified."
    ),
    # 403: you may not.
    "route_not_classified": ReasonInfo(
        403, "PERMISSION_DENIED", "This route is not served through the gateway."
    ),
    "permission_denied": ReasonInfo(
        403, "PERMISSION_DENIED", "No grant allows this action on this resource."
    ),
    "explicit_deny": ReasonInfo(
        403, "PERMISSION_DENIED", "A deny rule forbids this action on this resource."
    ),
    "resource_unresolved": ReasonInfo(
        403, "PERMISSION_DENIED", "The resource this request acts on cannot be determined."
    ),
    "source_not_allowed": ReasonInfo(
        403, "PERMISSION_DENIED", "The artifact address is outside what the caller may read."
    ),
    "system_tag_not_allowed": ReasonInfo(
        403, "PERMISSION_DENIED", "Runs may not be attributed to someone else."
    ),
    "workspace_forbidden": ReasonInfo(403, "PERMISSION_DENIED", "You may not use this workspace."),
    "search_not_filtered": ReasonInfo(
        403, "PERMISSION_DENIED", "Searching needs read access to every resource of this kind."
    ),
    "skill_content_immutable": ReasonInfo(
        403, "PERMISSION_DENIED", "Skill content is never changed: register a new skill version."
    ),
    "graphql_not_authorizable": ReasonInfo(
        403, "PERMISSION_DENIED", "The GraphQL document asks for what cannot be authorized."
    ),
    "cors_origin_not_allowed": ReasonInfo(
        403, "PERMISSION_DENIED", "Cross-origin requests from this origin are not allowed."
    ),
    "websocket_not_served": ReasonInfo(
        403, "PERMISSION_DENIED", "WebSocket connections are not served through the gateway."
    ),
    "identity_conflict": ReasonInfo(
        403,
        "PERMISSION_DENIED",
        "This user name is bound to another identity; an administrator must link or free it "
        "(mlflow-guard user link or unlink).",
    ),
    "csrf_failed": ReasonInfo(
        403,
        "PERMISSION_DENIED",
        "A write with the session cookie must come from the gateway's own pages: the Origin "
        "header (or, without it, Sec-Fetch-Site: same-origin) must be gateway.public_url or one "
        "of gateway.cors_allowed_origins. Scripts and API clients send an Authorization header "
        "instead.",
    ),
    "user_blocked": ReasonInfo(
        403, "PERMISSION_DENIED", "This account is blocked; ask an administrator."
    ),
    "csrf_token_invalid": ReasonInfo(
        403,
        "PERMISSION_DENIED",
        "The form's CSRF token is missing, expired or already used: reload the page and submit "
        "it again.",
    ),
    # 404/405/413: the gateway's own routes and limits.
    "not_found": ReasonInfo(404, "ENDPOINT_NOT_FOUND", "No such gateway endpoint."),
    "method_not_allowed": ReasonInfo(
        405, "BAD_REQUEST", "This method is not allowed on this route."
    ),
    # 409: a name already taken.
    "token_exists": ReasonInfo(
        409, "INVALID_PARAMETER_VALUE", "A live token of that name exists; pick another name."
    ),
    "body_too_large": ReasonInfo(413, "RESOURCE_EXHAUSTED", "The request body is too large."),
    "header_timeout": ReasonInfo(
        408, "DEADLINE_EXCEEDED", "The request headers did not arrive in time."
    ),
    "body_timeout": ReasonInfo(
        408, "DEADLINE_EXCEEDED", "The request body did not arrive in time."
    ),
    "uri_too_long": ReasonInfo(414, "RESOURCE_EXHAUSTED", "The request target is too long."),
    "headers_too_large": ReasonInfo(
        431, "RESOURCE_EXHAUSTED", "The request headers are too many or too large."
    ),
    "too_many_connections": ReasonInfo(
        429, "RESOURCE_EXHAUSTED", "Too many open connections from this address; retry later."
    ),
    "too_many_failures": ReasonInfo(
        429, "RESOURCE_EXHAUSTED", "Too many failed logins from this address; retry later."
    ),
    "unsupported_media_type": ReasonInfo(
        415, "BAD_REQUEST", "The request body has the wrong Content-Type."
    ),
    "otlp_unsupported": ReasonInfo(
        415, "BAD_REQUEST", "OTLP span exports cannot be read by this gateway installation."
    ),
    # 5xx: the gateway or the upstream failed; never a stack trace.
    "internal_error": ReasonInfo(500, "INTERNAL_ERROR", "Internal gateway error."),
    "upstream_unreachable": ReasonInfo(
        502, "TEMPORARILY_UNAVAILABLE", "The MLflow server cannot be reached."
    ),
    "upstream_busy": ReasonInfo(
        503, "TEMPORARILY_UNAVAILABLE", "All connections to the MLflow server are in use."
    ),
    "upstream_misconfigured": ReasonInfo(
        503, "TEMPORARILY_UNAVAILABLE", "MLflow's workspaces do not match the gateway's setting."
    ),
    "upstream_unverified": ReasonInfo(
        503, "TEMPORARILY_UNAVAILABLE", "The MLflow server is not a verified release."
    ),
    "identity_unavailable": ReasonInfo(
        503, "TEMPORARILY_UNAVAILABLE", "Credentials cannot be checked right now."
    ),
    "not_ready": ReasonInfo(503, "TEMPORARILY_UNAVAILABLE", "The gateway is not ready."),
    "audit_unavailable": ReasonInfo(
        503, "TEMPORARILY_UNAVAILABLE", "The audit trail cannot be written; nothing is served."
    ),
    "policy_store_unavailable": ReasonInfo(
        503, "TEMPORARILY_UNAVAILABLE", "The policy database cannot be reached."
    ),
    "upstream_timeout": ReasonInfo(
        504, "DEADLINE_EXCEEDED", "The MLflow server did not answer in time."
    ),
}


@dataclass(frozen=True, slots=True)
class Refusal:
    """A decision not to serve a request: a reason code plus an optional, safe detail."""

    reason: str
    detail: str = ""
    # The true refusal behind a concealed one: recorded in the audit trail, never sent.
    cause: Refusal | None = None
    retry_after: int = 0  # seconds, sent as Retry-After when > 0
    # Facts for the audit record only (a login's name, why the directory refused it).
    audit: tuple[tuple[str, str], ...] = ()

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown reason code {self.reason!r}")

    @property
    def info(self) -> ReasonInfo:
        return REASONS[self.reason]

    @property
    def status(self) -> int:
        return REASONS[self.reason].status

    @property
    def message(self) -> str:
        base = REASONS[self.reason].message
        return f"{base} {self.detail}" if self.detail else base


# Reasons that would tell a caller whether something they may not see exists: sent to clients
# only as ``permission_denied`` (see ``conceal``), kept in the audit record as ``true_reason``.
CONCEALED: Final = frozenset({"resource_unresolved", "explicit_deny"})


# Reasons after which the connection is closed: the rest of a body that came too slowly is
# not waited for (uvicorn closes the connection once such an answer is out).
CLOSES_CONNECTION: Final = frozenset({"body_timeout"})


def conceal(refusal: Refusal, detail: str) -> Refusal:
    """The refusal a client sees for ``refusal``: "exists but forbidden" and "does not exist"
    look the same, and ``detail`` names only what the caller sent."""
    if refusal.reason not in CONCEALED and refusal.reason != "permission_denied":
        return refusal
    return Refusal("permission_denied", detail, cause=refusal)


def wants_html(scope: Scope) -> bool:
    """True for a browser navigation: it asks for HTML and is not an API call."""
    path: str = scope.get("path", "")
    if path.startswith(("/api/", "/ajax-api/", "/guard/api/")):
        return False
    for name, value in scope.get("headers", ()):
        if name == b"accept":
            return b"text/html" in value
    return False


def render(refusal: Refusal, request_id: str, as_html: bool) -> tuple[bytes, bytes]:
    """Return (content-type, body) for a refusal in MLflow's error shape or as a small page."""
    if as_html:
        title = html.escape(f"{refusal.status} {refusal.info.error_code}")
        page = (
            "<!doctype html><html><head><meta charset='utf-8'>"
            f"<title>{title}</title></head><body><h1>{title}</h1>"
            f"<p>{html.escape(refusal.message)}</p>"
            f"<p><small>reason: <code>{html.escape(refusal.reason)}</code>, request id: "
            f"<code>{html.escape(request_id)}</code></small></p></body></html>"
        )
        return b"text/html; charset=utf-8", page.encode()
    body = {
        "error_code": refusal.info.error_code,
        "message": refusal.message,
        "reason": refusal.reason,
        "request_id": request_id,
    }
    return b"application/json", json.dumps(body).encode()


async def send_refusal(
    scope: Scope,
    send: Send,
    refusal: Refusal,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer a request with a refusal, without calling any inner application."""
    context = scope.get("guard")
    request_id = context.request_id if context is not None else ""
    if context is not None:
        context.refusal = refusal
    content_type, body = render(refusal, request_id, wants_html(scope))
    reason = [(b"x-guard-reason", refusal.reason.encode()), *(extra_headers or [])]
    if refusal.retry_after > 0:
        reason.append((b"retry-after", str(refusal.retry_after).encode()))
    if refusal.reason in CLOSES_CONNECTION:
        reason.append((b"connection", b"close"))
    await send_body(scope, send, refusal.status, content_type, body, reason)


async def send_body(
    scope: Scope,
    send: Send,
    status: int,
    content_type: bytes,
    body: bytes,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Answer with a whole body the gateway made itself (a refusal, a probe, the policy API):
    never cached, and empty for HEAD."""
    headers = [
        (b"content-type", content_type),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *(extra_headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})
