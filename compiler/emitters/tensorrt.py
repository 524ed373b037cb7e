"""TensorRT emitter: the ONNX graph and ``build_spec.json`` from which a device builds its engine.

Engines are tied to the GPU architecture and the TensorRT version, so the compiler ships
ONNX and the device's runtime builds (and caches) the engine. What this module writes into
``out_dir``:

* ``model.onnx``: for ``fp16`` the float32 graph unchanged (TensorRT picks fp16 kernels
  because of the FP16 builder flag); for ``fp32`` the same graph with an fp32 build spec (no
  precision flag: the numerics reference on the device, and the way out when fp16 overflows
  a model); for ``int8-qdq`` the graph with explicit, symmetric
  Q/DQ nodes (zero point 0 everywhere) made by ``onnxruntime.quantization`` from the
  caller's calibration data.
* ``build_spec.json``: the runtime's ``BuildSpec`` (precision, minimum TensorRT version,
  workspace, optimization profiles, DLA core, 2:4 sparsity).

Never written: an implicit-calibration cache. Implicit INT8 calibration is deprecated in
TensorRT 10 and removed in 11; the scales live in the Q/DQ nodes.

Q/DQ placement follows NVIDIA's "Q/DQ Layer-Placement Recommendations" (TensorRT Developer
Guide, explicit quantization), with the ORT options NVIDIA's Model Optimizer uses for the
same job (``modelopt/onnx/quantization/ort_utils.py: configure_ort``):

* Quantize all inputs of weighted operations, Convolution, Transposed Convolution and
  GEMM: ONNX ``Conv``, ``ConvTranspose``, ``Gemm``, ``MatMul`` (``QDQ_OP_TYPES``).
* Do not quantize their outputs (``OpTypesToExcludeOutputQuantization``); a following
  activation keeps a float input.
* Leave commuting layers (MaxPool, Relu, Reshape, Flatten, ...) alone: TensorRT moves Q/DQ
  across them itself ("Q/DQ propagation").
* Per-tensor activation scales, per-channel weight scales (Conv/Gemm output channel,
  ConvTranspose axis 1, MatMul axis 1).
* One Q/DQ pair per tensor, shared by its consumers (``DedicatedQDQPair`` False): the
  skip input of a residual ``Add`` that also feeds a quantized Conv is then quantized and
  the Conv branch is not, which is the placement the guide recommends for element-wise
  addition fused after a weighted layer.
* Biases stay float (``QuantizeBias`` False): TensorRT's ONNX parser refuses
  DequantizeLinear on int32 biases (onnx/onnx-tensorrt#850) and fuses float biases itself.
* Weights are stored as int8 initializers behind a DequantizeLinear when the package needs
  TensorRT >= 10, which accepts pre-quantized INT8 weights (4x smaller artifact, the same
  integers the host check ran); for older TensorRT the fp32 weights get a Q/DQ pair
  (``AddQDQPairToWeight``) and TensorRT quantizes them at build time.

A host check of the Q/DQ graph in ONNX Runtime shows the calibration is sane; it says little
about the accuracy of a TensorRT engine, which fuses, reorders and picks kernels on its own.
"""

from __future__ import annotations

import itertools
import math
import tempfile
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from edgeship.compiler.emitters.base import EmitRequest, Emitted, Emitter, convert_fp32
from edgeship.compiler.quantizers import carried_ranges
from edgeship.compiler.quantizers.onnx import layer_inputs
from edgeship.errors import ArtifactError, EdgeshipError, ModelLoadError, UsageError
from edgeship.runtime.backends.tensorrt_spec import (
    BUILD_SPEC_NAME,
    BuildSpec,
    OptimizationProfile,
    ShapeRange,
    check_network_inputs,
    version_at_least,
)
from edgeship.runtime.package.manifest import DTYPES, TensorSpec
from edgeship.targets import TargetProfile

if TYPE_CHECKING:
    import onnx

Array = np.ndarray[Any, Any]
Feeds = Mapping[str, Any]

