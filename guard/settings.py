"""Settings: the one schema of every option the gateway has.

The schema is the dataclasses below; each field's metadata carries its documentation, its
command-line flag (if any), its kind (size, duration) and its validator. ``guard.config`` reads
values into it from flags, the environment and the TOML file. ``config/mlflow-guard.toml`` and
the README are checked against this schema by the tests, so they cannot drift.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from guard.edge.cors import parse_origin
from guard.edge.hosts import default_allowed_hosts, parse_host_pattern

Validator = Callable[[Any], str | None]

_SIZE_UNITS: Final = {
    **{"": 1, "b": 1, "kib": 1024, "mib": 1024**2, "gib": 1024**3},
    **{"kb": 1000, "mb": 1000**2, "gb": 1000**3},
}
_DURATION_UNITS: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(value: object) -> int:
    """Parse a byte size: an integer, or a string such as ``16MiB`` or ``500 kB``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"{value!r} is not a size (write e.g. 16MiB, 512KiB or 1048576)")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]


def parse_duration(value: object) -> float:
    """Parse a duration in seconds: a number, or a string such as ``90d``, ``12h``, ``30s``."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(value))
    if not match:
        raise ValueError(f"{value!r} is not a duration (write e.g. 90d, 12h, 30m or 5s)")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]


def option(
    default: Any,
    doc: str,
    *,
    flag: str | None = None,
    kind: str = "",
    check: Validator | None = None,
) -> Any:
    """Declare one setting: its default, documentation, CLI flag, parsing kind and validator."""
    return field(default=default, metadata={"doc": doc, "flag": flag, "kind": kind, "check": check})


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _not_negative(value: float) -> str | None:
    return None if value >= 0 else "must not be negative"


def _port(value: int) -> str | None:
    return None if 0 < value < 65536 else "must be between 1 and 65535"


def _each(parse: Callable[[str], object]) -> Validator:
    def check(values: tuple[str, ...]) -> str | None:
        problems = []
        for item in values:
            try:
                parse(item)
            except ValueError as exc:
                problems.append(str(exc))
        return "; ".join(problems) or None

    return check


def _cidr(value: str) -> object:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(
            f"{value!r} is not an IP address or CIDR (write e.g. 10.0.0.0/8)"
        ) from None


def _database_uri(value: str) -> str | None:
    if not value:
        return None
    scheme = value.split(":", 1)[0]
    if scheme.split("+", 1)[0] not in {"sqlite", "postgresql"}:
        return f"{scheme!r} is not supported (use sqlite:///PATH or postgresql://...)"
    return None


def _origin(kind: str, example: str) -> Validator:
    """A check for an http(s) scheme://host[:port] setting (no path, query or credentials)."""

    def check(value: str) -> str | None:
        if not value:
            return None
        try:
            parts = urlsplit(value)
            host = parts.hostname
        except ValueError:  # e.g. an unclosed IPv6 bracket
            host = None
        if not host or parts.scheme not in {"http", "https"}:
            return f"{value!r} is not an http(s) {kind} (write e.g. {example})"
        if parts.path not in {"", "/"} or parts.query or parts.fragment or parts.username:
            return f"{value!r} must be scheme://host[:port] only (no path, query or credentials)"
        return None

    return check


_upstream_url = _origin("URL", "http://127.0.0.1:5001")
_public_url = _origin("origin", "https://mlflow.example.com")


def _log_level(value: str) -> str | None:
    levels = {"debug", "info", "warning", "error"}
    return None if value in levels else f"must be one of {', '.join(sorted(levels))}"


def _frame_ancestors(value: str) -> str | None:
    if not value.strip() or any(c in value for c in ";,\r\n"):
        return "must be a CSP source list such as 'self' or 'none' (no ';' or ',')"
    return None


