"""One uvicorn worker against two (``python -m benchmarks --sections workers``).

The same app as the ``server`` section (``benchmarks.serve``), bare and behind
keyguard on each store with its default cache, served by ``uvicorn --workers 1``
and ``--workers 2`` in interleaved rounds (a new random order each round) and
driven on loopback by two wrk clients of 1 thread and 16 connections each, the
second started 0.2 s after the first, in both cases.

Every server runs in a process group of its own, so stopping it reaches the
workers uvicorn's supervisor spawned: SIGTERM, then SIGKILL to the group for
anything left, on errors and Ctrl-C too (SIGTERM to the benchmark is turned
into an exception so its ``finally`` runs), and the group is checked empty
before the next server starts. Each worker writes a ready file when its
lifespan has started and, at shutdown, how many responses it sent and how
many were not 200 (``KGB_SERVED_DIR``, see ``benchmarks.serve``): a run
counts only if every worker served, none answered anything but 200 and the
client saw no error. uvicorn's workers share one listening socket and wrk
opens its connections at once, so with one wrk of 32 connections one worker
often accepted most or all of them (on this 2-core machine, for one store in
40 draws in a row): hence the two staggered clients, whose second half of the
connections arrives while the worker that took the first half is busy. The
connections each worker holds are also counted from ``/proc`` half a second
into the load, and both clients are started again while a worker holds fewer
than a quarter (the report says how often). The CPU time the workers and wrk
used during the timed part is read from ``/proc`` and ``getrusage``, so the
report can say where the two cores went.
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks import report, server
from benchmarks.stores import Seeded, drop, seed, tag_key_hex
from benchmarks.workers.processes import (
    Interrupted,
    Server,
    connections,
    cpu_seconds,
    group_alive,
    machine_busy_seconds,
    signals_raise,
    start,
    stop,
)
from benchmarks.workers.wrk import (
    CONNECTIONS,
    ClientResult,
    combine,
    drive,
    kill_all,
    parse_wrk,
    spawn,
    wrk_errors,
    wrk_requests,
)

__all__ = [
    "CONNECTIONS",
    "Contender",
    "Interrupted",
    "Run",
    "balanced",
    "combine",
    "connections",
    "group_alive",
    "parse_wrk",
    "render",
    "section",
    "signals_raise",
    "start",
    "stop",
    "wrk_errors",
    "wrk_requests",
]

WORKER_COUNTS = (1, 2)
# uvicorn's workers share one listening socket, and wrk opens its connections at once and
# keeps them: whichever worker wakes first may accept most or all of them. Two clients of
# half the connections, STAGGER seconds apart, spread them; the connections are counted
# SAMPLE_AT seconds after the second started, and when a worker holds fewer than
# MIN_SHARE of them both clients are stopped and started again (a redraw), at most
# MAX_REDRAWS times.
SAMPLE_AT = 0.5
STAGGER = 0.2
MIN_SHARE = 0.25
MAX_REDRAWS = 40
_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Run:
    """One timed load of one server."""

    load: server.Load
    errors: int  # the client's socket errors (connect, read, write, timeout)
    served: list[int]  # 200 responses per worker, warm-up included, busiest first
    held: list[int]  # the client's connections each worker held during the load, most first
    worker_cores: float  # CPU seconds the server's processes used per second of load
    client_cores: float  # the same for the client (wrk)
    machine_cores: float  # every CPU on the machine, busy, per second (all of it, others too)
    redraws: int = 0  # wrk runs stopped early and started again: connections too uneven

    @property
    def per_server_cpu_second(self) -> float:
        """Requests answered per CPU second the server's processes used."""
        return self.load.requests_per_second / self.worker_cores if self.worker_cores else 0.0

    @property
    def rest_cores(self) -> float:
        """The machine's busy time not charged to the server or the client."""
        return self.machine_cores - self.worker_cores - self.client_cores


@dataclass
class Contender:
    name: str
    env: dict[str, str]
    headers: dict[str, str]
    runs: dict[int, list[Run]] = field(default_factory=dict)


def balanced(held: list[int]) -> bool:
    """Whether every worker holds at least ``MIN_SHARE`` of the client's connections."""
    return min(held) >= MIN_SHARE * CONNECTIONS


@dataclass
class Timed:
    result: ClientResult
    held: list[int]
    redraws: int
    worker_cores: float
    client_cores: float
    machine_cores: float


