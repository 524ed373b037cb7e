"""The layer search on real ONNX and TFLite models: which layers to keep out of int8 so the
quantized model stays within a cosine of its fp32 source, each candidate built with the quantizer
the emitter ships.

The search itself (``search_feeds``) is pure and lives in ``compiler/search/layers.py``: quantize
everything, score each candidate layer by quantizing it alone, keep the most sensitive out of
int8 until the worst sample's cosine meets the target. The fronts here give it its
quantize-and-measure step: ``onnx_float_nodes`` for ONNX Runtime, ``tflite_float_ops`` for LiteRT,
and ``choose``, which picks what the layers set apart become (``FALLBACKS``).

So a search costs ``candidates + O(log candidates)`` quantize-and-run steps: for MiniLM
(49 ONNX MatMul/Gather nodes, 49 TFLite weight ops) well under a minute on two cores; static
int8 TFLite quantizes every op (346 candidates for MiniLM), about three minutes. Every cosine
in a result was measured on the quantized model it describes, never extrapolated.

Cosine is per sample (the sample's outputs flattened) and the figure a search compares with
the target is the minimum over every sample of every feed: the worst sample, as the
compiler's validation reports it (``cosine_min``).

The quantizer is the caller's (a callable ``(fp32_path, out_path, keep_float) -> None``), so
the emitters search with exactly the quantization they ship; ``OnnxQuantizer`` and
``TFLiteQuantizer`` (``compiler/quantizers/``) are the emitters' own. ONNX names are graph node
names; TFLite names are ai-edge-quantizer op scopes.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.compiler.quantizers import FALLBACKS, Array, Feed, Quantize
from edgeship.compiler.quantizers.onnx import OnnxQuantizer, onnx_candidates
from edgeship.compiler.quantizers.tflite import TFLiteQuantizer, tflite_candidates
from edgeship.compiler.search.layers import SensitivityResult, search_feeds
from edgeship.errors import UsageError

Reference = Sequence[Mapping[str, Array]] | Callable[[Feed], Mapping[str, Array]]


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
    nodes in float (``OnnxQuantizer`` is the ONNX emitter's). ``feeds``: input name ->
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


# ---------------------------------------------------------------------------------------------
# TFLite (LiteRT)
# ---------------------------------------------------------------------------------------------


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
    in float (``TFLiteQuantizer`` is the TFLite emitter's). Feeds and outputs are bound by
    position, as the TFLite emitter binds them: the i-th key of a feed is the model's i-th
    signature input, the i-th key of a reference dict its i-th output. Float feeds to an int8
    input are quantized with the input's scale; int8 outputs are dequantized. Give the
    calibration set as ``feeds``: the search runs on its ``search_samples`` hardest feeds and
    checks the answer on all (``search_feeds``). ``candidates`` defaults to
    ``quantize.candidates(fp32)`` when the quantizer has that method, else the ops of
    ``quantizers.tflite.TFLITE_WEIGHT_OPS``. ``scores`` reuses an earlier search's per-op
    scores. Runs in ai-edge-litert (XNNPACK) with ``threads`` threads (default 1).

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
