"""The parent's side of the pods: spawn, send work, wait for events, kill or pause."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import queue
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from multiprocessing.context import SpawnProcess
from multiprocessing.queues import Queue
from typing import Any, TypeVar

from .common import SLACK, ChaosError
from .messages import (
    Loaded,
    Profile,
    Report,
    Work,
    _Counters,
    _Done,
    _Failed,
    _Prepare,
    _Prepared,
    _Ready,
    _Release,
    _Run,
    _Stats,
    _Stop,
)
from .pod import pod_main

READY_TIMEOUT = 60.0  # spawn, import, connect of a pod on a busy machine

E = TypeVar("E")


class Pod:
    """A spawned pod: send it work, wait for its events, kill or pause it."""

    def __init__(self, context: Any, name: str, dsn: str) -> None:
        self.name = name
        self._commands: Queue[Any] = context.Queue()
        self._events: Queue[Any] = context.Queue()
        self._early: list[Any] = []
        self.process: SpawnProcess = context.Process(
            target=pod_main, args=(name, dsn, self._commands, self._events), name=name, daemon=True
        )
        self.process.start()

    @property
    def alive(self) -> bool:
        return self.process.is_alive()

    def send(self, command: Any) -> None:
        self._commands.put(command)

    def expect(self, kind: type[E], ticket: int | None, timeout: float) -> E:
        """The pod's next event of ``kind`` (for ``ticket``); others are kept for later."""
        for event in self._early:
            if isinstance(event, kind) and getattr(event, "ticket", None) in (ticket, None):
                self._early.remove(event)
                return event
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ChaosError(f"pod {self.name}: no {kind.__name__} within {timeout:g}s")
            try:
                event = self._events.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                if not self.alive:
                    raise ChaosError(
                        f"pod {self.name} exited ({self.process.exitcode}) before {kind.__name__}"
                    ) from None
                continue
            if isinstance(event, _Failed):
                raise ChaosError(f"pod {event.pod} failed: {event.error}")
            if isinstance(event, kind) and getattr(event, "ticket", None) in (ticket, None):
                return event
            self._early.append(event)

    def kill(self) -> None:
        """SIGKILL: the pod dies wherever it is, holding whatever it holds."""
        os.kill(self._pid(), signal.SIGKILL)
        self.process.join(10.0)

    def pause(self) -> None:
        os.kill(self._pid(), signal.SIGSTOP)

    def resume(self) -> None:
        os.kill(self._pid(), signal.SIGCONT)

    def _pid(self) -> int:
        pid = self.process.pid
        if pid is None:
            raise ChaosError(f"pod {self.name} has no process")
        return pid

    def close(self) -> None:
        if self.alive:
            with contextlib.suppress(OSError):
                self.resume()
            self.send(_Stop())
            self.process.join(10.0)
        if self.alive:
            self.process.kill()
            self.process.join(10.0)
        # A dead reader never drains the command pipe: do not wait to flush into it.
        self._commands.cancel_join_thread()
        self._commands.close()
        self._events.close()


@dataclass(frozen=True)
class Ticket:
    """A batch sent to a pod; ``timeout`` bounds the wait for its report."""

    pod: Pod
    id: int
    timeout: float


class Fleet:
    """Pods, spawned on demand and reused across scenarios; a killed pod is replaced the
    next time pods are asked for."""

    def __init__(self, dsn: str) -> None:
        self._context = multiprocessing.get_context("spawn")
        self._dsn = dsn
        self._pods: list[Pod] = []
        self._spawned = 0
        self._tickets = 0

    def pods(self, count: int) -> list[Pod]:
        """The first ``count`` pods, all alive and ready."""
        fresh: list[Pod] = []
        for index in range(count):
            if index < len(self._pods) and self._pods[index].alive:
                continue
            if index < len(self._pods):
                self._pods[index].close()
            self._spawned += 1
            pod = Pod(self._context, f"pod{self._spawned}", self._dsn)
            fresh.append(pod)
            if index < len(self._pods):
                self._pods[index] = pod
            else:
                self._pods.append(pod)
        for pod in fresh:
            pod.expect(_Ready, None, READY_TIMEOUT)
        return self._pods[:count]

    def prepare(self, pods: Sequence[Pod], profile: Profile) -> None:
        """Build (and warm) each pod's coordinator for ``profile``."""
        tickets = []
        for pod in pods:
            self._tickets += 1
            pod.send(_Prepare(self._tickets, profile))
            tickets.append((pod, self._tickets))
        for pod, ticket in tickets:
            pod.expect(_Prepared, ticket, READY_TIMEOUT)

    def start(self, pod: Pod, work: Work) -> Ticket:
        self._tickets += 1
        pod.send(_Run(self._tickets, work))
        lead = 0.0 if work.start_at is None else max(0.0, work.start_at - time.time())
        return Ticket(pod, self._tickets, lead + work.duration + work.bound + SLACK)

    def start_together(self, pods: Sequence[Pod], work: Work) -> list[Ticket]:
        """The same work on every pod, released at one instant (each pod sleeps to it)."""
        start_at = time.time() + 0.1 + 0.02 * len(pods)
        return [self.start(pod, replace(work, start_at=start_at)) for pod in pods]

    def loaded(self, ticket: Ticket, timeout: float = 30.0) -> Loaded:
        """Wait until the stalled loader of ``ticket`` has read the DB."""
        return ticket.pod.expect(Loaded, ticket.id, timeout)

    def release(self, ticket: Ticket) -> None:
        ticket.pod.send(_Release(ticket.id))

    def stats(self, pod: Pod, profile: Profile) -> dict[str, int]:
        """The pod's coordinator counters for ``profile``, now (its calls still running)."""
        self._tickets += 1
        pod.send(_Stats(self._tickets, profile))
        return pod.expect(_Counters, self._tickets, READY_TIMEOUT).stats

    def until(self, pod: Pod, profile: Profile, name: str, count: int, timeout: float) -> None:
        """Wait until the pod's counter ``name`` for ``profile`` reaches ``count``."""
        deadline = time.monotonic() + timeout
        while self.stats(pod, profile)[name] < count:
            if time.monotonic() > deadline:
                raise ChaosError(f"pod {pod.name}: {name} did not reach {count} in {timeout:g}s")
            time.sleep(0.01)

    def finish(self, tickets: Sequence[Ticket]) -> list[Report]:
        return [ticket.pod.expect(_Done, ticket.id, ticket.timeout).report for ticket in tickets]

    def close(self) -> None:
        for pod in self._pods:
            pod.close()
        self._pods.clear()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
