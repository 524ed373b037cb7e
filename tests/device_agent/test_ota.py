"""The OTA state machine, driven without a broker, files or models.

A small simulator plays the daemon: it applies each returned action to a model of the
device (which slot is active) and feeds back an outcome, with crashes (RESUME) and failures
injected anywhere. Whatever happens, the invariants of ``device_agent/ota.py`` must hold.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeship.device_agent import ota
from edgeship.device_agent.ota import Action, Deployment, Event, State

pytestmark = pytest.mark.py310

SUCCESS = {
    Action.DOWNLOAD: Event.DOWNLOADED,
    Action.VERIFY_AND_STAGE: Event.VERIFIED,
    Action.BEGIN_VALIDATION: Event.PROCEED,
    Action.VALIDATE: Event.VALID,
    Action.SHADOW: Event.SHADOW_OK,
    Action.ACTIVATE: Event.ACTIVATED,
    Action.WATCH_HEALTH: Event.HEALTHY,
    Action.ROLL_BACK: Event.ROLLED_BACK,
}


class Device:
    """What the actions do to the device, reduced to the active slot and the quarantine."""

    def __init__(self) -> None:
        self.active = "old"
        self.quarantined = False

    def perform(self, actions: tuple[Action, ...]) -> Event | None:
        event = None
        for action in actions:
            if action is Action.ACTIVATE:
                self.active = "new"
            elif action is Action.ROLL_BACK:
                self.active = "old"
            elif action is Action.QUARANTINE:
                self.quarantined = True
            event = SUCCESS.get(action)
        return event


def fresh() -> Deployment:
    return Deployment("d1", "pkg/v2.edgepkg")


def test_happy_path_goes_through_every_state_in_order():
    dep, device = fresh(), Device()
    seen = []
    event: Event | None = Event.DEPLOY
    while event is not None:
        dep, actions = ota.step(dep, event)
        seen.append(dep.state)
        event = device.perform(actions)
    assert seen == [
        State.DOWNLOADING,
        State.VERIFYING,
        State.STAGED,
        State.VALIDATING,
        State.ACTIVATING,
        State.HEALTH_CHECK,
        State.COMMITTED,
    ]
    assert device.active == "new" and not device.quarantined


def test_shadow_phase_is_entered_only_when_asked_for():
    dep = replace(fresh(), state=State.VALIDATING)
    assert ota.step(dep, Event.NEEDS_SHADOW)[0].state is State.SHADOW
    assert ota.step(dep, Event.VALID)[0].state is State.ACTIVATING


@pytest.mark.parametrize("state", sorted(ota.BEFORE_ACTIVATION, key=lambda s: s.value))
def test_failure_before_activation_discards_and_never_touches_the_active_slot(state):
    dep, actions = ota.step(replace(fresh(), state=state), Event.FAILED, code="golden_failed", message="case 0")
    assert dep.state is State.FAILED and actions == (Action.DISCARD,)
    assert dep.code == "golden_failed" and dep.message == "case 0" and not dep.quarantine


@pytest.mark.parametrize("state", [State.ACTIVATING, State.HEALTH_CHECK])
def test_failure_after_activation_rolls_back_and_quarantines(state):
    dep, actions = ota.step(replace(fresh(), state=state), Event.FAILED, code="golden_failed")
    assert dep.state is State.ROLLING_BACK
    assert actions == (Action.QUARANTINE, Action.ROLL_BACK) and dep.quarantine


def test_unhealthy_model_is_rolled_back_and_quarantined():
    dep, actions = ota.step(replace(fresh(), state=State.HEALTH_CHECK), Event.UNHEALTHY, code="latency")
    assert dep.state is State.ROLLING_BACK and Action.QUARANTINE in actions and dep.code == "latency"
    dep, actions = ota.step(dep, Event.ROLLED_BACK)
    assert dep.state is State.ROLLED_BACK and actions == (Action.DISCARD,)


def test_every_non_terminal_state_can_resume_and_redoes_its_own_work():
    for state in State:
        dep, actions = ota.step(replace(fresh(), state=state), Event.RESUME)
        assert dep.state is state
        if state in ota.TERMINAL:
            assert actions == ()
        else:
            assert actions and dep.attempts == 1


@pytest.mark.parametrize(
    ("state", "ends_in"),
    [
        (State.VERIFYING, State.FAILED),
        (State.VALIDATING, State.FAILED),
        (State.ACTIVATING, State.ROLLING_BACK),
        (State.HEALTH_CHECK, State.ROLLING_BACK),
    ],
)
def test_a_state_that_keeps_crashing_the_agent_ends_the_deployment(state, ends_in):
    dep = replace(fresh(), state=state)
    for _ in range(ota.MAX_ATTEMPTS):
        dep, _ = ota.step(dep, Event.RESUME)
        assert dep.state is state
    dep, actions = ota.step(dep, Event.RESUME)
    assert dep.state is ends_in and dep.code == "crash_loop"
    if ends_in is State.ROLLING_BACK:
        assert Action.ROLL_BACK in actions and dep.quarantine


@pytest.mark.parametrize(
    ("state", "action"), [(State.ROLLING_BACK, Action.ROLL_BACK), (State.DOWNLOADING, Action.DOWNLOAD)]
)
def test_rolling_back_and_downloading_never_give_up(state, action):
    dep = replace(fresh(), state=state)
    for _ in range(ota.MAX_ATTEMPTS * 3):
        dep, actions = ota.step(dep, Event.RESUME)
        assert dep.state is state and actions == (action,)


def test_terminal_states_accept_only_a_new_deployment():
    for state in ota.TERMINAL:
        for event in Event:
            if event in (Event.DEPLOY, Event.RESUME):
                continue
            with pytest.raises(ota.IllegalTransition):
                ota.step(replace(fresh(), state=state), event)


def test_a_new_deployment_clears_the_previous_outcome():
    old = replace(fresh(), state=State.FAILED, code="hash_mismatch", message="x", quarantine=True, staged_slot="B")
    dep, actions = ota.step(old, Event.DEPLOY)
    assert dep.state is State.DOWNLOADING and actions == (Action.DOWNLOAD,)
    assert dep.code is None and dep.message is None and not dep.quarantine and dep.staged_slot is None


def test_journal_record_round_trips_through_json():
    dep = Deployment(
        "d9",
        "m/t/fp32/v3.edgepkg",
        State.HEALTH_CHECK,
        "fleet",
        {"health": {"window_s": 5}},
        {"name": "m"},
        "B",
        "A",
        2,
        "c",
        "m",
        True,
    )
    assert Deployment.from_json(dep.to_json()) == dep


# Random runs: any interleaving of successes, failures, cancels and crashes.
_choice = st.sampled_from(["ok", "ok", "ok", "fail", "crash", "crash", "cancel", "unhealthy"])


@given(st.lists(_choice, min_size=1, max_size=60))
def test_random_runs_keep_the_invariants_and_converge(choices):
    dep, device = fresh(), Device()
    dep, actions = ota.step(dep, Event.DEPLOY)
    event = device.perform(actions)
    for choice in [*choices, *(["ok"] * 40)]:
        if dep.state in ota.TERMINAL:
            break
        state = dep.state
        # Invariant 1: the active slot is untouched until ACTIVATING.
        if state in ota.BEFORE_ACTIVATION:
            assert device.active == "old"
        if choice == "crash":
            dep, actions = ota.step(dep, Event.RESUME)
        elif choice == "fail":
            dep, actions = ota.step(dep, Event.FAILED if ota.accepts(state, Event.FAILED) else event or Event.RESUME)
        elif choice == "cancel" and ota.accepts(state, Event.CANCEL):
            dep, actions = ota.step(dep, Event.CANCEL)
        elif choice == "unhealthy" and state is State.HEALTH_CHECK:
            dep, actions = ota.step(dep, Event.UNHEALTHY)
        elif event is not None:
            dep, actions = ota.step(dep, event)
        else:
            dep, actions = ota.step(dep, Event.RESUME)
        event = device.perform(actions)
    # Converged (the trailing successes always finish a deployment) ...
    assert dep.state in (State.COMMITTED, State.ROLLED_BACK, State.FAILED)
    # ... and the device serves what the outcome says: invariants 1-2 of the module.
    if dep.state is State.COMMITTED:
        assert device.active == "new" and not device.quarantined
    else:
        assert device.active == "old"
