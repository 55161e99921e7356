"""Request ids: 32 hex digits that sort by the millisecond they were made (the audit table's
``request_id`` index then grows at its end), unique within one millisecond."""

from __future__ import annotations

import ipaddress
import re

import pytest

from guard.edge import requestid
from guard.edge.context import build_context
from guard.edge.requestid import new_request_id

HEX32 = re.compile(r"[0-9a-f]{32}")


def test_ids_are_32_hex_digits_and_never_repeat() -> None:
    made = [new_request_id() for _ in range(20_000)]
    assert all(HEX32.fullmatch(i) for i in made)
    assert len(set(made)) == len(made)


def test_ids_sort_by_the_millisecond_they_were_made(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([1_764_590_400_000_999_999, 1_764_590_400_001_000_000, 1_764_590_401_000_000_000])
    monkeypatch.setattr(requestid.time, "time_ns", lambda: next(clock))
    first, second, third = new_request_id(), new_request_id(), new_request_id()
    assert first[:12] == f"{1_764_590_400_000:012x}"
    assert first < second < third
    assert [first[:12], second[:12]] == [f"{1_764_590_400_000:012x}", f"{1_764_590_400_001:012x}"]


def test_a_request_gets_one_unless_a_trusted_proxy_named_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(requestid.time, "time_ns", lambda: 1_764_590_400_123_000_000)

    def scope(peer: str, request_id: str) -> dict[str, object]:
        headers = [(b"host", b"a"), (b"x-request-id", request_id.encode())]
        return {"type": "http", "headers": headers, "client": (peer, 1234), "scheme": "http"}

    trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    made = build_context(scope("203.0.113.9", "mine"), trusted).request_id
    assert HEX32.fullmatch(made) and made.startswith(f"{1_764_590_400_123:012x}")
    assert build_context(scope("10.0.0.1", "lb-42"), trusted).request_id == "lb-42"
