import base64

import pytest

from guard.edge.context import RequestContextMiddleware
from guard.errors import Refusal
from guard.identity.authentication import AuthenticationMiddleware
from guard.identity.base import Credentials, Principal, parse_authorization
from tests.unit.asgi import Recorder, call


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([], None),
        (["Bearer abc"], Credentials("bearer", "abc")),
        (["bearer   abc  "], Credentials("bearer", "abc")),
        ([f"Basic {b64('ci:tok:en')}"], Credentials("basic", "tok:en", "ci")),
        ([f"Basic {b64('ci:')}"], Credentials("basic", "", "ci")),
        (["Bearer"], "malformed_credentials"),
        (["Bearer a b"], "malformed_credentials"),
        (["Basic !!!"], "malformed_credentials"),
        ([f"Basic {b64('no-colon')}"], "malformed_credentials"),
        (["Basic " + base64.b64encode(b"\xff:\xfe").decode()], "malformed_credentials"),
        (["Digest x"], "malformed_credentials"),
        (["Bearer a", "Bearer b"], "malformed_credentials"),  # two headers: which one?
    ],
)
def test_parse_authorization(values: list[str], expected: object) -> None:
    result = parse_authorization([(b"authorization", v.encode()) for v in values])
    if isinstance(expected, str):
        assert isinstance(result, Refusal) and result.reason == expected
    else:
        assert result == expected


class Fixed:
    name = "fixed"

    async def authenticate(self, credentials: Credentials) -> Principal | Refusal | None:
        if credentials.secret == "good":
            return Principal("token:t", "t", "token", ("admin",))
        if credentials.secret == "other-kind":
            return None
        return Refusal("invalid_credentials")


def stack() -> tuple[RequestContextMiddleware, Recorder]:
    inner = Recorder()
    app = AuthenticationMiddleware(inner, providers=[Fixed()], realm='my "realm"')
    return RequestContextMiddleware(app), inner


@pytest.mark.parametrize(
    ("authorization", "reason"),
    [(None, "unauthenticated"), ("Bearer bad", "invalid_credentials"),
     ("Bearer other-kind", "invalid_credentials"), ("Bearer", "malformed_credentials")],
)  # fmt: skip
def test_refusals_are_401_with_challenges(authorization: str | None, reason: str) -> None:
    app, inner = stack()
    headers = [("host", "localhost")] + (
        [("authorization", authorization)] if authorization else []
    )
    result = call(app, headers=headers)
    assert result.status == 401
    assert result.reason == reason
    assert result.json()["error_code"] == "UNAUTHENTICATED"
    assert result.all("www-authenticate") == [
        'Basic realm="my \\"realm\\"", charset="UTF-8"',
        'Bearer realm="my \\"realm\\""',
    ]
    assert not inner.scopes


def test_accepted_credentials_set_the_principal() -> None:
    app, inner = stack()
    assert call(app, headers=[("host", "x"), ("authorization", "Bearer good")]).status == 200
    assert inner.scopes[0]["guard"].principal.subject == "token:t"


def test_browser_navigation_gets_a_page() -> None:
    app, _ = stack()
    result = call(app, path="/", headers=[("host", "x"), ("accept", "text/html,*/*")])
    assert result.status == 401
    assert result.header("content-type") == "text/html; charset=utf-8"
    assert b"unauthenticated" in result.body
