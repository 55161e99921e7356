"""``serve`` and ``check-config``: run the gateway, or validate its configuration and report
every problem at once."""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import importlib.util
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping

from guard.cli.common import EXIT_CONFIG, EXIT_STARTUP, add_storage_flags, when
from guard.config import Loaded, options, table_fields


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


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``serve`` and ``check-config``."""
    serve = commands.add_parser("serve", help="run the gateway (and the embedded MLflow)")
    add_storage_flags(serve)
    _serve_flags(serve)

    check = commands.add_parser("check-config", help="validate the configuration, report all")
    add_storage_flags(check)
    _serve_flags(check)


def environment_problems(environ: Mapping[str, str]) -> list[str]:
    """Problems with the secrets ``serve`` reads from the environment, which are not settings
    and so not checked by ``load_settings``: reported with the settings' own problems."""
    from guard.identity.tokens import validate_bootstrap_token

    problem = validate_bootstrap_token(environ)
    return [problem] if problem else []


def stored_policy_problems(loaded: Loaded) -> list[str]:
    """What the stored policy holds that the gateway would refuse to start with under these
    settings (grants and ``upstream.workspaces``); none when no policy is stored yet (the
    shipped default is), and a line saying so when the database cannot be read."""
    import sqlalchemy as sa

    from guard.authz.policy import PolicyError
    from guard.authz.store import PolicyStore
    from guard.authz.workspaces import problems
    from guard.store.db import build_engine, policy_state

    settings = loaded.settings
    url = sa.make_url(settings.database_uri)
    if url.get_backend_name() == "sqlite" and not os.path.exists(url.database or ""):
        return []  # nothing stored yet: created at the first start, with the default policy
    engine = build_engine(settings.database_uri)
    try:
        store = PolicyStore(engine)
        if not sa.inspect(engine).has_table(policy_state.name) or store.version() == 0:
            return []
        _, policy = store.load()
    except PolicyError as exc:
        return [f"stored policy: {problem}" for problem in exc.problems]
    except sa.exc.SQLAlchemyError as exc:
        return [f"storage.database_uri: the stored policy cannot be read ({type(exc).__name__})"]
    finally:
        engine.dispose()
    return [f"stored policy: {p}" for p in problems(policy, settings.upstream.workspaces)]


def check_config(loaded: Loaded) -> int:
    problems = [*loaded.problems, *environment_problems(os.environ)]
    settings = loaded.settings
    if not loaded.problems:
        problems += stored_policy_problems(loaded)
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
        secret = opt.key.endswith(("password", "secret"))
        shown = "<set, not shown>" if secret and value else repr(value)
        if opt.kind == "tables":
            shown = f"{len(value)} table(s)"
        print(f"  {opt.name} = {shown}  [{loaded.sources[opt.name]}]")
        if opt.kind == "tables":
            for index, entry in enumerate(value):
                for sub in table_fields(opt):
                    print(f"    {opt.name}[{index}].{sub.key} = {getattr(entry, sub.key)!r}")
    return 0


def _lifetime(seconds: float) -> str:
    """A lifetime in the largest unit that divides it: ``90 days``, ``12 hours``."""
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            count = int(seconds // size)
            return f"{count} {unit}{'s' if count != 1 else ''}"
    return f"{seconds:g} seconds"


def _print_bootstrap(secret: str, lifetime: float) -> None:
    """The first admin token's banner; ``lifetime`` is the ``tokens.default_expiry`` it was
    created with."""
    supplied = secret == os.environ.get("MLFLOW_GUARD_BOOTSTRAP_TOKEN")
    expires = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=lifetime)
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
        f"It expires in {_lifetime(lifetime)} ({when(expires)}; tokens.default_expiry).",
        "Make your own: mlflow-guard token create --name NAME --role ROLE [--resource PATTERN]",
        "then retire this one: mlflow-guard token revoke admin",
        "=" * 72,
        "",
    ]
    print("\n".join(lines), flush=True)


def serve(loaded: Loaded) -> int:
    import uvicorn

    from guard.app import build_gateway, uvicorn_options
    from guard.identity.tokens import TokenError
    from guard.keys import SecretKeyError

    settings = loaded.settings
    # A file grown past RLIMIT_FSIZE must fail the write (the spool then refuses requests with
    # audit_unavailable), not kill the gateway with SIGXFSZ.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    logging.basicConfig(
        level=settings.gateway.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        banner = functools.partial(_print_bootstrap, lifetime=settings.tokens.default_expiry)
        gateway = build_gateway(settings, os.environ, on_bootstrap=banner)
    except (SecretKeyError, TokenError) as exc:
        print(exc, file=sys.stderr)
        return EXIT_CONFIG
    if settings.gateway.workers > 1:
        from guard.cli.workers import serve_workers

        return serve_workers(settings, gateway)
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
