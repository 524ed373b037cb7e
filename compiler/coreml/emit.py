"""PyTorch -> Core ML ML program (``.mlpackage``) at one precision, with coremltools 9.0.

The route is ``torch.jit.trace`` then ``ct.convert(convert_to="mlprogram")``; compressed
precisions are applied afterwards with ``coremltools.optimize.coreml``:

=================== ================================================ ===================
precision           what                                             lowest min_os
=================== ================================================ ===================
fp32                float32 weights and activations                  iOS15 / macOS12
fp16                float16 weights and activations                  iOS15 / macOS12
int8-weight-only    int8 weights (linear symmetric, per channel)     iOS16 / macOS13
palettized-4bit     4-bit k-means look-up tables for weights         iOS16 / macOS13
w8a8                int8 weights and int8 activations (calibrated)   iOS17 / macOS14
int4-block          int4 weights, one scale per block of 32          iOS18 / macOS15
=================== ================================================ ===================

Weights a pruning pass zeroed (``prune.magnitude``, ``prune.sparse24``) are stored sparse at fp32
and fp16 (``sparse_weights``): coremltools' threshold pruner keeps exactly the zeros already there
(a bit mask plus the non-zero values, ``constexpr_sparse_to_dense``, iOS16 / macOS13 and later), so
the numerics are those of the pruned model and the file shrinks. Layers with fewer than
``SPARSE_MIN_ZEROS`` zeros stay dense. At the quantized precisions the zeros stay dense: sparse plus
quantized weights (coremltools' joint compression) need iOS18 and ops the reference evaluator does
not compute yet.

Inputs and outputs stay float32 at every precision (the program casts inside), so a
caller feeds the same arrays to every variant. Activation calibration for w8a8 normally
runs Core ML itself, which only exists on macOS; here the activation ranges come from the
numpy reference evaluator (``reference.py``), then coremltools' own passes insert the
quantize/dequantize pairs from those ranges.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeship.compiler.coreml import torch_ops
from edgeship.compiler.coreml.reference import (
    ReferenceEvaluator,
    coremltools_module,
    load_program,
    main_function,
    program_of,
    unsupported_ops,
)
from edgeship.compiler.data import Dataset
from edgeship.compiler.emitters.base import EmitRequest, Emitted, Emitter
from edgeship.compiler.quantizers import carried_ranges
from edgeship.compiler.search.layers import SensitivityResult
from edgeship.errors import UsageError
from edgeship.runtime.package.manifest import TensorSpec
from edgeship.targets import TargetProfile
from edgeship.targets.profile import COREML_MIN_SPEC, COREML_SPEC_VERSIONS

PRECISIONS = ("fp32", "fp16", "int8-weight-only", "palettized-4bit", "w8a8", "int4-block")

# The OS minimums live in edgeship.targets (COREML_SPEC_VERSIONS: min_os -> specification version,
# COREML_MIN_SPEC: precision -> lowest specification), the one table profiles are validated against.

INT4_BLOCK_SIZE = 32
#: A weight tensor is stored sparse when at least this share of it is zero. The bit mask costs 1 bit
#: per element, so at fp16 sparse storage is smaller from 1/16 zeros on; 25% keeps it to layers where
#: a pruning pass made the zeros, not the odd zero of a dense layer.
SPARSE_MIN_ZEROS = 0.25
#: The precisions whose weights can be stored sparse (the others are quantized: see the module doc).
SPARSE_PRECISIONS = ("fp32", "fp16")
_SPARSE_MIN_SPEC = 7  # constexpr_sparse_to_dense arrived with specification 7 (iOS16 / macOS13)
_COMPRESSION_DESCRIPTIONS = {
    "int8-weight-only": "int8 (linear symmetric, per channel)",
    "w8a8": "int8 (linear symmetric, per channel)",
    "palettized-4bit": "palettized (4-bit k-means look-up table)",
    "int4-block": f"int4 (linear symmetric, per block of {INT4_BLOCK_SIZE})",
}

Calibration = Sequence[Mapping[str, np.ndarray]]


@dataclass(frozen=True)
class CoreMLResult:
    """An emitted ``.mlpackage``.

    ``inputs``/``outputs``: the tensors a caller feeds and receives (float32 for float
    tensors, int32 for integer inputs). ``weight_bytes``: bytes of the weight blob files.
    ``weights_compressed``/``weights_float``: weight tensors (rank >= 2) coremltools
    compressed, and those it left in float. ``unchecked_ops``: op types the reference
    evaluator cannot compute, so the program's numerics can only be checked on Apple
    hardware (empty for everything it can check). ``notes``: one line per decision. ``search``:
    the w8a8 layer search's result when ``min_cosine`` asked for one.
    """

    path: Path
    precision: str
    min_os: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weight_bytes: int
    weights_compressed: int
    weights_float: int
    unchecked_ops: tuple[str, ...]
    notes: tuple[str, ...]
    search: SensitivityResult | None = None


def check_request(precision: str, min_os: str) -> None:
    """Raise ``UsageError`` (one line) for an unknown precision or min_os, or a precision that
    ``min_os`` cannot run (int4-block before iOS18/macOS15, w8a8 before iOS17/macOS14,
    compressed weights before iOS16/macOS13). Reads the tables in ``edgeship.targets``; needs no
    coremltools."""
    if precision not in PRECISIONS:
        raise UsageError(f"Core ML precisions are {', '.join(PRECISIONS)}; not {precision!r}")
    spec = COREML_SPEC_VERSIONS.get(min_os)
    if spec is None:
        raise UsageError(f"Core ML min_os must be one of {', '.join(COREML_SPEC_VERSIONS)}; not {min_os!r}")
    needed = COREML_MIN_SPEC[precision]
    if spec < needed:
        # Name the lowest OS of min_os's own family (macOS14 -> macOS15).
        family = min_os.rstrip("0123456789_")
        names = [name for name, s in COREML_SPEC_VERSIONS.items() if s == needed]
        same = [name for name in names if name.rstrip("0123456789_") == family] or names
        raise UsageError(
            f"Core ML precision {precision!r} needs {' or '.join(same)} or later (specification {needed}); "
            f"min_os is {min_os} (raise min_os, or choose another precision)"
        )


def emit_coreml(
    module: Any,
    example_inputs: tuple[Any, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    precision: str,
    min_os: str,
    out_path: str | os.PathLike[str],
    *,
    calibration: Calibration | None = None,
    sparse_weights: bool = False,
    min_cosine: float | None = None,
    max_float_fraction: float = 0.25,
    trained_ranges: Mapping[str, Sequence[float]] | None = None,
) -> CoreMLResult:
    """Convert ``module`` (a ``torch.nn.Module``) to an ML program at ``precision`` and save it at
    ``out_path`` (a ``.mlpackage`` directory, replaced if it exists).

    ``example_inputs`` fix the input shapes (no flexible dimensions). ``calibration`` (feed
    dicts by input name, each matching those shapes) is required for ``w8a8`` and ignored
    otherwise. ``sparse_weights``: store the zeros of fp32/fp16 weights sparse (a pruned model; a
    note says why when they stay dense). ``min_cosine`` (w8a8 only): run the layer search
    (``w8a8_float_ops``) on ``calibration`` against ``module``'s own outputs, leaving the input
    activations of the most sensitive ops in float until the worst sample reaches it, at most
    ``max_float_fraction`` of them; the notes say what it set apart and what it reached.
    ``trained_ranges`` (w8a8): ``{layer: [min, max]}`` (``named_modules`` names of ``module``) of
    what each linear or conv reads, as ``quantize.qat`` trained with them; those inputs keep these
    ranges instead of the evaluator's (symmetric: ``max(|min|, |max|) / 127``). Raises
    ``UsageError`` for a request ``min_os`` cannot run, bad names or calibration data, or a model
    coremltools cannot convert or compress; ``CoreMLVersionError`` when coremltools is not 9.0.
    """
    check_request(precision, min_os)
    out = Path(out_path)
    if out.suffix != ".mlpackage":
        raise UsageError(f"the Core ML output path must end in .mlpackage; got {out.name!r}")
    if len(input_names) != len(example_inputs):
        raise UsageError(f"{len(example_inputs)} example inputs but {len(input_names)} input names")
    if precision == "w8a8" and not calibration:
        raise UsageError(
            "Core ML precision 'w8a8' needs calibration data to set activation ranges: pass "
            "calibration=[{input name: array}, ...] (a few dozen representative samples)"
        )
    ct = coremltools_module()
    torch_ops.install()
    inputs = tuple(_input_spec(name, x) for name, x in zip(input_names, example_inputs))
    traced = _trace(module, example_inputs)
    base_precision = ct.precision.FLOAT32 if precision == "fp32" else ct.precision.FLOAT16
    try:
        mlmodel = ct.convert(
            traced,
            convert_to="mlprogram",
            minimum_deployment_target=getattr(ct.target, min_os),
            inputs=[
                ct.TensorType(name=s.name, shape=s.shape, dtype=np.float32 if s.dtype == "float32" else np.int32)
                for s in inputs
            ],
            outputs=[ct.TensorType(name=name, dtype=np.float32) for name in output_names],
            compute_precision=base_precision,
        )
    except Exception as exc:  # coremltools raises assorted types for ops it cannot convert
        raise UsageError(f"coremltools cannot convert the model to Core ML: {_first_line(exc)}") from exc

    float_name = "float32" if precision == "fp32" else "float16"
    notes = [
        f"torch.jit.trace + coremltools {ct.__version__} ML program for {min_os}; computes in {float_name}; "
        "inputs and outputs float32"
    ]
    found: SensitivityResult | None = None
    with tempfile.TemporaryDirectory(prefix="edgeship-coreml-") as tmp:
        if precision == "w8a8":
            assert calibration is not None
            quantizer = W8A8Quantizer(mlmodel, calibration, inputs, Path(tmp), trained_ranges or {})
            if trained_ranges:
                notes.append(quantizer.carried_note)
            keep_float: list[str] = []
            if min_cosine is not None:
                found = w8a8_float_ops(
                    quantizer, calibration, _torch_outputs(module, calibration, input_names, output_names),
                    min_cosine, max_float_fraction,
                )  # fmt: skip
                keep_float = list(found.kept_float)
                notes += [
                    found.summary(),
                    *found.notes,
                    f"set apart by sensitivity (activations float, weights int8): {keep_float}",
                ]
            mlmodel, pairs = quantizer(keep_float)
            notes.append(
                f"activations int8 at {pairs} quantize/dequantize pairs (inputs of conv, linear and pools; conv "
                f"outputs; {', '.join(W8A8_FLOAT_OP_TYPES)} inputs and {', '.join(W8A8_FLOAT_OUTPUT_OP_TYPES)} outputs "
                f"stay float); ranges (min/max) from {len(calibration)} calibration samples computed by the numpy "
                "reference evaluator (Core ML's own calibration needs macOS)"
            )
            if quantizer.zero_range:
                notes.append(
                    f"{len(quantizer.zero_range)} op(s) left with float activations: a tensor they read or write "
                    "was 0 on every calibration sample (or too small for a float16 scale), which gives no int8 "
                    f"scale: {quantizer.zero_range}; calibration samples that make them non-zero would let them "
                    "be quantized"
                )
        if precision in _COMPRESSION_DESCRIPTIONS and precision != "w8a8":  # W8A8Quantizer compressed them
            mlmodel = _compress_weights(mlmodel, precision)
        if sparse_weights:
            mlmodel, note = _sparse_weights(mlmodel, precision, min_os)
            notes.append(note)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        out.parent.mkdir(parents=True, exist_ok=True)
        mlmodel.save(str(out))
    program = load_program(out)
    compressed, float_weights = _weights(program)
    if precision in _COMPRESSION_DESCRIPTIONS:
        notes.append(_compression_note(precision, compressed, float_weights, float_name))
    unchecked = tuple(unsupported_ops(program))
    if unchecked:
        notes.append(f"ops {', '.join(unchecked)} are not checked here (no reference implementation); needs hardware")
    outputs = tuple(_output_spec(name, var) for name, var in zip(output_names, main_function(program).outputs))
    return CoreMLResult(
        path=out,
        precision=precision,
        min_os=min_os,
        inputs=inputs,
        outputs=outputs,
        weight_bytes=_weight_bytes(out),
        weights_compressed=len(compressed),
        weights_float=len(float_weights),
        unchecked_ops=unchecked,
        notes=tuple(notes),
        search=found,
    )


class CoreMLEmitter(Emitter):
    """Core ML targets: ``emit_coreml`` on the source's PyTorch module, at the profile's ``min_os``.

    Checked on Linux through the numpy reference evaluator (``coreml-reference``); latency and the
    Neural Engine's own numerics need an Apple device.
    """

    format = "coreml"
    label = "Core ML"
    precisions = PRECISIONS
    sources = frozenset({"torch"})
    validation_backend = "coreml-reference"
    layer_search: ClassVar[tuple[str, ...]] = ("w8a8",)

    def check(self, profile: TargetProfile, precision: str) -> None:
        super().check(profile, precision)
        try:
            check_request(precision, profile.min_os or "")
        except UsageError as exc:
            raise UsageError(f"target {profile.name}: {exc}; it offers {', '.join(profile.precisions)}") from None

    def emit(self, request: EmitRequest) -> Emitted:
        import torch

        from edgeship.compiler import coreml
        from edgeship.runtime.package import collect_directory

        source, work = request.source, request.workdir
        if source.kind != "torch":
            raise UsageError("Core ML artifacts are converted from PyTorch models")
        work.mkdir(parents=True, exist_ok=True)
        coreml.register()
        examples = tuple(torch.from_numpy(np.ascontiguousarray(source.example[t.name])) for t in source.inputs)
        result = emit_coreml(
            source.module,
            examples,
            [t.name for t in source.inputs],
            [t.name for t in source.outputs],
            request.precision,
            request.profile.min_os or "",
            work / "model.mlpackage",
            calibration=_samples(request.calibration),
            sparse_weights=any(entry.get("sparsity") for entry in request.passes),
            min_cosine=request.recipe.quantize.min_cosine,
            max_float_fraction=request.recipe.quantize.max_float_fraction,
            trained_ranges=request.trained_ranges,
        )
        return Emitted(
            "coreml",
            request.precision,
            "model/model.mlpackage",
            collect_directory(result.path, "model/model.mlpackage"),
            tuple(result.inputs),
            tuple(result.outputs),
            result.weight_bytes,
            "coremltools + sensitivity" if result.search is not None else "coremltools",
            list(result.notes),
        )


def _samples(data: Dataset | None) -> list[dict[str, np.ndarray]] | None:
    return None if data is None else list(data.batches(1))


# ---------------------------------------------------------------------------- conversion


def _torch_outputs(
    module: Any, samples: Calibration, input_names: Sequence[str], output_names: Sequence[str]
) -> list[dict[str, np.ndarray]]:
    """``module``'s outputs for each sample, by output name: the fp32 reference of a layer search."""
    import torch

    outs = []
    with _eval_mode(module), torch.no_grad():  # as traced: no dropout in the reference
        for sample in samples:
            got = module(*(torch.from_numpy(np.ascontiguousarray(sample[name])) for name in input_names))
            got = got if isinstance(got, (tuple, list)) else (got,)
            outs.append({name: value.detach().numpy() for name, value in zip(output_names, got)})
    return outs


