"""The accuracy budget search: for one target, the cheapest candidate artifact that holds a budget.

Pure: the caller builds and measures a candidate (``evaluate(candidate) -> CandidateResult``,
in the compiler the normal emit + validate path on held-out data through the runtime Session),
so every rule here is tested with a fake evaluator (tests/compiler/search/test_budget.py).

Invariants ``search`` keeps:

* candidates are tried in the order given (``candidates()`` orders them cheapest first; the one
  exception: mixed candidates, which are ordered among themselves once the PTQ trials are known,
  see (c) below), and the search stops at the first that holds the budget: that is the winner, and every candidate tried
  before it missed;
* a candidate holds the budget only when every criterion set was *measured* and holds; a figure
  that could not be measured here (no labels, no latency on this host) or a NaN misses;
* when none holds, ``winner`` is None and ``best`` is the candidate that came closest (see
  ``_closeness``); the caller must not ship it silently.

Candidate order (``candidates``): (a) post-training quantization at each quantized precision the
target offers, smallest artifact first (``PRECISION_ORDER``); (b) the same with another
calibration method, where the emitter has one (percentile, entropy); (b') smoothed PTQ: the same
precisions after the ``quantize.smooth`` pass (SmoothQuant), for the precisions that quantize
activations, when the caller says the model has something to smooth (a transformer); (c) mixed precision: the
layer search (``compiler/search/layers.py``) sets the most sensitive layers apart until the
calibration data reaches a cosine, starting from the precision's closest PTQ trial (smoothed or
another calibration when that came nearer), the precision whose PTQ came nearest first; (c')
QAT: the static-int8 precisions after the ``quantize.qat`` pass (fine-tuning with int8 fake
quantization, distilled from the fp32 model), when the caller can train the model; (d) the float precisions, fp16 before fp32. Float comes last
because it is the largest artifact; it is what holds almost any budget.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgeship.errors import UsageError

#: Precisions from the smallest artifact to the largest (weights in 4 bits, then 8, then 16, 32);
#: among int8 ones, those that also run int8 arithmetic first; w8a16 (int8 weights, int16
#: activations) after them all: a CPU runs it on TFLite's reference kernels, slower than float.
PRECISION_ORDER = (
    "int4-block",
    "palettized-4bit",
    "int8-static",
    "int8-qdq",
    "w8a8",
    "int8-dynamic",
    "int8-weight-only",
    "w8a16",
    "fp16",
    "fp32",
)
FLOAT_PRECISIONS = ("fp16", "fp32")
#: Precisions a budget search tries only when the recipe names them for the target: w8a16 holds
#: where int8 activations cannot (MiniLM 0.996) but a CPU runs it on TFLite's reference kernels
#: (MiniLM: 18x the fp32 latency here), so it is for an NPU the user knows runs 16x8.
OPT_IN = ("w8a16",)
#: Precisions whose activations are quantized (per tensor): where smoothing outliers can help.
ACTIVATION_QUANTIZED = ("int8-static", "int8-qdq", "w8a8", "int8-dynamic", "w8a16")
#: Precisions whose activations have calibrated (static) ranges: what ``quantize.qat`` trains for.
STATIC_ACTIVATIONS = ("int8-static", "int8-qdq", "w8a8")  # not w8a16: quantize.qat trains int8 rounding


@dataclass(frozen=True)
class Budget:
    """What the shipped artifact must hold, measured on held-out data. ``None``: not a criterion.

    ``min_cosine``: the worst held-out sample's cosine to the fp32 source (worst output), in 0..1;
    ``max_accuracy_drop``: points of accuracy lost against the fp32 source (needs labels);
    ``max_size_mb``: artifact size in MB (10^6 bytes); ``max_latency_ms``: median host latency.
    Raises ``UsageError`` for a value out of range.
    """

    min_cosine: float | None = None
    max_accuracy_drop: float | None = None
    max_size_mb: float | None = None
    max_latency_ms: float | None = None

    def __post_init__(self) -> None:
        if self.min_cosine is not None and not 0 <= self.min_cosine <= 1:
            raise UsageError(f"the cosine budget is a number in 0..1 (--min-cosine), not {self.min_cosine}")
        for name, value in (
            ("max_accuracy_drop", self.max_accuracy_drop),
            ("max_size_mb", self.max_size_mb),
            ("max_latency_ms", self.max_latency_ms),
        ):
            if value is not None and not (value >= 0 and math.isfinite(value)):
                raise UsageError(f"{name} is a finite number >= 0 (--{name.replace('_', '-')}), not {value}")

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.min_cosine, self.max_accuracy_drop, self.max_size_mb, self.max_latency_ms))

    def describe(self) -> str:
        parts = []
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine}")
        if self.max_accuracy_drop is not None:
            parts.append(f"accuracy drop <= {self.max_accuracy_drop} points")
        if self.max_size_mb is not None:
            parts.append(f"size <= {self.max_size_mb} MB")
        if self.max_latency_ms is not None:
            parts.append(f"latency <= {self.max_latency_ms} ms")
        return " and ".join(parts) or "no limits"

    def misses(self, result: CandidateResult) -> list[str]:
        """What ``result`` misses, one phrase each (empty: it holds). Unmeasured figures miss."""
        if result.error is not None:
            return [f"not built: {result.error}"]
        out = []
        if self.min_cosine is not None:
            if result.cosine is None:
                out.append("cosine not measured here")
            elif not result.cosine >= self.min_cosine:  # NaN misses
                out.append(f"cosine {_shown(result.cosine, self.min_cosine)} < {self.min_cosine}")
        if self.max_accuracy_drop is not None:
            if result.accuracy_drop is None:
                out.append("accuracy not measured (the held-out data has no labels)")
            elif not result.accuracy_drop <= self.max_accuracy_drop:
                out.append(f"accuracy drop {result.accuracy_drop:.2f} > {self.max_accuracy_drop} points")
        if self.max_size_mb is not None and not result.size_bytes / 1e6 <= self.max_size_mb:
            out.append(f"size {result.size_bytes / 1e6:.4g} MB > {self.max_size_mb} MB")
        if self.max_latency_ms is not None:
            if result.latency_ms is None:
                out.append("latency not measured here")
            elif not result.latency_ms <= self.max_latency_ms:
                out.append(f"latency {result.latency_ms:.3g} ms > {self.max_latency_ms} ms")
        return out


@dataclass(frozen=True)
class Candidate:
    """One way to build the target's artifact.

    ``precision``: one of the target's precisions. ``kind``: ``"ptq"`` (post-training quantization,
    or a float precision), ``"calibration"`` (PTQ with ``calibration`` other than the default),
    ``"smoothed"`` (PTQ of the model after the ``quantize.smooth`` pass), ``"mixed"`` (the layer
    search to ``min_cosine`` on calibration data) or ``"qat"`` (PTQ of the model after the
    ``quantize.qat`` pass). A mixed candidate starts from its precision's
    closest PTQ trial (``search`` sets ``smoothed`` and ``calibration`` from it).
    """

    precision: str
    kind: str = "ptq"
    calibration: str | None = None
    min_cosine: float | None = None
    smoothed: bool = False

    @property
    def name(self) -> str:
        if self.kind == "calibration":
            return f"{self.precision} ({self.calibration} calibration)"
        if self.kind == "smoothed":
            return f"{self.precision} (smoothed PTQ)"
        if self.kind == "qat":
            return f"{self.precision} (QAT)"
        if self.kind == "mixed":
            words = ["smoothed"] if self.smoothed else []
            if self.calibration:
                words.append(f"{self.calibration} calibration")
            words.append(f"layer search to cosine {self.min_cosine}")
            return f"{self.precision} mixed ({', '.join(words)})"
        return self.precision

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "precision": self.precision,
            "kind": self.kind,
            "calibration": self.calibration,
            "min_cosine": self.min_cosine,
            "smoothed": self.smoothed,
        }


@dataclass(frozen=True)
class CandidateResult:
    """A built candidate's figures on held-out data (None: not measured here); ``error``: not built."""

    size_bytes: int
    cosine: float | None = None
    accuracy_drop: float | None = None
    latency_ms: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Trial:
    """A candidate the search tried, its figures, and its verdict (``misses`` empty: it held)."""

    candidate: Candidate
    result: CandidateResult
    budget: Budget
    misses: tuple[str, ...]

    @property
    def held(self) -> bool:
        return not self.misses

    @property
    def verdict(self) -> str:
        return "holds the budget" if self.held else "misses: " + "; ".join(self.misses)

    def to_json(self) -> dict[str, Any]:
        r = self.result
        return {
            **self.candidate.to_json(),
            "size_bytes": r.size_bytes,
            "cosine": r.cosine,
            "accuracy_drop": r.accuracy_drop,
            "latency_ms": r.latency_ms,
            "error": r.error,
            "budget": self.budget.describe(),
            "held": self.held,
            "verdict": self.verdict,
        }


