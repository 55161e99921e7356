"""OTLP/HTTP span exports (``POST /v1/traces``): their trace ids, read as MLflow reads them.

MLflow (``mlflow/server/otel_api.py``) takes the experiment from ``X-Mlflow-Experiment-Id`` and
the spans from the body: ``application/x-protobuf`` (what OpenTelemetry exporters send) or OTLP
JSON, after undoing ``Content-Encoding`` gzip or deflate. Every span is appended to the trace of
its trace id, ``tr-`` and the id in hex, wherever that trace lives; so each one is a reference
the caller must be allowed to update when it already exists. The body is decompressed here with
the same cap as any body (``gateway.max_body_size``): a compression bomb is a 413, not a gigabyte
in memory. What is forwarded is the original bytes; this only reads them.

``opentelemetry-proto`` is imported on first use, so the gateway starts without it; an export it
cannot read is refused (``otlp_unsupported``), never forwarded unchecked.
"""

from __future__ import annotations

import base64
import json
import zlib
from collections.abc import Mapping
from typing import Any, Final

from guard.authz.systemtags import TRACE_SYSTEM_TAGS
from guard.edge.requestdata import RequestDataError
from guard.errors import Refusal

PROTOBUF: Final = "application/x-protobuf"
JSON: Final = "application/json"
_HEX_ID_FIELDS: Final = ("traceId", "spanId", "parentSpanId")  # converted as MLflow does
# Span attributes MLflow turns into trace tags (mlflow.traceTag.<key>): MLflow's own trace tags
# may not be set that way (guard/authz/systemtags.py; 3.18 drops them, 3.17.2 applies them).
_SYSTEM_TAG_ATTRIBUTES: Final = frozenset(f"mlflow.traceTag.{key}" for key in TRACE_SYSTEM_TAGS)


def trace_ids(body: bytes, headers: Mapping[str, list[str]], limit: int) -> list[str]:
    """The MLflow trace id of every span in an export, each once; refuses what MLflow might read
    differently (repeated headers) and what cannot be read at all."""
    if not body:
        return []  # MLflow answers "no spans" and stores nothing
    content_type, encoding = _single(headers, "content-type"), _single(headers, "content-encoding")
    media = content_type.split(";")[0].strip() if content_type else None
    if media not in (PROTOBUF, JSON):
        raise _unreadable(f"Content-Type must be {PROTOBUF} or {JSON}.")
    if encoding:
        body = decompress(body, encoding.lower(), limit)
    ids: dict[str, None] = {}
    for resource_spans in _parse(body, media).resource_spans:
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                for attribute in span.attributes:
                    if attribute.key in _SYSTEM_TAG_ATTRIBUTES:
                        raise RequestDataError(
                            Refusal("system_tag_not_allowed", f"{attribute.key} is MLflow's.")
                        )
                if span.trace_id:  # MLflow refuses a span without one
                    ids["tr-" + format(int.from_bytes(span.trace_id, "big"), "032x")] = None
    return list(ids)


def decompress(body: bytes, encoding: str, limit: int) -> bytes:
    """gzip (every member, as ``gzip.decompress``) or deflate (zlib, else raw), producing at
    most ``limit`` bytes."""
    if encoding == "gzip":
        out, rest = b"", body
        while rest:
            member, rest = _inflate(rest, 16 + zlib.MAX_WBITS, limit - len(out))
            out += member
            rest = rest.lstrip(b"\x00")  # gzip.decompress skips padding between members
        return out
    if encoding == "deflate":
        try:
            return _inflate(body, zlib.MAX_WBITS, limit)[0]
        except RequestDataError as exc:
            if exc.refusal.reason != "otlp_unreadable":
                raise
            return _inflate(body, -zlib.MAX_WBITS, limit)[0]
    raise _unreadable(f"Content-Encoding {encoding!r} is not gzip or deflate.")


def _inflate(data: bytes, wbits: int, limit: int) -> tuple[bytes, bytes]:
    """One compressed stream: its content and what follows it."""
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error:
        raise _unreadable("The body cannot be decompressed.") from None
    if len(out) > limit:
        raise RequestDataError(Refusal("body_too_large", "Decompressed, the body is too large."))
    if not inflater.eof:
        raise _unreadable("The compressed body is truncated.")
    return out, inflater.unused_data


def _parse(body: bytes, media: str) -> Any:
    try:
        # protobuf ships no type information: this module is its one adapter
        from google.protobuf import json_format  # type: ignore[import-untyped]
        from google.protobuf.message import DecodeError  # type: ignore[import-untyped]
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )
    except ImportError:
        raise RequestDataError(
            Refusal("otlp_unsupported", "Install opentelemetry-proto to export spans.")
        ) from None
    message = ExportTraceServiceRequest()
    try:
        if media == JSON:
            json_format.Parse(_ids_to_base64(body), message, ignore_unknown_fields=True)
        else:
            message.ParseFromString(body)
    except (DecodeError, json_format.Error, ValueError, TypeError, AttributeError, RecursionError):
        raise _unreadable("The spans cannot be parsed.") from None
    return message


def _ids_to_base64(body: bytes) -> bytes:
    """OTLP JSON writes ids in hex, protobuf JSON in base64: MLflow converts these, and only
    these, before parsing (``_convert_otlp_json_ids_to_base64``)."""
    data = json.loads(body)
    for resource_span in data.get("resourceSpans", []):
        for scope_span in resource_span.get("scopeSpans", []):
            for span in scope_span.get("spans", []):
                for field in _HEX_ID_FIELDS:
                    if hex_value := span.get(field):
                        span[field] = base64.b64encode(bytes.fromhex(hex_value)).decode("ascii")
    return json.dumps(data).encode("utf-8")


def _single(headers: Mapping[str, list[str]], name: str) -> str | None:
    values = headers.get(name, [])
    if len(values) > 1:
        raise RequestDataError(Refusal("ambiguous_parameter", f"The header {name} is repeated."))
    return values[0] if values else None


def _unreadable(detail: str) -> RequestDataError:
    return RequestDataError(Refusal("otlp_unreadable", detail))
