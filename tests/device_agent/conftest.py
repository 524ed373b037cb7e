"""Fixtures of the agent tests: a publisher key, real signed packages, agent configs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from edgeship.runtime.package import load_private_key, write_keypair
from tests.agent_models import PackageSpec, build_package


@dataclass(frozen=True)
class Publisher:
    key_path: Path
    pub_path: Path

    @property
    def key(self) -> Any:
        return load_private_key(self.key_path)


@pytest.fixture(scope="session")
def publisher_files(tmp_path_factory: pytest.TempPathFactory) -> Publisher:
    root = tmp_path_factory.mktemp("publisher")
    key, pub = write_keypair(root, "publisher")
    return Publisher(key, pub)


@pytest.fixture(scope="session")
def packages(tmp_path_factory: pytest.TempPathFactory, publisher_files: Publisher) -> Callable[..., Path]:
    """``packages(version=2, kind="slow")``: a signed package file, built once per spec per session."""
    root = tmp_path_factory.mktemp("packages")
    built: dict[PackageSpec, Path] = {}
    key = publisher_files.key

    def get(**fields: Any) -> Path:
        spec = PackageSpec(**fields)
        if spec not in built:
            out = root / f"{spec.name}-{spec.target}-{spec.kind}-v{spec.version}-p{spec.padding_mib}.edgepkg"
            built[spec] = build_package(out, key, spec)
        return built[spec]

    return get


@pytest.fixture
def agent_config(tmp_path: Path, publisher_files: Publisher) -> Callable[..., Path]:
    """``agent_config(**sections)`` writes an agent.yaml for device dev-1 of fleet f1 and returns its path."""

    def write(name: str = "agent.yaml", **overrides: Any) -> Path:
        data: dict[str, Any] = {
            "device_id": "dev-1",
            "fleet_id": "f1",
            "target": "linux-x86_64",
            "data_dir": str(tmp_path / "agent-data"),
            "updates": {"signing_keys": [str(publisher_files.pub_path)]},
            "telemetry": {"interval_s": 0.5},
            "serve": {"port": 0, "threads": 1},
            "ota": {"health_window_s": 0.5, "validation_runs": 5},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key] = {**data[key], **value}
            else:
                data[key] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return write


@pytest.fixture
def fleet(request: pytest.FixtureRequest, tmp_path: Path, mosquitto: Any, publisher_files: Publisher) -> Any:
    """A real TUF repository served over HTTP, and the fleet's MQTT client on the test's broker.

    Parametrize indirectly with an ``Expiry`` for short-lived metadata."""
    from edgeship.fleet.tuf_repo import Expiry, TufRepository
    from edgeship.runtime.package import TrustedKeys, load_public_key
    from tests.device_agent.fleet_side import FleetSide
    from tests.fleet.faulty_server import serve_faulty

    expiry = getattr(request, "param", None) or Expiry()
    repo = TufRepository.create(tmp_path / "repo", keys_dir=tmp_path / "repo-keys", expiry=expiry)
    # The real static server with fault hooks that stay idle unless a test arms them.
    server = serve_faulty(tmp_path / "repo")
    side = FleetSide(mosquitto, repo, server, TrustedKeys.of([load_public_key(publisher_files.pub_path)]))
    (tmp_path / "root.json").write_bytes(repo.root_bytes())
    yield side
    side.close()
    server.stop()


@pytest.fixture
def fleet_config(agent_config: Callable[..., Path], fleet: Any, tmp_path: Path) -> Callable[..., Path]:
    """``fleet_config(**overrides)``: an agent.yaml that talks to the ``fleet`` fixture's broker and repository."""

    def write(**overrides: Any) -> Path:
        sections: dict[str, Any] = {
            "broker": {"url": f"mqtt://{fleet.broker.host}:{fleet.broker.port}", "keepalive_s": 5},
            "updates": {
                "metadata_url": fleet.metadata_url,
                "targets_url": fleet.targets_url,
                "root": str(tmp_path / "root.json"),
            },
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(sections.get(key), dict):
                sections[key] = {**sections[key], **value}
            else:
                sections[key] = value
        updates = {**sections.pop("updates")}
        return agent_config(**sections, updates=updates)

    return write
