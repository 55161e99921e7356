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
APPLIES: Final = _CREATE + _SET_TAG + _LOG_BATCH + _DELETE_TAG


def applies(path: str) -> bool:
    return path.endswith(APPLIES)


def attribute_run(path: str, data: RequestData, name: str) -> bytes | None:
    """The body to forward for a new run, with ``name`` as its user; None to forward as is."""
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


def refusal(path: str, data: RequestData, name: str) -> Refusal | None:
    """Why a write of the run's user tag may not be made by ``name``; None if it may."""
    if path.endswith(_CREATE):
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
