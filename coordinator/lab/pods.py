"""Pods: OS processes standing in for the pods of a proxy fleet, for the race, the bench's warm
pool, the chaos table and the multi-process tests.

A pod is a fresh interpreter (``spawn``: nothing is shared with the parent but what is
pickled) that runs one async *workload*, ``target(link, *args)``, on its own event loop with
its own clients. Through its :class:`Link` a pod takes the parent's messages (``None`` once
told to stop, or once the parent is gone) and sends its own. The parent spawns pods in a
:class:`Fleet`, releases them together (a :class:`StartLine`, or barriers and events of its
own), faults them (SIGSTOP, SIGCONT, SIGKILL, a replacement for a dead one) and collects
their messages. Every wait is bounded, and a pod that dies without a word is noticed: it
is reported as :class:`Failed` and its start line is broken, so that no pod waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Barrier, Event
from typing import Any, TypeVar

from .cliargs import CommandError, describe

__all__ = [
    "Barrier",
    "Event",
    "Failed",
    "Fleet",
    "Link",
    "Pod",
    "PodError",
    "Ready",
    "StartLine",
    "StartLineBroken",
    "Timeouts",
    "sleep_until",
    "start_at",
]

_CONTEXT = multiprocessing.get_context("spawn")
SETUP_TIMEOUT = 60.0  # spawn + import + connect + warm-up of every pod, on a busy machine
EXIT_GRACE = 1.0  # a pod that exited has flushed its last message: give the pipe a moment
POLL = 0.02  # how long a sweep of the pods' queues that found nothing waits on one

E = TypeVar("E")
Workload = Callable[..., Coroutine[Any, Any, None]]


@dataclass(frozen=True)
class Timeouts:
    """A pod's client timeouts in seconds: by default ``from_urls``'s, which fail fast, as in
    production. A run that counts rather than times on a busy machine (or faults another
    server) gives its healthy servers ``PATIENT`` ones, lest one that was merely descheduled
    be declared dead (store errors, a degraded lock, one more DB read)."""

    socket_timeout: float = 0.5
    lock_timeout: float = 0.3

    def options(self) -> dict[str, Any]:
        """As ``from_urls`` (and a chaos profile) takes them."""
        return asdict(self)


FAIL_FAST = Timeouts()
PATIENT = Timeouts(socket_timeout=5.0, lock_timeout=5.0)


class PodError(CommandError):
    """A pod failed, vanished, or did not answer in time."""


class StartLineBroken(PodError):
    """This pod is fine; another one failed before the start."""


@dataclass(frozen=True)
class Failed:
    """A pod's last word: it failed as a whole (or it died, or overran, without a word)."""

    pod: str
    error: str
    collateral: bool = False  # it failed only because another pod did


@dataclass(frozen=True)
class Ready:
    """The pod is set up and waits for work."""

    pod: str


def start_at(pods: int, lead: float, per_pod: float) -> float:
    """A wall-clock start ``lead`` (+ ``per_pod`` per pod) ahead: time for every pod to be
    told and to get its tasks ready."""
    return time.time() + lead + per_pod * pods


async def sleep_until(at: float) -> float:
    """Sleep until the wall-clock instant ``at`` (the clock every pod shares); that instant
    as ``perf_counter`` time, which latencies are measured from."""
    start = time.perf_counter() + (at - time.time())
    await asyncio.sleep(start - time.perf_counter())
    return start


class StartLine:
    """Releases every pod at one instant.

    A barrier alone wakes its waiters one after another (each takes its lock in turn, on a
    machine busy with the pods already woken): tens of ms apart for 16 pods on 2 cores, as
    long as a DB delay itself. So the last pod to arrive only schedules the start ``lead``
    seconds ahead (the barrier's action), and every pod sleeps to that instant on its own
    timer.
    """

    def __init__(self, parties: int, lead: float, timeout: float = SETUP_TIMEOUT) -> None:
        self.at: Synchronized[float] = _CONTEXT.Value("d", 0.0)
        self.timeout = timeout
        self.barrier = _CONTEXT.Barrier(parties, action=functools.partial(_schedule, self.at, lead))

    async def wait(self) -> float:
        """Wait for every pod, then for the start; the start as ``perf_counter`` time."""
        try:
            await asyncio.to_thread(self.barrier.wait, self.timeout)
        except threading.BrokenBarrierError:
            raise StartLineBroken(
                "the start barrier broke: another pod failed, "
                f"or setup took longer than {self.timeout:g}s"
            ) from None
        return await sleep_until(self.at.value)

    def abort(self) -> None:
        """Release every waiting pod with an error: one of them will never arrive."""
        self.barrier.abort()


