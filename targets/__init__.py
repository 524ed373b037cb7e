"""edgeship.targets: device profiles (format, precisions, runtime and version, quirks). Imports nothing of ours.

The compiler asks this package what a kind of device runs::

    from edgeship import targets
    profile = targets.get("jetson-orin-nano")   # TargetProfile; UnknownTargetError suggests near names
    profile.default_precision                   # "fp16"

Built-in profiles live in ``builtin.py`` (where each fact comes from: docs/targets.md). Users add
their own with ``register(TargetProfile(...))``; every profile validates itself on construction.
"""

from __future__ import annotations

import difflib

from edgeship.targets.builtin import BUILTIN_PROFILES
from edgeship.targets.profile import (
    FORMATS,
    PRECISIONS,
    PRECISIONS_BY_FORMAT,
    ProfileError,
    Quirk,
    TargetProfile,
)

__all__ = [
    "FORMATS",
    "PRECISIONS",
    "PRECISIONS_BY_FORMAT",
    "ProfileError",
    "Quirk",
    "TargetProfile",
    "UnknownTargetError",
    "all_targets",
    "get",
    "register",
]


class UnknownTargetError(LookupError):
    """No profile has this name. The message suggests the nearest names and ``edgeship targets list``."""


# Insertion-ordered: built-ins first in their curated order, then user profiles as registered.
_registry: dict[str, TargetProfile] = {p.name: p for p in BUILTIN_PROFILES}


def get(name: str) -> TargetProfile:
    """The profile called ``name`` (case-insensitive).

    Raises ``UnknownTargetError`` with up to three near names (names that start with what was
    typed first, then the closest by ``difflib``).
    """
    key = name.strip().lower()
    try:
        return _registry[key]
    except KeyError:
        raise UnknownTargetError(_unknown_message(name)) from None


def all_targets() -> list[TargetProfile]:
    """Every known profile: the built-in ones in their documented order, then registered ones."""
    return list(_registry.values())


def register(profile: TargetProfile, *, replace: bool = False) -> TargetProfile:
    """Add a user-defined profile so ``get(profile.name)`` finds it; returns the profile.

    The profile was validated when it was constructed. Raises ``TypeError`` for anything but a
    ``TargetProfile`` and ``ValueError`` when the name is taken, unless ``replace=True``
    (replacing a built-in profile changes what every later compile for that name does).
    """
    if not isinstance(profile, TargetProfile):
        raise TypeError(f"register() takes a TargetProfile, not {type(profile).__name__}")
    if profile.name in _registry and not replace and _registry[profile.name] != profile:
        raise ValueError(f"a target named {profile.name!r} already exists; pass replace=True to replace it")
    _registry[profile.name] = profile
    return profile


def unregister(name: str) -> None:
    """Remove a profile added with ``register`` (built-in profiles cannot be removed)."""
    if any(p.name == name for p in BUILTIN_PROFILES):
        raise ValueError(f"{name!r} is a built-in target and cannot be removed")
    if _registry.pop(name, None) is None:
        raise UnknownTargetError(_unknown_message(name))


def _unknown_message(name: str) -> str:
    return (
        f"unknown target {name!r}; did you mean {', '.join(found)}? (edgeship targets list)"
        if (found := _near_names(name.strip().lower()))
        else f"unknown target {name!r}; see the known targets with: edgeship targets list"
    )


def _near_names(typed: str, limit: int = 3) -> list[str]:
    # Names containing what was typed come first ("xavier", "jetson-orin" -> jetson-orin-nano),
    # prefixes before inner matches; then difflib's closest, keeping only those near the best
    # score so one good match is not diluted by weak ones ("andriod-arm64" -> android-arm64 only).
    names = list(_registry)
    if not typed:
        return []
    contained = sorted((n for n in names if typed in n), key=lambda n: not n.startswith(typed))
    scored = [(difflib.SequenceMatcher(None, typed, n).ratio(), n) for n in names if n not in contained]
    best = max((score for score, _ in scored), default=0.0)
    close = [n for score, n in sorted(scored, key=lambda sn: -sn[0]) if score >= 0.6 and score >= best - 0.1]
    return (contained + close)[:limit]
