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


def call_api(
    gateway: str,
    method: str,
    path: str,
    document: Mapping[str, Any] | None = None,
    query: Mapping[str, str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """One JSON call to ``GATEWAY/guard/api{path}``; its JSON answer, or RemoteError."""
    parts = urlsplit(gateway)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise RemoteError(f"--gateway must be an http(s) URL, not {gateway!r}")
    url = gateway.rstrip("/") + "/guard/api" + path
    if query:
        url += "?" + urlencode(query)
    headers = {"Authorization": credentials(os.environ if environ is None else environ)}
    data = None
    if document is not None:
        data = json.dumps(document).encode()
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers, method=method)  # noqa: S310 - scheme checked
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:  # noqa: S310
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read())
            detail = f"{error['message']} ({error['reason']}, HTTP {exc.code})"
        except (ValueError, KeyError, TypeError):
            detail = f"HTTP {exc.code}"
        raise RemoteError(f"the gateway refused: {detail}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise RemoteError(f"cannot reach the gateway at {gateway}: {exc}") from None
