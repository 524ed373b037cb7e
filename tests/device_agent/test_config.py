"""agent.yaml: every mistake is one line naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeship.device_agent.config import EXAMPLE, config_from_dict, load_config
from edgeship.errors import ConfigError

pytestmark = pytest.mark.py310


def base(tmp_path: Path) -> dict:
    key = tmp_path / "edgeship.pub"
    key.write_text("not checked here")
    return {
        "device_id": "dev-1",
        "fleet_id": "f1",
        "target": "linux-x86_64",
        "data_dir": "data",
        "updates": {"signing_keys": [str(key)]},
    }


def test_minimal_config_gets_defaults_and_resolves_paths(tmp_path):
    cfg = config_from_dict(base(tmp_path), base=tmp_path)
    assert cfg.data_dir == tmp_path / "data"
    assert cfg.broker is None and cfg.telemetry.interval_s == 10.0 and cfg.serve.host == "127.0.0.1"
    assert cfg.accepted_targets == ("linux-x86_64",)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"devce_id": "x"}, "devce_id: unknown setting; did you mean device_id"),
        ({"device_id": None}, "device_id: required setting is missing"),
        ({"device_id": "a/b"}, "device_id 'a/b' is not a valid id"),
        ({"broker": {"url": "http://x"}}, "broker.url: use mqtt://"),
        ({"broker": {"urll": "mqtt://x"}}, "broker.urll: unknown setting; did you mean broker.url"),
        ({"broker": {"keepalive_s": "30"}}, "broker.keepalive_s: expected an integer"),
        ({"broker": {"ca_file": "ca.pem", "url": "mqtts://h"}}, "broker.ca_file: .* does not exist"),
        ({"broker": {"cert_file": "c.pem"}}, "cert_file and broker.key_file"),
        ({"telemetry": {"interval_s": 0}}, "telemetry.interval_s"),
        ({"telemetry": 5}, "telemetry: must be a mapping"),
        ({"serve": {"port": 70000}}, "serve.port"),
        ({"updates": {"signing_keys": []}}, "updates.signing_keys: at least one"),
        ({"updates": {"signing_keys": ["missing.pub"]}}, "updates.signing_keys: .*missing.pub does not exist"),
        ({"updates": {"metadata_url": "http://x/"}}, "metadata_url, targets_url and root go together"),
        ({"ota": {"max_error_rate": True}}, "ota.max_error_rate: expected a number, got a boolean"),
    ],
)
def test_bad_settings_are_named(tmp_path, change, says):
    data = base(tmp_path)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    with pytest.raises(ConfigError, match=says):
        config_from_dict(data, base=tmp_path)


def test_yaml_errors_name_the_line(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("device_id: a\n  bad: [\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_the_printed_example_is_a_valid_config_once_its_files_exist(tmp_path):
    text = EXAMPLE.replace("/etc/edgeship/", "").replace("/var/lib/edgeship-agent", "data")
    for name in ("mqtt-password", "ca.pem", "root.json", "edgeship.pub"):
        (tmp_path / name).write_text("x")
    (tmp_path / "agent.yaml").write_text(text)
    cfg = load_config(tmp_path / "agent.yaml")
    assert cfg.broker is not None and cfg.broker.tls and cfg.broker.port == 8883
    assert cfg.broker.secret() == "x" and cfg.updates.root == tmp_path / "root.json"
