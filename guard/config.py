"""Loading the settings: one lookup, every problem reported at once.

Where a value comes from, highest first: a command-line flag, the environment
(``MLFLOW_GUARD_<SECTION>_<KEY>``), the TOML file (``--config``, else ``MLFLOW_GUARD_CONFIG``,
else ``./mlflow-guard.toml`` if it exists), the built-in default. An array of tables such as
``[[oidc.bearer]]`` is one variable in the environment, a JSON list of objects that replaces the
file's whole list. The schema it fills is ``guard.settings``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from guard.settings import Settings, Validator, is_loopback_host, parse_duration, parse_size

ENV_PREFIX: Final = "MLFLOW_GUARD_"
DEFAULT_CONFIG_FILE: Final = "mlflow-guard.toml"
# Environment variables that are not settings: where to look, and secrets kept out of files.
RESERVED_ENV: Final = frozenset(
    {"MLFLOW_GUARD_CONFIG", "MLFLOW_GUARD_BOOTSTRAP_TOKEN", "MLFLOW_GUARD_SECRET_KEY"}
)


@dataclass(frozen=True)
class Option:
    """One setting as the loader and the documentation see it."""

    section: str
    key: str
    type: Any
    default: Any
    doc: str
    flag: str | None
    kind: str
    check: Validator | None

    @property
    def name(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def env(self) -> str:
        return f"{ENV_PREFIX}{self.section.upper()}_{self.key.upper()}"


def _fields(section: str, schema: Any) -> list[Option]:
    hints = get_type_hints(schema)
    return [
        Option(
            section,
            f.name,
            hints[f.name],
            f.default,
            f.metadata["doc"],
            f.metadata["flag"],
            f.metadata["kind"],
            f.metadata["check"],
        )
        for f in dataclasses.fields(schema)
    ]


def options() -> list[Option]:
    """Every setting, in schema order (an array of tables is one option of kind ``tables``)."""
    result = []
    for section in dataclasses.fields(Settings):
        result.extend(_fields(section.name, get_type_hints(Settings)[section.name]))
    return result


def table_fields(opt: Option) -> list[Option]:
    """The keys of each table of an array-of-tables option, named ``section.key[].field``."""
    return _fields(f"{opt.name}[]", get_args(opt.type)[0])


@dataclass(frozen=True)
class Loaded:
    settings: Settings
    problems: list[str]
    sources: dict[str, str]
    config_file: Path | None


def _convert(opt: Option, raw: object) -> object:
    """Turn a raw value (a string from env/flags, or a TOML value) into the option's type."""
    if opt.kind == "size":
        return parse_size(raw)
    if opt.kind == "duration":
        return parse_duration(raw)
    if get_origin(opt.type) is tuple:
        if isinstance(raw, str):
            return tuple(item.strip() for item in raw.split(",") if item.strip())
        if isinstance(raw, list) and all(isinstance(item, str) for item in raw):
            return tuple(raw)
        raise ValueError(f"expected a list of strings, got {raw!r}")
    if opt.type is bool:
        if isinstance(raw, bool):
            return raw
        text = str(raw).strip().lower()
        if text in {"true", "1", "yes", "on"}:
            return True
        if text in {"false", "0", "no", "off"}:
            return False
        raise ValueError(f"expected true or false, got {raw!r}")
    if opt.type is int:
        if isinstance(raw, bool) or not isinstance(raw, int | str):
            raise ValueError(f"expected an integer, got {raw!r}")
        try:
            return int(raw)
        except ValueError:
            raise ValueError(f"expected an integer, got {raw!r}") from None
    if opt.type is float:
        if isinstance(raw, bool) or not isinstance(raw, int | float | str):
            raise ValueError(f"expected a number, got {raw!r}")
        return float(raw)
    if not isinstance(raw, str):
        raise ValueError(f"expected a string, got {raw!r}")
    return raw


