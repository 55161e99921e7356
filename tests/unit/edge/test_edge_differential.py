"""The edge layers' fast paths against their former, plain implementations (kept here as the
reference), over many generated header lists: upper case, underscores, repeated names,
framing headers, latin-1 bytes outside ASCII (which ``str.lower`` changes and ``bytes.lower``
does not), long names, and more distinct names than any memo keeps."""

from __future__ import annotations

import random

import pytest

from guard.edge.artifactpaths import _SCHEME, _decoded_by_mlflow, validate_artifact_path
from guard.edge.bodies import body_refusal, check_framing
from guard.edge.headers import (
    CSP,
    OWNED,
    SINGLE_VALUED,
    SINGLE_VALUED_PREFIX,
    NameMemo,
    SecurityHeadersMiddleware,
    first_repeated,
    merge_policies,
    singular_name,
)
from guard.edge.hosts import AllowedHostsMiddleware, parse_host_pattern, validate_host
from guard.errors import Refusal

Headers = list[tuple[bytes, bytes]]

NAMES = [
    "Host", "Authorization", "Content-Type", "Content-Encoding", "Origin", "User-Agent",
    "X-Request-Id", "Range", "If-Range", "If-Modified-Since", "If-Unmodified-Since",
    "Access-Control-Request-Method", "X-MLflow-Client-Version", "X-MLflow-Workspace",
    "Accept", "Accept-Encoding", "Connection", "Content-Length", "Transfer-Encoding", "Cookie",
    "Keep-Alive", "TE", "Trailer", "Upgrade", "Set-Cookie", "Date", "Server",
    "WWW-Authenticate", "Access-Control-Allow-Origin", "X-Content-Type-Options",
    "X-Frame-Options", "Referrer-Policy", "Strict-Transport-Security",
    "Cross-Origin-Opener-Policy", "X-XSS-Protection", "Content-Security-Policy", "Vary",
    "If-None-Match", "If-Match", "X-MLflow-Run-Id", "X-MLflow-Experiment-Id", "Expect",
]  # fmt: skip
ODD = [b"\xc0", b"\xe0", b"\xa0", b"\x85", b"\x1c", b"\xb5", b"\xff", b"\xdf", b" ", b"\t", b"_"]


def spell(rng: random.Random, name: str) -> bytes:
    """One spelling of a name: any case, dashes or underscores, sometimes an odd byte."""
    chars = [c.upper() if rng.random() < 0.3 else c.lower() for c in name]
    text = "".join(chars)
    if rng.random() < 0.2:
        text = text.replace("-", "_")
    raw = text.encode("latin-1")
    if rng.random() < 0.1:
        at = rng.randrange(len(raw) + 1)
        raw = raw[:at] + rng.choice(ODD) + raw[at:]
    if rng.random() < 0.03:
        raw = raw + b"-" + b"x" * rng.randrange(60, 200)  # past the memo's name length
    return raw


def random_name(rng: random.Random) -> bytes:
    roll = rng.random()
    if roll < 0.7:
        return spell(rng, rng.choice(NAMES))
    if roll < 0.85:
        return spell(rng, f"X-MLflow-{rng.randrange(5000)}")  # many distinct singular names
    return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 12)))


def random_value(rng: random.Random, names: list[bytes]) -> bytes:
    roll = rng.random()
    if roll < 0.4 and names:  # a Connection-style list naming headers
        picks = [
            rng.choice([b"", b" ", b"\t", b"\xa0", b"\x85"])
            + rng.choice(names)
            + rng.choice([b"", b" ", b"\xa0"])
            for _ in range(rng.randrange(1, 4))
        ]
        return b",".join(picks)
    if roll < 0.6:
        return rng.choice([b"0", b"12", b" 12 ", b"chunked", b"Chunked ", b"gzip, chunked", b"x"])
    return bytes(rng.randrange(256) for _ in range(rng.randrange(0, 10)))


def random_headers(rng: random.Random) -> Headers:
    headers: Headers = []
    for _ in range(rng.randrange(0, 12)):
        again = headers and rng.random() < 0.2  # the very same spelling again
        name = rng.choice(headers)[0] if again else random_name(rng)
        headers.append((name, random_value(rng, [n for n, _ in headers] + [name])))
    return headers


CASES = [random_headers(random.Random(seed)) for seed in range(3000)]


# The former implementations.


def old_first_repeated(headers: Headers) -> str | None:
    seen: set[str] = set()
    for key, _ in headers:
        name = key.decode("latin-1").lower().replace("_", "-")
        if name not in SINGLE_VALUED and not name.startswith(SINGLE_VALUED_PREFIX):
            continue
        if name in seen:
            return name
        seen.add(name)
    return None


