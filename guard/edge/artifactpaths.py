"""Artifact paths: refuse any that is not already canonical, before anything is forwarded.

MLflow joins a caller's artifact path to a trusted root after ``validate_path_is_safe``
(``mlflow/utils/uri.py``), which percent-decodes the path *again* until it stops changing. So a
path the gateway judged as ``%2531/x`` reaches the store as ``1/x``, and only MLflow's own check
stands between ``%252e%252e`` and a parent directory. The gateway therefore accepts only a path
that such decoding leaves unchanged and that is plainly relative: no ``..`` or ``.`` segment, no
empty segment (a trailing ``/`` aside), no leading ``/``, no scheme or drive (``file:``,
``s3:``, ``C:``), no ``#`` or ``?``, no backslash, no control character (NUL included). Everything
else is refused with ``artifact_path_invalid`` (400). A path that passes is exactly the string
MLflow and the gateway's authorization both act on.

Skill content (MLflow 3.18's ``skills/…`` tree, also behind ``workspaces/<ws>/``) is written only
by registering a skill version: MLflow refuses every proxied write into it (PUT, DELETE and
``mpu/*``, Flask and native, for administrators too: 403 "Skill upload content is immutable").
The gateway refuses those writes itself (``skill_content_immutable``, 403), spotting the tree as
MLflow's ``is_skill_upload_namespace`` does (``skills`` in any case, after an optional
``workspaces/<ws>/``), so they never reach MLflow on any release. Reads are authorized on the
skill (guard/authz/skills.py).

Where MLflow reads a path (every handler that calls ``validate_path_is_safe`` in 3.17.2):

- the ``artifact_path`` URL parameter of the proxied artifact routes (``mlflow-artifacts/
  artifacts/<path>`` download, upload and delete, ``mpu/*``, ``presigned/<path>``), Flask and
  native FastAPI spellings, ``/api`` and ``/ajax-api``;
- ``request.args`` only (the first value of a repeated parameter; the gateway refuses repeats):
  ``path`` of ``/get-artifact``, ``/model-versions/get-artifact``, ``get-trace-artifact``
  (2.0 and 3.0) and ``upload-artifact``; ``artifact_file_path`` of logged-model
  ``artifacts/files``;
- the request message (query string on GET, else the JSON body; either spelling): ``path`` of
  ``artifacts/list``, ``mlflow-artifacts/artifacts`` (listing) and ``artifacts/presigned-*-url``;
  ``artifact_directory_path`` of logged-model ``artifacts/directories``.
"""

from __future__ import annotations

import re
from typing import Final, Literal
from urllib.parse import unquote, urlparse, urlunparse

from starlette.types import ASGIApp, Receive, Scope, Send

from guard.edge.requestdata import RequestData, RequestDataError
from guard.errors import Refusal, send_refusal

Source = Literal["query", "message"]
_PREFIXES: Final = ("/api", "/ajax-api")
# Route templates (as in route_table.toml) -> the fields holding an artifact path there.
PATH_FIELDS: Final[dict[str, tuple[tuple[str, Source], ...]]] = {
    "/get-artifact": (("path", "query"),),
    "/model-versions/get-artifact": (("path", "query"),),
    "/ajax-api/2.0/mlflow/get-trace-artifact": (("path", "query"),),
    "/ajax-api/3.0/mlflow/get-trace-artifact": (("path", "query"),),
    "/ajax-api/2.0/mlflow/upload-artifact": (("path", "query"),),
    "/ajax-api/2.0/mlflow/logged-models/<model_id>/artifacts/files": (
        ("artifact_file_path", "query"),
    ),
    **{
        prefix + suffix: ((field, "message"),)
        for prefix in _PREFIXES
        for suffix, field in (
            ("/2.0/mlflow/artifacts/list", "path"),
            ("/2.0/mlflow/artifacts/presigned-download-url", "path"),
            ("/2.0/mlflow/artifacts/presigned-upload-url", "path"),
            ("/2.0/mlflow-artifacts/artifacts", "path"),
            (
                "/2.0/mlflow/logged-models/<model_id>/artifacts/directories",
                "artifact_directory_path",
            ),
        )
    },
}
# Routes whose answer is an artifact's bytes: they get ``Content-Security-Policy: sandbox``.
DOWNLOADS: Final = frozenset(
    {
        "/get-artifact",
        "/model-versions/get-artifact",
        "/ajax-api/2.0/mlflow/get-trace-artifact",
        "/ajax-api/3.0/mlflow/get-trace-artifact",
        "/ajax-api/2.0/mlflow/logged-models/<model_id>/artifacts/files",
        *(
            f"{prefix}/2.0/mlflow-artifacts/artifacts/{param}"
            for prefix in _PREFIXES
            for param in ("<path:artifact_path>", "{artifact_path:path}")
        ),
    }
)
URL_PARAM: Final = "artifact_path"
# mlflow/store/tracking/skill_registry/artifact_paths.py (SKILL_UPLOAD_ROOT) and the workspace
# prefix MLflow strips before looking at it; both compared ignoring case, as MLflow does.
SKILL_ROOT: Final = "skills"
_WORKSPACES: Final = "workspaces"
_SCHEME: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_FORBIDDEN: Final = frozenset("#?\\\x7f") | frozenset(chr(c) for c in range(0x20))
# Any of them, found by one search rather than a loop over the path's characters.
_FORBIDDEN_CHAR: Final = re.compile("[" + re.escape("".join(sorted(_FORBIDDEN))) + "]")