def _schedule(at: Synchronized[float], lead: float) -> None:
    at.value = start_at(0, lead, 0.0)


class Link:
    """A pod's ties to its parent, pickled to the pod."""

    def __init__(
        self, name: str, inbox: Queue[Any], outbox: Queue[Any], start_line: StartLine | None
    ) -> None:
        self.name = name
        self._inbox = inbox
        self._outbox = outbox
        self.start_line = start_line

    def send(self, message: Any) -> None:
        self._outbox.put(message)

    def ready(self) -> None:
        self.send(Ready(self.name))

    async def next(self) -> Any:
        """The parent's next message; None once told to stop or once the parent is gone."""
        return await asyncio.to_thread(self._receive)

    def _receive(self) -> Any:
        parent = multiprocessing.parent_process()
        while True:
            try:
                return self._inbox.get(timeout=0.5)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    return None

    async def start(self) -> float:
        """Wait on the pod's start line; the start as ``perf_counter`` time."""
        if self.start_line is None:
            raise RuntimeError(f"pod {self.name} was spawned without a start line")
        return await self.start_line.wait()


def _pod_main(target: Workload, link: Link, args: tuple[Any, ...], quiet: bool) -> None:
    """Entry point of every spawned pod; a failure is reported, and breaks its start line."""
    # A terminal's Ctrl-C reaches the whole process group: the parent handles it and stops
    # the pods, so they should not die mid-report with a traceback each.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if quiet:  # the parent reports; a pod's own logs (reconnects, ...) would only be noise
        logging.getLogger().addHandler(logging.NullHandler())
    try:
        asyncio.run(target(link, *args))
    except BaseException as exc:
        if link.start_line is not None:
            link.start_line.abort()
        link.send(Failed(link.name, describe(exc), isinstance(exc, StartLineBroken)))


class _Nothing:
    """No message yet."""


_NOTHING = _Nothing()


class Pod:
    """A spawned pod, seen from the parent: send it messages, take its own, fault it."""

    def __init__(
        self,
        name: str,
        target: Workload,
        args: tuple[Any, ...],
        start_line: StartLine | None,
        quiet: bool,
    ) -> None:
        self.name = name
        self.target, self.args, self.start_line, self.quiet = target, args, start_line, quiet
        self._inbox: Queue[Any] = _CONTEXT.Queue()
        self._outbox: Queue[Any] = _CONTEXT.Queue()
        self._early: list[Any] = []  # taken while waiting for another kind of message
        self._exited_at: float | None = None
        link = Link(name, self._inbox, self._outbox, start_line)
        self.process: SpawnProcess = _CONTEXT.Process(
            target=_pod_main, args=(target, link, args, quiet), name=name, daemon=True
        )
        self.process.start()

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    @property
    def pid(self) -> int:
        pid = self.process.pid
        if pid is None:
            raise PodError(f"pod {self.name} has no process")
        return pid

    def send(self, message: Any) -> None:
        self._inbox.put(message)

    def expect(
        self, kind: type[E], timeout: float, where: Callable[[E], bool] = lambda _: True
    ) -> E:
        """The pod's next message of ``kind`` (for which ``where`` holds); the others are
        kept for later. A :class:`Failed` raises :class:`PodError`."""
        for message in self._early:
            if isinstance(message, kind) and where(message):
                self._early.remove(message)
                return message
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PodError(f"pod {self.name}: no {kind.__name__} within {timeout:g}s")
            message = self._take(min(remaining, 0.5))
            if isinstance(message, Failed):
                raise PodError(f"pod {message.pod} failed: {message.error}")
            if isinstance(message, kind) and where(message):
                return message
            if message is not _NOTHING:
                self._early.append(message)

    def take(self, timeout: float) -> Any | None:
        """The pod's next message within ``timeout``, or None if there is none yet; a pod
        that exited without a word gives a :class:`Failed`."""
        message = self._next(timeout)
        return None if message is _NOTHING else message

    def _next(self, timeout: float) -> Any:
        return self._early.pop(0) if self._early else self._take(timeout)

    def _take(self, timeout: float) -> Any:
        """The pod's next message from its queue within ``timeout``, :data:`_NOTHING`, or a
        :class:`Failed` once it has exited without one."""
        try:
            return self._outbox.get(timeout=timeout)
        except queue.Empty:
            pass
        if self.process.exitcode is None:
            return _NOTHING
        now = time.monotonic()
        if self._exited_at is None:
            self._exited_at = now
        if now - self._exited_at < EXIT_GRACE:
            return _NOTHING
        return Failed(self.name, f"pod exited with code {self.process.exitcode} without a report")

    def kill(self) -> None:
        """SIGKILL: the pod dies wherever it is, holding whatever it holds."""
        os.kill(self.pid, signal.SIGKILL)
        self.process.join(10.0)

    def pause(self) -> None:
        """SIGSTOP: the pod freezes wherever it is, its timers and keepers with it."""
        os.kill(self.pid, signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self.pid, signal.SIGCONT)

    def _ask_to_stop(self) -> None:
        if self.alive:
            with contextlib.suppress(OSError):
                self.resume()
            self.send(None)

    def _stop(self, grace: float) -> None:
        """Wait up to ``grace`` for the pod to end, then end it; release its queues."""
        self.process.join(grace)
        if self.alive:
            self.process.terminate()
            self.process.join(2.0)
        if self.alive:
            self.process.kill()
            self.process.join()
        # A dead reader never drains the inbox: do not wait to flush into it.
        self._inbox.cancel_join_thread()
        self._inbox.close()
        self._outbox.close()


