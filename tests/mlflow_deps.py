"""Print MLflow's dependency set as installed in this venv (tests/mlflow_routes/deps-3.17.2.txt).

The closure of the installed mlflow's requirements with its ``auth`` extra (basic-auth, which
integration tests start from the 3.18 venv) and of boto3 (the server's S3 artifact store),
pinned to the installed versions, mlflow and mlflow-skinny left out: the base of a venv for
another MLflow release (Makefile ``mlflow_venv``). ``make mlflow-deps`` writes it.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

HEADER = Path(__file__).with_name("mlflow_routes").joinpath("deps-3.17.2.txt")


def closure(root: str = "mlflow", extras: tuple[str, ...] = ("auth",)) -> dict[str, str]:
    pins: dict[str, str] = {}
    todo = [root]
    while todo:
        name = canonicalize_name(todo.pop())
        if name in pins:
            continue
        dist = metadata.distribution(name)
        pins[name] = dist.version
        wanted = ("", *extras) if name == root else ("",)
        for text in dist.requires or ():
            requirement = Requirement(text)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in wanted):
                todo.append(requirement.name)
    return pins


def main() -> int:
    header = [line for line in HEADER.read_text().splitlines() if line.startswith("#")]
    # boto3: the S3 artifact repository of the server (tests/integration/test_presigned_only.py
    # serves presigned-only artifacts from moto's S3); mlflow leaves it to the installer.
    pins = closure() | closure("boto3", ())
    lines = [f"{name}=={version}" for name, version in sorted(pins.items())
             if name not in ("mlflow", "mlflow-skinny")]  # fmt: skip
    sys.stdout.write("\n".join([*header, *lines]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
