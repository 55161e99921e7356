"""MLflow workspaces: several teams in one MLflow server, each policy resource named per workspace.

With ``upstream.workspaces`` on, MLflow scopes experiments, registered models (and prompts) and
skills to the workspace a request names in ``X-MLflow-Workspace`` (``default`` when it names
none), and answers a lookup of another workspace's id or name with "does not exist". Policies
name such a resource with its workspace before its kind: ``team-a/experiment:fraud/train``,
``team-a/model:churn``, ``team-a/skill:@acme/sql``; ``team-a/*`` is everything in team-a. The
part before the first ``:`` of an unqualified resource never holds a ``/`` and a workspace name
holds neither ``/`` nor ``:``, so no experiment or model name (which may hold both) can be read
as a workspace. ``server:`` and ``guard:`` resources belong to no workspace.

Turning workspaces on must not change what a grant covers behind an operator's back: a policy
with an unqualified grant on a kind that lives in workspaces is a configuration problem then
(``problems``), and ``qualify`` rewrites it into one workspace (``mlflow-guard policy qualify``).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Final

from starlette.types import ASGIApp, Receive, Scope, Send

from guard.authz.policy import Grant, PolicySet
from guard.errors import Refusal, send_refusal
from guard.patterns import (
    SCOPED_KINDS,
    is_pattern,
    resource_kind,
    split_workspace,
    workspace_glob_matches,
)

if TYPE_CHECKING:  # runtime imports the engine, which imports this module
    from guard.authz.routes import Route
    from guard.authz.runtime import PolicyRuntime

HEADER: Final = "x-mlflow-workspace"
_HEADER_BYTES: Final = HEADER.encode()
DEFAULT: Final = "default"
# MLflow's WorkspaceNameValidator (3.17.2 and 3.18.0): Kubernetes-style names.
_NAME: Final = re.compile(r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?")
_RESERVED: Final = frozenset({"workspaces", "api", "ajax-api", "static-files"})
QUALIFY_COMMAND: Final = "mlflow-guard policy qualify --workspace default"


def valid_name(name: str) -> bool:
    """Whether MLflow accepts ``name`` as a workspace (``default`` always)."""
    if name == DEFAULT:
        return True
    return 2 <= len(name) <= 63 and bool(_NAME.fullmatch(name)) and name not in _RESERVED


def qualify(resource: str, workspace: str) -> str:
    """``experiment:x`` in ``workspace`` -> ``WORKSPACE/experiment:x``; what belongs to no
    workspace, or is qualified already, stays as it is."""
    if resource_kind(resource) in SCOPED_KINDS:
        return f"{workspace}/{resource}"
    return resource


def reaches(pattern: str, workspace: str) -> bool:
    """Whether a grant's resource (a name or a glob) can cover something in ``workspace``:
    whether some string beginning ``WORKSPACE/`` matches it."""
    prefix = f"{workspace}/"
    if not is_pattern(pattern):
        return pattern.startswith(prefix)
    glob, _ = split_workspace(pattern)
    if glob is not None:  # its workspace part matches workspace names only (guard.patterns)
        return workspace_glob_matches(glob, workspace)
    # The glob as a set of positions in it, consumed over the prefix; a pattern that outlives
    # the prefix can always be finished (anything may follow it).
    states = _closure(pattern, {0})
    for char in prefix:
        moved = set()
        for i in states:
            if i < len(pattern) and pattern[i] in ("*", "?"):
                moved.add(i if pattern[i] == "*" else i + 1)
            elif i < len(pattern) and pattern[i] == char:
                moved.add(i + 1)
        states = _closure(pattern, moved)
        if not states:
            return False
    return True


def _closure(pattern: str, states: set[int]) -> set[int]:
    """Positions reachable by letting a ``*`` match nothing."""
    found, stack = set(states), list(states)
    while stack:
        i = stack.pop()
        if i < len(pattern) and pattern[i] == "*" and i + 1 not in found:
            found.add(i + 1)
            stack.append(i + 1)
    return found


def unqualified(grant: Grant) -> bool:
    """A grant that, with workspaces on, would silently cover less (or other things) than it
    did: on a kind that lives in workspaces, or on a pattern over kinds, without a workspace."""
    resource = grant.resource
    if resource in ("*", "*:*") or split_workspace(resource)[0] is not None:
        return False  # everything before, everything in every workspace after
    kind = resource_kind(resource)
    return kind in SCOPED_KINDS or kind == "*"


def problems(policy: PolicySet, enabled: bool) -> list[str]:
    """What is wrong with a policy for the gateway's workspace setting: unqualified grants when
    workspaces are on, qualified ones (which could never match) when they are off."""
    found = []
    for grant in sorted(policy.grants):
        row = ", ".join(grant.row()[1:])
        workspace = split_workspace(grant.resource)[0]
        if workspace is not None and not is_pattern(workspace) and not valid_name(workspace):
            found.append(
                f"grant {row}: {workspace!r} is no workspace MLflow accepts (lowercase letters, "
                "digits and inner '-', 2 to 63 characters, not api, ajax-api, workspaces or "
                "static-files)"
            )
        elif enabled and unqualified(grant):
            by_hand = unqualified(Grant(grant.subject, grant.role, f"x/{grant.resource}"))
            found.append(
                f"grant {row}: names no workspace, and upstream.workspaces is on ("
                + (
                    "a glob over kinds: rewrite it by hand as WORKSPACE/KIND:NAME patterns"
                    if by_hand
                    else f"write WORKSPACE/{grant.resource}; `{QUALIFY_COMMAND}` rewrites every "
                    "such grant into the workspace MLflow put existing resources in"
                )
                + ")"
            )
        elif not enabled and workspace is not None:
            found.append(
                f"grant {row}: names a workspace, and upstream.workspaces is off (it could "
                "never match; remove it or turn workspaces on)"
            )
    return found


def qualify_policy(policy: PolicySet, workspace: str) -> PolicySet:
    """Every unqualified allow rewritten into ``workspace`` (``experiment:x`` ->
    ``WORKSPACE/experiment:x``, ``*:x`` -> ``WORKSPACE/*:x``) and every unqualified deny into
    every workspace (``*/experiment:secret*``: a deny that held everywhere still does); the
    rest unchanged, and so is a glob over kinds that no prefix can confine to one workspace
    (``e*``, ``*/fraud*``: ``problems`` still names it, to be rewritten by hand)."""
    grants = set()
    for g in policy.grants:
        if unqualified(g):
            prefix = "*" if g.effect == "deny" else workspace
            rewritten = Grant(g.subject, g.role, f"{prefix}/{g.resource}", g.effect)
            grants.add(rewritten if not unqualified(rewritten) else g)
        else:
            grants.add(g)
    return PolicySet(frozenset(grants), policy.memberships, policy.roles)


class WorkspaceMiddleware:
    """The request's MLflow workspace (with ``upstream.workspaces`` on): ``X-MLflow-Workspace``
    as MLflow reads it (blanks stripped; none or empty: ``default``), refused when MLflow would
    refuse the name (400 ``workspace_invalid``) or when the caller is no member of it (403
    ``workspace_forbidden``: the same whether it exists or not; MLflow is not asked), however
    it is named; only routes outside every workspace (``_outside_workspaces``) asked without a
    header need no membership of ``default``. Sets ``scope["guard.workspace"]``, which
    authorization decides in and the proxy forwards; the caller's own header never reaches
    MLflow."""

    def __init__(self, app: ASGIApp, *, policies: PolicyRuntime) -> None:
        self.app = app
        self.policies = policies

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # A repeated header was refused at the edge (guard.edge.headers: every X-MLflow-*).
        sent = next((v for k, v in scope["headers"] if k.lower() == _HEADER_BYTES), b"")
        name = sent.decode("latin-1").strip() or DEFAULT  # as MLflow: blank is none
        if not valid_name(name):
            await send_refusal(scope, send, Refusal("workspace_invalid"))
            return
        route = scope.get("guard.route")
        if (name != DEFAULT or not _outside_workspaces(route)) and not await self._member(
            scope, name
        ):
            subject = scope["guard"].principal.subject
            scope["guard"].resources = [f"workspace:{name}"]  # for the audit record
            refusal = Refusal("workspace_forbidden", f"{subject} may not use workspace {name!r}.")
            await send_refusal(scope, send, refusal)
            return
        scope["guard.workspace"] = name
        await self.app(scope, receive, send)

    async def _member(self, scope: Scope, name: str) -> bool:
        """Membership on the policy in force, or on a newer one stored a moment ago (as every
        refusal is decided; guard.authz.authorization)."""
        subject = scope["guard"].principal.subject
        if self.policies.index.member_of(subject, name):
            return True
        started = scope["guard"].started
        if await self.policies.refresh_soon(started, subject):
            return self.policies.index.member_of(subject, name)
        return False


def _outside_workspaces(route: Route | None) -> bool:
    """A route that reads nothing any workspace holds (the UI's files, server info, the list of
    workspaces, which answers with the caller's own): asked without naming a workspace, it needs
    no membership of ``default``. Anything else does, however the workspace is named."""
    return route is not None and (
        route.kind == "workspace" or (route.open and route.kind == "server")
    )
