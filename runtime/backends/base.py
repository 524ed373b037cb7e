"""The backend interface: what a runtime library must do for edgeship to run a model on it.

A backend is a class registered in ``edgeship.runtime.backends.registry``. It says
whether it can run an artifact format here (``unavailable_reason``) and opens an
artifact into a ``LoadedModel``, which runs a list of arrays in the order of its
``inputs`` and returns arrays in the order of its ``outputs``. Everything else
(input checks, preprocessing, quantization of I/O, statistics) is the Session's job,
so a backend stays a thin adapter over the native library.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeship.runtime.package.manifest import Manifest


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as the native library sees it. ``None`` in ``shape`` is a dynamic dimension."""

    name: str
    shape: tuple[int | None, ...]
    dtype: np.dtype[Any]


@dataclass(frozen=True)
class BackendOptions:
    """Options common to every backend; a backend ignores what does not apply to it.

    ``threads``: intra-op threads (None: the library's default).
    ``delegates``: accelerators to use, by name ("xnnpack", "gpu", "cuda", "tensorrt", "nnapi", "coreml-ane").
    ``cache_dir``: where a backend may keep built artifacts (TensorRT engines).
    ``extra``: backend-specific settings, passed through unchanged.
    """

    threads: int | None = None
    delegates: tuple[str, ...] = ()
    cache_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class LoadedModel(ABC):
    """A model opened by a backend, ready to run.

    ``thread_safe``: whether ``run`` may be called from several threads at once. False
    (the default) makes the Session serialize calls with a lock; a backend sets it True
    only when its native library documents concurrent runs on one loaded model as safe.
    ``library``: the native library and version that runs it, for reports ("onnxruntime 1.31.1").
    """

    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]
    thread_safe: bool = False
    library: str = ""

    @abstractmethod
    def run(self, feeds: Sequence[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        """Run once. ``feeds`` are in the order of ``inputs`` with their exact dtypes; outputs follow ``outputs``."""

    def close(self) -> None:  # noqa: B027 - most native libraries free on garbage collection
        """Release native resources. The model must not be used afterwards.

        Drop every reference to native objects, bound methods included (a bound method
        keeps its object alive), so they are freed now rather than with this object.
        """


class Backend(ABC):
    """A runtime library adapter. Subclasses are registered with ``registry.register``."""

    name: ClassVar[str]
    """Short name users pass as ``backend=`` (e.g. "litert", "onnxruntime")."""
    formats: ClassVar[tuple[str, ...]]
    """Artifact formats (manifest ``format``) this backend runs."""
    device_runtime: ClassVar[bool] = True
    """False for a backend that only checks numerics on a host (the compiler's Core ML reference
    evaluator): a device never counts it as able to run a format (``registry.select(device=True)``)."""

    @classmethod
    @abstractmethod
    def unavailable_reason(cls) -> str | None:
        """None when the backend can run here; otherwise one line saying what is missing and how to get it."""

    @classmethod
    @abstractmethod
    def load(cls, artifact: Path, manifest: Manifest, options: BackendOptions) -> LoadedModel:
        """Open ``artifact`` (a file or directory inside an unpacked, verified package).

        Raises ``ModelLoadError`` when the native library refuses the model.
        """
