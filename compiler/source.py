"""The source model: a PyTorch module (or a saved ``torch.export`` program) or an ONNX file.

Holds what every emitter and the validation need: input and output specs, example
inputs, a hash of the source, and the fp32 reference outputs the artifacts are
compared against.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.errors import UsageError
from edgeship.runtime.io_plan import DTYPES
from edgeship.runtime.package.manifest import TensorSpec

Array = np.ndarray[Any, Any]
_TORCH_DTYPES = {
    "torch.float32": "float32",
    "torch.float16": "float32",
    "torch.int64": "int64",
    "torch.int32": "int32",
    "torch.int8": "int8",
    "torch.uint8": "uint8",
    "torch.bool": "bool",
}


@dataclass
class SourceModel:
    """A model to compile. ``module`` for PyTorch sources, ``onnx_path`` for ONNX sources."""

    kind: str  # "torch", "onnx" or "keras" (a Keras model or a TensorFlow SavedModel)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    example: dict[str, Array]
    sha256: str
    module: Any = None
    onnx_path: Path | None = None
    saved_model_dir: Path | None = None
    dynamic_batch: bool = False

    @property
    def feed_batch(self) -> int:
        """The batch data is fed to this model in: 1 when the first input's batch dimension is fixed,
        else 32 (calibration, validation and the passes' forward passes all use it)."""
        shape = self.inputs[0].shape
        return 1 if shape and shape[0] is not None else 32

    def export_args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """``(args, kwargs)`` for ``torch.export``-based converters: the example inputs as tensors
        in input order and, with ``dynamic_batch``, ``dynamic_shapes`` making axis 0 of each dynamic."""
        import torch

        args = tuple(torch.from_numpy(np.ascontiguousarray(self.example[t.name])) for t in self.inputs)
        if not self.dynamic_batch:
            return args, {}
        batch = torch.export.Dim("batch", min=1, max=4096)
        return args, {"dynamic_shapes": tuple({0: batch} for _ in args)}

    def reference(self, feeds: Mapping[str, Array]) -> dict[str, Array]:
        """Outputs of the fp32 source for ``feeds`` (arrays with the batch axis first)."""
        if self.kind == "torch":
            import torch

            with torch.no_grad():
                out = self.module(*(torch.from_numpy(np.ascontiguousarray(feeds[t.name])) for t in self.inputs))
            outs = out if isinstance(out, (tuple, list)) else (out,)
            return {t.name: o.detach().numpy() for t, o in zip(self.outputs, outs)}
        if self.kind == "keras":
            import tensorflow as tf

            if self.saved_model_dir is not None:
                result = self.module(**{t.name: tf.constant(feeds[t.name]) for t in self.inputs})
                return {t.name: result[t.name].numpy() for t in self.outputs}
            args = [feeds[t.name] for t in self.inputs]
            out = self.module(args if len(args) > 1 else args[0], training=False)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            return {t.name: np.asarray(o) for t, o in zip(self.outputs, outs)}
        session = _ort_session(self.onnx_path)
        values = session.run([t.name for t in self.outputs], {t.name: feeds[t.name] for t in self.inputs})
        return dict(zip((t.name for t in self.outputs), values))


_SESSIONS: dict[Path, Any] = {}


def _ort_session(path: Path | None) -> Any:
    import onnxruntime as ort

    assert path is not None
    if path not in _SESSIONS:
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        _SESSIONS[path] = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return _SESSIONS[path]


def from_module(
    module: Any,
    example_inputs: Sequence[Any] | Any,
    *,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_batch: bool = False,
) -> SourceModel:
    """Wrap an ``nn.Module`` and example inputs (tensors or arrays; batch axis first).

    Raises ``UsageError`` when the example inputs do not run through the model, or when a
    weight holds NaN/Inf (naming the parameter).
    """
    import torch

    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"expected a torch.nn.Module, got {type(module).__name__}")
    try:
        module = module.eval()
    except NotImplementedError:
        pass  # a torch.export program's module: it has no train/eval modes, it was exported in one
    examples = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    tensors = tuple(torch.as_tensor(np.asarray(e)) if not isinstance(e, torch.Tensor) else e for e in examples)
    for name, param in list(module.named_parameters()) + list(module.named_buffers()):
        if param.is_floating_point() and not torch.isfinite(param).all():
            raise UsageError(f"weight {name!r} holds NaN/Inf values; fix the model before compiling")
    try:
        with torch.no_grad():
            out = module(*tensors)
    except Exception as exc:  # any failure here means the examples do not fit the model
        shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
        raise UsageError(f"the example inputs ({shapes}) do not run through the model: {_first_line(exc)}") from None
    outs = out if isinstance(out, (tuple, list)) else (out,)
    in_names = list(input_names or ([f"input_{i}" for i in range(len(tensors))] if len(tensors) > 1 else ["input"]))
    out_names = list(output_names or ([f"output_{i}" for i in range(len(outs))] if len(outs) > 1 else ["output"]))
    if len(in_names) != len(tensors) or len(out_names) != len(outs):
        raise UsageError(
            f"{len(in_names)} input names for {len(tensors)} inputs / {len(out_names)} output names for {len(outs)} outputs"
        )
    inputs = tuple(_spec(n, t, dynamic_batch) for n, t in zip(in_names, tensors))
    outputs = tuple(_spec(n, o, dynamic_batch) for n, o in zip(out_names, outs))
    digest = hashlib.sha256()
    for key, value in module.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    example = {spec.name: t.detach().numpy() for spec, t in zip(inputs, tensors)}
    return SourceModel(
        "torch", inputs, outputs, example, digest.hexdigest(), module=module, dynamic_batch=dynamic_batch
    )


