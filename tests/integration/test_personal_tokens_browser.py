"""The ``/guard/tokens`` page in a real headless Chromium: a directory user logs in, opens the
page, creates a token, reads its secret from the page and uses it with httpx, then revokes it
with the page's button (a cookie write passing the CSRF checks with the browser's own Origin)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.integration.conftest import Gateway, Mlflow, start_gateway
from tests.slapd import PEOPLE, Slapd

if TYPE_CHECKING:
    from playwright.sync_api import Browser

pytestmark = [pytest.mark.integration, pytest.mark.browser, pytest.mark.ldap]


@pytest.fixture(scope="module")
def directory_gateway(
    external_mlflow: Mlflow, slapd: Slapd, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    gateway = start_gateway(
        tmp_path_factory.mktemp("tokens-page"),
        "--upstream-url", external_mlflow.url,
        MLFLOW_GUARD_LDAP_URLS=slapd.url,
        MLFLOW_GUARD_LDAP_BIND_DN=slapd.service_dn,
        MLFLOW_GUARD_LDAP_BIND_PASSWORD=slapd.service_password,
        MLFLOW_GUARD_LDAP_USER_BASE=PEOPLE,
        MLFLOW_GUARD_LDAP_USE_MEMBEROF="true",
    )  # fmt: skip
    yield gateway
    gateway.stop()


def test_create_read_use_and_revoke_a_token_in_the_browser(
    directory_gateway: Gateway, chromium: Browser
) -> None:
    url = directory_gateway.url
    context = chromium.new_context()
    context.set_default_timeout(30_000)
    violations: list[str] = []
    try:
        page = context.new_page()
        page.on("console", lambda m: violations.append(m.text) if "Content Security" in m.text
                else None)  # fmt: skip
        page.goto(url + "/guard/tokens")
        page.wait_for_url(f"{url}/guard/login?next=%2Fguard%2Ftokens")
        page.get_by_label("User name").fill("dave")
        page.get_by_label("Password", exact=True).fill("dave-password")
        page.get_by_role("button", name="Log in", exact=True).click()
        page.wait_for_url(url + "/")  # next never leads back into /guard/ (no login loops)
        page.goto(url + "/guard/tokens")
        assert page.get_by_role("heading", name="Personal tokens").is_visible()
        page.get_by_label("Name").fill("laptop")
        page.get_by_label("Expires after").select_option("7d")
        page.get_by_role("button", name="Create token").click()
        page.wait_for_selector("#secret")
        secret = page.get_by_label("Secret").input_value()
        assert secret.startswith("mlg_")

        who = httpx.get(f"{url}/guard/api/me", headers={"Authorization": f"Bearer {secret}"})
        assert who.status_code == 200 and who.json()["subject"] == "user:dave"
        basic = httpx.get(f"{url}/guard/api/me", auth=("dave", secret))
        assert basic.status_code == 200

        page.get_by_role("link", name="Back to your tokens").click()
        assert secret not in page.content()
        assert page.get_by_role("cell", name="laptop", exact=True).is_visible()
        page.get_by_role("button", name="Revoke token laptop").click()
        assert page.get_by_text("Token laptop revoked.").is_visible()
        # Refused within tokens.cache_ttl (0.5 s in these gateways): the use just before may be
        # cached. Bounded wait.
        deadline = time.monotonic() + 5
        while (
            ended := httpx.get(f"{url}/guard/api/me", headers={"Authorization": f"Bearer {secret}"})
        ).status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ended.status_code == 401 and ended.headers["x-guard-reason"] == "token_revoked"
        assert violations == []
    finally:
        context.close()
