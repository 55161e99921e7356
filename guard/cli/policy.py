"""``policy`` and ``role``: inspect and change the authorization policy, in the database or
through a running gateway (``--gateway``)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from guard.authz.policy import ACTIONS
from guard.cli import common
from guard.config import Loaded


def add_parsers(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``policy`` and ``role``."""
    policy = commands.add_parser("policy", help="inspect and change the authorization policy")
    policy_commands = policy.add_subparsers(dest="action", required=True)
    show = policy_commands.add_parser("list", help="print the policy in force")
    common.add_storage_flags(show)
    show.add_argument("--format", choices=["csv", "table"], default="table")
    common.add_remote_flag(show)
    export = policy_commands.add_parser("export", help="print the policy as CSV")
    common.add_storage_flags(export)
    export.add_argument("--output", metavar="FILE", help="write to FILE instead of stdout")
    for name, text in (("add", "add rules"), ("remove", "remove rules")):
        sub = policy_commands.add_parser(name, help=f"{text}, e.g. 'p, user:alice, viewer, *'")
        common.add_storage_flags(sub)
        sub.add_argument("rows", nargs="+", metavar="ROW")
        common.add_remote_flag(sub)
    load = policy_commands.add_parser("import", help="replace the policy with a CSV file")
    common.add_storage_flags(load)
    load.add_argument("file")
    load.add_argument("--dry-run", action="store_true", help="show the diff, change nothing")
    qualify = policy_commands.add_parser(
        "qualify",
        help="name a workspace in every grant that names none (before turning workspaces on)",
        description="Rewrite every grant on experiments, models and skills that names no MLflow "
        "workspace into WORKSPACE (experiment:x -> WORKSPACE/experiment:x): what MLflow held "
        "before workspaces were turned on is in its 'default' workspace. Shows the diff and "
        "applies it atomically; needs upstream.workspaces = true in the configuration.",
    )
    common.add_storage_flags(qualify)
    qualify.add_argument("--workspace", required=True, help="the workspace, e.g. default")
    qualify.add_argument("--dry-run", action="store_true", help="show the diff, change nothing")
    explain = policy_commands.add_parser(
        "explain",
        help="say what the policy decides and why",
        description="Say whether SUBJECT may do ACTION on RESOURCE, and which rule decides. "
        "With --gateway, anyone may ask about themselves (omit --subject), whoever manages "
        "RESOURCE about anyone's decisions on it, and readers of guard:policy about anything.",
    )
    common.add_storage_flags(explain)
    explain.add_argument(
        "--subject",
        help="user:NAME, group:NAME or token:NAME (with --gateway, default: yourself; "
        "required without it)",
    )
    explain.add_argument("--action", dest="question_action", required=True, choices=ACTIONS)
    explain.add_argument("--resource", required=True, help="experiment:NAME, model:NAME, ...")
    common.add_remote_flag(explain)

    role = commands.add_parser("role", help="grant or withdraw a role on a resource pattern")
    role_commands = role.add_subparsers(dest="action", required=True)
    for name, text in (
        ("assign", "grant SUBJECT the role on RESOURCE (a manager: on what they manage)"),
        ("unassign", "withdraw a grant made with assign (the same subject, role, resource)"),
    ):
        sub = role_commands.add_parser(name, help=text, description=text[0].upper() + text[1:])
        common.add_storage_flags(sub)
        sub.add_argument("--subject", required=True, help="user:NAME, group:NAME or token:NAME")
        sub.add_argument("--role", required=True, help="a role defined in the policy (role list)")
        sub.add_argument("--resource", default="*", help="resource pattern (default: all)")
        sub.add_argument("--deny", action="store_true", help="an explicit deny rule")
        common.add_remote_flag(sub)
    roles = role_commands.add_parser("list", help="the roles and the actions each holds")
    common.add_storage_flags(roles)


def run(args: argparse.Namespace, loaded: Loaded) -> int:
    with common.governance_session(loaded) as governance:
        return _policy_command(args, loaded, governance)