def timed_load(running: Server, headers: dict[str, str], seconds: int) -> Timed:
    """One timed load, its connections per worker sampled during it, and the CPU the
    server, the client and the machine used meanwhile. With wrk and more than one worker,
    a draw of connections below ``MIN_SHARE`` for a worker is redrawn (``MAX_REDRAWS``)."""
    watched = sorted({running.proc.pid, *running.pids})  # one worker: the same process
    redraws = 0
    while True:
        held: list[int] = []
        cpu0, machine0 = cpu_seconds(watched), machine_busy_seconds()
        client0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall0 = time.monotonic()
        if shutil.which("wrk"):
            clients: list[subprocess.Popen[str]] = []
            try:
                # Two clients of half the connections each, the second STAGGER seconds
                # after the first: its connections arrive while the worker that took the
                # first half is busy, so the other (idle) one accepts them.
                clients.append(spawn(running.port, headers, seconds, CONNECTIONS // 2))
                time.sleep(STAGGER)
                stagger = time.monotonic() - wall0
                clients.append(spawn(running.port, headers, seconds, CONNECTIONS // 2))
                time.sleep(SAMPLE_AT)
                held = connections(running.pids, running.port)
                if len(held) > 1 and not balanced(held) and redraws < MAX_REDRAWS:
                    redraws += 1
                    kill_all(clients)
                    continue
                outs = [c.communicate() for c in clients]
            except BaseException:
                kill_all(clients)
                raise
            for c, (_, err) in zip(clients, outs, strict=True):
                if c.returncode:
                    raise RuntimeError(f"wrk exited with {c.returncode}: {err.strip()}")
            result = combine([out for out, _ in outs], stagger)
        else:

            def sample(into: list[int] = held) -> None:
                into.extend(connections(running.pids, running.port))

            sampler = threading.Timer(SAMPLE_AT, sample)
            sampler.start()
            try:
                result = drive(running.port, headers, seconds)
            finally:
                sampler.cancel()
                sampler.join()
        wall = time.monotonic() - wall0
        client1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu1, machine1 = cpu_seconds(watched), machine_busy_seconds()
        client = (client1.ru_utime + client1.ru_stime) - (client0.ru_utime + client0.ru_stime)
        return Timed(
            result,
            held,
            redraws,
            (cpu1 - cpu0) / wall,
            client / wall,
            (machine1 - machine0) / wall,
        )


def measure(contender: Contender, workers: int, seconds: int) -> Run:
    """Start a server, warm it up, time one load, stop it, and check that every worker
    held connections and served, only 200s, and the client saw no error."""
    running = start(contender.env, workers)
    try:
        drive(running.port, contender.headers, 1)  # warm-up: connections, caches
        timed = timed_load(running, contender.headers, seconds)
    finally:
        served = stop(running)
    label = f"{contender.name}, {workers} worker(s)"
    load = timed.result.load
    if sorted(served) != running.pids:
        raise RuntimeError(f"{label}: workers {running.pids} ready, {sorted(served)} reported")
    if any(other for _, other in served.values()) or load.non_200:
        raise RuntimeError(f"{label}: responses other than 200: {served}, {load}")
    if timed.result.errors:
        raise RuntimeError(f"{label}: {timed.result.errors} socket errors")
    if len(timed.held) != workers:
        raise RuntimeError(f"{label}: connections not sampled during the load")
    if 0 in timed.held or any(ok == 0 for ok, _ in served.values()):
        raise RuntimeError(
            f"{label}: a worker held no connection or served nothing "
            f"(connections {timed.held}, responses {served}, {timed.redraws} redraws)"
        )
    return Run(
        load,
        timed.result.errors,
        sorted((ok for ok, _ in served.values()), reverse=True),
        sorted(timed.held, reverse=True),
        timed.worker_cores,
        timed.client_cores,
        timed.machine_cores,
        timed.redraws,
    )


async def contenders(backends: list[str], workdir: Path) -> tuple[list[Contender], list[Seeded]]:
    """The bare app, keyguard on memory (each worker seeds its own key, from the
    environment) and keyguard on each shared store with its default cache."""
    memory = await seed("memory", workdir, cache=False)
    seeded = [memory]
    found = [
        Contender("bare", {"KGB_CONTENDER": "bare"}, {}),
        Contender(
            "keyguard memory",
            {
                "KGB_CONTENDER": "keyguard",
                "KGB_STORE_URL": "memory://",
                "KGB_CLIENT_ID": memory.internal[0].decode(),
                "KGB_SECRET": memory.internal[1].decode(),
                "KGB_ID_TAG_KEY": await tag_key_hex(memory.store),
            },
            _headers(memory),
        ),
    ]
    try:
        for backend in backends:
            if backend == "memory":
                continue
            s = await seed(backend, workdir, cache=True)
            seeded.append(s)
            found.append(
                Contender(
                    f"keyguard {backend}, cache",
                    {
                        "KGB_CONTENDER": "keyguard",
                        "KGB_STORE_URL": s.url,
                        "KGB_PREFIX": s.prefix,
                        "KGB_CACHE": "1",
                    },
                    _headers(s),
                )
            )
    except BaseException:
        for s in seeded:
            await drop(s)
        raise
    return found, seeded


def _headers(s: Seeded) -> dict[str, str]:
    return {
        "X-IBM-Client-Id": s.internal[0].decode(),
        "X-IBM-Client-Secret": s.internal[1].decode(),
    }


def run(found: list[Contender], seconds: int, rounds: int) -> None:
    """``rounds`` rounds, each timing every (contender, worker count) once, in a new
    random order; the runs are stored on the contenders."""
    for c in found:
        c.runs = {n: [] for n in WORKER_COUNTS}
    with signals_raise():
        for i in range(rounds):
            order = [(c, n) for c in found for n in WORKER_COUNTS]
            random.shuffle(order)
            for c, n in order:
                c.runs[n].append(measure(c, n, seconds))
            print(f"workers: round {i + 1} of {rounds} done", file=sys.stderr, flush=True)


def ratio(c: Contender) -> float:
    """Median over rounds of (2 workers' requests/s ÷ 1 worker's) in the same round."""
    return statistics.median(
        two.load.requests_per_second / one.load.requests_per_second
        for one, two in zip(c.runs[1], c.runs[2], strict=True)
    )


def split(runs: list[Run]) -> str:
    """The busiest worker's connections and share of the responses, medians over rounds
    ("—" for one worker)."""
    if len(runs[0].served) < 2:
        return "—"
    held = statistics.median(r.held[0] for r in runs)
    share = statistics.median(r.served[0] / sum(r.served) * 100 for r in runs)
    return f"{held:.0f} of {sum(runs[0].held)}, {share:.0f} %"


def render(found: list[Contender], seconds: int, rounds: int, loads: tuple[str, str]) -> str:
    """The section's Markdown: the method, the table, the load averages before and after."""
    client = (
        f"two wrk clients started {STAGGER} s apart (1 thread and {CONNECTIONS // 2} "
        "connections each, "
        if shutil.which("wrk")
        else "the bounded Python client (no wrk installed; it competes with the workers for "
        f"the CPU, {CONNECTIONS} connections, "
    )
    lines = [
        "\n## One uvicorn worker against two\n",
        f"uvicorn `--workers 1` and `--workers 2`, `--no-access-log`, driven by {client}"
        f"{seconds} s) on loopback; {rounds} interleaved rounds in "
        "a new random order, a fresh server each time, medians. *2 ÷ 1* is the median over "
        "rounds of the two servers' requests/s in the same round; requests/s counts every "
        "request over the whole span of the clients, p50 is their p50s weighted by their "
        "requests, p99 the larger of their p99s. *Busiest worker*: the "
        "client's connections it held during the load, and its share of the responses "
        "(16 of 32 and 50 % is an even split). CPU is in cores (CPU seconds per second) "
        "during the timed load: the server's processes, the client, and the rest of the "
        "machine's busy time (other work on it, and kernel network work charged to no "
        "process). *non-200* counts the client's non-200 "
        "responses and socket errors; every worker also counted its own responses, all 200.\n",
        f"Load average before: {loads[0]}; after: {loads[1]}.\n",
    ]
    rows = []
    for c in found:
        for n in WORKER_COUNTS:
            runs = c.runs[n]
            rows.append(
                [
                    c.name,
                    str(n),
                    f"{statistics.median(r.load.requests_per_second for r in runs):,.0f}",
                    "—" if n == 1 else report.num(ratio(c)) + "x",
                    report.num(statistics.median(r.load.p50_ms for r in runs)),
                    report.num(statistics.median(r.load.p99_ms for r in runs)),
                    str(sum(r.load.non_200 + r.errors for r in runs)),
                    split(runs),
                    report.num(statistics.median(r.worker_cores for r in runs)),
                    report.num(statistics.median(r.client_cores for r in runs)),
                    report.num(statistics.median(r.rest_cores for r in runs)),
                    f"{statistics.median(r.per_server_cpu_second for r in runs):,.0f}",
                ]
            )
    lines.append(
        report.table(
            [
                "app",
                "workers",
                "requests/s",
                "2 ÷ 1",
                "p50 ms",
                "p99 ms",
                "non-200",
                "busiest worker",
                "CPU: server",
                "CPU: client",
                "CPU: rest",
                "requests / server CPU s",
            ],
            rows,
        )
    )
    lines.append(redraw_note(found))
    return "\n".join(lines)


def redraw_note(found: list[Contender]) -> str:
    """How often wrk was started again because a worker held too few connections."""
    counts = {c.name: [r.redraws for r in c.runs[2]] for c in found}
    total = sum(sum(n) for n in counts.values())
    text = (
        f"\nClients redrawn (stopped and started again) because a worker held "
        f"fewer than {MIN_SHARE * CONNECTIONS:.0f} of the {CONNECTIONS} connections: "
        f"{total} times"
    )
    if not total:
        return text + ".\n"
    parts = [f"{name} {'+'.join(map(str, n))}" for name, n in counts.items() if sum(n)]
    return text + " (per round: " + ", ".join(parts) + ").\n"


def load_average() -> str:
    return ", ".join(f"{v:.2f}" for v in os.getloadavg())


async def section(
    backends: list[str], workdir: Path, seconds: int, rounds: int, out: list[str]
) -> None:
    """Seed, measure, clean up, and append the report to ``out``. The servers run from
    this coroutine, blocking its loop (the seeded stores live on it until they are
    dropped), in the main thread, where the signal handlers must be set."""
    found, seeded = await contenders(backends, workdir)
    before = load_average()
    try:
        run(found, seconds, rounds)
    finally:
        for s in seeded:
            await drop(s)
    out.append(render(found, seconds, rounds, (before, load_average())))
