"""edgeship.runtime: what runs on the device.

- ``edgeship.runtime.open(package_or_dir, backend="auto", trusted_keys=...) -> Session``
- ``edgeship.runtime.package``: the signed model package format (its trust core: ``PackageTrust``).
- ``edgeship.runtime.check``: check a package in a child process (``run_check``), crash-isolated.
- ``edgeship.runtime.durable``: durable file writes (atomic replace, fsync, crash-safe tree removal).
- ``edgeship.runtime.backends``: the backend interface and registry (LiteRT, ONNX Runtime,
  TensorRT, Core ML built in; other parts of edgeship register more).

This package must import without torch, tensorflow, onnx or coremltools, and on Python 3.10.
"""

from edgeship.runtime.backends.base import Backend, BackendOptions, LoadedModel, TensorInfo
from edgeship.runtime.backends.registry import register as register_backend
from edgeship.runtime.session import RuntimeStats, Session, open, open_unpackaged

__all__ = [
    "Backend",
    "BackendOptions",
    "LoadedModel",
    "RuntimeStats",
    "Session",
    "TensorInfo",
    "open",
    "open_unpackaged",
    "register_backend",
]
