"""How the test suite opens a Redis Cluster store: a real local cluster the tests start.

``LocalCluster`` runs ``redis-server --cluster-enabled yes`` nodes on free ports
in a temporary folder, joins them with ``redis-cli --cluster create`` and waits
for ``cluster_state:ok`` on every node. The suite shares one cluster of three
masters (``shared_cluster()``): started the first time a test asks for it, once
per test process (each pytest-xdist worker has its own), and stopped when that
process ends. Each store writes under its own random prefix, like the Redis
backend's, and its keys are deleted afterwards.
Tests that kill nodes start a private ``LocalCluster`` of their own.

Needs only ``redis-server`` and ``redis-cli`` (7.0 or later); without them the
cluster tests are skipped, or failed under ``CI=true``.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis
from redis.exceptions import RedisError

from keyguard.stores.redis_cluster import RedisClusterStore
from tests.backends.redis import unique_prefix
from tests.backends.servers import in_ci

HOST = "127.0.0.1"


def cluster_binaries() -> tuple[str, str]:
    """``redis-server`` and ``redis-cli``; skipped (failed in CI) if either is missing."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if server is None or cli is None:
        message = "SKIPPED STORE: Redis Cluster needs redis-server and redis-cli on PATH"
        if in_ci():
            pytest.fail(f"CI=true and {message}")
        pytest.skip(message)
    return server, cli


def _free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports nothing listens on right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((HOST, 0))
        return [int(sock.getsockname()[1]) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class LocalCluster:
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each, in ``folder``.

    ``node_timeout`` (ms) is how long a silent node takes to be declared failed: a
    replica of a killed master takes over roughly that long after the kill.
    """

    def __init__(
        self, folder: Path, *, masters: int = 3, replicas: int = 0, node_timeout: int = 5000
    ) -> None:
        self.server, self.cli = cluster_binaries()
        self.folder = folder
        self.masters = masters
        self.replicas = replicas
        self.node_timeout = node_timeout
        count = masters * (1 + replicas)
        ports = _free_ports(2 * count)
        self.ports, self._bus_ports = ports[:count], ports[count:]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """``redis+cluster://`` naming every node."""
        return "redis+cluster://" + ",".join(f"{HOST}:{port}" for port in self.ports)

    def start(self) -> None:
        """Start every node, create the cluster and wait until every node says it is ok."""
        for port, bus in zip(self.ports, self._bus_ports, strict=True):
            folder = self.folder / str(port)
            folder.mkdir(parents=True, exist_ok=True)
            command = [
                self.server,
                "--port", str(port),
                "--bind", HOST,
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{port}.conf",
                "--cluster-port", str(bus),
                "--cluster-node-timeout", str(self.node_timeout),
                "--dir", str(folder),
                "--save", "",
                "--appendonly", "no",
                "--logfile", str(folder / "redis.log"),
            ]  # fmt: skip
            self.processes[port] = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
            )
        try:
            for port in self.ports:
                self._wait(partial(self._answers, port), f"node {port} to answer")
            create = [
                self.cli, "--cluster", "create",
                *(f"{HOST}:{port}" for port in self.ports),
                "--cluster-replicas", str(self.replicas),
                "--cluster-yes",
            ]  # fmt: skip
            subprocess.run(
                create,
                check=True,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                timeout=60,
            )
            self._wait(self._settled, "the cluster to settle")
        except BaseException:
            self.stop()
            raise

    def _answers(self, port: int) -> bool:
        return bool(self.node(port).ping())

    def _settled(self) -> bool:
        """Every node says ``cluster_state:ok``, knows every node, and every replica is
        in sync with its master."""
        for port in self.ports:
            node = self.node(port)
            info = node.cluster("INFO")
            if info.get("cluster_state") != "ok" or int(info["cluster_known_nodes"]) != len(
                self.ports
            ):
                return False
            replication = node.info("replication")
            if replication["role"] == "slave" and replication["master_link_status"] != "up":
                return False
        return True

    def _wait(self, check: Callable[[], Any], what: str, deadline: float = 60) -> None:
        """Poll ``check`` until it is true; a node not ready yet may refuse or answer errors."""
        end = time.monotonic() + deadline
        while True:
            with contextlib.suppress(OSError, RedisError):
                if check():
                    return
            if time.monotonic() > end:
                raise RuntimeError(f"timed out waiting for {what} (logs in {self.folder})")
            time.sleep(0.05)

    def node(self, port: int) -> SyncRedis:
        """A plain (non-cluster) client of one node, for admin commands in tests."""
        return SyncRedis(host=HOST, port=port, decode_responses=True, socket_timeout=5)

    def master_of(self, key: str) -> int:
        """The port of the master serving ``key``'s slot now."""
        for port in self.ports:
            if port not in self.processes or self.processes[port].poll() is not None:
                continue
            try:
                slot = self.node(port).cluster("KEYSLOT", key)
                shards = self.node(port).cluster("SLOTS")
            except (OSError, RedisError):
                continue
            for start, end, master, *_ in shards:
                if start <= int(slot) <= end:
                    return int(master[1])
        raise RuntimeError(f"no live node knows who serves {key!r}")

    def wait_replicated(self, master: int) -> None:
        """Until every replica of ``master`` has every write it acknowledged."""

        def synced() -> bool:
            info = self.node(master).info("replication")
            offset = int(info["master_repl_offset"])
            replicas = [info[f"slave{i}"] for i in range(int(info["connected_slaves"]))]
            return bool(replicas) and all(int(r["offset"]) >= offset for r in replicas)

        self._wait(synced, f"the replicas of {master} to catch up")

    def kill(self, port: int) -> None:
        """Kill one node (SIGKILL: a crash, not a shutdown)."""
        process = self.processes[port]
        process.kill()
        process.wait(10)

    def stop(self) -> None:
        """Kill every node that still runs."""
        for process in self.processes.values():
            if process.poll() is None:
                process.kill()
                process.wait(10)