def _input_spec(name: str, example: Any) -> TensorSpec:
    import torch

    if not isinstance(example, torch.Tensor):
        raise UsageError(f"example input {name!r} is a {type(example).__name__}, not a torch.Tensor")
    if example.dtype.is_floating_point:
        dtype = "float32"
    elif example.dtype in (torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8):
        dtype = "int32"  # Core ML has no int64 inputs; token ids travel as int32
    else:
        raise UsageError(f"example input {name!r} has dtype {example.dtype}; Core ML inputs are float or integer")
    return TensorSpec(name, dtype, tuple(int(d) for d in example.shape))


def _output_spec(name: str, var: Any) -> TensorSpec:
    return TensorSpec(name, "float32", tuple(int(d) if isinstance(d, (int, np.integer)) else None for d in var.shape))


@contextlib.contextmanager
def _eval_mode(module: Any) -> Iterator[None]:
    """``module`` in eval mode inside the block, its own mode restored after (a torch.export
    program's module has no train/eval modes: left as it is)."""
    was_training = module.training
    try:
        module.eval()
    except NotImplementedError:
        yield
        return
    try:
        yield
    finally:
        module.train(was_training)


def _trace(module: Any, example_inputs: tuple[Any, ...]) -> Any:
    import torch

    try:
        with _eval_mode(module), torch.no_grad():
            return torch.jit.trace(module, example_inputs)
    except Exception as exc:  # torch raises assorted types for untraceable models
        raise UsageError(f"torch.jit.trace cannot trace the model: {_first_line(exc)}") from exc