def old_secure(
    headers: Headers, own: Headers, csp: bytes, hsts: tuple[bytes, bytes], tls: bool
) -> Headers:
    kept, inner = [], []
    for key, value in headers:
        name = key.lower()
        if name == CSP:
            inner.append(value)
        elif name not in OWNED:
            kept.append((key, value))
    kept.extend(own)
    if inner:
        kept.extend((CSP, policy) for policy in merge_policies(csp, inner))
    else:
        kept.append((CSP, csp))
    if tls:
        kept.append(hsts)
    return kept


def old_check_framing(headers: Headers) -> tuple[Refusal | None, int | None, bool]:
    lengths = {v.strip() for k, v in headers if k == b"content-length"}
    encodings = [v.strip().lower() for k, v in headers if k == b"transfer-encoding"]
    if encodings and (lengths or encodings != [b"chunked"]):
        return Refusal("invalid_body_framing"), None, False
    if len(lengths) > 1:
        return Refusal("invalid_body_framing"), None, False
    if lengths:
        (text,) = lengths
        if not text.isdigit():
            return Refusal("invalid_body_framing"), None, False
        return None, int(text), False
    return None, None, bool(encodings)


def test_first_repeated_matches_the_former_loop() -> None:
    memo = NameMemo(singular_name, size=64)  # small: most names are classified afresh
    fresh = NameMemo(singular_name)
    for headers in CASES:
        expected = old_first_repeated(headers)
        assert first_repeated(headers, memo) == expected, headers
        assert first_repeated(headers, fresh) == expected, headers
    assert 0 < len(memo) <= 64  # bounded: full, it starts over


def test_a_full_memo_starts_over_so_invented_names_cannot_keep_the_usual_ones_out() -> None:
    memo = NameMemo(singular_name, size=8)
    for number in range(100):
        assert memo[f"x-invented-{number}".encode()] is None
    assert len(memo) <= 8
    assert memo[b"authorization"] == "authorization"
    assert b"authorization" in memo  # remembered again after the flood


def test_repeated_names_are_found_in_every_spelling() -> None:
    memo = NameMemo(singular_name)
    for name in [*sorted(SINGLE_VALUED), "x-mlflow-anything"]:
        for a, b in [(name, name.upper()), (name, name.replace("-", "_")), (name.title(), name)]:
            headers = [(a.encode(), b"1"), (b"accept", b"*/*"), (b.encode(), b"2")]
            assert first_repeated(headers, memo) == name
    # Latin-1 letters compare as text: \xc0 and \xe0 are one letter in two cases.
    headers = [(b"X-MLflow-\xc0", b"1"), (b"x-mlflow-\xe0", b"2")]
    assert first_repeated(headers, memo) == old_first_repeated(headers) == "x-mlflow-\xe0"


def test_name_memo_is_bounded() -> None:
    memo = NameMemo(singular_name, size=10)
    for i in range(100):
        assert memo[f"X-MLflow-{i}".encode()] == f"x-mlflow-{i}"
    assert memo[b"x-mlflow-" + b"y" * 100] == "x-mlflow-" + "y" * 100
    assert len(memo) == 10
    memo = NameMemo(singular_name)
    memo[b"x-mlflow-" + b"y" * 100]
    assert len(memo) == 0  # long names are never kept


@pytest.mark.parametrize("tls", [False, True])
@pytest.mark.parametrize("frame_ancestors", ["'self'", "'none'", "https://a.example"])
def test_security_headers_match_the_former_loop(tls: bool, frame_ancestors: str) -> None:
    layer = SecurityHeadersMiddleware(
        None,  # type: ignore[arg-type]
        frame_ancestors=frame_ancestors,
        hsts_max_age=600,
    )
    own = layer.own_tls if tls else layer.own
    rng = random.Random(7)
    policies = [b"sandbox", b"default-src 'none'; frame-ancestors *", b"", b"; ;", b"SANDBOX a"]
    for headers in CASES[:1000]:
        headers = list(headers)
        for _ in range(rng.randrange(0, 3)):
            name = rng.choice([CSP, b"Content-Security-Policy", b"CONTENT-SECURITY-POLICY"])
            headers.insert(rng.randrange(len(headers) + 1), (name, rng.choice(policies)))
        expected = old_secure(headers, layer.headers, layer.csp, layer.hsts, tls)
        assert layer._replace(headers, own) == expected, headers
        assert layer._replace(tuple(headers), own) == expected  # any iterable of pairs
        as_lists = [[key, value] for key, value in headers]  # pairs of any kind become tuples
        assert layer._replace(as_lists, own) == expected  # type: ignore[arg-type]