@dataclass(frozen=True)
class GatewaySettings:
    host: str = option("127.0.0.1", "Address the gateway listens on.", flag="--host")
    port: int = option(5000, "Port the gateway listens on.", flag="--port", check=_port)
    workers: int = option(
        1,
        "Gateway processes serving requests, each on its own core with its own audit chain "
        "(one embedded MLflow serves them all). Raise it when the gateway's process is busy "
        "near a whole core and the machine has cores to spare; 1 serves from one process.",
        flag="--workers",
        check=_positive,
    )
    allowed_hosts: tuple[str, ...] = option(
        (),
        "Host headers the gateway answers: exact names, *.domain, host:port. Empty means "
        "localhost, 127.0.0.1, [::1] and the bind address.",
        flag="--allowed-hosts",
        check=_each(parse_host_pattern),
    )
    cors_allowed_origins: tuple[str, ...] = option(
        (),
        "Origins (scheme://host[:port]) whose browser scripts may call the gateway with "
        "credentials. No wildcards.",
        flag="--cors-allowed-origins",
        check=_each(parse_origin),
    )
    trusted_proxies: tuple[str, ...] = option(
        (),
        "CIDRs of load balancers whose X-Forwarded-For/-Proto/-Host headers are believed.",
        check=_each(_cidr),
    )
    max_body_size: int = option(
        16 * 1024**2,
        "Largest non-artifact request body read (artifact uploads stream and are not limited).",
        kind="size",
        check=_positive,
    )
    frame_ancestors: str = option(
        "'self'",
        "CSP frame-ancestors source list; 'self' also sends X-Frame-Options SAMEORIGIN, "
        "'none' sends DENY.",
        check=_frame_ancestors,
    )
    hsts_max_age: int = option(
        31536000, "Strict-Transport-Security max-age, sent only over TLS.", check=_positive
    )
    realm: str = option("mlflow-guard", "Realm named in WWW-Authenticate challenges.")
    public_url: str = option(
        "",
        "The origin people and identity providers use (https://mlflow.example.com): the CSRF "
        "origin check, the session cookie's Secure flag and __Host- prefix (https) and redirect "
        "URIs come from it, never from a request's Host. Empty: http://host:port, and the CSRF "
        "origin check accepts http://localhost, 127.0.0.1, [::1] and the bind address on that "
        "port.",
        check=_public_url,
    )
    shutdown_timeout: float = option(
        3.0,
        "Seconds in-flight requests get to finish on shutdown.",
        kind="duration",
        check=_positive,
    )
    log_level: str = option("info", "debug, info, warning or error.", check=_log_level)
    failed_login_limit: int = option(
        30,
        "Refusals of callers who did not log in (401, bad host, ...) one client address may "
        "get per failed_login_interval; past it, 429 instead of 401, and the audit trail counts "
        "them in one summary instead of a record each.",
        check=_positive,
    )
    failed_login_interval: float = option(
        60.0, "The window failed_login_limit counts in.", kind="duration", check=_positive
    )
    failed_login_user_limit: int = option(
        3,
        "Credential failures (a wrong password or unknown name, not an outage) one directory "
        "user name may have per failed_login_user_interval, counted across replicas; then the "
        "gateway stops asking the directory about it (401 login_throttled) until the oldest "
        "ages out. Keep it below the directory's lockout threshold; 0 turns it off.",
        check=_not_negative,
    )
    failed_login_user_interval: float = option(
        1800.0,
        "The window failed_login_user_limit counts in; at least the directory's lockout "
        "observation window (Active Directory: 'Reset account lockout counter after').",
        kind="duration",
        check=_positive,
    )
    header_timeout: float = option(
        10.0,
        "Seconds a connection has to send a whole request head (line and headers), counted from "
        "its opening or the previous answer; past it, 408 header_timeout and the connection "
        "is closed.",
        kind="duration",
        check=_positive,
    )
    body_timeout: float = option(
        300.0,
        "Seconds a buffered (non-artifact) request body has to arrive whole, counted while the "
        "gateway waits for it; past it, 408 body_timeout and the connection is closed.",
        kind="duration",
        check=_positive,
    )
    body_idle_timeout: float = option(
        60.0,
        "Longest wait for the next piece of any request body, artifact uploads included; also "
        "how far a body may fall behind min_upload_rate. Past it, 408 body_timeout (an upload "
        "already being forwarded is abandoned) and the connection is closed.",
        kind="duration",
        check=_positive,
    )
    min_upload_rate: int = option(
        1024,
        "Bytes per second every request body must keep up, with body_idle_timeout of slack: "
        "each byte received earns 1/min_upload_rate s of waiting, at most body_idle_timeout "
        "banked; 0 for none.",
        kind="size",
        check=_not_negative,
    )
    max_connections_per_client: int = option(
        100,
        "Open connections one client address may hold (trusted_proxies are exempt); one more "
        "is answered 429 too_many_connections and closed.",
        check=_positive,
    )
    max_header_count: int = option(
        100, "Most header fields in one request (431 headers_too_large).", check=_positive
    )
    max_header_size: int = option(
        32 * 1024,
        "Largest total size of one request's header fields, counted while they arrive "
        "(431 headers_too_large).",
        kind="size",
        check=_positive,
    )
    max_url_length: int = option(
        16 * 1024,
        "Longest request target, path and query string (414 uri_too_long).",
        kind="size",
        check=_positive,
    )
    max_query_params: int = option(
        1000,
        "Most query string parameters in one request (400 too_many_parameters).",
        check=_positive,
    )


