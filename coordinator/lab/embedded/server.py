"""The lifecycle both throwaway servers share: one child process on 127.0.0.1 and a port
that stays fixed once clients know it, a temp dir removed on close (with an ``atexit``
backstop), and a start that moves to another port when a racing process took ours."""

from __future__ import annotations

import abc
import atexit
import logging
import shutil
import subprocess
import tempfile
import time
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import ClassVar, TypeVar

from .errors import EmbeddedServerError
from .process import free_port

_log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
STOP_TIMEOUT = 10.0
ADDR_IN_USE = "Address already in use"
# How many times a start is retried when the port turned out to be taken (another process
# grabbed it between our probe and the server's bind).
_PORT_ATTEMPTS = 5

_Started = TypeVar("_Started", bound="Lifecycle")


class Ready(Enum):
    OK = "ok"
    PORT_TAKEN = "port-taken"


class Lifecycle(abc.ABC):
    """``start()`` on entering the context, ``close()`` on leaving it."""

    @abc.abstractmethod
    def start(self) -> None: ...

    @abc.abstractmethod
    def close(self) -> None: ...

    def __enter__(self: _Started) -> _Started:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class ManagedServer(Lifecycle):
    """A server process of ours and its temp dir.

    Subclasses launch it (``_spawn``), ask it to stop (``_request_stop``), crash it
    (``_crash``) and tell whether it serves yet (``_probe``); starting, stopping, the temp
    dir and the context manager are common.
    """

    _dir_prefix: ClassVar[str]
    _start_timeout: ClassVar[float]
    _first_poll_delay: ClassVar[float]
    # After a port clash on a port clients know: how long to let it free up.
    _rebind_delay: ClassVar[float]
    # Log text meaning the server exited because its port was taken.
    _port_taken_markers: ClassVar[tuple[str, ...]] = (ADDR_IN_USE,)

    def __init__(self, port: int | None) -> None:
        self.host: str = LOCALHOST
        self.port: int = port if port is not None else free_port(self.host)
        self._port_fixed = port is not None
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self._start_began = 0.0
        self.last_start_seconds: float | None = None

    @property
    def pid(self) -> int | None:
        """The server's pid while running."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return None
        return proc.pid

    @property
    def running(self) -> bool:
        return self.pid is not None

    @property
    def directory(self) -> Path | None:
        """The temp dir (logs, and data if any); None before the first start and once
        closed."""
        return self._dir

    def start(self) -> None:
        """Start and wait until it serves (no-op if running)."""
        if self.running:
            return
        self._begin_start()
        self._finish_start()

    def kill(self) -> None:
        """Crash the server and wait for it; the temp dir stays for a later ``start()``."""
        proc = self._proc
        if proc is not None:
            self._crash(proc)
            self._proc = None

    def restart(self) -> None:
        """``kill()``, then start again on the same port."""
        self.kill()
        self._port_fixed = True
        self.start()

    def close(self) -> None:
        """Stop the server and remove its temp dir. Idempotent."""
        try:
            self._halt()
        finally:
            self._remove_dir()

    # ------------------------------------------------------------------ for subclasses

    @property
    @abc.abstractmethod
    def _program(self) -> str:
        """What error messages call the server."""

    @abc.abstractmethod
    def _spawn(self) -> None:
        """Launch the server process on ``self.port`` into ``self._proc``."""

    @abc.abstractmethod
    def _request_stop(self) -> None:
        """Send the shutdown signal without waiting."""

    @abc.abstractmethod
    def _crash(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL ``proc`` (and whatever must die with it) and wait until it is gone."""

    @abc.abstractmethod
    def _probe(self, proc: subprocess.Popen[bytes]) -> Ready | None:
        """Whether the running ``proc`` serves, lost its port, or (None) not yet."""

    @abc.abstractmethod
    def _log_tail(self) -> str:
        """What the server logged since the last launch."""

    def _begin_start(self) -> None:
        """Kick off what can run concurrently with other servers' startup."""
        self._spawn()

    def _finish_start(self) -> None:
        """Wait until the launched server serves, relaunching it after a port clash."""
        try:
            for attempt in range(_PORT_ATTEMPTS):
                if attempt:
                    if self._port_fixed:
                        # Clients know this port: wait for it to free up.
                        time.sleep(self._rebind_delay)
                    else:
                        self.port = free_port(self.host)
                    self._spawn()
                if self._await_ready() is Ready.OK:
                    self.last_start_seconds = time.monotonic() - self._start_began
                    self._port_fixed = True
                    _log.debug("%r ready in %.3fs", self, self.last_start_seconds)
                    return
            raise EmbeddedServerError(
                f"{self._program} could not bind {self.host}:{self.port} "
                f"after {_PORT_ATTEMPTS} attempts: {ADDR_IN_USE}"
            )
        except BaseException:
            self.kill()
            raise

    def _await_ready(self) -> Ready:
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + self._start_timeout
        delay = self._first_poll_delay
        while True:
            code = proc.poll()
            if code is not None:
                self._proc = None
                tail = self._log_tail()
                if any(marker in tail for marker in self._port_taken_markers):
                    return Ready.PORT_TAKEN
                raise EmbeddedServerError(
                    f"{self._program} exited with code {code} on port {self.port}:\n{tail}"
                )
            state = self._probe(proc)
            if state is not None:
                return state
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"{self._program} on port {self.port} not ready within "
                    f"{self._start_timeout}s:\n{self._log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _halt(self) -> None:
        """Ask the server to stop; crash it if it has not after a grace period."""
        proc = self._proc
        if proc is None:
            return
        self._request_stop()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._crash(proc)
        self._proc = None

    def _make_dir(self) -> Path:
        self._dir = Path(tempfile.mkdtemp(prefix=self._dir_prefix))
        atexit.register(self._atexit_close)
        return self._dir

    def _remove_dir(self) -> None:
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None
            atexit.unregister(self._atexit_close)

    def _atexit_close(self) -> None:
        try:
            self.close()
        except Exception:
            _log.exception("could not close %r at exit", self)