def _decoded_by_mlflow(path: str) -> str:
    """One round of MLflow's ``_decode``: unquote, then a URL parse and unparse."""
    return urlunparse(urlparse(unquote(path)))


def validate_artifact_path(path: str) -> str | None:
    """None for a canonical relative artifact path; otherwise what is wrong with it."""
    if _FORBIDDEN_CHAR.search(path):
        return "It holds '#', '?', a backslash or a control character."
    try:
        if _decoded_by_mlflow(path) != path:
            return "It is still percent-encoded, or not a plain path."
    except ValueError:  # urlparse: a malformed IPv6 authority ("//[x")
        return "It is not a plain path."
    if path.startswith("/") or _SCHEME.match(path):
        return "It must be relative, without a scheme or drive."
    segments = path.split("/")
    if segments[-1] == "":  # a folder may be named with a trailing slash
        segments.pop()
    if any(segment in ("", ".", "..") for segment in segments):
        return "It holds an empty, '.' or '..' segment."
    return None


def in_skill_content(path: str) -> bool:
    """Whether a canonical artifact path lies in MLflow's skill content tree, read as MLflow's
    ``is_skill_upload_namespace`` reads it: ``skills/…`` or ``workspaces/<ws>/skills/…``, any
    case (a path that is not canonical is refused before this is asked)."""
    segments = [segment for segment in path.split("/") if segment not in ("", ".")]
    if len(segments) >= 2 and segments[0].lower() == _WORKSPACES:
        segments = segments[2:]
    return bool(segments) and segments[0].lower() == SKILL_ROOT


def writes_content(method: str, template: str) -> bool:
    """A proxied artifact route that writes or deletes what its URL path names: PUT and DELETE
    of ``mlflow-artifacts/artifacts/<path>`` and the multipart ``mpu/*`` steps."""
    return method in ("PUT", "DELETE") or "/mlflow-artifacts/mpu/" in template


def _values(scope: Scope, field: str, source: Source) -> list[object]:
    data = RequestData.of(scope)
    if source == "query":  # handlers that read request.args themselves, exactly this name
        values: list[object] = list(data.query.get(field, []))
        if len(values) > 1:
            raise RequestDataError(
                Refusal("ambiguous_parameter", f"The parameter {field!r} is repeated.")
            )
        return values
    value = data.single(field)
    return [] if value is None else [value]


class ArtifactPathMiddleware:
    """Refuse a request whose artifact path (URL parameter, query or body) is not canonical.
    Runs after the route classifier and the body reader, before authorization."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = scope["guard.route"]
        param = scope["guard.params"].get(URL_PARAM)
        fields = PATH_FIELDS.get(route.path, ())
        if param is None and not fields:  # no artifact path on this route: most requests
            await self.app(scope, receive, send)
            return
        candidates: list[object] = []
        try:
            if param is not None:
                candidates.append(param)
            for field, source in fields:
                candidates.extend(_values(scope, field, source))
        except RequestDataError as exc:
            await send_refusal(scope, send, exc.refusal)
            return
        for value in candidates:
            problem = (
                validate_artifact_path(value)
                if isinstance(value, str)
                else "An artifact path must be a string."
            )
            if problem is not None:
                await send_refusal(scope, send, Refusal("artifact_path_invalid", problem))
                return
        writes = param is not None and writes_content(route.method, route.path)
        if writes and in_skill_content(param):
            await send_refusal(scope, send, Refusal("skill_content_immutable"))
            return
        await self.app(scope, receive, send)