@dataclass(frozen=True)
class StorageSettings:
    data_dir: str = option(
        "./mlflow-guard-data",
        "Directory for the gateway's own files (database, secret key, embedded MLflow).",
        flag="--data-dir",
    )
    database_uri: str = option(
        "",
        "The gateway's own database; empty means sqlite:///<data_dir>/guard.db. "
        "PostgreSQL: postgresql://user:pass@host/db (may be MLflow's database).",
        flag="--database-uri",
        check=_database_uri,
    )
    secret_key_file: str = option(
        "",
        "File holding the key tokens are HMACed with; empty means <data_dir>/secret.key, "
        "created on first use. MLFLOW_GUARD_SECRET_KEY overrides it.",
    )


@dataclass(frozen=True)
class UpstreamSettings:
    url: str = option(
        "",
        "An existing MLflow server to front; empty starts the embedded one.",
        flag="--upstream-url",
        check=_upstream_url,
    )
    connect_timeout: float = option(
        5.0, "Seconds to open a connection to MLflow.", kind="duration", check=_positive
    )
    read_timeout: float = option(
        300.0,
        "Seconds MLflow may stay silent while answering (large artifacts, slow searches).",
        kind="duration",
        check=_positive,
    )
    pool_timeout: float = option(
        5.0,
        "Seconds a request waits for a free upstream connection before 503 upstream_busy.",
        kind="duration",
        check=_positive,
    )
    max_connections: int = option(64, "Most concurrent connections to MLflow.", check=_positive)
    allow_unverified_mlflow: bool = option(
        False,
        "Forward to an MLflow release the route table was not verified against (logged loudly).",
        flag="--allow-unverified-mlflow",
    )
    strict_version: bool = option(
        False,
        "Refuse a patch release of a verified minor that is not itself verified (otherwise it is "
        "served with a loud warning).",
    )
    workspaces: bool = option(
        False,
        "MLflow runs with --enable-workspaces: the X-MLflow-Workspace header is forwarded to "
        "members of that workspace and every grant on experiments, models and skills names its "
        "workspace (WORKSPACE/experiment:NAME); checked against MLflow's server-info.",
    )
    keepalive_expiry: float = option(
        4.0,
        "Seconds an idle upstream connection is kept; keep it below MLflow's keep-alive timeout.",
        kind="duration",
        check=_positive,
    )


@dataclass(frozen=True)
class MlflowSettings:
    backend_store_uri: str = option(
        "",
        "Embedded MLflow's backend store; empty means sqlite:///<data_dir>/mlflow/mlflow.db.",
        flag="--backend-store-uri",
    )
    default_artifact_root: str = option(
        "",
        "Embedded MLflow's default artifact root; empty means mlflow-artifacts:/ when "
        "serve_artifacts is on.",
        flag="--default-artifact-root",
    )
    artifacts_destination: str = option(
        "",
        "Where the embedded MLflow stores proxied artifacts; empty means "
        "<data_dir>/mlflow/artifacts.",
    )
    serve_artifacts: bool = option(
        True,
        "Let the embedded MLflow proxy artifact uploads and downloads.",
        flag="--serve-artifacts",
    )
    startup_timeout: float = option(
        120.0,
        "Seconds to wait for the embedded MLflow to become healthy.",
        kind="duration",
        check=_positive,
    )
    restart_backoff_max: float = option(
        30.0,
        "Longest pause between restarts of a crashed embedded MLflow.",
        kind="duration",
        check=_positive,
    )


