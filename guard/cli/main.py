"""The ``mlflow-guard`` command: parses arguments and calls into the package, nothing more.

Exit codes: 0 success, 1 the operation failed, 2 bad configuration or arguments, 3 the gateway
could not start.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from guard.cli import audit, directory, policy, serve, sessions, tokens, users
from guard.cli.common import EXIT_CONFIG, load
from guard.config import load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlflow-guard", description="Authentication, authorization and audit for MLflow."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    serve.add_parsers(commands)
    tokens.add_parsers(commands)
    policy.add_parsers(commands)
    audit.add_parsers(commands)
    directory.add_parsers(commands)
    users.add_parsers(commands)
    sessions.add_parsers(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        flags = {k: v for k, v in vars(args).items() if "." in k}
        return serve.check_config(load_settings(flags, os.environ, args.config))
    if getattr(args, "gateway", None):
        return policy.remote(args)
    loaded = load(args, serve.environment_problems(os.environ) if args.command == "serve" else ())
    if loaded is None:
        return EXIT_CONFIG
    if args.command == "serve":
        return serve.serve(loaded)
    if args.command in ("policy", "role"):
        return policy.run(args, loaded)
    if args.command == "audit":
        return audit.run(args, loaded)
    if args.command == "ldap":
        return directory.run(args, loaded)
    if args.command == "user":
        return users.run(args, loaded)
    if args.command == "session":
        return sessions.run(args, loaded)
    return tokens.run(args, loaded)


if __name__ == "__main__":
    sys.exit(main())
