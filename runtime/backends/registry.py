"""The backend registry: which backends exist, and which one ``backend="auto"`` picks.

Other parts of edgeship register their own backends here (the compiler registers a
reference evaluator for Core ML programs), so every component runs models through
the one ``Session``.
"""

from __future__ import annotations

from dataclasses import dataclass

from edgeship.errors import BackendUnavailableError, UsageError
from edgeship.runtime.backends.base import Backend


@dataclass(frozen=True)
class _Entry:
    backend: type[Backend]
    priority: int


_REGISTRY: dict[str, _Entry] = {}


def register(backend: type[Backend], priority: int = 0) -> type[Backend]:
    """Register ``backend`` under its name; higher ``priority`` wins in ``auto``. Re-registering replaces."""
    _REGISTRY[backend.name] = _Entry(backend, priority)
    return backend


def registered() -> dict[str, type[Backend]]:
    """Every registered backend by name, highest priority first."""
    entries = sorted(_REGISTRY.values(), key=lambda e: -e.priority)
    return {e.backend.name: e.backend for e in entries}


def select(fmt: str, requested: str = "auto", *, device: bool = False) -> type[Backend]:
    """Return the backend to run an artifact of format ``fmt``.

    With ``requested="auto"``: the highest-priority registered backend for ``fmt`` that is
    available here; with ``device``, only backends that serve models on a device
    (``Backend.device_runtime``). Raises ``UsageError`` for an unknown name or a backend that cannot
    run ``fmt``, and ``BackendUnavailableError`` listing why each candidate cannot run.
    """
    backends = registered()
    if requested != "auto":
        backend = backends.get(requested)
        if backend is None:
            raise UsageError(f"unknown backend {requested!r}; registered: {', '.join(backends) or 'none'}")
        if fmt not in backend.formats:
            raise UsageError(
                f"backend {requested!r} runs {', '.join(backend.formats)} artifacts, not {fmt!r}; "
                f"use backend='auto' or one of: {', '.join(n for n, b in backends.items() if fmt in b.formats) or 'none'}"
            )
        reason = backend.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"backend {requested!r} cannot run here: {reason}")
        return backend
    candidates = [b for b in backends.values() if fmt in b.formats and (b.device_runtime or not device)]
    if not candidates:
        raise BackendUnavailableError(f"no backend is registered for {fmt!r} artifacts")
    reasons = []
    for backend in candidates:
        reason = backend.unavailable_reason()
        if reason is None:
            return backend
        reasons.append(f"{backend.name}: {reason}")
    raise BackendUnavailableError(f"no backend can run {fmt!r} artifacts here ({'; '.join(reasons)})")
