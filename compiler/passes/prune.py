"""Pruning passes: ``prune.magnitude`` (unstructured) and ``prune.channels`` (structured, layers shrink).

``prune.channels`` removes whole output channels with torch-pruning's ``DependencyGraph`` /
``MetaPruner``: every layer coupled to a pruned channel (the next layer's input channels, a
BatchNorm, both sides of a residual add, the matching slice of a concat) is cut consistently, so the
pruned module is an ordinary smaller ``nn.Module`` that every converter takes. Layers whose output
channels are the model's output are never pruned (the output shape is part of the package contract);
naming one in ``layers`` is an error that names it.

``prune.magnitude`` zeroes the smallest weights (``torch.nn.utils.prune``, made permanent). The tensors
keep their shapes: files and latency do not shrink unless a runtime exploits sparsity; it is the
starting point for sparse or palettized formats.

Both fine-tune afterwards when training data is given (``fine_tune: true``, the default): cross-entropy
on the labels when the data has them, else mean squared error to the frozen source's outputs.
"""

from __future__ import annotations

import difflib
import time
from typing import Any, ClassVar

from edgeship.compiler.passes import training
from edgeship.compiler.passes.base import (
    Pass,
    PassContext,
    Setting,
    WorkingModel,
    choice,
    count,
    names_list,
    ratio,
    register,
)
from edgeship.errors import UsageError


def _modules_by_name(module: Any) -> dict[str, Any]:
    return {name: m for name, m in module.named_modules() if name}


def _lookup(module: Any, names: list[str], what: str) -> dict[str, Any]:
    """The named submodules; ``UsageError`` naming a missing one and the nearest existing name."""
    mods = _modules_by_name(module)
    out = {}
    for name in names:
        if name not in mods:
            guess = difflib.get_close_matches(name, list(mods), n=1)
            hint = f"did you mean {guess[0]!r}?" if guess else f"layers: {', '.join(list(mods)[:12])}"
            raise UsageError(f"{what}: the model has no layer {name!r} ({hint})")
        out[name] = mods[name]
    return out


def fine_tune(model: WorkingModel, ctx: PassContext, what: str) -> dict[str, Any] | None:
    """Fine-tune ``model.module`` on ``ctx.training`` per the fine-tuning settings; None when skipped."""
    import torch

    s = ctx.settings
    data = ctx.training
    if not s["fine_tune"] or data is None:
        return None
    source = model.source.module
    with_labels = data.labels is not None

    def loss(inputs: tuple[Any, ...], labels: Any) -> Any:
        out = training.first_output(model.module(*inputs))
        if labels is not None:
            return torch.nn.functional.cross_entropy(out, labels)
        with torch.no_grad():
            want = training.first_output(source(*inputs))
        return torch.nn.functional.mse_loss(out, want)

    summary = training.train(
        model,
        [p for p in model.module.parameters() if p.requires_grad],
        data,
        loss,
        **training.schedule(s),
        seed=ctx.seed,
        progress=ctx.progress,
        what=f"{what} fine-tuning",
    )
    summary["loss"] = "cross-entropy on labels" if with_labels else "mse to the fp32 source's outputs"
    return summary


