"""The one place that touches casbin (untyped): the model, an in-memory enforcer, the adapter.

The gateway decides with its own index (``guard.authz.engine``); casbin is the reference it is
tested against and the format policies are stored and exchanged in.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import casbin
from casbin_sqlalchemy_adapter import Adapter
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped

from guard.authz.policy import PolicySet
from guard.patterns import resource_match
from guard.store.db import casbin_rules


def model_text() -> str:
    return resources.files("policies").joinpath("model.conf").read_text()


def default_policy_text() -> str:
    return resources.files("policies").joinpath("default.csv").read_text()


class _Base(DeclarativeBase):
    pass


class GuardCasbinRule(_Base):
    """casbin's rule layout (ptype, v0..v5), in the gateway's own table."""

    __table__ = casbin_rules
    id: Mapped[int]
    ptype: Mapped[str]
    v0: Mapped[str | None]
    v1: Mapped[str | None]
    v2: Mapped[str | None]
    v3: Mapped[str | None]
    v4: Mapped[str | None]
    v5: Mapped[str | None]

    def __str__(self) -> str:  # the line format casbin's loader parses
        values = [self.ptype]
        for value in (self.v0, self.v1, self.v2, self.v3, self.v4, self.v5):
            if value is None:
                break
            values.append(value)
        return ", ".join(values)


def build_enforcer(policy: PolicySet) -> Any:
    """A casbin enforcer holding ``policy`` in memory (casbin's logging stays off)."""
    enforcer = casbin.Enforcer(casbin.Enforcer.new_model(text=model_text()))
    enforcer.add_function("resourceMatch", resource_match)
    _fill(enforcer, policy)
    return enforcer


def _fill(enforcer: Any, policy: PolicySet) -> None:
    grants = [list(g.row()[1:]) for g in sorted(policy.grants)]
    members = [list(m.row()[1:]) for m in sorted(policy.memberships)]
    roles = [list(r.row()[1:]) for r in sorted(policy.roles)]
    if roles:
        enforcer.add_named_grouping_policies("g2", roles)
    if members:
        enforcer.add_named_grouping_policies("g", members)
    if grants:
        enforcer.add_named_policies("p", grants)


def casbin_decide(
    enforcer: Any, subject: str, resource: str, action: str
) -> tuple[bool, list[str]]:
    """casbin's own answer and the rule it names."""
    allowed, explain = enforcer.enforce_ex(subject, resource, action)
    return bool(allowed), list(explain)


def load_rows(engine: Engine) -> list[tuple[str, ...]]:
    """Read the stored policy through casbin's SQLAlchemy adapter, as casbin rows."""
    adapter = Adapter(engine, db_class=GuardCasbinRule, create_all_models=False)
    enforcer = casbin.Enforcer(casbin.Enforcer.new_model(text=model_text()), adapter)
    rows: list[tuple[str, ...]] = []
    for ptype in ("g2", "g"):
        rows += [(ptype, *r) for r in enforcer.get_named_grouping_policy(ptype)]
    rows += [("p", *r) for r in enforcer.get_named_policy("p")]
    return rows