# ---------------------------------------------------------------------------- weight compression


def _compress_weights(mlmodel: Any, precision: str) -> Any:
    import coremltools.optimize.coreml as cto

    # weight_threshold 0: small layers are compressed too (coremltools still skips 1-D tensors
    # and tensors under 10 elements; _weights() counts what stayed float).
    config: Any
    if precision in ("int8-weight-only", "w8a8"):
        config = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric", dtype="int8", granularity="per_channel", weight_threshold=0
        )
        apply = cto.linear_quantize_weights
    elif precision == "int4-block":
        config = cto.OpLinearQuantizerConfig(
            mode="linear_symmetric",
            dtype="int4",
            granularity="per_block",
            block_size=INT4_BLOCK_SIZE,
            weight_threshold=0,
        )
        apply = cto.linear_quantize_weights
    else:
        config = cto.OpPalettizerConfig(mode="kmeans", nbits=4, weight_threshold=0)
        apply = cto.palettize_weights
    try:
        return apply(mlmodel, cto.OptimizationConfig(global_config=config))
    except Exception as exc:  # coremltools raises ValueError/AssertionError for weights it cannot compress
        raise UsageError(f"coremltools cannot compress the weights to {precision}: {_first_line(exc)}") from exc


def _sparse_weights(mlmodel: Any, precision: str, min_os: str) -> tuple[Any, str]:
    """Store the zeros of float weights sparse (lossless); the model and a note saying what was done."""
    import coremltools.optimize.coreml as cto

    if precision not in SPARSE_PRECISIONS:
        return mlmodel, (
            f"the pruned weights' zeros are stored dense at {precision} (sparse storage is done at "
            f"{' and '.join(SPARSE_PRECISIONS)}; sparse plus quantized needs iOS18 joint compression, not built)"
        )
    if COREML_SPEC_VERSIONS[min_os] < _SPARSE_MIN_SPEC:
        return (
            mlmodel,
            f"the pruned weights' zeros are stored dense: sparse weights need iOS16 / macOS13; min_os is {min_os}",
        )
    before = _dense_zeros(program_of(mlmodel))
    config = cto.OpThresholdPrunerConfig(
        threshold=1e-12, minimum_sparsity_percentile=SPARSE_MIN_ZEROS, weight_threshold=0
    )
    try:
        sparse = cto.prune_weights(mlmodel, cto.OptimizationConfig(global_config=config))
    except Exception as exc:  # coremltools raises ValueError/AssertionError for weights it cannot compress
        raise UsageError(f"coremltools cannot store the pruned weights sparse: {_first_line(exc)}") from exc
    stored = [op for op in main_function(program_of(sparse)).operations if op.op_type == "constexpr_sparse_to_dense"]
    zeros = sum(z for _name, z, _n in before if z / _n >= SPARSE_MIN_ZEROS)
    total = sum(n for _name, _z, n in before if _z / n >= SPARSE_MIN_ZEROS)
    dense = [name for name, z, n in before if z / n < SPARSE_MIN_ZEROS]
    note = (
        f"{len(stored)} of {len(before)} weight tensors stored sparse (bit mask + non-zero values, "
        f"constexpr_sparse_to_dense): {zeros / max(total, 1):.0%} of their weights are zeros the passes made"
    )
    if dense:
        note += f"; {len(dense)} stayed dense (under {SPARSE_MIN_ZEROS:.0%} zeros: {', '.join(dense[:4])})"
    return sparse, note