MODEL_NAME = "model.onnx"
PRECISIONS = ("fp16", "int8-qdq", "fp32")
#: Our precision -> the runtime BuildSpec's precision (which sets the builder flags on the device).
_SPEC_PRECISION = {"fp16": "fp16", "int8-qdq": "int8", "fp32": "fp32"}
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
QDQ_OP_TYPES = ("Conv", "ConvTranspose", "Gemm", "MatMul")
DEFAULT_BATCH_RANGE = (1, 1, 8)  # min, opt, max of the default profile for a dynamic batch
NO_CALIBRATION = (
    "int8 for TensorRT needs calibration data (--calib); implicit INT8 calibration is deprecated in "
    "TensorRT 10 and removed in 11"
)
_PROTOBUF_LIMIT = 1_800_000_000  # below the 2 GiB protobuf cap, with room for the graph itself
_INT8_WEIGHTS_FROM = "10.0"  # TensorRT accepts pre-quantized INT8 weights behind DequantizeLinear from 10.0
_QDQ_FROM = "8.0"  # explicit quantization (Q/DQ networks) arrived in TensorRT 8.0


@dataclass(frozen=True)
class TensorRTResult:
    """What ``emit_tensorrt`` wrote and what the manifest must say about it.

    ``inputs``/``outputs`` have the graph's own dtypes (Q/DQ never changes I/O: float32 in,
    float32 out for a float model) and shapes with ``None`` for dynamic dimensions.
    ``weight_bytes`` is the sum of the initializers' sizes in ``model.onnx``; ``qdq_pairs``
    counts QuantizeLinear -> DequantizeLinear pairs (activations, and weights when they stay
    fp32); ``int8_weights`` counts weights stored as int8 behind a DequantizeLinear.
    """

    onnx_path: Path
    build_spec_path: Path
    build_spec: BuildSpec
    precision: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    notes: tuple[str, ...]
    weight_bytes: int
    qdq_pairs: int = 0
    int8_weights: int = 0

    @property
    def onnx_bytes(self) -> int:
        """Size of ``model.onnx`` on disk (plus its external data file, if it has one)."""
        data = self.onnx_path.with_name(self.onnx_path.name + ".data")
        return self.onnx_path.stat().st_size + (data.stat().st_size if data.is_file() else 0)

    def to_emitted(self, route: str = "onnx + onnxruntime.quantization") -> Emitted:
        """The result as the packager's ``Emitted`` (format ``tensorrt-onnx``, artifact ``model.onnx``)."""
        files = {MODEL_NAME: self.onnx_path, BUILD_SPEC_NAME: self.build_spec_path}
        data = self.onnx_path.with_name(self.onnx_path.name + ".data")
        if data.is_file():
            files[data.name] = data
        return Emitted(
            "tensorrt-onnx",
            self.build_spec.precision,
            MODEL_NAME,
            files,
            self.inputs,
            self.outputs,
            self.weight_bytes,
            route,
            list(self.notes),
        )