def from_pt2(path: Path, **kwargs: Any) -> SourceModel:
    """Load a saved ``torch.export`` program (``.pt2``) with its stored example inputs."""
    import torch

    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise UsageError(f"{path} is not a torch.export program (.pt2): {_first_line(exc)}") from None
    args = program.example_inputs[0] if program.example_inputs else None
    if not args:
        raise UsageError(f"{path} stores no example inputs; save it with torch.export.save after export(model, args)")
    kwargs.setdefault("input_names", list(program.graph_signature.user_inputs)[: len(args)] or None)
    source = from_module(program.module(), tuple(args), **kwargs)
    source.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return source


def from_onnx(path: Path) -> SourceModel:
    """Load an ONNX model (runs through ONNX Runtime for the reference outputs)."""
    import onnxruntime as ort

    try:
        session = _ort_session(path)
    except Exception as exc:
        raise UsageError(f"{path} is not a loadable ONNX model: {_first_line(exc)}") from None
    _ = ort  # imported for its side effect of failing early when missing
    from edgeship.runtime.backends.onnxruntime import _info

    def spec(arg: Any) -> TensorSpec:
        info = _info(arg)
        return TensorSpec(arg.name, str(info.dtype), info.shape)

    inputs = tuple(spec(a) for a in session.get_inputs())
    outputs = tuple(spec(a) for a in session.get_outputs())
    dynamic = any(t.shape and t.shape[0] is None for t in inputs)
    rng = np.random.default_rng(0)
    example = {
        t.name: (
            rng.standard_normal(tuple(1 if d is None else d for d in t.shape)).astype(DTYPES[t.dtype])
            if t.dtype.startswith("float")
            else np.zeros(tuple(1 if d is None else d for d in t.shape), DTYPES[t.dtype])
        )
        for t in inputs
    }
    return SourceModel(
        "onnx",
        inputs,
        outputs,
        example,
        hashlib.sha256(path.read_bytes()).hexdigest(),
        onnx_path=path,
        dynamic_batch=dynamic,
    )


def from_keras(path: Path, *, dynamic_batch: bool = False) -> SourceModel:
    """Load a Keras model (``.keras``/``.h5``) or a TensorFlow SavedModel directory (``tensorflow`` extra).

    Such a source compiles to TFLite targets (tf.lite's converter); other formats are refused.
    """
    try:
        import tensorflow as tf
    except ImportError:
        raise UsageError(
            "Keras and SavedModel input needs the tensorflow extra: pip install 'edgeship[tensorflow]'"
        ) from None

    digest = hashlib.sha256()
    saved: Path | None = None
    if path.is_dir():
        if not (path / "saved_model.pb").is_file():
            raise UsageError(f"{path} is a directory without saved_model.pb: not a SavedModel")
        for f in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f.relative_to(path).as_posix().encode())
            digest.update(f.read_bytes())
        try:
            signature = tf.saved_model.load(str(path)).signatures["serving_default"]
        except Exception as exc:
            raise UsageError(
                f"{path}: cannot load the SavedModel's serving_default signature: {_first_line(exc)}"
            ) from None
        in_specs = signature.structured_input_signature[1]
        inputs = tuple(_tf_spec(n, s, dynamic_batch) for n, s in sorted(in_specs.items()))
        outputs = tuple(_tf_spec(n, s, dynamic_batch) for n, s in sorted(signature.structured_outputs.items()))
        module: Any = signature
        saved = path
    else:
        try:
            module = tf.keras.models.load_model(str(path))
        except Exception as exc:
            raise UsageError(f"{path} is not a loadable Keras model: {_first_line(exc)}") from None
        digest.update(path.read_bytes())
        inputs = tuple(_tf_spec(t.name, t, dynamic_batch) for t in module.inputs)
        outs = module.outputs
        out_names = ["output"] if len(outs) == 1 else [f"output_{i}" for i in range(len(outs))]
        outputs = tuple(_tf_spec(n, t, dynamic_batch) for n, t in zip(out_names, outs))
    rng = np.random.default_rng(0)
    example = {}
    for t in inputs:
        shape = tuple(1 if d is None else d for d in t.shape)
        is_float = t.dtype.startswith("float")
        example[t.name] = (
            rng.standard_normal(shape).astype(DTYPES[t.dtype]) if is_float else np.zeros(shape, DTYPES[t.dtype])
        )
    return SourceModel(
        "keras",
        inputs,
        outputs,
        example,
        digest.hexdigest(),
        module=module,
        saved_model_dir=saved,
        dynamic_batch=dynamic_batch,
    )


def _tf_spec(name: str, tensor: Any, dynamic_batch: bool) -> TensorSpec:
    dims = [None if d is None else int(d) for d in tensor.shape]
    if dims and dims[0] is None and not dynamic_batch:
        dims[0] = 1
    dtype = getattr(tensor.dtype, "name", str(tensor.dtype))
    if dtype not in DTYPES:
        raise UsageError(f"tensor {name!r} has dtype {dtype}, which edgeship does not handle")
    return TensorSpec(name, dtype, tuple(dims))


def _spec(name: str, tensor: Any, dynamic_batch: bool) -> TensorSpec:
    dtype = _TORCH_DTYPES.get(str(tensor.dtype))
    if dtype is None:
        raise UsageError(f"tensor {name!r} has dtype {tensor.dtype}, which edgeship does not handle")
    shape: tuple[int | None, ...] = tuple(int(d) for d in tensor.shape)
    if dynamic_batch and shape:
        shape = (None, *shape[1:])
    return TensorSpec(name, dtype, shape)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
