"""[oidc] and [[oidc.bearer]]: loading from the file and the environment, and every problem."""

import json
import re
from pathlib import Path

import pytest

from guard.config import load_settings
from guard.settings import OidcBearerSettings

SSO = """
[oidc]
issuer = "https://login.example.com/realms/main"
client_id = "mlflow-gateway"
"""
SECRET = {"MLFLOW_GUARD_OIDC_CLIENT_SECRET": "s3cret"}
BEARERS = """
[[oidc.bearer]]
alias = "ci"
issuer = "https://login.example.com/realms/main"
audience = "urn:mlflow-guard"
groups_claim = "groups"

[[oidc.bearer]]
alias = "k8s"
issuer = "https://kubernetes.default.svc"
audience = "mlflow"
subject_claim = "sub"
allowed_algorithms = ["RS256", "ES384"]
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "guard.toml"
    path.write_text(text)
    return str(path)


def problems_of(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> list[str]:
    return load_settings({}, env or {}, write(tmp_path, text)).problems


def test_defaults_leave_sso_and_bearers_off() -> None:
    loaded = load_settings({}, {}, None)
    assert loaded.problems == []
    o = loaded.settings.oidc
    assert (o.issuer, o.alias, o.client_id, o.bearer) == ("", "oidc", "", ())
    assert o.scopes == ("openid", "profile", "email")
    assert o.username_claim == "preferred_username" and o.groups_claim == ""
    assert o.allowed_algorithms == ("RS256", "PS256", "ES256")
    assert o.end_provider_session is True
    assert (o.timeout, o.jwks_refresh_interval, o.leeway) == (10.0, 60.0, 60.0)


def test_sso_from_file_with_secret_from_env(tmp_path: Path) -> None:
    loaded = load_settings({}, SECRET, write(tmp_path, SSO))
    assert loaded.problems == []
    o = loaded.settings.oidc
    assert (o.issuer, o.client_id, o.client_secret) == (
        "https://login.example.com/realms/main", "mlflow-gateway", "s3cret",
    )  # fmt: skip
    assert loaded.sources["oidc.client_secret"] == "env MLFLOW_GUARD_OIDC_CLIENT_SECRET"


def test_redirect_uri_defaults_to_public_url(tmp_path: Path) -> None:
    loaded = load_settings({}, SECRET, write(tmp_path, SSO))
    assert loaded.settings.oidc_redirect_uri == "http://127.0.0.1:5000/guard/oidc/callback"
    text = SSO + '[gateway]\npublic_url = "https://mlflow.example.com/"\n'
    loaded = load_settings({}, SECRET, write(tmp_path, text))
    assert loaded.settings.oidc_redirect_uri == "https://mlflow.example.com/guard/oidc/callback"
    text = SSO + 'redirect_uri = "https://other.example.com/guard/oidc/callback"\n'
    loaded = load_settings({}, SECRET, write(tmp_path, text))
    assert loaded.problems == []
    assert loaded.settings.oidc_redirect_uri == "https://other.example.com/guard/oidc/callback"


def test_secret_file_instead_of_secret(tmp_path: Path) -> None:
    secret = tmp_path / "client-secret"
    secret.write_text("s3cret\n")
    text = SSO + f'client_secret_file = "{secret}"\n'
    assert problems_of(tmp_path, text) == []
    missing = SSO + f'client_secret_file = "{tmp_path / "nope"}"\n'
    assert problems_of(tmp_path, missing) == [
        f"oidc.client_secret_file: {tmp_path / 'nope'} does not exist"
    ]


def test_sso_needs_client_id_and_exactly_one_secret(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '[oidc]\nissuer = "https://login.example.com"\n')
    assert [p.split(":")[0] for p in problems] == ["oidc.client_id", "oidc.client_secret"]
    secret = tmp_path / "client-secret"
    secret.write_text("x")
    both = SSO + f'client_secret_file = "{secret}"\n'
    problems = problems_of(tmp_path, both, SECRET)
    assert len(problems) == 1 and "exactly one of them" in problems[0]


def test_sso_on_a_public_address_needs_public_url(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, SSO + '[gateway]\nhost = "0.0.0.0"\n', SECRET)
    assert len(problems) == 1 and problems[0].startswith("oidc.redirect_uri: set gateway.public")
    text = SSO + '[gateway]\nhost = "0.0.0.0"\npublic_url = "https://mlflow.example.com"\n'
    assert problems_of(tmp_path, text, SECRET) == []


@pytest.mark.parametrize(
    ("issuer", "ok"),
    [
        ("https://login.example.com", True),
        ("https://login.example.com/realms/main", True),
        ("http://127.0.0.1:9000", True),
        ("http://localhost:9000", True),
        ("http://[::1]:9000", True),
        ("http://127.5.5.5", True),
        ("http://login.example.com", False),  # plain http off loopback
        ("http://localhost.example.com", False),
        ("http://127.0.0.1.example.com", False),
        ("ftp://login.example.com", False),
        ("login.example.com", False),
        ("https://user:pw@login.example.com", False),
        ("https://login.example.com/?realm=x", False),
        ("https://login.example.com/#x", False),
        ("https://[::1", False),
    ],
)
def test_issuer_is_https_except_on_loopback(tmp_path: Path, issuer: str, ok: bool) -> None:
    problems = problems_of(tmp_path, f'[oidc]\nissuer = "{issuer}"\nclient_id = "m"\n', SECRET)
    assert (problems == []) is ok, problems
    if not ok:
        assert problems[0].startswith("oidc.issuer: ")
    bearer = f'[[oidc.bearer]]\nalias = "ci"\nissuer = "{issuer}"\naudience = "a"\n'
    problems = problems_of(tmp_path, bearer)
    assert (problems == []) is ok, problems
    if not ok:
        assert problems[0].startswith("oidc.bearer[0].issuer: ")


@pytest.mark.parametrize(
    "algorithms",
    [["none"], ["HS256"], ["RS256", "HS512"], ["hs256"], ["RS256", "None"], [], ["rs256"]],
)
def test_allowed_algorithms_refuse_none_and_hmac(tmp_path: Path, algorithms: list[str]) -> None:
    text = f"[oidc]\nallowed_algorithms = {json.dumps(algorithms)}\n"
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1 and problems[0].startswith("oidc.allowed_algorithms: "), problems
    env = {"MLFLOW_GUARD_OIDC_ALLOWED_ALGORITHMS": ",".join(algorithms)}
    problems = load_settings({}, env, None).problems
    assert len(problems) == 1 and problems[0].startswith("oidc.allowed_algorithms: "), problems
    bearer = (
        '[[oidc.bearer]]\nalias = "ci"\nissuer = "https://i.example.com"\naudience = "a"\n'
        f"allowed_algorithms = {json.dumps(algorithms)}\n"
    )
    problems = problems_of(tmp_path, bearer)
    assert len(problems) == 1, problems
    assert problems[0].startswith("oidc.bearer[0].allowed_algorithms: ")


@pytest.mark.parametrize(
    "alias", ["", "Corp", "a/b", "a b", "-x", "x" * 33, "ldap:x", "é", "9corp"]
)
def test_alias_spelling(tmp_path: Path, alias: str) -> None:
    problems = problems_of(tmp_path, f'[oidc]\nalias = "{alias}"\n')
    assert len(problems) == 1 and problems[0].startswith("oidc.alias: "), problems
    bearer = (
        f'[[oidc.bearer]]\nalias = "{alias}"\nissuer = "https://i.example.com"\naudience = "a"\n'
    )
    problems = problems_of(tmp_path, bearer)
    assert len(problems) == 1 and problems[0].startswith("oidc.bearer[0].alias: "), problems


def test_alias_ldap_is_reserved(tmp_path: Path) -> None:
    text = '[oidc]\nalias = "ldap"\n' + BEARERS.replace('"k8s"', '"ldap"')
    assert [p.split(":")[0] for p in problems_of(tmp_path, text)] == [
        "oidc.alias", "oidc.bearer[1].alias",
    ]  # fmt: skip


def test_scopes_must_ask_for_openid(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '[oidc]\nscopes = ["profile", "email"]\n')
    assert problems == [
        "oidc.scopes: must contain openid (from file " + str(tmp_path / "guard.toml") + ")"
    ]
    problems = problems_of(tmp_path, '[oidc]\nscopes = ["openid", "a b"]\n')
    assert len(problems) == 1 and problems[0].startswith("oidc.scopes: each scope")


@pytest.mark.parametrize(
    "uri",
    [
        "https://mlflow.example.com/callback",
        "https://mlflow.example.com/guard/oidc/callback?x=1",
        "https://mlflow.example.com/guard/oidc/callback#x",
        "mlflow.example.com/guard/oidc/callback",
        "javascript:alert(1)",
    ],
)
def test_redirect_uri_is_the_gateway_callback(tmp_path: Path, uri: str) -> None:
    problems = problems_of(tmp_path, f'[oidc]\nredirect_uri = "{uri}"\n')
    assert len(problems) == 1 and problems[0].startswith("oidc.redirect_uri: "), problems


def test_leeway_is_small(tmp_path: Path) -> None:
    assert problems_of(tmp_path, '[oidc]\nleeway = "5m"\n') == []
    problems = problems_of(tmp_path, '[oidc]\nleeway = "1h"\n')
    assert len(problems) == 1 and problems[0].startswith("oidc.leeway: must be at most 5m")


def test_bearers_from_the_file(tmp_path: Path) -> None:
    loaded = load_settings({}, {}, write(tmp_path, BEARERS))
    assert loaded.problems == []
    assert loaded.settings.oidc.bearer == (
        OidcBearerSettings(
            alias="ci",
            issuer="https://login.example.com/realms/main",
            audience="urn:mlflow-guard",
            groups_claim="groups",
        ),
        OidcBearerSettings(
            alias="k8s",
            issuer="https://kubernetes.default.svc",
            audience="mlflow",
            subject_claim="sub",
            allowed_algorithms=("RS256", "ES384"),
        ),
    )
    assert loaded.sources["oidc.bearer"].startswith("file ")


def test_bearers_from_the_environment_replace_the_file(tmp_path: Path) -> None:
    env = {
        "MLFLOW_GUARD_OIDC_BEARER": json.dumps(
            [{"alias": "gh", "issuer": "https://token.actions.githubusercontent.com",
              "audience": "urn:mlflow-guard", "allowed_algorithms": ["RS256"]}]
        )
    }  # fmt: skip
    loaded = load_settings({}, env, write(tmp_path, BEARERS))
    assert loaded.problems == []
    assert loaded.settings.oidc.bearer == (
        OidcBearerSettings(
            alias="gh",
            issuer="https://token.actions.githubusercontent.com",
            audience="urn:mlflow-guard",
            allowed_algorithms=("RS256",),
        ),
    )
    assert loaded.sources["oidc.bearer"] == "env MLFLOW_GUARD_OIDC_BEARER"
    # An empty list in the environment turns the file's bearers off.
    loaded = load_settings({}, {"MLFLOW_GUARD_OIDC_BEARER": "[]"}, write(tmp_path, BEARERS))
    assert loaded.problems == [] and loaded.settings.oidc.bearer == ()


@pytest.mark.parametrize(
    ("value", "pattern"),
    [
        ("not json", r"^oidc\.bearer: not valid JSON: .*JSON list of objects in "
                     r"MLFLOW_GUARD_OIDC_BEARER\) \(from env MLFLOW_GUARD_OIDC_BEARER\)$"),
        ('{"alias": "ci"}', r"^oidc\.bearer: expected a list of tables"),
        ('["ci"]', r"^oidc\.bearer: expected a list of tables"),
    ],
)  # fmt: skip
def test_bearers_in_the_environment_must_be_a_json_list(value: str, pattern: str) -> None:
    problems = load_settings({}, {"MLFLOW_GUARD_OIDC_BEARER": value}, None).problems
    assert len(problems) == 1 and re.search(pattern, problems[0]), problems


def test_bearer_in_the_file_must_be_an_array_of_tables(tmp_path: Path) -> None:
    problems = problems_of(tmp_path, '[oidc]\nbearer = "ci"\n')
    assert len(problems) == 1 and problems[0].startswith("oidc.bearer: expected a list of tables")


def test_every_bearer_problem_names_its_entry(tmp_path: Path) -> None:
    text = (
        SSO
        + """
