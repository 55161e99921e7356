"""The hash chain: untouched chains verify; every kind of tampering is found where it happened."""

from __future__ import annotations

import copy
import json
import random
from typing import Any

import pytest

from guard.audit.chain import Head, canonical, derive_key, mac_of, verify

KEY = derive_key(b"k" * 40, "audit-chain")


def chain(writer: str = "gw-a", n: int = 5) -> list[dict[str, Any]]:
    head, records = Head(writer), []
    for i in range(n):
        record, head = head.seal(KEY, {"kind": "outcome", "time": f"t{i}", "status": 200})
        records.append(record)
    return records


def test_an_untouched_chain_verifies() -> None:
    records = chain() + chain("gw-b", 3)
    heads = {
        "gw-a": Head("gw-a", 5, records[4]["mac"]),
        "gw-b": Head("gw-b", 3, records[-1]["mac"]),
    }
    assert verify(KEY, records, heads=heads) == []


def test_keys_are_separated_by_purpose() -> None:
    assert derive_key(b"k" * 40, "audit-chain") != derive_key(b"k" * 40, "audit-redact")
    records = chain()
    assert verify(derive_key(b"x" * 40, "audit-chain"), records)[0].what.startswith("altered")


@pytest.mark.parametrize(
    ("tamper", "seq", "what"),
    [
        (lambda r: r[2].update(status=403), 3, "altered"),
        (lambda r: r[2].update(extra="x"), 3, "altered"),
        (lambda r: r.pop(2), 4, "missing records 3..3"),
        (lambda r: r.insert(2, copy.deepcopy(r[1])), 2, "out of sequence"),
        (lambda r: r.insert(5, copy.deepcopy(r[4])), 5, "out of sequence"),
        (lambda r: r.__setitem__(slice(1, 3), [r[2], r[1]]), 3, "missing records 2..2"),
        (lambda r: r.pop(0), 2, "missing records 1..1"),
    ],
)
def test_tampering_is_found_where_it_happened(tamper: Any, seq: int, what: str) -> None:
    records = chain()
    tamper(records)
    problems = verify(KEY, records)
    assert len(problems) == 1 and problems[0].seq == seq and problems[0].what.startswith(what)


def test_a_forged_record_with_a_fresh_mac_is_found_by_the_next_one() -> None:
    records = chain()
    records[2]["status"] = 403
    records[2]["mac"] = mac_of(b"not the key", records[2])
    assert verify(KEY, records)[0].seq == 3


def test_rewriting_the_whole_tail_needs_the_key() -> None:
    """An attacker without the key who re-chains everything after an edit still fails."""
    records = chain()
    records[3]["status"] = 500
    records[3]["mac"] = mac_of(b"guess", records[3])
    records[4]["prev"] = records[3]["mac"]
    records[4]["mac"] = mac_of(b"guess", records[4])
    assert verify(KEY, records)[0].seq == 4


def test_truncation_is_found_against_the_head_kept_outside() -> None:
    records = chain()
    head = Head("gw-a", 5, records[-1]["mac"])
    problems = verify(KEY, records[:3], heads={"gw-a": head})
    assert problems[0].seq == 4 and "truncated" in problems[0].what
    problems = verify(KEY, [], heads={"gw-a": head})
    assert problems[0].what.startswith("deleted: its whole chain 1..5 missing")
    # Records beyond a head that lagged behind are fine; a head that disagrees is not.
    assert verify(KEY, records, heads={"gw-a": Head("gw-a", 3, records[2]["mac"])}) == []
    assert verify(KEY, records, heads={"gw-a": Head("gw-a", 3, "f" * 64)})[0].seq == 3


def test_a_chain_may_continue_from_an_anchor() -> None:
    records = chain()
    anchor = Head("gw-a", 2, records[1]["mac"])
    assert verify(KEY, records[2:], start={"gw-a": anchor}) == []
    assert verify(KEY, records[3:], start={"gw-a": anchor})[0].what.startswith("missing")
    assert verify(KEY, records[2:])[0].what == "missing records 1..2 before it"


def test_every_head_vouched_for_is_checked() -> None:
    records = chain()
    older, newest = (Head("gw-a", n, records[n - 1]["mac"]) for n in (2, 5))
    assert verify(KEY, records, vouched={"gw-a": [older, newest]}) == []
    (problem,) = verify(KEY, records[:4], vouched={"gw-a": [older, newest]})
    assert problem.seq == 5 and problem.what.startswith("truncated: records 5..5 missing")
    forged = Head("gw-a", 2, "f" * 64)
    assert verify(KEY, records, vouched={"gw-a": [forged]})[0].seq == 2
    (conflict,) = verify(KEY, records, vouched={"gw-a": [older, forged]})
    assert conflict.what == "two different heads vouched for"


def _value(rng: random.Random, depth: int = 0) -> object:
    kind = rng.randrange(7 if depth < 2 else 5)
    if kind == 0:
        return "".join(rng.choice('am_z"\\/\u00e9\u2028\ud800 ') for _ in range(rng.randrange(6)))
    if kind in (1, 2, 3, 4):
        return [None, True, -7, 2.5][kind - 1]
    if kind == 5:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(3))]
    return {_key(rng): _value(rng, depth + 1) for _ in range(rng.randrange(4))}


def _key(rng: random.Random) -> str:
    return rng.choice(["", "a", "mac", "mab", "macz", "m", "n", "seq", "prev", "writer", "z\u00e9",
                       "Kind", "_", '"q', "time"])  # fmt: skip


@pytest.mark.parametrize("seed", range(40))
def test_a_sealed_line_is_the_canonical_sealed_record(seed: int) -> None:
    """The spool's one encoding (seal_line) gives the bytes and MAC of seal + canonical, so a
    line written either way verifies either way; also with keys around "mac", a body that
    names the sealed fields itself, and strings that need escaping."""
    rng = random.Random(seed)
    head = Head("gw-a", rng.randrange(100), mac_of(KEY, {"n": seed}))
    body = {_key(rng): _value(rng) for _ in range(rng.randrange(12))}
    record, after = head.seal(KEY, body)
    line, kept, sealed = head.seal_line(KEY, body)
    assert line == canonical(record) + b"\n" and kept == record and sealed == after
    parsed = json.loads(line)
    assert parsed["mac"] == mac_of(KEY, parsed) and verify(KEY, [parsed], {"gw-a": head}) == []