def _dense_zeros(program: Any) -> list[tuple[str, int, int]]:
    """(name, zeros, elements) of every float weight a compute op reads (rank >= 2, as ``_weights``)."""
    _compressed, floats = _weights(program)
    values = {
        op.outputs[0].name: op.outputs[0].val for op in main_function(program).operations if op.op_type == "const"
    }
    return [(name, int(np.count_nonzero(np.asarray(values[name]) == 0)), int(np.prod(shape))) for name, shape in floats]


def _weights(program: Any) -> tuple[list[str], list[tuple[str, tuple[int, ...]]]]:
    """(compressed weights, float weights) of a program's main function.

    A weight is a constant of rank >= 2 that a compute op reads (biases and scalars are not
    counted). Compressed: the output of a ``constexpr_*`` op that a compute op reads.
    """
    types = _types()
    compressed: list[str] = []
    floats: list[tuple[str, tuple[int, ...]]] = []
    for op in main_function(program).operations:
        out = op.outputs[0]
        readers = [child.op_type for child in out.child_ops]
        if not readers or all(r.startswith("constexpr_") for r in readers):
            continue
        if op.op_type.startswith("constexpr_"):
            compressed.append(out.name)
        elif (
            op.op_type == "const"
            and types.is_tensor(out.sym_type)
            and types.is_float(out.dtype)
            and out.rank >= 2
            and int(np.prod(out.shape)) >= 10
        ):
            floats.append((out.name, tuple(int(d) for d in out.shape)))
    return compressed, floats