def emit_tensorrt(
    onnx_fp32: Path,
    out_dir: Path,
    *,
    precision: str,
    calibration: Iterable[Feeds] | None,
    profiles: Sequence[OptimizationProfile] = (),
    workspace_mib: int = 1024,
    min_tensorrt_version: str = "10.0",
    dla_core: int | None = None,
    sparsity_2_4: bool = False,
    allow_gpu_fallback: bool = True,
    calibration_method: str = "minmax",
    exclude_nodes: Sequence[str] = (),
    input_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> TensorRTResult:
    """Write ``model.onnx`` and ``build_spec.json`` for a TensorRT device into ``out_dir``.

    ``onnx_fp32`` is a float32 ONNX graph without Q/DQ nodes. ``precision`` is ``"fp16"``
    (graph unchanged, BuildSpec precision fp16), ``"fp32"`` (graph unchanged, BuildSpec
    precision fp32) or ``"int8-qdq"`` (explicit symmetric Q/DQ, BuildSpec precision int8). ``calibration`` is an iterable of feed dicts, input name ->
    array with the model's batch axis first (what ``Session.run`` takes); int8-qdq requires
    it, fp16 and fp32 ignore it. ``profiles`` are the optimization profiles; without them a graph
    whose only dynamic dimension is the batch gets batch 1..8 (opt 1). ``allow_gpu_fallback``
    only matters with ``dla_core``. ``calibration_method``: "minmax" (global min/max),
    "percentile" (99.999th) or "entropy". ``exclude_nodes``: graph node names that stay float
    (no Q/DQ on their inputs; the recipe's skip rules, see ``skipped_nodes``). ``input_ranges``
    (int8-qdq): ``{tensor: (min, max)}`` that replace calibrated ranges, e.g. the ranges
    ``quantize.qat`` trained with (symmetric here: the scale is ``max(|min|, |max|) / 127``).

    Raises ``UsageError`` for a bad argument, a missing or unreadable graph, missing, empty
    or non-finite calibration data, or a graph ONNX Runtime cannot quantize;
    ``ArtifactError`` when the Q/DQ graph it made breaks TensorRT's rules (a zero point that
    is not int8 0, a quantized bias), which is a bug to report.
    """
    if precision not in PRECISIONS:
        raise UsageError(f"TensorRT precisions are {', '.join(PRECISIONS)}; not {precision!r}")
    if calibration_method not in CALIBRATION_METHODS:
        raise UsageError(f"calibration methods are {', '.join(CALIBRATION_METHODS)}; not {calibration_method!r}")
    if precision == "int8-qdq":
        if calibration is None:
            raise UsageError(NO_CALIBRATION)
        _check_version(min_tensorrt_version)
        if not version_at_least(min_tensorrt_version, _QDQ_FROM):
            raise UsageError(
                f"explicit Q/DQ int8 needs TensorRT >= {_QDQ_FROM}; min_tensorrt_version is {min_tensorrt_version}"
            )
    model = _load(Path(onnx_fp32))
    quantizers = sorted({n.op_type for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")})
    if quantizers:
        raise UsageError(f"{Path(onnx_fp32).name} already holds {' and '.join(quantizers)} nodes; pass the float graph")
    inputs = _tensor_specs(model.graph, "input")
    outputs = _tensor_specs(model.graph, "output")
    chosen, profile_note = _profiles(inputs, profiles)
    spec = _build_spec(
        _SPEC_PRECISION[precision],
        min_tensorrt_version,
        workspace_mib,
        chosen,
        dla_core,
        allow_gpu_fallback,
        sparsity_2_4,
    )

    notes: list[str] = []
    qdq_pairs = int8_weights = 0
    if precision == "int8-qdq":
        assert calibration is not None
        # raises on an empty set or a bad first batch
        feeds = _CalibrationFeeds(calibration, inputs, per_sample=calibration_method != "minmax")
        int8_weight_storage = version_at_least(min_tensorrt_version, _INT8_WEIGHTS_FROM)
        with tempfile.TemporaryDirectory(prefix="edgeship-trt-") as tmp:
            quantized = _quantize(
                Path(onnx_fp32), Path(tmp), feeds, calibration_method, int8_weight_storage, notes, model,
                exclude_nodes, input_ranges or {},
            )  # fmt: skip
        if exclude_nodes:
            notes.append(
                f"kept in float by the recipe's skip rules ({len(exclude_nodes)} nodes): {list(exclude_nodes)}"
            )
        summary = check_qdq(quantized.graph, Path(onnx_fp32).name)
        qdq_pairs, int8_weights = summary.pairs, summary.int8_weights
        notes += summary.notes(int8_weight_storage)
        notes.append(
            f"calibrated with {calibration_method} on {feeds.batches} batch(es), {feeds.samples} sample(s); "
            "no implicit-calibration cache written: the scales live in the Q/DQ nodes"
        )
        model = quantized
    elif precision == "fp16":
        notes.append(
            "fp16: the graph stays fp32; TensorRT builds fp16 kernels from the FP16 builder flag and keeps "
            "fp32 where it has no fp16 kernel"
        )
    else:
        notes.append(
            "fp32: the graph stays fp32 and the engine is built without FP16 or INT8 flags "
            "(TensorRT may still use TF32 tensor cores on Ampere unless the device clears that flag)"
        )
    if precision != "int8-qdq" and calibration is not None:
        notes.append(f"calibration data is not used for {precision}")
    notes.append(profile_note)
    if dla_core is not None:
        notes.append(
            f"DLA core {dla_core}"
            + (" with GPU fallback for layers the DLA cannot run" if spec.allow_gpu_fallback else ", no GPU fallback")
        )
    if sparsity_2_4:
        notes.append(
            "2:4 sparsity flag set: TensorRT uses sparse kernels only where weights already have the 2:4 pattern; "
            "this emitter does not prune"
        )

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / MODEL_NAME
    _save(model, onnx_path)
    spec_path = out_dir / BUILD_SPEC_NAME
    spec_path.write_bytes(spec.to_json())
    return TensorRTResult(
        onnx_path=onnx_path,
        build_spec_path=spec_path,
        build_spec=spec,
        precision=precision,
        inputs=inputs,
        outputs=outputs,
        notes=tuple(notes),
        weight_bytes=_weight_bytes(model),
        qdq_pairs=qdq_pairs,
        int8_weights=int8_weights,
    )


def skipped_nodes(onnx_fp32: Path, skipped: Callable[[str, str], bool]) -> tuple[str, ...]:
    """Names of the graph's nodes that ``skipped(op_type, node_name)`` keeps float (the recipe's
    ``QuantizeRules.skipped``), in graph order. Unnamed nodes cannot be excluded and are left out."""
    graph = _load(Path(onnx_fp32)).graph
    return tuple(n.name for n in graph.node if n.name and skipped(n.op_type, n.name))


class TensorRTEmitter(Emitter):
    """TensorRT (Jetson) targets: the source exported to fp32 ONNX, then ``emit_tensorrt``.

    The package holds ``model/model.onnx`` (plus external data if any) and ``model/build_spec.json``;
    the profile's ``runtime_version`` is the build spec's minimum TensorRT version. The host check runs
    the graph in ONNX Runtime, which says little about an engine's numerics.
    """

    format = "tensorrt-onnx"
    label = "TensorRT"
    precisions = PRECISIONS
    sources = frozenset({"torch", "onnx"})
    validation_backend = "onnxruntime"
    calibration_methods: ClassVar[Mapping[str, tuple[str, ...]]] = {
        "int8-qdq": ("percentile",)
    }  # entropy: byte-identical to minmax in ORT
    needs_hardware = (
        "TensorRT engine build and numerics on the device; the Q/DQ graph's accuracy in ONNX Runtime "
        "says little about an engine (awaiting hardware)",
    )

    def check(self, profile: TargetProfile, precision: str) -> None:
        super().check(profile, precision)
        if precision == "int8-qdq":
            try:
                ok = version_at_least(profile.runtime_version, _QDQ_FROM)
            except ValueError:  # a runtime_version that is not a number cannot promise Q/DQ support
                ok = False
            if not ok:
                raise UsageError(
                    f"target {profile.name} cannot run precision 'int8-qdq': explicit Q/DQ needs TensorRT >= "
                    f"{_QDQ_FROM}, the target has {profile.runtime_version}; it offers "
                    f"{', '.join(p for p in profile.precisions if p != 'int8-qdq')}"
                )

    def emit(self, request: EmitRequest) -> Emitted:
        from edgeship.compiler.emitters.onnx import export_fp32
        from edgeship.compiler.emitters.onnx_io import weight_bytes

        work, precision = request.workdir, request.precision
        work.mkdir(parents=True, exist_ok=True)
        fp32 = work / "model_fp32.onnx"
        convert_fp32(request.cache, "onnx", fp32, lambda path: export_fp32(request.source, path))
        calib = request.calibration
        sparse, lost = request.sparse_2_4_layers
        carried: dict[str, tuple[float, float]] = {}
        carried_note = ""
        if precision == "int8-qdq" and (trained := request.trained_ranges):
            carried, carried_note = carried_ranges(layer_inputs(fp32, trained), trained, symmetric=True)
        result = emit_tensorrt(
            fp32,
            work / "trt",
            precision=precision,
            calibration=None if calib is None else list(calib.batches(request.batch)),
            min_tensorrt_version=request.profile.runtime_version,
            calibration_method=request.recipe.calibration_method,
            exclude_nodes=skipped_nodes(fp32, rules.skipped) if (rules := request.recipe.quantize).any else (),
            sparsity_2_4=bool(sparse),
            input_ranges=carried,
        )
        notes = list(result.notes)
        if carried_note:
            notes.append(carried_note)
        if sparse:
            notes.append(
                f"2:4 sparse weights (prune.sparse24) in {len(sparse)} layer(s): {', '.join(sparse)}; build_spec.json "
                "sparsity_2_4 is true, so the device's engine build sets BuilderFlag.SPARSE_WEIGHTS. Whether TensorRT "
                "picks sparse kernels, and what they gain, is decided on an Ampere/Orin GPU (not run here)"
            )
        if lost:
            notes.append(f"layers {', '.join(lost)} lost the 2:4 pattern prune.sparse24 gave them (a later pass)")
        files = {"model/model.onnx": result.onnx_path, "model/build_spec.json": result.build_spec_path}
        data = result.onnx_path.with_name(result.onnx_path.name + ".data")
        if data.is_file():
            files[f"model/{data.name}"] = data
        return Emitted(
            "tensorrt-onnx",
            precision,
            "model/model.onnx",
            files,
            result.inputs,
            result.outputs,
            weight_bytes(result.onnx_path),
            "torch.onnx + onnxruntime.quantization (symmetric Q/DQ)"
            if precision == "int8-qdq"
            else f"torch.onnx ({precision} built on the device)",
            notes,
        )


# --------------------------------------------------------------------------------------
# Graph I/O, profiles, build spec
# --------------------------------------------------------------------------------------


def _load(path: Path) -> onnx.ModelProto:
    import onnx

    if not path.is_file():
        raise UsageError(f"ONNX model {path} does not exist or is not a file")
    try:
        return onnx.load(str(path), load_external_data=True)
    except Exception as exc:  # onnx raises DecodeError, OSError, ... for a bad file
        raise UsageError(f"cannot read ONNX model {path.name}: {_first_line(exc)}") from None


def _tensor_specs(graph: onnx.GraphProto, kind: str) -> tuple[TensorSpec, ...]:
    from onnx import helper

    initializers = {t.name for t in graph.initializer}
    values = [v for v in graph.input if v.name not in initializers] if kind == "input" else list(graph.output)
    specs = []
    for value in values:
        tensor = value.type.tensor_type
        if not value.type.HasField("tensor_type") or not tensor.HasField("shape"):
            raise UsageError(
                f"graph {kind} {value.name!r} has no tensor type or no shape; run ONNX shape inference first"
            )
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)).name
        except (KeyError, TypeError):
            dtype = f"element type {tensor.elem_type}"
        if dtype not in DTYPES:
            raise UsageError(f"graph {kind} {value.name!r} is {dtype}, which a package cannot describe")
        shape = tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in tensor.shape.dim)
        specs.append(TensorSpec(value.name, dtype, shape))
    return tuple(specs)


