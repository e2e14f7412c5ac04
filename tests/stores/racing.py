"""Four fresh interpreters racing for the last key places of one API on a Redis store.

Shared by the standalone and the Cluster store's tests: the racer opens its store by
URL scheme, so one script serves both.
"""

from __future__ import annotations

import sys
import textwrap
from contextlib import AsyncExitStack
from pathlib import Path

import anyio
import anyio.abc
from anyio.streams.buffered import BufferedByteReceiveStream

RACERS = 4

RACER = textwrap.dedent(
    """
    import sys

    import anyio

    from keyguard.errors import KeyLimitReached
    from keyguard.models import KeyKind, KeyRecord, utcnow
    from keyguard.secrets import new_client_id

    url, prefix, worker = sys.argv[1:]
    if url.startswith(("redis+cluster://", "rediss+cluster://")):
        from keyguard.stores.redis_cluster import RedisClusterStore as Store
    else:
        from keyguard.stores.redis import RedisStore as Store

    async def main():
        store = Store.from_url(url, prefix=prefix)
        accepted = []
        try:
            await store.lookup("race", None)  # connected before the start signal
            print("ready", flush=True)
            assert sys.stdin.readline() == "go\\n"

            async def create(i, kind):
                record = KeyRecord(
                    api="race", client_id=new_client_id(), name=f"{worker}-{kind.value}-{i}",
                    kind=kind, secret_hash=None, created_at=utcnow(),
                )
                try:
                    await store.insert_key(record)
                except KeyLimitReached:
                    return
                accepted.append(kind.value)

            async with anyio.create_task_group() as tg:
                for i in range(8):
                    for kind in KeyKind:
                        tg.start_soon(create, i, kind)
        finally:
            await store.aclose()
        print(" ".join(accepted), flush=True)

    anyio.run(main)
    """
)


async def race_for_keys(url: str, prefix: str, folder: Path) -> list[str]:
    """Start the racers on the store at ``url`` (``prefix``), let them go at once when all
    are connected, and return the kinds of the keys they were granted, sorted."""
    script = folder / "racer.py"
    script.write_text(RACER)
    async with AsyncExitStack() as stack:
        processes = []
        for worker in range(RACERS):
            process = await anyio.open_process(
                [sys.executable, str(script), url, prefix, str(worker)], stderr=None
            )
            stack.push_async_callback(reap, process)
            processes.append(process)
        with anyio.fail_after(60):
            outputs = [BufferedByteReceiveStream(p.stdout) for p in processes if p.stdout]
            for output in outputs:  # every racer is connected and waiting...
                assert await output.receive_until(b"\n", 100) == b"ready"
            for process in processes:  # ...then all are told to go at once
                assert process.stdin is not None
                await process.stdin.send(b"go\n")
            results = [await output.receive_until(b"\n", 10_000) for output in outputs]
            assert [await process.wait() for process in processes] == [0] * RACERS
    return sorted(b" ".join(results).decode().split())


async def reap(process: anyio.abc.Process) -> None:
    """Kill ``process`` if it still runs, and release its pipes."""
    if process.returncode is None:
        process.kill()
    with anyio.CancelScope(shield=True):
        await process.aclose()