def _compression_note(
    precision: str,
    compressed: list[str],
    floats: list[tuple[str, tuple[int, ...]]],
    float_name: str,
) -> str:
    total = len(compressed) + len(floats)
    note = f"{len(compressed)} of {total} weight tensors {_COMPRESSION_DESCRIPTIONS[precision]}"
    if floats:
        shown = ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape in floats[:4])
        more = f" and {len(floats) - 4} more" if len(floats) > 4 else ""
        reason = (
            f"an input dimension not divisible into blocks of {INT4_BLOCK_SIZE}"
            if precision == "int4-block"
            else "coremltools could not compress them"
        )
        note += f"; {len(floats)} stayed {float_name} ({shown}{more}: {reason})"
    return note


def _weight_bytes(package: Path) -> int:
    weights = package / "Data" / "com.apple.CoreML" / "weights"
    return sum(p.stat().st_size for p in weights.rglob("*") if p.is_file()) if weights.is_dir() else 0


# ---------------------------------------------------------------------------- activation quantization


class W8A8Quantizer:
    """Insert int8 quantize/dequantize pairs with coremltools' passes, from activation ranges the
    reference evaluator measured on ``calibration`` (once, when the quantizer is built), then
    quantize the weights (int8, per channel): the whole w8a8 model, so a layer search measures
    what ships.

    Calling it with ``keep_float`` (op names) leaves those ops' activations in float (the inputs,
    and a conv's output, which the passes would otherwise quantize): the layer search's fallback (their weights stay int8, so the model keeps its size). ``candidates``
    lists the ops whose inputs the passes quantize, the layer search's choices.

    ``trained_ranges``: ``{layer: [min, max]}`` that replace the measured ranges of what those
    PyTorch layers' linears and convs read (``coreml_layer_inputs``), before concat inputs and
    outputs are given one range; ``carried_note`` says how many were found.

    ``zero_range``: ops left with float activations because a tensor they read or write was 0 on
    every calibration sample (see ``_complete_stats``).
    """

    def __init__(
        self,
        mlmodel: Any,
        calibration: Calibration,
        inputs: tuple[TensorSpec, ...],
        tmp: Path,
        trained_ranges: Mapping[str, Sequence[float]] | None = None,
    ) -> None:
        from coremltools.optimize.coreml.experimental._post_training_quantization import (
            _adjust_concat_surrounding_activation_stats,
        )

        self._fp_path = tmp / "float.mlpackage"
        mlmodel.save(str(self._fp_path))
        self.evaluator = ReferenceEvaluator(self._fp_path)
        self._stats = activation_ranges(self.evaluator, calibration, inputs)
        function = main_function(self.evaluator.program)
        trained = trained_ranges or {}
        carried, self.carried_note = carried_ranges(coreml_layer_inputs(function, trained), trained, symmetric=True)
        for var, (lo, hi) in carried.items():
            self._stats[var] = {"rmin": lo, "rmax": hi}
        concat_groups = [
            [v.name for v in op.inputs["values"]] + [op.outputs[0].name]
            for op in function.operations
            if op.op_type == "concat"
        ]
        _adjust_concat_surrounding_activation_stats(concat_groups, self._stats)
        no_range, self.zero_range = _complete_stats(function, self._stats)
        self._skipped = [*no_range, *self.zero_range]

    def candidates(self) -> list[str]:
        """The ops whose input activations become int8 (``add`` inputs always stay float), in program order."""
        quantized = set(_ACTIVATION_INPUTS) - set(W8A8_FLOAT_OP_TYPES)
        skipped = set(self._skipped)
        return [
            op.name
            for op in main_function(self.evaluator.program).operations
            if op.op_type in quantized and op.name not in skipped
        ]

    def __call__(self, keep_float: Sequence[str] = ()) -> tuple[Any, int]:
        """The quantized model (int8 activations, then int8 weights) and its number of quantize ops."""
        import coremltools.optimize.coreml as cto
        from coremltools import _SPECIFICATION_VERSION_IOS_17
        from coremltools.converters.mil.frontend.milproto import load as milproto
        from coremltools.converters.mil.mil.passes.graph_pass import PassOption
        from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
        from coremltools.models import utils as model_utils

        ct = coremltools_module()
        unquantized = [*self._skipped, *keep_float]

        def config(float_types: tuple[str, ...]) -> Any:
            return cto.OptimizationConfig(
                global_config=cto.OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", weight_threshold=0),
                op_type_configs=dict.fromkeys(float_types),
                op_name_configs=dict.fromkeys(unquantized),
            )

        passes = []
        for name, float_types in (
            ("insert_prefix_quantize_dequantize_pair", W8A8_FLOAT_OP_TYPES),
            ("insert_suffix_quantize_dequantize_pair", (*W8A8_FLOAT_OP_TYPES, *W8A8_FLOAT_OUTPUT_OP_TYPES)),
        ):
            graph_pass = PASS_REGISTRY[f"compression::{name}"]
            graph_pass.set_options(
                [PassOption("config", config(float_types)), PassOption("activation_stats", self._stats)]
            )
            passes.append(graph_pass)
        passes.append(PASS_REGISTRY["common::dequantize_quantize_pair_elimination"])
        try:
            quantized = model_utils._apply_graph_pass(
                ct.models.MLModel(str(self._fp_path), skip_model_load=True),
                passes,
                spec_version=_SPECIFICATION_VERSION_IOS_17,
                pymil_load_func=milproto.load,
                skip_model_load=True,
            )
        except Exception as exc:  # the passes raise ValueError for patterns they cannot quantize
            raise UsageError(f"coremltools cannot quantize the activations: {_first_line(exc)}") from exc
        pairs = sum(1 for op in main_function(program_of(quantized)).operations if op.op_type == "quantize")
        return _compress_weights(quantized, "w8a8"), pairs


