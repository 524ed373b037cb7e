"""Mixed precision chosen by per-layer sensitivity, for ONNX and TFLite: the format fronts of the
layer search and the quantizers the emitters ship with.

The search itself (``search``, ``search_feeds``, ``SensitivityResult``) is pure and lives in
``edgeship.compiler.search.layers``; it is re-exported here for the callers that import it from
this module. In short: quantize everything, score each candidate layer by quantizing it alone,
keep the most sensitive in float until the worst sample's cosine meets the target.

So a search costs ``candidates + O(log candidates)`` quantize-and-run steps: for MiniLM
(49 ONNX MatMul/Gather nodes, 49 TFLite weight ops) well under a minute on two cores; static
int8 TFLite quantizes every op (346 candidates for MiniLM), about three minutes. Every cosine
in a result was measured on the quantized model it describes, never extrapolated.

Cosine is per sample (the sample's outputs flattened) and the figure a search compares with
the target is the minimum over every sample of every feed: the worst sample, as the
compiler's validation reports it (``cosine_min``).

The quantizer is the caller's (a callable ``(fp32_path, out_path, keep_float) -> None``), so
the emitters search with exactly the quantization they ship; ``OnnxQuantizer`` and
``TFLiteQuantizer`` below reproduce the emitters' settings for callers that have none.
ONNX names are graph node names; TFLite names are ai-edge-quantizer op *scopes* (the op's
output tensor names joined by ``;``, with a trailing ``;``), which ``scope_regex`` turns into
the anchored regular expressions ai-edge-quantizer recipes take.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# Re-exported: the layer search moved to compiler/search/layers.py; callers still import it from here.
from edgeship.compiler.search.layers import SensitivityResult as SensitivityResult
from edgeship.compiler.search.layers import search as search
from edgeship.compiler.search.layers import search_feeds as search_feeds
from edgeship.errors import UsageError

Array = np.ndarray[Any, Any]
Feed = Mapping[str, Array]
#: ``quantize(fp32_path, out_path, keep_float)``: write the quantized model to ``out_path``,
#: leaving the named layers (ONNX node names / TFLite op scopes) in float.
Quantize = Callable[[Path, Path, list[str]], None]
Reference = Sequence[Mapping[str, Array]] | Callable[[Feed], Mapping[str, Array]]

#: ONNX op types the ONNX emitter quantizes (dynamic; static Q/DQ leaves Gather out).
ONNX_DYNAMIC_OP_TYPES = ("Conv", "MatMul", "Gemm", "Gather")
ONNX_STATIC_OP_TYPES = ("Conv", "MatMul", "Gemm")
TFLITE_KINDS = ("int8-dynamic", "int8-weight-only", "int8-static")
#: What the layers a search sets apart become: int8 weights with float compute, or plain float.
FALLBACKS = ("weight-only", "float")
#: How a report describes each fallback.
FALLBACK_NOTES = {
    "weight-only": "int8 weights with float compute where the layer has weights, else float",
    "float": "kept in float",
}


def cosines(outputs: Sequence[Mapping[str, Array]], reference: Sequence[Mapping[str, Array]]) -> Array:
    """Per-sample cosine (each output's sample flattened) of every output named in ``reference``.

    Both sides are lists of output dicts (one per feed, the batch axis first). Returns a flat
    array of cosines; a sample whose outputs are both all zero counts as 1.
    """
    out = []
    for got, want in zip(outputs, reference):
        for name, ref in want.items():
            a = np.asarray(got[name], np.float64)
            b = np.asarray(ref, np.float64)
            a, b = a.reshape(len(a), -1) if a.ndim > 1 else a[None], b.reshape(len(b), -1) if b.ndim > 1 else b[None]
            for x, y in zip(a, b):
                nx, ny = np.linalg.norm(x), np.linalg.norm(y)
                out.append(1.0 if nx == 0 and ny == 0 else float(x @ y / (nx * ny)) if nx and ny else 0.0)
    return np.asarray(out)


def _references(reference: Reference, feeds: Sequence[Feed]) -> list[Mapping[str, Array]]:
    if callable(reference):
        return [reference(feed) for feed in feeds]
    refs = list(reference)
    if len(refs) != len(feeds):
        raise UsageError(f"{len(refs)} reference outputs for {len(feeds)} feeds; give one per feed")
    return refs


# ---------------------------------------------------------------------------------------------
# ONNX (ONNX Runtime)
# ---------------------------------------------------------------------------------------------


def onnx_candidates(fp32_onnx: Path, op_types: Sequence[str] = ONNX_DYNAMIC_OP_TYPES) -> list[str]:
    """Names of the graph's nodes of ``op_types``, in graph order (unnamed nodes cannot be excluded)."""
    import onnx

    model = onnx.load(str(fp32_onnx), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in op_types and n.name]


def onnx_float_nodes(
    fp32_onnx: Path,
    quantize: Quantize,
    feeds: Sequence[Feed],
    reference: Reference,
    target_cosine: float,
    max_float_fraction: float = 0.25,
    *,
    candidates: Sequence[str] | None = None,
    search_samples: int = 16,
    scores: Mapping[str, float] | None = None,
    threads: int | None = None,
) -> SensitivityResult:
    """Choose the ONNX nodes to keep in float so the quantized model's worst per-sample cosine
    against ``reference`` reaches ``target_cosine``.

    ``quantize(fp32, out, keep_float)`` writes a quantized copy of ``fp32`` leaving the named
    nodes in float (``OnnxQuantizer`` reproduces the ONNX emitter's). ``feeds``: input name ->
    array, batch axis first; give the calibration set: the search runs on its
    ``search_samples`` hardest feeds and checks the answer on all (``search_feeds``).
    ``reference``: the fp32 outputs, one dict per feed (output name -> array), or a callable
    computing them; only the outputs it names are compared. ``candidates`` defaults to
    ``quantize.candidates(fp32)`` when the quantizer has that method, else every
    MatMul/Gemm/Conv/Gather node. ``scores`` reuses an earlier search's per-node scores. Runs in
    ONNX Runtime on the CPU (``threads`` intra-op threads; default ORT's).

    Raises ``UsageError`` when the model is missing or there is nothing to quantize.
    """
    import onnxruntime as ort

    fp32_onnx, feeds, refs, names = _prepare(
        "ONNX", fp32_onnx, quantize, feeds, reference, candidates, lambda p: onnx_candidates(p)
    )
    with tempfile.TemporaryDirectory(prefix="edgeship-sensitivity-") as tmp:
        out = Path(tmp) / "candidate.onnx"

        def measure(keep: list[str], indices: Sequence[int]) -> Array:
            quantize(fp32_onnx, out, keep)
            options = ort.SessionOptions()
            if threads:
                options.intra_op_num_threads = threads
            session = ort.InferenceSession(str(out), options, providers=["CPUExecutionProvider"])
            wanted = list(refs[0])
            return np.array(
                [cosines([dict(zip(wanted, session.run(wanted, dict(feeds[i]))))], [refs[i]]).min() for i in indices]
            )

        return search_feeds(
            names, measure, len(feeds), target_cosine, max_float_fraction, search_samples=search_samples, scores=scores
        )


@dataclass
class OnnxQuantizer:
    """``onnxruntime.quantization`` with the ONNX emitter's settings, leaving named nodes in float.

    ``precision`` ``"int8-dynamic"`` (per-channel int8 weights, dynamic activations; op types
    Conv/MatMul/Gemm/Gather) or ``"int8-qdq"`` (static Q/DQ, int8 per-channel, MinMax; op types
    Conv/MatMul/Gemm), which needs ``calibration`` feeds. Static calibration runs once: the
    ranges are cached in a file next to the first output and reused for every later call.
    ``exclude`` and ``exclude_op_types`` are always kept in float (the recipe's skip rules).

    ``fallback`` is what the ``keep_float`` layers of a call become: ``"weight-only"`` (default;
    the layer computes in float from int8 weights, see ``onnx_weights``: MatMuls become ORT's
    ``MatMulNBits``, 8-bit blocks of 128; Gemm/Conv an int8 per-channel weight behind a
    ``DequantizeLinear``; Gather tables int8 rows) or ``"float"``. (In int8-dynamic
    ``quantize_dynamic`` has already turned each Gemm into ``<gemm>_MatMul`` + Add, so a Gemm
    set apart becomes a MatMulNBits too.) With ``int8-qdq``, which
    does not quantize Gather, embedding tables (Gather on a constant) get int8 rows as well
    (``embeddings``, default on) unless ``exclude``/``exclude_op_types`` name them.

    ``calibration_method`` (int8-qdq): ``"minmax"`` (default), ``"percentile"`` or ``"entropy"``.

    ``reduce_range`` (int8-dynamic): 7-bit weights, ORT's remedy for x86 CPUs without VNNI,
    whose u8 x s8 int8 kernels (AVX2 ``vpmaddubsw``) saturate pairs of products in int16: the
    same dynamic-int8 model can compute differently on an AVX2-only and a VNNI CPU. Off by
    default (on MiniLM it costs more cosine than the saturation does).
    """

    precision: str = "int8-dynamic"
    calibration: Sequence[Feed] | None = None
    exclude: Sequence[str] = ()
    exclude_op_types: Sequence[str] = ()
    symmetric_activations: bool = False
    reduce_range: bool = False
    fallback: str = "weight-only"
    embeddings: bool = True
    calibration_method: str = "minmax"
    _caches: dict[Path, Path] = field(default_factory=dict, repr=False)
    _clean: dict[Path, Path] = field(default_factory=dict, repr=False)
    _gathers: dict[Path, list[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.precision not in ("int8-dynamic", "int8-qdq"):
            raise UsageError(f"OnnxQuantizer precisions are int8-dynamic and int8-qdq; not {self.precision!r}")
        if self.precision == "int8-qdq" and not self.calibration:
            raise UsageError("int8-qdq needs calibration feeds")
        if self.fallback not in FALLBACKS:
            raise UsageError(f"fallback is one of {', '.join(FALLBACKS)}; not {self.fallback!r}")

    #: Every ONNX op set apart can keep int8 weights (MatMulNBits, DequantizeLinear, int8 rows).
    can_weight_only = True

    @property
    def op_types(self) -> tuple[str, ...]:
        types = ONNX_DYNAMIC_OP_TYPES if self.precision == "int8-dynamic" else ONNX_STATIC_OP_TYPES
        return tuple(t for t in types if t not in self.exclude_op_types)

    def candidates(self, fp32: Path) -> list[str]:
        """The nodes this quantizer would quantize, less those always excluded."""
        return [n for n in onnx_candidates(fp32, self.op_types) if n not in set(self.exclude)]

    def __call__(self, fp32: Path, out: Path, keep_float: list[str]) -> None:
        self._quantize(Path(fp32), Path(out), keep_float)
        weight_only = [*keep_float, *(f"{n}_MatMul" for n in keep_float)] if self.fallback == "weight-only" else []
        if self.precision == "int8-qdq" and self.embeddings and "Gather" not in self.exclude_op_types:
            # Once per model, not per search step (each load reads the whole fp32 file).
            if Path(fp32) not in self._gathers:
                self._gathers[Path(fp32)] = onnx_candidates(Path(fp32), ("Gather",))
            gathers = self._gathers[Path(fp32)]
            weight_only += [n for n in gathers if n not in set(self.exclude)]
        if weight_only:
            import onnx

            from edgeship.compiler.emitters.onnx_weights import weight_only_int8, weight_only_matmul

            model = onnx.load(str(out))
            model, rewritten = weight_only_matmul(model, weight_only)
            rewritten += weight_only_int8(model, [n for n in weight_only if n not in set(rewritten)])
            if rewritten:
                onnx.save(model, str(out))

    def _quantize(self, fp32: Path, out: Path, keep_float: list[str]) -> None:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic

        src = self._without_value_info(Path(fp32), Path(out).parent)
        excluded = list(dict.fromkeys([*self.exclude, *keep_float]))
        if self.precision == "int8-dynamic":
            # quantize_dynamic first rewrites each Gemm into MatMul + Add named "<gemm>_MatMul" and
            # "<gemm>_Add", then applies nodes_to_exclude: a Gemm's own name would match nothing.
            excluded += [f"{name}_MatMul" for name in excluded]
            quantize_dynamic(
                str(src),
                str(out),
                weight_type=QuantType.QInt8,
                per_channel=True,
                reduce_range=self.reduce_range,
                op_types_to_quantize=list(self.op_types),
                nodes_to_exclude=excluded,
            )
            return
        from onnxruntime.quantization import CalibrationDataReader, quantize_static

        feeds = list(self.calibration or ())

        class Reader(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self) -> None:
                self._it = iter(feeds)

            def get_next(self) -> dict[str, Any] | None:
                feed = next(self._it, None)
                return None if feed is None else dict(feed)

        cache = self._caches.setdefault(Path(fp32), Path(out).parent / f"{Path(fp32).stem}.calibration.json")
        quantize_static(
            str(src),
            str(out),
            Reader(),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy,
            }[self.calibration_method],
            op_types_to_quantize=list(self.op_types),
            nodes_to_exclude=excluded,
            extra_options={
                # Q/DQ on MatMul/Gemm inputs only (ORT's default also quantizes their outputs,
                # TensorRT's guidance places Q/DQ on inputs; the MatMul still computes in int8).
                # On MiniLM the output pairs alone took the worst held-out sentence from 0.95 to
                # 0.80 (256 calibration sentences; 0.956 to 0.775 with 64): a residual stream or
                # attention score rounded to 8 bits again.
                "OpTypesToExcludeOutputQuantization": [t for t in self.op_types if t in ("MatMul", "Gemm")],
                "ActivationSymmetric": self.symmetric_activations,
            },
            calibration_cache_path=cache,
        )

    def _without_value_info(self, fp32: Path, workdir: Path) -> Path:
        # The dynamo exporter writes intermediate shapes that onnxruntime.quantization's shape
        # inference contradicts and refuses (see the ONNX emitter); strip them once per model.
        import onnx

        clean = self._clean.get(fp32)
        if clean is None or not clean.is_file():
            model = onnx.load(str(fp32))
            if not model.graph.value_info:
                return fp32
            del model.graph.value_info[:]
            clean = workdir / f"{fp32.stem}.novi.onnx"
            onnx.save(model, str(clean))
            self._clean[fp32] = clean
        return clean


# ---------------------------------------------------------------------------------------------
# TFLite (ai-edge-quantizer, LiteRT interpreter)
# ---------------------------------------------------------------------------------------------

#: TFLite ops that carry weights: the candidates when a quantizer cannot list its own.
TFLITE_WEIGHT_OPS = (
    "FULLY_CONNECTED",
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "TRANSPOSE_CONV",
    "BATCH_MATMUL",
    "EMBEDDING_LOOKUP",
    "CONV_3D",
)


#: The ops a weight-only fallback applies to (ai-edge-quantizer's ``weightonly_wi8_afp32`` ops
#: less EMBEDDING_LOOKUP), by ``qtyping.TFLOperationName`` member.
TFLITE_WEIGHT_ONLY_OPS = (
    "FULLY_CONNECTED",
    "CONV_2D",
    "DEPTHWISE_CONV_2D",
    "CONV_2D_TRANSPOSE",
    "BATCH_MATMUL",
)


def scope_regex(scope: str) -> str:
    """The anchored regex that matches exactly one ai-edge-quantizer op scope."""
    return "^" + re.escape(scope) + "$"


def tflite_ops(fp32_tflite: Path) -> list[tuple[Any, str, tuple[str, ...]]]:
    """The main subgraph's ops in graph order: ``(ai-edge-quantizer op name, op scope, output
    tensor names)``; the op name's ``.value`` is the TFLite op (``FULLY_CONNECTED``)."""
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    model = fb.read_model(Path(fp32_tflite).read_bytes())
    out = []
    for subgraph in model.subgraphs[:1]:
        for op in subgraph.operators:
            key = fb.TFL_OP_CODE_TO_NAME.get(model.operatorCodes[op.opcodeIndex].builtinCode)
            if key is None:
                continue
            names = tuple(_text(subgraph.tensors[i].name) for i in op.outputs if i >= 0)
            out.append((key, fb.get_op_scope(op, subgraph.tensors), names))
    return out


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _op_type(key: Any) -> str:
    return str(key.value if hasattr(key, "value") else key)


def tflite_skipped(fp32_tflite: Path, skipped: Callable[[str, str], bool]) -> list[str]:
    """Scopes of the ops a recipe's skip rules keep in float: ``skipped(op_type, name)`` is asked
    with the TFLite op type (``FULLY_CONNECTED``) and, in turn, the op's scope and each of its
    output tensor names; any yes skips the op."""
    return [
        scope
        for key, scope, names in tflite_ops(fp32_tflite)
        if scope and any(skipped(_op_type(key), name) for name in (scope, *names))
    ]


def tflite_candidates(fp32_tflite: Path, aeq_recipe: Any | None = None) -> list[str]:
    """Scopes of the ops ``aeq_recipe`` quantizes (an ai-edge-quantizer recipe; default the
    dynamic int8 one), in graph order; without a recipe, ops of ``TFLITE_WEIGHT_OPS``."""
    from ai_edge_quantizer import algorithm_manager, recipe_manager

    manager = None
    if aeq_recipe is not None:
        manager = recipe_manager.RecipeManager()
        manager.load_quantization_recipe(aeq_recipe)
    out: list[str] = []
    for key, scope, _names in tflite_ops(fp32_tflite):
        if manager is None:
            if _op_type(key) in TFLITE_WEIGHT_OPS:
                out.append(scope)
            continue
        algorithm, _config = manager.get_quantization_configs(key, scope)
        if algorithm != algorithm_manager.AlgorithmName.NO_QUANTIZE:
            out.append(scope)
    return list(dict.fromkeys(s for s in out if s))


def tflite_float_ops(
    fp32_tflite: Path,
    quantize: Quantize,
    feeds: Sequence[Feed],
    reference: Reference,
    target_cosine: float,
    max_float_fraction: float = 0.25,
    *,
    candidates: Sequence[str] | None = None,
    search_samples: int = 16,
    scores: Mapping[str, float] | None = None,
    threads: int | None = None,
) -> SensitivityResult:
    """Choose the TFLite ops (ai-edge-quantizer scopes) to keep in float so the quantized
    model's worst per-sample cosine against ``reference`` reaches ``target_cosine``.

    ``quantize(fp32, out, keep_float)`` writes the quantized model with the named scopes left
    in float (``TFLiteQuantizer`` reproduces the TFLite emitter's). Feeds and outputs are bound
    by position, as the TFLite emitter binds them: the i-th key of a feed is the model's i-th
    signature input, the i-th key of a reference dict its i-th output. Float feeds to an int8
    input are quantized with the input's scale; int8 outputs are dequantized. Give the
    calibration set as ``feeds``: the search runs on its ``search_samples`` hardest feeds and
    checks the answer on all (``search_feeds``). ``candidates`` defaults to
    ``quantize.candidates(fp32)`` when the quantizer has that method, else the ops of
    ``TFLITE_WEIGHT_OPS``. ``scores`` reuses an earlier search's per-op scores. Runs in
    ai-edge-litert (XNNPACK) with ``threads`` threads.

    Raises ``UsageError`` when the model is missing or there is nothing to quantize.
    """
    fp32_tflite, feeds, refs, names = _prepare(
        "TFLite", fp32_tflite, quantize, feeds, reference, candidates, lambda p: tflite_candidates(p)
    )
    with tempfile.TemporaryDirectory(prefix="edgeship-sensitivity-") as tmp:
        out = Path(tmp) / "candidate.tflite"

        def measure(keep: list[str], indices: Sequence[int]) -> Array:
            quantize(fp32_tflite, out, keep)
            run = tflite_runner(out, threads)
            result = []
            for i in indices:
                values = run(list(feeds[i].values()))
                result.append(cosines([dict(zip(refs[i], values))], [refs[i]]).min())
            return np.array(result)

        return search_feeds(
            names, measure, len(feeds), target_cosine, max_float_fraction, search_samples=search_samples, scores=scores
        )


def tflite_runner(path: Path, threads: int | None = None) -> Callable[[Sequence[Array]], list[Array]]:
    """A function running the model's first signature on positional inputs, returning float
    outputs in signature order (int8/int16 I/O quantized and dequantized with its parameters)."""
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(path), num_threads=threads or 1)
    signature = next(iter(interp.get_signature_list()))
    runner = interp.get_signature_runner(signature)
    listed = interp.get_signature_list()[signature]
    in_names, out_names = list(listed["inputs"]), list(listed["outputs"])
    in_details, out_details = runner.get_input_details(), runner.get_output_details()

    def run(values: Sequence[Array]) -> list[Array]:
        if len(values) != len(in_names):
            raise UsageError(f"the model has {len(in_names)} inputs; got {len(values)}")
        kwargs = {name: _to_input(np.asarray(v), in_details[name]) for name, v in zip(in_names, values)}
        result = runner(**kwargs)
        return [_from_output(result[name], out_details[name]) for name in out_names]

    return run


def _to_input(value: Array, detail: Mapping[str, Any]) -> Array:
    dtype = np.dtype(detail["dtype"])
    scale, zero = _quant_params(detail)
    if dtype.kind in "iu" and value.dtype.kind == "f" and scale is not None:
        info = np.iinfo(dtype)
        return np.clip(np.round(value / scale) + zero, info.min, info.max).astype(dtype)
    return value.astype(dtype, copy=False)


def _from_output(value: Array, detail: Mapping[str, Any]) -> Array:
    scale, zero = _quant_params(detail)
    if np.dtype(detail["dtype"]).kind in "iu" and scale is not None:
        return (value.astype(np.float32) - zero) * scale
    return np.asarray(value)


def _quant_params(detail: Mapping[str, Any]) -> tuple[Any, Any]:
    params = detail.get("quantization_parameters") or {}
    scales = np.asarray(params.get("scales", []), np.float32)
    if scales.size == 0:
        return None, None
    zeros = np.asarray(params.get("zero_points", np.zeros_like(scales)), np.float32)
    return (scales[0], zeros[0]) if scales.size == 1 else (scales, zeros)


@dataclass
class TFLiteQuantizer:
    """ai-edge-quantizer with the TFLite emitter's settings, leaving named op scopes in float.

    ``precision``: ``"int8-dynamic"`` (``dynamic_wi8_afp32``), ``"int8-weight-only"``
    (``weight_only_wi8_afp32``) or ``"int8-static"`` (``static_wi8_ai8`` calibrated on
    ``calibration`` with a global min/max, once per fp32 model; feeds bound by position).
    Every kept scope becomes a ``NO_QUANTIZE`` entry after the recipe's ``.*`` entry, which
    ai-edge-quantizer lets win because the last matching scope does; with ``fallback``
    ``"weight-only"`` (default) a further entry gives the scope's weight ops (fully connected,
    convolutions, batch matmul) int8 weights dequantized in front of a float op, so only their
    arithmetic stays float. Embedding lookups never fall back to weight-only (that would
    dequantize the whole table on every call): kept ones stay float.

    ``static_wi8_ai8`` leaves EMBEDDING_LOOKUP out; with ``embeddings`` (default) int8-static
    gives those tables int8 rows with float outputs (ai-edge-quantizer's dynamic-range config,
    the lookup kernel's hybrid mode), which for a text model is most of the size.

    ``exclude``: op scopes always left float (the recipe's skip rules, see ``tflite_skipped``);
    they are no candidates for a search.
    """

    precision: str = "int8-dynamic"
    calibration: Sequence[Feed] | None = None
    fallback: str = "weight-only"
    embeddings: bool = True
    exclude: Sequence[str] = ()
    _qsvs: dict[Path, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.precision not in TFLITE_KINDS:
            raise UsageError(f"TFLiteQuantizer precisions are {', '.join(TFLITE_KINDS)}; not {self.precision!r}")
        if self.precision == "int8-static" and not self.calibration:
            raise UsageError("int8-static needs calibration feeds")
        if self.fallback not in FALLBACKS:
            raise UsageError(f"fallback is one of {', '.join(FALLBACKS)}; not {self.fallback!r}")

    @property
    def can_weight_only(self) -> bool:
        """Whether layers set apart can keep int8 weights: not in a weight-only model already."""
        return self.precision != "int8-weight-only"

    def recipe(self) -> Any:
        from ai_edge_quantizer import qtyping, recipe, recipe_manager

        base = {
            "int8-dynamic": recipe.dynamic_wi8_afp32,
            "int8-weight-only": recipe.weight_only_wi8_afp32,
            "int8-static": recipe.static_wi8_ai8,
        }[self.precision]()
        if self.precision != "int8-static" or not self.embeddings:
            return base
        manager = recipe_manager.RecipeManager()
        manager.load_quantization_recipe(base)
        manager.add_dynamic_config(".*", qtyping.TFLOperationName.EMBEDDING_LOOKUP, num_bits=8)
        return manager.get_quantization_recipe()

    def candidates(self, fp32: Path) -> list[str]:
        """Scopes of the ops this recipe quantizes, less those always excluded. With the
        weight-only fallback, embedding lookups are no candidates: their int8 path already is
        weight-only (int8 table, float rows out), so setting one apart could only make the
        table float, and on MiniLM a near-zero score ranked it in by noise: 47 MB back in float."""
        skip = set(self.exclude)
        if self.fallback == "weight-only" and self.can_weight_only:
            skip |= {scope for key, scope, _ in tflite_ops(fp32) if _op_type(key) == "EMBEDDING_LOOKUP"}
        return [s for s in tflite_candidates(fp32, self.recipe()) if s not in skip]

    def __call__(self, fp32: Path, out: Path, keep_float: list[str]) -> None:
        from ai_edge_quantizer import algorithm_manager, qtyping, quantizer

        q = quantizer.Quantizer(str(fp32), self.recipe())
        weight_only = qtyping.OpQuantizationConfig(
            weight_tensor_config=qtyping.TensorQuantizationConfig(
                num_bits=8, symmetric=True, granularity=qtyping.QuantGranularity.CHANNELWISE
            ),
            compute_precision=qtyping.ComputePrecision.FLOAT,
            explicit_dequantize=True,
        )
        if keep_float:
            # One alternation for all kept scopes: ai-edge-quantizer checks every entry against
            # every op, and hundreds of entries made a quantize take minutes instead of seconds.
            kept = "^(?:" + "|".join(re.escape(scope) for scope in keep_float) + ")$"
            q.update_quantization_recipe(
                regex=kept,
                operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE,
            )
            if self.fallback == "weight-only" and self.can_weight_only:
                # A second, equivalent regex: entries are keyed by regex, and a later key wins.
                for op in TFLITE_WEIGHT_ONLY_OPS:
                    q.update_quantization_recipe(
                        regex=f"(?:{kept})",
                        operation_name=getattr(qtyping.TFLOperationName, op),
                        op_config=weight_only,
                        algorithm_key=algorithm_manager.AlgorithmName.MIN_MAX_UNIFORM_QUANT,
                    )
        if self.exclude:  # last, so nothing set apart above can override a skip rule
            q.update_quantization_recipe(
                regex="^(?:" + "|".join(re.escape(scope) for scope in self.exclude) + ")$",
                operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
                algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE,
            )
        qsvs = self._calibrate(Path(fp32)) if self.precision == "int8-static" else None
        result = q.quantize(qsvs, enable_progress_report=False)
        result.export_model(str(out), overwrite=True)

    def _calibrate(self, fp32: Path) -> Any:
        # Global min/max: ai-edge-quantizer's default moving average clips (see the TFLite emitter).
        # Calibrated with the full recipe, so every tensor has statistics whatever stays float.
        if fp32 not in self._qsvs:
            from ai_edge_litert.interpreter import Interpreter
            from ai_edge_quantizer import calibrator, quantizer

            q = quantizer.Quantizer(str(fp32), self.recipe())
            from ai_edge_quantizer.utils import qsv_utils

            interp = Interpreter(model_path=str(fp32))
            signature = next(iter(interp.get_signature_list()))
            native = interp.get_signature_list()[signature]["inputs"]
            details = interp.get_signature_runner(signature).get_input_details()
            data = [
                {n: np.asarray(v).astype(details[n]["dtype"], copy=False) for n, v in zip(native, feed.values())}
                for feed in self.calibration or ()
            ]
            calib = calibrator.Calibrator(
                q._float_model_buffer, num_threads=1, qsv_update_func=qsv_utils.min_max_update
            )
            calib.calibrate({signature: data}, q._recipe_manager)
            self._qsvs[fp32] = calib.get_model_qsvs()
        return self._qsvs[fp32]


def _prepare(
    kind: str,
    model: Path,
    quantize: Quantize,
    feeds: Sequence[Feed],
    reference: Reference,
    given: Sequence[str] | None,
    default: Callable[[Path], list[str]],
) -> tuple[Path, list[Feed], list[Mapping[str, Array]], list[str]]:
    """What both searches start from: the model (which must exist), the feeds, their fp32
    outputs, and the candidates (given, else the quantizer's own list, else ``default``)."""
    model = Path(model)
    if not model.is_file():
        raise UsageError(f"{kind} model {model} does not exist")
    feeds = list(feeds)
    refs = _references(reference, feeds)
    if given is not None:
        return model, feeds, refs, list(given)
    lister = getattr(quantize, "candidates", None)
    return model, feeds, refs, list(lister(model)) if callable(lister) else default(model)


def choose(
    front: Callable[..., SensitivityResult],
    fp32: Path,
    quantizer: OnnxQuantizer | TFLiteQuantizer,
    feeds: Sequence[Feed],
    reference: Reference,
    target_cosine: float,
    max_float_fraction: float,
    fallback: str = "auto",
) -> tuple[SensitivityResult, str]:
    """Run a search (``onnx_float_nodes`` or ``tflite_float_ops``) with ``quantizer`` and the
    given ``fallback`` for the layers it sets apart; returns the result and the fallback used
    (the quantizer is left set to it, so calling it reproduces the searched model).

    ``"auto"`` tries ``"weight-only"`` (the model keeps its int8 size) and, when that does not
    reach the target within the budget, searches again with ``"float"``; the float answer is
    taken only when it does better (its ``evaluations`` then count both searches). Weight-only
    can miss where float does not: a layer whose weights carry an outlier channel's
    compensation (tiny weights facing a huge activation) loses them to an int8 step. A
    quantizer that has no weight-only fallback (TFLite ``int8-weight-only``, whose layers set
    apart can only be float) searches once, with ``"float"``.
    """
    if fallback not in (*FALLBACKS, "auto"):
        raise UsageError(f"fallback is one of auto, {', '.join(FALLBACKS)}; not {fallback!r}")
    if not quantizer.can_weight_only:
        fallback = "float"
    first = "weight-only" if fallback == "auto" else fallback
    quantizer.fallback = first
    found = front(fp32, quantizer, feeds, reference, target_cosine, max_float_fraction)
    if found.reached or fallback != "auto":
        return found, first
    quantizer.fallback = "float"
    again = front(fp32, quantizer, feeds, reference, target_cosine, max_float_fraction)
    if again.reached or again.cosine > found.cosine:
        note = f"weight-only fallback reached {found.cosine:.4f} only; float fallback searched instead"
        fields = {**again.__dict__, "notes": [*again.notes, note]}
        fields["evaluations"] = found.evaluations + again.evaluations
        return SensitivityResult(**fields), "float"
    quantizer.fallback = first
    return found, first
