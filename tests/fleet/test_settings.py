"""fleet.yaml: typed settings, defaults derived from data_dir, one error line naming a bad key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgeship.errors import ConfigError
from edgeship.fleet.settings import EXAMPLE, load_settings, parse_duration, settings_from_dict
from tests.fleet.fleet_fixtures import write_public_key
from tests.package_fixtures import Publisher


@pytest.fixture
def key(tmp_path: Path, publisher: Publisher) -> Path:
    return write_public_key(publisher, tmp_path / "keys" / "edgeship.pub")


def write(tmp_path: Path, data: dict) -> Path:  # type: ignore[type-arg]
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def minimal(key: Path) -> dict:  # type: ignore[type-arg]
    return {"fleet_id": "f1", "data_dir": "data", "signing_keys": [str(key)]}


def test_defaults_derive_from_data_dir_relative_to_the_file(tmp_path: Path, key: Path):
    settings = load_settings(write(tmp_path, minimal(key)))
    data = tmp_path / "data"
    assert settings.data_dir == data
    assert settings.database_url == f"sqlite:///{data / 'fleet.db'}"
    assert settings.tuf_dir == data / "tuf" / "repo"
    assert settings.tuf_keys_dir == data / "tuf" / "keys"
    assert settings.http.port == 8480
    assert settings.metadata_url == "http://127.0.0.1:8480/tuf/metadata/"
    assert settings.targets_url == "http://127.0.0.1:8480/tuf/targets/"
    assert settings.broker_username == "fleet-f1"
    assert settings.broker.device_url == settings.broker.url
    assert (settings.scheduler.tick_s, settings.scheduler.lease_s, settings.scheduler.resend_after_s) == (
        1.0,
        15.0,
        30.0,
    )
    assert settings.ingest.share_group == "ingest"
    assert settings.tuf.expiry().timestamp.total_seconds() == 86400


def test_the_annotated_example_loads_once_its_key_exists(tmp_path: Path, key: Path):
    data = yaml.safe_load(EXAMPLE)
    data["signing_keys"] = [str(key)]
    for name in ("password_file", "device_ca"):
        path = tmp_path / name
        path.write_text("x")
        data["broker"][name] = str(path)
    settings = settings_from_dict(data, base=tmp_path)
    assert settings.http.base_url == "https://fleet.example.com"
    assert settings.tuf.refresh_within == 6 * 3600
    assert settings.broker.device_url == "mqtts://broker.example.com:8883"
    assert settings.broker.secret() == "x"


def test_unknown_key_is_named_with_the_nearest_known_one(tmp_path: Path, key: Path):
    data = {**minimal(key), "scheduler": {"tick": 2}}
    with pytest.raises(ConfigError, match=r"scheduler\.tick: unknown setting; did you mean scheduler\.tick_s\?"):
        load_settings(write(tmp_path, data))
    with pytest.raises(ConfigError, match=r"^fleet: unknown setting"):
        load_settings(write(tmp_path, {**minimal(key), "fleet": "x"}))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"http": {"port": "8480"}}, r"http\.port: expected an integer"),
        ({"http": {"port": 70000}}, r"http\.port: 70000 is not a TCP port"),
        ({"fleet_id": "has/slash"}, r"fleet_id 'has/slash' is not a valid id"),
        ({"database_url": "mysql://x/y"}, r"database_url: use sqlite"),
        ({"signing_keys": ["missing.pub"]}, r"signing_keys\[0\]: .*missing.pub does not exist"),
        ({"broker": {"url": "http://x"}}, r"broker\.url: use mqtt://"),
        ({"broker": {"password": "a", "password_file": "f"}}, r"broker\.password and broker\.password_file: set one"),
        ({"broker": {"password_file": "f"}}, r"broker\.password_file: .* does not exist"),
        ({"tuf": {"timestamp_expiry": "1h", "refresh_within": "2h"}}, r"tuf\.refresh_within .* must be shorter"),
        ({"tuf": {"snapshot_expiry": "7 fortnights"}}, r"tuf\.snapshot_expiry: '7 fortnights' is not a duration"),
        ({"scheduler": {"tick_s": 20, "lease_s": 15}}, r"scheduler\.lease_s \(15\) must be longer"),
        ({"ingest": {"workers": 0}}, r"ingest\.workers: must be at least 1"),
        ({"http": None}, None),
    ],
)
def test_bad_values_are_one_line_naming_the_key(tmp_path: Path, key: Path, change: dict, message: str | None):  # type: ignore[type-arg]
    path = write(tmp_path, {**minimal(key), **change})
    if message is None:
        load_settings(path)
        return
    with pytest.raises(ConfigError, match=message) as info:
        load_settings(path)
    assert "\n" not in str(info.value)


def test_missing_required_settings(tmp_path: Path, key: Path):
    for required in ("fleet_id", "data_dir", "signing_keys"):
        data = minimal(key)
        del data[required]
        with pytest.raises(ConfigError, match=f"^{required}: required setting is missing"):
            load_settings(write(tmp_path, data))


def test_database_urls(tmp_path: Path, key: Path):
    relative = load_settings(write(tmp_path, {**minimal(key), "database_url": "sqlite:///state/fleet.db"}))
    assert relative.database_url == f"sqlite:///{tmp_path / 'state' / 'fleet.db'}"
    plain = load_settings(write(tmp_path, {**minimal(key), "database_url": "postgresql://u@h/db"}))
    assert plain.database_url == "postgresql+psycopg://u@h/db"


def test_durations():
    assert parse_duration("90s") == 90
    assert parse_duration("10m") == 600
    assert parse_duration("1.5h") == 5400
    assert parse_duration("7d") == 7 * 86400
    assert parse_duration("2w") == 14 * 86400
    assert parse_duration(12) == 12.0
    for bad in ("-1", "1y", "", "h", True, -3):
        with pytest.raises(ConfigError):
            parse_duration(bad)  # type: ignore[arg-type]


def test_not_a_file_or_not_yaml(tmp_path: Path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("fleet_id: [unclosed")
    with pytest.raises(ConfigError, match="is not valid YAML at line"):
        load_settings(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_settings(bad)