def _tables(
    opt: Option, raw: object, source: str, from_env: bool
) -> tuple[tuple[object, ...], list[str]]:
    """An array of tables from the file (a list of tables) or the environment (a JSON list of
    objects); each problem names its entry: ``oidc.bearer[1].issuer: ...``."""
    how = f"[[{opt.name}]] tables in the file, a JSON list of objects in {opt.env}"
    if from_env and isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            return (), [f"{opt.name}: not valid JSON: {exc} (write {how}) (from {source})"]
    if not isinstance(raw, list) or not all(isinstance(entry, dict) for entry in raw):
        return (), [f"{opt.name}: expected a list of tables ({how}) (from {source})"]
    fields = table_fields(opt)
    names = {sub.key for sub in fields}
    schema = get_args(opt.type)[0]
    entries: list[object] = []
    problems: list[str] = []
    for index, entry in enumerate(raw):
        prefix = f"{opt.name}[{index}]"
        problems.extend(
            f"{prefix}.{key}: unknown setting (known: {', '.join(sorted(names))}) (from {source})"
            for key in entry
            if key not in names
        )
        values: dict[str, object] = {}
        for sub in fields:
            value = sub.default
            if sub.key in entry:
                try:
                    value = _convert(sub, entry[sub.key])
                except ValueError as exc:
                    problems.append(f"{prefix}.{sub.key}: {exc} (from {source})")
                    value = sub.default
            if sub.check is not None and (message := sub.check(value)):
                problems.append(f"{prefix}.{sub.key}: {message} (from {source})")
            values[sub.key] = value
        entries.append(schema(**values))
    return tuple(entries), problems


def find_config_file(flag: str | None, environ: Mapping[str, str]) -> Path | None:
    """The config file in effect: --config, else MLFLOW_GUARD_CONFIG, else ./mlflow-guard.toml."""
    if flag:
        return Path(flag)
    if environ.get("MLFLOW_GUARD_CONFIG"):
        return Path(environ["MLFLOW_GUARD_CONFIG"])
    local = Path(DEFAULT_CONFIG_FILE)
    return local if local.is_file() else None


def load_settings(
    flags: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
    config_file: str | None = None,
) -> Loaded:
    """Build Settings from flags (keyed by ``section.key``), environment and file.

    Never raises for bad input: every problem is collected as
    ``"section.key: problem (how to fix)"`` so the operator sees them all at once.
    """
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    path = find_config_file(config_file, environ)
    file_values: dict[str, Any] = {}
    if path is not None:
        try:
            file_values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            problems.append(f"config: {path} does not exist (create it or drop --config)")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"config: {path} cannot be read: {exc}")
        except tomllib.TOMLDecodeError as exc:
            problems.append(f"config: {path} is not valid TOML: {exc} (fix the syntax)")

    all_options = options()
    known = {(o.section, o.key) for o in all_options}
    sections = {o.section for o in all_options}
    for section, table in file_values.items():
        if section not in sections or not isinstance(table, dict):
            problems.append(f"{section}: unknown section (known: {', '.join(sorted(sections))})")
            continue
        for key in table:
            if (section, key) not in known:
                problems.append(f"{section}.{key}: unknown setting (see config/mlflow-guard.toml)")
    known_env = {o.env for o in all_options} | RESERVED_ENV
    for name in sorted(environ):
        if name.startswith(ENV_PREFIX) and name not in known_env:
            problems.append(f"env {name}: unknown setting (check the spelling in the README)")

    values: dict[str, dict[str, object]] = {s: {} for s in sections}
    sources: dict[str, str] = {}
    for opt in all_options:
        candidates: list[tuple[str, object]] = []
        if opt.name in flags:
            candidates.append((f"flag {opt.flag}", flags[opt.name]))
        if opt.env in environ:
            candidates.append((f"env {opt.env}", environ[opt.env]))
        table = file_values.get(opt.section)
        if isinstance(table, dict) and opt.key in table:
            candidates.append((f"file {path}", table[opt.key]))
        value, source = opt.default, "default"
        if candidates and opt.kind == "tables":
            source, raw = candidates[0]
            value, table_problems = _tables(opt, raw, source, source.startswith("env "))
            problems.extend(table_problems)
        elif candidates:
            source, raw = candidates[0]
            try:
                value = _convert(opt, raw)
            except ValueError as exc:
                problems.append(f"{opt.name}: {exc} (from {source})")
                value, source = opt.default, "default"
        if opt.check is not None and (message := opt.check(value)):
            problems.append(f"{opt.name}: {message} (from {source})")
        values[opt.section][opt.key] = value
        sources[opt.name] = source

    hints = get_type_hints(Settings)
    settings = Settings(**{s: hints[s](**kv) for s, kv in values.items()})
    problems.extend(_cross_checks(settings))
    problems.extend(_ldap_checks(settings))
    problems.extend(_oidc_checks(settings))
    return Loaded(settings, problems, sources, path)