def w8a8_float_ops(
    quantizer: W8A8Quantizer,
    feeds: Sequence[Mapping[str, np.ndarray]],
    reference: Sequence[Mapping[str, np.ndarray]],
    target_cosine: float,
    max_float_fraction: float,
) -> SensitivityResult:
    """The layer search (``search_feeds``) for w8a8: which ops' input activations to leave in float
    so the worst feed's cosine to ``reference`` (the fp32 source's outputs) meets ``target_cosine``.
    Each step quantizes and runs the feeds through the reference evaluator (what the
    ``coreml-reference`` backend runs)."""
    from edgeship.compiler.search.fronts import cosines
    from edgeship.compiler.search.layers import search_feeds

    def measure(keep: list[str], indices: Sequence[int]) -> np.ndarray:
        model, _ = quantizer(keep)
        evaluator = ReferenceEvaluator(program=program_of(model))
        return np.asarray([cosines([evaluator.run(feeds[i])], [reference[i]]).min() for i in indices])

    return search_feeds(quantizer.candidates(), measure, len(feeds), target_cosine, max_float_fraction)


#: Op types whose inputs w8a8 leaves in float although coremltools' passes could quantize them,
#: and op types whose outputs it leaves in float (their inputs are int8). A transformer's residual
#: stream (an add's inputs, a linear's output) carries outlier channels: one int8 scale for it
#: rounds every other channel away, and an additive attention mask (-10,000) takes the whole
#: range. MiniLM through the reference evaluator: worst sentence 0.16 with both quantized, 0.71
#: with add inputs float, 0.97 with linear outputs float too.
W8A8_FLOAT_OP_TYPES: tuple[str, ...] = ("add",)
W8A8_FLOAT_OUTPUT_OP_TYPES: tuple[str, ...] = ("linear",)