def _policy_command(args: argparse.Namespace, loaded: Loaded, governance: Any) -> int:
    from guard.authz.engine import PolicyIndex
    from guard.authz.policy import Grant, PolicySet, parse_lines, parse_row
    from guard.authz.workspaces import qualify_policy, valid_name

    try:
        if args.command == "role":
            if args.action == "list":
                _, policy = governance.policies.load()
                index = PolicyIndex(policy)
                for role in sorted(policy.role_names()):
                    actions = sorted(a for a in index.actions_of(role) if a in ACTIONS)
                    print(f"{role:<12} {', '.join(actions)}")
                return 0
            grant = Grant(args.subject, args.role, args.resource, "deny" if args.deny else "allow")
            parse_row(grant.row())
            key = "added" if args.action == "assign" else "removed"
            if not common.record_change(loaded, governance, "policy_changed", "intent",
                                        changes={key: [", ".join(grant.row())]}):  # fmt: skip
                return common.EXIT_FAILED
            if args.action == "assign":
                version = governance.change(common.cli_actor(), add=[grant])
            else:
                version = governance.change(common.cli_actor(), remove=[grant])
            common.record_change(
                loaded,
                governance,
                "policy_changed",
                changes={key: [", ".join(grant.row())], "policy_version": version},
            )
            print(f"{args.action}ed: {', '.join(grant.row())} (policy version {version})")
            return 0
        if args.action in ("list", "export"):
            version, policy = governance.policies.load()
            if args.action == "export" or args.format == "csv":
                text = f"# mlflow-guard policy, version {version}\n" + policy.to_csv()
                if getattr(args, "output", None):
                    with open(args.output, "w") as out:
                        out.write(text)
                    print(f"wrote {len(policy.rows())} rules to {args.output}")
                else:
                    print(text, end="")
                return 0
            print(f"policy version {version}: {len(policy.rows())} rules")
            for row in policy.rows():
                print("  " + ", ".join(row))
            return 0
        if args.action in ("add", "remove"):
            rules = parse_lines(args.rows)
            key = "added" if args.action == "add" else "removed"
            if not common.record_change(loaded, governance, "policy_changed", "intent", changes={
                    key: [", ".join(r.row()) for r in rules]}):  # fmt: skip
                return common.EXIT_FAILED
            if args.action == "add":
                version = governance.change(common.cli_actor(), add=rules)
            else:
                version = governance.change(common.cli_actor(), remove=rules)
            common.record_change(loaded, governance, "policy_changed", changes={
                key: [", ".join(r.row()) for r in rules], "policy_version": version})  # fmt: skip
            print(f"policy version {version}")
            return 0
        if args.action in ("import", "qualify"):
            _, current = governance.policies.load()
            if args.action == "qualify":
                if not valid_name(args.workspace):
                    return common.fail(ValueError(f"{args.workspace!r} is no workspace name"))
                new = qualify_policy(current, args.workspace)
            else:
                with open(args.file) as source:
                    new = PolicySet.from_csv(source.read())
            added, removed = current.diff(new)
            for row in removed:
                print("- " + ", ".join(row))
            for row in added:
                print("+ " + ", ".join(row))
            print(f"{len(added)} to add, {len(removed)} to remove")
            if args.dry_run or not (added or removed):
                return 0
            planned = {"added": [", ".join(r) for r in added],
                       "removed": [", ".join(r) for r in removed]}  # fmt: skip
            if not common.record_change(
                loaded, governance, "policy_changed", "intent", changes=planned
            ):
                return common.EXIT_FAILED
            version = governance.replace(new, common.cli_actor())
            common.record_change(loaded, governance, "policy_changed", changes={
                "added": [", ".join(r) for r in added], "removed": [", ".join(r) for r in removed],
                "policy_version": version})  # fmt: skip
            print(f"applied: policy version {version}")
            return 0
        if not args.subject:
            print("error: policy explain: --subject is required without --gateway (the "
                  "database does not know who you are)", file=sys.stderr)  # fmt: skip
            return common.EXIT_CONFIG
        _, policy = governance.policies.load()
        decision = PolicyIndex(policy).decide(args.subject, args.resource, args.question_action)
        verdict = "ALLOW" if decision.allowed else "DENY"
        print(f"{verdict}: {args.subject} {args.question_action} {args.resource}")
        if decision.rule is None:
            print("  no grant matched (deny by default)")
        else:
            kind = "explicit deny" if decision.reason == "explicit_deny" else "granted by"
            print(f"  {kind}: {', '.join(decision.rule.row())}")
        return 0 if decision.allowed else common.EXIT_FAILED
    except (ValueError, OSError) as exc:  # PolicyError is a ValueError
        return common.fail(exc)


def remote(args: argparse.Namespace) -> int:
    """A policy or role command sent to a running gateway, which applies the caller's rights
    (a manager may grant on what they manage) and records the change under their name."""
    from guard.admin.remote import RemoteError, call_api
    from guard.authz.policy import Grant, parse_lines, parse_row

    try:
        if args.command == "role":
            grant = Grant(args.subject, args.role, args.resource, "deny" if args.deny else "allow")
            rule = parse_row(grant.row())
            key = "add" if args.action == "assign" else "remove"
            result = call_api(args.gateway, "POST", "/policy/changes", {key: [list(rule.row())]})
            print(f"{args.action}ed: {', '.join(rule.row())} "
                  f"(policy version {result['policy_version']})")  # fmt: skip
        elif args.action in ("add", "remove"):
            rows = [list(rule.row()) for rule in parse_lines(args.rows)]
            result = call_api(args.gateway, "POST", "/policy/changes", {args.action: rows})
            print(f"policy version {result['policy_version']}")
        elif args.action == "list":
            result = call_api(args.gateway, "GET", "/policy", expect=("policy_version", "rules"))
            if args.format == "csv":
                print(f"# mlflow-guard policy, version {result['policy_version']}")
                print("".join(", ".join(row) + "\n" for row in result["rules"]), end="")
            else:
                print(f"policy version {result['policy_version']}: {len(result['rules'])} rules")
                for row in result["rules"]:
                    print("  " + ", ".join(row))
        else:
            query = {"action": args.question_action, "resource": args.resource}
            if args.subject:  # omitted: the gateway explains the caller's own decision
                query["subject"] = args.subject
            result = call_api(
                args.gateway, "GET", "/policy/explain", query=query,
                expect=("subject", "allowed", "reason", "rule"),
            )  # fmt: skip
            verdict = "ALLOW" if result["allowed"] else "DENY"
            print(f"{verdict}: {result['subject']} {args.question_action} {args.resource}")
            if result["rule"] is None:
                print("  no grant matched (deny by default)")
            else:
                kind = "explicit deny" if result["reason"] == "explicit_deny" else "granted by"
                print(f"  {kind}: {', '.join(result['rule'])}")
            return 0 if result["allowed"] else common.EXIT_FAILED
    except (RemoteError, ValueError) as exc:
        return common.fail(exc)
    return 0
