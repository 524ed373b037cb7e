"""ONNX Runtime backend: CPU by default; CUDA or TensorRT execution providers when asked for and present.

Also runs the Q/DQ ONNX graphs of ``tensorrt-onnx`` packages, at a lower priority than
the TensorRT backend, so the compiler can check them numerically on a host.

Threads: ``InferenceSession.run`` may be called from several threads at once (ONNX Runtime
documents it; each call gets its own execution state), so loaded models say
``thread_safe=True`` and the Session does not serialize them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.errors import BackendUnavailableError, ModelLoadError, SessionClosedError, UsageError
from edgeship.runtime.backends.base import Backend, BackendOptions, LoadedModel, TensorInfo
from edgeship.runtime.package.manifest import Manifest

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(int16)": np.int16,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}
_PROVIDERS = {"cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider", "cpu": "CPUExecutionProvider"}


class OnnxRuntimeBackend(Backend):
    name = "onnxruntime"
    formats = ("onnx", "tensorrt-onnx")

    @classmethod
    def unavailable_reason(cls) -> str | None:
        if importlib.util.find_spec("onnxruntime") is None:
            return "onnxruntime is not installed (pip install 'edgeship[ort]')"
        return None

    @classmethod
    def load(cls, artifact: Path, manifest: Manifest, options: BackendOptions) -> LoadedModel:
        if cls.unavailable_reason() is not None:
            raise BackendUnavailableError(str(cls.unavailable_reason()))
        import onnxruntime as ort

        unknown = set(options.delegates) - set(_PROVIDERS)
        if unknown:
            raise UsageError(f"ONNX Runtime delegates are cpu, cuda and tensorrt; not {', '.join(sorted(unknown))}")
        available = set(ort.get_available_providers())
        providers = [_PROVIDERS[d] for d in options.delegates if d != "cpu"]
        missing = [p for p in providers if p not in available]
        if missing:
            raise BackendUnavailableError(
                f"ONNX Runtime here has no {', '.join(missing)} (available: {', '.join(sorted(available))})"
            )
        so = ort.SessionOptions()
        if options.threads is not None:
            so.intra_op_num_threads = options.threads
            so.inter_op_num_threads = 1
        so.log_severity_level = 3
        try:
            session = ort.InferenceSession(
                str(artifact), sess_options=so, providers=[*providers, "CPUExecutionProvider"]
            )
        except Exception as exc:  # ORT raises its own Fail/InvalidGraph/... types
            raise ModelLoadError(f"ONNX Runtime refused {artifact.name}: {str(exc).strip().splitlines()[0]}") from None
        return _OrtModel(session, f"onnxruntime {ort.__version__}")


class _OrtModel(LoadedModel):
    thread_safe = True  # InferenceSession.run is documented as safe to call concurrently

    def __init__(self, session: Any, library: str) -> None:
        self._session = session
        self.library = library
        self.inputs = tuple(_info(i) for i in session.get_inputs())
        self.outputs = tuple(_info(o) for o in session.get_outputs())
        self._in_names = [t.name for t in self.inputs]
        self._out_names = [t.name for t in self.outputs]
        self._run: Any = session.run  # looked up once (hot path); close() drops it, it keeps the session alive

    def run(self, feeds: Sequence[np.ndarray[Any, Any]]) -> list[np.ndarray[Any, Any]]:
        result: list[np.ndarray[Any, Any]] = self._run(self._out_names, dict(zip(self._in_names, feeds)))
        return result

    def close(self) -> None:
        self._session = None
        self._run = _closed


def _closed(*_args: Any) -> Any:
    raise SessionClosedError("this ONNX Runtime model was closed")


def _info(arg: Any) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in arg.shape)
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise ModelLoadError(f"tensor {arg.name!r} has type {arg.type}, which edgeship does not handle")
    return TensorInfo(arg.name, shape, np.dtype(dtype))
