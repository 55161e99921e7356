"""Filtered search through the real gateway: every visible item exactly once, no hidden one."""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from guard.admin.governance import Governance
from guard.app import build_gateway
from guard.authz.policy import parse_lines
from guard.config import load_settings
from tests.servers import ServerThread, read_request_body, send_response

READER = "mlg_" + "v" * 43
OTHER = "mlg_" + "o" * 43
# 40 experiments; a caller may read the "vis" ones, hidden ones come in runs of up to 5.
NAMES = [f"{'vis' if i % 7 in (0, 3) else 'hid'}-{i:02d}" for i in range(40)]
MODELS = [f"{'vis' if i % 2 else 'hid'}-m{i}" for i in range(9)]


class PagingMlflow:
    """experiments/search and registered-models/search with MLflow-style offset tokens."""

    def __init__(self) -> None:
        self.calls = 0
        self.cap: int | None = None  # answer at most this many per page (a thin upstream)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_request_body(receive)
        if scope["path"] == "/version":
            await send_response(send, 200, b"3.17.2")
            return
        query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
        fields = json.loads(body) if body else query
        size, offset = int(fields.get("max_results", 1000)), int(fields.get("page_token") or 0)
        size = min(size, self.cap or size)
        if scope["path"].endswith("/experiments/search"):
            items, key = (
                [{"experiment_id": str(i), "name": n} for i, n in enumerate(NAMES)],
                "experiments",
            )
            if fields.get("filter") == "name LIKE 'x%'":
                items = []
            elif fields.get("filter") == "name LIKE 'hid%'":
                items = [i for i in items if i["name"].startswith("hid")]
        else:
            items, key = [{"name": n} for n in MODELS], "registered_models"
        self.calls += 1
        page = {key: items[offset : offset + size]}
        if offset + size < len(items):
            page["next_page_token"] = str(offset + size)
        await send_response(send, 200, json.dumps(page).encode())


@pytest.fixture(scope="module")
def fake() -> PagingMlflow:
    return PagingMlflow()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory, fake: PagingMlflow) -> Iterator[str]:
    data: Path = tmp_path_factory.mktemp("search")
    with ServerThread(fake, lifespan="off") as upstream:
        settings = load_settings(
            {"upstream.url": upstream.url, "storage.data_dir": str(data),
             "authz.search_max_pages": "3"}, {}, None,
        ).settings  # fmt: skip
        env = {
            "MLFLOW_GUARD_BOOTSTRAP_TOKEN": "mlg_" + "b" * 43,
            "MLFLOW_GUARD_SECRET_KEY": "k" * 40,
        }
        app = build_gateway(settings, env)
        with ServerThread(app) as server:
            g = Governance(app.tokens, app.policies.store)
            g.tokens.create("reader", "admin", 3600, READER)
            g.tokens.create("other", "admin", 3600, OTHER)
            g.change("test", add=parse_lines([
                "p, token:reader, viewer, experiment:vis-*",
                "p, token:reader, viewer, model:vis-*",
                "p, token:other, viewer, experiment:hid-*",
            ]))  # fmt: skip
            deadline = time.monotonic() + 10
            while app.policies.index.version != app.policies.store.version():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            yield server.url


def page_through(url: str, token: str, size: int, method: str = "POST") -> tuple[list[str], int]:
    names: list[str] = []
    page_token = None
    pages = 0
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}) as client:
        while pages < 100:
            fields: dict[str, object] = {"max_results": size}
            if page_token:
                fields["page_token"] = page_token
            if method == "POST":
                response = client.post(url, json=fields)
            else:
                response = client.get(url, params=fields)
            assert response.status_code == 200, response.text
            data = response.json()
            items = data.get("experiments", data.get("registered_models", []))
            assert len(items) <= size
            names += [item["name"] for item in items]
            pages += 1
            page_token = data.get("next_page_token")
            if not page_token:
                break
    return names, pages


@pytest.mark.parametrize("size", [1, 2, 3, 5, 7, 1000])
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_every_visible_experiment_exactly_once(gateway: str, size: int, method: str) -> None:
    names, _ = page_through(f"{gateway}/api/2.0/mlflow/experiments/search", READER, size, method)
    assert names == [n for n in NAMES if n.startswith("vis")]


