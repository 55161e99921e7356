"""A throwaway OpenLDAP directory for LDAP tests: slapd from a slapd.conf in a temporary directory
on a free loopback port, seeded online (so the memberof overlay fills in ``memberOf``).

The seed is small but has what directory logins get wrong: a service account that is the only
one allowed to search, a DN with parentheses and a space, a user name with a comma (escaped
in its DN) and one with non-ASCII letters, a group with a space in its name, two groups
whose names differ only in case, a nested chain three groups deep, a group loop, a group called
``admins`` (it must not become the policy's ``group:admins``), a user in more groups than one
unpaged search may return, and a name two entries share (``TWINS``, not in ``USERS``: nobody can
log in with it). ``USERS`` says what each user is expected to resolve to, and
``tests/unit/identity/test_ldap_directory.py`` checks it against the live directory.

TLS: unless started with ``tls=False``, the same slapd also listens for ``ldaps://`` on a second
port and offers StartTLS on the first, with a server certificate (SAN ``IP:127.0.0.1`` and
``DNS:ldap.example.test``) from a CA made at start (``ca_file``); ``wrong_ca_file`` is an
unrelated CA for the negative tests. Clients must connect to ``127.0.0.1``: for ``localhost``
libldap checks the certificate against the machine's FQDN, which no certificate here names.
LDAP tools run by the fixture get ``LDAPNOINIT=1`` so ``~/.ldaprc``, ``/etc/ldap/ldap.conf`` and
``LDAP*`` variables stay out of them.

Recipe and traps: /work/shared/reference/test-components.md, sections 1 and 5.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from ipaddress import IPv4Address
from pathlib import Path

import ldap.dn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SUFFIX = "dc=example,dc=org"
PEOPLE = f"ou=people,{SUFFIX}"
GROUPS = f"ou=groups,{SUFFIX}"
PROJECTS = f"ou=projects,{GROUPS}"
SERVICE_DN = f"cn=mlflow-guard,ou=services,{SUFFIX}"
SERVICE_PASSWORD = "service-secret"
ROOT_DN = f"cn=admin,{SUFFIX}"
ROOT_PASSWORD = "admin-secret"
SIZE_LIMIT = 10  # an unpaged search as anyone but the rootdn stops here; paged ones do not
PROJECT_COUNT = 25  # paula's groups: more than SIZE_LIMIT, so finding them all takes paging
START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
SERVER_NAME = "ldap.example.test"  # the certificate's DNS name, beside IP:127.0.0.1


def group(cn: str, base: str = GROUPS) -> str:
    return f"cn={cn},{base}"


@dataclass(frozen=True)
class DirectoryUser:
    """One seeded person: what a client types (``uid``), the entry's DN, the password, and the
    group DNs they are a direct ``member`` of and reach through nesting (direct included)."""

    uid: str
    dn: str
    password: str
    direct_groups: frozenset[str]
    all_groups: frozenset[str]


PROJECT_GROUPS = frozenset(group(f"project-{n:02d}", PROJECTS) for n in range(1, PROJECT_COUNT + 1))
USERS: dict[str, DirectoryUser] = {
    user.uid: user
    for user in [
        # The nested chain: alice -> mlflow-admins -> mlflow-users -> all-staff.
        DirectoryUser(
            "alice", f"uid=alice,{PEOPLE}", "alice-password",
            frozenset({group("mlflow-admins")}),
            frozenset({group("mlflow-admins"), group("mlflow-users"), group("all-staff")}),
        ),
        # A group with a space in its cn.
        DirectoryUser(
            "bob", f"uid=bob,{PEOPLE}", "bob-password",
            frozenset({group("mlflow-users"), group("Risk Team")}),
            frozenset({group("mlflow-users"), group("all-staff"), group("Risk Team")}),
        ),
        # A loop: loop-a has member loop-b and loop-b has member loop-a.
        DirectoryUser(
            "carol", f"uid=carol,{PEOPLE}", "carol-password",
            frozenset({group("loop-a")}),
            frozenset({group("loop-a"), group("loop-b")}),
        ),
        # Two groups whose cn differ only in case (same cn is one DN, so in two OUs).
        DirectoryUser(
            "dave", f"uid=dave,{PEOPLE}", "dave-password",
            frozenset({group("analysts"), group("Analysts", PROJECTS)}),
            frozenset({group("analysts"), group("Analysts", PROJECTS)}),
        ),
        # A DN with parentheses and spaces (filters must escape it), in a directory group that
        # shares its name with the shipped policy's admin group.
        DirectoryUser(
            "erin", f"cn=Erin Example (contractor),{PEOPLE}", "erin-password",
            frozenset({group("admins"), group("Risk Team")}),
            frozenset({group("admins"), group("Risk Team")}),
        ),
        # The uid's canonical spelling has capitals: what the entry says, not what was typed.
        DirectoryUser(
            "Frank.Ops", f"uid=Frank.Ops,{PEOPLE}", "frank-password",
            frozenset({group("mlflow-users")}),
            frozenset({group("mlflow-users"), group("all-staff")}),
        ),
        # More groups than one unpaged search may return.
        DirectoryUser(
            "paula", f"uid=paula,{PEOPLE}", "paula-password", PROJECT_GROUPS, PROJECT_GROUPS,
        ),
        # A comma in the name: the DN carries it escaped (\2C, as slapd spells it; \, is the
        # same DN), and a group filter must escape that backslash in turn (\5c).
        DirectoryUser(
            "lee,kim", f"uid=lee\\2Ckim,{PEOPLE}", "lee-password",
            frozenset({group("Risk Team")}),
            frozenset({group("Risk Team")}),
        ),
        # Non-ASCII letters in the name (and so in the DN and in the groups' member values).
        DirectoryUser(
            "zoë.müller", f"uid=zoë.müller,{PEOPLE}", "zoë-password",
            frozenset({group("mlflow-users")}),
            frozenset({group("mlflow-users"), group("all-staff")}),
        ),
    ]
}  # fmt: skip

# A name two entries share (under their own OU, so it is not one level below PEOPLE): searching
# PEOPLE's subtree for it finds both, and the login must be refused, never the first one taken.
TWINS_BASE = f"ou=partners,{PEOPLE}"
TWIN_NAME = "sam"
TWINS = (f"uid={TWIN_NAME},{TWINS_BASE}", f"cn=Sam Twin,{TWINS_BASE}")
TWIN_PASSWORD = "sam-password"  # both entries have it: the refusal is not a wrong password


def _ldif(attribute: str, value: str) -> str:
    """One LDIF line; base64 (``::``) for values LDIF cannot carry as they are (non-ASCII)."""
    if value.isascii() and not value.startswith((" ", ":", "<")):
        return f"{attribute}: {value}"
    return f"{attribute}:: {base64.b64encode(value.encode()).decode()}"


def seed_ldif() -> str:
    """The directory as LDIF for ``ldapmodify -a``, in an order the memberof overlay needs: a
    member must exist when its group is added, or it never gets ``memberOf``."""
    entries: list[str] = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example",
        *(
            f"dn: ou={ou},{base}\nobjectClass: organizationalUnit\nou: {ou}"
            for ou, base in [
                ("people", SUFFIX), ("services", SUFFIX), ("groups", SUFFIX), ("projects", GROUPS),
                ("partners", PEOPLE),
            ]
        ),
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: mlflow-guard\nuserPassword: {SERVICE_PASSWORD}",
    ]  # fmt: skip
    people = [(u.dn, u.uid, u.password) for u in USERS.values()]
    for dn, uid, password in [*people, *((dn, TWIN_NAME, TWIN_PASSWORD) for dn in TWINS)]:
        cn = ldap.dn.str2dn(dn)[0][0][1] if dn.startswith("cn=") else uid
        mail = "".join(c for c in uid.lower() if c.isascii() and c != ",") + "@example.org"
        entries.append(
            "\n".join(
                [
                    _ldif("dn", dn),
                    "objectClass: inetOrgPerson",
                    _ldif("uid", uid),
                    _ldif("cn", cn),
                    _ldif("sn", cn),
                    _ldif("mail", mail),
                    _ldif("userPassword", password),
                ]
            )
        )

    def add_group(dn: str, members: list[str]) -> None:
        cn = dn.split(",", 1)[0].split("=", 1)[1]
        lines = [f"dn: {dn}", "objectClass: groupOfNames", f"cn: {cn}"]
        entries.append("\n".join(lines + [_ldif("member", member) for member in members]))

    def direct_members(dn: str) -> list[str]:
        return [user.dn for user in USERS.values() if dn in user.direct_groups]

    # Leaves first, so each nested group exists before the group that contains it.
    add_group(group("mlflow-admins"), direct_members(group("mlflow-admins")))
    add_group(
        group("mlflow-users"), [*direct_members(group("mlflow-users")), group("mlflow-admins")]
    )
    add_group(group("all-staff"), [group("mlflow-users")])
    for dn in [group("Risk Team"), group("analysts"), group("Analysts", PROJECTS), group("admins")]:
        add_group(dn, direct_members(dn))
    for dn in sorted(PROJECT_GROUPS):
        add_group(dn, direct_members(dn))
    # groupOfNames needs a member, so the loop is closed by a modification afterwards.
    add_group(group("loop-a"), direct_members(group("loop-a")))
    add_group(group("loop-b"), [group("loop-a")])
    entries.append(
        f"dn: {group('loop-a')}\nchangetype: modify\nadd: member\nmember: {group('loop-b')}"
    )
    return "\n\n".join(entries) + "\n"


# Only bound users read the tree (so a gateway needs its service account or a direct bind);
# anyone may bind; nobody reads passwords.
SLAPD_CONF = """\
include         /etc/ldap/schema/core.schema
include         /etc/ldap/schema/cosine.schema
include         /etc/ldap/schema/inetorgperson.schema
include         /etc/ldap/schema/nis.schema
pidfile         {dir}/slapd.pid
argsfile        {dir}/slapd.args
modulepath      /usr/lib/ldap
moduleload      back_mdb
moduleload      memberof
sizelimit       size.soft={size_limit} size.hard={size_limit} size.prtotal=unlimited
{tls}database        mdb
maxsize         33554432
suffix          "{suffix}"
rootdn          "{root_dn}"
rootpw          {root_password}
directory       {dir}/db
index           objectClass eq
index           uid eq
index           member eq
overlay         memberof
memberof-group-oc groupOfNames
memberof-member-ad member
memberof-memberof-ad memberOf
memberof-refint TRUE
access to attrs=userPassword by self write by anonymous auth by * none
access to * by users read by anonymous auth by * none
"""

TLS_CONF = """\
TLSCACertificateFile  {dir}/ca.crt
TLSCertificateFile    {dir}/server.crt
TLSCertificateKeyFile {dir}/server.key
"""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def make_ca(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA (EC P-256) valid for a day."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    return key, certificate


def make_certificates(directory: Path) -> None:
    """``ca.crt``; ``server.crt`` and ``server.key`` (SAN IP:127.0.0.1 and DNS:SERVER_NAME,
    signed by that CA); ``wrong-ca.crt``, an unrelated CA that must never verify the server."""
    ca_key, ca = make_ca("mlflow-guard test CA")
    _, wrong_ca = make_ca("mlflow-guard wrong CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("slapd-test"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(IPv4Address("127.0.0.1")), x509.DNSName(SERVER_NAME)]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.crt").write_bytes(_pem(ca))
    (directory / "wrong-ca.crt").write_bytes(_pem(wrong_ca))
    (directory / "server.crt").write_bytes(_pem(server))
    (directory / "server.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (directory / "server.key").chmod(0o600)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tool_env() -> dict[str, str]:
    """The environment for ldap-utils: LDAPNOINIT keeps ``~/.ldaprc``, ``./ldaprc``,
    ``/etc/ldap/ldap.conf`` and ``LDAP*`` variables out of the client."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LDAPNOINIT": "1"}