@dataclass(frozen=True)
class SearchResult:
    """Every candidate tried, in order; the winner (the first that held) or None; when none held,
    ``best`` (the closest miss); ``reason``: one line saying why the winner won, or why none did."""

    trials: tuple[Trial, ...]
    winner: Trial | None
    best: Trial | None
    reason: str
    skipped: tuple[Candidate, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "trials": [t.to_json() for t in self.trials],
            "winner": self.winner.candidate.name if self.winner else None,
            "best": self.best.candidate.name if self.best else None,
            "reason": self.reason,
            "not_tried": [c.name for c in self.skipped],
        }


def candidates(
    precisions: Sequence[str],
    *,
    calibration_methods: Mapping[str, Sequence[str]] | None = None,
    layer_search: Sequence[str] = (),
    mixed_cosine: float | None = None,
    smoothing: Sequence[str] = (),
    qat: Sequence[str] = (),
) -> list[Candidate]:
    """The ordered candidate list for a target that offers ``precisions`` (see the module docstring).

    ``calibration_methods``: per precision, the calibration methods its emitter has besides its
    default (e.g. ``{"int8-qdq": ["percentile", "entropy"]}``). ``layer_search``: precisions whose
    emitter runs the layer search; with ``mixed_cosine`` each gets a mixed candidate searching to
    that cosine. ``smoothing``: precisions that get a smoothed-PTQ candidate (after the other
    calibrations, before mixed precision). ``qat``: precisions that get a QAT candidate (after
    mixed precision, before the float precisions: it trains, so it is the dearest to build). Precisions not in ``PRECISION_ORDER`` go after the known quantized ones. Raises
    ``UsageError`` for an empty list.
    """
    if not precisions:
        raise UsageError("a budget search needs at least one precision to try")
    order = {p: i for i, p in enumerate(PRECISION_ORDER)}
    floats = len(PRECISION_ORDER) - len(FLOAT_PRECISIONS)
    ranked = sorted(dict.fromkeys(precisions), key=lambda p: order.get(p, floats - 0.5))
    quantized = [p for p in ranked if p not in FLOAT_PRECISIONS]
    out = [Candidate(p) for p in quantized]
    for p in quantized:
        out += [Candidate(p, "calibration", calibration=m) for m in (calibration_methods or {}).get(p, ())]
    out += [Candidate(p, "smoothed") for p in quantized if p in smoothing]
    if mixed_cosine is not None:
        out += [Candidate(p, "mixed", min_cosine=mixed_cosine) for p in quantized if p in layer_search]
    out += [Candidate(p, "qat") for p in quantized if p in qat]
    out += [Candidate(p) for p in ranked if p in FLOAT_PRECISIONS]
    return out