#: The inputs coremltools' activation passes quantize (insert_prefix_quantize_dequantize_pair), by op.
_ACTIVATION_INPUTS = {"conv": ("x",), "avg_pool": ("x",), "max_pool": ("x",), "linear": ("x",), "add": ("x", "y")}


def coreml_layer_inputs(function: Any, layers: Iterable[str]) -> dict[str, list[str]]:
    """``{layer: [var, ...]}``: the ``x`` inputs of the ``linear`` and ``conv`` ops of ``function``
    (a MIL function converted from a traced PyTorch module) whose weight is that layer's, one per
    call. coremltools names a parameter's const after its state-dict key, every character outside
    ``[a-zA-Z0-9_]`` as ``_`` and ``var_`` in front of a leading digit (``enc_0_fc_weight``,
    ``var_0_weight`` in a ``Sequential``), ``_to_fp16`` added when cast and ``_quantized`` when
    compressed (so this reads a shipped w8a8 program too, where ``x`` is a dequantize's output).
    Left out: a layer with no
    such op (a conv with a BatchNorm folded in has a const of coremltools' own), and layers whose
    names read the same once sanitized (``a.b_c`` and ``a_b.c``)."""
    by_name: dict[str, list[str]] = {}
    for layer in layers:
        name = re.sub(r"[^a-zA-Z0-9_]", "_", layer)
        name = f"var_{name}" if re.match(r"[^a-zA-Z_]", name) else name
        by_name.setdefault(f"{name}_weight", []).append(layer)
    wanted = {name: named[0] for name, named in by_name.items() if len(named) == 1}
    found: dict[str, list[str]] = {}
    for op in function.operations:
        if op.op_type not in ("linear", "conv") or "weight" not in op.inputs:
            continue
        owner = wanted.get(op.inputs["weight"].name.removesuffix("_quantized").removesuffix("_to_fp16"))
        if owner is not None:
            found.setdefault(owner, []).append(op.inputs["x"].name)
    return found


