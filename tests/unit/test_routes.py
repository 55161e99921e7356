import pytest

from guard.routes import RouteTable, load_rules, validate_path, validate_query

TABLE = RouteTable(load_rules())


@pytest.mark.parametrize(
    ("path", "canonical"),
    [
        ("/api/2.0/mlflow/runs/get", True),
        ("/", True),
        ("/ajax-api/3.0/jobs/", True),
        ("/static-files/static/js/main.js", True),
        ("/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/a%2Fb.txt", True),  # literal %
        # Attempts to reach another route than the one classified. The ASGI server has
        # already decoded %2e%2e and %2F, so they arrive as .. and /.
        ("/static-files/../ajax-api/3.0/mlflow/assistant/message", False),
        ("/api/2.0/mlflow/./runs/get", False),
        ("/api/2.0/mlflow/runs/get/..", False),
        ("//api/2.0/mlflow/runs/get", False),
        ("/api/2.0//mlflow/runs/get", False),
        ("/api\\2.0/mlflow/runs/get", False),
        ("/api/2.0/mlflow/runs/get\x00", False),
        ("/api/2.0/mlflow/runs/get\r\n", False),
        ("api/2.0/mlflow/runs/get", False),
        ("http://evil.com/api/2.0/mlflow/runs/get", False),
        ("", False),
    ],
)
def test_validate_path(path: str, canonical: bool) -> None:
    assert validate_path(path) is canonical


@pytest.mark.parametrize(
    ("path", "action", "body"),
    [
        ("/api/2.0/mlflow/experiments/search", "forward", "buffer"),
        ("/ajax-api/2.0/mlflow/runs/search", "forward", "buffer"),
        ("/api/3.0/mlflow/traces/search", "forward", "buffer"),
        ("/api/2.0/mlflow-artifacts/artifacts/0/r/artifacts/x", "forward", "stream"),
        ("/ajax-api/2.0/mlflow-artifacts/artifacts/0/r/artifacts/x", "forward", "stream"),
        ("/ajax-api/2.0/mlflow/upload-artifact", "forward", "stream"),
        ("/get-artifact", "forward", "buffer"),
        ("/model-versions/get-artifact", "forward", "buffer"),
        ("/graphql", "forward", "buffer"),
        ("/", "forward", "buffer"),
        ("/static-files/static/js/main.js", "forward", "buffer"),
        ("/version", "forward", "buffer"),
        ("/health", "forward", "buffer"),
        ("/ajax-api/3.0/mlflow/assistant/message", "refuse", None),
        ("/ajax-api/3.0/mlflow/assistant/skills/install", "refuse", None),
        ("/api/2.0/mlflow/webhooks", "refuse", None),
        ("/api/2.0/mlflow/webhooks/12/test", "refuse", None),
        ("/ajax-api/2.0/mlflow/webhooks/12", "refuse", None),
        ("/ajax-api/2.0/mlflow/gateway-proxy", "refuse", None),
        ("/api/3.0/mlflow/gateway/secrets/create", "refuse", None),
        ("/ajax-api/3.0/mlflow/gateway/endpoints/list", "refuse", None),
        ("/gateway/openai/v1/chat/completions", "refuse", None),
        ("/ajax-api/3.0/jobs/search", "refuse", None),
        ("/ajax-api/3.0/mlflow/jobs/123", "refuse", None),
        ("/ajax-api/3.0/mlflow/prompt-optimization/jobs", "refuse", None),
        ("/api/2.0/mlflow/users/create", "refuse", None),
        ("/api/3.0/mlflow/users/permissions/grant", "refuse", None),
        ("/api/3.0/mlflow/roles/create", "refuse", None),
        ("/signup", "refuse", None),
        ("/ajax-api/3.0/mlflow/demo/delete", "refuse", None),
        # Not in the table at all.
        ("/v1/traces", None, None),
        ("/metrics", None, None),
        ("/build/index.js", None, None),
        ("/api/2.0mlflow/experiments/search", None, None),
        ("/API/2.0/mlflow/experiments/search", None, None),
        ("/favicon.ico", None, None),
    ],
)
def test_classification(path: str, action: str | None, body: str | None) -> None:
    rule = TABLE.classify(path)
    if action is None:
        assert rule is None
        return
    assert rule is not None
    assert rule.action == action
    if body is not None:
        assert rule.body == body


def test_every_rule_is_justified() -> None:
    for rule in load_rules():
        assert len(rule.why) > 10, rule.path


def test_refusals_come_before_the_prefixes_that_would_forward_them() -> None:
    rules = load_rules()
    for i, rule in enumerate(rules):
        if rule.action == "refuse":
            earlier_forward = [
                r for r in rules[:i] if r.action == "forward" and r.matches(rule.path)
            ]
            assert not earlier_forward, rule.path


@pytest.mark.parametrize(
    "text",
    [
        '[[rule]]\npath = "x"\nmatch = "exact"\naction = "forward"\nwhy = "w"',
        '[[rule]]\npath = "/x"\nmatch = "glob"\naction = "forward"\nwhy = "w"',
        '[[rule]]\npath = "/x"\nmatch = "exact"\naction = "allow"\nwhy = "w"',
        '[[rule]]\npath = "/x"\nmatch = "exact"\naction = "forward"',
        '[[rule]]\npath = "/x"\nmatch = "exact"\naction = "forward"\nwhy = "w"\nextra = 1',
    ],
)
def test_malformed_tables_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="route rule"):
        load_rules(text)


@pytest.mark.parametrize(
    ("query", "ok"),
    [(b"", True), (b"run_id=abc&a=1&a=2", True), (b"filter=name%20%3D%20%27x%27", True),
     (b"a=\xe9", False), (b"a=b c", False), (b"a=\x00", False), (b"a=\x7f", False)],
)  # fmt: skip
def test_validate_query(query: bytes, ok: bool) -> None:
    assert validate_query(query) is ok