def search(
    candidates: Sequence[Candidate],
    evaluate: Callable[[Candidate], CandidateResult],
    budget: Budget | Callable[[Candidate], Budget],
) -> SearchResult:
    """Try ``candidates`` in order with ``evaluate`` and stop at the first that holds its budget.

    ``budget`` is one ``Budget`` for every candidate, or a function giving each candidate its own
    (the compiler's default budget is stricter for float precisions). ``evaluate`` may raise
    nothing: a candidate that cannot be built comes back with ``CandidateResult.error`` set.
    Raises ``UsageError`` for an empty candidate list.
    """
    if not candidates:
        raise UsageError("a budget search needs at least one candidate")
    budget_of = budget if callable(budget) else (lambda _c, b=budget: b)
    trials: list[Trial] = []
    queue = list(candidates)
    for i in range(len(queue)):
        if queue[i].kind == "mixed" and (i == 0 or queue[i - 1].kind != "mixed"):
            queue[i:] = _from_closest(queue[i:], trials)
        candidate = queue[i]
        limits = budget_of(candidate)
        result = evaluate(candidate)
        trial = Trial(candidate, result, limits, tuple(limits.misses(result)))
        trials.append(trial)
        if trial.held:
            before = f"; {i} cheaper candidate(s) missed it" if i else ""
            reason = (
                f"{candidate.name} wins: the cheapest candidate that holds {limits.describe()} "
                f"({_figures(result)}){before}"
            )
            return SearchResult(tuple(trials), trial, trial, reason, tuple(queue[i + 1 :]))
    best = min(trials, key=_closeness)
    reason = (
        f"no candidate holds the budget ({len(trials)} tried); the closest is {best.candidate.name} "
        f"({_figures(best.result)}), which misses: {'; '.join(best.misses)}"
    )
    return SearchResult(tuple(trials), None, best, reason)


