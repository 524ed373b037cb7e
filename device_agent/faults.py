"""Fault injection for crash-safety tests and hardware-in-the-loop runs: kill the agent at a named point.

``EDGESHIP_AGENT_KILL_AT="after:VALIDATING,before:ACTIVATING"`` makes the agent SIGKILL itself
the first time it reaches each named point: ``before:<STATE>`` just before the journal write
that enters ``STATE``, ``after:<STATE>`` just after that write is durable. Nothing else in the
agent changes; with the variable unset, ``point`` is one set lookup. tests/device_agent/
test_crash_safety.py and benchmarks/ota_crash.py kill at every point; hil/ can do the same
on a real board.
"""

from __future__ import annotations

import os
import signal

ENV = "EDGESHIP_AGENT_KILL_AT"
_armed: set[str] = {p.strip() for p in os.environ.get(ENV, "").split(",") if p.strip()}


def point(name: str) -> None:
    """SIGKILL this process if ``name`` is armed (each point fires once)."""
    if name in _armed:
        _armed.discard(name)
        os.kill(os.getpid(), signal.SIGKILL)
