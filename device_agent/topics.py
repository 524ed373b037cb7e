"""MQTT topic names of the edgeship protocol, version 1 (docs/protocol.md).

Per device, under ``edgeship/v1/<fleet>/<device>/``:

* ``status``: retained; ``online`` birth message from the agent, ``offline`` last will.
* ``telemetry``: QoS 1, device -> fleet, every telemetry interval.
* ``events``: QoS 1, device -> fleet, OTA transitions and errors.
* ``cmd``: QoS 1, fleet -> device, persistent session.

The broker's ACL lets a device write only its own status/telemetry/events and read only
its own cmd (``acl_patterns`` gives the mosquitto pattern lines). The fleet and the
simulated devices import this module, so both sides build topics from one definition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from edgeship.errors import ConfigError

ROOT = "edgeship/v1"
CHANNELS = ("status", "telemetry", "events", "cmd")
DEVICE_CHANNELS = ("status", "telemetry", "events")
"""What a device publishes; ``cmd`` is what it receives."""

_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_id(kind: str, value: str) -> str:
    """Return ``value`` if it can be a fleet or device id in a topic; raise ``ConfigError`` naming ``kind`` otherwise.

    Ids are 1-64 characters of letters, digits, ``_ . -``, starting with a letter or digit, so
    they can never hold MQTT wildcards (``+ #``), a level separator (``/``) or ``$``.
    """
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ConfigError(
            f"{kind} {value!r} is not a valid id: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit"
        )
    return value


def device_topic(fleet: str, device: str, channel: str) -> str:
    """``edgeship/v1/<fleet>/<device>/<channel>``; raises ``ConfigError`` for a bad id or unknown channel."""
    if channel not in CHANNELS:
        raise ConfigError(f"unknown channel {channel!r}; channels are {', '.join(CHANNELS)}")
    return f"{ROOT}/{check_id('fleet id', fleet)}/{check_id('device id', device)}/{channel}"


def fleet_filter(fleet: str, channel: str) -> str:
    """Subscription filter for one channel of every device of a fleet: ``edgeship/v1/<fleet>/+/<channel>``."""
    if channel not in CHANNELS:
        raise ConfigError(f"unknown channel {channel!r}; channels are {', '.join(CHANNELS)}")
    return f"{ROOT}/{check_id('fleet id', fleet)}/+/{channel}"


def shared_filter(group: str, fleet: str, channel: str) -> str:
    """MQTT 5 shared subscription over every device of a fleet: ``$share/<group>/edgeship/v1/<fleet>/+/<channel>``."""
    return f"$share/{check_id('share group', group)}/{fleet_filter(fleet, channel)}"


@dataclass(frozen=True)
class TopicParts:
    fleet: str
    device: str
    channel: str


def parse_topic(topic: str) -> TopicParts | None:
    """Split an edgeship topic into fleet, device and channel; None if it is not one."""
    parts = topic.split("/")
    if len(parts) != 5 or f"{parts[0]}/{parts[1]}" != ROOT or parts[4] not in CHANNELS:
        return None
    if not _ID.fullmatch(parts[2]) or not _ID.fullmatch(parts[3]):
        return None
    return TopicParts(parts[2], parts[3], parts[4])


def acl_patterns(fleet: str) -> list[str]:
    """mosquitto ACL ``pattern`` lines for device accounts whose username is the device id.

    A device may write its own status/telemetry/events and read its own cmd, nothing else.
    mosquitto grants every SUBSCRIBE and filters delivery by these lines, so a device that
    subscribes to another device's cmd topic simply receives nothing.
    """
    base = f"{ROOT}/{check_id('fleet id', fleet)}/%u"
    return [f"pattern write {base}/{ch}" for ch in DEVICE_CHANNELS] + [f"pattern read {base}/cmd"]
