"""Skills (MLflow 3.18's registry) as policy resources: ``skill:NAME`` and ``skill:@ORG/NAME``.

MLflow names a skill by an organization (possibly empty) and a name, and its own basic-auth
keys grants by ``name`` or ``@org/name``; the gateway's resources are the same identities behind
``skill:``. MLflow accepts only ``[a-z0-9]`` words joined by ``-`` as names and by ``-`` or ``.``
as organizations, so neither holds ``@``, ``/``, a capital or a wildcard: one spelling per skill,
no case folding to look up, and ``skill:foo`` never names anything of ``@acme``. A name MLflow
would refuse is refused here too (as unresolved, so it looks like any forbidden skill).
"""

from __future__ import annotations

import re
from typing import Any, Final

from guard.authz.identifiers import Unresolved, describe, field_values
from guard.authz.routes import Route
from guard.edge.requestdata import RequestData, RequestDataError, member
from guard.errors import Refusal

# mlflow/utils/validation.py (_SKILL_NAME_REGEX, _ORGANIZATION_NAME_REGEX, 64 characters each)
NAME: Final = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
ORGANIZATION: Final = re.compile(r"[a-z0-9]+(?:[-.][a-z0-9]+)*")
MAX_LENGTH: Final = 64
# Routes that register versions, creating the skill when it does not exist yet.
REGISTERS: Final = ("/versions", "/bulk-register")
_ALIASES: Final = ("/aliases", "/aliases/{alias}")


def skill_resource(organization: Any, name: Any) -> str:
    """``skill:NAME`` or ``skill:@ORG/NAME``; Unresolved for what MLflow would not accept."""
    if not (
        isinstance(name, str) and isinstance(organization, str)
        and len(name) <= MAX_LENGTH and NAME.fullmatch(name)
        and (organization == "" or (len(organization) <= MAX_LENGTH
                                    and ORGANIZATION.fullmatch(organization)))
    ):  # fmt: skip
        raise Unresolved(Refusal("resource_unresolved", "Not a skill MLflow could hold."))
    return f"skill:@{organization}/{name}" if organization else f"skill:{name}"


def identity(item: Any) -> str | None:
    """The resource of a skill in a search answer (its ``name`` and ``organization``)."""
    if not isinstance(item, dict):
        return None
    name, organization = item.get("name"), item.get("organization") or ""
    try:
        return skill_resource(organization, name)
    except Unresolved:
        return None


def requested(route: Route, params: dict[str, str], data: RequestData) -> list[str]:
    """The skills a request names: in the path, or in the body of a create or bulk register."""
    if route.id_from.startswith("path:"):
        return [skill_resource(params.get("organization", ""), params["name"])]
    organization = _string(data, "organization") or ""
    if route.id_from == "body:name":
        name = _string(data, "name")
        if name is None:
            raise RequestDataError(Refusal("invalid_request_body", "The request names no skill."))
        return [skill_resource(organization, name)]
    entries = field_values("body", ["skills"], True, params, data)
    if not entries:
        raise RequestDataError(Refusal("invalid_request_body", "The request names no skills."))
    names = [entry.get("name") if isinstance(entry, dict) else None for entry in entries]
    if not all(isinstance(name, str) for name in names):
        raise RequestDataError(Refusal("invalid_request_body", "Every skill needs a name."))
    return list(dict.fromkeys(skill_resource(organization, str(name)) for name in names))


def _string(data: RequestData, field: str) -> str | None:
    """A string field of the JSON body as MLflow's model reads it: anything but a string (a
    list, whose first element the gateway would otherwise read) is refused."""
    body = data.body if not data.from_query else None
    value = member(body, field) if isinstance(body, dict) else None
    if value is not None and not isinstance(value, str):
        raise RequestDataError(Refusal("invalid_request_body", f"{field} must be a string."))
    return value


def label(route: Route, params: dict[str, str], data: RequestData) -> str:
    """What the request names, in the caller's words, for a refusal: ``skill '@acme/foo'``."""
    try:
        names = [r.removeprefix("skill:") for r in requested(route, params, data)]
    except (Unresolved, RequestDataError):
        if "name" in params:
            organization = params.get("organization")
            return describe("skill", [f"@{organization}/{params['name']}" if organization
                                      else params["name"]])  # fmt: skip
        return "what this request names"
    return describe("skill", names)


def registers(route: Route) -> bool:
    """A version registration: update where the skill exists, create where it does not."""
    return route.kind == "skill" and route.method == "POST" and route.path.endswith(REGISTERS)


def body_unread(route: Route) -> bool:
    """A skill route whose body names nothing the gateway decides on (the skill is in the path):
    every one but setting an alias and PATCHing a version. Registering a version may send its
    content as multipart, which is no JSON to read."""
    if route.kind != "skill" or not route.id_from.startswith("path:"):
        return False
    return not (
        (route.method == "POST" and route.path.endswith("/aliases"))
        or (route.method == "PATCH" and route.path.endswith("/versions/{version}"))
    )


def is_alias_write(route: Route) -> bool:
    return route.kind == "skill" and route.method != "GET" and route.path.endswith(_ALIASES)


def alias(route: Route, params: dict[str, str], data: RequestData) -> Any:
    """The alias a skill alias write names: in the path (delete) or the body (set)."""
    return params["alias"] if "alias" in params else data.single("alias")


def deletes_version(route: Route, data: RequestData) -> bool:
    """PATCH of a version to ``status: deleted``, which MLflow treats as deleting it."""
    if route.kind != "skill" or route.method != "PATCH":
        return False
    status = data.single("status")
    return route.path.endswith("/versions/{version}") and str(status).lower() == "deleted"


def artifact_skill(path: str) -> str:
    """The skill a proxied artifact path under ``skills/`` belongs to, as MLflow's
    ``parse_skill_upload_path`` reads it: ``skills/[@ORG/]NAME[/<token>/...]``. The namespace
    roots ``skills`` and ``skills/@ORG`` name no skill: only callers allowed every skill reach
    them (MLflow keeps them to administrators)."""
    parts = path.rstrip("/").split("/")
    if parts[0] != "skills":
        raise Unresolved(Refusal("resource_unresolved", "Not a skill's artifact path."))
    organization, rest = "", parts[1:]
    if rest and rest[0].startswith("@"):
        organization, rest = rest[0][1:], rest[1:]
        if not organization:
            raise Unresolved(Refusal("resource_unresolved", "The path names no organization."))
    if not rest:
        raise Unresolved(Refusal("resource_unresolved", "The path names no skill."))
    return skill_resource(organization, rest[0])
