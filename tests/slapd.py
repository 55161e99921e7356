"""A throwaway OpenLDAP directory for LDAP tests: slapd from a slapd.conf in a temporary directory
on a free loopback port, seeded online (so the memberof overlay fills in ``memberOf``).

The seed is small but has what directory logins get wrong: a service account that is the only
one allowed to search, a DN with parentheses and a space, a group with a space in its name, two
groups whose names differ only in case, a nested chain three groups deep, a group loop, a group
called ``admins`` (it must not become the policy's ``group:admins``) and a user in more groups
than one unpaged search may return. ``USERS`` says what each user is expected to resolve to, and
``tests/unit/identity/test_ldap_directory.py`` checks it against the live directory.

Recipe and traps: /work/shared/reference/test-components.md, sections 1 and 5.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

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
    ]
}  # fmt: skip


def seed_ldif() -> str:
    """The directory as LDIF for ``ldapmodify -a``, in an order the memberof overlay needs: a
    member must exist when its group is added, or it never gets ``memberOf``."""
    entries: list[str] = [
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\no: Example\ndc: example",
        *(
            f"dn: ou={ou},{base}\nobjectClass: organizationalUnit\nou: {ou}"
            for ou, base in [
                ("people", SUFFIX), ("services", SUFFIX), ("groups", SUFFIX), ("projects", GROUPS),
            ]
        ),
        f"dn: {SERVICE_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\n"
        f"cn: mlflow-guard\nuserPassword: {SERVICE_PASSWORD}",
    ]  # fmt: skip
    for user in USERS.values():
        rdn = user.dn.split(",", 1)[0]
        cn = rdn.split("=", 1)[1] if rdn.startswith("cn=") else user.uid
        entries.append(
            f"dn: {user.dn}\nobjectClass: inetOrgPerson\nuid: {user.uid}\ncn: {cn}\nsn: {cn}\n"
            f"mail: {user.uid.lower()}@example.org\nuserPassword: {user.password}"
        )

    def add_group(dn: str, members: list[str]) -> None:
        cn = dn.split(",", 1)[0].split("=", 1)[1]
        lines = [f"dn: {dn}", "objectClass: groupOfNames", f"cn: {cn}"]
        entries.append("\n".join(lines + [f"member: {member}" for member in members]))

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
database        mdb
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


class Slapd:
    """slapd on a free loopback port in a temporary directory, seeded with ``seed_ldif()``.

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

    def __init__(self, port: int) -> None:
        self.slapd = shutil.which("slapd", path="/usr/sbin:/usr/local/sbin:/sbin")
        self.ldapmodify = shutil.which("ldapmodify")
        if not self.slapd or not self.ldapmodify:
            raise RuntimeError("slapd or ldap-utils is not installed (make test installs them)")
        self.port = port
        self.url = f"ldap://127.0.0.1:{port}"
        self.dir = Path(tempfile.mkdtemp(prefix="guard-slapd-"))
        self.process: subprocess.Popen[bytes] | None = None
        self.startup_seconds = 0.0

    def start(self) -> None:
        began = time.monotonic()
        (self.dir / "db").mkdir()
        (self.dir / "slapd.conf").write_text(
            SLAPD_CONF.format(
                dir=self.dir, suffix=SUFFIX, root_dn=ROOT_DN, root_password=ROOT_PASSWORD,
                size_limit=SIZE_LIMIT,
            )
        )  # fmt: skip
        command = [self.slapd, "-d", "0", "-f", str(self.dir / "slapd.conf"),
                   "-h", f"{self.url}/"]  # fmt: skip
        if os.geteuid() == 0:  # keys, db and pidfile must be the dropped user's
            for path in [self.dir, *self.dir.rglob("*")]:
                shutil.chown(path, "openldap", "openldap")
            command += ["-u", "openldap", "-g", "openldap"]
        with open(self.dir / "slapd.log", "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        self._wait_listening()
        self._seed()
        self.startup_seconds = time.monotonic() - began

    def _wait_listening(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"slapd exited with {self.process.returncode}: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"slapd did not listen in {START_TIMEOUT} s") from None
                time.sleep(0.02)

    def _seed(self) -> None:
        # LDAPNOINIT: ~/.ldaprc, /etc/ldap/ldap.conf and LDAP* variables stay out of the client.
        result = subprocess.run(
            [self.ldapmodify, "-a", "-x", "-H", self.url, "-D", ROOT_DN, "-w", ROOT_PASSWORD],
            input=seed_ldif().encode(), capture_output=True, timeout=30,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LDAPNOINIT": "1"},
        )  # fmt: skip
        if result.returncode != 0:
            raise RuntimeError(f"seeding slapd failed: {result.stderr.decode(errors='replace')}")

    def log(self) -> str:
        try:
            return (self.dir / "slapd.log").read_text(errors="replace")[-2000:]
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
