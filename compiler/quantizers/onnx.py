"""The ONNX Runtime quantizer the ONNX emitter ships: ``onnxruntime.quantization``, leaving named
nodes in float (``OnnxQuantizer``), the nodes it can quantize (``onnx_candidates``), and which
tensor each PyTorch layer's matrix multiply reads in the exported graph (``layer_inputs``).

The layers a call keeps out of int8 become what its ``fallback`` says: int8 weights with float
compute (``compiler/emitters/onnx_weights.py``) or plain float.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.compiler.quantizers import FALLBACKS, Feed
from edgeship.errors import UsageError

#: ONNX op types the ONNX emitter quantizes (dynamic; static Q/DQ leaves Gather out).
ONNX_DYNAMIC_OP_TYPES = ("Conv", "MatMul", "Gemm", "Gather")
ONNX_STATIC_OP_TYPES = ("Conv", "MatMul", "Gemm")


def onnx_candidates(fp32_onnx: Path, op_types: Sequence[str] = ONNX_DYNAMIC_OP_TYPES) -> list[str]:
    """Names of the graph's nodes of ``op_types``, in graph order (unnamed nodes cannot be excluded)."""
    import onnx

    model = onnx.load(str(fp32_onnx), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in op_types and n.name]


def layer_inputs(fp32_onnx: Path, layers: Iterable[str]) -> dict[str, list[str]]:
    """``{layer: [tensor, ...]}``: the input tensors of the MatMul, Gemm or Conv nodes each named
    PyTorch module (``named_modules`` name) was exported to (one per call of the module), from the
    module path torch.onnx records on every node (``pkg.torch.onnx.name_scopes``: the root, the
    module path, the op), or else from the node's weight (``<layer>.weight``: a Conv with a
    BatchNorm folded in carries the BatchNorm's path). A layer with no such node is left out."""
    import onnx

    wanted = set(layers)
    found: dict[str, list[str]] = {}
    for node in onnx.load(str(fp32_onnx), load_external_data=False).graph.node:
        if node.op_type not in ONNX_STATIC_OP_TYPES or not node.input:
            continue
        scopes = next((p.value for p in node.metadata_props if p.key == "pkg.torch.onnx.name_scopes"), None)
        path = ast.literal_eval(scopes) if scopes else []
        weight = node.input[1] if len(node.input) > 1 else ""
        if len(path) >= 2 and path[-2] in wanted:
            found.setdefault(path[-2], []).append(node.input[0])
        elif weight.endswith(".weight") and weight.removesuffix(".weight") in wanted:
            found.setdefault(weight.removesuffix(".weight"), []).append(node.input[0])
    return found


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
    ``input_ranges`` (int8-qdq): ``{tensor: (min, max)}`` that replace calibrated ranges, e.g. the
    ranges ``quantize.qat`` trained with (``layer_inputs`` finds the tensors).

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
    input_ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
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
                "TensorQuantOverrides": {
                    tensor: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
                    for tensor, (lo, hi) in self.input_ranges.items()
                },
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
