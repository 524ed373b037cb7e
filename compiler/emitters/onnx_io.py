"""Reading an ONNX artifact's I/O and weight size (shared by the ONNX and TensorRT emitters)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgeship.runtime.package.manifest import TensorSpec


def io_specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The artifact's I/O as ONNX Runtime sees it: names, dtypes and shapes from the graph (None
    for a dynamic dimension)."""
    import onnxruntime as ort

    from edgeship.runtime.backends.onnxruntime import _info

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])

    def spec(arg: Any) -> TensorSpec:
        info = _info(arg)
        return TensorSpec(arg.name, info.dtype.name, info.shape)

    return tuple(spec(a) for a in session.get_inputs()), tuple(spec(a) for a in session.get_outputs())


def weight_bytes(path: Path) -> int:
    """Bytes of the graph's initializers (weights), including external data."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path), load_external_data=True)
    return int(sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer))