def _profiles(
    inputs: tuple[TensorSpec, ...], given: Sequence[OptimizationProfile]
) -> tuple[tuple[OptimizationProfile, ...], str]:
    """The caller's profiles checked against the graph, or the default batch profile; and a note."""
    dims = {t.name: tuple(-1 if d is None else d for d in t.shape) for t in inputs}
    if given:
        try:
            check_network_inputs(dims, given)  # the check the device runs before building
        except ModelLoadError as exc:
            raise UsageError(str(exc)) from None
        return tuple(given), f"{len(given)} optimization profile(s) as given"
    dynamic = [t for t in inputs if None in t.shape]
    if not dynamic:
        return (), "static input shapes: no optimization profile needed"
    for t in dynamic:
        if t.shape[0] is not None or None in t.shape[1:]:
            raise UsageError(
                f"input {t.name!r} has shape {_shape_text(t.shape)}, dynamic beyond the batch dimension; "
                "pass profiles= with its min, opt and max shapes"
            )
    lo, opt, hi = DEFAULT_BATCH_RANGE
    ranges = []
    for t in dynamic:
        rest = tuple(d for d in t.shape[1:] if d is not None)  # all fixed: checked above
        ranges.append(ShapeRange(t.name, (lo, *rest), (opt, *rest), (hi, *rest)))
    names = ", ".join(repr(t.name) for t in dynamic)
    return (OptimizationProfile(tuple(ranges)),), (
        f"no optimization profile given: default profile batch {lo}..{hi} (opt {opt}) for {names}; "
        "larger batches need profiles="
    )


