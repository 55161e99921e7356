"""The ``mlflow-guard`` command: parses arguments and calls into the package, nothing more.

Exit codes: 0 success, 1 the operation failed, 2 bad configuration or arguments, 3 the gateway
could not start.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any

from guard.settings import Loaded, load_settings, options, parse_duration

EXIT_FAILED, EXIT_CONFIG, EXIT_STARTUP = 1, 2, 3


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML configuration file")
    parser.add_argument("--data-dir", dest="storage.data_dir", help="gateway data directory")
    parser.add_argument(
        "--database-uri", dest="storage.database_uri", help="the gateway's own database"
    )


def _serve_flags(parser: argparse.ArgumentParser) -> None:
    for opt in options():
        if opt.flag is None or opt.section == "storage":
            continue
        if opt.type is bool:
            parser.add_argument(
                opt.flag, dest=opt.name, action=argparse.BooleanOptionalAction, help=opt.doc
            )
        else:
            parser.add_argument(opt.flag, dest=opt.name, help=opt.doc)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlflow-guard", description="Authentication, authorization and audit for MLflow."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gateway (and the embedded MLflow)")
    _common(serve)
    _serve_flags(serve)

    check = commands.add_parser("check-config", help="validate the configuration, report all")
    _common(check)
    _serve_flags(check)

    token = commands.add_parser("token", help="manage service tokens")
    token_commands = token.add_subparsers(dest="action", required=True)
    create = token_commands.add_parser("create", help="create a token and print it once")
    _common(create)
    create.add_argument("--name", required=True)
    create.add_argument("--role", required=True)
    create.add_argument(
        "--expires", help="lifetime such as 90d, 12h (default tokens.default_expiry)"
    )
    create.add_argument("--quiet", action="store_true", help="print only the secret")
    listing = token_commands.add_parser("list", help="list tokens (never their secrets)")
    _common(listing)
    listing.add_argument("--all", action="store_true", help="include revoked tokens")
    listing.add_argument("--format", choices=["table", "json"], default="table")
    revoke = token_commands.add_parser("revoke", help="revoke a token by name")
    _common(revoke)
    revoke.add_argument("name")
    return parser


def _load(args: argparse.Namespace) -> Loaded | None:
    flags = {k: v for k, v in vars(args).items() if "." in k}
    loaded = load_settings(flags, os.environ, args.config)
    if loaded.problems:
        for problem in loaded.problems:
            print(problem, file=sys.stderr)
        print(
            f"{len(loaded.problems)} configuration problem(s); nothing was done.", file=sys.stderr
        )
        return None
    return loaded


def _check_config(loaded: Loaded) -> int:
    problems = list(loaded.problems)
    settings = loaded.settings
    if settings.embedded and importlib.util.find_spec("mlflow") is None:
        problems.append(
            "upstream.url: empty, so the embedded MLflow is used, but mlflow is not installed "
            "(pip install 'mlflow-guard[embedded]', or set upstream.url)"
        )
    if problems:
        for problem in problems:
            print(problem, file=sys.stderr)
        print(f"{len(problems)} configuration problem(s).", file=sys.stderr)
        return EXIT_CONFIG
    print(f"configuration OK (file: {loaded.config_file or 'none'})")
    for opt in options():
        value = getattr(getattr(settings, opt.section), opt.key)
        print(f"  {opt.name} = {value!r}  [{loaded.sources[opt.name]}]")
    return 0


def _store(loaded: Loaded) -> Any:
    from guard.db import build_engine, migrate
    from guard.identity.tokens import TokenStore
    from guard.keys import load_secret_key

    engine = build_engine(loaded.settings.database_uri)
    migrate(engine)
    return TokenStore(engine, load_secret_key(loaded.settings.secret_key_file, os.environ))


def _when(value: dt.datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "-"


def _token(args: argparse.Namespace, loaded: Loaded) -> int:
    from guard.identity.tokens import TokenError, utcnow

    store = _store(loaded)
    try:
        if args.action == "create":
            lifetime = (
                parse_duration(args.expires)
                if args.expires
                else loaded.settings.tokens.default_expiry
            )
            record, secret = store.create(args.name, args.role, lifetime)
            if args.quiet:
                print(secret)
                return 0
            print(
                f"Created token {record.name!r} (role {record.role}, expires "
                f"{_when(record.expires_at)}). The secret is shown only now:\n\n    {secret}\n\n"
                f"Use it as MLFLOW_TRACKING_TOKEN, or as the password with user name "
                f"{record.name!r} (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)."
            )
        elif args.action == "list":
            now = utcnow()
            records = store.list(include_revoked=args.all)
            if args.format == "json":
                rows = [
                    {
                        "name": r.name, "role": r.role, "state": r.state(now),
                        "created": r.created_at.isoformat(), "expires": r.expires_at.isoformat(),
                        "last_used": r.last_used_at.isoformat() if r.last_used_at else None,
                    }
                    for r in records
                ]  # fmt: skip
                print(json.dumps(rows, indent=2))
                return 0
            table = [("NAME", "ROLE", "STATE", "CREATED", "EXPIRES", "LAST USED")]
            table += [
                (r.name, r.role, r.state(now), _when(r.created_at), _when(r.expires_at),
                 _when(r.last_used_at))
                for r in records
            ]  # fmt: skip
            widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
            for row in table:
                print(
                    "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
                )
        else:
            record = store.revoke(args.name)
            print(f"Revoked token {record.name!r}.")
    except (TokenError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _print_bootstrap(secret: str) -> None:
    supplied = secret == os.environ.get("MLFLOW_GUARD_BOOTSTRAP_TOKEN")
    lines = ["", "=" * 72]
    if supplied:
        lines.append("mlflow-guard: created token 'admin' from MLFLOW_GUARD_BOOTSTRAP_TOKEN.")
    else:
        lines += [
            "mlflow-guard: created the first admin token. It is shown only now:",
            "",
            f"    {secret}",
            "",
            "Clients: export MLFLOW_TRACKING_TOKEN=<the token>",
            "Browser: user name 'admin', password <the token>",
        ]
    lines += [
        "Make your own: mlflow-guard token create --name NAME --role admin",
        "then retire this one: mlflow-guard token revoke admin",
        "=" * 72,
        "",
    ]
    print("\n".join(lines), flush=True)


def _serve(loaded: Loaded) -> int:
    import uvicorn

    from guard.app import build_gateway, uvicorn_options
    from guard.keys import SecretKeyError

    settings = loaded.settings
    logging.basicConfig(
        level=settings.gateway.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        gateway = build_gateway(settings, os.environ, on_bootstrap=_print_bootstrap)
    except SecretKeyError as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    config = uvicorn.Config(
        gateway,
        host=settings.gateway.host,
        port=settings.gateway.port,
        **uvicorn_options(settings),  # type: ignore[arg-type]
    )

    class GatewayServer(uvicorn.Server):
        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            gateway.begin_shutdown()
            await super().shutdown(sockets)

    server = GatewayServer(config)
    server.run()
    return 0 if server.started else EXIT_STARTUP


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "check-config":
        flags = {k: v for k, v in vars(args).items() if "." in k}
        return _check_config(load_settings(flags, os.environ, args.config))
    loaded = _load(args)
    if loaded is None:
        return EXIT_CONFIG
    if args.command == "serve":
        return _serve(loaded)
    return _token(args, loaded)


if __name__ == "__main__":
    sys.exit(main())
