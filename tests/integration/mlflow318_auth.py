"""Runs inside a real MLflow 3.18.0 server (its own venv), for test_mlflow318_internal_headers.

``python -m tests.integration.mlflow318_auth server ...`` is ``mlflow server ...`` whose
per-boot secrets (the Assistant delegation signing key among them) are the value of
``GUARD_TEST_SIGNING_KEY``, so the test can mint a valid ``X-MLflow-Assistant-Delegation``
credential. ``authenticate`` is the basic-auth ``authorization_function``: Basic credentials
when given, otherwise the user ``nobody``, so requests forwarded by the gateway (which never
carries a caller's credentials) reach MLflow as a user who may read but not edit. This module
imports neither the gateway nor pytest.
"""

from __future__ import annotations

import os
import secrets
import sys
from typing import Any


def authenticate() -> Any:
    from flask import request
    from mlflow.server.auth import authenticate_request_basic_auth
    from werkzeug.datastructures import Authorization

    if request.authorization is not None:
        return authenticate_request_basic_auth()
    return Authorization("basic", data={"username": "nobody", "password": ""})


def main() -> None:
    key = os.environ["GUARD_TEST_SIGNING_KEY"]
    secrets.token_hex = lambda nbytes=None: key  # only in this launcher; the workers get env
    from mlflow.cli import cli

    cli(sys.argv[1:])


if __name__ == "__main__":
    main()
