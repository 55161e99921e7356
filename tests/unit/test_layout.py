"""The package's shape, enforced: which part of ``guard`` may import which (one table, read from
the modules' own import statements), and the rules the packages' docstrings promise.

A request passes edge -> identity -> authz -> upstream; audit records what happened, admin and
the CLI manage the gateway, ``guard.app`` assembles everything. An arrow missing from ALLOWED
fails here with the file and line that draws it: add it to the table only if the docstring of
the importing package says it may.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
GUARD = ROOT / "guard"

# Each part of the gateway (a package, or a top-level module) and what it may import besides
# itself and the standard or third-party libraries. An entry names a part, or one module of a
# part when only that module may be used (``guard.identity.base``).
# fmt: off
ALLOWED: dict[str, frozenset[str]] = {
    # Top-level modules that span everything, lowest first.
    "guard.errors": frozenset(),
    "guard.patterns": frozenset(),
    "guard.keys": frozenset(),
    "guard.settings": frozenset({"guard.edge"}),  # validators reuse the edge's parsers
    "guard.config": frozenset({"guard.settings"}),
    # Packages, in the order a request passes them.
    "guard.store": frozenset(),
    "guard.edge": frozenset({"guard.errors"}),
    "guard.identity": frozenset({"guard.errors", "guard.edge", "guard.store"}),
    "guard.authz": frozenset({
        "guard.errors", "guard.patterns", "guard.edge", "guard.upstream", "guard.store",
    }),
    "guard.upstream": frozenset({"guard.errors", "guard.edge"}),
    "guard.audit": frozenset({
        "guard.errors", "guard.patterns", "guard.settings", "guard.edge", "guard.identity.base",
        "guard.store",
    }),
    "guard.admin": frozenset({
        "guard.errors", "guard.patterns", "guard.edge", "guard.identity", "guard.authz",
        "guard.upstream", "guard.audit", "guard.store",
    }),
    "guard.metrics": frozenset({"guard.edge", "guard.audit"}),
    "guard.app": frozenset({
        "guard.errors", "guard.keys", "guard.settings", "guard.metrics", "guard.store",
        "guard.edge", "guard.identity", "guard.authz", "guard.upstream", "guard.audit",
        "guard.admin", "server",
    }),
    "guard.cli": frozenset({
        "guard.keys", "guard.settings", "guard.config", "guard.store", "guard.identity",
        "guard.authz", "guard.audit", "guard.admin", "guard.app",
    }),
    "guard": frozenset({"guard.cli"}),  # guard/__main__.py
}
# fmt: on
# Arrows allowed only for type checking (inside ``if TYPE_CHECKING:``): the request context
# carries the principal identity fills in, without the edge depending on identity.
TYPE_ONLY: frozenset[tuple[str, str]] = frozenset({("guard.edge", "guard.identity.base")})
TOP_LEVEL_LIMIT = 8  # modules directly in guard/ besides __init__.py, __main__.py and packages


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """The part (a key of ALLOWED) a module belongs to."""
    names = module.split(".")
    if names[0] != "guard":
        return names[0]
    return "guard" if len(names) == 1 or names[1] == "__main__" else ".".join(names[:2])


def is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports(path: Path) -> list[tuple[int, str, bool]]:
    """(line, imported module, under TYPE_CHECKING) for every import of guard or server."""
    tree = ast.parse(path.read_text(), str(path))
    typing_only: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            typing_only |= {id(child) for child in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}:{node.lineno}: relative import"
            # ``from guard.authz import systemtags`` imports the module guard.authz.systemtags
            names = [
                f"{node.module}.{a.name}" if is_module(f"{node.module}.{a.name}") else node.module
                for a in node.names
            ]
        for name in names:
            if name.split(".")[0] in ("guard", "server"):
                found.append((node.lineno, name, id(node) in typing_only))
    return found


def allowed(source: str, target: str, typing_only: bool) -> bool:
    if part_of(target) == source:
        return True
    entries = ALLOWED[source] | {t for s, t in TYPE_ONLY if s == source and typing_only}
    return any(target == entry or target.startswith(entry + ".") for entry in entries)


SOURCES = sorted(GUARD.rglob("*.py"))


def test_every_part_is_in_the_table() -> None:
    parts = {part_of(module_name(path)) for path in SOURCES}
    assert parts == set(ALLOWED) - {"server"}, "add the new part to ALLOWED (and say why)"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_follow_the_table(path: Path) -> None:
    source = part_of(module_name(path))
    wrong = [
        f"{path.relative_to(ROOT)}:{line}: {source} may not import {target}"
        for line, target, typing_only in imports(path)
        if not allowed(source, target, typing_only)
    ]
    assert not wrong, "\n".join(wrong)


def test_the_table_catches_an_upward_arrow(tmp_path: Path) -> None:
    """The check itself: an upstream module importing authz, and the edge naming identity's
    Principal outside TYPE_CHECKING, are both refused."""
    assert not allowed("guard.upstream", "guard.authz.resolve", False)
    assert not allowed("guard.edge", "guard.identity.base", False)
    assert allowed("guard.edge", "guard.identity.base", True)
    assert not allowed("guard.audit", "guard.identity.tokens", False)
    assert not allowed("guard.authz", "guard.identity.base", True)
    module = tmp_path / "sample.py"
    module.write_text(
        "from typing import TYPE_CHECKING\n"
        "from guard.authz import routes\n"
        "if TYPE_CHECKING:\n"
        "    from guard.identity.base import Principal\n"
    )
    assert imports(module) == [
        (2, "guard.authz.routes", False),
        (4, "guard.identity.base", True),
    ]


def test_every_package_says_what_it_owns_and_must_not_import() -> None:
    for init in sorted(GUARD.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc, f"{init.relative_to(ROOT)}: no import rules in its docstring"


def test_top_level_keeps_only_what_spans_everything() -> None:
    modules = [p.name for p in GUARD.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert len(modules) <= TOP_LEVEL_LIMIT, sorted(modules)
