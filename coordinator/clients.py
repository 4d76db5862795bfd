"""How the library builds its own redis-py clients (``ReseedCoordinator.from_urls``)."""

from __future__ import annotations

from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .errors import ConfigurationError


def redis_client(url: str, *, timeout: float, max_connections: int = 100) -> Redis:
    """A client that fails fast and never resends a command on its own.

    * No retries: a resent increment whose first reply was lost would count twice, and a
      dead lock master would cost seconds of backoff per acquire. The counter store retries
      its idempotent reads itself (``CounterStore._call``).
    * Short connect and read timeouts: a dead or paused server costs one timeout.
    * A blocking pool: past ``max_connections`` commands in flight, a command waits (up to
      ``timeout``) for a connection instead of failing at once, as redis-py's default pool
      does; a proxy pod under a burst must not turn it into errors.
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
        pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout, **options
        )
    except ValueError as exc:  # redis-py's verdict on the URL
        raise ConfigurationError(f"invalid Redis URL {url!r}: {exc}") from exc
    return Redis.from_pool(pool)
