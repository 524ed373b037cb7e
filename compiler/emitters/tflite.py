"""TFLite emitter: litert-torch converts the PyTorch model, ai-edge-quantizer quantizes it.

Precisions: ``fp32``; ``fp16`` (float16 weights); ``int8-dynamic`` (int8 weights, activations
quantized at run time); ``int8-weight-only``; ``int8-static`` (full integer with int8 I/O; the
runtime quantizes float inputs from the manifest, so callers still pass floats); ``w8a16``
(TFLite's 16x8 mode: int8 weights, int16 activations, for transformers whose residual stream and
attention mask one int8 scale cannot hold; the I/O as ai-edge-quantizer writes it, int16 outputs
dequantized by the runtime; XNNPACK has no 16x8 kernels, so on a CPU it runs TFLite's reference
kernels: an NPU's format more than a CPU's).

Static calibration uses our own statistics: ai-edge-quantizer's default calibration averages
per-batch min/max, which clips outputs (measured: max logit error 5.7 instead of 0.4). We
run its calibrator with a global min/max update instead.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from edgeship.compiler.data import Dataset
from edgeship.compiler.emitters.base import (
    ConversionCache,
    EmitRequest,
    Emitted,
    Emitter,
    convert_fp32,
    fp32_references,
)
from edgeship.compiler.quantizers import FALLBACK_NOTES, carried_ranges
from edgeship.compiler.quantizers.tflite import (
    TFLITE_STATIC,
    WIDE_RANGE,
    TFLiteQuantizer,
    tflite_layer_inputs,
    tflite_ops,
    tflite_skipped,
)
from edgeship.compiler.search.fronts import choose, tflite_float_ops
from edgeship.compiler.source import SourceModel
from edgeship.errors import UsageError
from edgeship.runtime.package.manifest import TensorSpec

PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-weight-only", "int8-static", "w8a16")


def emit(
    source: SourceModel,
    precision: str,
    workdir: Path,
    calibration: Dataset | None,
    *,
    max_op_versions: dict[str, int] | None = None,
    target: str = "tflite",
    static_io: str = "int8",
    min_cosine: float | None = None,
    max_float_fraction: float = 0.25,
    fallback: str = "auto",
    skipped: Callable[[str, str], bool] | None = None,
    cache: ConversionCache | None = None,
    trained_ranges: Mapping[str, Sequence[float]] | None = None,
) -> Emitted:
    """Write ``model.tflite`` into ``workdir``. Raises ``UsageError`` for what cannot be done.

    ``skipped(op_type, name)``: the recipe's skip rules, asked with TFLite op types
    (``FULLY_CONNECTED``) and each op's scope and output tensor names; the ops it skips stay float.
    ``cache``: the fp32 conversion shared with the compile's other variants (converted here when None).
    ``trained_ranges`` (int8-static of a PyTorch model): ``{layer: [min, max]}`` of what each layer's
    matrix multiply reads, as ``quantize.qat`` trained with them; those inputs keep these ranges
    instead of calibrated ones (the notes say how many were found in the graph).
    """
    if precision not in PRECISIONS:
        raise UsageError(f"TFLite precisions are {', '.join(PRECISIONS)}; not {precision!r}")
    if source.kind == "onnx":
        raise UsageError(
            "TFLite artifacts are converted from PyTorch or Keras models; an ONNX source goes to onnx or tensorrt targets"
        )
    if precision == "w8a16" and static_io == "float":
        raise UsageError(
            "tflite.static_io: float is for int8-static; a w8a16 model keeps its int16 I/O (the runtime "
            "quantizes float inputs and dequantizes int16 outputs for the caller): remove static_io from the recipe"
        )
    if precision in TFLITE_STATIC and calibration is None:
        raise UsageError(f"{precision} needs calibration data (--calib); or choose int8-dynamic, which needs none")
    workdir.mkdir(parents=True, exist_ok=True)
    fp32 = workdir / "model_fp32.tflite"
    # The target only names itself in a conversion error: keyed by it, so a cached error names the right one.
    convert_fp32(cache, f"tflite-{target}", fp32, lambda path: _convert(source, path, target))
    out = workdir / "model.tflite"
    notes: list[str] = []
    route = "tf.lite" if source.kind == "keras" else "litert-torch"
    if precision == "fp32":
        shutil.copyfile(fp32, out)
    else:
        route += " + ai-edge-quantizer"
        if precision == "fp16":
            _fp16(fp32, out)
        else:
            route += _quantize_int8(
                fp32,
                out,
                precision,
                source,
                calibration,
                min_cosine,
                max_float_fraction,
                fallback,
                skipped,
                notes,
                cache,
                trained_ranges if precision == "int8-static" and source.kind == "torch" else None,
            )
        if precision == "int8-static" and static_io == "float":
            from edgeship.compiler.emitters.tflite_io import float_io

            out.write_bytes(float_io(out.read_bytes()))
            notes.append("float32 I/O: QUANTIZE/DEQUANTIZE ops at the model's edges")
    inputs, outputs = _io_specs(out, source)
    constants = weight_bytes(out)
    if max_op_versions:
        check_op_versions(out, max_op_versions)
    return Emitted(
        "tflite",
        precision,
        "model/model.tflite",
        {"model/model.tflite": out},
        inputs,
        outputs,
        constants,
        route,
        notes,
    )


class TFLiteEmitter(Emitter):
    """TFLite targets (LiteRT, tflite-runtime): ``emit`` above, configured from the profile and recipe.

    The profile's ``max_op_versions`` refuses an artifact its runtime cannot load; the recipe's
    ``tflite_static_io``, sensitivity search (``min_cosine``) and skip rules shape the quantization.
    """

    format = "tflite"
    label = "TFLite"
    precisions = PRECISIONS
    sources = frozenset({"torch", "keras"})
    layer_search = ("int8-static", "w8a16", "int8-dynamic", "int8-weight-only")

    def emit(self, request: EmitRequest) -> Emitted:
        recipe, profile = request.recipe, request.profile
        if recipe.calibration_method != "minmax" and request.precision in TFLITE_STATIC:
            raise UsageError(
                f"TFLite {request.precision} calibrates with minmax only, not {recipe.calibration_method}; "
                "remove calibration.method from the recipe or choose an onnx target"
            )
        return emit(
            request.source,
            request.precision,
            request.workdir,
            request.calibration,
            max_op_versions=profile.max_op_versions or None,
            target=profile.name,
            static_io=recipe.tflite_static_io,
            min_cosine=recipe.quantize.min_cosine,
            max_float_fraction=recipe.quantize.max_float_fraction,
            fallback=recipe.quantize.fallback,
            skipped=recipe.quantize.skipped if recipe.quantize.any else None,
            cache=request.cache,
            trained_ranges=request.trained_ranges,
        )


def _convert(source: SourceModel, path: Path, target: str) -> None:
    if source.kind == "keras":
        _convert_tf(source, path)
        return
    import litert_torch

    args, kwargs = source.export_args()
    try:
        litert_torch.convert(source.module, args, **kwargs).export(str(path))
    except Exception as exc:
        unsupported = unsupported_ops(source.module, args)
        if unsupported:
            op, layer = unsupported[0]
            more = f" (and {len(unsupported) - 1} more)" if len(unsupported) > 1 else ""
            raise UsageError(
                f"op {op} in layer {layer!r} has no TFLite lowering in litert-torch{more}, so the model cannot be "
                f"compiled for {target}; replace that layer with supported ops, or choose an onnx target "
                "(ONNX Runtime) for this model"
            ) from None
        raise UsageError(_conversion_advice(exc, source.dynamic_batch)) from None


def _convert_tf(source: SourceModel, path: Path) -> None:
    """Keras model or SavedModel -> TFLite with TensorFlow's own converter (the tensorflow extra)."""
    import tensorflow as tf

    if source.saved_model_dir is not None:
        converter = tf.lite.TFLiteConverter.from_saved_model(str(source.saved_model_dir))
    else:
        converter = tf.lite.TFLiteConverter.from_keras_model(source.module)
    try:
        path.write_bytes(converter.convert())
    except Exception as exc:
        lines = [line for line in str(exc).splitlines() if "error" in line.lower()] or str(exc).splitlines() or [""]
        raise UsageError(
            f"tf.lite cannot convert the model: {lines[0].strip()}; the ops it names need TF Select or a replacement"
        ) from None