@dataclass(frozen=True)
class TokenSettings:
    default_expiry: float = option(
        90 * 86400.0,
        "Lifetime of a new token when --expires is not given.",
        kind="duration",
        check=_positive,
    )
    cache_ttl: float = option(
        5.0,
        "Seconds a verified token is trusted without asking the database (a revocation anywhere "
        "drops it sooner, see authz.revocation_poll_interval). 0 asks every time.",
        kind="duration",
    )
    personal_max_expiry: float = option(
        90 * 86400.0,
        "Longest lifetime of a personal token (one a person creates for themselves at "
        "/guard/tokens); a longer expiry asked for is refused.",
        kind="duration",
        check=_positive,
    )


@dataclass(frozen=True)
class AuthzSettings:
    poll_interval: float = option(
        0.5,
        "Seconds between checks for a policy change made by another replica or the CLI.",
        kind="duration",
        check=_positive,
    )
    revocation_poll_interval: float = option(
        0.5,
        "Seconds between checks for a revocation made by another replica or the CLI (a token "
        "revoked, a session ended, a person blocked); each replica then drops every token, "
        "login and JWT it cached.",
        kind="duration",
        check=_positive,
    )
    protected_aliases: tuple[str, ...] = option(
        ("*",),
        "Aliases whose setting or deletion needs promote (patterns; * is every alias). Other "
        "aliases need update.",
    )
    validation_tags: tuple[str, ...] = option(
        ("validation_status",),
        "Model version and registered model tag keys whose writing or deletion needs promote "
        "(patterns), including tags given when a version is created.",
    )
    search_max_pages: int = option(
        10,
        "Upstream pages a filtered search reads at most to fill one page for a caller who may "
        "not see everything (a shorter page and a next-page token come back past it).",
        check=_positive,
    )
    cache_size: int = option(
        10000,
        "Most resource lookups (run -> experiment, experiment id -> name) kept in memory.",
        check=_positive,
    )
    cache_ttl: float = option(
        60.0,
        "Seconds a resource lookup is trusted; renames and deletes seen by this replica are "
        "forgotten at once, those made elsewhere within this time.",
        kind="duration",
        check=_positive,
    )
    negative_cache_ttl: float = option(
        5.0,
        "Seconds an id or name MLflow does not know is remembered as unknown, so that unknown "
        "and known-but-forbidden ids cost the same; creates seen by this replica clear it at "
        "once, those made through another replica take effect within this time. 0 turns it off.",
        kind="duration",
    )
    max_ids_per_request: int = option(
        1000,
        "Most ids one request may name in the lists it is authorized on (a search's "
        "experiment_ids, a batch's run_ids or trace_ids, a GraphQL document's ids), each a lookup "
        "before the request is forwarded; more is refused (400 too_many_ids) before any lookup.",
        check=_positive,
    )


def _sync_writes(value: str) -> str | None:
    modes = ("before-forward", "before-response")
    return None if value in modes else f"must be one of {', '.join(modes)}"


@dataclass(frozen=True)
class AuditSettings:
    enabled: bool = option(
        True,
        "Record every request in the audit trail. Off only for development and benchmarks: "
        "with it off nothing is recorded at all.",
    )
    spool_dir: str = option(
        "",
        "Local directory where records are fsynced before a request is forwarded; empty means "
        "<data_dir>/audit. One per gateway process (it is locked); keep it on a local disk.",
    )
    segment_size: int = option(
        64 * 1024**2,
        "Bytes per spool file before the next one starts; stored files are deleted.",
        kind="size",
        check=_positive,
    )
    batch_size: int = option(
        500, "Records stored in the database per transaction.", check=_positive
    )
    shutdown_grace: float = option(
        5.0,
        "Seconds a stopping gateway spends storing spooled records in the database; what is "
        "left is stored by the next start.",
        kind="duration",
    )
    sync_writes: str = option(
        "before-forward",
        "When a write's intent record is fsynced: before-forward (before MLflow sees the write) "
        "or before-response (while MLflow applies it, the answer held until it is durable: "
        "faster, but a power loss can leave a change in MLflow without its record, and a failed "
        "fsync answers 503 for a write MLflow applied, which clients retry). Reads are always "
        "fsynced while MLflow answers.",
        check=_sync_writes,
    )
    loop_fsync_limit: float = option(
        0.002,
        "How long a group commit (the fsync of what the requests of one event-loop turn "
        "wrote) may block the event loop, on average: while commits are this quick the loop "
        "does them itself, the cheapest way; slower (or one 64 times slower), the next "
        "second's commits go to the spool's own thread. 0 sends every one there: for a disk "
        "whose fsync may hang (network storage), which would otherwise stop the loop, probes "
        "included.",
        kind="duration",
        check=_not_negative,
    )


