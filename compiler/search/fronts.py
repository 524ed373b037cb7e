"""The layer search on real ONNX and TFLite models: which layers to keep out of int8 so the
quantized model stays within a cosine of its fp32 source, each candidate built with the quantizer
the emitter ships and scored through the runtime Session.

The search itself (``search_feeds``) is pure and lives in ``compiler/search/layers.py``: quantize
everything, score each candidate layer by quantizing it alone, keep the most sensitive out of
int8 until the worst sample's cosine meets the target. The fronts here give it its
quantize-and-measure step: ``onnx_float_nodes`` for ONNX Runtime, ``tflite_float_ops`` for LiteRT,
and ``choose``, which picks what the layers set apart become (``FALLBACKS``).

So a search costs ``candidates + O(log candidates)`` quantize-and-run steps: for MiniLM
(49 ONNX MatMul/Gather nodes, 49 TFLite weight ops) well under a minute on two cores; static
int8 TFLite quantizes every op (346 candidates for MiniLM), about three minutes. Every cosine
in a result was measured on the quantized model it describes, never extrapolated.

Each candidate runs in a ``Session`` opened with ``edgeship.runtime.open_unpackaged`` on the
backend the compiler's validation uses, so the figures a search decides on come from the code
that runs the model on a device: ONNX Runtime with the runtime's session options, LiteRT with
the runtime's quantization of float inputs to an int8 model and dequantization of its int8
outputs (``open_candidate``).

Cosine is per sample (the sample's outputs flattened) and the figure a search compares with
the target is the minimum over every sample of every feed: the worst sample, as the
compiler's validation reports it (``cosine_min``).

The quantizer is the caller's (a callable ``(fp32_path, out_path, keep_float) -> None``), so
the emitters search with exactly the quantization they ship; ``OnnxQuantizer`` and
``TFLiteQuantizer`` (``compiler/quantizers/``) are the emitters' own. ONNX names are graph node
names; TFLite names are ai-edge-quantizer op scopes.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from edgeship.compiler.emitters import onnx_io, tflite_io
from edgeship.compiler.quantizers import FALLBACKS, Array, Feed, Quantize
from edgeship.compiler.quantizers.onnx import OnnxQuantizer, onnx_candidates
from edgeship.compiler.quantizers.tflite import TFLiteQuantizer, tflite_candidates
from edgeship.compiler.search.layers import SensitivityResult, search_feeds
from edgeship.errors import UsageError
from edgeship.runtime import Session, open_unpackaged
from edgeship.runtime.package.manifest import Manifest, TensorSpec

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


def open_candidate(model: Path, feed: Feed, reference: Mapping[str, Array], *, threads: int | None = None) -> Session:
    """Open a quantized model (``.onnx`` or ``.tflite``) through the runtime, as the search scores it.

    The Session takes ``feed``'s inputs and returns at least ``reference``'s outputs, as floats
    (the runtime quantizes float inputs of an int8 model and dequantizes its int8 outputs).
    ONNX binds them by name; TFLite by position, as the TFLite emitter binds them: the i-th key
    of ``feed`` is the model's i-th input, the i-th key of ``reference`` its i-th output.
    ``threads``: the runtime's ``threads`` option (None: the backend library's default).
    Close the Session when done (it is a context manager).

    Raises ``UsageError`` for another file type, or a TFLite model whose inputs ``feed`` does
    not match in number or that has fewer outputs than ``reference`` names; and what
    ``open_unpackaged`` raises (``ModelLoadError`` for a model the native library refuses).
    """
    model = Path(model)
    return _session(model, *_io(model, feed, reference), threads)


def _io(
    model: Path, feed: Feed, reference: Mapping[str, Array]
) -> tuple[str, tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The candidate's format and I/O as its Session is opened with (see ``open_candidate``)."""
    if model.suffix == ".onnx":
        return ("onnx", *onnx_io.io_specs(model))
    if model.suffix == ".tflite":
        return ("tflite", *_tflite_io(model, feed, reference))
    raise UsageError(f"{model} is neither an .onnx nor a .tflite model")


def _session(
    model: Path, fmt: str, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec], threads: int | None
) -> Session:
    """The candidate in a Session on the backend validation picks (``"auto"``), unpackaged like an
    artifact the compiler validates before it packages it."""
    manifest = Manifest(
        name=model.stem,
        version=1,
        target="host",
        format=fmt,
        precision="search-candidate",
        artifact_path=model.name,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        files=(),
    )
    return open_unpackaged(manifest, model.parent, "auto", threads=threads)


