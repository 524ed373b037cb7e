"""``quantize.smooth``: SmoothQuant outlier smoothing for static int8 of transformers.

Static int8 quantizes each activation tensor with one scale (per tensor). A transformer's Linear
inputs carry a few outlier channels (in all-MiniLM-L6-v2 the LayerNorm outputs have channels tens
of times larger than the median), so one scale wastes most of the 256 levels on them and the rest
of the channels round to a few steps. SmoothQuant (Xiao et al. 2023) divides each input channel j by

    s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)

and multiplies the matching weight column by s_j: the product is unchanged, the activation is
flatter (easier per tensor) and the weights a little less flat (per-channel weight quantization
absorbs most of it). ``max|X_j|`` comes from the calibration data (forward hooks); where several
Linears read one tensor (query, key and value read one LayerNorm's output) ``max|W_j|`` is the
maximum over all of them, so they share one scale.

``alpha`` (the migration strength) defaults to 0.75: on all-MiniLM-L6-v2 with ONNX Runtime static
int8 the worst held-out sentence was 0.9785 at 0.5 (SmoothQuant's general default), 0.9821 at 0.6,
0.9849 at 0.75 and 0.9779 at 0.9 (on a small BERT with outlier channels every value from 0.5 to
0.9 did equally well). ``alpha: auto`` chooses it per input instead: of ``ALPHA_GRID`` (or no
smoothing), the one whose int8 rounding (input per tensor, weights per output channel) changes
the Linears' outputs least on rows sampled from the calibration data. That proxy cuts each
input's own rounding error about tenfold but judges each Linear alone; on MiniLM it chose 0.8-0.9
and gave 0.9827: better than 0.5, not as good as 0.75.
"""

from __future__ import annotations

import difflib
import time
from typing import Any, ClassVar

from edgeship.compiler.passes.base import Pass, PassContext, Setting, WorkingModel, count, register, unit
from edgeship.errors import UsageError

#: ``layers`` values that are not lists of names.
SCOPES = ("layernorm", "all")


def layer_scope(value: Any, where: str) -> str | list[str]:
    """``layernorm`` (Linears reading a LayerNorm's output), ``all`` (every Linear) or a list of names."""
    if value in SCOPES:
        return str(value)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise UsageError(
        f"{where} must be 'layernorm' (Linears fed by a LayerNorm), 'all' (every Linear) or a list of "
        f"Linear layer names, not {value!r}"
    )


def alpha_value(value: Any, where: str) -> float | str:
    """``auto`` (chosen per input, see ``smooth_layers.choose_alpha``) or a number in 0..1."""
    if value == "auto":
        return "auto"
    try:
        return unit(value, where)
    except UsageError:
        raise UsageError(f"{where} must be 'auto' or a number in 0..1, not {value!r}") from None


def applies_to(module: Any) -> bool:
    """Whether ``module`` looks like a transformer this pass smooths by default (has a LayerNorm and
    a Linear). Cheap: looks at the module types only, not at what feeds what."""
    import torch

    mods = list(module.modules()) if isinstance(module, torch.nn.Module) else []
    return any(isinstance(m, torch.nn.LayerNorm) for m in mods) and any(isinstance(m, torch.nn.Linear) for m in mods)


