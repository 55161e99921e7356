"""The bench harness's own helpers: figures, their verdicts, the summary table, quick mode and
interleaving, and bench.audit's spool rows against the spool as it is (no measurement here: no
server is started, no figure is judged)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.common import Figure, Report, Run, rotated, rounds, spread, table
from bench.summary import ORDER, lines, main, read


@pytest.mark.parametrize(
    ("values", "target", "at_least", "met"),
    [
        ([0.96, 0.90, 0.97, 0.99, 0.80], 0.95, True, True),  # median 0.96
        ([0.94, 0.99, 0.93, 0.99, 0.80], 0.95, True, False),  # median 0.94
        ([0.95], 0.95, True, True),  # the bound itself meets it
        ([0.25, 0.5, 0.29], 0.3, False, True),  # median 0.29
        ([0.31, 0.1, 0.4], 0.3, False, False),
        ([1.0, 2.0], None, True, None),  # no target: no verdict
        ([], 0.3, False, None),  # nothing measured: no verdict
    ],
)
def test_a_figure_is_judged_by_its_median(
    values: list[float], target: float | None, at_least: bool, met: bool | None
) -> None:
    assert Figure("f", values, "x", target, at_least).met is met


def test_the_table_prints_targets_only_for_figures_that_have_one() -> None:
    rows = [
        ("with", Figure("with", [0.2, 0.3, 0.4], "ms", 0.3, at_least=False)),
        ("without", Figure("without", [1.0, 3.0, 2.0], "ms")),
        ("missed", Figure("missed", [0.5], "x", 0.95)),
    ]
    header, with_target, without, missed = table(rows)
    assert header.split()[:2] == ["figure", "median"]
    assert "0.300 ms" in with_target and "0.200..0.400" in with_target
    assert with_target.endswith("<= 0.3 ms met")
    assert "2.000 ms" in without and "1.000..3.000" in without
    assert "<=" not in without and ">=" not in without and "met" not in without
    assert missed.endswith(">= 0.95x NOT MET")
    assert " - " in missed  # one run: no spread


def test_spread_is_the_median_with_min_and_max() -> None:
    assert spread([3.0, 1.0, 2.0], 1) == "2.0 (1.0..3.0)"
    assert spread([1.5], 2) == "1.50"


def test_interleaved_runs_take_turns_going_first() -> None:
    firsts = [rotated(["direct", "on", "off"], r)[0] for r in range(4)]
    assert firsts == ["direct", "on", "off", "direct"]
    assert sorted(rotated(["a", "b"], 1)) == ["a", "b"]


def test_quick_mode_shortens_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("BENCH_QUICK", raising=False)
    assert rounds(5, 3.0) == (5, 3.0)
    monkeypatch.setenv("BENCH_QUICK", "0")
    assert rounds(5, 3.0) == (5, 3.0)
    monkeypatch.setenv("BENCH_QUICK", "1")
    assert rounds(5, 3.0) == (2, 1.0)


def test_a_run_reads_quantiles_by_kind_and_cpu_per_request() -> None:
    run = Run(4, 2.0, [0.001, 0.003, 0.002, 0.010], 0, 0.002, ["read", "write", "read", "write"])
    assert run.rps == 2.0
    assert run.cpu_ms == pytest.approx(0.5)
    assert run.quantile(0.5, "read") == 0.002
    assert run.quantile(0.5, "write") == 0.010
    assert run.quantile(0.0) == 0.001
    assert Run(0, 1.0, [], 0, None).cpu_ms == 0.0


def test_reports_are_written_where_bench_results_says_and_summarized(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path))
    monkeypatch.delenv("BENCH_QUICK", raising=False)
    proxy = Report("proxy")
    proxy.add(Figure("gateway/direct rps, c=1", [0.9, 0.97, 0.96], "x", 0.95))
    proxy.add(Figure("added p50 writes, c=1", [2.0, 2.5, 1.5], "ms"))
    proxy.finish()
    workers = Report("workers")
    workers.add(Figure("2 workers / 1, c=1", [1.2, 1.3, 1.25], "x", 1.1, at_least=False))
    workers.finish()
    saved = json.loads((tmp_path / "proxy.json").read_text())
    assert saved["module"] == "proxy" and saved["quick"] is False
    assert [f["name"] for f in saved["figures"]] == [
        "gateway/direct rps, c=1",
        "added p50 writes, c=1",
    ]

    results = read(tmp_path)
    assert [r["module"] for r in results] == ["proxy", "workers"]
    out = lines(results)
    assert any(line.startswith("proxy: gateway/direct rps, c=1") for line in out)
    assert any("1 of 2 targets met" in line for line in out)
    missing = next(line for line in out if line.startswith("no results from"))
    assert all(f"bench.{m}" in missing for m in set(ORDER) - {"proxy", "workers"})
    assert not any("QUICK" in line for line in out)

    capsys.readouterr()
    monkeypatch.setattr("sys.argv", ["bench.summary", str(tmp_path)])
    assert main() == 0
    assert "1 of 2 targets met" in capsys.readouterr().out


def test_quick_results_are_marked_and_an_empty_directory_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BENCH_RESULTS", str(tmp_path / "results"))
    monkeypatch.setenv("BENCH_QUICK", "1")
    report = Report("audit")
    report.add(Figure("records per fsync", [11.5], ""))
    report.finish()
    out = lines(read(tmp_path / "results"))
    assert any("QUICK MODE" in line for line in out)
    assert any("0 of 0 targets met" in line for line in out)

    (tmp_path / "empty").mkdir()
    monkeypatch.setattr("sys.argv", ["bench.summary", str(tmp_path / "empty")])
    assert main() == 2


@pytest.mark.parametrize(
    ("reads", "ship"),
    [(False, False), (True, False), (False, True)],
    ids=["appends", "reads", "ship"],
)
def test_the_spool_rows_run_against_the_spool_as_it_is(
    tmp_path: Path, reads: bool, ship: bool
) -> None:
    """bench.audit drives the spool's own interface (a change to it must not wait for a
    `make bench` to break the bench): a few requests, each an intent and its outcome."""
    import asyncio

    from bench.audit import spool_run

    ship_to = f"sqlite:///{tmp_path / 'ship.db'}" if ship else None
    run = asyncio.run(spool_run(tmp_path / "spool", 2, 10, 30.0, ship_to, reads=reads))
    # (the last outcomes of the two tasks may not be fsynced yet when the run is measured)
    assert 18 <= run.records <= 20 and run.commits >= 1 and len(run.latencies) == 10


def test_the_hop_alone_forwards_a_request_and_relays_the_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """bench/hop.py (the floor bench.proxy compares with): the method, target, body and the
    upstream's own Host go up; the status, the headers but hop-by-hop ones, and the body come
    back. (No process is started: an asyncio server answers in this one.)"""
    import asyncio

    import httpx

    from bench import hop
    from guard.upstream.client import UpstreamClient

    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))  # fmt: skip
        seen.append(head + await reader.readexactly(length))
        writer.write(b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\n"
                     b"keep-alive: timeout=5\r\ncontent-length: 7\r\n\r\n{\"a\":1}")  # fmt: skip
        await writer.drain()
        writer.close()

    async def main() -> httpx.Response:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        monkeypatch.setattr(
            hop, "client", UpstreamClient(f"http://127.0.0.1:{port}", hop.client.limits)
        )
        hop.client.open()
        try:
            transport = httpx.ASGITransport(app=hop.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
                return await client.post("/api/2.0/mlflow/runs/create?x=1", content=b'{"b":2}',
                                         headers={"content-type": "application/json"})  # fmt: skip
        finally:
            await hop.client.close()
            server.close()
            await server.wait_closed()

    answer = asyncio.run(asyncio.wait_for(main(), 20))
    assert answer.status_code == 201
    assert answer.content == b'{"a":1}'
    assert "keep-alive" not in answer.headers
    (request,) = seen
    assert request.startswith(b"POST /api/2.0/mlflow/runs/create?x=1 HTTP/1.1\r\n")
    assert f"\r\nhost: {hop.client.host_header}\r\n".encode() in request.lower()
    assert request.endswith(b'\r\n\r\n{"b":2}')
