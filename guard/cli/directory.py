"""``mlflow-guard ldap test USER``: what the gateway would make of a directory user (DN,
canonical name, subject, groups, and the policy rules that then apply), the first thing an
operator runs when a login does not do what they expect. The password is asked for (or read
from standard input with ``--password-stdin``), never taken as an argument."""

from __future__ import annotations

import argparse
import getpass
import sys

from guard.cli import common
from guard.config import Loaded


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ldap = commands.add_parser("ldap", help="check the LDAP directory login")
    actions = ldap.add_subparsers(dest="action", required=True)
    test = actions.add_parser(
        "test",
        help="log USER in against the directory (asks for the password) and print the DN, "
        "subject, groups and the policy rules that then apply",
    )
    common.add_storage_flags(test)
    test.add_argument("user", help="the name as a client would type it")
    test.add_argument(
        "--password-stdin", action="store_true", help="read the password from standard input"
    )


def run(args: argparse.Namespace, loaded: Loaded) -> int:
    from guard.app import build_ldap_provider
    from guard.authz.engine import PolicyIndex
    from guard.identity.ldap import DirectoryUnavailable, typed_name

    provider = build_ldap_provider(loaded.settings)
    if provider is None:
        print("error: LDAP login is off (set ldap.urls)", file=sys.stderr)
        return common.EXIT_CONFIG
    name = typed_name(args.user, provider.config.name_forms)
    if name is None:
        forms = ", ".join(provider.config.name_forms)
        print(f"refused: {args.user!r} is not in an accepted name form ({forms})")
        return common.EXIT_FAILED
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(f"password for {args.user}: ")
    if not password:
        print("refused: an empty password is never accepted")
        return common.EXIT_FAILED
    try:
        user = provider.directory.login(name, password)
    except DirectoryUnavailable as exc:
        print(f"error: the directory cannot be reached or refused the search: {exc}")
        return common.EXIT_FAILED
    finally:
        provider.close()
    if user is None:
        print("refused: unknown user or wrong password (the gateway answers 401 "
              "invalid_credentials; its log says more for several matching entries)")  # fmt: skip
        return common.EXIT_FAILED
    principal = provider.principal(user)
    print(f"dn:       {user.dn}")
    print(f"name:     {user.name}")
    print(f"subject:  {principal.subject}")
    print(f"id:       {user.stable_id or '(none: the entry lacks ldap.id_attribute; refused)'}")
    print("groups:   " + (", ".join(principal.groups) or "(none)"))
    with common.governance_session(loaded) as governance:
        version, policy = governance.policies.load()
    subjects = PolicyIndex(policy).subjects_of(principal.subject)
    others = [s for s in subjects if s != principal.subject and s not in principal.groups]
    print("policy groups: " + (", ".join(others) or "(none)"))
    rules = sorted(g for g in policy.grants if g.subject in subjects)
    print(f"rules that apply (policy version {version}):")
    for rule in rules:
        print("  " + ", ".join(rule.row()))
    if not rules:
        print("  (none: every request is denied)")
    return 0