def _cookie_name(value: str) -> str | None:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value) or value.startswith("__"):
        return "must be 1-64 letters, digits, '_', '.' or '-', not starting with '__'"
    return None


def _ldap_url(value: str) -> object:
    parts = urlsplit(value)
    if parts.scheme not in {"ldap", "ldaps"} or not parts.hostname:
        raise ValueError(f"{value!r} is not an LDAP URL (write e.g. ldaps://dc1.example.com)")
    if parts.path not in {"", "/"} or parts.query or parts.fragment or parts.username:
        raise ValueError(f"{value!r} must be ldap[s]://host[:port] only")
    return parts


def _name_forms(values: tuple[str, ...]) -> str | None:
    known = ("plain", "domain", "upn")
    if not values:
        return f"must name at least one of {', '.join(known)}"
    wrong = [v for v in values if v not in known]
    return f"{', '.join(wrong)}: not one of {', '.join(known)}" if wrong else None


@dataclass(frozen=True)
class LdapSettings:
    urls: tuple[str, ...] = option(
        (),
        "LDAP servers, tried in order (failover): ldaps://host or ldap://host (with start_tls "
        "unless on loopback). LDAP login is on when this is set.",
        check=_each(_ldap_url),
    )
    bind_dn: str = option(
        "",
        "Service account that searches for users (search then bind); empty means a direct bind "
        "with bind_dn_template.",
    )
    bind_password: str = option(
        "",
        "The service account's password; prefer the environment variable or bind_password_file "
        "over writing it into the file.",
    )
    bind_password_file: str = option(
        "", "File holding the service account's password (one line; trailing newline ignored)."
    )
    user_base: str = option("", "Where users are searched (e.g. ou=people,dc=example,dc=org).")
    user_filter: str = option(
        "(uid={username})",
        "Search filter for a user; {username} is the typed name, filter-escaped. AD: "
        "(sAMAccountName={username}).",
    )
    user_attribute: str = option(
        "uid",
        "Attribute whose value (the entry's spelling) names the user: user:<value>. AD: "
        "sAMAccountName.",
    )
    id_attribute: str = option(
        "entryUUID",
        "Attribute holding the entry's stable id, which binds user:<name> to that entry (the "
        "first login claims the name). AD: objectGUID (binary, read as a GUID string).",
    )
    bind_dn_template: str = option(
        "",
        "Direct bind without a service account: the user's DN, {username} DN-escaped (e.g. "
        "uid={username},ou=people,dc=example,dc=org).",
    )
    name_forms: tuple[str, ...] = option(
        ("plain",),
        "Accepted user name forms: plain (alice), domain (DOMAIN\\alice), upn (alice@domain); "
        "the domain part is dropped before the search.",
        check=_name_forms,
    )
    group_base: str = option(
        "", "Where groups are searched; empty (and use_memberof off) means no groups."
    )
    group_filter: str = option(
        "(member={dn})", "Filter for the groups of an entry; {dn} is its DN, filter-escaped."
    )
    group_attribute: str = option("cn", "Attribute whose value names a group: group:ldap/<value>.")
    use_memberof: bool = option(
        False, "Read groups from the user's memberOf (and the groups' own) instead of searching."
    )
    nested_groups: int = option(
        5,
        "Levels of nested groups followed beyond the direct ones (loops end); 0 is none.",
        check=_not_negative,
    )
    ad_in_chain: bool = option(
        False,
        "Active Directory: find direct and nested groups in one search under group_base with "
        "the in-chain matching rule (member:1.2.840.113556.1.4.1941:=<dn>) instead of walking "
        "them; group_filter and nested_groups are not used. A directory that does not implement "
        "the rule (OpenLDAP) fails logins as unavailable rather than finding no groups.",
    )
    page_size: int = option(
        500, "Entries per page of a group search; 0 turns paging off.", check=_not_negative
    )
    start_tls: bool = option(False, "Upgrade ldap:// connections with StartTLS (verified).")
    ca_file: str = option(
        "",
        "CA certificates (PEM) that verify the server, and the only ones trusted; empty means "
        "libldap's default CA file (TLS_CACERT in ldap.conf or LDAPTLS_CACERT; Debian's is the "
        "system bundle), else the system's.",
    )
    connect_timeout: float = option(
        5.0,
        "Seconds to connect to one server before trying the next.",
        kind="duration",
        check=_positive,
    )
    timeout: float = option(
        10.0, "Seconds one LDAP operation may take.", kind="duration", check=_positive
    )
    follow_referrals: bool = option(False, "Chase referrals the directory returns.")
    pool_size: int = option(
        4,
        "Connections kept bound as the service account (and concurrent logins).",
        check=_positive,
    )
    cache_ttl: float = option(
        60.0,
        "Seconds a successful login is trusted without asking the directory; a disabled "
        "account or changed password takes effect within this time. 0 asks every time.",
        kind="duration",
        check=_not_negative,
    )
    cache_size: int = option(10000, "Most cached logins kept in memory.", check=_positive)
    group_refresh: float = option(
        900.0,
        "Seconds a browser session keeps the directory groups it read before the service account "
        "reads them again, so removing someone from a group takes effect; a deleted or disabled "
        "entry ends the session. Without a service account (bind_dn_template) the session ends "
        "instead.",
        kind="duration",
        check=_positive,
    )


