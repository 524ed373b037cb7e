"""The TFLite quantizer the TFLite emitter ships: ai-edge-quantizer, leaving named op scopes in
float (``TFLiteQuantizer``), and the readers of a TFLite model's ops it works with.

ai-edge-quantizer addresses ops by *scope*: the op's output tensor names joined by ``;``, with a
trailing ``;``. ``tflite_ops`` lists a model's ops with their scopes, ``tflite_candidates`` the
scopes a recipe quantizes, ``tflite_skipped`` the scopes a compile recipe's skip rules keep in
float, and ``scope_regex`` turns a scope into the anchored regular expression its recipes take.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.compiler.quantizers import FALLBACKS, Feed
from edgeship.errors import UsageError

TFLITE_KINDS = ("int8-dynamic", "int8-weight-only", "int8-static", "w8a16")
#: The kinds with calibrated (static) activation ranges.
TFLITE_STATIC = ("int8-static", "w8a16")
#: w8a16 leaves in float every op that reads or writes a tensor whose calibrated range reaches past
#: +-WIDE_RANGE: an additive attention mask (-10,000, or the dtype's minimum) and what it flows into.
#: One int16 scale for it is a step of 0.3 on the attention scores; MiniLM's worst held-out sentence
#: was 0.9941 with them int16 and 0.9960 with them float (smoothed: 27 of the 346 ops w8a16 quantizes).
WIDE_RANGE = 1000.0
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


#: The TFLite ops whose input ``tflite_layer_inputs`` maps to the PyTorch layer that became them.
TFLITE_MATMUL_OPS = ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D", "BATCH_MATMUL")


def tflite_layer_inputs(fp32_tflite: Path, module: Any, layers: Iterable[str]) -> dict[str, list[str]]:
    """``{layer: [tensor, ...]}``: the tensors whose ranges set what the fully connected,
    convolution and batch matmul ops each named PyTorch module (``named_modules`` name of
    ``module``, the module the TFLite model was converted from) became read, one per call. A layer
    with no such op is left out, and so is one whose scope another layer shares.

    Only ops with a constant weight count: a matmul of two activations (attention scores) is no
    layer's. litert-torch names every tensor after the module calls that made it: the root's
    class, then ``<class>_<attribute>`` per module level (a ``ModuleList`` or ``ModuleDict`` is
    iterated, not called, so it has no level: two lists' first Linears share a scope, and are left
    out), ``/``-separated; a tensor fused from several calls joins their scopes with ``;``, the
    op's own last as a rule (a Conv with a BatchNorm folded in names both; a key projection's
    weight names the query's first). An op is the layer's whose scope is the last such part of its
    weight's name, else of its output's. The converter does not promise the rule: in a ViT's
    attention it rewrites the key and value projections' weights and their names carry the
    query's scope last, so those layers are not found (all three read one tensor, which gets the
    query's range). A container whose children the parent calls one by one has no level either,
    which the names do not model.

    The tensor is the op's input, or, when that comes through ops ai-edge-quantizer gives their
    input's scale (reshape, transpose, pad, pooling, slicing: ``SAME_AS_INPUT_SCALE``), the tensor
    in front of them, whose range is the one quantization reads."""
    from ai_edge_quantizer.algorithms.utils.common_utils import OpQuantConstraint
    from ai_edge_quantizer.utils import constrained_ops_utils
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    modules = dict(module.named_modules())
    by_scope: dict[str, list[str]] = {}
    for layer in layers:
        if layer in modules:
            by_scope.setdefault(_scope(module, modules, layer), []).append(layer)
    scopes = {scope: named[0] for scope, named in by_scope.items() if len(named) == 1}
    same_scale = {
        _op_type(k) for k in constrained_ops_utils.get_constrained_op_list(OpQuantConstraint.SAME_AS_INPUT_SCALE)
    }
    model = fb.read_model(Path(fp32_tflite).read_bytes())
    subgraph = model.subgraphs[0]
    kinds = [
        _op_type(fb.TFL_OP_CODE_TO_NAME.get(model.operatorCodes[op.opcodeIndex].builtinCode))
        for op in subgraph.operators
    ]
    producer = {out: n for n, op in enumerate(subgraph.operators) for out in op.outputs if out >= 0}
    found: dict[str, list[str]] = {}
    for op, kind in zip(subgraph.operators, kinds):
        if kind not in TFLITE_MATMUL_OPS or len(op.inputs) < 2 or min(op.inputs[:2]) < 0:
            continue
        if fb.get_tensor_data(subgraph.tensors[op.inputs[1]], model.buffers) is None:
            continue  # two activations multiplied: no layer's weight
        owner = None
        for i in (op.inputs[1], *op.outputs):
            matched = [part for part in _text(subgraph.tensors[i].name).split(";") if part in scopes] if i >= 0 else []
            if matched:
                owner = scopes[matched[-1]]
                break
        if owner is not None:
            read = op.inputs[0]
            while read in producer and kinds[producer[read]] in same_scale:
                read = subgraph.operators[producer[read]].inputs[0]
            found.setdefault(owner, []).append(_text(subgraph.tensors[read].name))
    return found


def _scope(root: Any, modules: dict[str, Any], layer: str) -> str:
    """The scope litert-torch gives what ``layer`` (a ``named_modules`` name) computes."""

    def label(m: Any) -> str:
        return f"{type(m).__module__}.{type(m).__qualname__}"

    levels = [label(root)]
    parts = layer.split(".")
    for i in range(1, len(parts) + 1):
        m = modules[".".join(parts[:i])]
        if type(m).__name__ not in ("ModuleList", "ModuleDict"):
            levels.append(f"{label(m)}_{parts[i - 1]}")
    return "/".join(levels)


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


@dataclass
class TFLiteQuantizer:
    """ai-edge-quantizer with the TFLite emitter's settings, leaving named op scopes in float.

    ``precision``: ``"int8-dynamic"`` (``dynamic_wi8_afp32``), ``"int8-weight-only"``
    (``weight_only_wi8_afp32``), ``"int8-static"`` (``static_wi8_ai8`` calibrated on
    ``calibration`` with a global min/max, once per fp32 model; feeds bound by position) or
    ``"w8a16"`` (``static_wi8_ai16``, TFLite's 16x8 mode: int16 activations, int8 weights,
    calibrated the same way; the ops touching a tensor wider than ``WIDE_RANGE`` stay float,
    see ``wide_ops``).
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

    ``input_ranges`` (int8-static): ``{tensor: (min, max)}`` that replace calibrated ranges, e.g.
    the ranges ``quantize.qat`` trained with (``tflite_layer_inputs`` finds the tensors); refused
    for the other kinds (QAT trains int8 rounding; w8a16's wide ops are found from the ranges).
    """

    precision: str = "int8-dynamic"
    calibration: Sequence[Feed] | None = None
    fallback: str = "weight-only"
    embeddings: bool = True
    exclude: Sequence[str] = ()
    input_ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    _qsvs: dict[Path, Any] = field(default_factory=dict, repr=False)
    _wide: dict[Path, list[str]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.precision not in TFLITE_KINDS:
            raise UsageError(f"TFLiteQuantizer precisions are {', '.join(TFLITE_KINDS)}; not {self.precision!r}")
        if self.precision in TFLITE_STATIC and not self.calibration:
            raise UsageError(f"{self.precision} needs calibration feeds")
        if self.fallback not in FALLBACKS:
            raise UsageError(f"fallback is one of {', '.join(FALLBACKS)}; not {self.fallback!r}")
        if self.input_ranges and self.precision != "int8-static":
            raise UsageError(f"input_ranges are for int8-static; {self.precision} calibrates every range itself")

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
            "w8a16": recipe.static_wi8_ai16,
        }[self.precision]()
        if self.precision not in TFLITE_STATIC or not self.embeddings:
            return base
        manager = recipe_manager.RecipeManager()
        manager.load_quantization_recipe(base)
        manager.add_dynamic_config(".*", qtyping.TFLOperationName.EMBEDDING_LOOKUP, num_bits=8)
        return manager.get_quantization_recipe()

    def candidates(self, fp32: Path) -> list[str]:
        """Scopes of the ops this recipe quantizes, less those always excluded. With the
        weight-only fallback, embedding lookups are no candidates: their int8 path already is
        weight-only (int8 table, float rows out), so setting one apart could only make the
        table float, and on MiniLM a near-zero score ranked it in by noise: 47 MB back in float.
        The ops ``wide_ops`` leaves float are no candidates either."""
        skip = set(self.exclude) | set(self.wide_ops(fp32))
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
            kept = _left_float(q, keep_float)
            if self.fallback == "weight-only" and self.can_weight_only:
                # A second, equivalent regex: entries are keyed by regex, and a later key wins.
                for op in TFLITE_WEIGHT_ONLY_OPS:
                    q.update_quantization_recipe(
                        regex=f"(?:{kept})",
                        operation_name=getattr(qtyping.TFLOperationName, op),
                        op_config=weight_only,
                        algorithm_key=algorithm_manager.AlgorithmName.MIN_MAX_UNIFORM_QUANT,
                    )
        always = [*self.exclude, *self.wide_ops(Path(fp32))]
        if always:  # last, so nothing set apart above can override a skip rule or a wide tensor
            _left_float(q, always)
        qsvs = self._calibrate(Path(fp32)) if self.precision in TFLITE_STATIC else None
        result = q.quantize(qsvs, enable_progress_report=False)
        result.export_model(str(out), overwrite=True)

    def wide_ops(self, fp32: Path) -> list[str]:
        """w8a16: scopes of the ops that read or write a tensor whose calibrated range reaches past
        +-``WIDE_RANGE``, left float (empty for the other kinds). Found once per fp32 model."""
        if self.precision != "w8a16":
            return []
        fp32 = Path(fp32)
        if fp32 not in self._wide:
            self._wide[fp32] = self._find_wide(fp32)
        return self._wide[fp32]

    def _find_wide(self, fp32: Path) -> list[str]:
        from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

        qsvs = self._calibrate(Path(fp32))
        wide = {
            name
            for name, stats in qsvs.items()
            if "min" in stats
            and "max" in stats
            and max(abs(float(np.min(stats["min"]))), abs(float(np.max(stats["max"])))) > WIDE_RANGE
        }
        model = fb.read_model(Path(fp32).read_bytes())
        subgraph = model.subgraphs[0]
        scopes = []
        for op in subgraph.operators:
            tensors = [_text(subgraph.tensors[i].name) for i in [*op.inputs, *op.outputs] if i >= 0]
            if any(t in wide for t in tensors):
                scopes.append(fb.get_op_scope(op, subgraph.tensors))
        return list(dict.fromkeys(s for s in scopes if s))

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
            qsvs = calib.get_model_qsvs()
            for tensor, (lo, hi) in self.input_ranges.items():
                if tensor in qsvs:
                    shape = np.shape(qsvs[tensor]["min"])
                    qsvs[tensor] = {
                        **qsvs[tensor],
                        "min": np.full(shape, lo, np.float32),
                        "max": np.full(shape, hi, np.float32),
                    }
            self._qsvs[fp32] = qsvs
        return self._qsvs[fp32]


def _left_float(q: Any, scopes: Sequence[str]) -> str:
    """Add one ``NO_QUANTIZE`` entry for ``scopes`` to the ai-edge-quantizer ``q``; returns its regex.

    One alternation for all the scopes: ai-edge-quantizer checks every entry against every op, and
    hundreds of entries made a quantize take minutes instead of seconds."""
    from ai_edge_quantizer import algorithm_manager, qtyping

    regex = "^(?:" + "|".join(re.escape(scope) for scope in scopes) + ")$"
    q.update_quantization_recipe(
        regex=regex,
        operation_name=qtyping.TFLOperationName.ALL_SUPPORTED,
        algorithm_key=algorithm_manager.AlgorithmName.NO_QUANTIZE,
    )
    return regex