[[oidc.bearer]]
alias = "ci"
issuer = "https://login.example.com/realms/main"
audience = "urn:mlflow-guard"

[[oidc.bearer]]
issuer = "http://login.example.com"
colour = "blue"
allowed_algorithms = "HS256"

[[oidc.bearer]]
alias = "ci"
issuer = "https://login.example.com/realms/main"
audience = "mlflow-gateway"

[[oidc.bearer]]
alias = "oidc"
issuer = "https://other.example.com"
audience = "urn:mlflow-guard"
subject_claim = 7
"""
    )
    problems = problems_of(tmp_path, text, SECRET)
    expected = [
        r"^oidc\.bearer\[1\]\.colour: unknown setting \(known: alias, allowed_algorithms, ",
        r"^oidc\.bearer\[1\]\.alias: required \(from file .*\)$",
        r"^oidc\.bearer\[1\]\.issuer: 'http://login\.example\.com' must be https .*\(from file ",
        r"^oidc\.bearer\[1\]\.audience: required",
        r"^oidc\.bearer\[1\]\.allowed_algorithms: HS256: not allowed",
        r"^oidc\.bearer\[2\]\.alias: 'ci' is already used by oidc\.bearer\[0\]\.alias",
        r"^oidc\.bearer\[2\]\.issuer: already trusted by oidc\.bearer\[0\]",
        r"^oidc\.bearer\[2\]\.audience: equal to oidc\.client_id, so ID tokens would work as API",
        r"^oidc\.bearer\[3\]\.subject_claim: expected a string, got 7",
        r"^oidc\.bearer\[3\]\.alias: 'oidc' is already used by oidc\.alias",
    ]
    for pattern in expected:
        assert any(re.search(pattern, p) for p in problems), (pattern, problems)
    assert len(problems) == len(expected), problems


def test_bearer_audience_equal_to_the_client_id_is_refused(tmp_path: Path) -> None:
    bearer = '[[oidc.bearer]]\nalias = "ci"\nissuer = "https://i.example.com"\naudience = "m"\n'
    assert problems_of(tmp_path, bearer) == []
    problems = problems_of(tmp_path, '[oidc]\nclient_id = "m"\n' + bearer)
    assert len(problems) == 1 and problems[0].startswith("oidc.bearer[0].audience: equal to")


def test_check_config_hides_the_secret_and_lists_each_bearer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from guard.cli.serve import check_config

    loaded = load_settings({}, SECRET, write(tmp_path, SSO + BEARERS))
    assert check_config(loaded) == 0
    out = capsys.readouterr().out
    assert "s3cret" not in out
    assert "oidc.client_secret = <set, not shown>  [env MLFLOW_GUARD_OIDC_CLIENT_SECRET]" in out
    assert "oidc.bearer = 2 table(s)  [file " in out
    assert "    oidc.bearer[1].issuer = 'https://kubernetes.default.svc'" in out