@dataclass(frozen=True)
class SessionSettings:
    idle_timeout: float = option(
        3600.0,
        "Seconds a browser session lasts without a request.",
        kind="duration",
        check=_positive,
    )
    absolute_timeout: float = option(
        43200.0,
        "Seconds a browser session lasts at most, however busy; then the person logs in again.",
        kind="duration",
        check=_positive,
    )
    cookie_name: str = option(
        "mlflow_guard_session",
        "Name of the session cookie; __Host- is put before it when gateway.public_url is https.",
        check=_cookie_name,
    )


_ALGORITHMS: Final = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                      "ES512", "EdDSA")  # fmt: skip
_LOOPBACK_NAMES: Final = frozenset({"localhost"})


def is_loopback_host(host: str | None) -> bool:
    """127.0.0.0/8, ::1 or localhost: where plain http is allowed for an identity provider."""
    if not host:
        return False
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _issuer(value: str) -> str | None:
    if not value:
        return None
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        return f"{value!r} is not a URL (write e.g. https://login.example.com/realms/main)"
    if parts.scheme not in {"http", "https"} or not host:
        return f"{value!r} is not an https URL (write e.g. https://login.example.com/realms/main)"
    if parts.query or parts.fragment or parts.username or parts.password:
        return f"{value!r} must have no query, fragment or credentials"
    if parts.scheme == "http" and not is_loopback_host(host):
        return f"{value!r} must be https (plain http only on loopback)"
    return None


def _required_issuer(value: str) -> str | None:
    return (
        "required (the issuer URL, exactly as in its tokens' iss)" if not value else _issuer(value)
    )


def _required(value: str) -> str | None:
    return None if value else "required"


def _alias(value: str) -> str | None:
    # The policy index honours source-qualified groups only as group:[a-z][a-z0-9-]*/...
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,31}", value):
        return "must be 1-32 lowercase letters, digits or '-', starting with a letter"
    return None


def _algorithms(values: tuple[str, ...]) -> str | None:
    if not values:
        return f"must name at least one of {', '.join(_ALGORITHMS)}"
    wrong = [v for v in values if v not in _ALGORITHMS]
    if wrong:
        return (
            f"{', '.join(wrong)}: not allowed (none and HMAC are never accepted; use "
            f"{', '.join(_ALGORITHMS)})"
        )
    return None