_shared: LocalCluster | None = None
_shared_lock = threading.Lock()


def shared_cluster() -> LocalCluster:
    """This process's cluster of three masters, started by the first test that needs it
    (about two seconds) and stopped when the process ends (each pytest-xdist worker has
    one of its own)."""
    global _shared
    cluster_binaries()  # skip (fail in CI) before anything else
    with _shared_lock:
        if _shared is None:
            folder = Path(tempfile.mkdtemp(prefix="keyguard-cluster-"))
            cluster = LocalCluster(folder)
            cluster.start()

            def stop() -> None:
                cluster.stop()
                shutil.rmtree(folder, ignore_errors=True)

            atexit.register(stop)
            _shared = cluster
        return _shared


async def delete_prefixed_in_cluster(cluster: LocalCluster, prefix: str) -> None:
    """Delete every key under ``prefix`` on every node of ``cluster`` (test cleanup only).

    Node by node with plain clients: each key is deleted where SCAN found it, and a
    plain client costs no cluster discovery (a cluster client's start reads the
    server's whole command table)."""
    for port in cluster.ports:
        if cluster.processes[port].poll() is not None:
            continue
        async with Redis(host=HOST, port=port) as node:
            if (await node.info("replication"))["role"] != "master":
                continue
            doomed = [key async for key in node.scan_iter(match=f"{prefix}*", count=1000)]
            for key in doomed:
                await node.delete(key)


@asynccontextmanager
async def open_cluster_test_store(
    backend: str, tmp_path: Path, **options: Any
) -> AsyncIterator[RedisClusterStore]:
    """An empty ``RedisClusterStore`` on the session's cluster under a unique prefix, cleaned
    up afterwards. ``options`` go to ``RedisClusterStore.from_url``."""
    assert backend == "cluster"
    cluster = shared_cluster()
    prefix = unique_prefix()
    store = RedisClusterStore.from_url(cluster.url, prefix=prefix, **options)
    try:
        yield store
    finally:
        await store.aclose()
        await delete_prefixed_in_cluster(cluster, prefix)
