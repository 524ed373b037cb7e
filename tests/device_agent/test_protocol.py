"""Protocol messages: what each side builds parses on the other; anything else is a ProtocolError."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgeship.device_agent import protocol, topics
from edgeship.device_agent.protocol import ProtocolError
from edgeship.errors import ConfigError

pytestmark = pytest.mark.py310


def test_deploy_command_round_trips():
    cmd = protocol.deploy_command(
        "c1",
        "d1",
        "m/linux-x86_64/fp32/v2.edgepkg",
        1.7e9,
        expires_at=1.8e9,
        health={"window_s": 10, "max_error_rate": 0.01},
    )
    assert protocol.parse(protocol.encode(cmd), expected=protocol.COMMAND_TYPES) == cmd


def test_event_and_status_built_by_the_device_parse_on_the_fleet():
    model = {
        "name": "m",
        "version": 2,
        "slot": "A",
        "digest": "ab" * 32,
        "target": "t",
        "format": "onnx",
        "precision": "fp32",
    }
    ev = protocol.event(
        "f1", "d1", 7, 1.7e9, "ota.transition", deployment_id="d", state="VERIFYING", previous_state="DOWNLOADING"
    )
    st_ = protocol.status("f1", "d1", "online", 1.7e9, agent_version="0.1", model=model)
    for message in (ev, st_):
        assert protocol.parse(protocol.encode(message), expected=protocol.DEVICE_TYPES) == message


@pytest.mark.parametrize(
    ("payload", "says"),
    [
        (b"\xff\xfe", "not UTF-8"),
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"schema": 2, "type": "deploy"}', "schema 2 is not supported"),
        (b'{"schema": 1, "type": "reboot"}', "unknown message type"),
        (b'{"schema": 1, "type": "deploy", "id": "c", "issued_at": 1}', "deployment_id' is missing"),
        (b'{"schema": 1, "type": "report", "id": "c", "issued_at": NaN}', "not JSON"),
        (b'{"schema": 1, "type": "report", "id": "c", "issued_at": 1, "extra": 1}', "unknown field 'extra'"),
        (b'{"schema": 1, "type": "report", "id": 5, "issued_at": 1}', "field 'id' must be a string"),
        (
            b'{"schema": 1, "type": "status", "fleet": "f", "device": "d", "ts": 1, "state": "online"}',
            "not expected here",
        ),
        (b" " * (protocol.MAX_PAYLOAD + 1), "over the"),
    ],
)
def test_malformed_commands_are_refused_with_the_reason(payload, says):
    with pytest.raises(ProtocolError, match=says):
        protocol.parse(payload, expected=protocol.COMMAND_TYPES)


def test_nested_fields_are_checked():
    cmd = protocol.deploy_command("c1", "d1", "p", 1.0)
    cmd["health"] = {"max_error_rate": 2.0}
    with pytest.raises(ProtocolError, match=r"health.max_error_rate"):
        protocol.parse(protocol.encode(cmd))
    cmd["health"] = {"windows_s": 3}
    with pytest.raises(ProtocolError, match="unknown field 'windows_s' in health"):
        protocol.parse(protocol.encode(cmd))


@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_but_protocol_error(data):
    try:
        protocol.parse(data)
    except ProtocolError:
        pass


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c) | st.dictionaries(st.text(max_size=8), c),
        max_leaves=20,
    )
)
def test_random_json_never_raises_anything_but_protocol_error(value):
    message = {
        "schema": 1,
        "type": "deploy",
        "id": "c",
        "issued_at": 1,
        "deployment_id": "d",
        "target_path": "p",
        "health": value,
    }
    try:
        protocol.parse(json.dumps(message).encode())
    except ProtocolError:
        pass


def test_topics_are_built_and_parsed_from_one_definition():
    topic = topics.device_topic("f1", "dev-1", "telemetry")
    assert topic == "edgeship/v1/f1/dev-1/telemetry"
    assert topics.parse_topic(topic) == topics.TopicParts("f1", "dev-1", "telemetry")
    assert topics.parse_topic("edgeship/v1/f1/dev-1/other") is None
    assert topics.shared_filter("ingest", "f1", "events") == "$share/ingest/edgeship/v1/f1/+/events"


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "dev 1", "$SYS", "x" * 65])
def test_ids_that_could_escape_their_topic_are_refused(bad):
    with pytest.raises(ConfigError, match="not a valid id"):
        topics.device_topic("f1", bad, "cmd")


def test_acl_patterns_limit_a_device_to_its_own_topics():
    assert topics.acl_patterns("f1") == [
        "pattern write edgeship/v1/f1/%u/status",
        "pattern write edgeship/v1/f1/%u/telemetry",
        "pattern write edgeship/v1/f1/%u/events",
        "pattern read edgeship/v1/f1/%u/cmd",
    ]
