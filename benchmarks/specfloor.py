"""keyguard's added cost against the spec floor's: ``python -m benchmarks.specfloor``.

The in-process section's harness (the same one-route Starlette app, called as an ASGI
app with the same request), reduced to the contenders this comparison needs and timed
in this thread's CPU time (``time.thread_time_ns``; on a shared machine wall time also
counts whatever else ran meanwhile): the bare app, the *floor* (one header scan, one
dict get), the *spec floor* (:class:`benchmarks.apps.SpecFloor`: the request work SPEC
§4, §8 and §10 require of a cache hit, by hand) with and without a secret, and keyguard
on a memory store and through its cache (``CachedStore``, every request a hit), for an
internal key (id + secret) and an external one (id only). Rounds interleave the
contenders in a new random order; each figure is the median over rounds of (contender -
bare app), and the ratio compares keyguard's with the spec floor's for the same kind
of key (id-only rows with the spec floor's id-only row).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from benchmarks import apps, inprocess, report
from benchmarks.inprocess import Contender
from keyguard import KeyManager, KeyStore, MemoryStore
from keyguard.stores.cache import CachedStore

ID = b"x-ibm-client-id"
SECRET = b"x-ibm-client-secret"


async def _seeded(store: KeyStore) -> tuple[bytes, bytes, bytes]:
    """The API ``bench`` in ``store`` with an internal and an external key."""
    manager = KeyManager(store)
    await manager.expose("bench")
    internal = await manager.create_key("bench", name="internal", kind="internal")
    external = await manager.create_key("bench", name="external", kind="external")
    assert internal.secret is not None
    return internal.client_id.encode(), internal.secret.encode(), external.client_id.encode()


async def contenders() -> tuple[list[Contender], CachedStore]:
    """The contenders, in the report's order, and the cache to close after them."""
    memory = MemoryStore()
    internal, secret, external = await _seeded(memory)
    cached = CachedStore(MemoryStore(), ttl=3600)  # every timed request a hit
    c_internal, c_secret, c_external = await _seeded(cached)
    creds = {internal: secret, external: None}
    with_secret = [(ID, internal), (SECRET, secret)]
    id_only = [(ID, external)]
    return [
        Contender("bare Starlette app", apps.bare(), []),
        Contender("floor: one header scan, one dict get", apps.floor(creds), with_secret),
        Contender("spec floor, id + secret", apps.spec_floor(creds), with_secret),
        Contender("spec floor, id only", apps.spec_floor(creds), id_only),
        Contender("keyguard memory, id + secret", apps.keyguard(memory), with_secret),
        Contender("keyguard memory, id only", apps.keyguard(memory), id_only),
        Contender(
            "keyguard cache hit, id + secret",
            apps.keyguard(cached),
            [(ID, c_internal), (SECRET, c_secret)],
        ),
        Contender("keyguard cache hit, id only", apps.keyguard(cached), [(ID, c_external)]),
    ], cached


async def measure(*, rounds: int, batch: int) -> list[str]:
    """One run; the report's lines."""
    timed, cached = await contenders()
    try:
        await inprocess.run(timed, rounds=rounds, batch=batch, clock=time.thread_time_ns)
    finally:
        await cached.aclose()
    bare = timed[0]
    spec = {
        False: inprocess.added(timed[2], bare),
        True: inprocess.added(timed[3], bare),
    }
    rows = []
    for c in timed[1:]:
        extra = inprocess.added(c, bare)
        rows.append(
            [
                c.name,
                report.num(extra),
                report.num(extra / spec["id only" in c.name]) + "x",
            ]
        )
    return [
        f"Machine: {report.machine()}\n",
        f"{rounds} rounds of {batch:,} requests, thread CPU time; bare app "
        f"{report.num(sum(bare.rounds) / len(bare.rounds))} µs per request.\n",
        report.table(["contender", "added µs", "added ÷ spec floor's added"], rows),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=41)
    parser.add_argument("--batch", type=int, default=2000, help="requests per round")
    parser.add_argument("--runs", type=int, default=1, help="runs, one after another")
    args = parser.parse_args()
    for run in range(args.runs):
        print(f"## keyguard against the spec floor, run {run + 1}\n")
        print("\n".join(asyncio.run(measure(rounds=args.rounds, batch=args.batch))) + "\n")


if __name__ == "__main__":
    main()