def unsupported_ops(module: Any, args: tuple[Any, ...]) -> list[tuple[str, str]]:
    """(ATen op, layer) pairs in the exported graph that litert-torch has no lowering for."""
    import litert_torch.backend.lowerings  # noqa: F401 - registers the lowerings
    import torch
    from litert_torch.backend.lowerings import registry

    try:
        program = torch.export.export(module, args).run_decompositions()
    except Exception:  # the model does not even export: the caller reports the converter's error
        return []
    found = []
    for node in program.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        if registry.lookup(node.target) is None:
            stack = node.meta.get("nn_module_stack") or {}
            layer = list(stack.values())[-1][0] if stack else ""
            found.append((str(node.target), layer or "(the model's forward)"))
    return found


def _conversion_advice(exc: Exception, dynamic: bool) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    for line in text:
        if "not supported" in line.lower() or "unsupported" in line.lower() or "no lowering" in line.lower():
            first = line.strip()
            break
    hint = ""
    if dynamic and ("as_strided" in str(exc) or "adaptive" in str(exc).lower()):
        hint = "; AdaptiveAvgPool2d cannot be converted with a dynamic batch: use x.mean((2, 3)) or a static batch"
    return f"litert-torch cannot convert the model for TFLite: {first}{hint}; try the onnx target or replace the op"


