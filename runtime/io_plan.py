"""How a caller's arrays become a model's inputs, and the model's outputs become the caller's.

For each input the manifest fixes a plan, built once when a Session opens: the dtype
the caller passes (float32 for quantized inputs unless raw I/O was asked for), the
shape pattern to check, the numeric preprocessing, and the affine quantization. The
per-call work is then a few numpy operations with no lookups or branching on the
manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgeship.errors import InputError
from edgeship.runtime.package.manifest import Preprocessing, Quantization, TensorSpec

Array = np.ndarray[Any, Any]

DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "int16": np.dtype(np.int16),
    "int32": np.dtype(np.int32),
    "int64": np.dtype(np.int64),
    "bool": np.dtype(np.bool_),
}
_LAYOUT_PERM = {("NHWC", "NCHW"): (0, 3, 1, 2), ("NCHW", "NHWC"): (0, 2, 3, 1)}


@dataclass(frozen=True)
class Affine:
    """Affine quantization as broadcastable arrays: ``real = scale * (q - zero_point)``."""

    scale: Array
    zero_point: Array
    qmin: int
    qmax: int

    @classmethod
    def from_spec(cls, q: Quantization, dtype: np.dtype[Any], rank: int) -> Affine:
        scale = np.asarray(q.scale, dtype=np.float32)
        zero = np.asarray(q.zero_point, dtype=np.float32)
        if len(q.scale) > 1 and q.axis is not None:
            shape = [1] * rank
            shape[q.axis] = len(q.scale)
            scale, zero = scale.reshape(shape), zero.reshape(shape)
        else:
            scale, zero = scale.reshape(()), zero.reshape(())
        info = np.iinfo(dtype)
        return cls(scale, zero, int(info.min), int(info.max))

    def quantize(self, x: Array, dtype: np.dtype[Any]) -> Array:
        q = np.rint(x / self.scale + self.zero_point)
        return np.clip(q, self.qmin, self.qmax).astype(dtype)

    def dequantize(self, q: Array) -> Array:
        return ((q.astype(np.float32) - self.zero_point) * self.scale).astype(np.float32)


@dataclass(frozen=True)
class InputPlan:
    """Everything needed to turn one caller array into one model input."""

    name: str
    index: int
    caller_dtype: np.dtype[Any]
    model_dtype: np.dtype[Any]
    shape: tuple[int | None, ...]
    caller_shape: tuple[int | None, ...]
    fixed: tuple[int, ...] | None  # caller_shape when it has no dynamic dimension: one tuple compare per call
    perm: tuple[int, ...] | None
    scale: float | None
    mean: Array | None
    std: Array | None
    affine: Affine | None

    def prepare(self, x: Any) -> Array:
        """Check and convert one caller array. Raises ``InputError`` naming the input and what was expected."""
        if not isinstance(x, np.ndarray):
            x = np.asarray(x)
        if x.dtype != self.caller_dtype:
            if x.dtype.kind != self.caller_dtype.kind and not (x.dtype.kind in "iu" and self.caller_dtype.kind in "iu"):
                raise InputError(
                    f"input {self.name!r} has dtype {x.dtype}, expected {self.caller_dtype}"
                    + (" (pass raw=False for float inputs to a quantized model)" if self.affine is not None else "")
                )
            x = x.astype(self.caller_dtype)
        if x.shape != self.fixed and (
            x.ndim != len(self.caller_shape)
            or any(want is not None and got != want for got, want in zip(x.shape, self.caller_shape))
        ):
            want_text = "(" + ", ".join("?" if d is None else str(d) for d in self.caller_shape) + ")"
            raise InputError(f"input {self.name!r} has shape {tuple(x.shape)}, expected {want_text}")
        if self.perm is not None:
            x = np.ascontiguousarray(x.transpose(self.perm))
        if self.scale is not None:
            x = x * np.float32(self.scale)
        if self.mean is not None:
            x = x - self.mean
        if self.std is not None:
            x = x / self.std
        if self.affine is not None:
            return self.affine.quantize(x, self.model_dtype)
        if x.dtype != self.model_dtype:
            x = x.astype(self.model_dtype)
        out: Array = x
        return out


@dataclass(frozen=True)
class OutputPlan:
    """How one model output is handed back to the caller."""

    name: str
    index: int
    affine: Affine | None
    model_dtype: np.dtype[Any]

    def finish(self, y: Array) -> Array:
        return self.affine.dequantize(y) if self.affine is not None else y


def input_plan(spec: TensorSpec, index: int, raw: bool) -> InputPlan:
    """Build the plan for one manifest input; ``raw`` skips preprocessing and quantization."""
    model_dtype = DTYPES[spec.dtype]
    affine = None
    if spec.quantization is not None and model_dtype.kind in "iu" and not raw:
        affine = Affine.from_spec(spec.quantization, model_dtype, len(spec.shape))
    pre = None if raw else spec.preprocessing
    perm = _perm(pre)
    caller_shape = spec.shape if perm is None else tuple(spec.shape[perm.index(i)] for i in range(len(spec.shape)))
    caller_dtype = np.dtype(np.float32) if (affine is not None or _is_numeric(pre)) else model_dtype
    channel_axis = 1 if pre is not None and pre.layout_to == "NCHW" else len(spec.shape) - 1
    return InputPlan(
        name=spec.name,
        index=index,
        caller_dtype=caller_dtype,
        model_dtype=model_dtype,
        shape=spec.shape,
        caller_shape=caller_shape,
        fixed=None if any(d is None for d in caller_shape) else tuple(d for d in caller_shape if d is not None),
        perm=perm,
        scale=pre.scale if pre is not None else None,
        mean=_per_channel(pre.mean if pre is not None else None, channel_axis, len(spec.shape)),
        std=_per_channel(pre.std if pre is not None else None, channel_axis, len(spec.shape)),
        affine=affine,
    )


def output_plan(spec: TensorSpec, index: int, raw: bool) -> OutputPlan:
    model_dtype = DTYPES[spec.dtype]
    affine = None
    if spec.quantization is not None and model_dtype.kind in "iu" and not raw:
        affine = Affine.from_spec(spec.quantization, model_dtype, len(spec.shape))
    return OutputPlan(spec.name, index, affine, model_dtype)


def caller_dtype_name(plan: InputPlan | OutputPlan) -> str:
    if isinstance(plan, InputPlan):
        return str(plan.caller_dtype)
    return "float32" if plan.affine is not None else str(plan.model_dtype)


def _is_numeric(pre: Preprocessing | None) -> bool:
    return pre is not None and (pre.scale is not None or pre.mean is not None or pre.std is not None)


def _perm(pre: Preprocessing | None) -> tuple[int, ...] | None:
    if pre is None or pre.layout_from is None or pre.layout_to is None or pre.layout_from == pre.layout_to:
        return None
    return _LAYOUT_PERM[(pre.layout_from, pre.layout_to)]


def _per_channel(values: Sequence[float] | None, axis: int, rank: int) -> Array | None:
    if values is None:
        return None
    arr = np.asarray(values, dtype=np.float32)
    if arr.size == 1 or rank == 0:
        return arr.reshape(())
    shape = [1] * rank
    shape[axis] = arr.size
    return arr.reshape(shape)
