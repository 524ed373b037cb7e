"""LiteRT (TFLite) backend: ai-edge-litert, or tflite-runtime / tf.lite where that is what a device has.

XNNPACK is on by default. ``delegates=("none",)`` runs the reference kernels;
``delegates=("gpu",)`` loads the GPU delegate library named by
``extra["gpu_delegate_library"]`` (default ``libtensorflowlite_gpu_delegate.so``).
``extra["interpreter"]`` forces one of "ai_edge_litert", "tflite_runtime", "tensorflow".

Threads: a TFLite ``Interpreter`` is not thread-safe (its tensors are shared state between
``set_tensor``, ``invoke`` and ``get_tensor``), so a loaded model says ``thread_safe=False``
and the Session serializes calls. ``extra["pool"] = N`` (N >= 2) opens N interpreters of
the same file instead and hands each call a free one, so up to N calls run at once (each
interpreter has its own tensor arena; the model file's pages are shared).
"""

from __future__ import annotations

import importlib
import importlib.util
import queue
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.errors import BackendUnavailableError, ModelLoadError, SessionClosedError, UsageError
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
        pool = options.extra.get("pool", 1)
        if not isinstance(pool, int) or isinstance(pool, bool) or pool < 1:
            raise UsageError(f"LiteRT pool must be a positive number of interpreters, not {pool!r}")
        gpu_library = options.extra.get("gpu_delegate_library", "libtensorflowlite_gpu_delegate.so")
        library = _library(module)

        def make() -> _LiteRTModel:
            if "gpu" in delegates:  # one delegate instance per interpreter: they are not shared
                try:
                    kwargs["experimental_delegates"] = [module.load_delegate(gpu_library)]
                except (ValueError, OSError, RuntimeError) as exc:
                    raise BackendUnavailableError(f"cannot load the LiteRT GPU delegate {gpu_library}: {exc}") from None
            try:
                interpreter = module.Interpreter(**kwargs)
                interpreter.allocate_tensors()
            except (ValueError, RuntimeError) as exc:
                raise ModelLoadError(f"LiteRT refused {artifact.name}: {_first_line(exc)}") from None
            return _LiteRTModel(interpreter, library)

        if pool == 1:
            return make()
        return _LiteRTPool([make() for _ in range(pool)])


class _LiteRTModel(LoadedModel):
    thread_safe = False  # one Interpreter: tensors are shared between set_tensor, invoke and get_tensor

    def __init__(self, interpreter: Any, library: str) -> None:
        self._interp = interpreter
        self.library = library
        ins = interpreter.get_input_details()
        outs = interpreter.get_output_details()
        self.inputs = tuple(_info(d) for d in ins)
        self.outputs = tuple(_info(d) for d in outs)
        self._in_idx = [int(d["index"]) for d in ins]
        self._out_idx = [int(d["index"]) for d in outs]
        self._shapes = [tuple(int(s) for s in d["shape"]) for d in ins]
        # Bound methods, looked up once: this is the hot path. close() must drop them, since
        # each keeps the interpreter alive.
        self._set: Callable[..., Any] = interpreter.set_tensor
        self._get: Callable[..., Any] = interpreter.get_tensor
        self._invoke: Callable[..., Any] = interpreter.invoke

    def run(self, feeds: Sequence[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        for i, x in enumerate(feeds):
            if x.shape != self._shapes[i]:
                self._resize(i, x.shape)
            self._set(self._in_idx[i], x)
        self._invoke()
        return [self._get(i) for i in self._out_idx]  # get_tensor returns a copy

    def _resize(self, i: int, shape: tuple[int, ...]) -> None:
        if self._interp is None:
            _closed()
        try:
            self._interp.resize_tensor_input(self._in_idx[i], list(shape), strict=True)
            self._interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"LiteRT cannot run input {i} with shape {shape}: {_first_line(exc)}") from None
        self._shapes[i] = shape

    def close(self) -> None:
        self._interp = None
        self._set = self._get = self._invoke = _closed


class _LiteRTPool(LoadedModel):
    """N interpreters of one model; each call borrows a free one (blocking while all are busy)."""

    thread_safe = True

    def __init__(self, members: list[_LiteRTModel]) -> None:
        self.inputs = members[0].inputs
        self.outputs = members[0].outputs
        self.library = members[0].library
        self._members = members
        self._free: queue.SimpleQueue[_LiteRTModel] = queue.SimpleQueue()
        for member in members:
            self._free.put(member)

    def run(self, feeds: Sequence[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        member = self._free.get()
        try:
            return member.run(feeds)
        finally:
            self._free.put(member)

    def close(self) -> None:
        for member in self._members:
            member.close()
        self._members = []
        while not self._free.empty():
            self._free.get_nowait()


def _closed(*_args: Any) -> Any:
    raise SessionClosedError("this LiteRT model was closed")


def _library(module: Any) -> str:
    top = module.__name__.split(".")[0]
    version = getattr(sys.modules.get(top), "__version__", None)
    return f"{top} {version}" if version else top


def _info(detail: dict[str, Any]) -> TensorInfo:
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    shape = tuple(None if int(d) < 0 else int(d) for d in dims)
    return TensorInfo(str(detail["name"]), shape, np.dtype(detail["dtype"]))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
