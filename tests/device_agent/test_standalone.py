"""Standalone mode: ``edgeship agent install PKG`` through the same states and journal, no fleet."""

from __future__ import annotations

import numpy as np
import pytest

from edgeship.device_agent.config import load_config
from edgeship.device_agent.daemon import Agent
from edgeship.device_agent.store import StateStore
from tests.agent_models import expected_top1, sample_inputs

pytestmark = pytest.mark.py310


def test_install_then_serve_then_upgrade(agent_config, packages):
    cfg = load_config(agent_config())
    outcome = Agent(cfg, serve_http=False, connect=False).install_standalone(packages(version=1))
    assert outcome["state"] == "COMMITTED", outcome
    state = StateStore(cfg.data_dir).load()
    assert state.active == "A" and state.slots["A"] is not None and state.slots["A"].version == 1
    assert state.committed == {"sensor-net": 1}

    outcome = Agent(cfg, serve_http=False, connect=False).install_standalone(packages(version=2))
    assert outcome["state"] == "COMMITTED", outcome
    state = StateStore(cfg.data_dir).load()
    assert state.active == "B" and state.slots["B"].version == 2 and state.slots["A"].version == 1

    agent = Agent(cfg, serve_http=False, connect=False)
    agent.start()
    try:
        x = sample_inputs(16, seed=5)
        out = agent.infer({"x": x})["logits"]
        assert np.array_equal(out.argmax(1), expected_top1(2, x))
    finally:
        agent.stop()


def test_a_package_whose_golden_vectors_fail_is_refused_and_nothing_changes(agent_config, packages):
    cfg = load_config(agent_config())
    Agent(cfg, serve_http=False, connect=False).install_standalone(packages(version=1))
    outcome = Agent(cfg, serve_http=False, connect=False).install_standalone(packages(version=2, kind="bad_golden"))
    assert outcome["state"] == "FAILED" and outcome["code"] == "golden_failed", outcome
    state = StateStore(cfg.data_dir).load()
    assert state.active == "A" and state.slots["B"] is None and state.committed == {"sensor-net": 1}
    assert not (cfg.data_dir / "slots" / "B").exists()


@pytest.mark.parametrize(
    ("spec", "code"),
    [
        ({"version": 1, "kind": "disagreeing"}, "version_not_newer"),
        ({"version": 5, "target": "jetson-orin-nano"}, "wrong_target"),
    ],
)
def test_refusals_leave_the_active_model_untouched(agent_config, packages, spec, code):
    cfg = load_config(agent_config())
    Agent(cfg, serve_http=False, connect=False).install_standalone(packages(version=1))
    outcome = Agent(cfg, serve_http=False, connect=False).install_standalone(packages(**spec))
    assert outcome["state"] == "FAILED" and outcome["code"] == code, outcome
    assert StateStore(cfg.data_dir).load().active == "A"


def test_installing_what_already_serves_succeeds_with_nothing_to_do(agent_config, packages):
    cfg = load_config(agent_config())
    Agent(cfg, serve_http=False, connect=False).install_standalone(packages(version=1))
    outcome = Agent(cfg, serve_http=False, connect=False).install_standalone(packages(version=1))
    assert outcome["state"] == "COMMITTED" and outcome["code"] == "already_installed", outcome
    state = StateStore(cfg.data_dir).load()
    assert state.active == "A" and state.slots["B"] is None