def _from_closest(queue: Sequence[Candidate], trials: Sequence[Trial]) -> list[Candidate]:
    """The leading mixed candidates of ``queue``, each starting from its precision's closest PTQ
    trial (plain, another calibration or smoothed: whichever came nearest the budget), and
    ordered by how close that start was (a layer search from nearer sets fewer layers apart and
    ends sooner; MiniLM on ONNX Runtime: int8-dynamic 0.970 before int8-qdq 0.950); the rest as
    it was. A precision without a built PTQ trial keeps its place after those with one."""
    run = 0
    while run < len(queue) and queue[run].kind == "mixed":
        run += 1
    starts: dict[str, Trial] = {}
    for trial in trials:
        c = trial.candidate
        if c.kind == "mixed" or trial.result.error is not None:
            continue
        if c.precision not in starts or _closeness(trial) < _closeness(starts[c.precision]):
            starts[c.precision] = trial
    mixed = []
    for candidate in queue[:run]:
        start = starts.get(candidate.precision)
        if start is not None:
            candidate = dataclasses.replace(
                candidate, smoothed=start.candidate.kind == "smoothed", calibration=start.candidate.calibration
            )
        mixed.append((candidate, start))
    never = (math.inf,)
    mixed.sort(key=lambda pair: _closeness(pair[1]) if pair[1] is not None else never)
    return [c for c, _ in mixed] + list(queue[run:])


def _closeness(trial: Trial) -> tuple[float, ...]:
    """Sort key of the closest miss: built before not built, fewer criteria missed, then the larger
    quality shortfall last (cosine short of its minimum, accuracy drop over its maximum, each
    relative to the room the budget allows), then the smaller artifact."""
    r, b = trial.result, trial.budget
    shortfall = 0.0
    if b.min_cosine is not None:
        cos = r.cosine if r.cosine is not None and not math.isnan(r.cosine) else -1.0
        shortfall += max(0.0, b.min_cosine - cos) / max(1.0 - b.min_cosine, 1e-6)
    if b.max_accuracy_drop is not None:
        drop = r.accuracy_drop if r.accuracy_drop is not None and not math.isnan(r.accuracy_drop) else 100.0
        shortfall += max(0.0, drop - b.max_accuracy_drop) / max(b.max_accuracy_drop, 0.1)
    return (float(r.error is not None), float(len(trial.misses)), shortfall, float(r.size_bytes))


def _figures(r: CandidateResult) -> str:
    parts = [f"{r.size_bytes / 1e6:.4g} MB"]
    if r.cosine is not None:
        parts.append(f"cosine {_shown(r.cosine, 1.0) if r.cosine < 1 else r.cosine}")
    if r.accuracy_drop is not None:
        parts.append(f"accuracy drop {r.accuracy_drop:.2f} points")
    if r.latency_ms is not None:
        parts.append(f"{r.latency_ms:.3g} ms")
    return ", ".join(parts) if r.error is None else f"not built: {r.error}"


def _shown(value: float, limit: float) -> str:
    """``value`` with enough decimals to tell it from ``limit`` (0.99948 against 0.9995)."""
    decimals = len(f"{limit}".partition(".")[2])  # one digit past the limit's, so 0.99993 is not shown as 0.9999
    for digits in range(max(4, decimals + 1), 12):
        if float(f"{value:.{digits}f}") < limit:
            return f"{value:.{digits}f}"
    return repr(value)
