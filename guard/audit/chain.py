"""Tamper evidence: each writer's records form a chain of HMACs.

Every record carries its writer, a sequence number and the MAC of its predecessor, and its own
MAC over its canonical JSON and that predecessor MAC. Editing, inserting, deleting or reordering
a record breaks the chain at that point; the newest head is also kept outside the table (a file
beside the spool, and the metrics), so cutting off the newest records shows as well. The key is
derived from the gateway's secret key, which never goes into the database.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

GENESIS: Final = "0" * 64
SEALED_FIELDS: Final = ("writer", "seq", "prev", "mac")


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A key for one purpose, so the audit MACs and the token digests never share a key."""
    return hmac.new(secret, f"mlflow-guard/{purpose}".encode(), hashlib.sha256).digest()


def canonical(record: Mapping[str, Any]) -> bytes:
    """The one byte string a record is MACed and stored as. ASCII only: any string a request
    carried (a lone surrogate included) encodes, so no record can fail to be written."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def mac_of(key: bytes, record: Mapping[str, Any]) -> str:
    """The MAC of a sealed record: over everything but its own ``mac``."""
    body = {k: v for k, v in record.items() if k != "mac"}
    return hmac.new(key, canonical(body), hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class Head:
    """Where a writer's chain ends: its last sequence number and MAC."""

    writer: str
    seq: int = 0
    mac: str = GENESIS

    def seal(self, key: bytes, body: Mapping[str, Any]) -> tuple[dict[str, Any], Head]:
        """``body`` as the next record of this chain, and the chain's new head."""
        record = {**body, "writer": self.writer, "seq": self.seq + 1, "prev": self.mac}
        record["mac"] = mac_of(key, record)
        return record, Head(self.writer, self.seq + 1, record["mac"])


@dataclass(frozen=True, slots=True)
class Problem:
    writer: str
    seq: int
    what: str

    def __str__(self) -> str:
        return f"writer {self.writer}, record {self.seq}: {self.what}"


def verify(
    key: bytes,
    records: Iterable[Mapping[str, Any]],
    start: Mapping[str, Head] | None = None,
    heads: Mapping[str, Head] | None = None,
) -> list[Problem]:
    """The first break in each writer's chain, if any.

    ``records`` come ordered by writer, then sequence number. ``start`` gives, per writer, the
    head the stored records continue from (after a prune); otherwise a chain starts at 1.
    ``heads`` are the heads known from outside the table: a chain that stops short of its head
    was truncated; one that disagrees with it was altered.
    """
    start, heads = start or {}, heads or {}
    problems: dict[str, Problem] = {}
    last: dict[str, Head] = {}
    for record in records:
        writer = str(record.get("writer", ""))
        if writer in problems:
            continue
        head = last.get(writer) or start.get(writer) or Head(writer)
        seq = record.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq != head.seq + 1:
            if isinstance(seq, int) and seq > head.seq + 1:
                what = f"missing records {head.seq + 1}..{seq - 1} before it"
            else:
                what = "out of sequence (inserted or duplicated)"
            problems[writer] = Problem(writer, seq if isinstance(seq, int) else -1, what)
            continue
        if record.get("prev") != head.mac:
            problems[writer] = Problem(writer, seq, "does not follow its predecessor")
            continue
        if not hmac.compare_digest(str(record.get("mac", "")), mac_of(key, record)):
            problems[writer] = Problem(writer, seq, "altered (its MAC does not match)")
            continue
        known = heads.get(writer)
        if known is not None and known.seq == seq and known.mac != record["mac"]:
            problems[writer] = Problem(writer, seq, "differs from the head recorded outside")
            continue
        last[writer] = Head(writer, seq, str(record["mac"]))
    for writer, known in heads.items():
        if writer in problems:
            continue
        reached = last.get(writer) or start.get(writer) or Head(writer)
        if reached.seq < known.seq:
            problems[writer] = Problem(
                writer,
                reached.seq + 1,
                f"truncated: records {reached.seq + 1}..{known.seq} missing",
            )
        elif reached.seq == known.seq and reached.mac != known.mac:
            problems[writer] = Problem(writer, known.seq, "differs from the recorded head")
    return sorted(problems.values(), key=lambda p: (p.writer, p.seq))
