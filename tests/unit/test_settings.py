import re
import tomllib
from pathlib import Path

import pytest

from guard.config import Loaded, load_settings, options, table_fields
from guard.settings import parse_duration, parse_size

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "guard.toml"
    path.write_text(text)
    return str(path)


def test_defaults() -> None:
    loaded = load_settings({}, {}, None)
    assert loaded.problems == []
    s = loaded.settings
    assert (s.gateway.host, s.gateway.port) == ("127.0.0.1", 5000)
    assert s.gateway.max_body_size == 16 * 1024**2
    assert s.embedded
    assert s.database_uri == f"sqlite:///{Path('mlflow-guard-data').resolve() / 'guard.db'}"
    assert s.tokens.default_expiry == 90 * 86400


def test_precedence_flag_then_env_then_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[gateway]\nport = 7000\nhost = '0.0.0.0'\nrealm = 'file'\n")
    env = {"MLFLOW_GUARD_GATEWAY_PORT": "7100", "MLFLOW_GUARD_GATEWAY_HOST": "10.0.0.1"}
    loaded = load_settings({"gateway.port": "7200"}, env, path)
    assert loaded.problems == []
    g = loaded.settings.gateway
    assert (g.port, g.host, g.realm) == (7200, "10.0.0.1", "file")
    assert loaded.sources["gateway.port"] == "flag --port"
    assert loaded.sources["gateway.host"] == "env MLFLOW_GUARD_GATEWAY_HOST"
    assert loaded.sources["gateway.realm"].startswith("file ")
    assert loaded.sources["gateway.log_level"] == "default"


def test_config_file_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlflow-guard.toml").write_text("[gateway]\nport = 1111\n")
    other = write(tmp_path, "[gateway]\nport = 2222\n")
    assert load_settings({}, {}, None).settings.gateway.port == 1111
    assert load_settings({}, {"MLFLOW_GUARD_CONFIG": other}, None).settings.gateway.port == 2222
    explicit = tmp_path / "third.toml"
    explicit.write_text("[gateway]\nport = 3333\n")
    loaded = load_settings({}, {"MLFLOW_GUARD_CONFIG": other}, str(explicit))
    assert loaded.settings.gateway.port == 3333


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
[gateway]
port = 70000
allowed_hosts = ["ok.example.com", "bad host", "*"]
cors_allowed_origins = ["*", "null", "https://ok.example.com"]
trusted_proxies = ["10.0.0.0/8", "not-a-net"]
max_body_size = "lots"
colour = "blue"

[upstream]
url = "ftp://x"

[storage]
database_uri = "mysql://x"