def _build_spec(
    precision: str,
    version: str,
    workspace_mib: int,
    profiles: tuple[OptimizationProfile, ...],
    dla_core: int | None,
    allow_gpu_fallback: bool,
    sparsity_2_4: bool,
) -> BuildSpec:
    spec = BuildSpec(
        precision=precision,
        min_tensorrt_version=version,
        workspace_mib=workspace_mib,
        optimization_profiles=profiles,
        dla_core=dla_core,
        allow_gpu_fallback=dla_core is not None and allow_gpu_fallback,
        sparsity_2_4=sparsity_2_4,
    )
    try:  # the runtime's own parser is the validator: what it would refuse on the device is refused here
        return BuildSpec.from_json(spec.to_json())
    except ArtifactError as exc:
        raise UsageError(str(exc)) from None


def _check_version(version: str) -> None:
    _build_spec("fp16", version, 1, (), None, False, False)


def _shape_text(shape: Sequence[int | None]) -> str:
    return "[" + ", ".join("?" if d is None else str(d) for d in shape) + "]"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


# --------------------------------------------------------------------------------------
# Calibration data
# --------------------------------------------------------------------------------------


class _CalibrationFeeds:
    """ONNX Runtime's calibration data reader over the caller's feed dicts, checking each one.

    The first batch is checked on construction (so an empty set or a bad first batch fails
    before any work); later batches as ONNX Runtime pulls them (a generator is read once).
    Each feed must name exactly the model's inputs, hold finite numbers and fit the input's
    rank and fixed dimensions; arrays are cast to the input's dtype. With ``per_sample``
    batches are handed out one sample at a time: ONNX Runtime's histogram calibrators
    (percentile, entropy) stack the activations of all batches and fail when batch sizes differ.
    """

    def __init__(self, calibration: Iterable[Feeds], inputs: tuple[TensorSpec, ...], *, per_sample: bool) -> None:
        self._inputs = inputs
        self._per_sample = per_sample
        self._samples: deque[dict[str, Array]] = deque()
        self.batches = 0
        self.samples = 0
        iterator = iter(calibration)
        first = next(iterator, _END)
        if first is _END:
            raise UsageError("the calibration set is empty; pass at least one batch of representative inputs")
        self._pending: Iterator[Any] = itertools.chain([self._check(first)], iterator)

    def get_next(self) -> dict[str, Array] | None:
        if self._samples:
            return self._samples.popleft()
        item: Any = next(self._pending, _END)
        if item is _END:
            return None
        feeds: dict[str, Array] = item if self.batches == 0 else self._check(item)
        self.batches += 1
        sizes = {len(a) if a.ndim else 1 for a in feeds.values()}
        self.samples += max(sizes)
        if not self._per_sample:
            return feeds
        if len(sizes) != 1:
            raise UsageError(
                f"calibration batch {self.batches - 1}: inputs have different batch sizes {sorted(sizes)}; "
                "percentile and entropy calibration split batches into samples along the first axis"
            )
        self._samples.extend({k: v[i : i + 1] for k, v in feeds.items()} for i in range(sizes.pop()))
        return self._samples.popleft()

    def _check(self, item: Any) -> dict[str, Array]:
        where = f"calibration batch {self.batches}"
        if not isinstance(item, Mapping):
            raise UsageError(f"{where} is a {type(item).__name__}, not a dict of input name -> array")
        names = {t.name for t in self._inputs}
        if set(item) != names:
            missing, extra = sorted(names - set(item)), sorted(set(item) - names)
            parts = ([f"missing {missing}"] if missing else []) + ([f"unexpected {extra}"] if extra else [])
            raise UsageError(f"{where} has wrong input names: {'; '.join(parts)} (the model takes {sorted(names)})")
        feeds = {}
        for spec in self._inputs:
            array = np.asarray(item[spec.name])
            if array.dtype.kind not in "biuf":
                raise UsageError(f"{where}, input {spec.name!r}: dtype {array.dtype} is not numeric")
            array = array.astype(np.dtype(spec.dtype), copy=False)
            if array.ndim != len(spec.shape) or any(d is not None and d != n for d, n in zip(spec.shape, array.shape)):
                raise UsageError(
                    f"{where}, input {spec.name!r}: shape {list(array.shape)} does not fit the model's "
                    f"{_shape_text(spec.shape)}"
                )
            if array.size == 0:
                raise UsageError(f"{where}, input {spec.name!r} is empty (shape {list(array.shape)})")
            if array.dtype.kind == "f" and not np.isfinite(array).all():
                raise UsageError(f"{where}, input {spec.name!r} holds NaN or Inf values; remove or fix those samples")
            feeds[spec.name] = array
        return feeds