def test_check_framing_matches_the_former_function() -> None:
    rng = random.Random(11)
    spellings = [b"content-length", b"transfer-encoding", b"Content-Length", b"content_length"]
    values = [b"0", b"12", b" 12", b"12 ", b"-1", b"+1", b"1_0", b"\xb2", b"chunked", b"CHUNKED",
              b" chunked ", b"gzip", b"", b"00"]  # fmt: skip
    for headers in CASES:
        headers = list(headers)
        for _ in range(rng.randrange(0, 4)):
            item = (rng.choice(spellings), rng.choice(values))
            headers.insert(rng.randrange(len(headers) + 1), item)
        assert check_framing(headers) == old_check_framing(headers), headers


@pytest.mark.parametrize("method", ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
@pytest.mark.parametrize("query", [b"", b"a=1"])
@pytest.mark.parametrize("get_body", [False, True])
def test_body_refusal_is_the_former_value(method: str, query: bytes, get_body: bool) -> None:
    class Route:
        body = "buffer"
        id_lists = ("query", ())

        def __init__(self) -> None:
            self.get_body = get_body

    expected = None
    if method == "HEAD":
        expected = Refusal("body_not_allowed", "A HEAD request carries no body.")
    elif method == "GET" and query:
        expected = Refusal("body_not_allowed", "A GET with a query string carries no body.")
    elif method == "GET" and not get_body:
        expected = Refusal("body_not_allowed", "A GET on this route carries no body.")
    assert body_refusal(method, query, Route()) == expected


def test_host_verdicts_match_validate_host() -> None:
    allowed = ("localhost", "127.0.0.1", "[::1]", "*.example.com", "ml.example.org:8443")
    layer = AllowedHostsMiddleware(None, allowed_hosts=allowed)  # type: ignore[arg-type]
    patterns = tuple(parse_host_pattern(p) for p in allowed)
    rng = random.Random(3)
    pieces = ["localhost", "LOCALHOST", "127.0.0.1", "[::1]", "[::1", "a.example.com",
              "example.com", "x.y.EXAMPLE.com", "ml.example.org", "-a.example.com",
              "a.example.com.", "evil.com", "", " ", "\xe0.example.com",
              "localhost\x00"]  # fmt: skip
    ports = ["", ":80", ":443", ":8443", ":0", ":65536", ":", ":08443", ": 80", ":+80", ":٣"]
    for _ in range(3000):
        value: str | None = rng.choice(pieces) + rng.choice(ports)
        if rng.random() < 0.05:
            value = None
        elif rng.random() < 0.1:
            value = f"h{rng.randrange(10**6)}.example.com"  # more hosts than are remembered
        scheme = rng.choice(["http", "https", "ftp"])
        expected = validate_host(value, scheme, patterns)
        assert layer.verdicts[value, scheme] == expected, (value, scheme)
        assert layer.verdicts[value, scheme] == expected, (value, scheme)  # remembered
    assert len(layer.verdicts) <= 256


def old_validate_artifact_path(path: str) -> str | None:
    forbidden = frozenset("#?\\\x7f") | frozenset(chr(c) for c in range(0x20))
    if any(c in forbidden for c in path):
        return "It holds '#', '?', a backslash or a control character."
    try:
        if _decoded_by_mlflow(path) != path:
            return "It is still percent-encoded, or not a plain path."
    except ValueError:
        return "It is not a plain path."
    if path.startswith("/") or _SCHEME.match(path):
        return "It must be relative, without a scheme or drive."
    segments = path.split("/")
    if segments[-1] == "":
        segments.pop()
    if any(segment in ("", ".", "..") for segment in segments):
        return "It holds an empty, '.' or '..' segment."
    return None


def test_artifact_paths_are_judged_as_before() -> None:
    rng = random.Random(17)
    pieces = ["a", "b/", "/", ".", "..", "%2e", "%25", "%2F", "#", "?", "\\", "\x00", "\x1f",
              "\x7f", "\x80", "\xe9", "\u2028", "C:", "s3:", "//[x", "skills", " ", "\t",
              ";"]  # fmt: skip
    for _ in range(20000):
        path = "".join(rng.choice(pieces) for _ in range(rng.randrange(0, 6)))
        assert validate_artifact_path(path) == old_validate_artifact_path(path), repr(path)
    for code in range(0x3000):
        assert validate_artifact_path(chr(code)) == old_validate_artifact_path(chr(code))
