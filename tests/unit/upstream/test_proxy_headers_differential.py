"""The proxy's header filters against their former implementations (kept here as the
reference), over many generated header lists: any case, underscores, repeated names,
``Connection`` lists naming headers (with whitespace that ``str.strip`` removes and
``bytes.strip`` does not), latin-1 bytes outside ASCII, and more names than the memo keeps."""

from __future__ import annotations

import random

from guard.upstream.proxy import (
    FORWARDED,
    RESPONSE_DROPPED,
    client_response_headers,
    upstream_request_headers,
)
from tests.unit.edge.test_edge_differential import CASES, Headers, random_headers


def old_upstream_request_headers(
    headers: Headers, extra: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    connection_listed: set[str] = set()
    for key, value in headers:
        if key.lower() == b"connection":
            connection_listed.update(t.strip().lower() for t in value.decode("latin-1").split(","))
    result = []
    for key, value in headers:
        name = key.decode("latin-1").lower()
        if name in FORWARDED and name not in connection_listed:
            result.append((name, value.decode("latin-1")))
    result.extend(extra)
    return result


def old_client_response_headers(headers: tuple[tuple[bytes, bytes], ...]) -> Headers:
    connection_listed: set[bytes] = set()
    for key, value in headers:
        if key.lower() == b"connection":
            connection_listed.update(t.strip().lower() for t in value.split(b","))
    result = []
    for key, value in headers:
        name = key.lower()
        if (
            name.decode("latin-1") in RESPONSE_DROPPED
            or name in connection_listed
            or name.startswith(b"access-control-")
        ):
            continue
        result.append((name, value))
    return result


EXTRA = [("host", "mlflow:5000"), ("x-request-id", "r1")]


def test_latin1_letters_never_lower_case_into_ascii() -> None:
    """What comparing lower-cased bytes with ASCII names rests on."""
    for code in range(256):
        lowered = chr(code).lower()
        assert lowered.isascii() == (code < 128)
        if code < 128:
            assert lowered.encode() == bytes([code]).lower()


def test_request_headers_match_the_former_function() -> None:
    for headers in CASES:
        assert upstream_request_headers(headers, EXTRA) == old_upstream_request_headers(
            headers, EXTRA
        ), headers
        assert upstream_request_headers(headers, []) == old_upstream_request_headers(headers, [])


def test_response_headers_match_the_former_function() -> None:
    for headers in CASES:
        answer = tuple(headers)
        assert client_response_headers(answer) == old_client_response_headers(answer), headers


def test_connection_lists_are_read_as_before() -> None:
    rng = random.Random(5)
    names = [b"Accept", b"accept", b"User-Agent", b"Range", b"X-MLflow-Run-Id", b"Date", b"Vary"]
    spaces = [b"", b" ", b"\t", b"\xa0", b"\x85", b"\x1c", b"\x0b"]
    for seed in range(2000):
        headers = random_headers(random.Random(seed))
        for _ in range(rng.randrange(1, 3)):
            listed = b",".join(
                rng.choice(spaces) + rng.choice(names) + rng.choice(spaces)
                for _ in range(rng.randrange(1, 4))
            )
            headers.insert(
                rng.randrange(len(headers) + 1),
                (rng.choice([b"connection", b"Connection"]), listed),
            )
        for name in names:
            headers.insert(rng.randrange(len(headers) + 1), (name, b"v"))
        assert upstream_request_headers(headers, EXTRA) == old_upstream_request_headers(
            headers, EXTRA
        ), headers
        answer = tuple(headers)
        assert client_response_headers(answer) == old_client_response_headers(answer), headers
