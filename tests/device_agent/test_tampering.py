"""Tampering over the wire: each attack is refused with its own event code and the active model is untouched.

The fleet side is real (TUF repository, HTTP server with fault hooks, mosquitto); the agent runs
in this process with its real threads. Every test starts from v1 committed and serving.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from edgeship.device_agent.config import load_config
from edgeship.device_agent.daemon import Agent
from edgeship.device_agent.store import StateStore
from edgeship.fleet.tuf_repo import Expiry, package_custom
from edgeship.runtime.package import generate_key, read_manifest
from tests.agent_models import PackageSpec, build_package, sample_inputs

pytestmark = pytest.mark.py310


@pytest.fixture
def agent(fleet: Any, fleet_config: Any, packages: Any) -> Iterator[Agent]:
    started = time.time()
    agent = Agent(load_config(fleet_config()))
    agent.start()
    fleet.wait_online("dev-1", since=started)
    dep = fleet.deploy(fleet.publish(packages(version=1)))
    assert fleet.wait_end(dep)["state"] == "COMMITTED"
    yield agent
    agent.stop()


def refused(fleet: Any, agent: Agent, target_path: str, code: str) -> dict[str, Any]:
    """Deploy ``target_path``; assert it ends FAILED with ``code`` and v1 still serves from slot A."""
    dep = fleet.deploy(target_path)
    end = fleet.wait_end(dep)
    assert end["state"] == "FAILED" and end["code"] == code, fleet.events(deployment_id=dep)
    error = fleet.wait_event("ota.error", deployment_id=dep)
    assert error["code"] == code and error["message"]
    state = StateStore(agent.config.data_dir).load()
    assert state.active == "A" and state.slots["A"] is not None and state.slots["A"].version == 1
    assert state.slots["B"] is None and not (agent.config.data_dir / "slots" / "B").exists()
    assert agent.infer({"x": sample_inputs(2)})["logits"].shape == (2, 3)
    return end


def test_a_corrupted_download_is_refused(fleet, agent, packages):
    target = fleet.publish(packages(version=2))
    fleet.server.corrupt(".v2.edgepkg", 5000, times=None)
    refused(fleet, agent, target, "hash_mismatch")
    fleet.server.clear()
    assert fleet.wait_end(fleet.deploy(target))["state"] == "COMMITTED"  # the next, clean download works


def test_a_file_swapped_on_the_server_is_refused(fleet, agent, packages, tmp_path):
    target = fleet.publish(packages(version=2))
    served = next((fleet.repo.targets_dir / "sensor-net/linux-x86_64/fp32").glob("*.v2.edgepkg"))
    served.write_bytes(packages(version=3).read_bytes())  # a genuine, signed package, but not the listed one
    refused(fleet, agent, target, "hash_mismatch")


def test_a_package_signed_by_an_unknown_key_is_refused(fleet, agent, tmp_path):
    stranger = build_package(tmp_path / "stranger.edgepkg", generate_key(), PackageSpec(version=2))
    verified = read_manifest(stranger, check_signature=False)
    fleet.repo.add_target("sensor-net/stranger.edgepkg", stranger, package_custom(verified))
    refused(fleet, agent, "sensor-net/stranger.edgepkg", "untrusted_key")


def test_a_package_the_metadata_does_not_list_is_refused(fleet, agent):
    refused(fleet, agent, "sensor-net/linux-x86_64/fp32/v9.edgepkg", "target_not_listed")


def test_metadata_mixed_with_another_package_is_refused(fleet, agent, packages):
    """TUF lists package v3's bytes, but with v2's name/version/digest in its custom metadata."""
    verified_v2 = read_manifest(packages(version=2), check_signature=False)
    fleet.repo.add_target("sensor-net/mixed.edgepkg", packages(version=3), package_custom(verified_v2))
    refused(fleet, agent, "sensor-net/mixed.edgepkg", "metadata_mismatch")


def test_an_older_version_is_refused(fleet, agent, packages):
    dep = fleet.deploy(fleet.publish(packages(version=2)))
    assert fleet.wait_end(dep)["state"] == "COMMITTED"
    dep = fleet.deploy(fleet.publish(packages(version=1)))
    end = fleet.wait_end(dep)
    assert end["state"] == "FAILED" and end["code"] == "version_not_newer"
    assert StateStore(agent.config.data_dir).load().active_record.version == 2


def test_a_package_for_another_target_is_refused(fleet, agent, packages):
    refused(fleet, agent, fleet.publish(packages(version=2, target="jetson-orin-nano")), "wrong_target")


def test_replayed_older_metadata_is_refused(fleet, agent, packages):
    old_timestamp = (fleet.repo.metadata_dir / "timestamp.json").read_bytes()
    target = fleet.publish(packages(version=2))  # the device will trust the newer timestamp ...
    assert fleet.wait_end(fleet.deploy(target))["state"] == "COMMITTED"
    newer = fleet.publish(packages(version=3))
    fleet.server.serve_stale("metadata/timestamp.json", old_timestamp)  # ... and is then served the old one
    dep = fleet.deploy(newer)
    end = fleet.wait_end(dep)
    assert end["state"] == "FAILED" and end["code"] == "metadata_rollback", fleet.events(deployment_id=dep)
    assert StateStore(agent.config.data_dir).load().active_record.version == 2


@pytest.mark.parametrize("fleet", [Expiry(timestamp=timedelta(seconds=3))], indirect=True)
def test_expired_metadata_is_refused_and_the_device_recovers_when_the_fleet_refreshes(fleet, agent, packages):
    target = fleet.publish(packages(version=2))
    time.sleep(3.5)  # the fleet stops refreshing: its timestamp expires while the device is "offline"
    refused(fleet, agent, target, "metadata_expired")
    fleet.repo.refresh_timestamp()
    dep = fleet.deploy(target)
    assert fleet.wait_end(dep)["state"] == "COMMITTED"  # no reboot, no manual step


@pytest.mark.parametrize(
    ("requirements", "code"),
    [
        ({"format": "onnx", "min_memory_mib": 10**9}, "insufficient_memory"),
        ({"format": "coreml", "runtime": {"name": "coreml", "version": "8"}}, "unsupported"),
        ({"format": "onnx", "runtime": {"name": "onnxruntime", "version": "99.0"}}, "unsupported"),
    ],
)
def test_a_package_this_device_cannot_run_is_refused_before_download(fleet, agent, packages, requirements, code):
    verified = read_manifest(packages(version=2), check_signature=False)
    custom = package_custom(verified)
    custom["edgeship"]["requirements"] = requirements
    fleet.repo.add_target("sensor-net/needs-more.edgepkg", packages(version=2), custom)
    refused(fleet, agent, "sensor-net/needs-more.edgepkg", code)
    assert not any(r.path.endswith("needs-more.edgepkg") for r in fleet.server.requests)  # never downloaded