def _ldap_checks(settings: Settings) -> list[str]:
    """The [ldap] options that only make sense together (checked only when LDAP is on)."""
    c = settings.ldap
    if not c.urls:
        return []
    problems = []
    if c.bind_dn:
        if not c.user_base:
            problems.append("ldap.user_base: required with bind_dn (where users are searched)")
        if "{username}" not in c.user_filter:
            problems.append("ldap.user_filter: must contain {username}")
        if bool(c.bind_password) == bool(c.bind_password_file):
            problems.append(
                "ldap.bind_password: set it (MLFLOW_GUARD_LDAP_BIND_PASSWORD) or "
                "ldap.bind_password_file, exactly one of them"
            )
        elif c.bind_password_file and not Path(c.bind_password_file).is_file():
            problems.append(f"ldap.bind_password_file: {c.bind_password_file} does not exist")
    elif "{username}" not in c.bind_dn_template:
        problems.append(
            "ldap.bind_dn: set a service account (bind_dn, user_base) or a bind_dn_template "
            "containing {username}"
        )
    if c.group_base and "{dn}" not in c.group_filter:
        problems.append("ldap.group_filter: must contain {dn}")
    if c.ad_in_chain and (not c.group_base or c.use_memberof):
        problems.append(
            "ldap.ad_in_chain: set group_base (the in-chain search runs there) and turn "
            "use_memberof off"
        )
    if c.ca_file and not Path(c.ca_file).is_file():
        problems.append(f"ldap.ca_file: {c.ca_file} does not exist")
    for url in c.urls:
        try:
            host = urlsplit(url).hostname
        except ValueError:
            continue  # reported by the option's own check
        loopback = host in {"127.0.0.1", "::1", "localhost"}
        if url.lower().startswith("ldap://") and not c.start_tls and not loopback:
            problems.append(
                f"ldap.urls: {url} would send passwords in clear (use ldaps:// or start_tls)"
            )
    return problems


def _oidc_checks(settings: Settings) -> list[str]:
    """[oidc] and [[oidc.bearer]] options that only make sense together."""
    c = settings.oidc
    problems = []
    if c.issuer:
        if not c.client_id:
            problems.append("oidc.client_id: required with oidc.issuer (the gateway's client id)")
        if bool(c.client_secret) == bool(c.client_secret_file):
            problems.append(
                "oidc.client_secret: set it (MLFLOW_GUARD_OIDC_CLIENT_SECRET) or "
                "oidc.client_secret_file, exactly one of them (the gateway is a confidential "
                "client)"
            )
        elif c.client_secret_file and not Path(c.client_secret_file).is_file():
            problems.append(f"oidc.client_secret_file: {c.client_secret_file} does not exist")
        unset = not c.redirect_uri and not settings.gateway.public_url
        if unset and not is_loopback_host(settings.gateway.host):
            problems.append(
                "oidc.redirect_uri: set gateway.public_url (or oidc.redirect_uri): the "
                f"provider cannot send browsers back to {settings.public_url}"
            )
    aliases = {c.alias: "oidc.alias"}
    if c.alias == "ldap":
        problems.append("oidc.alias: ldap names the directory's groups (choose another)")
    issuers: dict[str, str] = {}
    for index, bearer in enumerate(c.bearer):
        name = f"oidc.bearer[{index}]"
        if bearer.alias == "ldap":
            problems.append(f"{name}.alias: ldap names the directory's groups (choose another)")
        elif bearer.alias and bearer.alias in aliases:
            problems.append(
                f"{name}.alias: {bearer.alias!r} is already used by {aliases[bearer.alias]} "
                "(each issuer needs its own alias)"
            )
        aliases.setdefault(bearer.alias, f"{name}.alias")
        if bearer.issuer and bearer.issuer in issuers:
            problems.append(
                f"{name}.issuer: already trusted by {issuers[bearer.issuer]} (one table per issuer)"
            )
        issuers.setdefault(bearer.issuer, name)
        if c.client_id and bearer.audience == c.client_id:
            problems.append(
                f"{name}.audience: equal to oidc.client_id, so ID tokens would work as API "
                "credentials (use the audience of the provider's access tokens, e.g. "
                "urn:mlflow-guard)"
            )
    return problems


def _cross_checks(settings: Settings) -> list[str]:
    problems = []
    if settings.tokens.cache_ttl < 0:
        problems.append("tokens.cache_ttl: must not be negative (0 disables the cache)")
    if (
        settings.embedded
        and settings.mlflow.default_artifact_root == ""
        and not (settings.mlflow.serve_artifacts)
    ):
        problems.append(
            "mlflow.default_artifact_root: required when serve_artifacts is off "
            "(set a path or an object-store URI)"
        )
    try:
        data_dir = settings.data_dir
    except OSError as exc:  # pragma: no cover - resolve() only fails on broken filesystems
        return [*problems, f"storage.data_dir: cannot be resolved: {exc}"]
    if data_dir.exists() and not data_dir.is_dir():
        problems.append(f"storage.data_dir: {data_dir} exists and is not a directory")
    return problems
