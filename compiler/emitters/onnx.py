"""ONNX emitter for ONNX Runtime targets: torch.onnx (dynamo) export, onnxruntime quantization.

Precisions: ``fp32``; ``fp16`` (onnxruntime.transformers.float16, float32 I/O kept: on x86 CPU
ORT casts back to fp32, so expect no speed-up there); ``int8-dynamic`` (per-channel int8 weights,
activations quantized at run time); ``int8-qdq`` (static Q/DQ, per-channel weights, calibrated
activations on the inputs of Conv/MatMul/Gemm; MatMul/Gemm outputs stay float, which is what lets
a transformer hold: MiniLM's worst held-out sentence 0.80 with output pairs, 0.95 without).
Choose per model, or give a budget: the validation report shows what each does to accuracy.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import ClassVar

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
from edgeship.compiler.quantizers.onnx import OnnxQuantizer, layer_inputs
from edgeship.compiler.recipe import Recipe
from edgeship.compiler.search.fronts import choose, onnx_float_nodes
from edgeship.compiler.source import SourceModel
from edgeship.errors import UsageError

PRECISIONS = ("fp32", "fp16", "int8-dynamic", "int8-qdq")


def export_fp32(source: SourceModel, path: Path) -> None:
    """Write the source as a single-file fp32 ONNX model (an ONNX source is copied)."""
    if source.kind == "onnx":
        assert source.onnx_path is not None
        shutil.copyfile(source.onnx_path, path)
        return
    import torch

    args, kwargs = source.export_args()
    try:
        torch.onnx.export(
            source.module,
            args,
            str(path),
            dynamo=True,
            external_data=False,
            input_names=[t.name for t in source.inputs],
            output_names=[t.name for t in source.outputs],
            verbose=False,
            **kwargs,
        )
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        raise UsageError(f"torch.onnx cannot export the model: {lines[0] if lines else type(exc).__name__}") from None


def emit(
    source: SourceModel,
    precision: str,
    workdir: Path,
    calibration: Dataset | None,
    *,
    exclude_nodes: tuple[str, ...] = (),
    exclude_op_types: tuple[str, ...] = (),
    min_cosine: float | None = None,
    max_float_fraction: float = 0.25,
    fallback: str = "auto",
    reduce_range: bool = False,
    calibration_method: str = "minmax",
    cache: ConversionCache | None = None,
    trained_ranges: Mapping[str, Sequence[float]] | None = None,
) -> Emitted:
    """Write ``model.onnx`` into ``workdir``. Raises ``UsageError`` for what cannot be done.

    ``cache``: the fp32 export shared with the compile's other variants (exported here when None).
    ``trained_ranges`` (int8-qdq): ``{layer: [min, max]}`` of what each layer's matrix multiply
    reads, as ``quantize.qat`` trained with them; those inputs keep these ranges instead of
    calibrated ones (the notes say how many were found in the graph)."""
    if precision not in PRECISIONS:
        raise UsageError(f"ONNX precisions are {', '.join(PRECISIONS)}; not {precision!r}")
    if precision == "int8-qdq" and calibration is None:
        raise UsageError("int8-qdq needs calibration data (--calib); or choose int8-dynamic, which needs none")
    workdir.mkdir(parents=True, exist_ok=True)
    fp32 = workdir / "model_fp32.onnx"
    convert_fp32(cache, "onnx", fp32, lambda path: export_fp32(source, path))
    out = workdir / "model.onnx"
    notes: list[str] = []
    route = "torch.onnx" if source.kind == "torch" else "onnx file"
    if precision == "fp32":
        shutil.copyfile(fp32, out)
    elif precision == "fp16":
        import onnx
        from onnxruntime.transformers import float16

        model = float16.convert_float_to_float16(onnx.load(str(fp32)), keep_io_types=True)
        onnx.save(model, str(out))
        route += " + onnxruntime float16"
    else:
        _drop_value_info(fp32)
        route += " + onnxruntime.quantization"
        batch = 1 if not source.dynamic_batch else 32
        feeds = list(calibration.batches(batch)) if calibration is not None else [dict(source.example)]
        carried: dict[str, tuple[float, float]] = {}
        if precision == "int8-qdq" and trained_ranges:
            carried, note = carried_ranges(layer_inputs(fp32, trained_ranges), trained_ranges)
            notes.append(note)
        quantizer = OnnxQuantizer(
            precision,
            calibration=feeds if precision == "int8-qdq" else None,
            input_ranges=carried,
            exclude=exclude_nodes,
            exclude_op_types=exclude_op_types,
            reduce_range=reduce_range,
            calibration_method=calibration_method,
        )
        keep_float: list[str] = []
        if min_cosine is not None:
            references = fp32_references(cache, feeds, source.reference)
            found, used = choose(
                onnx_float_nodes, fp32, quantizer, feeds, references, min_cosine, max_float_fraction, fallback
            )
            keep_float = list(found.kept_float)
            notes += [
                found.summary(),
                *found.notes,
                f"set apart by sensitivity ({FALLBACK_NOTES[used]}): {keep_float}",
            ]
            route += " + sensitivity"
        quantizer(fp32, out, keep_float)
        if precision == "int8-dynamic":
            bits = "7-bit (reduce_range)" if reduce_range else "int8"
            notes.append(f"{bits} per-channel weights; activations quantized at run time")
        else:
            notes.append(f"static Q/DQ, per-channel weights, {calibration_method} calibration on {len(feeds)} batches")
            tables = _row_scaled_tables(out)
            if tables:
                notes.append(f"{tables} embedding tables (Gather on a constant): int8 rows, one scale per row")
    if exclude_nodes or exclude_op_types:
        notes.append(f"kept in float: nodes {list(exclude_nodes)}, op types {list(exclude_op_types)}")
    from edgeship.compiler.emitters.onnx_io import io_specs, weight_bytes

    inputs, outputs = io_specs(out)
    return Emitted(
        "onnx",
        precision,
        "model/model.onnx",
        {"model/model.onnx": out},
        inputs,
        outputs,
        weight_bytes(out),
        route,
        notes,
    )


class OnnxEmitter(Emitter):
    """ONNX Runtime targets: ``emit`` above, configured from the recipe (skip rules, sensitivity search,
    ``reduce_range``). Takes PyTorch models and ONNX files."""

    format = "onnx"
    label = "ONNX"
    precisions = PRECISIONS
    sources = frozenset({"torch", "onnx"})
    # ORT's entropy calibrator with its default bins gives a model byte-identical to minmax
    # (measured on the digits CNN), so only percentile is a different candidate.
    calibration_methods: ClassVar[Mapping[str, tuple[str, ...]]] = {"int8-qdq": ("percentile",)}
    layer_search = ("int8-dynamic", "int8-qdq")

    def emit(self, request: EmitRequest) -> Emitted:
        recipe = request.recipe
        nodes, types = exclusions(request.source, recipe, request.workdir, request.cache)
        return emit(
            request.source,
            request.precision,
            request.workdir,
            request.calibration,
            exclude_nodes=nodes,
            exclude_op_types=types,
            min_cosine=recipe.quantize.min_cosine,
            max_float_fraction=recipe.quantize.max_float_fraction,
            fallback=recipe.quantize.fallback,
            reduce_range=recipe.quantize.reduce_range,
            calibration_method=recipe.calibration_method,
            cache=request.cache,
            trained_ranges=request.trained_ranges,
        )


def exclusions(
    source: SourceModel, recipe: Recipe, work: Path, cache: ConversionCache | None = None
) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The ONNX node names and op types the recipe's skip rules keep in float (a probe export names the nodes)."""
    rules = recipe.quantize
    if not rules.any:
        return (), ()
    import onnx

    work.mkdir(parents=True, exist_ok=True)
    probe = work / "probe.onnx"
    convert_fp32(cache, "onnx", probe, lambda path: export_fp32(source, path))
    graph = onnx.load(str(probe)).graph
    nodes = tuple(n.name for n in graph.node if rules.skipped(n.op_type, n.name))
    types = tuple(sorted(t for t, r in rules.types.items() if r.skip))
    return nodes, types


def _drop_value_info(path: Path) -> None:
    """Remove intermediate shape annotations: the dynamo exporter writes some (e.g. for Gemm
    inputs) that onnxruntime.quantization's shape inference contradicts and refuses."""
    import onnx

    model = onnx.load(str(path))
    del model.graph.value_info[:]
    onnx.save(model, str(path))


def _row_scaled_tables(path: Path) -> int:
    """How many embedding tables ``onnx_weights`` stored as int8 rows in the model."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return sum(1 for t in model.graph.initializer if t.name.endswith("_wo_row_scale"))
