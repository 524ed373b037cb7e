"""The agent driven by a fleet: real mosquitto, a real TUF repository over HTTP, real models.

Each test runs an ``Agent`` in this process (its real threads, broker connection, HTTP
endpoint and child-process validation) and plays the fleet with ``FleetSide``.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeship.device_agent.config import load_config
from edgeship.device_agent.daemon import Agent
from edgeship.device_agent.store import StateStore
from tests.agent_models import expected_top1, sample_inputs

pytestmark = pytest.mark.py310


@pytest.fixture
def start_agent(fleet_config: Any, fleet: Any) -> Iterator[Any]:
    agents: list[Agent] = []

    def start(**overrides: Any) -> Agent:
        started = time.time()
        agent = Agent(load_config(fleet_config(**overrides)))
        agent.start()
        agents.append(agent)
        fleet.wait_online(agent.config.device_id, since=started)
        return agent

    yield start
    for agent in agents:
        agent.stop()


def http(agent: Agent, path: str, body: Any = None) -> tuple[int, dict[str, Any], dict[str, str]]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{agent.url}{path}", data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def install(fleet: Any, packages: Any, version: int, **spec: Any) -> None:
    dep = fleet.deploy(fleet.publish(packages(version=version, **spec)))
    end = fleet.wait_end(dep)
    assert end["state"] == "COMMITTED", fleet.events(deployment_id=dep)


def test_first_deployment_goes_through_every_state_and_serves(fleet, packages, start_agent):
    agent = start_agent()
    assert http(agent, "/v1/health")[0] == 503
    target = fleet.publish(packages(version=1))
    dep = fleet.deploy(target)
    end = fleet.wait_end(dep)
    assert end["state"] == "COMMITTED", fleet.events(deployment_id=dep)
    assert fleet.states(dep) == [
        "DOWNLOADING",
        "VERIFYING",
        "STAGED",
        "VALIDATING",
        "ACTIVATING",
        "HEALTH_CHECK",
        "COMMITTED",
    ]

    x = sample_inputs(8, seed=3)
    status, body, headers = http(agent, "/v1/infer", {"inputs": {"x": x.tolist()}})
    assert status == 200 and headers["X-Edgeship-Model"] == "sensor-net/1/A"
    assert np.array_equal(np.asarray(body["outputs"]["logits"]).argmax(1), expected_top1(1, x))
    # Telemetry names the model and counts the request; sequence numbers only grow.
    tele = fleet.wait(
        lambda: [t for t in fleet.messages("telemetry") if t["model"] and t["requests"]], "telemetry with requests"
    )
    assert tele[0]["model"]["version"] == 1 and tele[0]["model"]["slot"] == "A"
    seqs = [m["seq"] for m in fleet.messages("telemetry") + fleet.events()]
    assert len(seqs) == len(set(seqs))


def test_update_swaps_the_model_and_a_bad_one_never_serves(fleet, packages, start_agent):
    agent = start_agent()
    install(fleet, packages, 1)
    install(fleet, packages, 2)
    assert http(agent, "/v1/health")[1]["model"]["version"] == 2
    dep = fleet.deploy(fleet.publish(packages(version=3, kind="bad_golden")))
    end = fleet.wait_end(dep)
    assert end["state"] == "FAILED" and end["code"] == "golden_failed"
    error = fleet.wait_event("ota.error", deployment_id=dep)
    assert "golden" in error["message"]
    assert http(agent, "/v1/health")[1]["model"]["version"] == 2
    state = StateStore(agent.config.data_dir).load()
    assert state.slots[state.inactive_slot()] is None  # the failed package was discarded


def load(agent: Agent, stop: threading.Event, failures: list[str], served: list[str]) -> None:
    x = sample_inputs(1, seed=9).tolist()
    while not stop.is_set():
        status, body, headers = http(agent, "/v1/infer", {"inputs": x})
        if status != 200:
            failures.append(f"{status} {body}")
        else:
            served.append(headers["X-Edgeship-Model"])


def test_a_slow_model_is_rolled_back_by_the_health_window_and_quarantined(fleet, packages, start_agent):
    agent = start_agent(ota={"health_window_s": 3.0, "max_latency_ratio": 3.0})
    install(fleet, packages, 1)
    stop, failures, served = threading.Event(), [], []
    worker = threading.Thread(target=load, args=(agent, stop, failures, served))
    worker.start()
    try:
        fleet.wait(lambda: len(served) > 50, "traffic on v1")
        dep = fleet.deploy(fleet.publish(packages(version=2, kind="slow", slow_layers=24)))
        end = fleet.wait_end(dep)
    finally:
        stop.set()
        worker.join()
    assert end["state"] == "ROLLED_BACK" and end["code"] == "latency", fleet.events(deployment_id=dep)
    assert failures == []
    assert "sensor-net/2/B" in served and served[-1] == "sensor-net/1/A"
    state = StateStore(agent.config.data_dir).load()
    assert state.active == "A" and state.is_quarantined("sensor-net", 2) is not None
    # The same version is never installed again, even under another deployment id ...
    again = fleet.deploy(fleet.publish(packages(version=2, kind="slow", slow_layers=24)))
    end = fleet.wait_end(again)
    assert end["state"] == "FAILED" and end["code"] == "quarantined"
    # ... until the fleet clears it.
    fleet.send("dev-1", {"schema": 1, "type": "clear_quarantine", "id": "cq1", "issued_at": time.time(), "all": True})
    fleet.wait_event("ota.transition", code="quarantine_cleared")
    assert StateStore(agent.config.data_dir).load().quarantine == ()


def test_shadow_phase_refuses_a_model_that_disagrees_on_live_traffic(fleet, packages, start_agent):
    agent = start_agent()
    install(fleet, packages, 1)
    stop, failures, served = threading.Event(), [], []
    worker = threading.Thread(target=load, args=(agent, stop, failures, served))
    worker.start()
    try:
        target = fleet.publish(packages(version=2, kind="disagreeing"))
        dep = fleet.deploy(target, shadow={"fraction": 1.0, "min_requests": 30, "max_s": 60, "min_agreement": 0.9})
        end = fleet.wait_end(dep)
    finally:
        stop.set()
        worker.join()
    assert end["state"] == "FAILED" and end["code"] == "shadow_disagreement", fleet.events(deployment_id=dep)
    assert "SHADOW" in fleet.states(dep) and failures == [] and set(served) == {"sensor-net/1/A"}


@pytest.mark.parametrize(
    ("command", "code"),
    [
        (b"not json at all", "malformed"),
        (b'{"schema": 1, "type": "selfdestruct", "id": "x", "issued_at": 1}', "malformed"),
        (b'{"schema": 1, "type": "deploy", "id": "x", "issued_at": 1}', "malformed"),
    ],
)
def test_bad_commands_become_rejection_events_and_the_agent_keeps_serving(fleet, packages, start_agent, command, code):
    agent = start_agent()
    install(fleet, packages, 1)
    fleet.send("dev-1", command)
    event = fleet.wait_event("cmd.rejected")
    assert event["code"] == code and event["message"]
    assert http(agent, "/v1/health")[0] == 200


def test_stale_and_duplicate_commands_are_not_executed(fleet, packages, start_agent):
    start_agent()
    target = fleet.publish(packages(version=1))
    stale = fleet.deploy(target, expires_at=time.time() - 1)
    assert fleet.wait_event("cmd.rejected", deployment_id=stale)["code"] == "expired"
    dep = fleet.deploy(target)
    fleet.wait_end(dep)
    fleet.deploy(target, deployment_id=dep)  # the same deployment again
    fleet.wait_event("ota.transition", deployment_id=dep, code="duplicate")
    assert fleet.states(dep).count("DOWNLOADING") == 1


def test_a_command_queued_while_the_device_was_offline_arrives_when_it_returns(fleet, packages, fleet_config):
    cfg = load_config(fleet_config())
    agent = Agent(cfg)
    agent.start()
    fleet.wait_online("dev-1")
    agent.stop()  # the persistent session stays on the broker
    dep = fleet.deploy(fleet.publish(packages(version=1)))
    agent = Agent(cfg)
    agent.start()
    try:
        assert fleet.wait_end(dep)["state"] == "COMMITTED"
    finally:
        agent.stop()


def test_downgrade_only_with_the_fleets_signed_permission(fleet, packages, start_agent):
    agent = start_agent()
    install(fleet, packages, 1)
    install(fleet, packages, 2)
    # v1 listed without permission: refused.
    target_v1 = fleet.publish(packages(version=1))
    end = fleet.wait_end(fleet.deploy(target_v1))
    assert end["state"] == "FAILED" and end["code"] == "version_not_newer"
    # The fleet signs a downgrade from v2 to v1: accepted.
    fleet.publish(packages(version=1), downgrade_from=(2,))
    end = fleet.wait_end(fleet.deploy(target_v1))
    assert end["state"] == "COMMITTED"
    assert http(agent, "/v1/health")[1]["model"]["version"] == 1


def test_cancel_stops_a_deployment_before_activation(fleet, packages, start_agent):
    agent = start_agent(updates={"bandwidth_kib_s": 1})
    install(fleet, packages, 1)
    # 1 MiB of padding at 1 KiB/s: a download that takes minutes, so the cancel always finds it running (the
    # bare package is a few KiB, which a loaded machine could finish before the cancel arrived).
    dep = fleet.deploy(fleet.publish(packages(version=2, padding_mib=1)))
    fleet.wait(lambda: "DOWNLOADING" in fleet.states(dep), "download start")
    fleet.send("dev-1", {"schema": 1, "type": "cancel", "id": "c9", "issued_at": time.time(), "deployment_id": dep})
    end = fleet.wait_end(dep)
    assert end["state"] == "FAILED" and end["code"] == "cancelled"
    assert http(agent, "/v1/health")[1]["model"]["version"] == 1


def test_local_install_through_the_running_agents_endpoint(fleet, packages, start_agent):
    agent = start_agent()
    token = (Path(agent.config.data_dir) / "admin.token").read_text()
    request = urllib.request.Request(
        f"{agent.url}/v1/admin/install",
        data=json.dumps({"path": str(packages(version=1))}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as response:
        assert json.loads(response.read())["state"] == "COMMITTED"
    assert http(agent, "/v1/health")[1]["model"]["version"] == 1
    bad = urllib.request.Request(f"{agent.url}/v1/admin/install", data=b"{}", headers={"Authorization": "Bearer wrong"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(bad, timeout=10)
    assert err.value.code == 401


def test_no_request_fails_while_an_update_downloads_validates_and_switches(fleet, packages, start_agent):
    agent = start_agent(updates={"bandwidth_kib_s": 4096})
    install(fleet, packages, 1)
    stop, failures, served = threading.Event(), [], []
    workers = [threading.Thread(target=load, args=(agent, stop, failures, served)) for _ in range(3)]
    for w in workers:
        w.start()
    try:
        fleet.wait(lambda: len(served) > 30, "traffic on v1")
        dep = fleet.deploy(fleet.publish(packages(version=2, padding_mib=8)))
        end = fleet.wait_end(dep)
        fleet.wait(lambda: served[-1] == "sensor-net/2/B", "traffic on v2")
    finally:
        stop.set()
        for w in workers:
            w.join()
    assert end["state"] == "COMMITTED"
    assert failures == []
    switch = served.index("sensor-net/2/B")
    assert set(served[:switch]) == {"sensor-net/1/A"} and len(served) - switch > 0
