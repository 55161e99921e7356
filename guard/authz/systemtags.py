"""Who a run says it belongs to: the ``mlflow.user`` tag and the run's ``user_id``.

The MLflow UI shows them as the run's user, and teams filter on them, so a caller may not
attribute work to someone else. The MLflow client fills both from the operating-system account
(``runner`` in CI, ``jovyan`` in a notebook), which is rarely the gateway identity, so refusing
every run that disagrees would break every client: on ``runs/create`` (and the UI's
``runs/create-promptlab-run``) the gateway writes the authenticated name into both instead.
Later writes of ``mlflow.user`` (``set-tag``, ``log-batch``, ``delete-tag``) naming anyone but
the caller are refused. Administrators (those holding ``manage`` on the whole server) may set
any value later, for migrations and imports; their new runs are attributed like anyone's.
Traces carry their own user (``mlflow.trace.user``); that is not checked yet.

Where a trace's data, spans and archive are read from are trace tags MLflow manages itself
(``TRACE_SYSTEM_TAGS``, MLflow 3.18's ``_HANDLER_BLOCKED_TRACE_TAGS``). MLflow 3.17.2 lets a
caller set ``mlflow.artifactLocation`` (set-tag of a trace, the v2 start and end bodies) and the
archive location (v2 bodies, StartTraceV3, OTLP root-span attributes), so whoever may update a
trace could point it at any location the server reads (another experiment's trace folder,
``file:///…``) and read that back as the trace's data. 3.18 refuses them on set-tag and drops
them from the bodies; the gateway does the same on every release (a write naming one is refused
``system_tag_not_allowed``, administrators aside; the bodies lose them for everyone; OTLP:
guard/authz/otlp.py).
"""

from __future__ import annotations

import json
from typing import Any, Final

from guard.edge.requestdata import RequestData, RequestDataError
from guard.errors import Refusal

USER_TAG: Final = "mlflow.user"
_CREATE: Final = ("/runs/create", "/runs/create-promptlab-run")
_SET_TAG: Final = ("/runs/set-tag",)
_LOG_BATCH: Final = ("/runs/log-batch",)
_DELETE_TAG: Final = ("/runs/delete-tag",)
# mlflow/server/handlers.py (3.18) _HANDLER_BLOCKED_TRACE_TAGS; the archival failure may be
# deleted (that clears it), as in 3.18.
TRACE_SYSTEM_TAGS: Final = frozenset(
    {"mlflow.artifactLocation", "mlflow.trace.spansLocation", "mlflow.trace.archiveLocation",
     "mlflow.trace.archivalFailure"}
)  # fmt: skip
_DELETABLE_TRACE_TAG: Final = "mlflow.trace.archivalFailure"
_TRACE_TAG: Final = ("/2.0/mlflow/traces/<request_id>/tags", "/3.0/mlflow/traces/<trace_id>/tags")
_TRACE_V2: Final = ("/2.0/mlflow/traces", "/2.0/mlflow/traces/<request_id>")
_TRACE_V3: Final = ("/3.0/mlflow/traces",)
APPLIES: Final = _CREATE + _SET_TAG + _LOG_BATCH + _DELETE_TAG + _TRACE_TAG + _TRACE_V2 + _TRACE_V3


def applies(path: str) -> bool:
    return path.endswith(APPLIES)


def attribute_run(path: str, data: RequestData, name: str) -> bytes | None:
    """The body to forward for a new run, with ``name`` as its user (for a trace's start or end,
    without MLflow's own trace tags); None to forward as is."""
    if path.endswith(_TRACE_V2 + _TRACE_V3):
        return without_trace_system_tags(path, data)
    if not path.endswith(_CREATE) or data.body is None:
        return None
    body: dict[str, Any] = {k: v for k, v in data.body.items() if k not in ("user_id", "userId")}
    tags = body.get("tags", [])
    if not isinstance(tags, list):
        raise RequestDataError(Refusal("invalid_request_body", "'tags' must be a list."))
    kept = [t for t in tags if not (isinstance(t, dict) and t.get("key") == USER_TAG)]
    body["tags"] = [*kept, {"key": USER_TAG, "value": name}]
    body["user_id"] = name
    return json.dumps(body).encode()


def without_trace_system_tags(path: str, data: RequestData) -> bytes | None:
    """A v2 start/end or v3 start body without ``TRACE_SYSTEM_TAGS`` (as MLflow 3.18 drops them);
    None when it holds none (or is not the JSON MLflow would read: MLflow refuses that)."""
    if data.from_query or not isinstance(data.body, dict):
        return None
    body: dict[str, Any] = dict(data.body)
    if path.endswith(_TRACE_V3):
        trace = body.get("trace")
        info_key = next((k for k in ("trace_info", "traceInfo") if isinstance(trace, dict)
                         and k in trace), None)  # fmt: skip
        info = trace.get(info_key) if info_key and isinstance(trace, dict) else None
        tags = info.get("tags") if isinstance(info, dict) else None
        if not isinstance(tags, dict) or not TRACE_SYSTEM_TAGS & tags.keys():
            return None
        kept = {k: v for k, v in tags.items() if k not in TRACE_SYSTEM_TAGS}
        body["trace"] = {**trace, info_key: {**info, "tags": kept}}  # type: ignore[dict-item]
        return json.dumps(body).encode()
    tags = body.get("tags")
    if not isinstance(tags, list):
        return None
    kept_list = [t for t in tags if not (isinstance(t, dict) and t.get("key") in TRACE_SYSTEM_TAGS)]
    if len(kept_list) == len(tags):
        return None
    body["tags"] = kept_list
    return json.dumps(body).encode()


def refusal(path: str, data: RequestData, name: str) -> Refusal | None:
    """Why a write of the run's user tag (or of a trace's system tags) may not be made by
    ``name``; None if it may."""
    if path.endswith(_TRACE_TAG):
        key = data.single("key")
        if key in TRACE_SYSTEM_TAGS and not (
            data.method == "DELETE" and key == _DELETABLE_TRACE_TAG
        ):
            return Refusal("system_tag_not_allowed", f"{key} is managed by MLflow.")
        return None
    if path.endswith(_CREATE + _TRACE_V2 + _TRACE_V3):
        return None
    if path.endswith(_LOG_BATCH):
        writes = [
            tag.get("value") for tag in data.values("tags")
            if isinstance(tag, dict) and tag.get("key") == USER_TAG
        ]  # fmt: skip
    elif data.single("key") == USER_TAG:
        writes = [None] if path.endswith(_DELETE_TAG) else [data.single("value")]
    else:
        return None
    for value in writes:
        if value != name:
            shown = "removed" if value is None else f"set to {value!r}"
            return Refusal("system_tag_not_allowed", f"{USER_TAG} may not be {shown}.")
    return None
