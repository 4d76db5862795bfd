"""How the library builds its own redis-py clients (``ReseedCoordinator.from_urls``): one
Redis server, or a Redis Cluster."""

from __future__ import annotations

import re
from contextvars import ContextVar
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import BlockingConnectionPool, Connection, Redis, RedisCluster, SSLConnection
from redis.asyncio.cluster import ClusterNode
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .deadline import current_deadline
from .errors import ConfigurationError, ReseedTimeoutError

# A password given as a parameter: ``?password=`` in a URL, ``password=`` in a key=value DSN.
_PASSWORD_PARAM = re.compile(r"(password=)[^&\s]*", re.IGNORECASE)


def redact(address: str) -> str:
    """A redis URL or PostgreSQL DSN as messages may show it: its password replaced by ``***``
    (operators pass credentials in URLs; errors, logs and reports must not echo them)."""
    address = _PASSWORD_PARAM.sub(r"\1***", address)
    parts = urlsplit(address)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if not at or ":" not in userinfo:
        return address
    user = userinfo.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


class DeadlinePool(BlockingConnectionPool):
    """A blocking pool whose commands queue for a connection as long as the deadline of
    the coordinator call they serve allows (:data:`~coordinator.deadline.current_deadline`),
    or ``timeout`` outside of any call.

    A burst longer than a socket timeout is not a fault: a command that waits its turn is
    answered, and only a deadline that passes in the queue ends the wait, as the typed
    timeout the call would raise anyway. A dead server is still noticed by the socket
    timeouts of the commands in flight, which free their connections for the queue.
    """

    # redis-py reads ``self.timeout`` on every wait for a connection.
    @property
    def timeout(self) -> float | None:
        deadline = current_deadline.get()
        return self.idle_timeout if deadline is None else max(deadline.remaining(), 0.0)

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self.idle_timeout = value

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            try:
                return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
            except RedisTimeoutError:
                # A connect that timed out sent nothing, so it is safe to try once more. The
                # first connects of a burst start while the event loop is busiest: their
                # timeout may have measured our own loop's lag, not the server.
                return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except RedisConnectionError as exc:
            deadline = current_deadline.get()
            if deadline is None or deadline.remaining() > 0:
                raise
            raise ReseedTimeoutError(
                "the call's deadline passed while it waited for a connection"
            ) from exc


def redis_client(
    url: str,
    *,
    timeout: float,
    max_connections: int = 100,
    queue_timeout: float | None = None,
) -> Redis:
    """A client that fails fast on a dead server and never resends a command on its own.

    * No retries: a resent increment whose first reply was lost would count twice, and a
      dead lock master would cost seconds of backoff per acquire. The counter store retries
      its idempotent reads itself (``CounterStore._call``).
    * Short connect and read timeouts: a dead or paused server costs one timeout.
    * A :class:`DeadlinePool`: past ``max_connections`` commands in flight, a command
      queues for a connection until its call's deadline (``queue_timeout`` outside of a
      coordinator call; default ``timeout``), instead of failing at once as redis-py's
      default pool does: a proxy pod under a burst must not turn it into errors.
    * No RESP3 maintenance notifications (a managed-cluster feature): while they are on,
      redis-py's pool skips its check for connections closed by the server, so after a
      server restart the first command on every pooled connection fails.
    """
    options: dict[str, Any] = {
        "retry": Retry(NoBackoff(), 0),
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
    }
    try:
        from redis.maint_notifications import MaintNotificationsConfig
    except ImportError:  # redis-py before 7: no such notifications, nothing to turn off
        pass
    else:
        options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    try:
        pool = DeadlinePool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout if queue_timeout is None else queue_timeout,
            **options,
        )
    except ValueError as exc:  # redis-py's verdict on the URL
        raise ConfigurationError(f"invalid Redis URL {redact(url)!r}: {exc}") from exc
    return Redis.from_pool(pool)


# -- Redis Cluster -----------------------------------------------------------------------

#: URL schemes naming a Redis Cluster by its startup nodes:
#: ``redis+cluster://[user:password@]host:port[,host:port...]`` (``rediss+cluster`` for TLS).
CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}

# The task's pending ASK redirect: the node ("host:port") its next command must be preceded
# by ASKING on, on the same connection.
_asking_node: ContextVar[str | None] = ContextVar("reseed_asking_node", default=None)
_ASKING = ("ASKING",)


