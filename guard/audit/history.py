"""A registered model's promotion history, read back from the audit trail.

Every alias set or deleted and every stage transition that MLflow accepted (status 200) is in
the trail with its declared fields, who made it and under which rule. Replayed in order they
say which version held which alias or stage, from when until when. Each record's MAC is checked
first: a history is never built from an altered record (``audit verify`` finds deleted ones).
"""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Engine

from guard.audit.chain import derive_key, mac_of
from guard.audit.commands import query_records
from guard.audit.store import Filters

_CLEARING_STAGES = ("None", "")


@dataclass
class Span:
    holds: str  # "alias champion" or "stage Production"
    version: str
    since: str
    until: str  # "" while it still holds
    set_by: str
    rule: str
    request_id: str

    def row(self) -> dict[str, Any]:
        return {
            "holds": self.holds, "version": self.version, "since": self.since,
            "until": self.until or "now", "set_by": self.set_by, "rule": self.rule,
            "request_id": self.request_id,
        }  # fmt: skip


def replay(records: Iterable[dict[str, Any]]) -> list[Span]:
    """Spans from outcome records of one model, oldest first."""
    spans: list[Span] = []
    open_: dict[tuple[str, str], Span] = {}  # (holds, version) -> the span holding it

    def close(holds: str | None, version: str | None, when: str) -> None:
        for key in [k for k in open_ if (holds in (None, k[0])) and (version in (None, k[1]))]:
            open_.pop(key).until = when

    def start(holds: str, version: str, record: dict[str, Any]) -> None:
        span = Span(holds, version, record["time"], "", record.get("principal", ""),
                    record.get("rule", ""), record.get("request_id", ""))  # fmt: skip
        open_[(holds, version)] = span
        spans.append(span)

    for record in records:
        if record.get("kind") != "outcome" or record.get("status") != 200:
            continue
        path, method = str(record.get("path", "")), record.get("method")
        changes = record.get("changes") or {}
        when, version = record["time"], str(changes.get("version", ""))
        if path.endswith("/registered-models/alias"):
            alias = f"alias {changes.get('alias', '')}"
            close(alias, None, when)  # an alias names one version at a time
            if method == "POST":
                start(alias, version, record)
        elif path.endswith("/model-versions/transition-stage"):
            stage = str(changes.get("stage", ""))
            for holds, held in list(open_):
                if holds.startswith("stage ") and held == version:
                    close(holds, held, when)
            if changes.get("archive_existing_versions") and stage not in _CLEARING_STAGES:
                for holds, held in list(open_):
                    if holds == f"stage {stage}" and held != version:
                        close(holds, held, when)
                        start("stage Archived", held, record)
            if stage not in _CLEARING_STAGES:
                start(f"stage {stage}", version, record)
        elif path.endswith("/model-versions/delete"):
            close(None, version, when)
        elif path.endswith("/registered-models/delete"):
            close(None, None, when)
    return spans


class AlteredRecords(ValueError):
    """Records whose MAC does not match: the history would be built on edited facts."""


def model_history(
    engine: Engine, model: str, secret_key: bytes, workspace: str | None = None
) -> list[Span]:
    """The spans of the model named ``model`` (a name, never a pattern), in an MLflow
    ``workspace`` if given (its records name ``WORKSPACE/model:NAME``); AlteredRecords if any
    record it rests on fails its MAC."""
    key = derive_key(secret_key, "audit-chain")
    resource = f"model:{model}" if workspace is None else f"{workspace}/model:{model}"
    filters = Filters(resource=resource, kind="outcome", decision="allow", literal=True)
    records = list(query_records(engine, filters, None))
    altered = [
        f"{r.get('writer')}#{r.get('seq')}" for r in records
        if not hmac.compare_digest(str(r.get("mac", "")), mac_of(key, r))
    ]  # fmt: skip
    if altered:
        raise AlteredRecords(
            f"audit records altered (their MACs do not match): {', '.join(altered[:20])}; "
            "run `mlflow-guard audit verify`"
        )
    return replay(records)
