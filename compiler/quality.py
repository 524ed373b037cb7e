"""The quality gate: does a validated variant hold its budget on held-out data, so it may ship?

A pure function of the recipe, the precision and the validation figures (no I/O), so every
rule is tested directly (``tests/compiler/test_quality.py``). The compile pipeline calls it after
validation; a variant that misses gets no package and the compile exits non-zero.

Which budget applies, per criterion:

* cosine (the worst held-out sample's cosine to the fp32 source, over every output:
  ``Metrics.cosine_min``): ``validation.min_cosine`` of the recipe for this precision; else, for
  a quantized variant built with a layer search, ``quantize.min_cosine`` (the search met it on
  calibration data; it must also hold on held-out data); else the default below;
* accuracy drop (points; only when the evaluation data has labels): ``validation.max_accuracy_drop``;
  else the default below.

Defaults, when the recipe names no budget for the variant (``DEFAULT_*``):

* float precisions (fp32, fp16): cosine >= 0.999. A float artifact that differs more from its
  source is broken, whatever its accuracy (fp16 can underflow a model's small activations:
  a transformers MobileViT with random weights gave cosine 0.16 at fp16);
* quantized precisions: an accuracy drop <= 1 point when labels are given (logits' cosine is
  not what a classifier's user sees), else cosine >= 0.99.

A figure that could not be measured here (no backend for the artifact) is not gated; the
report's "needs hardware" list says so. A NaN figure fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from edgeship.compiler.recipe import Recipe
from edgeship.compiler.validate import Metrics

FLOAT_PRECISIONS = ("fp32", "fp16")
DEFAULT_FLOAT_MIN_COSINE = 0.999
DEFAULT_QUANTIZED_MIN_COSINE = 0.99
DEFAULT_MAX_ACCURACY_DROP = 1.0  # points


@dataclass(frozen=True)
class Budget:
    """What a variant must hold: a minimum worst-sample cosine and/or a maximum accuracy drop,
    and where each came from (``"default"``, ``"validation.min_cosine"``, ...)."""

    min_cosine: float | None = None
    max_accuracy_drop: float | None = None
    cosine_from: str = ""
    drop_from: str = ""

    def describe(self) -> str:
        parts = []
        if self.min_cosine is not None:
            parts.append(f"cosine >= {self.min_cosine} ({self.cosine_from})")
        if self.max_accuracy_drop is not None:
            parts.append(f"accuracy drop <= {self.max_accuracy_drop} points ({self.drop_from})")
        return " and ".join(parts) or "none"


@dataclass(frozen=True)
class Verdict:
    """``passed`` is False when a measured figure misses the budget; ``reason`` says which and what to do."""

    budget: Budget
    passed: bool
    reason: str | None = None
    unchecked: list[str] = field(default_factory=list)


def budget(recipe: Recipe, precision: str, *, has_labels: bool, searched: bool) -> Budget:
    """The budget a variant of ``precision`` must hold (see the module docstring).

    ``has_labels``: the held-out data has labels (accuracy is measured). ``searched``: the
    variant was built with a layer search to ``quantize.min_cosine``.
    """
    cosine, cosine_from = recipe.min_cosine_for(precision), "validation.min_cosine"
    if cosine is None and searched and recipe.quantize.min_cosine is not None:
        cosine, cosine_from = recipe.quantize.min_cosine, "quantize.min_cosine, checked on held-out data"
    drop = recipe.max_accuracy_drop if has_labels else None
    drop_from = "validation.max_accuracy_drop" if drop is not None else ""
    if precision in FLOAT_PRECISIONS:
        # The float default stays unless the recipe sets a cosine for this precision: an accuracy
        # budget is usually written for the int8 variants, and a broken fp16 must not pass on it.
        if cosine is None:
            cosine, cosine_from = DEFAULT_FLOAT_MIN_COSINE, "the default for float precisions"
    elif cosine is None and drop is None:
        if has_labels:
            drop, drop_from = DEFAULT_MAX_ACCURACY_DROP, "the default for quantized precisions with labels"
        else:
            cosine, cosine_from = DEFAULT_QUANTIZED_MIN_COSINE, "the default for quantized precisions without labels"
    if cosine is not None and cosine <= 0:  # min_cosine 0: the recipe turns the cosine check off
        cosine, cosine_from = None, ""
    return Budget(cosine, drop, cosine_from if cosine is not None else "", drop_from)


def check(recipe: Recipe, precision: str, metrics: Metrics, *, searched: bool = False) -> Verdict:
    """Hold ``metrics`` (a validated variant's) against its budget; pure, never raises."""
    limits = budget(recipe, precision, has_labels=metrics.accuracy_drop_points is not None, searched=searched)
    misses, unchecked = [], []
    if limits.min_cosine is not None:
        cos = metrics.cosine_min
        if cos is None:
            unchecked.append("cosine (not measured here)")
        elif not cos >= limits.min_cosine:  # NaN fails
            worst = f" (output {metrics.worst_output!r})" if metrics.worst_output else ""
            misses.append(
                f"held-out cosine {_shown(cos, limits.min_cosine)}{worst} is below {limits.min_cosine} "
                f"({limits.cosine_from})"
            )
    if limits.max_accuracy_drop is not None:
        drop = metrics.accuracy_drop_points
        if drop is None:
            unchecked.append("accuracy (not measured here)")
        elif not drop <= limits.max_accuracy_drop:
            misses.append(f"accuracy drops {drop:.2f} points, over {limits.max_accuracy_drop} ({limits.drop_from})")
    if not misses:
        return Verdict(limits, True, None, unchecked)
    advice = _advice(precision, searched)
    return Verdict(limits, False, f"quality gate: {'; '.join(misses)}; {advice}", unchecked)


def _shown(value: float, limit: float) -> str:
    """``value`` with enough decimals to tell it from ``limit`` (0.99998 against 0.99999, not 1.0000)."""
    for digits in range(4, 10):
        if float(f"{value:.{digits}f}") < limit:
            return f"{value:.{digits}f}"
    return f"{value!r}"


def _advice(precision: str, searched: bool) -> str:
    if precision in FLOAT_PRECISIONS:
        lower = f"validation.min_cosine: {{{precision}: <lower>}}"
        return (
            f"no package written. A {precision} artifact this far from its source usually means the model "
            f"does not survive {precision} (or the converter broke it): choose another precision (fp32), "
            f"or accept it by setting an explicit lower budget in the recipe ({lower})"
        )
    search = (
        "let the layer search set more layers apart (raise quantize.max_float_fraction, or fallback: float)"
        if searched
        else "let the layer search set sensitive layers apart (quantize.min_cosine in the recipe)"
    )
    return (
        f"no package written. Choose another precision (fp16, int8-dynamic or int8-weight-only keep more), "
        f"{search}, or accept it by setting an explicit lower budget in the recipe "
        f"(validation.min_cosine: {{{precision}: <lower>}} or validation.max_accuracy_drop)"
    )
