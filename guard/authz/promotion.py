"""Promotion control: what turns an ordinary registry write into a ``promote``.

Setting or deleting a protected alias and writing or deleting a validation tag (on a model
version or a registered model) need ``promote`` instead of ``update``: they are the promoter's
job. Creating a version or a model with a validation tag, and deleting a version that holds an
alias, need ``promote`` as well as the row's own action. Renaming a model or an experiment
needs ``delete`` on the old name and ``create`` on the new one. Stage transitions are
``promote`` in the route table itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from guard.edge.requestdata import RequestData, RequestDataError
from guard.errors import Refusal
from guard.patterns import resource_match

_ALIAS: Final = ("/registered-models/alias",)
_TAGS: Final = (
    "/model-versions/set-tag",
    "/model-versions/delete-tag",
    "/registered-models/set-tag",
    "/registered-models/delete-tag",
)
_CREATE_VERSION: Final = ("/model-versions/create", "/registered-models/create")
_DELETE_VERSION: Final = ("/model-versions/delete",)
_RENAME: Final = ("/registered-models/rename",)
_RENAME_EXPERIMENT: Final = ("/experiments/update",)  # its only change is a new name
APPLIES: Final = _ALIAS + _TAGS + _CREATE_VERSION + _DELETE_VERSION + _RENAME + _RENAME_EXPERIMENT


@dataclass
class Requirements:
    """Actions needed on the request's own resources beyond the row's, and on other ones."""

    actions: set[str] = field(default_factory=set)
    replace_action: str | None = None  # instead of the row's action (rename: delete)
    elsewhere: list[tuple[str, str]] = field(default_factory=list)  # (resource, action)
    version_aliases: tuple[str, str] | None = None  # (name, version) to look up
    skill_version: tuple[str, str] | None = None  # (skill resource, version) to look up


@dataclass(frozen=True)
class PromotionRules:
    protected_aliases: tuple[str, ...]
    validation_tags: tuple[str, ...]

    def applies(self, path: str) -> bool:
        return path.endswith(APPLIES)

    def requirements(self, path: str, data: RequestData) -> Requirements:
        needs = Requirements()
        if path.endswith(_ALIAS):
            alias = data.single("alias")
            if alias is None or self._matches(str(alias), self.protected_aliases):
                needs.replace_action = "promote"  # the promoter's job; update does not suffice
        elif path.endswith(_TAGS):
            key = data.single("key")
            if key is None or self._matches(str(key), self.validation_tags):
                needs.replace_action = "promote"
        elif path.endswith(_CREATE_VERSION):
            for tag in data.values("tags"):
                key = tag.get("key") if isinstance(tag, dict) else None
                if not isinstance(key, str) or self._matches(key, self.validation_tags):
                    needs.actions.add("promote")
        elif path.endswith(_DELETE_VERSION):
            name, version = data.single("name"), data.single("version")
            if not isinstance(name, str) or not isinstance(version, str | int):
                raise RequestDataError(Refusal("invalid_request_body", "Name the version."))
            needs.version_aliases = (name, str(version))
        elif path.endswith(_RENAME):
            new_name = data.single("new_name")
            if not isinstance(new_name, str) or not new_name:
                raise RequestDataError(Refusal("invalid_request_body", "Name the new model."))
            needs.replace_action = "delete"
            needs.elsewhere.append((f"model:{new_name}", "create"))
        elif path.endswith(_RENAME_EXPERIMENT):
            # Like a model: a rename moves the experiment out of the grants on its old name and
            # under those on the new one, so it needs delete there and create here.
            new_name = data.single("new_name")
            if not isinstance(new_name, str) or not new_name:
                raise RequestDataError(Refusal("invalid_request_body", "Name the experiment."))
            needs.replace_action = "delete"
            needs.elsewhere.append((f"experiment:{new_name}", "create"))
        return needs

    def protects_alias(self, alias: str) -> bool:
        """Whether setting or deleting ``alias`` is the promoter's job (skills use it too)."""
        return self._matches(alias, self.protected_aliases)

    @staticmethod
    def _matches(value: str, patterns: tuple[str, ...]) -> bool:
        return any(resource_match(value, pattern) for pattern in patterns)