class Fleet:
    """The pods spawned for one job; closing it stops them all. Use as a context manager."""

    def __init__(self, prefix: str = "pod", *, quiet: bool = False) -> None:
        self.prefix = prefix
        self.quiet = quiet  # silence the pods' logging
        self.pods: list[Pod] = []
        self._spawned = 0
        # A named semaphore is unlinked when its parent-side object is collected, which can
        # happen before a spawned child has opened it: keep them all until close.
        self._start_lines: list[StartLine] = []
        self._primitives: list[Barrier | Event] = []

    def spawn(
        self, target: Workload, *args: Any, name: str | None = None, start: StartLine | None = None
    ) -> Pod:
        """A pod running ``target(link, *args)`` (an async function a child can import by
        its module path), released by ``start`` if given."""
        pod = Pod(name or f"{self.prefix}{self._spawned}", target, args, start, self.quiet)
        self._spawned += 1
        self.pods.append(pod)
        return pod

    def replace(self, pod: Pod) -> Pod:
        """A fresh pod in place of ``pod`` (stopped first), running the same workload."""
        pod._ask_to_stop()
        pod._stop(grace=0.0)
        fresh = Pod(f"{self.prefix}{self._spawned}", pod.target, pod.args, None, self.quiet)
        self._spawned += 1
        self.pods[self.pods.index(pod)] = fresh
        return fresh

    def start_line(self, parties: int, lead: float) -> StartLine:
        line = StartLine(parties, lead)
        self._start_lines.append(line)
        return line

    def barrier(self, parties: int) -> Barrier:
        barrier = _CONTEXT.Barrier(parties)
        self._primitives.append(barrier)
        return barrier

    def event(self) -> Event:
        event = _CONTEXT.Event()
        self._primitives.append(event)
        return event

    def gather(self, pods: Sequence[Pod], timeout: float) -> list[Any]:
        """The next message of each of ``pods``, in order. A pod that fails, exits without
        a message or overruns ``timeout`` gives a :class:`Failed`, and the start lines are
        broken, so that nobody waits for a pod that will never arrive."""
        deadline = time.monotonic() + timeout
        got: dict[int, Any] = {}
        while len(got) < len(pods):
            pending = [index for index in range(len(pods)) if index not in got]
            # The queues cannot be waited on together: block on one for a moment at most.
            waits = [POLL] + [0.0] * (len(pending) - 1)
            for index, wait in zip(pending, waits, strict=True):
                message = pods[index]._next(wait)
                if message is _NOTHING:
                    continue
                got[index] = message
                if isinstance(message, Failed):
                    self._abort_start_lines()
            if len(got) < len(pods) and time.monotonic() > deadline:
                for index, pod in enumerate(pods):
                    got.setdefault(index, Failed(pod.name, "pod did not finish in time"))
                self._abort_start_lines()
        return [got[index] for index in range(len(pods))]

    def answers(self, pods: Sequence[Pod], timeout: float) -> list[Any]:
        """:meth:`gather`, raising :class:`PodError` if any pod failed."""
        got = self.gather(pods, timeout)
        failed = [f"pod {m.pod} failed: {m.error}" for m in got if isinstance(m, Failed)]
        if failed:
            raise PodError("; ".join(failed))
        return got

    def _abort_start_lines(self) -> None:
        for line in self._start_lines:
            line.abort()

    def close(self, grace: float = 5.0) -> None:
        """Stop every pod: ask, wait up to ``grace`` each, then terminate or kill."""
        self._abort_start_lines()
        for pod in self.pods:
            pod._ask_to_stop()
        for pod in self.pods:
            pod._stop(grace)
        self.pods.clear()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, exc_type: object, *rest: object) -> None:
        # Interrupted or failed: end the pods at once.
        self.close(grace=5.0 if exc_type is None else 0.0)
