"""What counting usage costs a request (SPEC §10): ``python -m benchmarks.usage``.

Two measurements, medians over interleaved rounds:

* the counter alone: ``UsageRecorder.admitted`` called in a tight loop for
  ten keys, against the same loop calling a no-op method (so loop and call
  overhead are not charged to the counter);
* ``KeyGuard`` alone, in front of an ASGI app that does nothing, with usage
  counting on (the default) and off (``usage_flush=None``), alternating;
* in process: the same, behind the Starlette app of ``benchmarks.inprocess``
  (noisier: the app's own work varies more than the hook costs).
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import tempfile
import time
from pathlib import Path

from starlette.types import Message, Receive, Scope, Send

from benchmarks import apps, inprocess, report
from benchmarks.inprocess import Contender
from benchmarks.stores import drop, seed
from keyguard import MemoryStore
from keyguard.usage import UsageRecorder

ID = b"x-ibm-client-id"
CALLS = 200_000
ROUNDS = 15


class _Noop:
    def admitted(self, api: str, client_id: str) -> None:
        pass


def _loop(target: UsageRecorder | _Noop, ids: list[str]) -> float:
    """ns per call of ``target.admitted`` over ``CALLS`` calls cycling through ``ids``."""
    admitted = target.admitted
    n = len(ids)
    start = time.perf_counter_ns()
    for i in range(CALLS):
        admitted("bench", ids[i % n])
    return (time.perf_counter_ns() - start) / CALLS


async def counter_ns() -> tuple[float, float]:
    """(ns per counted request, ns per no-op call): medians over interleaved rounds."""
    recorder = UsageRecorder(MemoryStore(), interval=3600)
    noop = _Noop()
    ids = [f"client-{n:02d}-" + "x" * 22 for n in range(10)]
    counted: list[float] = []
    empty: list[float] = []
    for _ in range(ROUNDS):
        gc.collect()
        counted.append(_loop(recorder, ids))
        empty.append(_loop(noop, ids))
    await recorder.aclose()
    return statistics.median(counted), statistics.median(empty)


async def inprocess_rows(rounds: int, batch: int) -> list[list[str]]:
    with tempfile.TemporaryDirectory() as tmp:
        memory = await seed("memory", Path(tmp), cache=False)
        headers = [(ID, memory.external)]
        on = apps.keyguard(memory.store)
        off = apps.keyguard(memory.store, usage_flush=None)
        contenders = [
            Contender("bare Starlette app", apps.bare(), []),
            Contender("keyguard memory, id only, usage off", off, headers),
            Contender("keyguard memory, id only, usage on (default)", on, headers),
        ]
        try:
            await inprocess.run(contenders, rounds=rounds, batch=batch)
        finally:
            await drop(memory)
    bare, without, with_usage = contenders
    hook = statistics.median(w - o for w, o in zip(with_usage.rounds, without.rounds, strict=True))
    return [
        [c.name, report.num(statistics.median(c.rounds)), report.num(inprocess.added(c, bare))]
        for c in (without, with_usage)
    ] + [["usage on - usage off (the hook's cost)", "—", report.num(hook)]]


async def guard_only_ns(rounds: int = 40, batch: int = 5000) -> tuple[float, float]:
    """KeyGuard in front of an ASGI app that does nothing, usage on against off, in
    alternating order: (median of the paired per-round differences, difference of the
    fastest rounds), ns per request. Without Starlette's routing and response around it
    the hook's cost is not lost in their noise."""
    from keyguard import KeyGuard

    async def nothing(scope: Scope, receive: Receive, send: Send) -> None:
        pass

    async def sink(message: Message) -> None:
        pass

    with tempfile.TemporaryDirectory() as tmp:
        memory = await seed("memory", Path(tmp), cache=False)
        template = inprocess.scope_for([(ID, memory.external)])
        off = KeyGuard(nothing, store=memory.store, api="bench", usage_flush=None)
        on = KeyGuard(nothing, store=memory.store, api="bench")

        async def timed(app: KeyGuard) -> float:
            start = time.perf_counter_ns()
            for _ in range(batch):
                scope = dict(template)
                scope["state"] = {}
                await app(scope, inprocess._receive, sink)
            return (time.perf_counter_ns() - start) / batch

        times: dict[bool, list[float]] = {True: [], False: []}
        try:
            for n in range(rounds):
                for usage_on in (True, False) if n % 2 else (False, True):
                    times[usage_on].append(await timed(on if usage_on else off))
        finally:
            await on.aclose()
            await drop(memory)
    paired = statistics.median(a - b for a, b in zip(times[True], times[False], strict=True))
    return paired, min(times[True]) - min(times[False])


async def main() -> None:
    counted, empty = await counter_ns()
    print("## What counting usage costs\n")
    print(
        report.table(
            ["counter alone (tight loop, 10 keys)", "ns per call"],
            [
                ["UsageRecorder.admitted", report.num(counted, 0)],
                ["a no-op method (loop and call overhead)", report.num(empty, 0)],
                ["the count itself (difference)", report.num(counted - empty, 0)],
            ],
        )
    )
    print()
    paired, fastest = await guard_only_ns()
    print(
        report.table(
            ["KeyGuard before a no-op app, usage on - off", "ns per request"],
            [
                ["median of paired rounds", report.num(paired, 0)],
                ["fastest round on - fastest round off", report.num(fastest, 0)],
            ],
        )
    )
    print()
    rows = await inprocess_rows(rounds=ROUNDS, batch=3000)
    print(report.table(["in process", "µs / request", "added µs over bare"], rows))


if __name__ == "__main__":
    asyncio.run(main())
