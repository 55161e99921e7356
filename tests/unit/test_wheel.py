"""The built wheel carries its package data: the route table, the migrations, the policies.

The editable install finds data files in the source tree whatever ``pyproject.toml`` says, so
this builds the wheel, installs it (and only it) into a throwaway virtualenv, and runs the
``mlflow-guard`` entry point from there, outside the checkout. Offline: the wheel is built with
the project venv's setuptools (no build isolation), and the throwaway venv reaches the
dependencies through a ``.pth`` naming the project venv's site-packages, whose own ``.pth``
files (the editable install among them) are not processed.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# What the wheel is built from (a copy: setuptools keeps a build/ directory beside the sources,
# whose leftovers from an older layout would end up in the wheel).
SOURCES = ("guard", "server", "policies", "pyproject.toml", "README.md")
DATA = (
    "guard/authz/route_table.toml",
    "guard/identity/pages/login.html",
    "guard/identity/pages/directory-form.html",
    "guard/identity/pages/token-form.html",
    "guard/identity/pages/logout.html",
    "guard/identity/pages/login.css",
    "guard/identity/pages/login.js",
    "guard/store/migrations/env.py",
    "guard/store/migrations/script.py.mako",
    "guard/store/migrations/versions/0001_tokens.py",
    "policies/model.conf",
    "policies/default.csv",
)


def run(*args: str | Path, cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict[str, str]]:
    """(the wheel, the throwaway venv's bin directory, a clean environment)."""
    tmp = tmp_path_factory.mktemp("wheel")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTHON"))}
    source = tmp / "source"
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(
                ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__")
            )
        else:
            shutil.copy2(ROOT / name, source / name)
    pip = (sys.executable, "-m", "pip")
    quiet = ("--quiet", "--no-deps", "--no-index", "--disable-pip-version-check")
    run(*pip, "wheel", *quiet, "--no-build-isolation", "--wheel-dir", tmp, source, cwd=tmp, env=env)
    (wheel,) = tmp.glob("mlflow_guard-*.whl")
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp, env=env)
    python = venv / "bin" / "python"
    purelib = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))",
                  cwd=tmp, env=env).strip()  # fmt: skip
    Path(purelib, "project-dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    run(*pip, "--python", python, "install", *quiet, wheel, cwd=tmp, env=env)
    return wheel, venv / "bin", env


def test_the_wheel_lists_the_package_data(installed: tuple[Path, Path, dict[str, str]]) -> None:
    wheel, _, _ = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert set(DATA) <= names, set(DATA) - names
    assert not any(name.startswith("tests/") for name in names)


def test_the_installed_wheel_runs_outside_the_checkout(
    installed: tuple[Path, Path, dict[str, str]], tmp_path: Path
) -> None:
    _, bin_dir, env = installed
    where = run(bin_dir / "python", "-c", "import guard; print(guard.__file__)", cwd=tmp_path,
                env=env)  # fmt: skip
    assert Path(where.strip()).is_relative_to(bin_dir.parent), where
    assert not Path(where.strip()).is_relative_to(ROOT / "guard")

    data = tmp_path / "data"
    out = run(bin_dir / "mlflow-guard", "check-config", "--data-dir", data, cwd=tmp_path, env=env)
    assert "configuration OK" in out

    # token create migrates the database (Alembic env and versions from the wheel) and seeds
    # the shipped policy (policies/default.csv, whose roles it checks the token's against).
    secret = run(bin_dir / "mlflow-guard", "token", "create", "--data-dir", data, "--name", "ci",
                 "--role", "viewer", "--quiet", cwd=tmp_path, env=env)  # fmt: skip
    assert secret.strip()
    listing = run(bin_dir / "mlflow-guard", "token", "list", "--data-dir", data, "--format",
                  "json", cwd=tmp_path, env=env)  # fmt: skip
    assert '"name": "ci"' in listing

    routes = run(bin_dir / "python", "-c", "from guard.authz.routes import load_routes; "
                 "print(len(load_routes()))", cwd=tmp_path, env=env)  # fmt: skip
    assert int(routes) > 400

    page = run(bin_dir / "python", "-c", "from guard.identity import pages; print(len("
               "pages.render_login(pages.LoginForm('t', '/', True))), pages.static_file('login.js')"
               " is not None)", cwd=tmp_path, env=env)  # fmt: skip
    assert page.split()[1] == "True" and int(page.split()[0]) > 1000
