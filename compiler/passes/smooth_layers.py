"""The torch side of ``quantize.smooth``: the smoothed Linear and the SmoothQuant scale.

Imported only when the pass runs (it imports torch); ``compiler/passes/smooth.py`` holds the pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from edgeship.compiler.passes.int8 import fake_int8_activation, fake_int8_weight


class SmoothedLinear(torch.nn.Linear):
    """``y = linear(x / s, W * s)``: the same function as the Linear it was made from, with the
    activation outliers of ``x`` divided out per input channel and moved into the weight columns.

    The division is an explicit multiply by ``inv_scale`` in front of the Linear, not folded into the
    preceding LayerNorm: in a post-LN transformer (BERT, MiniLM) that LayerNorm's output is also the
    residual branch, so scaling the LayerNorm would change the model. Converters emit the multiply as
    one elementwise op; static int8 then quantizes the smoothed ``x / s`` at the Linear's input.

    Made by ``SmoothedLinear.of`` from an existing Linear, which keeps its name, parameters and every
    ``isinstance(m, nn.Linear)`` check.
    """

    inv_scale: torch.Tensor

    @classmethod
    def of(cls, linear: torch.nn.Linear, scale: torch.Tensor) -> SmoothedLinear:
        """Turn ``linear`` (in place) into a ``SmoothedLinear`` with per-input-channel ``scale`` (> 0)."""
        with torch.no_grad():
            linear.weight.mul_(scale.to(linear.weight.dtype)[None, :])
        linear.__class__ = cls
        linear.register_buffer("inv_scale", (1.0 / scale).to(linear.weight.dtype).clone())
        return linear  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x * self.inv_scale, self.weight, self.bias)


def smoothing_scale(act_max: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel scale ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``.

    ``act_max``: (in_features,) absolute maximum of each input channel over the calibration data;
    ``weights``: the (out, in_features) weights of every Linear reading that input (Q, K and V read
    one tensor): ``max|W_j|`` is over all of them. A channel that never activates or has no weight
    keeps scale 1 (nothing to migrate; a zero would divide by zero). Returns float32, every entry > 0.
    """
    w_max = torch.stack([w.detach().abs().amax(0).float() for w in weights]).amax(0)
    a = act_max.detach().float()
    live = (a > 0) & (w_max > 0)
    scale = a.clamp(min=1e-8).pow(alpha) / w_max.clamp(min=1e-8).pow(1.0 - alpha)
    scale = torch.where(live, scale, torch.ones_like(scale)).clamp(min=1e-5, max=1e5)
    return scale


