"""Resource patterns: the gateway's glob, shared by the policy engine (which decides with it)
and the audit trail (which filters records with it and decides nothing).

A neutral module so that neither has to import the other: it imports nothing from the gateway.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Final


def resource_kind(resource: str) -> str:
    """The kind a resource or pattern names (``experiment:x`` -> ``experiment``), else ``*``."""
    kind, sep, _ = resource.partition(":")
    if not sep or "*" in kind or "?" in kind:
        return "*"
    return kind


# Kinds that wildcard patterns (``*``, ``*:*``) never reach; see resource_match.
SEALED_KINDS: Final = ("guard",)


def is_pattern(resource: str) -> bool:
    return "*" in resource or "?" in resource


@lru_cache(maxsize=65536)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    parts = []
    for char in pattern:
        parts.append(".*" if char == "*" else "." if char == "?" else re.escape(char))
    return re.compile("".join(parts), re.DOTALL)


def resource_match(resource: str, pattern: str) -> bool:
    """The gateway's glob: ``*`` matches any run of characters (``/`` too), ``?`` one. The
    gateway's own resources (``guard:policy``, ``guard:audit``) match only patterns that name
    their kind: a grant on ``*`` covers MLflow, not who may change or read the policy."""
    if not is_pattern(pattern):
        return resource == pattern
    kind = resource_kind(resource)
    if kind in SEALED_KINDS and resource_kind(pattern) != kind:
        return False
    return compile_pattern(pattern).fullmatch(resource) is not None
