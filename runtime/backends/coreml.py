"""Core ML backend: runs ``coreml`` packages (``.mlpackage`` / ``.mlmodel``) through coremltools on macOS.

Core ML predicts only on Apple platforms; on iOS apps call it from Swift, so from
Python this backend runs on macOS alone. On Linux, the compiler's reference
evaluator (``backend="coreml-reference"``) checks a program numerically instead.

coremltools is imported inside ``load`` only: ``edgeship.runtime`` must import on a
device without it. Reading tensor names, shapes and dtypes from the model's spec
(``describe_features``) and choosing compute units (``compute_units_for``) are pure
and run on any OS.
"""

from __future__ import annotations

import importlib
import importlib.util
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.errors import BackendUnavailableError, InputError, ModelLoadError
from edgeship.runtime.backends.base import Backend, BackendOptions, LoadedModel, TensorInfo
from edgeship.runtime.package.manifest import Manifest

NOT_DARWIN = (
    "Core ML runs only on macOS/iOS; on Linux use the compiler's reference evaluator "
    "(backend='coreml-reference') to check the model numerically"
)
COREMLTOOLS_MISSING = "coremltools is not installed (pip install 'coremltools==9.0', or the edgeship[compiler] extra)"

# Core ML ArrayFeatureType.ArrayDataType names -> numpy dtypes.
ARRAY_DTYPES: dict[str, np.dtype[Any]] = {
    "FLOAT32": np.dtype(np.float32),
    "FLOAT16": np.dtype(np.float16),
    "DOUBLE": np.dtype(np.float64),
    "INT32": np.dtype(np.int32),
    "INT8": np.dtype(np.int8),
}


def compute_units_for(delegates: Sequence[str]) -> str:
    """The ``coremltools.ComputeUnit`` member name for ``BackendOptions.delegates``.

    "coreml-ane" -> ALL (Core ML puts what it can on the Neural Engine), "gpu" -> CPU_AND_GPU,
    "cpu" -> CPU_ONLY (bit-stable numerics for tests); anything else, or nothing -> ALL.
    The first delegate this backend knows wins.
    """
    for delegate in delegates:
        if delegate == "coreml-ane":
            return "ALL"
        if delegate == "gpu":
            return "CPU_AND_GPU"
        if delegate == "cpu":
            return "CPU_ONLY"
    return "ALL"


def describe_features(features: Sequence[Any], kind: str) -> tuple[TensorInfo, ...]:
    """``TensorInfo`` for each feature of a Core ML model description (``spec.description.input``/``output``).

    A dimension is ``None`` when the model's shape range or enumerated shapes let it vary.
    Raises ``ModelLoadError`` for a feature that is not a multi-array (images, dictionaries,
    sequences, states) or has a data type numpy cannot hold.
    """
    infos = []
    for feature in features:
        which = feature.type.WhichOneof("Type")
        if which != "multiArrayType":
            raise ModelLoadError(
                f"Core ML {kind} {feature.name!r} is of type {which}; edgeship runs models whose inputs and outputs "
                "are all multi-arrays (convert with ct.TensorType, not ct.ImageType)"
            )
        array = feature.type.multiArrayType
        type_name = array.ArrayDataType.Name(array.dataType)
        dtype = ARRAY_DTYPES.get(type_name)
        if dtype is None:
            raise ModelLoadError(
                f"Core ML {kind} {feature.name!r} has data type {type_name}, which edgeship cannot feed"
            )
        infos.append(TensorInfo(feature.name, _shape(array), dtype))
    return tuple(infos)


def _shape(array: Any) -> tuple[int | None, ...]:
    flexibility = array.WhichOneof("ShapeFlexibility")
    if flexibility == "shapeRange":
        return tuple(r.lowerBound if r.lowerBound == r.upperBound else None for r in array.shapeRange.sizeRanges)
    if flexibility == "enumeratedShapes" and array.enumeratedShapes.shapes:
        shapes = [tuple(s.shape) for s in array.enumeratedShapes.shapes]
        return tuple(dims[0] if len(set(dims)) == 1 else None for dims in zip(*shapes, strict=True))
    return tuple(int(d) for d in array.shape)


class _CoreMLModel(LoadedModel):
    # coremltools documents no thread-safety for MLModel.predict from Python: the Session serializes.
    thread_safe = False

    def __init__(self, model: Any, manifest: Manifest | None = None, library: str = "") -> None:
        self._model = model
        self.library = library
        description = model.get_spec().description
        self.inputs = describe_features(description.input, "input")
        self.outputs = describe_features(description.output, "output")
        if manifest is not None:
            # Flexible-shape programs leave output shapes out of the spec; the manifest knows them.
            declared = {t.name: t.shape for t in manifest.outputs}
            self.outputs = tuple(
                TensorInfo(o.name, declared[o.name], o.dtype) if not o.shape and declared.get(o.name) else o
                for o in self.outputs
            )

    def run(self, feeds: Sequence[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        if len(feeds) != len(self.inputs):
            raise InputError(f"the Core ML model takes {len(self.inputs)} inputs, got {len(feeds)}")
        try:
            result = self._model.predict({info.name: feed for info, feed in zip(self.inputs, feeds, strict=True)})
        except Exception as exc:  # coremltools raises bare RuntimeError/ValueError from the native side
            raise ModelLoadError(f"Core ML failed to predict: {type(exc).__name__}: {exc}") from exc
        # Core ML may hand back a wider float type than the spec declares (float16 outputs as float32).
        return [np.asarray(result[info.name]).astype(info.dtype, copy=False) for info in self.outputs]

    def close(self) -> None:
        self._model = None


class CoreMLBackend(Backend):
    """Runs ``coreml`` packages with Core ML through coremltools (macOS only).

    Options: ``delegates`` choose compute units (see ``compute_units_for``); threads are ignored.
    """

    name = "coreml"
    formats = ("coreml",)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if platform.system() != "Darwin":
            return NOT_DARWIN
        if importlib.util.find_spec("coremltools") is None:
            return COREMLTOOLS_MISSING
        return None

    @classmethod
    def load(cls, artifact: Path, manifest: Manifest, options: BackendOptions) -> LoadedModel:
        """Open an ``.mlpackage`` directory or ``.mlmodel`` file.

        Raises ``BackendUnavailableError`` off macOS or without coremltools, and
        ``ModelLoadError`` when Core ML cannot open the model or its I/O is not multi-arrays.
        """
        reason = cls.unavailable_reason()
        if reason is not None:
            raise BackendUnavailableError(f"backend 'coreml' cannot run here: {reason}")
        ct: Any = importlib.import_module("coremltools")
        units = compute_units_for(options.delegates)
        try:
            model = ct.models.MLModel(str(artifact), compute_units=ct.ComputeUnit[units])
        except Exception as exc:  # coremltools reports compile and load failures as bare exceptions
            raise ModelLoadError(f"Core ML could not open {artifact.name}: {type(exc).__name__}: {exc}") from exc
        # coremltools does not raise when Core ML refuses to load a model: it warns and leaves the
        # model without its native proxy, and predict() fails later. Fail at load instead.
        if getattr(model, "__proxy__", None) is None:
            cause = getattr(model, "_framework_error", None)
            raise ModelLoadError(
                f"Core ML could not load {artifact.name}"
                + (f": {cause}" if cause else " (is this macOS new enough for the model's deployment target?)")
            )
        return _CoreMLModel(model, manifest, f"coremltools {getattr(ct, '__version__', '?')}")
