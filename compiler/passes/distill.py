"""Knowledge distillation: ``distill.kd`` trains a smaller student to reproduce its teacher.

The teacher is the working model as it stands when the pass runs (frozen, in eval mode); the
student is the module given in the recipe (``student``, Python API only) or the teacher with
``student_ratio`` of its channels removed by structured pruning (``prune.channels``' dependency
graph). The loss (Hinton et al., 2015)::

    loss = alpha * CE(student, labels) + (1 - alpha) * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           + feature_weight * sum over pairs of MSE(adapter(student feature), teacher feature)

The T^2 factor keeps the soft term's gradients on the scale of the hard term's as T grows.
``features`` pairs teacher and student module names; where their widths differ a learned 1x1
convolution (4-D features) or linear layer (others) maps the student's feature onto the teacher's,
trained with the student and dropped afterwards. With ``alpha: 0`` no labels are needed.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping
from typing import Any, ClassVar

from edgeship.compiler.passes import training
from edgeship.compiler.passes.base import (
    Pass,
    PassContext,
    Setting,
    WorkingModel,
    count,
    non_negative,
    positive,
    ratio,
    register,
    unit,
)
from edgeship.compiler.passes.prune import _lookup, prune_channels
from edgeship.errors import UsageError


def _student(value: Any, where: str) -> Any:
    import torch

    if not isinstance(value, torch.nn.Module):
        raise UsageError(
            f"{where} must be a torch.nn.Module given through the Python API; in a YAML recipe use student_ratio "
            "to derive the student from the teacher"
        )
    return value


def _features(value: Any, where: str) -> dict[str, str]:
    if not isinstance(value, Mapping) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise UsageError(
            f"{where} must map teacher layer names to student layer names ({{'features.3': 'features.3'}})"
        )
    return dict(value)


@register
class KnowledgeDistillation(Pass):
    name = "distill.kd"
    summary = "train a smaller student on the teacher's soft targets (KL at temperature T) plus the labels"
    settings: ClassVar[dict[str, Setting]] = {
        "temperature": Setting(4.0, positive),
        "alpha": Setting(0.5, unit),
        "student": Setting(None, _student),
        "student_ratio": Setting(0.5, ratio),
        "features": Setting({}, _features),
        "feature_weight": Setting(1.0, non_negative),
        **training.SCHEDULE,
        "epochs": Setting(10, count(1)),
    }

    def run(self, model: WorkingModel, ctx: PassContext) -> tuple[WorkingModel, dict[str, Any]]:
        import torch
        import torch.nn.functional as F

        s = ctx.settings
        data = ctx.training
        if data is None:
            raise UsageError(f"{self.name} needs training data (--train, or training= in compile_model)")
        if s["alpha"] > 0:
            training.labels_needed(
                data,
                f"{self.name}'s hard-label loss (alpha {s['alpha']})",
                "or set alpha: 0 to learn from the teacher alone",
            )
        started = time.perf_counter()
        example = model.inputs_of(model.source.example)
        teacher = model.module.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if s["student"] is not None:
            student = copy.deepcopy(s["student"])  # the recipe's module stays untrained: a rerun starts afresh
            derived = None
        else:
            student = copy.deepcopy(teacher)
            for p in student.parameters():
                p.requires_grad_(True)
            ctx.progress(f"{self.name}: student = teacher with {s['student_ratio']:.0%} of its channels removed")
            derived = prune_channels(
                student, example, amount=s["student_ratio"], layers=None, ignore=[], importance="l2",
                round_to=None, what=self.name,
            )  # fmt: skip
        student.eval()
        with torch.no_grad():
            t_out, s_out = (training.first_output(m(*example)) for m in (teacher, student))
        if tuple(t_out.shape) != tuple(s_out.shape):
            raise UsageError(
                f"{self.name}: the teacher's output has shape {tuple(t_out.shape)} and the student's "
                f"{tuple(s_out.shape)}; they must match"
            )
        pairs = _feature_pairs(teacher, student, s["features"], example, self.name)
        adapters = torch.nn.ModuleList([a for _, _, a in pairs if a is not None])
        captured: dict[str, Any] = {}
        hooks = [
            mod.register_forward_hook(lambda _m, _i, out, key=key: captured.__setitem__(key, out))
            for i, (t_mod, s_mod, _) in enumerate(pairs)
            for key, mod in ((f"t{i}", t_mod), (f"s{i}", s_mod))
        ]
        temperature, alpha = s["temperature"], s["alpha"]

        def loss(inputs: tuple[Any, ...], labels: Any) -> Any:
            with torch.no_grad():
                soft = training.first_output(teacher(*inputs))
            out = training.first_output(student(*inputs))
            value = (
                (1 - alpha)
                * temperature**2
                * F.kl_div(
                    F.log_softmax(out / temperature, -1), F.softmax(soft / temperature, -1), reduction="batchmean"
                )
            )
            if alpha > 0:
                value = value + alpha * F.cross_entropy(out, labels)
            for i, (_, _, adapter) in enumerate(pairs):
                got = captured[f"s{i}"]
                value = value + s["feature_weight"] * F.mse_loss(
                    got if adapter is None else adapter(got), captured[f"t{i}"]
                )
            return value

        accuracy_teacher = training.accuracy(model, teacher, ctx.evaluation)
        try:
            tuned = training.train(
                model.__class__(model.source, student),
                list(student.parameters()) + list(adapters.parameters()),
                data,
                loss,
                **training.schedule(s),
                seed=ctx.seed,
                progress=ctx.progress,
                what=self.name,
                modules=(adapters,),
            )
        finally:
            for hook in hooks:
                hook.remove()
        teacher_size = training.size(model, teacher)
        model.module = student.eval()
        entry = {
            "pass": self.name,
            "settings": {
                k: (f"<{type(v).__name__} module>" if k == "student" and v is not None else v) for k, v in s.items()
            },
            "student": "given" if derived is None else f"teacher with {s['student_ratio']:.0%} of its channels removed",
            "teacher": teacher_size,
            "after": training.size(model, student),
            "accuracy_teacher": accuracy_teacher,
            "accuracy_after": training.accuracy(model, student, ctx.evaluation),
            "features": [[t, st] for t, st in s["features"].items()],
            "adapters": len(adapters),
            "training": tuned,
            "seconds": round(time.perf_counter() - started, 2),
        }
        return model, entry


def _feature_pairs(
    teacher: Any, student: Any, names: dict[str, str], example: tuple[Any, ...], what: str
) -> list[tuple[Any, Any, Any]]:
    """(teacher module, student module, adapter or None) per named pair; adapters map student widths to the teacher's."""
    import torch

    if not names:
        return []
    t_mods = _lookup(teacher, list(names), f"{what} (teacher)")
    s_mods = _lookup(student, list(names.values()), f"{what} (student)")
    shapes: dict[int, tuple[int, ...]] = {}
    hooks = [
        m.register_forward_hook(lambda mod, _i, out: shapes.__setitem__(id(mod), tuple(out.shape)))
        for m in (*t_mods.values(), *s_mods.values())
    ]
    try:
        with torch.no_grad():
            teacher(*example)
            student(*example)
    finally:
        for h in hooks:
            h.remove()
    pairs = []
    for t_name, s_name in names.items():
        t_shape, s_shape = shapes.get(id(t_mods[t_name])), shapes.get(id(s_mods[s_name]))
        if t_shape is None or s_shape is None:
            unused = t_name if t_shape is None else s_name
            raise UsageError(f"{what}: layer {unused!r} does not run in the forward pass; name a layer that does")
        adapter = None
        if t_shape != s_shape:
            # Only the channel axis may differ: axis 1 of 4-D (N, C, H, W) features, the last axis otherwise.
            same_rest = t_shape[2:] == s_shape[2:] if len(t_shape) == 4 else t_shape[:-1] == s_shape[:-1]
            if len(t_shape) != len(s_shape) or t_shape[0] != s_shape[0] or not same_rest:
                raise UsageError(
                    f"{what}: features {t_name!r} {t_shape} and {s_name!r} {s_shape} differ in more than "
                    "their channels; pair layers with the same spatial size"
                )
            adapter = (
                torch.nn.Conv2d(s_shape[1], t_shape[1], 1)
                if len(t_shape) == 4
                else torch.nn.Linear(s_shape[-1], t_shape[-1])
            )
        pairs.append((t_mods[t_name], s_mods[s_name], adapter))
    return pairs
