"""LiteRT (TFLite) backend: ai-edge-litert, or tflite-runtime / tf.lite where that is what a device has.

XNNPACK is on by default. ``delegates=("none",)`` runs the reference kernels;
``delegates=("gpu",)`` loads the GPU delegate library named by
``extra["gpu_delegate_library"]`` (default ``libtensorflowlite_gpu_delegate.so``).
``extra["interpreter"]`` forces one of "ai_edge_litert", "tflite_runtime", "tensorflow".
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.errors import BackendUnavailableError, ModelLoadError, UsageError
from edgeship.runtime.backends.base import Backend, BackendOptions, LoadedModel, TensorInfo
from edgeship.runtime.package.manifest import Manifest

# Where each library keeps its Interpreter, in order of preference.
_MODULES = (
    ("ai_edge_litert", "ai_edge_litert.interpreter"),
    ("tflite_runtime", "tflite_runtime.interpreter"),
    ("tensorflow", "tensorflow.lite"),
)


def interpreter_module(forced: str | None = None) -> Any:
    """Import and return the module holding ``Interpreter``; raise ``BackendUnavailableError`` if none is installed."""
    for top, module in _MODULES:
        if forced is not None and top != forced:
            continue
        if importlib.util.find_spec(top) is not None:
            return importlib.import_module(module)
    raise BackendUnavailableError(
        f"no TFLite interpreter is installed{f' ({forced} asked for)' if forced else ''}: "
        "pip install 'edgeship[litert]' (ai-edge-litert), or tflite-runtime on devices that have only that"
    )


class LiteRTBackend(Backend):
    name = "litert"
    formats = ("tflite",)

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if any(importlib.util.find_spec(top) is not None for top, _ in _MODULES):
            return None
        return "no TFLite interpreter installed (pip install 'edgeship[litert]')"

    @classmethod
    def load(cls, artifact: Path, manifest: Manifest, options: BackendOptions) -> LoadedModel:
        module = interpreter_module(options.extra.get("interpreter"))
        kwargs: dict[str, Any] = {"model_path": str(artifact)}
        if options.threads is not None:
            kwargs["num_threads"] = options.threads
        delegates = set(options.delegates)
        unknown = delegates - {"xnnpack", "none", "gpu"}
        if unknown:
            raise UsageError(f"LiteRT delegates are xnnpack, none and gpu; not {', '.join(sorted(unknown))}")
        if "none" in delegates:
            resolver = getattr(module, "OpResolverType", None) or getattr(
                getattr(module, "experimental", None), "OpResolverType", None
            )
            if resolver is None:
                raise UsageError("this TFLite interpreter cannot turn XNNPACK off")
            kwargs["experimental_op_resolver_type"] = resolver.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        if "gpu" in delegates:
            library = options.extra.get("gpu_delegate_library", "libtensorflowlite_gpu_delegate.so")
            try:
                kwargs["experimental_delegates"] = [module.load_delegate(library)]
            except (ValueError, OSError, RuntimeError) as exc:
                raise BackendUnavailableError(f"cannot load the LiteRT GPU delegate {library}: {exc}") from None
        try:
            interpreter = module.Interpreter(**kwargs)
            interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"LiteRT refused {artifact.name}: {_first_line(exc)}") from None
        return _LiteRTModel(interpreter)


class _LiteRTModel(LoadedModel):
    def __init__(self, interpreter: Any) -> None:
        self._interp = interpreter
        ins = interpreter.get_input_details()
        outs = interpreter.get_output_details()
        self.inputs = tuple(_info(d) for d in ins)
        self.outputs = tuple(_info(d) for d in outs)
        self._in_idx = [int(d["index"]) for d in ins]
        self._out_idx = [int(d["index"]) for d in outs]
        self._shapes = [tuple(int(s) for s in d["shape"]) for d in ins]
        self._set = interpreter.set_tensor
        self._get = interpreter.get_tensor
        self._invoke = interpreter.invoke

    def run(self, feeds: Sequence[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        for i, x in enumerate(feeds):
            if x.shape != self._shapes[i]:
                self._resize(i, x.shape)
            self._set(self._in_idx[i], x)
        self._invoke()
        return [self._get(i) for i in self._out_idx]

    def _resize(self, i: int, shape: tuple[int, ...]) -> None:
        try:
            self._interp.resize_tensor_input(self._in_idx[i], list(shape), strict=True)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"LiteRT cannot run input {i} with shape {shape}: {_first_line(exc)}") from None
        self._shapes[i] = shape

    def close(self) -> None:
        self._interp = None


def _info(detail: dict[str, Any]) -> TensorInfo:
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    shape = tuple(None if int(d) < 0 else int(d) for d in dims)
    return TensorInfo(str(detail["name"]), shape, np.dtype(detail["dtype"]))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
