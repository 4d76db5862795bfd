"""Client timeouts for tests whose servers are healthy (imported by name: pytest's default
``prepend`` import mode puts ``tests/`` on ``sys.path``, as for ``pods``).

Such a test asserts what the protocol guarantees (one DB read, no errors), not how fast the
machine is, so its timeouts only guard against a hang: the lab's ``PATIENT`` ones, sized for
a starved machine, where the fail-fast defaults (socket 0.5 s, lock 0.3 s) run out on a burst
of connects or a descheduled server and declare a healthy one dead (store errors, a degraded
lock and one more DB read). Fault tests keep the defaults, whose cost they measure.
"""

from __future__ import annotations

from coordinator.lab.pods import PATIENT as PATIENT_TIMEOUTS

# As from_urls and the chaos pods' profiles take them.
PATIENT = PATIENT_TIMEOUTS.options()
# As the race and bench commands take them.
PATIENT_FLAGS = [f"--{name.replace('_', '-')}={seconds:g}" for name, seconds in PATIENT.items()]