_END = object()


# --------------------------------------------------------------------------------------
# Quantization
# --------------------------------------------------------------------------------------


def _quantize(
    source: Path,
    work: Path,
    feeds: _CalibrationFeeds,
    method: str,
    int8_weight_storage: bool,
    notes: list[str],
    model: onnx.ModelProto,
    exclude_nodes: Sequence[str] = (),
    input_ranges: Mapping[str, tuple[float, float]] | None = None,
) -> onnx.ModelProto:
    """Pre-process and quantize with explicit symmetric Q/DQ; returns the quantized graph."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    large = model.ByteSize() > _PROTOBUF_LIMIT
    pre, out = work / "pre.onnx", work / "qdq.onnx"
    try:
        quant_pre_process(str(source), str(pre), save_as_external_data=large, all_tensors_to_one_file=True)
    except Exception as exc:  # symbolic shape inference crashes on some graphs (e.g. MiniLM)
        try:
            quant_pre_process(
                str(source),
                str(pre),
                skip_symbolic_shape=True,
                save_as_external_data=large,
                all_tensors_to_one_file=True,
            )
        except Exception as again:
            raise UsageError(
                f"ONNX Runtime cannot pre-process {source.name} for quantization: {_first_line(again)}"
            ) from again
        notes.append(f"symbolic shape inference failed ({_first_line(exc)}); pre-processed with ONNX shape inference")
    pre_graph = onnx.load(str(pre), load_external_data=False).graph
    present = Counter(n.op_type for n in pre_graph.node)
    preprocessed = {i.name for i in pre_graph.initializer} - {i.name for i in model.graph.initializer}
    if not any(present[t] for t in QDQ_OP_TYPES):
        raise UsageError(f"{source.name} has no {', '.join(QDQ_OP_TYPES)} for int8 to speed up; use precision fp16")
    methods = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }
    try:
        quantize_static(
            str(pre),
            str(out),
            feeds,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=methods[method],
            op_types_to_quantize=list(QDQ_OP_TYPES),
            nodes_to_exclude=list(exclude_nodes),
            use_external_data_format=large,
            extra_options={
                "ActivationSymmetric": True,
                "WeightSymmetric": True,
                "QuantizeBias": False,
                "AddQDQPairToWeight": not int8_weight_storage,
                "DedicatedQDQPair": False,
                "OpTypesToExcludeOutputQuantization": list(QDQ_OP_TYPES),
                "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1},
                "CalibMovingAverage": False,  # global min/max, not an average of per-batch ranges
                "TensorQuantOverrides": {
                    tensor: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                    for tensor, (lo, hi) in (input_ranges or {}).items()
                },
            },
        )
    except EdgeshipError:
        raise  # a bad calibration batch found while ONNX Runtime read it
    except Exception as exc:  # ORT raises assorted types (ValueError, RuntimeError, Fail, ...)
        hint = ""
        if method != "minmax" and "inhomogeneous" in str(exc):
            hint = f"; {method} calibration needs equally shaped samples (pad them, or use minmax)"
        raise UsageError(f"ONNX Runtime could not quantize {source.name}: {_first_line(exc)}{hint}") from exc
    quantized = onnx.load(str(out), load_external_data=True)
    added = _node_domains(quantized.graph) - _node_domains(model.graph)
    if added:
        raise ArtifactError(
            f"quantizing {source.name} introduced ops of domain(s) {sorted(added)}, which TensorRT does not know"
        )
    _drop_unused_opsets(quantized)
    _rename_initializers(quantized, preprocessed)
    return quantized


def _rename_initializers(model: onnx.ModelProto, names: set[str]) -> None:
    """Give the initializers ``names`` (those ONNX Runtime's pre-processing added, e.g.
    ``gemm_input_shape``, the Reshape shapes of its MatMul+Add -> Gemm fusion) names of their own.
    Loading the Q/DQ graph runs that fusion again on the MatMul+Add pairs left, and it names its
    shapes the same way: ONNX Runtime 1.31 then refuses the model ("Attempt to replace the existing
    tensor"), seen on BERT-style models, whose 3-D MatMul+Add pairs the pre-processing fuses in part."""
    graph = model.graph
    taken = {i.name for i in graph.initializer} | {o for n in graph.node for o in n.output}
    taken |= {v.name for v in [*graph.input, *graph.output, *graph.value_info]}
    renamed: dict[str, str] = {}
    for init in model.graph.initializer:
        if init.name not in names:
            continue
        new = f"edgeship_pre_{init.name}"
        while new in taken:
            new += "_"
        taken.add(new)
        renamed[init.name] = new
        init.name = new
    for value in model.graph.input:  # an initializer may also be listed as a graph input (IR < 4)
        value.name = renamed.get(value.name, value.name)
    _rename_inputs(model.graph, renamed)


def _rename_inputs(graph: onnx.GraphProto, renamed: Mapping[str, str]) -> None:
    """Rename node inputs in ``graph`` and the subgraphs of its If/Loop/Scan nodes (which may read
    an outer initializer)."""
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in renamed:
                node.input[k] = renamed[name]
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _rename_inputs(sub, renamed)


def _node_domains(graph: onnx.GraphProto) -> set[str]:
    """Domains of the nodes in ``graph`` and its subgraphs ("" for the default ONNX domain)."""
    domains = set()
    for node in graph.node:
        domains.add("" if node.domain == "ai.onnx" else node.domain)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                domains |= _node_domains(sub)
    return domains


def _drop_unused_opsets(model: onnx.ModelProto) -> None:
    """Remove opset imports no node uses (ORT's pre-processing adds com.microsoft and others)."""
    used = _node_domains(model.graph) | {""}
    keep = [o for o in model.opset_import if (o.domain or "") in used or o.domain == "ai.onnx"]
    del model.opset_import[:]
    model.opset_import.extend(keep)


@dataclass(frozen=True)
class QdqSummary:
    """What ``check_qdq`` found: Q->DQ pairs, int8 weights, weighted ops with quantized inputs, float ops."""

    pairs: int
    int8_weights: int
    weighted_quantized: int
    weighted_total: int
    float_ops: dict[str, int]

    def notes(self, int8_weight_storage: bool) -> list[str]:
        weights = (
            f"{self.int8_weights} per-channel int8 weight(s) behind DequantizeLinear"
            if int8_weight_storage
            else "fp32 weights with per-channel Q/DQ pairs (TensorRT < 10 wants float weights)"
        )
        floats = ", ".join(f"{op} x{n}" for op, n in sorted(self.float_ops.items())) or "nothing else"
        return [
            f"explicit symmetric int8 Q/DQ: {self.pairs} Q/DQ pair(s), {weights}; every zero point is int8 0",
            f"inputs quantized on {self.weighted_quantized} of {self.weighted_total} weighted op(s) "
            f"({', '.join(QDQ_OP_TYPES)}); their outputs stay float",
            f"stayed float: biases (TensorRT fuses float biases; it refuses int32 bias DequantizeLinear), {floats}; "
            "TensorRT may still run commuting ops (MaxPool, Relu, Reshape) in int8 by moving Q/DQ",
        ]


def check_qdq(graph: onnx.GraphProto, name: str = "model.onnx") -> QdqSummary:
    """Check the Q/DQ graph against TensorRT's rules and count what it holds.

    Every QuantizeLinear/DequantizeLinear must have an int8 zero point initializer that is
    all 0 and a positive, finite scale initializer; no DequantizeLinear may read an int32
    initializer (a quantized bias). Raises ``ArtifactError`` naming the first node that breaks
    a rule.
    """
    from onnx import TensorProto, numpy_helper

    initializers = {t.name: t for t in graph.initializer}
    producers = {out: node for node in graph.node for out in node.output}
    pairs = int8_weights = 0
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        what = f"{name}: {node.op_type} {node.name or node.output[0]!r}"
        if len(node.input) < 3 or node.input[2] not in initializers:
            raise ArtifactError(f"{what} has no zero point initializer; TensorRT needs an explicit int8 zero point 0")
        zero_point = initializers[node.input[2]]
        if zero_point.data_type != TensorProto.INT8 or np.any(numpy_helper.to_array(zero_point) != 0):
            raise ArtifactError(
                f"{what} has zero point {numpy_helper.to_array(zero_point).ravel()[:4].tolist()} of type "
                f"{TensorProto.DataType.Name(zero_point.data_type)}; TensorRT needs symmetric int8 (zero point 0)"
            )
        scale = initializers.get(node.input[1])
        if scale is None:
            raise ArtifactError(f"{what} has no scale initializer")
        scales = numpy_helper.to_array(scale)
        if not (np.isfinite(scales).all() and (scales > 0).all()):
            raise ArtifactError(f"{what} has a scale that is not positive and finite")
        if node.op_type == "DequantizeLinear":
            source = initializers.get(node.input[0])
            if source is not None and source.data_type == TensorProto.INT32:
                raise ArtifactError(
                    f"{what} dequantizes an int32 initializer (a quantized bias); TensorRT's parser refuses it"
                )
            if source is not None:
                int8_weights += 1
            producer = producers.get(node.input[0])
            if producer is not None and producer.op_type == "QuantizeLinear":
                pairs += 1
    quantized = total = 0
    float_ops: Counter[str] = Counter()
    for node in graph.node:
        if node.op_type in QDQ_OP_TYPES:
            total += 1
            inputs = [t for t in node.input[:2] if t]
            if all((p := producers.get(t)) is not None and p.op_type == "DequantizeLinear" for t in inputs):
                quantized += 1
            else:
                float_ops[node.op_type] += 1
        elif node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            float_ops[node.op_type] += 1
    return QdqSummary(pairs, int8_weights, quantized, total, dict(float_ops))


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def _save(model: onnx.ModelProto, path: Path) -> None:
    """Save as one file, or with ``<name>.data`` beside it past the protobuf size limit."""
    import onnx

    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)  # a stale data file from an earlier run would be packaged with the graph
    if model.ByteSize() > _PROTOBUF_LIMIT:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name)
    else:
        onnx.save_model(model, str(path))
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ArtifactError(f"{path.name} as written is not a valid ONNX model: {_first_line(exc)}") from None


def _weight_bytes(model: onnx.ModelProto) -> int:
    from onnx import helper

    total = 0
    for tensor in model.graph.initializer:
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
        total += math.prod(tensor.dims) * itemsize
    return total
