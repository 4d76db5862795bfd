"""The parent's side of the chaos pods: ready pods, send them work, wait for their events.
Spawning, faulting and stopping them is :mod:`coordinator.lab.pods`."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

from .. import pods
from ..pods import Pod, start_at
from .common import SLACK, ChaosError
from .messages import (
    AskStats,
    Counters,
    Done,
    Loaded,
    Prepare,
    Prepared,
    Profile,
    Release,
    Report,
    Start,
    Work,
)
from .pod import chaos_pod

READY_TIMEOUT = 60.0  # spawn, import, connect of a pod on a busy machine


def _for(ticket: int) -> Callable[[Any], bool]:
    return lambda event: bool(event.ticket == ticket)


@dataclass(frozen=True)
class Ticket:
    """A batch sent to a pod; ``timeout`` bounds the wait for its report."""

    pod: Pod
    id: int
    timeout: float


class Fleet:
    """Chaos pods, spawned on demand and reused across scenarios; a killed pod is replaced
    the next time pods are asked for."""

    def __init__(self, dsn: str) -> None:
        self._dsn = dsn
        self._fleet = pods.Fleet("pod", quiet=True)
        self._pods: list[Pod] = []
        self._tickets = 0

    def pods(self, count: int) -> list[Pod]:
        """The first ``count`` pods, all alive and ready."""
        fresh: list[Pod] = []
        for index in range(count):
            if index < len(self._pods):
                if self._pods[index].alive:
                    continue
                self._pods[index] = self._fleet.replace(self._pods[index])
            else:
                self._pods.append(self._fleet.spawn(chaos_pod, self._dsn))
            fresh.append(self._pods[index])
        self._fleet.answers(fresh, READY_TIMEOUT)
        return self._pods[:count]

    def prepare(self, pods: Sequence[Pod], profile: Profile) -> None:
        """Build (and warm) each pod's coordinator for ``profile``."""
        tickets = []
        for pod in pods:
            self._tickets += 1
            pod.send(Prepare(self._tickets, profile))
            tickets.append((pod, self._tickets))
        for pod, ticket in tickets:
            pod.expect(Prepared, READY_TIMEOUT, _for(ticket))

    def start(self, pod: Pod, work: Work) -> Ticket:
        self._tickets += 1
        pod.send(Start(self._tickets, work))
        lead = 0.0 if work.start_at is None else max(0.0, work.start_at - time.time())
        return Ticket(pod, self._tickets, lead + work.duration + work.bound + SLACK)

    def start_together(self, pods: Sequence[Pod], work: Work) -> list[Ticket]:
        """The same work on every pod, released at one instant (each pod sleeps to it)."""
        at = start_at(len(pods), 0.1, 0.02)
        return [self.start(pod, replace(work, start_at=at)) for pod in pods]

    def loaded(self, ticket: Ticket, timeout: float = 30.0) -> Loaded:
        """Wait until the stalled loader of ``ticket`` has read the DB."""
        return ticket.pod.expect(Loaded, timeout, _for(ticket.id))

    def release(self, ticket: Ticket) -> None:
        ticket.pod.send(Release(ticket.id))

    def stats(self, pod: Pod, profile: Profile) -> dict[str, int]:
        """The pod's coordinator counters for ``profile``, now (its calls still running)."""
        self._tickets += 1
        pod.send(AskStats(self._tickets, profile))
        return pod.expect(Counters, READY_TIMEOUT, _for(self._tickets)).stats

    def until(self, pod: Pod, profile: Profile, name: str, count: int, timeout: float) -> None:
        """Wait until the pod's counter ``name`` for ``profile`` reaches ``count``."""
        deadline = time.monotonic() + timeout
        while self.stats(pod, profile)[name] < count:
            if time.monotonic() > deadline:
                raise ChaosError(f"pod {pod.name}: {name} did not reach {count} in {timeout:g}s")
            time.sleep(0.01)

    def finish(self, tickets: Sequence[Ticket]) -> list[Report]:
        return [
            ticket.pod.expect(Done, ticket.timeout, _for(ticket.id)).report for ticket in tickets
        ]

    def close(self) -> None:
        self._fleet.close(grace=10.0)
        self._pods.clear()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
