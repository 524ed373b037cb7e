"""edgeship.compiler.emitters: one emitter per target format, registered by format.

An emitter (``base.Emitter``) takes the model, the target profile, the precision, the recipe
and calibration data, and writes the files a package will hold; it returns what the packager
needs to describe them (``base.Emitted``). The pipeline finds it with ``get(profile.format)``::

    from edgeship.compiler import emitters
    emitter = emitters.get("tflite")        # raises UsageError for a format without an emitter
    emitter.check(profile, "int8-static")   # refuses before any work
    emitted = emitter.emit(EmitRequest(source, profile, "int8-static", workdir, calib, recipe))

The built-in emitters (``BUILTIN``) are imported on first use (their converters load later
still, inside ``emit``); another one registers with the ``register`` class decorator. Adding a target format
means one emitter module, its row in ``targets.FORMATS`` / ``PRECISIONS_BY_FORMAT`` and a
profile (docs/compiler.md, "Adding an emitter").
"""

from __future__ import annotations

import importlib
from typing import TypeVar

from edgeship.compiler.emitters.base import EmitRequest, Emitted, Emitter
from edgeship.errors import UsageError
from edgeship.targets import FORMATS, PRECISIONS_BY_FORMAT

__all__ = ["EmitRequest", "Emitted", "Emitter", "all_emitters", "get", "register", "unregister"]

#: Format -> (module, class) of its built-in emitter, imported when that format is first asked for,
#: so looking up one format does not import the others' modules.
BUILTIN: dict[str, tuple[str, str]] = {
    "tflite": ("edgeship.compiler.emitters.tflite", "TFLiteEmitter"),
    "onnx": ("edgeship.compiler.emitters.onnx", "OnnxEmitter"),
    "tensorrt-onnx": ("edgeship.compiler.emitters.tensorrt", "TensorRTEmitter"),
    "coreml": ("edgeship.compiler.coreml.emit", "CoreMLEmitter"),
}

_registry: dict[str, Emitter] = {}
E = TypeVar("E", bound=type[Emitter])


def register(cls: E, *, replace: bool = False) -> E:
    """Register an ``Emitter`` subclass for its ``format`` (usable as a class decorator); returns the class.

    Raises ``ValueError`` when the format is not in ``edgeship.targets.FORMATS``, when the emitter
    builds a precision that format cannot carry (``targets.PRECISIONS_BY_FORMAT``), or when another
    emitter already has the format and ``replace`` is False; ``TypeError`` for a non-``Emitter``.
    """
    if not (isinstance(cls, type) and issubclass(cls, Emitter)):
        raise TypeError(f"register() takes an Emitter subclass, not {cls!r}")
    fmt = getattr(cls, "format", None)
    if fmt not in FORMATS:
        raise ValueError(
            f"emitter {cls.__name__}: format {fmt!r} is not a target format ({', '.join(FORMATS)}); "
            "add it to edgeship.targets first"
        )
    extra = [p for p in cls.precisions if p not in PRECISIONS_BY_FORMAT[fmt]]
    if extra or not cls.precisions:
        raise ValueError(
            f"emitter {cls.__name__}: {fmt} artifacts carry {', '.join(sorted(PRECISIONS_BY_FORMAT[fmt]))}; "
            f"it declares precisions {list(cls.precisions)}"
        )
    current = _registry.get(fmt)
    if current is not None and type(current) is not cls and not replace:
        raise ValueError(
            f"format {fmt!r} already has emitter {type(current).__name__}; pass replace=True to replace it"
        )
    _registry[fmt] = cls()
    return cls


def unregister(fmt: str) -> None:
    """Remove the emitter of ``fmt`` (a built-in one comes back on the next ``get``)."""
    _registry.pop(fmt, None)


def get(fmt: str) -> Emitter:
    """The emitter registered for format ``fmt``, importing the built-in one on first use.

    Raises ``UsageError`` (one line naming the format and the formats that have an emitter).
    """
    if fmt not in _registry and fmt in BUILTIN:
        module, name = BUILTIN[fmt]
        register(getattr(importlib.import_module(module), name))
    try:
        return _registry[fmt]
    except KeyError:
        known = ", ".join(sorted(set(_registry) | set(BUILTIN)))
        raise UsageError(
            f"no emitter for format {fmt!r}; emitters exist for {known} "
            "(register one with edgeship.compiler.emitters.register)"
        ) from None


def all_emitters() -> dict[str, Emitter]:
    """Every registered emitter by format, the built-in ones included."""
    for fmt in BUILTIN:
        get(fmt)
    return dict(_registry)
