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


# What lives in an MLflow workspace, by policy kind (guard/authz/workspaces.py).
SCOPED_KINDS: Final = ("experiment", "model", "skill")
# The workspace part of a qualified resource or pattern: a workspace name, or a glob of names.
_WORKSPACE: Final = re.compile(r"[a-z0-9*?-]+")


def split_workspace(resource: str) -> tuple[str | None, str]:
    """(workspace or workspace glob, the rest) of a resource or pattern qualified with an MLflow
    workspace: ``team-a/experiment:x`` -> ("team-a", "experiment:x"), ``team-a/*`` ->
    ("team-a", "*"), ``*-prod/model:*`` -> ("*-prod", "model:*"); (None, resource) otherwise
    (the part after the workspace is a kind that lives in workspaces, or ``*``).
    The workspace comes before the first ``:`` and holds neither ``/`` nor ``:``."""
    head, sep, _ = resource.partition(":")
    workspace, slash, kind = head.partition("/")
    if not slash or not _WORKSPACE.fullmatch(workspace):
        return None, resource
    if (sep and kind in SCOPED_KINDS) or kind == "*":
        return workspace, resource[len(workspace) + 1 :]
    return None, resource  # e.g. */fraud*: a glob over unqualified names, as it always was


def _glob(pattern: str, star: str, one: str) -> str:
    parts = []
    for char in pattern:
        parts.append(star if char == "*" else one if char == "?" else re.escape(char))
    return "".join(parts)


@lru_cache(maxsize=65536)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """``*`` any run of characters, ``?`` one; in the workspace part of a qualified pattern they
    match within a workspace name only (``*-prod/*`` is every workspace ending in -prod, never
    an experiment whose name holds ``-prod/``)."""
    workspace, rest = split_workspace(pattern)
    if workspace is None:
        return re.compile(_glob(pattern, ".*", "."), re.DOTALL)
    head = _glob(workspace, "[^/:]*", "[^/:]")
    return re.compile(f"{head}/{_glob(rest, '.*', '.')}", re.DOTALL)


def workspace_glob_matches(glob: str, workspace: str) -> bool:
    """Whether the workspace part of a qualified pattern names ``workspace``."""
    return re.fullmatch(_glob(glob, "[^/:]*", "[^/:]"), workspace) is not None


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