def test_another_caller_sees_their_own(gateway: str) -> None:
    names, _ = page_through(f"{gateway}/ajax-api/2.0/mlflow/experiments/search", OTHER, 4)
    assert names == [n for n in NAMES if n.startswith("hid")]


def test_registered_models(gateway: str) -> None:
    names, _ = page_through(f"{gateway}/api/2.0/mlflow/registered-models/search", READER, 2, "GET")
    assert names == [n for n in MODELS if n.startswith("vis")]


def test_sparse_results_come_in_short_pages_not_silence(
    gateway: str, fake: PagingMlflow, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An upstream answering 1 per page, at most 3 pages per answer: some answers are short or
    # empty, none lost.
    monkeypatch.setattr(fake, "cap", 1)
    names, pages = page_through(f"{gateway}/api/2.0/mlflow/experiments/search", READER, 1)
    assert names == [n for n in NAMES if n.startswith("vis")]
    assert pages > len(names)


@pytest.mark.parametrize("size", [1, 2, 5])
@pytest.mark.parametrize("method", ["POST", "GET"])
def test_paging_holds_when_upstream_pages_are_thin(
    gateway: str, fake: PagingMlflow, monkeypatch: pytest.MonkeyPatch, size: int, method: str
) -> None:
    monkeypatch.setattr(fake, "cap", 4)
    names, _ = page_through(f"{gateway}/api/2.0/mlflow/experiments/search", READER, size, method)
    assert names == [n for n in NAMES if n.startswith("vis")]


@pytest.mark.parametrize("prefix", ["/api", "/ajax-api"])
def test_hidden_matches_cost_and_say_nothing(gateway: str, fake: PagingMlflow, prefix: str) -> None:
    """A filter matching only hidden experiments answers like one matching nothing, at the same
    upstream cost, and its page token does not count what was skipped (the review's LIKE-prefix
    and token oracles)."""
    url = f"{gateway}{prefix}/2.0/mlflow/experiments/search"
    answers, costs = [], []
    for probe in ("name LIKE 'hid%'", "name LIKE 'x%'"):
        before = fake.calls
        response = httpx.post(url, headers={"Authorization": f"Bearer {READER}"},
                              json={"filter": probe, "max_results": 1})  # fmt: skip
        costs.append(fake.calls - before)
        answers.append(response.json())
    assert answers == [{"experiments": []}, {"experiments": []}]
    assert costs == [1, 1]
    # A token names an upstream cursor and a position in its page: both count hidden items, so
    # neither can be read out of it.
    first = httpx.post(url, headers={"Authorization": f"Bearer {READER}"},
                       json={"max_results": 1, "order_by": ["name DESC"]})  # fmt: skip
    token = first.json()["next_page_token"]
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert b'"o"' not in raw and b'"u"' not in raw and b"offset" not in raw


def test_the_callers_filter_is_kept(gateway: str) -> None:
    response = httpx.post(f"{gateway}/api/2.0/mlflow/experiments/search",
                          headers={"Authorization": f"Bearer {READER}"},
                          json={"filter": "name LIKE 'x%'"})  # fmt: skip
    assert response.json() == {"experiments": []}


def test_page_tokens_cannot_be_forged_or_shared(gateway: str) -> None:
    url = f"{gateway}/api/2.0/mlflow/experiments/search"
    first = httpx.post(url, headers={"Authorization": f"Bearer {READER}"}, json={"max_results": 2})
    token = first.json()["next_page_token"]
    for bad, who in ((token[:-2] + "xx", READER), ("10", READER), (token, OTHER)):
        response = httpx.post(url, headers={"Authorization": f"Bearer {who}"},
                              json={"max_results": 2, "page_token": bad})  # fmt: skip
        assert response.status_code == 400
        assert response.json()["reason"] == "invalid_request_body"


@pytest.mark.parametrize("size", ["0", "-1", "x", "50001"])
def test_bad_page_sizes(gateway: str, size: str) -> None:
    response = httpx.get(f"{gateway}/api/2.0/mlflow/experiments/search",
                         headers={"Authorization": f"Bearer {READER}"},
                         params={"max_results": size})  # fmt: skip
    assert response.json()["reason"] == "invalid_request_body"
