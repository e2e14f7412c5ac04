"""The ``workers`` benchmark's own machinery (``benchmarks/workers.py``): that a server
with two uvicorn workers is seen whole and stopped whole, that each worker's responses
are counted, and that wrk's output and the report are read and written right. Nothing
here is timed: the benchmark measures, these tests check what it relies on."""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
from benchmarks import server, workers
from benchmarks.serve import Served
from starlette.types import Receive, Scope, Send

from tests.helpers import http_scope, run_asgi

WRK_OUTPUT = """Running 5s test @ http://127.0.0.1:40000/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.74ms  310.00us   8.00ms   90.00%
    Req/Sec    11.60k   500.00    12.00k    80.00%
  Latency Distribution
     50%  850.00us
     75%    2.90ms
     90%    3.10ms
     99%    1.20s
  57850 requests in 5.00s, 7.56MB read
  Socket errors: connect 1, read 3, write 0, timeout 2
  Non-2xx or 3xx responses: 5
Requests/sec:  11570.12
Transfer/sec:      1.51MB
"""


def test_wrk_output_is_read() -> None:
    load = workers.parse_wrk(WRK_OUTPUT)
    assert load == server.Load(11570.12, 0.85, 1200.0, 5)
    assert workers.wrk_errors(WRK_OUTPUT) == 6


def test_clean_wrk_output_has_no_errors() -> None:
    clean = WRK_OUTPUT.replace("  Socket errors: connect 1, read 3, write 0, timeout 2\n", "")
    clean = clean.replace("  Non-2xx or 3xx responses: 5\n", "")
    assert workers.wrk_errors(clean) == 0
    assert workers.parse_wrk(clean).non_200 == 0
    with pytest.raises(ValueError, match="Requests/sec"):
        workers.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused")


async def _status_app(scope: Scope, receive: Receive, send: Send) -> None:
    """200 on ``/``, 401 elsewhere; a lifespan that starts and stops."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    status = 200 if scope["path"] == "/" else 401
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b""})


@pytest.mark.anyio
async def test_served_counts_responses_by_status_and_reports_at_shutdown(
    tmp_path: Path,
) -> None:
    app = Served(_status_app, tmp_path)
    for path in ("/", "/", "/nope", "/"):
        sent = await run_asgi(app, http_scope(path))
        assert sent[0]["status"] == (200 if path == "/" else 401)  # passed on untouched
    assert _names(tmp_path) == []  # reported at shutdown, not per request
    lifespan: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    await run_asgi(app, lifespan, [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    pid = os.getpid()
    assert _names(tmp_path) == [f"ready-{pid}", f"served-{pid}"]
    assert _text(tmp_path / f"served-{pid}") == "3 1\n"


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_signals_raise_inside_and_handlers_come_back_after() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with workers.signals_raise(), pytest.raises(workers.Interrupted):
        signal.raise_signal(signal.SIGTERM)
    with workers.signals_raise(), pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


@pytest.mark.slow
def test_two_workers_are_seen_counted_and_stopped_whole() -> None:
    running = workers.start({"KGB_CONTENDER": "bare"}, 2)
    group = running.proc.pid
    held: list[socket.socket] = []
    try:
        assert len(running.pids) == 2
        assert group not in running.pids  # the workers, not uvicorn's supervisor
        assert workers.group_alive(group)
        # Connections the workers accepted are found in /proc, whichever worker holds them.
        for _ in range(4):
            held.append(socket.create_connection(("127.0.0.1", running.port)))
        deadline = time.monotonic() + 30
        while sum(workers.connections(running.pids, running.port)) < 4:
            assert time.monotonic() < deadline, workers.connections(running.pids, running.port)
            time.sleep(0.05)
        assert sum(workers.connections(running.pids, running.port)) == 4
        for conn in held:
            conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.recv(4096).startswith(b"HTTP/1.1 200 ")
    finally:
        for conn in held:
            conn.close()
        served = workers.stop(running)
    assert not workers.group_alive(group)
    assert sorted(served) == running.pids
    assert sum(ok for ok, _ in served.values()) == 4
    assert all(other == 0 for _, other in served.values())


def _run(
    rps: float,
    held: list[int],
    served: list[int],
    cores: tuple[float, float, float],
    redraws: int = 0,
) -> workers.Run:
    return workers.Run(server.Load(rps, 1.0, 2.0, 0), 0, served, held, *cores, redraws)


def test_report_pairs_rounds_and_counts_redraws() -> None:
    bare = workers.Contender("bare", {}, {})
    bare.runs = {
        1: [_run(1000, [32], [5000], (1.0, 0.2, 0.3)), _run(2000, [32], [9000], (1.0, 0.2, 0.3))],
        2: [
            _run(1500, [20, 12], [600, 400], (1.5, 0.2, 1.9), redraws=3),
            _run(2200, [16, 16], [500, 500], (1.6, 0.2, 2.1)),
        ],
    }
    text = workers.render([bare], 5, 2, ("1.00, 1.00, 1.00", "2.00, 1.50, 1.00"))
    rows = [line for line in text.splitlines() if line.startswith("| bare")]
    # 2 ÷ 1 is the median of the per-round ratios (1.5 and 1.1), not 1850 / 1500.
    assert rows[0].split(" | ")[2:4] == ["1,500", "—"]
    assert rows[1].split(" | ")[2:4] == ["1,850", "1.30x"]
    assert "18 of 32, 55 %" in rows[1]
    # CPU: server and client as measured; the rest is the machine's busy time less both.
    assert rows[1].endswith("| 1.55 | 0.20 | 0.25 | 1,188 |")  # 1000 and 1375 per CPU s
    assert "Load average before: 1.00, 1.00, 1.00; after: 2.00, 1.50, 1.00." in text
    assert "of the 32 connections: 3 times (per round: bare 3+0)." in text


def test_balanced_means_every_worker_holds_a_quarter() -> None:
    assert workers.balanced([16, 16])
    assert workers.balanced([24, 8])
    assert not workers.balanced([25, 7])
    assert not workers.balanced([32, 0])


def test_two_staggered_clients_combine_into_one_load() -> None:
    first = WRK_OUTPUT  # 57850 requests in 5.00 s, p50 0.85 ms, p99 1200 ms, 5 non-2xx
    second = (
        WRK_OUTPUT.replace("57850 requests in 5.00s", "42150 requests in 5.00s")
        .replace("50%  850.00us", "50%    1.85ms")
        .replace("99%    1.20s", "99%   10.00ms")
        .replace("Non-2xx or 3xx responses: 5", "Non-2xx or 3xx responses: 1")
    )
    assert workers.wrk_requests(second) == (42150, 5.0)
    combined = workers.combine([first, second], 0.25)
    # 100,000 requests over the span from the first start to the second's end, 5.25 s.
    assert combined.load.requests_per_second == pytest.approx(100_000 / 5.25)
    assert combined.load.p50_ms == pytest.approx((0.85 * 57850 + 1.85 * 42150) / 100_000)
    assert combined.load.p99_ms == 1200.0
    assert combined.load.non_200 == 6
    assert combined.errors == 12
