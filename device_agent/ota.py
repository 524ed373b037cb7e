"""The over-the-air update state machine: states, events, actions and one pure ``step``.

The machine knows nothing about files, MQTT or models. ``step(deployment, event)`` returns
the deployment in its next state and the actions the daemon must perform there. The daemon
(``device_agent.updater``) writes the returned deployment to its journal durably *before*
it performs any action, reports the transition as an event, performs the actions, and feeds
their outcome back as the next event. After a crash or power loss the daemon feeds
``RESUME`` to the journaled deployment, and the table below says what to redo.

States (ARCHITECTURE.md, docs/ota.md)::

    IDLE -> DOWNLOADING -> VERIFYING -> STAGED -> VALIDATING -> [SHADOW] -> ACTIVATING
         -> HEALTH_CHECK -> COMMITTED
                         -> ROLLING_BACK -> ROLLED_BACK
    any step before ACTIVATING that fails -> FAILED (the active model was never touched)

Invariants the table keeps (tests/device_agent/test_ota.py checks them for every path):

1. Until ACTIVATING the active slot is never written: a failure or crash there leaves the
   device serving what it served.
2. After ACTIVATING the previous slot is kept intact until the deployment is COMMITTED, so
   ROLLING_BACK always has somewhere to go back to.
3. A crash counts as an attempt. A state resumed more than ``MAX_ATTEMPTS`` times ends the
   deployment: FAILED before activation, ROLLING_BACK after it (a model that crashes the
   agent on load cannot crash-loop the device, as a bootloader's boot counter would do).
   DOWNLOADING and ROLLING_BACK never give up: a download only moves bytes (a flaky power
   supply must not fail a long download), and going back is the only safe end.
4. Terminal states (COMMITTED, ROLLED_BACK, FAILED) accept only a new DEPLOY.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any


class State(enum.Enum):
    IDLE = "IDLE"
    DOWNLOADING = "DOWNLOADING"
    VERIFYING = "VERIFYING"
    STAGED = "STAGED"
    VALIDATING = "VALIDATING"
    SHADOW = "SHADOW"
    ACTIVATING = "ACTIVATING"
    HEALTH_CHECK = "HEALTH_CHECK"
    COMMITTED = "COMMITTED"
    ROLLING_BACK = "ROLLING_BACK"
    ROLLED_BACK = "ROLLED_BACK"
    FAILED = "FAILED"


TERMINAL = frozenset({State.IDLE, State.COMMITTED, State.ROLLED_BACK, State.FAILED})
BEFORE_ACTIVATION = frozenset({State.DOWNLOADING, State.VERIFYING, State.STAGED, State.VALIDATING, State.SHADOW})
AFTER_ACTIVATION = frozenset({State.ACTIVATING, State.HEALTH_CHECK, State.ROLLING_BACK})


class Event(enum.Enum):
    DEPLOY = "DEPLOY"  # a new deployment was accepted
    DOWNLOADED = "DOWNLOADED"  # the whole file is on disk (not trusted yet)
    ALREADY_INSTALLED = "ALREADY_INSTALLED"  # the fleet's metadata names exactly the active model
    VERIFIED = "VERIFIED"  # TUF length/hash + package signature/schema/hashes passed; unpacked into the slot
    PROCEED = "PROCEED"  # STAGED: go on to validation
    VALID = "VALID"  # the child-process check passed
    NEEDS_SHADOW = "NEEDS_SHADOW"  # VALID, and the deployment asks for a shadow phase
    SHADOW_OK = "SHADOW_OK"
    ACTIVATED = "ACTIVATED"  # the active pointer names the new slot and the new model serves
    HEALTHY = "HEALTHY"
    UNHEALTHY = "UNHEALTHY"
    ROLLED_BACK = "ROLLED_BACK"  # the active pointer names the previous slot again
    FAILED = "FAILED"  # the current step failed (code and message in the deployment)
    CANCEL = "CANCEL"  # the fleet cancelled the deployment
    RESUME = "RESUME"  # the agent restarted with this deployment in its journal


class Action(enum.Enum):
    DOWNLOAD = "DOWNLOAD"  # resolve the target in TUF, download with Range resume
    VERIFY_AND_STAGE = "VERIFY_AND_STAGE"  # verify the download and unpack it into the inactive slot
    BEGIN_VALIDATION = "BEGIN_VALIDATION"  # nothing to do but proceed (STAGED is a journal checkpoint)
    VALIDATE = "VALIDATE"  # child-process check of the staged slot
    SHADOW = "SHADOW"  # run the new model on a sample of live requests, compare
    ACTIVATE = "ACTIVATE"  # switch the active pointer, load the new model, swap it in
    WATCH_HEALTH = "WATCH_HEALTH"  # health window on the new model
    COMMIT = "COMMIT"  # record the version as committed; the download is removed
    QUARANTINE = "QUARANTINE"  # never install this version again on this device
    ROLL_BACK = "ROLL_BACK"  # switch the active pointer back, serve the previous model
    DISCARD = "DISCARD"  # remove the download and the staged slot's contents (never the active slot)


MAX_ATTEMPTS = 3
"""How many times a state may be entered again after a crash before the deployment ends."""
NEVER_GIVE_UP = frozenset({State.DOWNLOADING, State.ROLLING_BACK})


@dataclass(frozen=True)
class Deployment:
    """One deployment's journal record: what to install and how far it got.

    ``request`` holds the command's settings (validation, shadow and health parameters) as
    received; ``target`` what the fleet's signed metadata said about the package once it was
    looked up (name, version, length, hashes, url); ``staged_slot``/``previous_slot`` which
    slot holds the new and the old model. ``code``/``message`` say why it failed or rolled back.
    """

    deployment_id: str
    target_path: str
    state: State = State.IDLE
    source: str = "fleet"  # "fleet" (TUF) or "local" (edgeship agent install)
    request: dict[str, Any] = field(default_factory=dict)
    target: dict[str, Any] = field(default_factory=dict)
    staged_slot: str | None = None
    previous_slot: str | None = None
    attempts: int = 0
    code: str | None = None
    message: str | None = None
    quarantine: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "deployment_id": self.deployment_id,
            "target_path": self.target_path,
            "state": self.state.value,
            "source": self.source,
            "request": self.request,
            "target": self.target,
            "staged_slot": self.staged_slot,
            "previous_slot": self.previous_slot,
            "attempts": self.attempts,
            "code": self.code,
            "message": self.message,
            "quarantine": self.quarantine,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Deployment:
        return cls(
            deployment_id=str(data["deployment_id"]),
            target_path=str(data["target_path"]),
            state=State(data["state"]),
            source=str(data.get("source", "fleet")),
            request=dict(data.get("request") or {}),
            target=dict(data.get("target") or {}),
            staged_slot=data.get("staged_slot"),
            previous_slot=data.get("previous_slot"),
            attempts=int(data.get("attempts", 0)),
            code=data.get("code"),
            message=data.get("message"),
            quarantine=bool(data.get("quarantine", False)),
        )


class IllegalTransition(Exception):
    """An event that the current state does not accept (a bug in the daemon, not bad input)."""


# (state, event) -> (next state, actions). Events not listed for a state are illegal.
TABLE: dict[tuple[State, Event], tuple[State, tuple[Action, ...]]] = {
    # A new deployment starts from any resting state.
    **{(s, Event.DEPLOY): (State.DOWNLOADING, (Action.DOWNLOAD,)) for s in TERMINAL},
    (State.DOWNLOADING, Event.DOWNLOADED): (State.VERIFYING, (Action.VERIFY_AND_STAGE,)),
    # Deploying what already serves is a success with nothing to do (deploys are idempotent).
    (State.DOWNLOADING, Event.ALREADY_INSTALLED): (State.COMMITTED, (Action.DISCARD,)),
    (State.VERIFYING, Event.VERIFIED): (State.STAGED, (Action.BEGIN_VALIDATION,)),
    (State.STAGED, Event.PROCEED): (State.VALIDATING, (Action.VALIDATE,)),
    (State.VALIDATING, Event.VALID): (State.ACTIVATING, (Action.ACTIVATE,)),
    (State.VALIDATING, Event.NEEDS_SHADOW): (State.SHADOW, (Action.SHADOW,)),
    (State.SHADOW, Event.SHADOW_OK): (State.ACTIVATING, (Action.ACTIVATE,)),
    (State.ACTIVATING, Event.ACTIVATED): (State.HEALTH_CHECK, (Action.WATCH_HEALTH,)),
    (State.HEALTH_CHECK, Event.HEALTHY): (State.COMMITTED, (Action.COMMIT,)),
    (State.HEALTH_CHECK, Event.UNHEALTHY): (State.ROLLING_BACK, (Action.QUARANTINE, Action.ROLL_BACK)),
    (State.ROLLING_BACK, Event.ROLLED_BACK): (State.ROLLED_BACK, (Action.DISCARD,)),
    # Failures before activation: the active slot was never touched.
    **{(s, Event.FAILED): (State.FAILED, (Action.DISCARD,)) for s in BEFORE_ACTIVATION},
    **{(s, Event.CANCEL): (State.FAILED, (Action.DISCARD,)) for s in BEFORE_ACTIVATION},
    # A failure while activating or watching health goes back to the previous model.
    (State.ACTIVATING, Event.FAILED): (State.ROLLING_BACK, (Action.QUARANTINE, Action.ROLL_BACK)),
    (State.HEALTH_CHECK, Event.FAILED): (State.ROLLING_BACK, (Action.QUARANTINE, Action.ROLL_BACK)),
    (State.ACTIVATING, Event.CANCEL): (State.ROLLING_BACK, (Action.ROLL_BACK,)),
    (State.HEALTH_CHECK, Event.CANCEL): (State.ROLLING_BACK, (Action.ROLL_BACK,)),
    # Resuming after a crash: redo the state's own work (every action is idempotent).
    (State.DOWNLOADING, Event.RESUME): (State.DOWNLOADING, (Action.DOWNLOAD,)),
    (State.VERIFYING, Event.RESUME): (State.VERIFYING, (Action.VERIFY_AND_STAGE,)),
    (State.STAGED, Event.RESUME): (State.STAGED, (Action.BEGIN_VALIDATION,)),
    (State.VALIDATING, Event.RESUME): (State.VALIDATING, (Action.VALIDATE,)),
    (State.SHADOW, Event.RESUME): (State.SHADOW, (Action.SHADOW,)),
    (State.ACTIVATING, Event.RESUME): (State.ACTIVATING, (Action.ACTIVATE,)),
    (State.HEALTH_CHECK, Event.RESUME): (State.HEALTH_CHECK, (Action.WATCH_HEALTH,)),
    (State.ROLLING_BACK, Event.RESUME): (State.ROLLING_BACK, (Action.ROLL_BACK,)),
    **{(s, Event.RESUME): (s, ()) for s in TERMINAL},
}


def step(
    deployment: Deployment, event: Event, *, code: str | None = None, message: str | None = None
) -> tuple[Deployment, tuple[Action, ...]]:
    """Apply ``event`` to ``deployment``; return the next deployment record and the actions to perform.

    ``code``/``message`` describe a FAILED, UNHEALTHY or CANCEL event and are kept in the record.
    A RESUME counts an attempt; past ``MAX_ATTEMPTS`` it becomes FAILED (before activation) or
    a roll-back (after it). Raises ``IllegalTransition`` for an event the state does not accept.
    """
    state = deployment.state
    if event is Event.RESUME and state not in TERMINAL:
        attempts = deployment.attempts + 1
        if attempts > MAX_ATTEMPTS and state not in NEVER_GIVE_UP:
            why = f"the agent stopped {attempts - 1} times in {state.value}; giving up on this deployment"
            return step(replace(deployment, attempts=0), Event.FAILED, code="crash_loop", message=why)
        deployment = replace(deployment, attempts=attempts)
    entry = TABLE.get((state, event))
    if entry is None:
        raise IllegalTransition(f"{state.value} does not accept {event.value}")
    next_state, actions = entry
    changes: dict[str, Any] = {"state": next_state}
    if next_state is not state:
        changes["attempts"] = 0
    if event in (Event.FAILED, Event.UNHEALTHY, Event.CANCEL, Event.ALREADY_INSTALLED):
        changes["code"] = code or event.value.lower()
        changes["message"] = message
    if Action.QUARANTINE in actions:
        changes["quarantine"] = True
    if event is Event.DEPLOY:
        changes.update(code=None, message=None, quarantine=False, attempts=0, staged_slot=None)
    return replace(deployment, **changes), actions


def accepts(state: State, event: Event) -> bool:
    """Whether ``state`` accepts ``event`` (RESUME is accepted everywhere)."""
    return (state, event) in TABLE
