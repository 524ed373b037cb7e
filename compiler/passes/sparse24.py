"""``prune.sparse24``: 2:4 semi-structured sparsity for the sparse tensor cores of Ampere GPUs and Orin.

In every eligible Conv/Linear weight, each group of 4 consecutive weights along the input channels
(the dimension a GEMM reduces over) keeps its 2 largest magnitudes and zeroes the other 2. That is
the pattern TensorRT's sparse kernels need ("for each output channel and each spatial position of
the kernel, every 4 input channels hold at least 2 zeros", TensorRT Developer Guide, structured
sparsity), so a Linear weight ``[out, in]`` is grouped along ``in`` and a Conv weight
``[out, in/groups, *kernel]`` along ``in/groups`` at each kernel position.

Eligible: ``Linear`` with ``in_features % 4 == 0``; ``Conv1d/2d/3d`` with ``(in_channels / groups) % 4
== 0`` (a first conv on 1 or 3 image channels and depthwise convs are not). Transposed convolutions
reduce over their first weight dimension and are left dense. The report entry names every layer
left dense and why; naming one in ``layers`` is an error that says why it cannot be 2:4.

Fine-tuning (when training data is given) keeps the mask attached (``torch.nn.utils.prune``), so
the zeros survive it. The entry's ``layers_2_4`` lists the 2:4 layers; emitters read it from the
pass history: the TensorRT emitter sets ``sparsity_2_4`` in ``build_spec.json`` (the device's build
then sets ``BuilderFlag.SPARSE_WEIGHTS``), the Core ML emitter stores the zeros sparse.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from edgeship.compiler.passes import training
from edgeship.compiler.passes.base import Pass, PassContext, Setting, WorkingModel, names_list, register
from edgeship.compiler.passes.prune import _json_settings, _lookup, _modules_by_name, fine_tune
from edgeship.errors import UsageError

GROUP = 4  # weights per group
KEEP = 2  # non-zero weights kept per group

#: The key a pass's report entry uses to name the layers whose weights are 2:4 sparse.
LAYERS_KEY = "layers_2_4"


def reason_not_eligible(module: Any) -> str | None:
    """Why ``module``'s weight cannot be 2:4 along its input channels; None when it can."""
    import torch

    if isinstance(module, torch.nn.modules.conv._ConvTransposeNd):
        return "a transposed convolution reduces over its first weight dimension"
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        per_group = module.in_channels // module.groups
        if per_group % GROUP:
            return f"{per_group} input channel(s) per group, not a multiple of {GROUP}"
        return None
    if isinstance(module, torch.nn.Linear):
        if module.in_features % GROUP:
            return f"{module.in_features} input features, not a multiple of {GROUP}"
        return None
    return f"a {type(module).__name__} has no Conv/Linear weight"


def _grouped(weight: Any) -> Any:
    """``weight`` with the input-channel axis last, split into groups: ``[..., in/4, 4]`` (a view)."""
    moved = weight.movedim(1, -1)
    return moved.reshape(*moved.shape[:-1], moved.shape[-1] // GROUP, GROUP)


def mask_2_4(weight: Any) -> Any:
    """A 0/1 mask of ``weight``'s shape keeping the 2 largest magnitudes of every 4 input channels."""
    import torch

    groups = _grouped(weight.detach().abs())
    keep = groups.topk(KEEP, dim=-1).indices
    mask = torch.zeros_like(groups).scatter_(-1, keep, 1.0)
    moved_shape = weight.movedim(1, -1).shape
    return mask.reshape(moved_shape).movedim(-1, 1).contiguous()


def is_2_4(weight: Any) -> bool:
    """True when every group of 4 input channels of ``weight`` holds at least 2 zeros."""
    if weight is None or weight.dim() < 2 or weight.shape[1] % GROUP:
        return False
    zeros = (_grouped(weight.detach()) == 0).sum(-1)
    return bool((zeros >= GROUP - KEEP).all())


@register
class Sparse24(Pass):
    name = "prune.sparse24"
    summary = "2:4 semi-structured sparsity (2 of every 4 input-channel weights zero) for sparse tensor cores"
    settings: ClassVar[dict[str, Setting]] = {
        "layers": Setting(None, names_list),
        "ignore": Setting([], names_list),
        **training.FINE_TUNE,
    }

    def run(self, model: WorkingModel, ctx: PassContext) -> tuple[WorkingModel, dict[str, Any]]:
        import torch
        from torch.nn.utils import prune

        s = ctx.settings
        started = time.perf_counter()
        kinds = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)
        ignored = set(_lookup(model.module, s["ignore"], self.name))
        if s["layers"] is None:
            candidates = {n: m for n, m in _modules_by_name(model.module).items() if isinstance(m, kinds)}
        else:
            candidates = _lookup(model.module, s["layers"], self.name)
            for name, mod in candidates.items():
                why = reason_not_eligible(mod)
                if why is not None:
                    raise UsageError(f"{self.name}: layer {name!r} cannot be 2:4 sparse: {why}; remove it from layers")
        skipped = {n: why for n, m in candidates.items() if (why := reason_not_eligible(m)) is not None}
        skipped.update(dict.fromkeys(sorted(ignored & set(candidates)), "ignored by the recipe"))
        targets = {n: m for n, m in candidates.items() if n not in skipped}
        if not targets:
            detail = "; ".join(f"{n}: {why}" for n, why in list(skipped.items())[:4]) or "it has none"
            raise UsageError(f"{self.name}: no Conv or Linear layer of the model can be 2:4 sparse ({detail})")
        for name, why in skipped.items():
            ctx.progress(f"{self.name}: {name} stays dense ({why})")
        accuracy_before = training.accuracy(model, model.module, ctx.evaluation)
        for mod in targets.values():
            prune.custom_from_mask(mod, "weight", mask_2_4(mod.weight))
        accuracy_pruned = training.accuracy(model, model.module, ctx.evaluation)
        # The masks stay attached while fine-tuning (weight = weight_orig * mask), then are made permanent.
        try:
            tuned = fine_tune(model, ctx, self.name)
        finally:
            for mod in targets.values():
                prune.remove(mod, "weight")
        broken = [n for n, m in targets.items() if not is_2_4(m.weight)]
        if broken:  # cannot happen with the mask attached; a regression here would ship a wrong build spec
            raise AssertionError(f"{self.name}: layers {broken} lost their 2:4 pattern")
        sparse_params = sum(m.weight.numel() for m in targets.values())
        dense_params = sum(m.weight.numel() for n, m in candidates.items() if n in skipped)
        entry = {
            "pass": self.name,
            "settings": _json_settings(s),
            LAYERS_KEY: sorted(targets),
            "dense": skipped,
            "sparse_weight_share": round(sparse_params / max(sparse_params + dense_params, 1), 4),
            "sparsity": round(sum(int((m.weight == 0).sum()) for m in targets.values()) / sparse_params, 4),
            "accuracy_before": accuracy_before,
            "accuracy_pruned": accuracy_pruned,
            "accuracy_after": training.accuracy(model, model.module, ctx.evaluation),
            "fine_tune": tuned,
            "seconds": round(time.perf_counter() - started, 2),
            "note": "2:4 pays off only on sparse tensor cores (TensorRT on Ampere/Orin and later); "
            "elsewhere the zeros shrink the file only where a format stores them sparse",
        }
        return model, entry


__all__ = ["LAYERS_KEY", "Sparse24", "is_2_4", "mask_2_4", "reason_not_eligible"]
