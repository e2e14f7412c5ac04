"""Run keyguard's benchmarks: ``python -m benchmarks`` (or ``scripts/bench``).

Sections (all by default): ``inprocess`` (per-request cost, every contender
and store, interleaved), ``scale`` (10 / 10,000 / 1,000,000 keys), ``server``
(uvicorn under wrk), ``workers`` (uvicorn, one worker against two), ``slow``
(bcrypt off the event loop), ``raw`` (an uncached store read next to the raw
driver's query, ``benchmarks/raw.py``). The report is
printed and written to ``benchmarks/results/latest.md``, which
docs/benchmarks.md quotes.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import sys
import tempfile
from pathlib import Path

from benchmarks import apps, inprocess, raw, report, scale, server, slow, stores, workers
from benchmarks.inprocess import Contender
from benchmarks.stores import BACKENDS, SERVER_URLS, Seeded, drop, drop_prefix, reachable, seed
from keyguard import KeyManager
from keyguard.ratelimit import RateLimiter

ID = b"x-ibm-client-id"
SECRET = b"x-ibm-client-secret"
RESULTS = Path(__file__).parent / "results" / "latest.md"


def internal_headers(s: Seeded) -> list[tuple[bytes, bytes]]:
    return [(ID, s.internal[0]), (SECRET, s.internal[1])]


def external_headers(s: Seeded) -> list[tuple[bytes, bytes]]:
    return [(ID, s.external)]


async def section_inprocess(
    backends: list[str], workdir: Path, rounds: int, batch: int, out: list[str]
) -> dict[str, float]:
    seeded: list[Seeded] = []
    memory = await seed("memory", workdir, cache=False)
    seeded.append(memory)
    creds = {memory.internal[0]: memory.internal[1], memory.external: None}
    contenders = [
        Contender("bare Starlette app", apps.bare(), []),
        Contender(
            "floor: hand-written ASGI dict check", apps.floor(creds), internal_headers(memory)
        ),
        Contender(
            "spec floor: hand-written ASGI check doing SPEC §4's work",
            apps.spec_floor(creds),
            internal_headers(memory),
        ),
        Contender("spec floor, id only", apps.spec_floor(creds), external_headers(memory)),
        Contender(
            "Starlette AuthenticationMiddleware (dict)",
            apps.starlette_auth(creds),
            internal_headers(memory),
        ),
        Contender("BaseHTTPMiddleware dict check", apps.base_http(creds), internal_headers(memory)),
    ]
    peer = apps.fastapi_key_auth("bench-key-0123456789")
    if peer is not None:
        contenders.append(
            Contender(
                "fastapi-key-auth (PyPI peer)", peer, [(b"x-api-key", b"bench-key-0123456789")]
            )
        )
    contenders += [
        Contender(
            "keyguard memory, id + secret", apps.keyguard(memory.store), internal_headers(memory)
        ),
        Contender(
            "keyguard memory, id only", apps.keyguard(memory.store), external_headers(memory)
        ),
        # The same key with usage counting off: the difference is what counting costs
        # (SPEC §10; the counter alone is timed by ``python -m benchmarks.usage``).
        Contender(
            "keyguard memory, id only, usage counting off",
            apps.keyguard(memory.store, usage_flush=None),
            external_headers(memory),
        ),
    ]
    # The same external key with rate limits it never reaches: what counting costs
    # (``python -m benchmarks.ratelimits`` splits it finer, in CPU time).
    manager = KeyManager(memory.store)
    limited = await manager.create_key(
        "bench", name="limited", kind="external", rate_limits=["1000000/second"]
    )
    limited_headers = [(ID, limited.client_id.encode())]
    four = await manager.create_key(
        "bench",
        name="limited4",
        kind="external",
        rate_limits=["1000000/second", "10000000/minute", "100000000/hour", "1000000000/day"],
    )
    four_headers = [(ID, four.client_id.encode())]
    contenders.append(
        Contender(
            "keyguard memory, id only, rate-limited (memory:// counters)",
            apps.keyguard(memory.store),
            limited_headers,
        )
    )
    contenders.append(
        Contender(
            "keyguard memory, id only, 4 rate limits (memory:// counters)",
            apps.keyguard(memory.store),
            four_headers,
        )
    )
    counters: tuple[str, str] | None = None  # (Redis URL, key prefix) to delete afterwards
    if "redis" in backends:
        redis_url = SERVER_URLS["redis"]
        counters = (redis_url, f"kgbench-rl:{secrets.token_hex(4)}")
        redis_counted = apps.keyguard(
            memory.store, rate_limiter=RateLimiter(redis_url, key_prefix=counters[1])
        )
        contenders.append(
            Contender(
                "keyguard memory, id only, rate-limited (Redis counters)",
                redis_counted,
                limited_headers,
            )
        )
        contenders.append(
            Contender(
                "keyguard memory, id only, 4 rate limits (Redis counters)",
                redis_counted,
                four_headers,
            )
        )
        contenders.append(
            Contender(
                "bare app + one raw redis-py round trip (PING)",
                apps.raw_redis_round_trip(redis_url),
                [],
            )
        )
        contenders.append(
            Contender(
                "bare app + one raw redis-py EVALSHA (the rate limiter's client options)",
                apps.raw_redis_script_round_trip(redis_url),
                [],
            )
        )
    for backend in backends:
        if backend == "memory":
            continue
        for cache in (True, False):
            # A TTL longer than the run: every request is a cache hit, which is what this
            # row measures (a refresh costs what the "no cache" row shows, once per TTL).
            s = await seed(backend, workdir, cache=cache, ttl=3600)
            seeded.append(s)
            label = f"keyguard {backend}, {'cache hit' if cache else 'no cache'}"
            contenders.append(
                Contender(f"{label}, id + secret", apps.keyguard(s.store), internal_headers(s))
            )
            contenders.append(
                Contender(f"{label}, id only", apps.keyguard(s.store), external_headers(s))
            )
    try:
        await inprocess.run(contenders, rounds=rounds, batch=batch)
    finally:
        for s in seeded:
            await drop(s)
        if counters is not None:
            await drop_prefix("redis", counters[0], counters[1] + ":")
    bare, floor = contenders[0], contenders[1]
    floor_added = inprocess.added(floor, bare)
    # keyguard's id + secret rows against the spec floor with a secret, id-only rows
    # against the spec floor without one.
    spec_added = inprocess.added(contenders[2], bare), inprocess.added(contenders[3], bare)
    bare_us = statistics.median(bare.rounds)
    rows = []
    added: dict[str, float] = {}
    for c in contenders:
        total = statistics.median(c.rounds)
        extra = inprocess.added(c, bare) if c is not bare else 0.0
        added[c.name] = extra
        rows.append(
            [
                c.name,
                report.num(total),
                "—" if c is bare else report.num(extra),
                "—" if c is bare else report.num(extra / floor_added, 1) + "x",
                "—" if c is bare else report.num(extra / spec_added["id only" in c.name], 2) + "x",
                report.num(total / bare_us) + "x",
            ]
        )
    out.append("## Per-request cost, in process\n")
    out.append(
        f"Each contender served {batch:,} requests per round, {rounds} rounds, in a new random "
        "order each round; figures are medians over rounds. *Added* is the median of "
        "(contender - bare app) per round: the check's own cost. The spec floor does the "
        "request work SPEC §4, §8 and §10 require of a cache hit, by hand "
        "(`benchmarks/apps.py`); id-only rows are compared with its id-only row.\n"
    )
    out.append(
        report.table(
            [
                "contender",
                "µs / request",
                "added µs",
                "added ÷ floor's added",
                "added ÷ spec floor's added",
                "÷ bare",
            ],
            rows,
        )
    )
    added["floor"] = floor_added
    added["spec floor"], added["spec floor, id only"] = spec_added
    return added


async def section_scale(
    backends: list[str], workdir: Path, sizes: list[int], rounds: int, batch: int, out: list[str]
) -> dict[str, dict[int, float]]:
    results = await scale.run(backends, workdir, sizes, rounds=rounds, batch=batch)
    out.append("\n## Per-request cost by number of keys in the store\n")
    out.append(
        "keyguard without its cache (every request reaches the store), internal key "
        "(id + secret), µs per request; the ratio compares the largest store with the smallest.\n"
    )
    header = ["store", *[f"{n:,} keys" for n in sizes], f"{sizes[-1]:,} ÷ {sizes[0]:,}"]
    rows = []
    for backend, by_size in results.items():
        row = [backend] + [report.num(by_size[n]) if n in by_size else "—" for n in sizes]
        ratio = by_size.get(sizes[-1], float("nan")) / by_size[sizes[0]]
        rows.append([*row, report.num(ratio) + "x"])
    out.append(report.table(header, rows))
    return results


def section_server(
    backends: list[str], workdir: Path, seconds: int, rounds: int, out: list[str]
) -> dict[str, float]:
    loads = asyncio.run(_server_runs(backends, workdir, seconds, rounds))
    bare = loads["bare"]
    out.append("\n## Through a real server\n")
    out.append(
        "uvicorn, one worker, `--no-access-log`, driven by wrk (1 thread, 32 connections, "
        f"{seconds} s) on loopback; {rounds} interleaved rounds per contender, medians.\n"
    )
    rows = []
    share: dict[str, float] = {}
    for name, runs in loads.items():
        rps = statistics.median(r.requests_per_second for r in runs)
        share[name] = rps / statistics.median(r.requests_per_second for r in bare)
        rows.append(
            [
                name,
                f"{rps:,.0f}",
                report.num(share[name] * 100, 1) + " %",
                report.num(statistics.median(r.p50_ms for r in runs)),
                report.num(statistics.median(r.p99_ms for r in runs)),
                str(sum(r.non_200 for r in runs)),
            ]
        )
    out.append(
        report.table(["server", "requests/s", "of bare", "p50 ms", "p99 ms", "non-200"], rows)
    )
    return share


async def _server_runs(
    backends: list[str], workdir: Path, seconds: int, rounds: int
) -> dict[str, list[server.Load]]:
    contenders: dict[str, tuple[dict[str, str], dict[str, str]]] = {
        "bare": ({"KGB_CONTENDER": "bare"}, {})
    }
    memory = await seed("memory", workdir, cache=False)
    contenders["keyguard memory"] = (
        {
            "KGB_CONTENDER": "keyguard",
            "KGB_STORE_URL": "memory://",
            "KGB_CLIENT_ID": memory.internal[0].decode(),
            "KGB_SECRET": memory.internal[1].decode(),
            "KGB_ID_TAG_KEY": await stores.tag_key_hex(memory.store),
        },
        {
            "X-IBM-Client-Id": memory.internal[0].decode(),
            "X-IBM-Client-Secret": memory.internal[1].decode(),
        },
    )
    seeded = [memory]
    for backend in backends:
        if backend == "memory":
            continue
        s = await seed(backend, workdir, cache=True)
        seeded.append(s)
        contenders[f"keyguard {backend}, cache"] = (
            {
                "KGB_CONTENDER": "keyguard",
                "KGB_STORE_URL": s.url,
                "KGB_PREFIX": s.prefix,
                "KGB_CACHE": "1",
            },
            {
                "X-IBM-Client-Id": s.internal[0].decode(),
                "X-IBM-Client-Secret": s.internal[1].decode(),
            },
        )
    loads: dict[str, list[server.Load]] = {name: [] for name in contenders}
    try:
        for _ in range(rounds):
            for name, (env, headers) in contenders.items():
                proc, port = server.start(env)
                try:
                    server.load(port, headers, 1, 32)  # warm up
                    loads[name].append(server.load(port, headers, seconds, 32))
                finally:
                    server.stop(proc)
    finally:
        for s in seeded:
            await drop(s)
    return loads


def section_slow(out: list[str]) -> slow.SlowResult:
    result = asyncio.run(slow.main())
    out.append("\n## A slow scheme (bcrypt) and the event loop\n")
    out.append(
        "Cheap requests (external key, id only) issued on a 1 ms timer and timed from when they "
        "were due, so time the event loop spends blocked shows; alone, then while four tasks "
        "keep sending wrong secrets for a bcrypt-hashed key (cost 10). keyguard verifies "
        "slow schemes in a worker thread; the last row turns that off to show what it prevents.\n"
    )
    rows: list[tuple[str, slow.Latencies]] = [
        ("alone", result.alone),
        ("during bcrypt work (keyguard: worker thread)", result.offloaded),
        ("during bcrypt work, offload=False (for contrast)", result.blocking),
    ]
    out.append(
        report.table(
            ["cheap requests", "p50 µs", "p99 µs", "bcrypt verifications meanwhile"],
            [
                [label, report.num(r.p50_us), report.num(r.p99_us), str(r.slow_verifications)]
                for label, r in rows
            ],
        )
    )
    out.append(
        "\nRepeat requests with a valid secret (added µs over the bare app): bcrypt "
        f"{report.num(result.repeat_bcrypt_added_us)}, default scheme "
        f"{report.num(result.repeat_default_added_us)} — a secret that verified once is not "
        "re-hashed.\n"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds, at most 10,000 keys")
    parser.add_argument(
        "--stores", default=",".join(BACKENDS), help="comma-separated (default: all)"
    )
    parser.add_argument("--sections", default="inprocess,scale,server,workers,slow,raw")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    wanted = [b for b in args.stores.split(",") if b]
    backends = [b for b in wanted if reachable(b)]
    skipped = sorted(set(wanted) - set(backends))
    sections = set(args.sections.split(","))
    rounds, batch = (5, 1000) if args.quick else (15, 3000)
    out = [f"# keyguard benchmark results\n\nMachine: {report.machine()}.\n"]
    if skipped:
        out.append(f"Stores skipped (server unreachable): {', '.join(skipped)}.\n")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        if "inprocess" in sections:
            asyncio.run(section_inprocess(backends, workdir, rounds, batch, out))
            print("\n".join(out), flush=True)
        if "scale" in sections:
            sizes = [10, 10_000] if args.quick else [10, 10_000, 1_000_000]
            asyncio.run(section_scale(backends, workdir, sizes, rounds, batch, out))
        if "server" in sections:
            section_server(backends, workdir, 3 if args.quick else 5, 2 if args.quick else 3, out)
        if "workers" in sections:
            seconds, n = (3, 2) if args.quick else (5, 3)
            asyncio.run(workers.section(backends, workdir, seconds, n, out))
        if "slow" in sections:
            section_slow(out)
        if "raw" in sections:
            raw_stores = [b for b in backends if b in raw.ALL]
            quick = ["--rounds", "5", "--batch", "200"] if args.quick else []
            if raw_stores:
                out.append(asyncio.run(raw.main(["--stores", ",".join(raw_stores), *quick])))
    text = "\n".join(out) + "\n"
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text, encoding="utf-8")
    print(text)
    print(f"written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