[nonsense]
a = 1
""",
    )
    env = {"MLFLOW_GUARD_TOKENS_CACHE_TTL": "soon", "MLFLOW_GUARD_GATEWAY_PROT": "1"}
    problems = load_settings({}, env, path).problems
    expected = [
        r"^gateway\.port: must be between 1 and 65535 \(from file",
        r"^gateway\.allowed_hosts: 'bad host' is not a host pattern.*'\*' is not a host pattern",
        r"^gateway\.cors_allowed_origins: '\*' is not an origin.*'null' is not an origin",
        r"^gateway\.trusted_proxies: 'not-a-net' is not an IP address or CIDR",
        r"^gateway\.max_body_size: 'lots' is not a size \(write e\.g\. 16MiB",
        r"^gateway\.colour: unknown setting",
        r"^upstream\.url: 'ftp://x' is not an http\(s\) URL",
        r"^storage\.database_uri: 'mysql' is not supported",
        r"^nonsense: unknown section",
        r"^tokens\.cache_ttl: 'soon' is not a duration",
        r"^env MLFLOW_GUARD_GATEWAY_PROT: unknown setting",
    ]
    for pattern in expected:
        assert any(re.search(pattern, p) for p in problems), (pattern, problems)
    assert len(problems) == len(expected)
    # Each problem names the key and says how to fix it or what is expected.
    assert all(re.match(r"^(env )?[A-Za-z_.]+[: ]", p) for p in problems)


def test_invalid_toml_is_one_problem(tmp_path: Path) -> None:
    problems = load_settings({}, {}, write(tmp_path, "[gateway\n")).problems
    assert len(problems) == 1 and "not valid TOML" in problems[0]


def test_missing_explicit_file_is_a_problem(tmp_path: Path) -> None:
    problems = load_settings({}, {}, str(tmp_path / "nope.toml")).problems
    assert problems == [
        f"config: {tmp_path / 'nope.toml'} does not exist (create it or drop --config)"
    ]


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("16MiB", 16 * 1024**2), ("512 KiB", 512 * 1024), ("1000", 1000), (2048, 2048),
     ("1GB", 10**9)],
)  # fmt: skip
def test_parse_size(raw: object, expected: int) -> None:
    assert parse_size(raw) == expected


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("90d", 90 * 86400.0), ("12h", 43200.0), ("30m", 1800.0), ("5s", 5.0), ("2.5", 2.5),
     (7, 7.0), ("1w", 604800.0)],
)  # fmt: skip
def test_parse_duration(raw: object, expected: float) -> None:
    assert parse_duration(raw) == expected


@pytest.mark.parametrize("raw", ["-1d", "1y", "d", "", "1 day", True])
def test_bad_durations(raw: object) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(raw)


def test_env_lists_and_bools() -> None:
    env = {
        "MLFLOW_GUARD_GATEWAY_ALLOWED_HOSTS": "a.example.com, *.b.example.com",
        "MLFLOW_GUARD_MLFLOW_SERVE_ARTIFACTS": "false",
        "MLFLOW_GUARD_MLFLOW_DEFAULT_ARTIFACT_ROOT": "/srv/artifacts",
    }
    loaded = load_settings({}, env, None)
    assert loaded.problems == []
    assert loaded.settings.gateway.allowed_hosts == ("a.example.com", "*.b.example.com")
    assert loaded.settings.mlflow.serve_artifacts is False


def test_serve_artifacts_off_needs_an_artifact_root() -> None:
    problems = load_settings({"mlflow.serve_artifacts": False}, {}, None).problems
    assert problems and problems[0].startswith("mlflow.default_artifact_root: required")


def test_type_errors_in_the_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[gateway]\nport = 'x'\nallowed_hosts = 'a'\n[mlflow]\nserve_artifacts = 'maybe'\n",
    )
    problems = load_settings({}, {}, path).problems
    assert any(p.startswith("gateway.port: expected an integer") for p in problems)
    assert any(p.startswith("mlflow.serve_artifacts: expected true or false") for p in problems)


def _load_text(text: str) -> Loaded:
    path = ROOT / "config" / "mlflow-guard.toml"
    tmp = path.with_name(".uncommented-test.toml")
    try:
        tmp.write_text(text)
        return load_settings({}, {}, str(tmp))
    finally:
        tmp.unlink()


def test_example_config_lists_every_option_and_parses() -> None:
    text = (ROOT / "config" / "mlflow-guard.toml").read_text()
    uncommented = "\n".join(
        line[2:] if line.startswith("# ") and " = " in line else line
        for line in text.splitlines()
        if not (line.startswith("#") and " = " not in line)
    )
    parsed = tomllib.loads(uncommented)
    listed = {(s, k) for s, table in parsed.items() for k in table}
    assert listed == {(o.section, o.key) for o in options() if o.kind != "tables"}
    # The example, uncommented, is a valid configuration equal to the defaults.
    loaded = _load_text(uncommented)
    assert loaded.problems == []
    assert loaded.settings == load_settings({}, {}, None).settings


def test_example_config_has_an_example_of_each_array_of_tables() -> None:
    """An array of tables has no default to show: its example is written with "## " and,
    uncommented as well, lists every key of one table and is valid."""
    text = (ROOT / "config" / "mlflow-guard.toml").read_text()
    uncommented = "\n".join(
        line[3:] if line.startswith("## ") else line[2:] if line.startswith("# ") else line
        for line in text.splitlines()
        if (line.startswith("## ") and (" = " in line or line.startswith("## [[")))
        or (line.startswith("# ") and " = " in line)
        or not line.startswith("#")
    )
    parsed = tomllib.loads(uncommented)
    for opt in (o for o in options() if o.kind == "tables"):
        tables = parsed[opt.section][opt.key]
        assert [set(t) for t in tables] == [{sub.key for sub in table_fields(opt)}]
    loaded = _load_text(uncommented)
    assert loaded.problems == []
    assert loaded.settings.oidc.bearer[0].alias == "ci"


def test_readme_documents_every_table_key() -> None:
    readme = (ROOT / "README.md").read_text()
    tables = [o for o in options() if o.kind == "tables"]
    assert tables
    missing = [s.name for o in tables for s in table_fields(o) if f"`{s.name}`" not in readme]
    assert missing == []


def test_readme_documents_every_option() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [o.name for o in options() if f"`{o.name}`" not in readme]
    assert missing == []
    missing_env = [o.env for o in options() if o.env not in readme]
    assert missing_env == []


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, ("http://localhost:5000", "http://127.0.0.1:5000", "http://[::1]:5000")),
        ({"gateway.port": 8080}, ("http://localhost:8080", "http://127.0.0.1:8080",
                                  "http://[::1]:8080")),
        ({"gateway.host": "10.1.2.3"}, ("http://localhost:5000", "http://127.0.0.1:5000",
                                        "http://[::1]:5000", "http://10.1.2.3:5000")),
        ({"gateway.host": "fd00::7"}, ("http://localhost:5000", "http://127.0.0.1:5000",
                                       "http://[::1]:5000", "http://[fd00::7]:5000")),
        # A wildcard bind is no address anyone types.
        ({"gateway.host": "0.0.0.0"}, ("http://localhost:5000", "http://127.0.0.1:5000",
                                       "http://[::1]:5000")),
        ({"gateway.host": "::"}, ("http://localhost:5000", "http://127.0.0.1:5000",
                                  "http://[::1]:5000")),
        # Set: exactly that origin, nothing on loopback besides.
        ({"gateway.public_url": "https://mlflow.example.com/"}, ("https://mlflow.example.com",)),
        ({"gateway.public_url": "http://127.0.0.1:5000"}, ("http://127.0.0.1:5000",)),
    ],
)  # fmt: skip
def test_own_origins(values: dict[str, object], expected: tuple[str, ...]) -> None:
    loaded = load_settings(values, {}, None)
    assert loaded.problems == []
    assert loaded.settings.own_origins == expected


def test_a_malformed_origin_is_a_problem_not_a_crash() -> None:
    problems = load_settings(
        {"gateway.public_url": "http://[::1", "upstream.url": "http://[fe80::1"}, {}, None
    ).problems
    assert len(problems) == 2, problems
    assert any(p.startswith("gateway.public_url: ") for p in problems)
    assert any(p.startswith("upstream.url: ") for p in problems)