#: The migration strengths ``alpha: auto`` chooses from, per input (None: leave it unsmoothed).
ALPHA_GRID: tuple[float | None, ...] = (None, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def choose_alpha(
    rows: torch.Tensor, act_max: torch.Tensor, weights: Sequence[torch.Tensor]
) -> tuple[float | None, float, float]:
    """The migration strength for one input: the ``ALPHA_GRID`` entry whose int8 rounding
    (``int8.py``: the smoothed input per tensor over its min/max, the weights per output channel) changes the Linears' outputs least
    on ``rows`` (sampled calibration inputs, (n, in_features)), relative to their float outputs.
    Returns (alpha or None for no smoothing, that relative error, the error unsmoothed)."""
    x = rows.float()
    exact = [x @ w.detach().float().T for w in weights]
    norm = sum(float(y.pow(2).sum()) for y in exact) or 1.0
    errors: dict[float | None, float] = {}
    for alpha in ALPHA_GRID:
        scale = (
            torch.ones_like(act_max, dtype=torch.float32) if alpha is None else smoothing_scale(act_max, weights, alpha)
        )
        smoothed = x / scale
        xq = fake_int8_activation(smoothed, min(float(smoothed.min()), 0.0), max(float(smoothed.max()), 0.0))
        err = 0.0
        for w, y in zip(weights, exact):
            wq = fake_int8_weight(w.detach().float() * scale[None, :])
            err += float((xq @ wq.T - y).pow(2).sum())
        errors[alpha] = err / norm
    best = min(errors, key=lambda a: errors[a])
    return best, errors[best], errors[None]


class InputStats:
    """Forward hooks that record, per Linear, the abs-max of each input channel and which tensor fed
    it (a LayerNorm's output, and which other Linears read the same tensor).

    Use as a context manager around forward passes in eval mode; ``remove`` runs on exit.
    """

    def __init__(self, module: torch.nn.Module, rows_per_call: int = 0, max_rows: int = 0) -> None:
        self.linears = {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.Linear) and n}
        #: First Linear of each group -> up to ``max_rows`` rows of the group's input, ``rows_per_call``
        #: evenly spaced from each call (once per input: query, key and value read one tensor).
        self.rows: dict[str, list[torch.Tensor]] = {}
        self._rows_per_call, self._max_rows = rows_per_call, max_rows
        self._row_count: dict[str, int] = {}
        norms = {n: m for n, m in module.named_modules() if isinstance(m, torch.nn.LayerNorm)}
        self.act_max: dict[str, torch.Tensor] = {}
        #: Linear name -> the LayerNorm whose output it read (first sample), or None.
        self.fed_by: dict[str, str | None] = {}
        #: Groups of Linears that read one tensor (first sample), e.g. query/key/value.
        self.groups: list[list[str]] = []
        self._sample: dict[int, tuple[Any, list[str]]] = {}
        self._norm_out: dict[int, str] = {}
        self._alive: list[Any] = []  # keeps this sample's tensors alive so ``id`` cannot be reused
        self._first = True
        self._handles = [m.register_forward_pre_hook(self._linear_hook(n)) for n, m in self.linears.items()]
        self._handles += [m.register_forward_hook(self._norm_hook(n)) for n, m in norms.items()]

    def _linear_hook(self, name: str) -> Any:
        def hook(_m: Any, args: tuple[Any, ...]) -> None:
            x = args[0]
            flat = x.detach().abs().reshape(-1, x.shape[-1]).amax(0).float()
            seen = self.act_max.get(name)
            self.act_max[name] = flat if seen is None else torch.maximum(seen, flat)
            # Until the first sample ends the groups are unknown: every Linear keeps rows, and
            # end_sample drops those of all but each group's first.
            wanted = self._rows_per_call and (self._first or name in self.rows)
            if wanted and self._row_count.get(name, 0) < self._max_rows:
                rows = x.detach().reshape(-1, x.shape[-1])
                picked = rows[:: max(1, len(rows) // self._rows_per_call)][: self._rows_per_call]
                self.rows.setdefault(name, []).append(picked.float().clone())
                self._row_count[name] = self._row_count.get(name, 0) + len(picked)
            if self._first:
                self._alive.append(x)
                self.fed_by[name] = self._norm_out.get(id(x))
                self._sample.setdefault(id(x), (x, []))[1].append(name)

        return hook

    def _norm_hook(self, name: str) -> Any:
        def hook(_m: Any, _args: Any, out: Any) -> None:
            if self._first:
                self._alive.append(out)
                self._norm_out[id(out)] = name

        return hook

    def end_sample(self) -> None:
        """Call after each forward pass: the grouping is taken from the first one."""
        if self._first:
            self.groups = [names for _x, names in self._sample.values()]
            leaders = {names[0] for names in self.groups}
            self.rows = {name: rows for name, rows in self.rows.items() if name in leaders}
            self._sample.clear()
            self._norm_out.clear()
            self._alive.clear()
            self._first = False

    def input_rows(self, name: str) -> torch.Tensor:
        """The sampled rows of the input Linear ``name`` reads (kept once for its whole group)."""
        leader = next((group[0] for group in self.groups if name in group), name)
        return torch.cat(self.rows[leader])

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()

    def __enter__(self) -> InputStats:
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.remove()


def outlier_ratio(act_max: torch.Tensor) -> float:
    """How far the largest input channel stands out: max channel abs-max over the median one."""
    median = float(act_max.median())
    return float(act_max.max()) / median if median > 0 else float("inf")
