"""LDAP and Active Directory: HTTP Basic credentials checked against a directory.

The only module that imports python-ldap (untyped): everything it returns is turned into ``str``
here. A Basic password is the directory's unless it is a gateway token (``mlg_`` prefix, the token
provider's); Bearer credentials are never the directory's.

How a login is checked: a service account searches ``user_base`` with ``user_filter`` (the typed
name filter-escaped), then the entry's DN binds with the password (search then bind); without a
service account the DN comes from ``bind_dn_template`` (the name DN-escaped) and the user reads
their own entry. An unknown user still costs one bind (against a fixed dummy DN), so it answers
like a wrong password, in about the same time. A successful login is cached for ``cache_ttl``,
keyed by a salted hash of the credentials, and only until the revocation counter moves
(``guard.identity.revocations``: a block anywhere drops every cached login at the next poll).

Per-user throttle (guard.identity.throttle): before a real bind (never for a cached login) the
name is checked against its recent credential failures; a locked name is refused with 401
``login_throttled`` without asking the directory, so its own lockout threshold is never reached
through the gateway. A refused bind counts (the audit record gets the name and, from Active
Directory's ``data`` codes, why: ``directory_reason``); an outage does not.

Connections: the URLs are tried in order (failover), with connect and operation timeouts,
referrals not chased unless configured, ``ldaps://`` or StartTLS verified (see TLS below) and
never unverified. A small pool keeps connections bound as the service account; one used for a
user's bind is rebound as the service account before it goes back, and one that failed is
discarded. Every python-ldap call blocks, so logins run in worker threads.
The directory unreachable is 503 ``identity_unavailable``: the gateway failing, not a failed login.

TLS: every TLS option is set on the connection itself, ``OPT_X_TLS_NEWCTX`` last (libldap builds
the connection's TLS context from the options set before it and ignores any set after), with
``OPT_X_TLS_REQUIRE_CERT`` DEMAND (certificate and host name checked), TLS 1.2 at least, and
the CA file: ``ca_file``, or when empty libldap's configured default read once at start
(``TLS_CACERT`` of ldap.conf or ``LDAPTLS_CACERT``; Debian's is the system bundle), else the
system's. A new connection inherits no CA paths from libldap's defaults, so ``LDAPTLS_*``,
``~/.ldaprc`` and ``ldaprc`` cannot loosen a connection: ``TLS_REQCERT never`` is overridden and,
with ``ca_file`` set, no other CA is trusted. StartTLS that fails or that the server refuses
ends that server's attempt (the next URL is tried); nothing is ever sent in clear instead. A
failed handshake is logged as a TLS failure with the URL (libldap's error does not say why:
the certificate's CA is unknown or it does not name the host); for ``ldaps://`` libldap reports
it like a server that is down, so a TCP probe tells the two apart in the log.

Subjects: ``user:<name>`` from the entry's ``user_attribute`` (its canonical spelling, not what
was typed) and ``group:ldap/<name>`` from each group's ``group_attribute``, both by
``subject_name``. Groups come from ``memberOf`` or a group search, nested ones followed to
``nested_groups`` levels with loops tolerated. With ``ad_in_chain`` (Active Directory) one
search under ``group_base`` with the in-chain matching rule finds the direct and nested groups;
a directory that does not implement the rule would answer it with no groups at all, so the
directory must show it does (AD's ``supportedCapabilities`` in the root DSE, or the rule in its
schema's ``matchingRules``) or the login fails as unavailable.

Group refresh: a browser session keeps the groups read at login and asks ``refresh`` again at
most every ``group_refresh`` seconds. The service account looks the name up again (no
password): a fresh principal while the entry has the same stable id; None (the session ends)
when the entry is gone, its id changed, or AD says the account is disabled; 503
``identity_unavailable`` when the directory cannot answer (the caller keeps the old groups).
Without a service account nothing can be read without the user's password, so a session of
a ``bind_dn_template`` directory ends at its first refresh.

Bindings: the entry's stable id (``id_attribute``: ``entryUUID``, or AD's binary ``objectGUID``
read as a GUID string) binds ``user:<name>`` to that entry at its first login
(guard.identity.bindings); a login of the name by another entry is 403 ``identity_conflict``.
The claim runs in the same worker thread as the directory login (a burst shares both), and a
cached login needs neither. An entry without the id attribute cannot be bound and is refused
with 500 ``internal_error`` (the directory or ``id_attribute`` is misconfigured: not the
caller's credentials, so no 401 and no failed-login count; not transient, so no 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import re
import secrets
import socket
import ssl
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any, Final
from urllib.parse import urlsplit

import anyio
import anyio.to_thread
import ldap
import ldap.dn
import ldap.filter
import sqlalchemy as sa
from ldap.controls import SimplePagedResultsControl

from guard.errors import Refusal
from guard.identity.base import Credentials, DirectorySubject, Principal
from guard.identity.bindings import Binding, IdentityBindings
from guard.identity.revocations import Counter
from guard.identity.throttle import LoginThrottle
from guard.identity.tokens import is_token

logger = logging.getLogger(__name__)

SOURCE: Final = "ldap"
NAME_FORMS: Final = frozenset({"plain", "domain", "upn"})  # alice, DOMAIN\alice, alice@domain
MAX_NAME: Final = 256  # characters of a typed user name
MAX_PASSWORD: Final = 1024
MAX_PAGES: Final = 1000  # pages one paged search may take
DUMMY_RDN: Final = "cn=mlflow-guard-no-such-user"
_SAFE: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._@-")
_UNREACHABLE: Final = (ldap.SERVER_DOWN, ldap.TIMEOUT, ldap.CONNECT_ERROR)
IN_CHAIN: Final = "1.2.840.113556.1.4.1941"  # LDAP_MATCHING_RULE_IN_CHAIN (Active Directory)
# supportedCapabilities of directories that implement it: AD DS (LDAP_CAP_ACTIVE_DIRECTORY_OID,
# also what Samba's AD DC says) and AD LDS (LDAP_CAP_ACTIVE_DIRECTORY_ADAM_OID).
IN_CHAIN_CAPABILITIES: Final = frozenset({"1.2.840.113556.1.4.800", "1.2.840.113556.1.4.1851"})
ACCOUNT_DISABLED: Final = 0x2  # userAccountControl's ACCOUNTDISABLE bit (Active Directory)

Entry = tuple[str, dict[str, list[bytes]]]


def subject_name(value: str) -> str:
    """The one naming rule for directory users and groups: the entry's own value, case-folded,
    each character outside ``[a-z0-9._@-]`` percent-encoded as its UTF-8 bytes (``%`` itself
    included, so two different names never meet). ``Risk Team`` -> ``risk%20team``."""
    return "".join(
        c if c in _SAFE else "".join(f"%{b:02X}" for b in c.encode()) for c in value.casefold()
    )


@dataclass(frozen=True)
class LdapConfig:
    """What the provider needs from the ``[ldap]`` settings (see guard/settings.py)."""

    urls: tuple[str, ...]
    bind_dn: str = ""
    bind_password: str = ""
    user_base: str = ""
    user_filter: str = "(uid={username})"
    user_attribute: str = "uid"
    id_attribute: str = "entryUUID"
    bind_dn_template: str = ""
    name_forms: tuple[str, ...] = ("plain",)
    group_base: str = ""
    group_filter: str = "(member={dn})"
    group_attribute: str = "cn"
    use_memberof: bool = False
    nested_groups: int = 5
    page_size: int = 500
    start_tls: bool = False
    ca_file: str = ""
    connect_timeout: float = 5.0
    timeout: float = 10.0
    follow_referrals: bool = False
    pool_size: int = 4
    cache_ttl: float = 60.0
    cache_size: int = 10000
    ad_in_chain: bool = False
    group_refresh: float = 900.0


class DirectoryUnavailable(Exception):
    """No configured server answered in time."""


class TlsFailure(Exception):
    """TLS with one server failed: its certificate was not verified, the handshake failed, or
    it refused StartTLS."""


@dataclass(frozen=True)
class DirectoryUser:
    dn: str
    name: str  # the entry's user_attribute, as the entry spells it
    groups: tuple[str, ...]  # group names, as the entries spell them
    stable_id: str = ""  # the entry's id_attribute; "" when the entry has none
    disabled: bool = False  # AD's userAccountControl says so (read by lookup only)


def typed_name(typed: str, forms: tuple[str, ...]) -> str | None:
    """The account name in what the client typed, if its form is accepted, else None."""
    if "\\" in typed:
        domain, _, name = typed.partition("\\")
        return name if "domain" in forms and domain and name and "\\" not in name else None
    if "@" in typed:
        name, _, domain = typed.rpartition("@")
        return name if "upn" in forms and domain and name and "@" not in name else None
    return typed if "plain" in forms and typed else None


def stable_id(attribute: str, values: list[bytes] | None) -> str:
    """The entry's stable id as text: ``objectGUID`` (16 bytes, little-endian fields) as its GUID
    string, any other attribute as UTF-8 (hex when it is not); "" when absent."""
    if not values or not values[0]:
        return ""
    raw = values[0]
    if attribute.lower() == "objectguid" and len(raw) == 16:
        return str(uuid.UUID(bytes_le=raw))
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.hex()


def _text(values: list[bytes] | None) -> str | None:
    if not values:
        return None
    try:
        return values[0].decode("utf-8")
    except UnicodeDecodeError:
        return None


class Directory:
    """The blocking side: connections, the pool, search, bind and group lookup. Thread-safe;
    called from worker threads only."""

    def __init__(self, config: LdapConfig) -> None:
        self.config = config
        self._pool: list[Any] = []
        self._lock = threading.Lock()
        self.binds = 0  # user and dummy binds made, for tests and metrics
        self.refused = threading.local()  # .info: what the directory said of a refused bind
        base = config.user_base or config.bind_dn_template.partition(",")[2]
        self.dummy_dn = f"{DUMMY_RDN},{base}" if base else DUMMY_RDN
        self.ca_file = config.ca_file or default_ca_file()
        self._in_chain_seen = False  # the directory showed it implements the in-chain rule

    # Connections -----------------------------------------------------------------------------

    def _open(self, url: str) -> Any:
        c = self.config
        conn = ldap.initialize(url)
        conn.set_option(ldap.OPT_PROTOCOL_VERSION, 3)
        conn.set_option(ldap.OPT_REFERRALS, 1 if c.follow_referrals else 0)
        conn.set_option(ldap.OPT_NETWORK_TIMEOUT, c.connect_timeout)
        conn.set_option(ldap.OPT_TIMEOUT, c.timeout)
        if url.lower().startswith("ldaps://") or c.start_tls:
            conn.set_option(ldap.OPT_X_TLS_REQUIRE_CERT, ldap.OPT_X_TLS_DEMAND)
            conn.set_option(ldap.OPT_X_TLS_PROTOCOL_MIN, ldap.OPT_X_TLS_PROTOCOL_TLS1_2)
            if self.ca_file:
                conn.set_option(ldap.OPT_X_TLS_CACERTFILE, self.ca_file)
            conn.set_option(ldap.OPT_X_TLS_NEWCTX, 0)  # must come last: applies the above
        if c.start_tls and not url.lower().startswith("ldaps://"):
            try:
                conn.start_tls_s()  # python-ldap connects lazily: TCP, then StartTLS, here
            except (ldap.SERVER_DOWN, ldap.TIMEOUT):
                _close(conn)
                raise
            except ldap.CONNECT_ERROR:
                _close(conn)
                raise TlsFailure(
                    "StartTLS handshake failed: the certificate is not trusted (ldap.ca_file) "
                    "or does not name this host"
                ) from None
            except ldap.LDAPError as exc:
                _close(conn)
                raise TlsFailure(f"the server refused StartTLS ({_describe(exc)})") from None
        return conn

    def _connect(self, dn: str, password: str) -> Any:
        """A new connection bound as ``dn``, from the first URL that answers. Raises
        DirectoryUnavailable when none does (or the service account cannot bind)."""
        failures = []
        for url in self.config.urls:
            try:
                conn = self._open(url)
                conn.simple_bind_s(dn, password)  # python-ldap connects lazily: here
                return conn
            except TlsFailure as exc:
                logger.error("LDAP server %s: TLS failed, not used: %s", url, exc)
                failures.append(f"{url}: TLS failed")
            except _UNREACHABLE as exc:
                if url.lower().startswith("ldaps://") and self._listening(url):
                    # libldap reports a failed handshake like a server that is down.
                    logger.error(
                        "LDAP server %s: TLS failed, not used: the certificate is not trusted "
                        "(ldap.ca_file) or does not name this host, or the handshake failed "
                        "(%s)", url, type(exc).__name__,
                    )  # fmt: skip
                    failures.append(f"{url}: TLS failed")
                else:
                    logger.warning("LDAP server %s unreachable: %s", url, type(exc).__name__)
                    failures.append(f"{url}: unreachable")
            except ldap.INVALID_CREDENTIALS:
                if dn == self.config.bind_dn:
                    logger.error("LDAP service account %s cannot bind at %s", dn, url)
                    raise DirectoryUnavailable("the service account cannot bind") from None
                raise
        raise DirectoryUnavailable(f"no LDAP server answered ({'; '.join(failures)})")

    def _listening(self, url: str) -> bool:
        """Whether the server behind ``url`` accepts a TCP connection (after an ``ldaps://``
        failure: then it was TLS that failed, not the network)."""
        try:
            parts = urlsplit(url)
            host, port = parts.hostname or "", parts.port or 636
        except ValueError:
            return False
        try:
            with socket.create_connection((host, port), timeout=self.config.connect_timeout):
                return True
        except OSError:
            return False

    def _service(self) -> Any:
        with self._lock:
            if self._pool:
                return self._pool.pop()
        return self._connect(self.config.bind_dn, self.config.bind_password)

    def _release(self, conn: Any) -> None:
        with self._lock:
            if len(self._pool) < self.config.pool_size:
                self._pool.append(conn)
                return
        _close(conn)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, []
        for conn in pool:
            _close(conn)

    # Logins ----------------------------------------------------------------------------------

    def login(self, name: str, password: str) -> DirectoryUser | None:
        """The user, or None for an unknown user or a wrong password (the caller cannot tell
        which). Raises DirectoryUnavailable for anything else the directory answers."""
        try:
            if self.config.bind_dn:
                return self._search_then_bind(name, password, retry=True)
            return self._direct_bind(name, password)
        except ldap.LDAPError as exc:
            raise DirectoryUnavailable(f"{type(exc).__name__}: {_describe(exc)}") from exc

    def _search_then_bind(self, name: str, password: str, retry: bool) -> DirectoryUser | None:
        c = self.config
        conn = self._service()
        try:
            escaped = ldap.filter.escape_filter_chars(name)
            attrs = [c.user_attribute, c.id_attribute, *(["memberOf"] if c.use_memberof else [])]
            found = _entries(
                conn.search_ext_s(
                    c.user_base, ldap.SCOPE_SUBTREE, c.user_filter.format(username=escaped),
                    attrs, sizelimit=2,
                )
            )  # fmt: skip
        except _UNREACHABLE:
            # A pooled connection the server dropped (it restarted?): the others are likely
            # dropped too, so the pool is emptied and one fresh attempt made.
            _close(conn)
            self.close()
            if retry:
                return self._search_then_bind(name, password, retry=False)
            raise
        except ldap.SIZELIMIT_EXCEEDED:
            found = [("", {}), ("", {})]
        except ldap.LDAPError:
            _close(conn)
            raise
        dn = found[0][0] if len(found) == 1 else self.dummy_dn
        if len(found) > 1:
            logger.warning("LDAP: the name %r matches several entries; refused", name)
        try:
            self.binds += 1
            conn.simple_bind_s(dn, password)
            accepted = len(found) == 1
        except ldap.INVALID_CREDENTIALS as exc:
            accepted = False
            self.refused.info = _info(exc)
        except ldap.LDAPError:
            _close(conn)
            raise
        try:
            conn.simple_bind_s(c.bind_dn, c.bind_password)  # back to the service account
            if not accepted:
                self._release(conn)
                return None
            user = self._user(conn, dn, found[0][1])
        except (ldap.LDAPError, DirectoryUnavailable):
            _close(conn)
            raise
        self._release(conn)
        return user

    def _direct_bind(self, name: str, password: str) -> DirectoryUser | None:
        c = self.config
        dn = c.bind_dn_template.format(username=ldap.dn.escape_dn_chars(name))
        try:
            conn = self._connect(dn, password)
        except ldap.INVALID_CREDENTIALS as exc:
            self.refused.info = _info(exc)
            return None
        finally:
            self.binds += 1
        try:
            attrs = [c.user_attribute, c.id_attribute, *(["memberOf"] if c.use_memberof else [])]
            found = _entries(conn.search_ext_s(dn, ldap.SCOPE_BASE, "(objectClass=*)", attrs))
            if len(found) != 1:
                return None
            return self._user(conn, found[0][0], found[0][1])
        finally:
            _close(conn)  # bound as a user: never pooled

    def lookup(self, name: str) -> DirectoryUser | None:
        """The entry called ``name`` (its canonical spelling), with its groups, read by the
        service account without the user's password; None when no single entry has the name.
        ``disabled`` says whether AD's userAccountControl has the account disabled. Raises
        DirectoryUnavailable when the directory does not answer."""
        try:
            return self._lookup(name, retry=True)
        except ldap.LDAPError as exc:
            raise DirectoryUnavailable(f"{type(exc).__name__}: {_describe(exc)}") from exc

    def _lookup(self, name: str, retry: bool) -> DirectoryUser | None:
        c = self.config
        conn = self._service()
        try:
            escaped = ldap.filter.escape_filter_chars(name)
            attrs = [c.user_attribute, c.id_attribute, "userAccountControl",
                     *(["memberOf"] if c.use_memberof else [])]  # fmt: skip
            try:
                found = _entries(
                    conn.search_ext_s(
                        c.user_base, ldap.SCOPE_SUBTREE, c.user_filter.format(username=escaped),
                        attrs, sizelimit=2,
                    )
                )  # fmt: skip
            except ldap.SIZELIMIT_EXCEEDED:
                found = [("", {}), ("", {})]
            if len(found) != 1:
                user = None
            else:
                dn, attributes = found[0]
                user = self._user(conn, dn, attributes)
                control = _text(attributes.get("userAccountControl"))
                if user is not None and control is not None and control.strip().isdigit():
                    user = replace(user, disabled=bool(int(control) & ACCOUNT_DISABLED))
        except _UNREACHABLE:
            _close(conn)
            self.close()  # a pooled connection the server dropped: see _search_then_bind
            if retry:
                return self._lookup(name, retry=False)
            raise
        except (ldap.LDAPError, DirectoryUnavailable):
            _close(conn)
            raise
        self._release(conn)
        return user

    def _user(self, conn: Any, dn: str, attributes: dict[str, list[bytes]]) -> DirectoryUser | None:
        name = _text(attributes.get(self.config.user_attribute))
        if name is None:
            logger.warning("LDAP entry %s has no %s", dn, self.config.user_attribute)
            return None
        sid = stable_id(self.config.id_attribute, attributes.get(self.config.id_attribute))
        if not sid:
            logger.error("LDAP entry %s has no %s (ldap.id_attribute): it cannot log in",
                         dn, self.config.id_attribute)  # fmt: skip
        return DirectoryUser(dn, name, self._groups(conn, dn, attributes), sid)

    # Groups ----------------------------------------------------------------------------------

    def _groups(self, conn: Any, dn: str, attributes: dict[str, list[bytes]]) -> tuple[str, ...]:
        """Group names, direct and nested (to ``nested_groups`` levels; loops end)."""
        c = self.config
        names: dict[str, str] = {}  # group DN (lowered) -> name
        seen: set[str] = {dn.lower()}
        if c.ad_in_chain and c.group_base:
            self._require_in_chain(conn)
            flt = f"(member:{IN_CHAIN}:={ldap.filter.escape_filter_chars(dn)})"
            for group_dn, values in self._search(conn, c.group_base, flt, [c.group_attribute]):
                if (group_name := _text(values.get(c.group_attribute))) is not None:
                    names[group_dn.lower()] = group_name
        elif c.use_memberof:
            frontier = [v.decode("utf-8", "replace") for v in attributes.get("memberOf", [])]
            for _level in range(c.nested_groups + 1):
                nxt: list[str] = []
                for group_dn in frontier:
                    if group_dn.lower() in seen:
                        continue
                    seen.add(group_dn.lower())
                    entry = self._read(conn, group_dn, [c.group_attribute, "memberOf"])
                    if entry is None:
                        continue
                    if (group_name := _text(entry.get(c.group_attribute))) is not None:
                        names[group_dn.lower()] = group_name
                    nxt += [v.decode("utf-8", "replace") for v in entry.get("memberOf", [])]
                frontier = nxt
                if not frontier:
                    break
        elif c.group_base:
            members = [dn]
            for _level in range(c.nested_groups + 1):
                found: list[Entry] = []
                for member in members:
                    flt = c.group_filter.format(dn=ldap.filter.escape_filter_chars(member))
                    found += self._search(conn, c.group_base, flt, [c.group_attribute])
                members = []
                for group_dn, values in found:
                    if group_dn.lower() in seen:
                        continue
                    seen.add(group_dn.lower())
                    members.append(group_dn)
                    if (group_name := _text(values.get(c.group_attribute))) is not None:
                        names[group_dn.lower()] = group_name
                if not members:
                    break
        return tuple(sorted(names.values()))

    def _require_in_chain(self, conn: Any) -> None:
        """Raise DirectoryUnavailable unless the directory shows it implements the in-chain
        matching rule: one that does not (OpenLDAP) answers such a filter with no entries, and a
        login with no groups would quietly lose every group grant and group-based denial."""
        if self._in_chain_seen:
            return
        root = self._read(conn, "", ["supportedCapabilities", "subschemaSubentry"]) or {}
        capabilities = {v.decode("ascii", "replace") for v in root.get("supportedCapabilities", [])}
        supported = bool(capabilities & IN_CHAIN_CAPABILITIES)
        if not supported and (schema_dn := _text(root.get("subschemaSubentry"))):
            schema = self._read(conn, schema_dn, ["matchingRules"]) or {}
            rules = [v.decode("utf-8", "replace") for v in schema.get("matchingRules", [])]
            supported = any(r.strip("( ").startswith(f"{IN_CHAIN} ") for r in rules)
        if not supported:
            logger.error(
                "LDAP: ldap.ad_in_chain is on but the directory does not support the in-chain "
                "matching rule %s (it is not Active Directory: no supportedCapabilities %s, and "
                "the rule is not in its schema); logins fail rather than find no groups. Turn "
                "ad_in_chain off to walk nested groups instead (ldap.nested_groups).",
                IN_CHAIN, " or ".join(sorted(IN_CHAIN_CAPABILITIES)),
            )  # fmt: skip
            raise DirectoryUnavailable("the directory does not support the in-chain matching rule")
        self._in_chain_seen = True

    def _read(self, conn: Any, dn: str, attrs: list[str]) -> dict[str, list[bytes]] | None:
        try:
            found = _entries(conn.search_ext_s(dn, ldap.SCOPE_BASE, "(objectClass=*)", attrs))
        except (ldap.NO_SUCH_OBJECT, ldap.INSUFFICIENT_ACCESS):
            return None
        return found[0][1] if found else None

    def _search(self, conn: Any, base: str, flt: str, attrs: list[str]) -> list[Entry]:
        """Every entry, in pages of ``page_size`` (0: one unpaged search). A search the server
        cuts short is not used partially (a missing group could be one that denies): the
        login fails as unavailable and the log says to turn paging on."""
        if self.config.page_size <= 0:
            try:
                return _entries(conn.search_ext_s(base, ldap.SCOPE_SUBTREE, flt, attrs))
            except ldap.SIZELIMIT_EXCEEDED:
                logger.error("LDAP: a group search under %s hit the server's size limit; "
                             "set ldap.page_size", base)  # fmt: skip
                raise DirectoryUnavailable("group search size limit") from None
        control = SimplePagedResultsControl(True, size=self.config.page_size, cookie=b"")
        entries: list[Entry] = []
        for _ in range(MAX_PAGES):
            msgid = conn.search_ext(base, ldap.SCOPE_SUBTREE, flt, attrs, serverctrls=[control])
            _, data, _, controls = conn.result3(msgid)
            entries += _entries(data)
            cookies = [x.cookie for x in controls if x.controlType == control.controlType]
            if not cookies or not cookies[0]:
                return entries
            control.cookie = cookies[0]
        logger.warning("LDAP: a group search under %s did not end in %d pages", base, MAX_PAGES)
        return entries


def default_ca_file() -> str:
    """The CA file libldap would use by default (``TLS_CACERT`` in ldap.conf, ``LDAPTLS_CACERT``),
    else the system's bundle: a connection's own TLS context does not inherit it."""
    configured = ldap.get_option(ldap.OPT_X_TLS_CACERTFILE)
    if configured:
        return str(configured)
    paths = ssl.get_default_verify_paths()
    return paths.cafile or paths.openssl_cafile


def _entries(data: Any) -> list[Entry]:
    """Search results without referrals (their DN is None; the root DSE's is "")."""
    return [(str(dn), dict(values)) for dn, values in data if dn is not None]


def _describe(exc: Exception) -> str:
    """python-ldap's error text (its argument is a dict with ``desc`` and maybe ``info``)."""
    details = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    return " - ".join(str(details[k]) for k in ("desc", "info") if details.get(k)) or str(exc)


def _info(exc: Exception) -> str:
    details = exc.args[0] if exc.args and isinstance(exc.args[0], dict) else {}
    return str(details.get("info", ""))


# Active Directory says why a bind was refused in the error's text: "..., data 52e, v4563".
AD_REASONS: Final = {
    "525": "no_such_user", "52e": "wrong_password", "530": "not_permitted_at_this_time",
    "531": "not_permitted_at_this_workstation", "532": "password_expired",
    "533": "account_disabled", "701": "account_expired", "773": "must_reset_password",
    "775": "account_locked",
}  # fmt: skip
_AD_DATA: Final = re.compile(r"\bdata ([0-9a-f]{1,8})\b", re.I)


def directory_reason(info: str) -> str:
    """Why the directory refused a bind, from the error's ``info`` (Active Directory's data
    codes; ``data 533`` -> ``account_disabled``); "" when it does not say (OpenLDAP)."""
    if (found := _AD_DATA.search(info)) is None:
        return ""
    code = found.group(1).lower()
    return AD_REASONS.get(code, f"data_{code}")


def _close(conn: Any) -> None:
    with contextlib.suppress(ldap.LDAPError):
        conn.unbind_s()


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one directory login came to: ``wait`` > 0 when the per-user throttle refused it
    (seconds the name stays locked); ``reason`` is the directory's, for the audit record."""

    user: DirectoryUser | None = None
    other: Binding | None = None
    reason: str = ""
    wait: float = 0.0


async def _settle(done: Awaitable[None]) -> None:
    """Record an attempt's end in the throttle; the database failing here leaves at most one
    row too many (counted as a failure) or one lock event unwritten, never a wrong answer."""
    try:
        await done
    except sa.exc.SQLAlchemyError as exc:
        logger.warning("login throttle not updated: %s", exc)


def _duration(seconds: int) -> str:
    return f"{seconds} seconds" if seconds < 120 else f"{math.ceil(seconds / 60)} minutes"


class LdapProvider:
    """HTTP Basic against the directory (see the module docstring)."""

    name = SOURCE

    def __init__(
        self,
        config: LdapConfig,
        clock: Callable[[], float] = time.monotonic,
        bindings: IdentityBindings | None = None,
        throttle: LoginThrottle | None = None,
        revocations: Counter | None = None,
    ) -> None:
        self.config = config
        self.revocations = revocations or Counter()
        self.bindings = bindings  # None: names are not bound (``ldap test``, some unit tests)
        self.throttle = throttle  # None: failures per user name are not limited
        self.directory = Directory(config)
        self.clock = clock
        self._salt = secrets.token_bytes(32)
        # A login: its principal, until when, and the revocation counter it was checked under.
        self._cache: OrderedDict[bytes, tuple[Principal, float, int]] = OrderedDict()
        self._threads = anyio.CapacityLimiter(max(1, config.pool_size))
        self._pending: dict[bytes, asyncio.Future[Attempt]] = {}

    async def authenticate(self, credentials: Credentials) -> Principal | Refusal | None:
        if credentials.scheme != "basic" or is_token(credentials.secret):
            return None
        password = credentials.secret
        if not password:
            return Refusal("invalid_credentials", "An empty password is not accepted.")
        if len(credentials.username) > MAX_NAME or len(password) > MAX_PASSWORD:
            return Refusal("invalid_credentials")
        name = typed_name(credentials.username, self.config.name_forms)
        if name is None:
            forms = {"plain": "NAME", "domain": "DOMAIN\\NAME", "upn": "NAME@DOMAIN"}
            accepted = " or ".join(forms[f] for f in self.config.name_forms if f in forms)
            return Refusal("invalid_credentials", f"Log in as {accepted}.")
        key = hmac.new(self._salt, f"{name}\0{password}".encode(), hashlib.sha256).digest()
        now = self.clock()
        stamp = self.revocations.counter
        cached = self._cache.get(key)
        if cached is not None and now < cached[1] and cached[2] == stamp:
            return cached[0]
        if credentials.cached_only:  # the address is past its limit: 429, no bind
            return Refusal("invalid_credentials")
        # One directory round trip for a burst of identical logins: later ones wait for it.
        # Only the caller that began the bind caches its result, under the revocation counter
        # it read before the bind began (a caller that joined later may have read a newer one).
        pending = self._pending.get(key)
        started = pending is None
        if pending is None:
            pending = asyncio.ensure_future(self._attempt(name, password, credentials.client))
            self._pending[key] = pending
            pending.add_done_callback(lambda _: self._pending.pop(key, None))
        try:
            # One caller leaving does not end the others'.
            attempt = await asyncio.shield(pending)
        except DirectoryUnavailable as exc:
            logger.warning("LDAP login failed: directory unavailable (%s)", exc)
            return Refusal("identity_unavailable", "The directory cannot be reached.")
        except sa.exc.SQLAlchemyError as exc:
            logger.warning("LDAP login failed: identity bindings unavailable (%s)", exc)
            return Refusal("identity_unavailable", "The gateway database cannot be reached.")
        if attempt.wait > 0:  # refused before the directory: it never sees this attempt
            wait = math.ceil(attempt.wait)
            return Refusal(
                "login_throttled", f"Try again in {_duration(wait)}.", retry_after=wait,
                audit=(("login_name", name), ("login_failure", "throttled")),
            )  # fmt: skip
        user, other = attempt.user, attempt.other
        if user is None:
            reason = (("directory_reason", attempt.reason),) if attempt.reason else ()
            audit = (("login_name", name), ("login_failure", "credentials"), *reason)
            return Refusal("invalid_credentials", audit=audit)
        principal = self.principal(user)
        if not user.stable_id:
            return Refusal(
                "internal_error",
                f"The directory entry has no {self.config.id_attribute}; tell an administrator.",
            )
        if other is not None:
            logger.warning(
                "LDAP login of %s refused: the name is bound to %s %s, this entry is %s %s",
                principal.subject, other.source, other.stable_id, SOURCE, user.stable_id,
            )  # fmt: skip
            return Refusal("identity_conflict", f"({principal.subject})")
        if started and self.config.cache_ttl > 0:
            self._cache[key] = (principal, now + self.config.cache_ttl, stamp)
            self._cache.move_to_end(key)
            while len(self._cache) > self.config.cache_size:
                self._cache.popitem(last=False)
        return principal

    async def _attempt(self, name: str, password: str, client: str) -> Attempt:
        """The directory login behind the per-user throttle: not tried while the name is
        locked; a refused bind is counted, a success or an outage is not."""
        throttle = self.throttle
        reservation = None if throttle is None else await throttle.reserve(name, client)
        if reservation is not None and reservation.wait > 0:
            return Attempt(wait=reservation.wait)
        try:
            user, other, info = await anyio.to_thread.run_sync(
                self._login, name, password, limiter=self._threads
            )
        except (DirectoryUnavailable, sa.exc.SQLAlchemyError):
            if throttle is not None and reservation is not None:
                await _settle(throttle.release(reservation))
            raise
        if throttle is not None and reservation is not None:
            await _settle(throttle.failed(reservation, name) if user is None
                          else throttle.release(reservation))  # fmt: skip
        return Attempt(user, other, directory_reason(info))

    def _login(self, name: str, password: str) -> tuple[DirectoryUser | None, Binding | None, str]:
        """In a worker thread: the directory login, then the name's claim (the other binding
        when the name belongs to another identity), and what the directory said of a refusal."""
        self.directory.refused.info = ""
        user = self.directory.login(name, password)
        if user is None:
            return None, None, str(self.directory.refused.info)
        if not user.stable_id or self.bindings is None:
            return user, None, ""
        # The groups go with the claim: personal tokens act with those of the last login.
        principal = self.principal(user)
        claimed = self.bindings.claim(
            str(principal.subject), SOURCE, user.stable_id, groups=principal.groups
        )
        return user, claimed, ""

    async def refresh(self, name: str, stable_id: str) -> Principal | Refusal | None:
        """The groups of a session's user read again (at most every ``group_refresh``):
        ``name`` is the principal's ``name`` (the entry's own spelling), ``stable_id`` the id
        after ``ldap:`` in its ``identity``. A fresh principal while the entry exists with that
        id; None when the session must end (the entry is gone, its stable id changed, the
        account is disabled, or there is no service account to read it with); Refusal
        ``identity_unavailable`` when the directory cannot answer (keep the old groups)."""
        if not self.config.bind_dn:
            return None  # bind_dn_template: nothing can be read without the user's password
        try:
            user = await anyio.to_thread.run_sync(
                self.directory.lookup, name, limiter=self._threads
            )
        except DirectoryUnavailable as exc:
            logger.warning("LDAP group refresh of %r failed: directory unavailable (%s)", name, exc)
            return Refusal("identity_unavailable", "The directory cannot be reached.")
        if user is None or user.stable_id != stable_id or user.disabled:
            why = ("no single entry has the name" if user is None
                   else "the account is disabled" if user.disabled
                   else "the entry's stable id changed")  # fmt: skip
            logger.info("LDAP group refresh of %r: %s; the session ends", name, why)
            return None
        return self.principal(user)

    @staticmethod
    def principal(user: DirectoryUser) -> Principal:
        groups = tuple(sorted({f"group:{SOURCE}/{subject_name(g)}" for g in user.groups}))
        return Principal(
            subject=DirectorySubject(f"user:{subject_name(user.name)}", groups),
            name=user.name,
            method=SOURCE,
            roles=(),
            groups=groups,
            identity=f"{SOURCE}:{user.stable_id}",
        )

    def close(self) -> None:
        self.directory.close()