def _fp16(fp32: Path, out: Path) -> None:
    from ai_edge_quantizer import algorithm_manager, qtyping, quantizer

    q = quantizer.Quantizer(str(fp32))
    q.add_weight_only_config(
        regex=".*",
        operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
        num_bits=16,
        algorithm_key=algorithm_manager.AlgorithmName.FLOAT_CASTING,
    )
    q.quantize(enable_progress_report=False).export_model(str(out), overwrite=True)


def _quantize_int8(
    fp32: Path,
    out: Path,
    precision: str,
    source: SourceModel,
    calibration: Dataset | None,
    min_cosine: float | None,
    fraction: float,
    fallback: str,
    skipped: Callable[[str, str], bool] | None,
    notes: list[str],
    cache: ConversionCache | None = None,
    trained_ranges: Mapping[str, Sequence[float]] | None = None,
) -> str:
    """Quantize through the same ``TFLiteQuantizer`` the sensitivity search uses (static calibration:
    global min/max); with ``min_cosine``, set the most sensitive op scopes apart (``fallback``: int8
    weights with float compute, or float). Returns a route suffix."""
    feeds = list(calibration.batches(source.feed_batch)) if calibration is not None else [dict(source.example)]
    exclude = tflite_skipped(fp32, skipped) if skipped is not None else []
    carried: dict[str, tuple[float, float]] = {}
    if trained_ranges:
        carried, note = carried_ranges(tflite_layer_inputs(fp32, source.module, trained_ranges), trained_ranges)
        notes.append(note)
    quantizer = TFLiteQuantizer(
        precision, calibration=feeds if precision in TFLITE_STATIC else None, exclude=exclude, input_ranges=carried
    )
    if skipped is not None:
        notes.append(f"kept in float by the recipe's skip rules ({len(exclude)} ops): {exclude}")
    keep_float: list[str] = []
    suffix = ""
    if min_cosine is not None:
        found, used = choose(
            tflite_float_ops,
            fp32,
            quantizer,
            feeds,
            fp32_references(cache, feeds, source.reference),
            min_cosine,
            fraction,
            fallback,
        )
        keep_float = list(found.kept_float)
        notes += [
            found.summary(),
            *found.notes,
            f"set apart by sensitivity ({FALLBACK_NOTES[used]}; op scopes): {keep_float}",
        ]
        suffix = " + sensitivity"
    quantizer(fp32, out, keep_float)
    wide = quantizer.wide_ops(fp32)
    if wide:
        notes.append(
            f"{len(wide)} ops read or write a tensor wider than +-{WIDE_RANGE:g} (an additive attention mask): "
            "kept float, one int16 scale would round what they carry away"
        )
    if precision in TFLITE_STATIC:
        bits = "int16 (TFLite 16x8)" if precision == "w8a16" else "int8"
        notes.append(f"{bits} activations calibrated on {len(feeds)} batches with global min/max")
        lookups = sum(1 for key, _, _ in tflite_ops(fp32) if key.value == "EMBEDDING_LOOKUP")
        if lookups:
            notes.append(f"{lookups} embedding lookups: int8 tables, float outputs (hybrid kernel)")
    return suffix


def _io_specs(path: Path, source: SourceModel) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The artifact's I/O under the source's names and shapes (bound by position), with its dtypes and quantization."""
    from edgeship.compiler.emitters.tflite_io import io_specs

    inputs, outputs = io_specs(path)
    return (
        tuple(dataclasses.replace(spec, name=t.name, shape=t.shape) for t, spec in zip(source.inputs, inputs)),
        tuple(dataclasses.replace(spec, name=t.name, shape=t.shape) for t, spec in zip(source.outputs, outputs)),
    )


def weight_bytes(path: Path) -> int:
    """Bytes of constant buffers (weights): inline data, or data kept after the flatbuffer
    (``offset``/``size``, as ai-edge-quantizer writes quantized models)."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(path.read_bytes(), 0)
    total = 0
    for i in range(model.BuffersLength()):
        buffer = model.Buffers(i)
        total += buffer.DataLength() or (buffer.Size() if buffer.Offset() > 1 else 0)
    return int(total)


def op_versions(path: Path) -> dict[str, int]:
    """Highest version of every builtin op the model uses, by op name."""
    from ai_edge_litert import schema_py_generated as schema

    names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    model = schema.Model.GetRootAsModel(path.read_bytes(), 0)
    out: dict[str, int] = {}
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        op = max(code.BuiltinCode(), code.DeprecatedBuiltinCode())
        name = names.get(op, f"OP_{op}")
        out[name] = max(out.get(name, 0), code.Version())
    return out


def check_op_versions(path: Path, max_versions: dict[str, int]) -> None:
    """Raise ``UsageError`` when the model needs an op version the target's runtime does not load."""
    too_new = [
        f"{op} v{v} (the runtime loads up to v{max_versions[op]})"
        for op, v in sorted(op_versions(path).items())
        if op in max_versions and v > max_versions[op]
    ]
    if too_new:
        raise UsageError(
            "the target's TFLite runtime cannot load this model: needs "
            + ", ".join(too_new)
            + "; choose another precision (fp32 or int8-weight-only) or a newer runtime"
        )
