"""Tamper evidence: each writer's records form a chain of HMACs.

Every record carries its writer, a sequence number and the MAC of its predecessor, and its own
MAC over its canonical JSON and that predecessor MAC. Editing, inserting, deleting or reordering
a record breaks the chain at that point. The newest head is also kept outside the chain: in a
file beside the spool, in the metrics, in a signed row per writer that moves with every batch
stored (``guard_audit_head``), and in the other writers' chains, which note the heads they see
(``heads_seen`` events). So cutting off a chain's newest records, or deleting a writer's chain
whole, shows as well. The key is derived from the gateway's secret key, which never goes into
the database.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final

GENESIS: Final = "0" * 64
SEALED_FIELDS: Final = ("writer", "seq", "prev", "mac")
_ENCODE: Final = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode


def derive_key(secret: bytes, purpose: str) -> bytes:
    """A key for one purpose, so the audit MACs and the token digests never share a key."""
    return hmac.new(secret, f"mlflow-guard/{purpose}".encode(), hashlib.sha256).digest()


def canonical(record: Mapping[str, Any]) -> bytes:
    """The one byte string a record is MACed and stored as. ASCII only: any string a request
    carried (a lone surrogate included) encodes, so no record can fail to be written."""
    return _ENCODE(record).encode()


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

    def seal_line(self, key: bytes, body: Mapping[str, Any]) -> tuple[bytes, dict[str, Any], Head]:
        """``body`` sealed as the next record: the line the spool stores (the canonical JSON
        of ``seal``'s record and a newline), that record, and the chain's new head. Encoded
        once, with a stand-in for the MAC that nothing else in the record can hold (this
        process's random ``_STAND_IN``): the MAC is taken over the text without that member,
        then takes its place."""
        record = {**body, "writer": self.writer, "seq": self.seq + 1, "prev": self.mac}
        record["mac"] = _STAND_IN
        text = _ENCODE(record)
        mac = hmac.digest(key, text.replace(_STAND_IN_MEMBER, "", 1).encode(), "sha256")
        record["mac"] = digest = mac.hex()
        line = (text.replace(_STAND_IN, digest, 1) + "\n").encode()
        return line, record, Head(self.writer, self.seq + 1, digest)


# seal_line's stand-in for a MAC: 256 random bits per process, so no value a request carries
# can equal it (``mac`` sorts before prev, seq and writer: a comma always follows it).
_STAND_IN: Final = secrets.token_hex(32)
_STAND_IN_MEMBER: Final = f'"mac":"{_STAND_IN}",'


def sign_head(key: bytes, head: Head, purpose: str = "head") -> str:
    """The signature of a head kept outside the chain (``head``: where a chain ends;
    ``anchor``: where a prune cut it), so such a row cannot be moved without the key."""
    message = f"{purpose}\n{head.writer}\n{head.seq}\n{head.mac}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


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
    vouched: Mapping[str, Iterable[Head]] | None = None,
) -> list[Problem]:
    """The first break in each writer's chain, if any.

    ``records`` come ordered by writer, then sequence number. ``start`` gives, per writer, the
    head the stored records continue from (after a prune); otherwise a chain starts at 1.
    ``heads`` (one per writer) and ``vouched`` (any number) are heads known from outside the
    table: a chain that stops short of one was truncated, or deleted if nothing of it is left;
    one that disagrees with it was altered.
    """
    start = start or {}
    known: dict[str, dict[int, str]] = {}
    for writer, head in (heads or {}).items():
        known.setdefault(writer, {})[head.seq] = head.mac
    problems: dict[str, Problem] = {}
    for writer, found in (vouched or {}).items():
        for head in found:
            macs = known.setdefault(writer, {})
            if macs.setdefault(head.seq, head.mac) != head.mac:
                problems[writer] = Problem(writer, head.seq, "two different heads vouched for")
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
        outside = known.get(writer, {}).get(seq)
        if outside is not None and outside != record["mac"]:
            problems[writer] = Problem(writer, seq, "differs from the head recorded outside")
            continue
        last[writer] = Head(writer, seq, str(record["mac"]))
    for writer, macs in known.items():
        if writer in problems:
            continue
        reached = last.get(writer) or start.get(writer) or Head(writer)
        top = max(macs)
        if reached.seq < top:
            gone = writer not in last and writer not in start
            what = "deleted: its whole chain" if gone else "truncated: records"
            problems[writer] = Problem(
                writer, reached.seq + 1,
                f"{what} {reached.seq + 1}..{top} missing (its head is known outside the table)",
            )  # fmt: skip
        elif macs.get(reached.seq, reached.mac) != reached.mac:
            problems[writer] = Problem(writer, reached.seq, "differs from the recorded head")
    return sorted(problems.values(), key=lambda p: (p.writer, p.seq))
