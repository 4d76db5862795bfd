"""Process plumbing for the throwaway servers: free ports, launching a child that dies with
us, reading its log, and watching processes through /proc (Linux; degraded elsewhere)."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .errors import EmbeddedServerError

_PR_SET_PDEATHSIG = 1


def free_port(host: str) -> int:
    # The port is free now; another process can still take it before the server binds,
    # which the start loops detect and retry.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def tcp_accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.25):
            return True
    except OSError:
        return False


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def read_since(path: Path, offset: int, limit: int = 4000) -> str:
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


def spawn(
    args: Sequence[str],
    logfile: Path,
    deathsig: signal.Signals,
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    owner: tuple[int, int] | None = None,
) -> subprocess.Popen[bytes]:
    """Launch a server with its output appended to ``logfile``, receiving ``deathsig`` when
    this process dies, and running as ``owner`` (uid, gid) when given."""
    uid, gid = owner if owner is not None else (None, None)
    with logfile.open("ab") as out:
        # Own session: a terminal Ctrl-C reaches only Python, which stops the server
        # in its finally/atexit instead of racing it, and its cleanup runs in order.
        return subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            env=env,
            start_new_session=True,
            preexec_fn=_pdeathsig_preexec(deathsig),
            # group= and extra_groups= too: user= alone keeps gid 0 and root's groups.
            user=uid,
            group=gid,
            extra_groups=None if owner is None else [],
        )


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


def children(pid: int) -> list[int]:
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


def wait_gone(pids: Sequence[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            left = [pid for pid in pids if _alive(pid)]
            raise EmbeddedServerError(f"processes {left} still alive after {timeout}s")
        time.sleep(0.01)


def wait_stopped(pid: int, timeout: float = 1.0) -> None:
    """Wait until ``pid`` is in the stopped state, so a pause is in force on return."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = _proc_stat(pid)
        if info is None:
            return  # no /proc (not Linux) or the process is gone: nothing to wait for
        if info[0] in (b"T", b"t"):
            return
        time.sleep(0.002)
