"""What the login pages read from a request: the ``next`` target and the posted form.

Both are pure and strict: ``validate_next`` lets only a path on this origin through (anything
else becomes ``/``), and ``read_form`` refuses a form that could be read two ways (a repeated
field, an unknown field, another encoding) instead of picking one reading.
"""

from __future__ import annotations

import asyncio
import posixpath
import re
from typing import Final
from urllib.parse import parse_qsl, quote, unquote, urlsplit

from starlette.types import Receive, Scope

from guard.errors import Refusal

MAX_NEXT: Final = 2048
MAX_FORM_BODY: Final = 8192
FORM_TIMEOUT: Final = 10.0
FIELD_LIMITS: Final = {
    "username": 256, "password": 1024, "csrf_token": 128, "next": MAX_NEXT,
    "logout_token": MAX_FORM_BODY,  # OpenID Connect back-channel logout: a signed JWT
}  # fmt: skip
FORM_TYPE: Final = "application/x-www-form-urlencoded"
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")
_PATH_FORBIDDEN: Final = re.compile(r"[\x00-\x20\x7f\\]")
# Characters kept as they are when ``next`` is made ASCII for the Location header.
_URL_SAFE: Final = "/?#&=%:;@!$'()*+,-._~[]"


def validate_next(value: str | None) -> str:
    """Where to send the browser after login: ``value`` if it is a path on this origin (with
    its query and fragment), else ``/``. Absolute and scheme-relative URLs, backslashes,
    whitespace and control characters in the path (raw or percent-encoded), control characters
    anywhere, over-long values and the gateway's own pages (``/guard/...``: a login loop) all
    give ``/``. What is kept is made ASCII for the Location header (percent-encoding)."""
    if not value or len(value) > MAX_NEXT or not value.startswith("/"):
        return "/"
    rest, _, fragment = value.partition("#")
    path, _, query = rest.partition("?")
    try:
        # Decode a few times: what a proxy, the browser or MLflow decodes once more must still
        # be a plain path.
        decoded = path
        for _ in range(3):
            if _PATH_FORBIDDEN.search(decoded) or decoded.startswith("//"):
                return "/"
            once = unquote(decoded, errors="strict")
            if once == decoded:
                break
            decoded = once
        else:
            return "/"
        if any(_CONTROL.search(unquote(part, errors="strict")) for part in (query, fragment)):
            return "/"
    except UnicodeDecodeError:
        return "/"
    parts = urlsplit(decoded)
    if parts.scheme or parts.netloc or not parts.path.startswith("/"):
        return "/"
    canonical = posixpath.normpath(parts.path)
    if canonical == "/guard" or canonical.startswith("/guard/"):
        return "/"
    return quote(value, safe=_URL_SAFE)


def query_text(scope: Scope) -> str:
    raw: bytes = scope.get("query_string", b"")
    return raw.decode("latin-1")


async def read_form(
    scope: Scope, receive: Receive, allowed: frozenset[str]
) -> dict[str, str] | Refusal:
    """The POSTed form: url-encoded UTF-8, at most ``MAX_FORM_BODY`` bytes, arriving within
    ``FORM_TIMEOUT``, each field at most once, only ``allowed`` fields, each within its limit."""
    headers: list[tuple[bytes, bytes]] = scope["headers"]
    types = [v.decode("latin-1") for k, v in headers if k == b"content-type"]
    media, _, params = (types[0] if len(types) == 1 else "").partition(";")
    charset = params.strip().lower()
    if media.strip().lower() != FORM_TYPE or charset not in {"", "charset=utf-8"}:
        return Refusal("unsupported_media_type", f"Send the form as {FORM_TYPE}.")
    lengths = [v for k, v in headers if k == b"content-length"]
    if lengths and (not lengths[0].isdigit() or int(lengths[0]) > MAX_FORM_BODY):
        return Refusal("body_too_large")
    body = bytearray()
    try:
        async with asyncio.timeout(FORM_TIMEOUT):
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return Refusal("invalid_request_body", "The form did not arrive.")
                body += message.get("body", b"")
                if len(body) > MAX_FORM_BODY:
                    return Refusal("body_too_large")
                if not message.get("more_body", False):
                    break
    except TimeoutError:
        return Refusal("body_timeout")
    try:
        pairs = parse_qsl(
            body.decode("ascii"), keep_blank_values=True, strict_parsing=bool(body),
            encoding="utf-8", errors="strict", max_num_fields=2 * len(allowed),
        )  # fmt: skip
    except (ValueError, UnicodeError):
        return Refusal("invalid_request_body", "The form is not valid url-encoded UTF-8.")
    form: dict[str, str] = {}
    for name, value in pairs:
        if name not in allowed:
            return Refusal("invalid_request_body", "The form has a field it should not have.")
        if name in form:
            return Refusal("ambiguous_parameter", f"The form field {name} is repeated.")
        if len(value) > FIELD_LIMITS.get(name, 128) or "\x00" in value:
            return Refusal(
                "invalid_request_body", f"The form field {name} is too long or holds NUL."
            )
        form[name] = value
    return form
