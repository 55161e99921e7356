"""The CLI's client for a running gateway's ``/guard/api/``: stdlib HTTP, the caller's own
credentials (as the MLflow client reads them), MLflow-shaped errors turned into messages."""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode, urlsplit

TIMEOUT = 30.0


class RemoteError(Exception):
    """The gateway refused or could not be reached; the message says which and why."""


def credentials(environ: Mapping[str, str]) -> str:
    """The Authorization header value the MLflow client would send: Basic when a user name and
    password are set, else Bearer with MLFLOW_TRACKING_TOKEN."""
    user, password = (
        environ.get("MLFLOW_TRACKING_USERNAME"),
        environ.get("MLFLOW_TRACKING_PASSWORD"),
    )
    if user and password:
        return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    token = environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return f"Bearer {token}"
    raise RemoteError(
        "no credentials: set MLFLOW_TRACKING_TOKEN (or MLFLOW_TRACKING_USERNAME and "
        "MLFLOW_TRACKING_PASSWORD)"
    )


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the caller's credentials to another address (perhaps over plain
    HTTP) and turn a POST into a GET that changes nothing: refuse it."""

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> None:
        raise RemoteError(f"the gateway answered with a redirect ({code}) to {newurl}")


def call_api(
    gateway: str,
    method: str,
    path: str,
    document: Mapping[str, Any] | None = None,
    query: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
    expect: tuple[str, ...] = ("policy_version",),
) -> dict[str, Any]:
    """One JSON call to ``GATEWAY/guard/api{path}``; its JSON answer (holding the ``expect``
    keys), or RemoteError."""
    parts = urlsplit(gateway)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RemoteError(f"--gateway must be an http(s) URL, not {gateway!r}")
    url = gateway.rstrip("/") + "/guard/api" + path
    if query:
        url += "?" + urlencode(query)
    # Only credentials say who is calling: the gateway records the principal they prove, and
    # nothing else the CLI could send (its OS account, $USER) is asked for or believed.
    headers = {
        "Authorization": credentials(os.environ if environ is None else environ),
        "User-Agent": "mlflow-guard-cli",
    }
    data = None
    if document is not None:
        data = json.dumps(document).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310 - scheme checked
    opener = urllib.request.build_opener(_NoRedirects)
    try:
        with opener.open(request, timeout=TIMEOUT) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise RemoteError(f"the gateway refused: {_detail(exc)}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RemoteError(f"cannot reach the gateway at {gateway}: {exc}") from None
    if not isinstance(answer, dict) or not set(expect) <= set(answer):
        raise RemoteError(f"{url} did not answer as the mlflow-guard policy API does")
    return answer


def _detail(exc: urllib.error.HTTPError) -> str:
    try:
        error = json.loads(exc.read())
        return f"{error['message']} ({error['reason']}, HTTP {exc.code})"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {exc.code}"
