"""A throwaway Redis Cluster: masters and their replicas, each a :class:`RedisServer` with
cluster mode on, joined without ``redis-cli`` (CLUSTER MEET, ADDSLOTS, REPLICATE).

Each node needs two ports, its own and its cluster bus (port + 10000), so both are chosen
free. ``kill()`` keeps a node's temp dir and so its ``nodes.conf``: a node started again
rejoins as itself (a killed master comes back as a replica of the one promoted in its place).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import Any

from redis import Redis
from redis.crc import key_slot
from redis.exceptions import RedisError

from .binaries import find_redis_server
from .errors import EmbeddedServerError
from .process import free_port, tcp_accepts
from .redis_server import RedisServer
from .server import LOCALHOST, Lifecycle

SLOTS = 16384
BUS_OFFSET = 10000
_FORM_TIMEOUT = 30.0
_POLL = 0.05


class EmbeddedCluster(Lifecycle):
    """``masters`` masters with ``replicas`` replicas each, slots split evenly.

    ``node_timeout`` (ms, ``cluster-node-timeout``) is how long a master may be unreachable
    before its replica takes over: a master paused for less is only slow. ``url`` names
    the cluster for :func:`coordinator.clients.cluster_client` (``redis+cluster://``).
    """

    def __init__(self, masters: int = 3, replicas: int = 1, *, node_timeout: int = 1500) -> None:
        if masters < 1 or replicas < 0:
            raise ValueError("a cluster needs at least one master and replicas >= 0")
        binary = find_redis_server()
        settings = [
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout),
            # A replica may always take over (the lab's replicas are never far behind),
            # and syncs at once instead of waiting 5 s for more replicas (Redis >= 7).
            "--cluster-replica-validity-factor", "0",
            "--repl-diskless-sync-delay", "0",
        ]  # fmt: skip
        self.nodes = [
            RedisServer(_cluster_port(), binary=binary, extra_args=settings)
            for _ in range(masters * (1 + replicas))
        ]
        self._masters = masters

    def __repr__(self) -> str:
        return f"EmbeddedCluster(nodes={[node.port for node in self.nodes]})"

    @property
    def url(self) -> str:
        hosts = ",".join(f"{node.host}:{node.port}" for node in self.nodes[: self._masters])
        return f"redis+cluster://{hosts}"

    def start(self) -> None:
        """Start every node, then form the cluster and wait until every node agrees it is
        ``ok`` and every replica is in sync."""
        try:
            for node in self.nodes:
                node._begin_start()
            for node in self.nodes:
                node._finish_start()
            self._form()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for node in self.nodes:
            with contextlib.suppress(OSError):
                node._request_stop()
        for node in self.nodes:
            node.close()

    stop = close

    def master_of(self, key: str) -> RedisServer:
        """The node serving ``key``'s slot now (asked of a running node)."""
        return self.node_at(self.slot_owner(key_slot(key.encode())))

    def replica_of(self, master: RedisServer) -> RedisServer:
        """A running replica of ``master``, in sync with it."""
        for node in self.nodes:
            if node.running and node is not master:
                info = self._ask(node, "INFO", "replication")  # parsed by redis-py
                if info.get("master_port") == master.port and _linked(info):
                    return node
        raise EmbeddedServerError(f"{master!r} has no running replica in sync")

    def node_id(self, node: RedisServer) -> str:
        return _text(self._ask(node, "CLUSTER", "MYID"))

    def node_at(self, address: tuple[str, int]) -> RedisServer:
        return next(node for node in self.nodes if (node.host, node.port) == address)

    def masters(self) -> list[RedisServer]:
        """The masters serving slots now, by a running node's slot map."""
        slots = self._ask(self._any_running(), "CLUSTER", "SLOTS")
        owners = dict.fromkeys((_text(master[0]), int(master[1])) for _, _, master, *_ in slots)
        return [self.node_at(owner) for owner in owners]

    def slot_owner(self, slot: int) -> tuple[str, int]:
        """The (host, port) of the master serving ``slot``, by a running node's slot map."""
        for start, end, master, *_ in self._ask(self._any_running(), "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return _text(master[0]), int(master[1])
        raise EmbeddedServerError(f"slot {slot} is not served")

    def migrate(self, key: str, hold: float = 0.0) -> RedisServer:
        """Move ``key``'s slot (every key in it: the counter and its companions) to another
        master, leaving it half-migrated (MIGRATING / IMPORTING) for ``hold`` seconds so
        that traffic meets ASK redirects; the new master."""
        slot = key_slot(key.encode())
        source = self.master_of(key)
        target = next(master for master in self.masters() if master is not source)
        source_id, target_id = self.node_id(source), self.node_id(target)
        self._ask(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        self._ask(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        keys = self._ask(source, "CLUSTER", "GETKEYSINSLOT", slot, 1000)
        if keys:
            self._ask(source, "MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *keys)
        time.sleep(hold)
        for node in (target, source):
            self._ask(node, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        return target

    def cut_replicas(self, master: RedisServer) -> None:
        """Close ``master``'s replication links: what it applies from now on reaches no
        replica until they reconnect."""
        self._ask(master, "CLIENT", "KILL", "TYPE", "replica")

    def wait_replaced(self, master: RedisServer, timeout: float = _FORM_TIMEOUT) -> RedisServer:
        """After ``master`` died: until a replica serves its slots and the cluster is ok;
        the promoted replica."""
        slot = next(
            start
            for start, end, node, *_ in self._ask(self._any_running(), "CLUSTER", "SLOTS")
            if int(node[1]) == master.port
        )
        _until(lambda: self.slot_owner(slot) != (master.host, master.port), timeout, "a failover")
        self.wait_ok(timeout)
        return self.node_at(self.slot_owner(slot))

    def wait_ok(self, timeout: float = _FORM_TIMEOUT) -> None:
        """Until every running node reports ``cluster_state:ok`` and the same slot owners,
        and every running replica is in sync with its master."""
        running = [node for node in self.nodes if node.running]

        def agreed() -> bool:
            maps = set()
            for node in running:
                info = _text(self._ask(node, "CLUSTER", "INFO"))
                if "cluster_state:ok" not in info:
                    return False
                replication = self._ask(node, "INFO", "replication")
                if replication.get("role") == "slave" and not _linked(replication):
                    return False
                slots = self._ask(node, "CLUSTER", "SLOTS")
                maps.add(tuple(sorted((s, e, _text(m[0]), int(m[1])) for s, e, m, *_ in slots)))
            return len(maps) == 1

        _until(agreed, timeout, "the cluster to agree it is ok")

    # ------------------------------------------------------------------ internals

    def _any_running(self) -> RedisServer:
        return next(node for node in self.nodes if node.running)

    def _form(self) -> None:
        first, *others = self.nodes
        for node in others:
            self._ask(first, "CLUSTER", "MEET", node.host, node.port)
        masters = self.nodes[: self._masters]
        share = -(-SLOTS // self._masters)
        for index, master in enumerate(masters):
            slots = range(index * share, min(SLOTS, (index + 1) * share))
            self._ask(master, "CLUSTER", "ADDSLOTS", *slots)
        everyone = len(self.nodes)

        def gossiped() -> bool:
            return all(
                len(_text(self._ask(n, "CLUSTER", "NODES")).splitlines()) == everyone
                for n in self.nodes
            )

        # REPLICATE needs the master known to the replica, which gossip spreads.
        _until(gossiped, _FORM_TIMEOUT, "every node to know every other")
        ids = [self.node_id(master) for master in masters]
        for index, replica in enumerate(self.nodes[self._masters :]):
            master_id = ids[index % self._masters]
            self._ask(replica, "CLUSTER", "REPLICATE", master_id)
        self.wait_ok()
        _until(self._replicas_synced, _FORM_TIMEOUT, "every replica to sync")

    def _replicas_synced(self) -> bool:
        for replica in self.nodes[self._masters :]:
            if not _linked(self._ask(replica, "INFO", "replication")):
                return False
        return True

    @staticmethod
    def _ask(node: RedisServer, *command: str | int) -> Any:
        client = Redis(host=node.host, port=node.port, socket_timeout=2.0)
        try:
            return client.execute_command(*command)  # type: ignore[no-untyped-call]
        except RedisError as exc:
            raise EmbeddedServerError(f"cluster node {node!r} refused: {exc}") from exc
        finally:
            client.close()


def _text(raw: object) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def _linked(replication: dict[str, Any]) -> bool:
    return replication.get("master_link_status") == "up"


def _cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port(LOCALHOST)
        if port + BUS_OFFSET < 65536 and not tcp_accepts(LOCALHOST, port + BUS_OFFSET):
            return port


def _until(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise EmbeddedServerError(f"timed out waiting for {what}")
        time.sleep(_POLL)