class Slapd:
    """slapd on a free loopback port in a temporary directory, seeded with ``seed_ldif()``;
    with ``tls`` (the default) also ``ldaps://`` on ``tls_port`` and StartTLS on ``port``.

    As root it drops to the ``openldap`` user the Debian package creates (and owns its directory);
    otherwise it runs as the caller. ``-d 0`` keeps it in the foreground, so the pid we hold is
    the daemon's, and stopping is SIGTERM to that pid. The packaged service and its
    /etc/ldap/slapd.d are never used.
    """

    suffix = SUFFIX
    people_base = PEOPLE
    groups_base = GROUPS
    service_dn = SERVICE_DN
    service_password = SERVICE_PASSWORD
    root_dn = ROOT_DN
    root_password = ROOT_PASSWORD
    size_limit = SIZE_LIMIT
    users = USERS

    def __init__(
        self, port: int, tls_port: int | None = None, tls: bool = True, debug: int = 0
    ) -> None:
        self.slapd = shutil.which("slapd", path="/usr/sbin:/usr/local/sbin:/sbin")
        self.ldapmodify = shutil.which("ldapmodify")
        if not self.slapd or not self.ldapmodify:
            raise RuntimeError("slapd or ldap-utils is not installed (make test installs them)")
        self.port = port
        self.url = f"ldap://127.0.0.1:{port}"
        self.tls = tls
        self.debug = debug  # slapd's -d level: 256 logs every operation (BIND, EXT, ...)
        self.tls_port = (tls_port or free_port()) if tls else 0
        self.ldaps_url = f"ldaps://127.0.0.1:{self.tls_port}" if tls else ""
        self.dir = Path(tempfile.mkdtemp(prefix="guard-slapd-"))
        # Readable by the tests after slapd's privilege drop: the CA files are public anyway.
        self.ca_file = str(self.dir / "ca.crt") if tls else ""
        self.wrong_ca_file = str(self.dir / "wrong-ca.crt") if tls else ""
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    def start(self) -> None:
        began = time.monotonic()
        (self.dir / "db").mkdir()
        if self.tls:
            make_certificates(self.dir)
        (self.dir / "slapd.conf").write_text(
            SLAPD_CONF.format(
                dir=self.dir,
                suffix=SUFFIX,
                root_dn=ROOT_DN,
                root_password=ROOT_PASSWORD,
                size_limit=SIZE_LIMIT,
                tls=TLS_CONF.format(dir=self.dir) if self.tls else "",
            )
        )
        listen = f"{self.url}/ {self.ldaps_url}/" if self.tls else f"{self.url}/"
        command = [
            self.slapd,
            "-d",
            str(self.debug),
            "-f",
            str(self.dir / "slapd.conf"),
            "-h",
            listen,
        ]
        if os.geteuid() == 0:  # keys, db and pidfile must be the dropped user's
            for path in [self.dir, *self.dir.rglob("*")]:
                shutil.chown(path, "openldap", "openldap")
            command += ["-u", "openldap", "-g", "openldap"]
        with open(self.dir / "slapd.log", "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self._wait_listening(self.port)
        if self.tls:
            self._wait_listening(self.tls_port)
        self._seed()
        self.startup_seconds = time.monotonic() - began

    def _wait_listening(self, port: int) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"slapd exited with {self.process.returncode}: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"slapd did not listen in {START_TIMEOUT} s") from None
                time.sleep(0.02)

    def _seed(self) -> None:
        self.modify(seed_ldif(), add=True)

    def modify(self, ldif: str, add: bool = False) -> None:
        """Apply LDIF as the rootdn with ``ldapmodify`` (``-a``: entries without a changetype
        are added)."""
        result = subprocess.run(
            [
                self.ldapmodify,
                *(["-a"] if add else []),
                "-x",
                "-H",
                self.url,
                "-D",
                ROOT_DN,
                "-w",
                ROOT_PASSWORD,
            ],
            input=ldif.encode(),
            capture_output=True,
            timeout=30,
            env=tool_env(),
        )
        if result.returncode != 0:
            raise RuntimeError(f"ldapmodify failed: {result.stderr.decode(errors='replace')}")

    def log(self, limit: int = 2000) -> str:
        """The end of slapd's output (all of it with ``limit=0``)."""
        try:
            return (self.dir / "slapd.log").read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=STOP_TIMEOUT)
        shutil.rmtree(self.dir, ignore_errors=True)
