"""A numpy reference evaluator for the ML program inside a Core ML ``.mlpackage``.

Core ML predicts only on Apple platforms; coremltools has no interpreter. This module
runs a program's main function op by op in numpy so that the compiler can check a
converted or compressed model on Linux against the source model.

How an op is computed:

* ``const`` ops and ops whose inputs are all constant (weights, and the ``constexpr_*``
  decompression ops of compressed weights) are evaluated once, when the evaluator is built.
* Ops in ``kernels.py`` (conv, pooling, normalization, quantize/dequantize, weight
  decompression, linear/matmul, softmax, GELU, reductions, reshape, gather, ...) run there.
* A whitelist of other ops (``VALUE_INFERENCE_OPS``) runs through the op's own numpy
  ``value_inference()`` from coremltools, fed the actual input values.
* Anything else raises ``UnsupportedOpError``; ``unsupported_ops(program)`` lists such ops
  up front so a caller can report "not checked here; needs hardware" instead of failing.

Numerics: float16 values are widened to float32 before an op runs and the op's result is
rounded to the dtype the program declares for it. An fp16 program is therefore evaluated
with fp16 storage between ops and fp32 arithmetic inside each op, which is roughly what
Core ML's GPU and Neural Engine do; bit-exact agreement with a device is not promised.

Private coremltools APIs used (pinned to coremltools==9.0, checked when the evaluator
first loads coremltools; ``CoreMLVersionError`` on any other version):
``coremltools.converters.mil.frontend.milproto.load.load`` (spec -> pymil ``Program``),
the pymil ``Function``/``Block``/``Operation``/``Var`` objects (``operations``, ``inputs``,
``outputs``, ``op_type``, ``opset_version``, ``blocks``, ``Var.sym_type``, ``Var.val``), the
private ``Var._sym_val`` slot (set to the actual input values while a ``value_inference()``
runs), and ``coremltools.converters.mil.mil.types`` (``nptype_from_builtin``,
``string_to_nptype``, ``is_tensor``, ``is_scalar``, ``is_str``).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.compiler.coreml import kernels
from edgeship.errors import EdgeshipError, ModelLoadError
from edgeship.runtime.backends.base import TensorInfo

Array = np.ndarray[Any, Any]

PINNED_COREMLTOOLS = "9.0"


class CoreMLVersionError(EdgeshipError):
    """coremltools is missing or not the version whose private program API the evaluator was written against."""


class UnsupportedOpError(ModelLoadError):
    """The program holds an op the reference evaluator cannot compute; ``op_type`` names it."""

    def __init__(self, op_type: str, detail: str = "") -> None:
        self.op_type = op_type
        super().__init__(
            f"the Core ML reference evaluator does not implement op {op_type!r}{detail}; "
            "this program can only be checked on Apple hardware"
        )


class EvaluationError(EdgeshipError):
    """An op failed while the reference evaluator computed it (bad feed, or a program the evaluator misreads)."""


@functools.lru_cache(maxsize=1)
def coremltools_module() -> Any:
    """Import coremltools and check that it is the pinned version; raise ``CoreMLVersionError`` otherwise."""
    try:
        import coremltools
    except ImportError as exc:
        raise CoreMLVersionError(
            f"coremltools is not installed; the Core ML reference evaluator needs coremltools=={PINNED_COREMLTOOLS} "
            "(pip install 'edgeship[compiler]')"
        ) from exc
    if coremltools.__version__ != PINNED_COREMLTOOLS:
        raise CoreMLVersionError(
            f"the Core ML reference evaluator reads coremltools' private program API and is pinned to "
            f"coremltools=={PINNED_COREMLTOOLS}, but {coremltools.__version__} is installed; "
            f"pip install 'coremltools=={PINNED_COREMLTOOLS}'"
        )
    return coremltools


def _types() -> Any:
    coremltools_module()
    from coremltools.converters.mil.mil import types

    return types


# ---------------------------------------------------------------------------- loading


def load_program(path: str | os.PathLike[str]) -> Any:
    """Load the pymil ``Program`` of an ``.mlpackage`` (or ``.mlmodel`` ML program) without Core ML.

    Raises ``ModelLoadError`` when the file is not an ML program coremltools can read.
    """
    ct = coremltools_module()
    try:
        model = ct.models.MLModel(str(path), skip_model_load=True)
        kind = model.get_spec().WhichOneof("Type")
        if kind != "mlProgram":
            raise ModelLoadError(f"{Path(path).name} is a Core ML {kind} model, not an ML program")
        return program_of(model)
    except ModelLoadError:
        raise
    except Exception as exc:  # coremltools raises bare exceptions for unreadable specs
        raise ModelLoadError(f"coremltools could not read {Path(path).name}: {type(exc).__name__}: {exc}") from exc


def program_of(mlmodel: Any) -> Any:
    """The pymil ``Program`` of an ``MLModel`` (ML program), as its spec and weight files describe it."""
    coremltools_module()
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    spec = mlmodel.get_spec()
    return milproto_load(spec, spec.specificationVersion, mlmodel.weights_dir or "")


def main_function(program: Any) -> Any:
    """The function a Core ML model runs by default (``main`` unless the program names another)."""
    functions = program.functions
    name = getattr(program, "default_function_name", None) or "main"
    if name not in functions:
        name = next(iter(functions))
    return functions[name]


def _walk(block: Any) -> Iterable[Any]:
    for op in block.operations:
        yield op
        for inner in op.blocks:
            yield from _walk(inner)


# ---------------------------------------------------------------------------- op table

Args = Mapping[str, Any]
Kernel = Callable[[Any, Args], Any]
_KERNELS: dict[str, Kernel] = {}


def _kernel(*op_types: str) -> Callable[[Kernel], Kernel]:
    def register(fn: Kernel) -> Kernel:
        for op_type in op_types:
            _KERNELS[op_type] = fn
        return fn

    return register


def _ints(value: Any) -> list[int] | None:
    return None if value is None else [int(v) for v in np.asarray(value).reshape(-1)]


def _scalar(value: Any, default: Any = None) -> Any:
    if value is None:
        return default
    return np.asarray(value).item()


@_kernel("conv")
def _conv(op: Any, a: Args) -> Array:
    spatial = a["x"].ndim - 2
    return kernels.conv(
        a["x"],
        a["weight"],
        a.get("bias"),
        _ints(a.get("strides")) or [1] * spatial,
        str(a.get("pad_type") or "valid"),
        _ints(a.get("pad")),
        _ints(a.get("dilations")) or [1] * spatial,
        int(_scalar(a.get("groups"), 1)),
    )


@_kernel("max_pool", "avg_pool")
def _pool(op: Any, a: Args) -> Array:
    return kernels.pool(
        a["x"],
        "max" if op.op_type == "max_pool" else "avg",
        _ints(a["kernel_sizes"]) or [],
        _ints(a.get("strides")) or [1] * (a["x"].ndim - 2),
        str(a.get("pad_type") or "valid"),
        _ints(a.get("pad")),
        bool(_scalar(a.get("ceil_mode"), False)),
        bool(_scalar(a.get("exclude_padding_from_average"), False)),
    )


@_kernel("batch_norm")
def _batch_norm(op: Any, a: Args) -> Array:
    return kernels.batch_norm(
        a["x"], a["mean"], a["variance"], a.get("gamma"), a.get("beta"), float(_scalar(a.get("epsilon"), 1e-5))
    )


@_kernel("instance_norm")
def _instance_norm(op: Any, a: Args) -> Array:
    return kernels.instance_norm(a["x"], a.get("gamma"), a.get("beta"), float(_scalar(a.get("epsilon"), 1e-5)))


@_kernel("layer_norm")
def _layer_norm(op: Any, a: Args) -> Array:
    return kernels.layer_norm(
        a["x"], _ints(a.get("axes")), a.get("gamma"), a.get("beta"), float(_scalar(a.get("epsilon"), 1e-5))
    )


@_kernel("linear")
def _linear(op: Any, a: Args) -> Array:
    out = np.matmul(a["x"], a["weight"].T)
    bias = a.get("bias")
    return out if bias is None else out + bias


@_kernel("matmul")
def _matmul(op: Any, a: Args) -> Array:
    x, y = a["x"], a["y"]
    if _scalar(a.get("transpose_x"), False):
        x = np.swapaxes(x, -1, -2)
    if _scalar(a.get("transpose_y"), False):
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@_kernel("softmax")
def _softmax(op: Any, a: Args) -> Array:
    return kernels.softmax(a["x"], int(_scalar(a.get("axis"), -1)))


@_kernel("gelu")
def _gelu(op: Any, a: Args) -> Array:
    return kernels.gelu(a["x"], str(a.get("mode") or "EXACT"))


@_kernel("relu")
def _relu(op: Any, a: Args) -> Array:
    return np.maximum(a["x"], 0)


@_kernel("sigmoid")
def _sigmoid(op: Any, a: Args) -> Array:
    return kernels.sigmoid(a["x"])


@_kernel("silu")
def _silu(op: Any, a: Args) -> Array:
    return a["x"] * kernels.sigmoid(a["x"])


@_kernel("tanh")
def _tanh(op: Any, a: Args) -> Array:
    return np.tanh(a["x"])


@_kernel("erf")
def _erf(op: Any, a: Args) -> Array:
    return kernels.erf(a["x"])


_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "add": np.add,
    "sub": np.subtract,
    "mul": np.multiply,
    "real_div": np.true_divide,
    "maximum": np.maximum,
    "minimum": np.minimum,
    "pow": np.power,
}


@_kernel(*_BINARY)
def _binary(op: Any, a: Args) -> Array:
    return np.asarray(_BINARY[op.op_type](a["x"], a["y"]))


_REDUCTIONS = ("sum", "mean", "max", "min", "prod", "sum_square", "l1_norm", "l2_norm", "log_sum", "log_sum_exp")


@_kernel(*(f"reduce_{kind}" for kind in _REDUCTIONS))
def _reduce(op: Any, a: Args) -> Array:
    return kernels.reduce(
        op.op_type.removeprefix("reduce_"), a["x"], _ints(a.get("axes")), bool(_scalar(a.get("keep_dims"), False))
    )


@_kernel("reduce_argmax", "reduce_argmin")
def _reduce_arg(op: Any, a: Args) -> Array:
    return kernels.reduce_arg(
        op.op_type.removeprefix("reduce_"),
        a["x"],
        int(_scalar(a.get("axis"), -1)),
        bool(_scalar(a.get("keep_dims"), False)),
    )


@_kernel("cumsum")
def _cumsum(op: Any, a: Args) -> Array:
    return kernels.cumsum(
        a["x"],
        int(_scalar(a.get("axis"), 0)),
        bool(_scalar(a.get("exclusive"), False)),
        bool(_scalar(a.get("reverse"), False)),
    )


@_kernel("reshape")
def _reshape(op: Any, a: Args) -> Array:
    ct = coremltools_module()
    return kernels.reshape(a["x"], _ints(a["shape"]) or [], op.opset_version >= ct.target.iOS17)


@_kernel("transpose")
def _transpose(op: Any, a: Args) -> Array:
    return np.transpose(a["x"], _ints(a["perm"]))


@_kernel("expand_dims")
def _expand_dims(op: Any, a: Args) -> Array:
    x = a["x"]
    axes = _ints(a["axes"]) or []
    rank = np.ndim(x) + len(axes)
    return np.expand_dims(x, tuple(sorted(ax % rank for ax in axes)))


@_kernel("squeeze")
def _squeeze(op: Any, a: Args) -> Array:
    axes = _ints(a.get("axes"))
    x = np.asarray(a["x"])
    return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(axes))


@_kernel("concat")
def _concat(op: Any, a: Args) -> Array:
    return kernels.concat(list(a["values"]), int(_scalar(a["axis"])), bool(_scalar(a.get("interleave"), False)))


@_kernel("split")
def _split(op: Any, a: Args) -> list[Array]:
    num = a.get("num_splits")
    return kernels.split(
        a["x"],
        int(_scalar(a["axis"])),
        None if num is None else int(_scalar(num)),
        _ints(a.get("split_sizes")),
    )


@_kernel("gather")
def _gather(op: Any, a: Args) -> Array:
    return kernels.gather(a["x"], a["indices"], int(_scalar(a.get("axis"), 0)), int(_scalar(a.get("batch_dims"), 0)))


@_kernel("gather_nd")
def _gather_nd(op: Any, a: Args) -> Array:
    return kernels.gather_nd(a["x"], a["indices"], int(_scalar(a.get("batch_dims"), 0)))


@_kernel("upsample_bilinear")
def _upsample_bilinear(op: Any, a: Args) -> Array:
    x = a["x"]
    out_h, out_w = op.outputs[0].shape[-2:]
    if not isinstance(out_h, (int, np.integer)) or not isinstance(out_w, (int, np.integer)):
        # coremltools' own type inference: floor(size * scale)
        out_h = int(np.floor(x.shape[-2] * float(_scalar(a.get("scale_factor_height"), 1))))
        out_w = int(np.floor(x.shape[-1] * float(_scalar(a.get("scale_factor_width"), 1))))
    align = bool(_scalar(a.get("align_corners"), True))
    half_pixel = bool(_scalar(a.get("half_pixel_centers"), not align))
    return kernels.upsample_bilinear(x, int(out_h), int(out_w), align, half_pixel)


@_kernel("shape")
def _shape(op: Any, a: Args) -> Array:
    return np.array(np.shape(a["x"]), dtype=np.int32)


@_kernel("identity")
def _identity(op: Any, a: Args) -> Any:
    return a["x"]


@_kernel("cast")
def _cast(op: Any, a: Args) -> Array:
    # The declared output dtype (applied to every result) is the cast's target dtype.
    return np.asarray(a["x"])


@_kernel("quantize")
def _quantize(op: Any, a: Args) -> Array:
    axis = a.get("axis")
    return kernels.quantize(
        a["input"],
        a["scale"],
        a.get("zero_point"),
        None if axis is None else int(_scalar(axis)),
        str(a["output_dtype"]),
    )


@_kernel("dequantize")
def _dequantize(op: Any, a: Args) -> Array:
    axis = a.get("axis")
    return kernels.dequantize(a["input"], a["scale"], a.get("zero_point"), None if axis is None else int(_scalar(axis)))


@_kernel("constexpr_affine_dequantize")
def _affine_dequantize(op: Any, a: Args) -> Array:
    return kernels.dequantize(a["quantized_data"], a["scale"], a["zero_point"], int(_scalar(a["axis"])))


@_kernel("constexpr_blockwise_shift_scale")
def _blockwise_shift_scale(op: Any, a: Args) -> Array:
    return kernels.blockwise_shift_scale(a["data"], a["scale"], a.get("offset"))


@_kernel("constexpr_lut_to_dense")
def _lut_to_dense(op: Any, a: Args) -> Array:
    if "shape" in op.inputs and op.inputs["shape"] is not None:  # iOS16: one LUT, bit-packed indices
        return kernels.lut_to_dense_ios16(a["indices"], a["lut"], _ints(a["shape"]) or [])
    axis = a.get("vector_axis")
    return kernels.lut_to_dense_ios18(a["indices"], a["lut"], None if axis is None else int(_scalar(axis)))


@_kernel("constexpr_sparse_to_dense")
def _sparse_to_dense(op: Any, a: Args) -> Array:
    shape = _ints(a["shape"]) if op.inputs.get("shape") is not None else None
    return kernels.sparse_to_dense(a["nonzero_data"], a["mask"], shape)


@_kernel("constexpr_cast")
def _constexpr_cast(op: Any, a: Args) -> Array:
    return np.asarray(a["source_val"])


# Ops computed by coremltools' own numpy value_inference(); tests/test_coreml_reference.py checks
# each against PyTorch or numpy. Left out on purpose: ops whose value_inference is partial or wrong
# (cumsum with exclusive=True, gather with batch_dims, reverse_sequence), or depends on values that
# are only known at run time (non_zero), and control flow, lists and states.
VALUE_INFERENCE_OPS = frozenset(
    {
        # elementwise unary
        "abs", "acos", "asin", "atan", "atanh", "ceil", "clip", "cos", "cosh", "exp", "exp2", "floor",
        "inverse", "log", "logical_not", "round", "rsqrt", "sign", "sin", "sinh", "sqrt", "square", "tan",
        "threshold",
        # activations
        "clamped_relu", "elu", "leaky_relu", "linear_activation", "prelu", "relu6", "scaled_tanh",
        "sigmoid_hard", "softplus", "softplus_parametric", "softsign", "thresholded_relu",
        # elementwise binary and comparison
        "equal", "not_equal", "greater", "greater_equal", "less", "less_equal", "logical_and", "logical_or",
        "logical_xor", "floor_div", "mod", "select",
        # tensor ops
        "slice_by_index", "slice_by_size", "pad", "tile", "stack", "reverse", "band_part", "fill", "range_1d",
        "argsort", "topk", "gather_along_axis", "scatter_along_axis", "l2_norm", "einsum", "flatten2d",
    }
)  # fmt: skip


def supported_ops() -> frozenset[str]:
    """Every MIL op type the evaluator computes (own kernels, coremltools value_inference, and const)."""
    return frozenset(_KERNELS) | VALUE_INFERENCE_OPS | {"const"}


def unsupported_ops(program: Any) -> list[str]:
    """Sorted op types in ``program`` (a pymil Program, or a path to an ``.mlpackage``) that the evaluator
    cannot compute, including ops inside nested blocks. Empty when the whole program can be checked here."""
    if isinstance(program, (str, os.PathLike)):
        program = load_program(program)
    known = supported_ops()
    return sorted({op.op_type for op in _walk(main_function(program)) if op.op_type not in known})


# ---------------------------------------------------------------------------- evaluation


class _Held:
    """Stands in for a coremltools builtin value: ``Var.val`` reads ``Var._sym_val.val``."""

    __slots__ = ("val",)

    def __init__(self, val: Any) -> None:
        self.val = val


def _widen(value: Any) -> Any:
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype == np.float16:
        return np.asarray(value, dtype=np.float32)
    return value


class ReferenceEvaluator:
    """Evaluates the main function of an ML program in numpy.

    ``inputs`` and ``outputs`` describe the function's tensors as a caller sees them (names,
    shapes with ``None`` for flexible dims, numpy dtypes). ``run`` takes feeds by name and
    returns outputs by name. Building the evaluator loads the program and decompresses
    its weights once; it raises ``UnsupportedOpError`` for the first op it cannot compute,
    ``ModelLoadError`` for a file coremltools cannot read, and ``CoreMLVersionError`` when
    coremltools is not the pinned version. One evaluator may be shared between threads.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None, *, program: Any = None) -> None:
        if (path is None) == (program is None):
            raise ValueError("pass exactly one of path and program")
        if program is None:
            assert path is not None
            program = load_program(path)
        self.program = program
        self._function = main_function(self.program)
        missing = unsupported_ops(self.program)
        if missing:
            more = f" (and {', '.join(missing[1:])})" if len(missing) > 1 else ""
            raise UnsupportedOpError(missing[0], more)
        self._types = _types()
        self._lock = threading.Lock()  # value_inference temporarily writes into the program's Vars
        self.inputs = tuple(self._info(name, var) for name, var in self._function.inputs.items())
        self.outputs = tuple(self._info(var.name, var) for var in self._function.outputs)
        self._constants: dict[Any, Any] = {}
        self._ops: list[Any] = []
        for op in self._function.operations:
            if self._is_constant(op):
                self._evaluate(op, self._constants)
            else:
                self._ops.append(op)

    # -------------------------------------------------------------- description

    def _info(self, name: str, var: Any) -> TensorInfo:
        shape = tuple(d if isinstance(d, (int, np.integer)) else None for d in var.shape)
        return TensorInfo(name, tuple(None if d is None else int(d) for d in shape), self._dtype(var))

    def _dtype(self, var: Any) -> np.dtype[Any]:
        return np.dtype(self._types.nptype_from_builtin(var.dtype))

    @property
    def op_types(self) -> list[str]:
        """Sorted op types of the main function."""
        return sorted({op.op_type for op in _walk(self._function)})

    def weights(self) -> dict[str, Array]:
        """The decompressed value of every ``constexpr_*`` op output (compressed weights), by var name."""
        return {
            var.name: value
            for var, value in self._constants.items()
            if var.op is not None and var.op.op_type.startswith("constexpr_")
        }

    def _is_constant(self, op: Any) -> bool:
        if op.op_type == "const":
            return True
        if not op.op_type.startswith("constexpr_"):
            return False
        return all(v in self._constants for v in _flat_inputs(op))

    # -------------------------------------------------------------- running

    def run(self, feeds: Mapping[str, Any]) -> dict[str, Array]:
        """Evaluate once; ``feeds`` by input name (cast to each input's dtype), outputs by name.

        Raises ``EvaluationError`` for a missing or wrongly shaped feed or an op that fails.
        """
        env = self._evaluate_all(feeds)
        return {info.name: env[var] for info, var in zip(self.outputs, self._function.outputs)}

    def run_intermediates(self, feeds: Mapping[str, Any]) -> dict[str, Array]:
        """Evaluate once and return every tensor the program computes (inputs, op outputs) by var name;
        constants are left out. For calibration and debugging."""
        env = self._evaluate_all(feeds)
        return {var.name: value for var, value in env.items() if var not in self._constants}

    def _evaluate_all(self, feeds: Mapping[str, Any]) -> dict[Any, Any]:
        env: dict[Any, Any] = dict(self._constants)
        for info, (name, var) in zip(self.inputs, self._function.inputs.items()):
            if name not in feeds:
                raise EvaluationError(f"missing input {name!r} (the program takes {[i.name for i in self.inputs]})")
            value = np.asarray(feeds[name]).astype(info.dtype, copy=False)
            if len(value.shape) != len(info.shape) or any(
                d is not None and d != s for d, s in zip(info.shape, value.shape)
            ):
                raise EvaluationError(
                    f"input {name!r} has shape {list(value.shape)}, the program takes {list(info.shape)}"
                )
            env[var] = value
        with self._lock:
            for op in self._ops:
                self._evaluate(op, env)
        return env

    def _evaluate(self, op: Any, env: dict[Any, Any]) -> None:
        op_type = op.op_type
        if op_type == "const":
            env[op.outputs[0]] = op.outputs[0].val
            return
        try:
            if op_type in _KERNELS:
                args = {name: self._value(var, env) for name, var in op.inputs.items() if var is not None}
                result = _KERNELS[op_type](op, args)
            elif op_type in VALUE_INFERENCE_OPS:
                result = self._value_inference(op, env)
            else:
                raise UnsupportedOpError(op_type)
            results = list(result) if isinstance(result, (list, tuple)) else [result]
            if len(results) != len(op.outputs):
                raise ValueError(f"produced {len(results)} outputs, the program declares {len(op.outputs)}")
            for var, value in zip(op.outputs, results):
                env[var] = self._narrow(value, var)
        except UnsupportedOpError:
            raise
        except Exception as exc:  # a kernel or value_inference failed on these values
            raise EvaluationError(f"op {op.name!r} ({op_type}) failed: {type(exc).__name__}: {exc}") from exc

    def _value(self, var: Any, env: Mapping[Any, Any]) -> Any:
        if isinstance(var, (list, tuple)):
            return tuple(self._value(v, env) for v in var)
        value = env.get(var)
        if value is None:
            value = var.val
        if value is None:
            raise ValueError(f"no value for {var.name!r}")
        return _widen(value)

    def _value_inference(self, op: Any, env: Mapping[Any, Any]) -> Any:
        saved: dict[int, tuple[Any, Any]] = {}
        for var in _flat_inputs(op):
            if id(var) not in saved:
                saved[id(var)] = (var, var._sym_val)
                value = self._value(var, env)
                var._sym_val = _Held(value.copy() if isinstance(value, np.ndarray) else value)
        try:
            result = op.value_inference()
        finally:
            for var, old in saved.values():
                var._sym_val = old
        if result is None or (isinstance(result, (list, tuple)) and any(r is None for r in result)):
            raise ValueError("coremltools' value_inference returned no value for these inputs")
        return result

    def _narrow(self, value: Any, var: Any) -> Any:
        types = self._types
        if types.is_str(var.sym_type):
            return value
        if not (types.is_tensor(var.sym_type) or types.is_scalar(var.sym_type)):
            raise EvaluationError(f"output {var.name!r} is not a tensor (lists and states are not supported)")
        out = np.asarray(value).astype(self._dtype(var), copy=False)
        shape = var.shape
        if all(isinstance(d, (int, np.integer)) for d in shape) and out.shape != tuple(shape):
            if out.size != 1 or int(np.prod(shape, dtype=np.int64)) != 1:
                raise ValueError(f"computed shape {list(out.shape)}, the program declares {list(shape)}")
            out = out.reshape(shape)  # a scalar held as a 1-element array, or the reverse
        return out


def _flat_inputs(op: Any) -> list[Any]:
    flat: list[Any] = []
    for var in op.inputs.values():
        if isinstance(var, (list, tuple)):
            flat.extend(var)
        elif var is not None:
            flat.append(var)
    return flat