def _complete_stats(function: Any, stats: dict[str, dict[str, float]]) -> tuple[list[str], list[str]]:
    """Give the activation passes a range for every input they will look up: a constant (folded
    at conversion, e.g. a cast mask, so never computed at run time) gets its own min/max.
    Returns two lists of names of ops to leave unquantized. First, ops with an input that has no
    range (not float, or never computed): coremltools would stop on them with a bare KeyError.
    Second, ops with a computed input or output the passes would quantize whose range is zero
    (every calibration value 0, or too small for a float16 scale): coremltools derives a zero
    scale from it and refuses the model ("scale cannot be 0"), and a made-up range would clip
    whatever the tensor holds on a device. Ops ``W8A8_FLOAT_OP_TYPES`` keeps float are never in the
    second list."""
    skip, zero = [], []
    for op in function.operations:
        keys = _ACTIVATION_INPUTS.get(op.op_type, ())
        for key in keys:
            var = op.inputs.get(key)
            if var is None or var.name in stats:
                continue
            value = None if var.val is None else np.asarray(var.val)
            if value is not None and np.issubdtype(value.dtype, np.floating) and value.size:
                stats[var.name] = {"rmin": float(value.min()), "rmax": float(value.max())}
            else:
                skip.append(op.name)
                break
        else:
            if not keys or op.op_type in W8A8_FLOAT_OP_TYPES:
                continue
            # A constant input is left alone by the prefix pass.
            touched = [op.inputs[k].name for k in keys if k in op.inputs and op.inputs[k].val is None]
            if op.op_type not in W8A8_FLOAT_OUTPUT_OP_TYPES:
                # The suffix pass quantizes the output, or instead the output of an activation right after.
                out = op.outputs[0]
                if out.child_ops and out.child_ops[0].op_type in _SUFFIX_ACTIVATIONS:
                    out = out.child_ops[0].outputs[0]
                touched.append(out.name)
            if any(name in stats and _zero_scale(stats[name]) for name in touched):
                zero.append(op.name)
    return skip, zero


#: The activations after a conv, linear, add or pool whose output coremltools' suffix pass quantizes
#: instead of the op's (``insert_suffix_quantize_dequantize_pair._allowed_activations``; a test checks).
_SUFFIX_ACTIVATIONS = frozenset({"leaky_relu", "tanh", "scaled_tanh", "sigmoid", "hard_sigmoid", "relu", "relu6"})


def _zero_scale(stats: Mapping[str, float]) -> bool:
    """Whether coremltools' symmetric int8 scale for this range is 0: it reads the range as float16."""
    amax = float(np.max(np.abs(np.asarray([stats["rmin"], stats["rmax"]], dtype=np.float16))))
    return bool(np.float16(amax / 127) == 0)


def activation_ranges(
    evaluator: ReferenceEvaluator, calibration: Calibration, inputs: tuple[TensorSpec, ...]
) -> dict[str, dict[str, float]]:
    """``{tensor name: {"rmin": .., "rmax": ..}}`` over every calibration sample for every tensor the
    program computes except its outputs (the format coremltools' activation passes read).

    Raises ``UsageError`` for a sample with wrong names or shapes.
    """
    names = {s.name: s for s in inputs}
    outputs = {o.name for o in evaluator.outputs}
    stats: dict[str, dict[str, float]] = {}
    for i, sample in enumerate(calibration):
        if set(sample) != set(names):
            raise UsageError(f"calibration sample {i} has inputs {sorted(sample)}; the model takes {sorted(names)}")
        feeds = {}
        for name, spec in names.items():
            array = np.asarray(sample[name])
            if tuple(array.shape) != spec.shape:
                raise UsageError(
                    f"calibration sample {i}, input {name!r} has shape {list(array.shape)}; the model takes "
                    f"{list(spec.shape)} (pass one sample per dict)"
                )
            feeds[name] = array
        for name, value in evaluator.run_intermediates(feeds).items():
            if name in outputs or not np.issubdtype(value.dtype, np.floating) or value.size == 0:
                continue
            lo, hi = float(np.min(value)), float(np.max(value))
            entry = stats.setdefault(name, {"rmin": lo, "rmax": hi})
            entry["rmin"], entry["rmax"] = min(entry["rmin"], lo), max(entry["rmax"], hi)
    return stats


def _types() -> Any:
    coremltools_module()
    from coremltools.converters.mil.mil import types

    return types


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