def _scopes(values: tuple[str, ...]) -> str | None:
    if "openid" not in values:
        return "must contain openid"
    if any(not re.fullmatch(r"[\x21\x23-\x5b\x5d-\x7e]+", v) for v in values):
        return "each scope is one token of printable characters (no spaces, quotes or '\\')"
    return None


def _redirect_uri(value: str) -> str | None:
    if not value:
        return None
    try:
        parts = urlsplit(value)
        host = parts.hostname
    except ValueError:
        return f"{value!r} is not a URL"
    if parts.scheme not in {"http", "https"} or not host:
        return f"{value!r} is not an http(s) URL"
    if parts.path != "/guard/oidc/callback" or parts.query or parts.fragment or parts.username:
        return (
            f"{value!r} must be scheme://host[:port]/guard/oidc/callback (the gateway's "
            "callback; no query, fragment or credentials)"
        )
    return None


def _leeway(value: float) -> str | None:
    if value < 0:
        return "must not be negative"
    return None if value <= 300 else "must be at most 5m (it only absorbs clock skew)"


_ALGORITHMS_DOC: Final = (
    "JWT signature algorithms accepted (from RS256/384/512, PS256/384/512, ES256/384/512, "
    "EdDSA); none and HMAC (HS*) are always refused."
)


@dataclass(frozen=True)
class OidcBearerSettings:
    """One trusted issuer of machine tokens: a ``[[oidc.bearer]]`` table."""

    alias: str = option(
        "",
        "Required. Names this issuer in subjects: client:<alias>/<subject> and "
        "group:<alias>/<name>; lowercase letters, digits and '-', starting with a letter, "
        "unique, never ldap.",
        check=lambda value: _required(value) or _alias(value),
    )
    issuer: str = option(
        "",
        "Required. The issuer URL, exactly as in its tokens' iss (https except on loopback); "
        "its keys come only from the jwks_uri its discovery document names.",
        check=_required_issuer,
    )
    audience: str = option(
        "",
        "Required. The aud a token must carry for this gateway (e.g. urn:mlflow-guard); never "
        "oidc.client_id, so ID tokens are not API credentials.",
        check=_required,
    )
    subject_claim: str = option(
        "",
        "Claim naming the machine: client:<alias>/<value>. Empty: client_id, else azp, else sub.",
    )
    groups_claim: str = option(
        "",
        "Claim holding the machine's groups (a list of names), each group:<alias>/<name>; empty "
        "means none.",
    )
    allowed_algorithms: tuple[str, ...] = option(
        ("RS256", "PS256", "ES256"), _ALGORITHMS_DOC, check=_algorithms
    )
    require_typ: bool = option(
        False,
        "The issuer marks its access tokens typ at+jwt (RFC 9068): refuse tokens without it. "
        "Off: a generic JWT or no typ is also accepted (Kubernetes, Keycloak, Entra ID send none).",
    )