def _tflite_io(
    model: Path, feed: Feed, reference: Mapping[str, Array]
) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The TFLite model's I/O (dtypes, quantization) named by position after the feed's inputs and
    the reference's outputs; outputs the reference leaves out keep the model's names."""
    inputs, outputs = tflite_io.io_specs(model)
    if len(feed) != len(inputs) or len(reference) > len(outputs):
        raise UsageError(
            f"the TFLite model {model.name} has {len(inputs)} inputs and {len(outputs)} outputs; "
            f"the feeds give {len(feed)} inputs and the reference names {len(reference)} outputs"
        )
    names = [*reference, *(spec.name for spec in outputs[len(reference) :])]
    return (
        tuple(dataclasses.replace(spec, name=name) for spec, name in zip(inputs, feed)),
        tuple(dataclasses.replace(spec, name=name) for spec, name in zip(outputs, names)),
    )


def _worst(
    session: Session, feeds: Sequence[Feed], refs: Sequence[Mapping[str, Array]], indices: Sequence[int]
) -> Array:
    """The worst sample's cosine of each feed in ``indices``, run through ``session``."""
    return np.array([cosines([session.run(feeds[i])], [refs[i]]).min() for i in indices])


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
    MatMul/Gemm/Conv/Gather node. ``scores`` reuses an earlier search's per-node scores. Runs
    through the runtime's ONNX Runtime backend on the CPU (``threads`` intra-op threads; default
    ORT's).

    Raises ``UsageError`` when the model is missing, there are no feeds or there is nothing to
    quantize.
    """
    return _search(
        "ONNX", fp32_onnx, quantize, feeds, reference, target_cosine, max_float_fraction, onnx_candidates,
        candidates, search_samples, scores, threads,
    )  # fmt: skip


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
    input, the i-th key of a reference dict its i-th output. Float feeds to an int8 input are
    quantized with the input's scale and int8 outputs dequantized, by the runtime. Give the
    calibration set as ``feeds``: the search runs on its ``search_samples`` hardest feeds and
    checks the answer on all (``search_feeds``). ``candidates`` defaults to
    ``quantize.candidates(fp32)`` when the quantizer has that method, else the ops of
    ``quantizers.tflite.TFLITE_WEIGHT_OPS``. ``scores`` reuses an earlier search's per-op
    scores. Runs through the runtime's LiteRT backend (XNNPACK) with ``threads`` threads
    (default 1).

    Raises ``UsageError`` when the model is missing, there are no feeds, there is nothing to
    quantize, or the feeds and reference name other inputs or more outputs than the model has.
    """
    return _search(
        "TFLite", fp32_tflite, quantize, feeds, reference, target_cosine, max_float_fraction, tflite_candidates,
        candidates, search_samples, scores, threads or 1,
    )  # fmt: skip


def _search(
    kind: str,
    fp32: Path,
    quantize: Quantize,
    feeds: Sequence[Feed],
    reference: Reference,
    target_cosine: float,
    max_float_fraction: float,
    default: Callable[[Path], list[str]],
    candidates: Sequence[str] | None,
    search_samples: int,
    scores: Mapping[str, float] | None,
    threads: int | None,
) -> SensitivityResult:
    """Both fronts: each step quantizes ``fp32`` into a temporary file and scores it in a Session
    opened as ``open_candidate`` opens it."""
    fp32, feeds, refs, names = _prepare(kind, fp32, quantize, feeds, reference, candidates, default)
    io = _io(fp32, feeds[0], refs[0])  # refuses feeds that do not fit the model, before any quantizing
    with tempfile.TemporaryDirectory(prefix="edgeship-sensitivity-") as tmp:
        out = Path(tmp) / f"candidate{fp32.suffix}"

        def measure(keep: list[str], indices: Sequence[int]) -> Array:
            quantize(fp32, out, keep)
            # onnxruntime.quantization keeps the graph's I/O, so the fp32 model's describes every ONNX
            # candidate (read once: it takes an ORT session). A TFLite candidate's is read each time:
            # which inputs are int8, and at what scale, depends on the layers kept.
            step_io = io if io[0] == "onnx" else _io(out, feeds[0], refs[0])
            with _session(out, *step_io, threads) as session:
                return _worst(session, feeds, refs, indices)

        return search_feeds(
            names, measure, len(feeds), target_cosine, max_float_fraction, search_samples=search_samples, scores=scores
        )


def _prepare(
    kind: str,
    model: Path,
    quantize: Quantize,
    feeds: Sequence[Feed],
    reference: Reference,
    given: Sequence[str] | None,
    default: Callable[[Path], list[str]],
) -> tuple[Path, list[Feed], list[Mapping[str, Array]], list[str]]:
    """What both searches start from: the model (which must exist), the feeds (at least one),
    their fp32 outputs, and the candidates (given, else the quantizer's own list, else ``default``)."""
    model = Path(model)
    if not model.is_file():
        raise UsageError(f"{kind} model {model} does not exist")
    feeds = list(feeds)
    if not feeds:
        raise UsageError(f"no feeds to search {model.name} on: give the calibration set")
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