@register
class Smooth(Pass):
    name = "quantize.smooth"
    summary = "SmoothQuant: move activation outliers of Linear inputs into their weights (fp32 function unchanged)"
    settings: ClassVar[dict[str, Setting]] = {
        "alpha": Setting(0.75, alpha_value),
        "layers": Setting("layernorm", layer_scope),
        "samples": Setting(128, count(1)),
    }

    def run(self, model: WorkingModel, ctx: PassContext) -> tuple[WorkingModel, dict[str, Any]]:
        import torch

        from edgeship.compiler.passes import training
        from edgeship.compiler.passes.smooth_layers import (
            InputStats,
            SmoothedLinear,
            choose_alpha,
            outlier_ratio,
            smoothing_scale,
        )

        s = ctx.settings
        started = time.perf_counter()
        data = ctx.calibration_needed(self.name, "measures each Linear's input channels on it")
        module = model.module.eval()
        if any(isinstance(m, SmoothedLinear) for m in module.modules()):
            raise UsageError(f"{self.name}: the model is smoothed already; list the pass once in passes")
        data = data.take(min(s["samples"], len(data)))
        batch = model.source.feed_batch
        probe = model.inputs_of(next(data.batches(batch)))
        with torch.no_grad():
            auto = s["alpha"] == "auto"
            with InputStats(module, rows_per_call=16 if auto else 0, max_rows=2048) as stats:
                for feed in data.batches(batch):
                    module(*model.inputs_of(feed))
                    stats.end_sample()
            before = training.first_output(module(*probe)).detach().clone()
        chosen = self._targets(stats, s["layers"])
        groups = [[n for n in group if n in chosen] for group in stats.groups]
        groups = [g for g in groups if g]
        grouped = {n for g in groups for n in g}
        groups += [[n] for n in chosen if n not in grouped]  # a Linear never called: nothing measured
        ratios_before, ratios_after, smoothed = [], [], []
        alphas: dict[str, float | None] = {}
        errors: list[tuple[float, float]] = []  # (unsmoothed, chosen) relative int8 error per input
        for group in groups:
            act = stats.act_max.get(group[0])
            if act is None:
                continue
            for other in group[1:]:
                act = torch.maximum(act, stats.act_max[other])
            weights = [stats.linears[n].weight for n in group]
            alpha = s["alpha"]
            if alpha == "auto":
                alpha, chosen_error, plain_error = choose_alpha(stats.input_rows(group[0]), act, weights)
                alphas[group[0]] = alpha
                errors.append((plain_error, chosen_error))
                if alpha is None:
                    continue  # smoothing this input makes its int8 rounding worse: leave it
            scale = smoothing_scale(act, weights, alpha)
            ratios_before.append(outlier_ratio(act))
            ratios_after.append(outlier_ratio(act / scale))
            for name in group:
                SmoothedLinear.of(stats.linears[name], scale)
                smoothed.append(name)
        if not smoothed and not alphas:
            raise UsageError(f"{self.name}: none of the chosen Linear layers ran on the calibration data")
        with torch.no_grad():
            after = training.first_output(module(*probe))
        change = float((after - before).abs().max() / before.abs().max().clamp(min=1e-12))
        if not change < 1e-3:  # rounding is ~1e-7; anything larger is a model this pass cannot rewrite
            raise UsageError(
                f"{self.name}: smoothing changed the model's fp32 output by {change:.2g} (relative); a smoothed "
                "Linear's weights are read outside its forward: name the layers to smooth (layers: [...])"
            )
        entry = {
            "pass": self.name,
            "settings": {"alpha": s["alpha"], "layers": s["layers"], "samples": s["samples"]},
            "calibration_samples": len(data),
            "layers": len(smoothed),
            "groups": groups,
            "outlier_ratio_before": _spread(ratios_before),
            "outlier_ratio_after": _spread(ratios_after),
            **(
                {
                    "alphas": dict(alphas),
                    "int8_error_before": _spread([e[0] for e in errors], 5),
                    "int8_error_after": _spread([e[1] for e in errors], 5),
                }
                if alphas
                else {}
            ),
            "fp32_output_change": change,
            "seconds": round(time.perf_counter() - started, 2),
            "note": "outlier ratio: largest input channel's abs-max over the median channel's, per smoothed input",
        }
        return model, entry

    def _targets(self, stats: Any, scope: str | list[str]) -> list[str]:
        linears = stats.linears
        if scope == "all":
            return list(linears)
        if scope == "layernorm":
            found = [n for n in linears if stats.fed_by.get(n) is not None]
            if not found:
                raise UsageError(
                    f"{self.name}: no Linear layer reads a LayerNorm's output in this model (the default "
                    "smooths a transformer's attention and feed-forward inputs); set layers: all, or name the layers"
                )
            return found
        for name in scope:
            if name not in linears:
                guess = difflib.get_close_matches(name, list(linears), n=1)
                hint = f"did you mean {guess[0]!r}?" if guess else f"Linear layers: {', '.join(list(linears)[:8])}"
                raise UsageError(f"{self.name}: {name!r} is not a Linear layer of the model ({hint})")
        return list(dict.fromkeys(scope))


def _spread(values: list[float], digits: int = 2) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"max": round(ordered[-1], digits), "median": round(ordered[len(ordered) // 2], digits)}