@register
class MagnitudePrune(Pass):
    name = "prune.magnitude"
    summary = "zero the smallest weights of Conv/Linear layers (unstructured; shapes unchanged)"
    settings: ClassVar[dict[str, Setting]] = {
        "ratio": Setting(0.5, ratio),
        "layers": Setting(None, names_list),
        "scope": Setting("global", choice("global", "layer")),
        **training.FINE_TUNE,
    }

    def run(self, model: WorkingModel, ctx: PassContext) -> tuple[WorkingModel, dict[str, Any]]:
        import torch
        from torch.nn.utils import prune

        s = ctx.settings
        started = time.perf_counter()
        kinds = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)
        if s["layers"] is None:
            targets = {n: m for n, m in _modules_by_name(model.module).items() if isinstance(m, kinds)}
        else:
            targets = _lookup(model.module, s["layers"], self.name)
            for name, mod in targets.items():
                if not isinstance(mod, kinds):
                    raise UsageError(
                        f"{self.name}: layer {name!r} is a {type(mod).__name__}, which has no weights this pass "
                        "prunes; name Conv or Linear layers"
                    )
        if not targets:
            raise UsageError(f"{self.name}: the model has no Conv or Linear layer to prune")
        accuracy_before = training.accuracy(model, model.module, ctx.evaluation)
        params = [(m, "weight") for m in targets.values()]
        if s["scope"] == "global":
            prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=s["ratio"])
        else:
            for mod, attr in params:
                prune.l1_unstructured(mod, attr, amount=s["ratio"])
        accuracy_pruned = training.accuracy(model, model.module, ctx.evaluation)
        # The masks stay attached while fine-tuning, so pruned weights stay zero; then made permanent.
        tuned = fine_tune(model, ctx, self.name)
        for mod, attr in params:
            prune.remove(mod, attr)
        zeros = sum(int((m.weight == 0).sum()) for m in targets.values())
        total = sum(m.weight.numel() for m in targets.values())
        entry = {
            "pass": self.name,
            "settings": _json_settings(s),
            "layers": len(targets),
            "sparsity": round(zeros / total, 4),
            "accuracy_before": accuracy_before,
            "accuracy_pruned": accuracy_pruned,
            "accuracy_after": training.accuracy(model, model.module, ctx.evaluation),
            "fine_tune": tuned,
            "seconds": round(time.perf_counter() - started, 2),
            "note": "unstructured: tensors keep their shapes, so files and latency do not shrink by themselves",
        }
        return model, entry


def output_layers(module: Any, example: tuple[Any, ...]) -> set[Any]:
    """Conv/Linear modules whose output channels reach a model output through shape-keeping ops only."""
    import torch_pruning as tp

    graph = tp.DependencyGraph().build_dependency(module, example_inputs=example if len(example) > 1 else example[0])
    roots = tuple(tp.utils.TORCH_CONV if isinstance(tp.utils.TORCH_CONV, tuple) else (tp.utils.TORCH_CONV,))
    roots += (tp.utils.TORCH_LINEAR,) if not isinstance(tp.utils.TORCH_LINEAR, tuple) else tp.utils.TORCH_LINEAR
    found: set[Any] = set()
    stack = [n for n in graph.module2node.values() if not n.outputs]
    seen: set[int] = set()
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node.module, roots):
            found.add(node.module)
            continue
        stack.extend(node.inputs)
    return found


def prune_channels(
    module: Any,
    example: tuple[Any, ...],
    *,
    amount: float,
    layers: list[str] | None,
    ignore: list[str],
    importance: str,
    round_to: int | None,
    what: str,
) -> dict[str, Any]:
    """Remove ``amount`` of the output channels of every prunable Conv/Linear layer of ``module``, in place.

    ``layers`` limits pruning to those layers (an error names one that cannot be pruned); ``ignore``
    keeps those layers whole. Returns which layers shrank, as {name: [channels before, after]}.
    """
    import torch
    import torch_pruning as tp

    mods = _modules_by_name(module)
    kinds = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)
    protected = output_layers(module, example)
    keep = set(_lookup(module, ignore, what).values()) | protected
    if layers is not None:
        wanted = _lookup(module, layers, what)
        for name, mod in wanted.items():
            if not isinstance(mod, kinds):
                raise UsageError(
                    f"{what}: layer {name!r} is a {type(mod).__name__}, which has no output channels to prune; "
                    "name Conv or Linear layers"
                )
            if mod in protected:
                raise UsageError(
                    f"{what}: layer {name!r} cannot be pruned: its output channels are the model's output; "
                    "remove it from layers"
                )
        keep |= {m for m in mods.values() if isinstance(m, kinds) and m not in wanted.values()}
    before = {n: _width(m) for n, m in mods.items() if isinstance(m, kinds)}
    if all(m in keep for m in mods.values() if isinstance(m, kinds)):
        raise UsageError(f"{what}: no layer is left to prune (every Conv/Linear is the output or ignored)")
    pruner = tp.pruner.MetaPruner(
        module,
        example if len(example) > 1 else example[0],
        importance=tp.importance.MagnitudeImportance(p=1 if importance == "l1" else 2),
        pruning_ratio=amount,
        ignored_layers=list(keep),
        round_to=round_to,
    )
    with torch.no_grad():
        pruner.step()
    changed = {n: [before[n], _width(m)] for n, m in mods.items() if n in before and _width(m) != before[n]}
    if layers is not None:
        untouched = [n for n in layers if n in before and n not in changed]
        if untouched:
            raise UsageError(
                f"{what}: layer {untouched[0]!r} cannot be pruned: the dependency graph couples its channels to "
                "a layer that must keep them (an output or an ignored layer)"
            )
    return changed


