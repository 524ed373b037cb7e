"""The per-layer mixed-precision search: which layers to keep in float so that a quantized model
stays within a cosine of its fp32 original. Pure: the quantize-and-measure step is the caller's
callable, so the search is tested with a fake evaluator (tests/compiler/search/test_layers.py).

The search, for a list of candidate layers (ONNX node names, or TFLite op scopes):

1. quantize everything and run every feed (the calibration set); the ``search_samples``
   feeds with the worst cosine drive the rest (the worst-sample cosine is decided by a few
   hard inputs, such as one-word sentences for a text encoder, which a random subset misses);
   if everything-quantized already meets the target, keep nothing in float;
2. score each candidate by quantizing *only* that layer (all other candidates stay float) and
   measuring ``1 - cosine`` against the fp32 outputs: one quantize-and-run per candidate;
3. keep the highest-scoring candidates in float, searching for the smallest count that meets
   the target (doubling, then bisecting; a few more runs), never more than
   ``max_float_fraction`` of the candidates;
4. measure the chosen set on every feed: that is the cosine reported.

So a search costs ``candidates + O(log candidates)`` quantize-and-run steps. Every cosine in a
result was measured on the quantized model it describes, never extrapolated. The format-specific
fronts (``onnx_float_nodes``, ``tflite_float_ops``) are in ``edgeship.compiler.search.fronts``,
the quantizers they drive in ``edgeship.compiler.quantizers``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgeship.errors import UsageError

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class SensitivityResult:
    """What a search found.

    ``kept_float``: the layers to leave in float, most sensitive first (empty when quantizing
    everything meets the target). ``cosine``: the worst per-sample cosine of the model
    quantized with exactly ``kept_float`` in float. ``scores``: per candidate, ``1 - cosine``
    when only that layer is quantized (higher is more sensitive). ``evaluations``: quantize-
    and-run steps spent. ``reached``: whether ``cosine >= target``; when False, ``kept_float``
    is the largest set allowed (``max_float_fraction``) and the target needs more float layers,
    another quantization scheme or different data. ``all_quantized_cosine``: the cosine with
    nothing kept in float.
    """

    kept_float: list[str]
    cosine: float
    scores: dict[str, float]
    evaluations: int
    target: float = 0.0
    reached: bool = True
    all_quantized_cosine: float = 0.0
    candidates: int = 0
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for a report: what stayed in float and what it reached."""
        state = "reached" if self.reached else "NOT reached"
        return (
            f"set {len(self.kept_float)}/{self.candidates} layers apart: cosine {self.all_quantized_cosine:.4f} "
            f"-> {self.cosine:.4f} (target {self.target} {state}; {self.evaluations} quantize+run steps)"
        )


def search(
    candidates: Sequence[str],
    evaluate: Callable[[list[str]], float],
    target_cosine: float,
    max_float_fraction: float = 0.25,
    scores: Mapping[str, float] | None = None,
) -> SensitivityResult:
    """Greedy search over ``candidates`` with ``evaluate(keep_float) -> cosine``.

    ``evaluate`` quantizes with ``keep_float`` left in float and returns the worst per-sample
    cosine. ``scores`` (an earlier result's, for the same candidates and data) skips the
    per-layer scoring, e.g. to retry with a larger ``max_float_fraction`` for a few more runs.
    Raises ``UsageError`` for an empty candidate list or a fraction outside (0, 1].
    """
    if not candidates:
        raise UsageError("no quantizable layers to choose from: the model has none of the quantized op types")
    if not 0 < max_float_fraction <= 1:
        raise UsageError(f"max_float_fraction must be in (0, 1], not {max_float_fraction}")
    names = list(dict.fromkeys(candidates))
    runs = 0

    def run(keep: list[str]) -> float:
        nonlocal runs
        runs += 1
        return float(evaluate(keep))

    base = run([])
    if base >= target_cosine:
        return SensitivityResult([], base, {}, runs, target_cosine, True, base, len(names))
    known = dict(scores or {})
    layer_scores: dict[str, float] = {}
    for name in names:
        layer_scores[name] = known[name] if name in known else 1.0 - run([n for n in names if n != name])
    ranked = sorted(names, key=lambda n: layer_scores[n], reverse=True)
    limit = max(1, math.floor(max_float_fraction * len(names)))
    measured: dict[int, float] = {0: base}

    def at(k: int) -> float:
        if k not in measured:
            measured[k] = run(ranked[:k])
        return measured[k]

    # Doubling finds a k that meets the target (or the limit), bisection the smallest such k.
    lo, hi = 0, 1
    while hi < limit and at(hi) < target_cosine:
        lo, hi = hi, min(2 * hi, limit)
    if at(hi) < target_cosine:
        return SensitivityResult(
            ranked[:hi], at(hi), layer_scores, runs, target_cosine, False, base, len(names),
            [f"the target needs more than {limit} float layers (max_float_fraction {max_float_fraction})"],
        )  # fmt: skip
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if at(mid) >= target_cosine:
            hi = mid
        else:
            lo = mid
    return SensitivityResult(ranked[:hi], at(hi), layer_scores, runs, target_cosine, True, base, len(names))


def search_feeds(
    candidates: Sequence[str],
    measure: Callable[[list[str], Sequence[int]], Array],
    n_feeds: int,
    target_cosine: float,
    max_float_fraction: float = 0.25,
    *,
    search_samples: int = 16,
    scores: Mapping[str, float] | None = None,
) -> SensitivityResult:
    """``search`` on the hardest feeds, with the answer checked on all of them.

    ``measure(keep_float, feed_indices)`` quantizes with ``keep_float`` in float and returns the
    worst cosine of each listed feed. The worst-sample cosine is decided by a few hard inputs
    (for a text encoder, one- or two-word sentences), which a small random subset may not hold;
    so when there are more than ``search_samples`` feeds, everything-quantized runs once on all
    of them, the ``search_samples`` worst feeds drive the search, and the chosen layers are
    measured again on every feed: the result's ``cosine``, ``all_quantized_cosine`` and
    ``reached`` are over all feeds.
    """
    everything = list(range(n_feeds))
    if n_feeds <= search_samples:
        return search(candidates, lambda keep: float(measure(keep, everything).min()), target_cosine,
                      max_float_fraction, scores)  # fmt: skip
    per_feed = measure([], everything)
    hardest = [int(i) for i in np.argsort(per_feed, kind="stable")[:search_samples]]
    found = search(
        candidates, lambda keep: float(measure(keep, hardest).min()), target_cosine, max_float_fraction, scores
    )
    final = float(per_feed.min()) if not found.kept_float else float(measure(found.kept_float, everything).min())
    notes = [*found.notes, f"searched on the {search_samples} hardest of {n_feeds} feeds, checked on all"]
    if found.reached and final < target_cosine:
        notes.append(f"met {found.cosine:.4f} on the hardest feeds but {final:.4f} on all of them")
    return SensitivityResult(
        found.kept_float,
        final,
        found.scores,
        found.evaluations + (2 if found.kept_float else 1),
        target_cosine,
        final >= target_cosine,
        float(per_feed.min()),
        found.candidates,
        notes,
    )
