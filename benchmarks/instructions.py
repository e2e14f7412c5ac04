"""Instructions per request, counted: ``python -m benchmarks.instructions``.

Timings on a shared 2-core machine move with whatever else runs: the same run of
``benchmarks.specfloor`` has given keyguard 1.1x and 1.7x the spec floor's added cost
an hour apart, and the cost of a rate limit 1.6 µs one day and 3.7 µs another. The
number of machine instructions a request executes does not move: this module runs each
contender's requests under ``valgrind --tool=callgrind`` (it counts instructions, it
does not time them), once with a few requests and once with many more, and divides the
difference of the two totals by the difference of the requests, so that start-up and
set-up cancel out. The same binary, inputs and environment give the same count to
within a few instructions whatever the machine is doing.

Instructions are not time (a cache miss costs more than an add), but for the same
interpreter running the same kind of work they are close to proportional, which is
what a ratio between two Python request paths needs.

Contenders, each in a fresh process: those of ``benchmarks.specfloor`` (the bare
Starlette app, the spec floor with and without a secret, keyguard on a memory store
and on a cache hit, for an internal and an external key), and those of
``benchmarks.ratelimits``' memory section (the key without limits, the same key with
one ``memory://`` limit, and with a RateLimiter counting nothing). Runs two at a time.
Without valgrind it says so and stops. ``--only NAME[,NAME]`` counts those contenders
alone (a line each, no table): what a change saved, in a minute or two.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks import inprocess, report, specfloor
from benchmarks.ratelimits import ONE, HeadersOnly, minimal_app
from benchmarks.specfloor import ID
from keyguard import KeyGuard, KeyManager, MemoryStore

WARM_UP = 300  # requests before counting starts, in both runs (caches, specialization)
FEW, MANY = 500, 3000

# name -> (group, what it is)
CONTENDERS: dict[str, tuple[str, str]] = {
    "bare": ("spec floor", "bare Starlette app"),
    "spec-secret": ("spec floor", "spec floor, id + secret"),
    "spec-id": ("spec floor", "spec floor, id only"),
    "memory-secret": ("spec floor", "keyguard memory, id + secret"),
    "memory-id": ("spec floor", "keyguard memory, id only"),
    "cache-secret": ("spec floor", "keyguard cache hit, id + secret"),
    "cache-id": ("spec floor", "keyguard cache hit, id only"),
    "rl-free": ("rate limits", "key without limits"),
    "rl-headers": ("rate limits", "1 limit, a RateLimiter counting nothing (call and headers)"),
    "rl-memory": ("rate limits", "1 limit, memory:// counters"),
}


async def _contender(name: str) -> tuple[Any, list[tuple[bytes, bytes]], Callable[[], Any]]:
    """The ASGI app, request headers and a closing coroutine function of ``name``."""
    if name.startswith("rl-"):
        store = MemoryStore()
        manager = KeyManager(store)
        await manager.expose("bench")
        free = await manager.create_key("bench", name="free", kind="external")
        one = await manager.create_key("bench", name="one", kind="external", rate_limits=ONE)
        limiter = HeadersOnly() if name == "rl-headers" else "memory://"
        guard = KeyGuard(minimal_app(), store=store, api="bench", rate_limiter=limiter)
        key = free if name == "rl-free" else one
        return guard, [(ID, key.client_id.encode())], guard.aclose
    found, cached = await specfloor.contenders()
    wanted = {c.name: c for c in found}[CONTENDERS[name][1]]
    return wanted.app, wanted.headers, cached.aclose


async def _serve(name: str, requests: int) -> None:
    """The child: ``WARM_UP + requests`` requests of contender ``name``, all 200."""
    app, headers, close = await _contender(name)
    template = inprocess.scope_for(headers)

    async def send(message: Any) -> None:
        if message["type"] == "http.response.start" and message["status"] != 200:
            raise SystemExit(f"{name} answered {message['status']}")

    for _ in range(WARM_UP + requests):
        scope = dict(template)
        scope["state"] = {}
        await app(scope, inprocess._receive, send)
    await close()


_COLLECTED = re.compile(rb"Collected : (\d+)")


def _total(name: str, requests: int) -> int:
    """Instructions executed by a child process serving ``requests`` (after warm-up)."""
    done = subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "benchmarks.instructions",
            "--child",
            name,
            str(requests),
        ],
        capture_output=True,
        check=False,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    found = _COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{name}: valgrind run failed: {done.stderr[-2000:].decode()}")
    return int(found.group(1))


def count(name: str) -> float:
    """Instructions per request of contender ``name``."""
    return (_total(name, MANY) - _total(name, FEW)) / (MANY - FEW)


def measure(names: list[str]) -> dict[str, float]:
    """Instructions per request of each contender, two processes at a time."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(names, pool.map(count, names), strict=True))


def lines(counts: dict[str, float]) -> list[str]:
    """The report's lines for ``counts`` (every contender of ``CONTENDERS``)."""
    out = [
        f"Machine: {report.machine()}\n",
        f"Instructions per request, counted by callgrind over {MANY - FEW:,} requests "
        f"(the difference of a run of {MANY:,} and one of {FEW:,}, after {WARM_UP} "
        "warm-up requests each).\n",
        "### keyguard against the spec floor\n",
    ]
    bare = counts["bare"]
    floor = {False: counts["spec-secret"] - bare, True: counts["spec-id"] - bare}
    rows = []
    for name in [n for n, (group, _) in CONTENDERS.items() if group == "spec floor"][1:]:
        added = counts[name] - bare
        rows.append(
            [
                CONTENDERS[name][1],
                f"{counts[name]:,.0f}",
                f"{added:,.0f}",
                report.num(added / floor[name.endswith("-id")]) + "x",
            ]
        )
    out.append(f"Bare Starlette app: {bare:,.0f} instructions per request.\n")
    out.append(
        report.table(
            ["contender", "instructions", "added over the bare app", "added ÷ spec floor's"],
            rows,
        )
    )
    free = counts["rl-free"]
    out.append("\n### What a rate limit adds (memory://)\n")
    out.append(
        report.table(
            ["contender", "instructions", "added over the key without limits", "÷ that key"],
            [
                [
                    CONTENDERS[name][1],
                    f"{counts[name]:,.0f}",
                    "—" if name == "rl-free" else f"{counts[name] - free:,.0f}",
                    report.num(counts[name] / free) + "x",
                ]
                for name in ("rl-free", "rl-headers", "rl-memory")
            ],
        )
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--child", nargs=2, metavar=("NAME", "REQUESTS"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--only",
        metavar="NAME[,NAME]",
        help=f"count these contenders only, one line each ({', '.join(CONTENDERS)})",
    )
    args = parser.parse_args()
    if args.child:
        asyncio.run(_serve(args.child[0], int(args.child[1])))
        return
    if shutil.which("valgrind") is None:
        print("valgrind is not installed: apt-get install valgrind (nothing counted)")
        return
    if args.only:
        names = args.only.split(",")
        unknown = [name for name in names if name not in CONTENDERS]
        if unknown:
            parser.error(f"unknown contenders: {', '.join(unknown)}")
        for name, counted in measure(names).items():
            print(f"{name}: {counted:,.0f} instructions per request")
        return
    print("## Instructions per request (callgrind)\n")
    print("\n".join(lines(measure(list(CONTENDERS)))))


if __name__ == "__main__":
    main()
