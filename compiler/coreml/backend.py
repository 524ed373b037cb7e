"""``coreml-reference``: a runtime backend that runs ``coreml`` packages through the numpy reference evaluator.

Registered by the compiler (``register()``) below the real Core ML backend, so
``backend="auto"`` uses Core ML on macOS and this evaluator elsewhere. It exists so that
the compiler validates Core ML artifacts through the same ``Session`` as every other
format; it is a numeric check, not a fast runtime.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.compiler.coreml.reference import PINNED_COREMLTOOLS, CoreMLVersionError, ReferenceEvaluator
from edgeship.errors import BackendUnavailableError, InputError
from edgeship.runtime.backends import registry
from edgeship.runtime.backends.base import Backend, BackendOptions, LoadedModel
from edgeship.runtime.package.manifest import Manifest

PRIORITY = 5  # below the real Core ML backend (10): on macOS, auto picks Core ML itself


class _ReferenceModel(LoadedModel):
    # value_inference writes into the program's shared Vars while it runs (the evaluator holds a lock
    # around that too); nothing is gained by running calls at once, so the Session serializes them.
    thread_safe = False

    def __init__(self, evaluator: ReferenceEvaluator) -> None:
        self._evaluator: ReferenceEvaluator | None = evaluator
        self.inputs = evaluator.inputs
        self.outputs = evaluator.outputs

    def run(self, feeds: Sequence[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        if self._evaluator is None:
            raise InputError("this model was closed")
        if len(feeds) != len(self.inputs):
            raise InputError(f"the Core ML program takes {len(self.inputs)} inputs, got {len(feeds)}")
        result = self._evaluator.run({info.name: feed for info, feed in zip(self.inputs, feeds)})
        return [result[info.name] for info in self.outputs]

    def close(self) -> None:
        self._evaluator = None


class CoreMLReferenceBackend(Backend):
    """Runs ``coreml`` packages (``.mlpackage``) with the numpy reference evaluator on any OS.

    Options are ignored (it runs on one CPU thread). ``load`` raises ``ModelLoadError``
    (``UnsupportedOpError``) for a program holding an op the evaluator cannot compute.
    """

    name = "coreml-reference"
    formats = ("coreml",)
    device_runtime = False  # a numeric check for the compiler; a device agent never serves with it

    @classmethod
    def unavailable_reason(cls) -> str | None:
        # importlib.metadata, not an import: importing coremltools takes seconds.
        try:
            version = importlib.metadata.version("coremltools")
        except importlib.metadata.PackageNotFoundError:
            return f"coremltools is not installed (pip install 'coremltools=={PINNED_COREMLTOOLS}')"
        if version != PINNED_COREMLTOOLS:
            return (
                f"the reference evaluator is pinned to coremltools=={PINNED_COREMLTOOLS}, "
                f"{version} is installed (pip install 'coremltools=={PINNED_COREMLTOOLS}')"
            )
        return None

    @classmethod
    def load(cls, artifact: Path, manifest: Manifest, options: BackendOptions) -> LoadedModel:
        """Load the ML program in ``artifact`` and decompress its weights.

        Raises ``BackendUnavailableError`` without coremltools 9.0, ``ModelLoadError`` when
        coremltools cannot read the program or it holds an op the evaluator does not implement.
        """
        reason = cls.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"backend 'coreml-reference' cannot run here: {reason}")
        try:
            evaluator = ReferenceEvaluator(artifact)
        except CoreMLVersionError as exc:
            raise BackendUnavailableError(f"backend 'coreml-reference' cannot run here: {exc}") from exc
        return _ReferenceModel(evaluator)


def register() -> None:
    """Register ``coreml-reference`` with the runtime's backend registry (priority 5). Idempotent."""
    registry.register(CoreMLReferenceBackend, priority=PRIORITY)