class _AskingOnSameConnection(Connection):
    """A cluster node connection that sends an ASK redirect's ``ASKING`` together with the
    redirected command.

    redis-py's async cluster client sends ``ASKING`` as a command of its own, from the
    node's pool, then the redirected command from the pool again: with two or more idle
    connections they land on different connections, the importing node answers MOVED (the
    ASKING flag is per connection), and the client bounces until "TTL exhausted" — so
    traffic from many tasks through a half-migrated slot fails. Here the ``ASKING`` is not
    sent but remembered for the calling task (a context variable: each task has its own),
    answered ``OK`` locally, and prepended to the task's next command if that goes to the
    same node, which is what redis-py does next; its ``+OK`` is read and dropped before the
    command's reply.
    """

    _fake_reply = False
    _asking_reply = False

    def pack_command(self, *args: Any) -> list[bytes]:
        packed = super().pack_command(*args)
        return _ASKING_PACKED if args == _ASKING else packed

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        self._fake_reply = self._asking_reply = False
        node = f"{self.host}:{self.port}"
        if command is _ASKING_PACKED:
            _asking_node.set(node)
            self._fake_reply = True
            return
        asking = _asking_node.get() == node
        if _asking_node.get() is not None:
            _asking_node.set(None)  # one command only, whatever node it goes to
        if asking:
            command = [*_ASKING_PACKED, *([command] if isinstance(command, bytes) else command)]
        await super().send_packed_command(command, check_health)
        # Only now: a fresh connection's handshake (HELLO, CLIENT SETINFO) runs inside the
        # call above and comes through here too.
        self._asking_reply = asking

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        if self._fake_reply:
            self._fake_reply = False
            return b"OK"
        if self._asking_reply:
            self._asking_reply = False
            await super().read_response()  # ASKING's +OK
        return await super().read_response(*args, **kwargs)


class _AskingOnSameSSLConnection(_AskingOnSameConnection, SSLConnection):
    pass


_ASKING_PACKED: list[bytes] = Connection(host="_").pack_command(*_ASKING)


def cluster_client(url: str, *, timeout: float, max_connections: int = 100) -> RedisCluster:
    """A Redis Cluster client that, like :func:`redis_client`, never resends a command.

    redis-py's cluster client resends a command after a connection error or timeout (once
    it has re-read the slot map): an increment whose reply was lost would count twice. Its
    ``retry`` is off here; MOVED and ASK are redirects (the command was refused, not run),
    which it still follows, re-reading the slot map on MOVED; after a connection error it
    re-reads the slot map before its next command. The counter store retries its
    idempotent reads itself. ``url``: ``redis+cluster://host:port[,host:port...]``, or a
    plain ``redis://host:port`` of one node.
    """
    try:
        node_url, nodes = parse_cluster_url(url)
        client = RedisCluster.from_url(
            node_url,
            startup_nodes=[ClusterNode(host, port) for host, port in nodes],
            retry=Retry(NoBackoff(), 0),
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            max_connections=max_connections,
        )
    except (ValueError, RedisError) as exc:
        raise ConfigurationError(f"bad Redis Cluster URL {redact(url)!r}: {exc}") from exc
    asking = (
        _AskingOnSameSSLConnection
        if client.connection_kwargs["connection_class"] is SSLConnection
        else _AskingOnSameConnection
    )
    # One dict, shared by the client and its NodesManager, builds every node it discovers.
    client.connection_kwargs["connection_class"] = asking
    for node in client.nodes_manager.startup_nodes.values():
        node.connection_class = asking
    return client


def parse_cluster_url(url: str) -> tuple[str, list[tuple[str, int]]]:
    """``redis+cluster://[user:password@]host:port[,host:port...][/0][?options]`` as a
    plain URL of its first node (credentials and options included, for redis-py's
    ``from_url``) and every startup node's (host, port). A plain URL names one node."""
    parts = urlsplit(url)
    scheme = CLUSTER_SCHEMES.get(parts.scheme, parts.scheme)
    userinfo, at, hosts = parts.netloc.rpartition("@")
    nodes = [urlsplit(f"{scheme}://{host}") for host in hosts.split(",")]
    first = parts._replace(scheme=scheme, netloc=f"{userinfo}{at}{nodes[0].netloc}")
    return first.geturl(), [(node.hostname or "", node.port or 6379) for node in nodes]


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
    return urlsplit(url).scheme in CLUSTER_SCHEMES