def _width(mod: Any) -> int:
    return int(getattr(mod, "out_channels", getattr(mod, "out_features", 0)))


@register
class ChannelPrune(Pass):
    name = "prune.channels"
    summary = "remove whole channels (torch-pruning dependency graph); layers shrink, files and latency too"
    settings: ClassVar[dict[str, Setting]] = {
        "ratio": Setting(0.5, ratio),
        "layers": Setting(None, names_list),
        "ignore": Setting([], names_list),
        "importance": Setting("l2", choice("l1", "l2")),
        "round_to": Setting(None, count(1)),
        **training.FINE_TUNE,
    }

    def run(self, model: WorkingModel, ctx: PassContext) -> tuple[WorkingModel, dict[str, Any]]:
        s = ctx.settings
        started = time.perf_counter()
        example = model.inputs_of(model.source.example)
        size_before = training.size(model, model.module)
        accuracy_before = training.accuracy(model, model.module, ctx.evaluation)
        ctx.progress(f"{self.name}: removing {s['ratio']:.0%} of the channels")
        changed = prune_channels(
            model.module,
            example,
            amount=s["ratio"],
            layers=s["layers"],
            ignore=s["ignore"],
            importance=s["importance"],
            round_to=s["round_to"],
            what=self.name,
        )
        _check_outputs(model, example, self.name)
        accuracy_pruned = training.accuracy(model, model.module, ctx.evaluation)
        tuned = fine_tune(model, ctx, self.name)
        entry = {
            "pass": self.name,
            "settings": _json_settings(s),
            "layers": changed,
            "before": size_before,
            "after": training.size(model, model.module),
            "accuracy_before": accuracy_before,
            "accuracy_pruned": accuracy_pruned,
            "accuracy_after": training.accuracy(model, model.module, ctx.evaluation),
            "fine_tune": tuned,
            "seconds": round(time.perf_counter() - started, 2),
        }
        return model, entry


def _check_outputs(model: WorkingModel, example: tuple[Any, ...], what: str) -> None:
    """The pruned module must keep the source's output shapes (the package's contract)."""
    import torch

    try:
        with torch.no_grad():
            out = model.module.eval()(*example)
    except RuntimeError as exc:
        # Seen with torch-pruning 1.6: a concat followed by a flatten into a Linear loses one branch's
        # channels, so the Linear keeps too many inputs.
        first = (str(exc).strip().splitlines() or [""])[0]
        raise UsageError(
            f"{what}: the pruned model no longer runs ({first}); the dependency graph mis-tracked a coupling "
            "(a concat followed by a flatten does this): keep the layers around it whole with ignore, or pool "
            "before flattening"
        ) from None
    outs = out if isinstance(out, (tuple, list)) else (out,)
    for spec, tensor in zip(model.source.outputs, outs):
        if tuple(tensor.shape[1:]) != tuple(spec.shape[1:]):
            raise UsageError(
                f"{what}: pruning changed output {spec.name!r} from {spec.shape} to {tuple(tensor.shape)}; "
                "add the layer that produces it to ignore"
            )


def _json_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if isinstance(v, (str, int, float, bool, list, type(None)))}


__all__ = ["ChannelPrune", "MagnitudePrune", "fine_tune", "output_layers", "prune_channels"]