@dataclass(frozen=True)
class OidcSettings:
    issuer: str = option(
        "",
        "OpenID Connect provider for browser single sign-on, exactly as in its tokens' iss "
        "(https except on loopback); its discovery document is read from "
        "<issuer>/.well-known/openid-configuration. SSO is on when this is set.",
        check=_issuer,
    )
    alias: str = option(
        "oidc",
        "Names the provider in subjects: its groups become group:<alias>/<name>; lowercase "
        "letters, digits and '-', starting with a letter, never ldap.",
        check=_alias,
    )
    client_id: str = option("", "The gateway's client id at the provider (required for SSO).")
    client_secret: str = option(
        "",
        "The gateway's client secret; prefer the environment variable or client_secret_file "
        "over writing it into the file.",
    )
    client_secret_file: str = option(
        "", "File holding the client secret (one line; trailing newline ignored)."
    )
    redirect_uri: str = option(
        "",
        "The callback URI registered at the provider, compared exactly; empty means "
        "gateway.public_url + /guard/oidc/callback.",
        check=_redirect_uri,
    )
    scopes: tuple[str, ...] = option(
        ("openid", "profile", "email"),
        "Scopes asked for at login; must contain openid. Nothing is added for groups_claim: "
        "add the scope your provider needs to send groups (often groups).",
        check=_scopes,
    )
    username_claim: str = option(
        "preferred_username",
        "ID token claim naming the person: user:<value>. Without it: email when email_verified "
        "is true, else sub. The name is bound to the provider's (issuer, sub) at first login.",
        check=_required,
    )
    groups_claim: str = option(
        "",
        "ID token claim holding the person's groups (a list of names), each "
        "group:<alias>/<name>; empty means no groups from the provider.",
    )
    allowed_algorithms: tuple[str, ...] = option(
        ("RS256", "PS256", "ES256"), _ALGORITHMS_DOC, check=_algorithms
    )
    end_provider_session: bool = option(
        True,
        "Logout also ends the provider's session when it has an end_session_endpoint.",
    )
    timeout: float = option(
        10.0,
        "Seconds one call to an identity provider (discovery, keys, token endpoint) may take; "
        "SSO and bearer issuers alike.",
        kind="duration",
        check=_positive,
    )
    jwks_refresh_interval: float = option(
        60.0,
        "Least seconds between two fetches of an issuer's keys for a token whose kid is "
        "unknown (key rotation); tokens with other unknown kids are refused meanwhile.",
        kind="duration",
        check=_positive,
    )
    leeway: float = option(
        60.0,
        "Seconds of clock skew allowed when checking exp, nbf and iat of provider tokens "
        "(at most 5m).",
        kind="duration",
        check=_leeway,
    )
    bearer: tuple[OidcBearerSettings, ...] = field(
        default=(),
        metadata={
            "doc": "Trusted issuers of machine tokens (Authorization: Bearer <JWT>), one "
            "[[oidc.bearer]] table each; in the environment, a JSON list of objects.",
            "flag": None,
            "kind": "tables",
            "check": None,
        },
    )


@dataclass(frozen=True)
class Settings:
    gateway: GatewaySettings = field(default_factory=GatewaySettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    upstream: UpstreamSettings = field(default_factory=UpstreamSettings)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)
    tokens: TokenSettings = field(default_factory=TokenSettings)
    authz: AuthzSettings = field(default_factory=AuthzSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)
    ldap: LdapSettings = field(default_factory=LdapSettings)
    sessions: SessionSettings = field(default_factory=SessionSettings)
    oidc: OidcSettings = field(default_factory=OidcSettings)

    @property
    def data_dir(self) -> Path:
        return Path(self.storage.data_dir).resolve()

    @property
    def database_uri(self) -> str:
        return self.storage.database_uri or f"sqlite:///{self.data_dir / 'guard.db'}"

    @property
    def secret_key_file(self) -> Path:
        return Path(self.storage.secret_key_file or self.data_dir / "secret.key").resolve()

    @property
    def audit_spool_dir(self) -> Path:
        return Path(self.audit.spool_dir or self.data_dir / "audit").resolve()

    @property
    def public_url(self) -> str:
        """The gateway's origin as people reach it: gateway.public_url, else http://host:port."""
        if self.gateway.public_url:
            return self.gateway.public_url.rstrip("/")
        host = self.gateway.host
        host = f"[{host}]" if ":" in host else host
        return f"http://{host}:{self.gateway.port}"

    @property
    def own_origins(self) -> tuple[str, ...]:
        """The origins of the gateway's own pages, for the CSRF origin checks: exactly
        gateway.public_url when it is set; else http://H:port for each host answered by default
        (localhost, 127.0.0.1, [::1], the bind address), since a person may type any of them."""
        if self.gateway.public_url:
            return (self.public_url,)
        port = self.gateway.port
        return tuple(f"http://{host}:{port}" for host in default_allowed_hosts(self.gateway.host))

    @property
    def oidc_redirect_uri(self) -> str:
        """Where the provider sends the browser back: oidc.redirect_uri, else public_url +
        /guard/oidc/callback."""
        return self.oidc.redirect_uri or f"{self.public_url}/guard/oidc/callback"

    @property
    def embedded(self) -> bool:
        return not self.upstream.url
