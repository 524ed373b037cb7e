"""``quantize.qat``: quantization-aware fine-tuning of the Linear and Conv2d layers for static int8.

Every ``nn.Linear`` and ``nn.Conv2d`` (and ``SmoothedLinear`` from ``quantize.smooth``) is wrapped
with int8 fake quantization of what its matrix multiply reads:

- its **input** per tensor, asymmetric int8 (256 levels) over the global [min, max] the calibration
  data reached before training (forward pre-hooks), frozen during training. For a
  ``SmoothedLinear`` that is the input *after* its multiply by ``inv_scale``: the tensor the
  deployed MatMul reads;
- its **weight** per output channel, symmetric int8, scale ``absmax / 127`` recomputed from the
  current weight at every step.

Rounding passes gradients straight through (``x + (q(x) - x).detach()``). That is what the
deployment quantizers do to these layers: ONNX Runtime int8-qdq (``quantizers.onnx.OnnxQuantizer``:
Q/DQ on the inputs of MatMul/Gemm/Conv, per-channel int8 weights, MinMax calibration); Core ML
w8a8 rounds the same tensors, but its activations symmetrically, which is not simulated. Per-channel symmetric weight
rounding commutes with folding a BatchNorm into the conv (a per-channel factor), so a Conv + BN
trained here rounds the same once folded. What it does not simulate: ORT's Q/DQ on a Conv's
output, the int32 bias, activation-by-activation MatMuls (attention scores), and the many other
tensors a fully int8 TFLite graph quantizes.

The model then trains with distillation to the frozen fp32 model as it was when the pass started
(a deep copy, eval mode, no gradients): the mean squared error between the fake-quantized model's
first output and the teacher's, divided by the teacher output's mean square (so the loss is a
relative error whatever the output's scale), plus cross-entropy to the labels when ``labels:
true`` (it then dominates: the model moves toward the labels, not the teacher). Every module stays
in eval mode while training: no dropout, and BatchNorm keeps the statistics the ranges were
measured with. It trains on the training data when given (``--train``; distillation needs no
labels), else on the first ``samples`` calibration samples, the ones the ranges come from.

Defaults: 2 epochs of Adam at lr 1e-5, batches of 16: a nudge of weights already trained. On the
tests' digits CNN (1437 images) the ONNX Runtime int8 error (1 - cosine to the fp32 model, mean
over 360 held-out images) went from 2.33e-4 to 8.5-8.8e-5 at lr 3e-6, 1e-5 and 3e-5; at 1e-4 to
1.08e-4 (its second epoch made it worse and was not kept, see below).

After each epoch the fake-quantized model is compared with the teacher on the calibration samples;
the pass keeps the epoch whose error is least, or the weights it started with when no epoch lowered
it (Adam moves every weight by about the learning rate at each step, so where int8 costs the model
little, training can only add to the error).

Then the wrappers are removed: the pass returns a plain float module (same classes, same
parameter names) whose weights have adapted to int8 rounding. The report entry's ``ranges`` are
what every static-int8 emitter quantizes those inputs with when this is the last pass
(``EmitRequest.trained_ranges``): ONNX int8-qdq, TFLite int8-static, TensorRT Q/DQ and Core ML
w8a8, each finding the layers' input tensors in its own graph (the last two quantize activations
symmetrically, so they take max(|min|, |max|) of a range); the other tensors are calibrated. The
entry records them, with the worst calibration sample's cosine of the fake-quantized model to the
teacher before and after training.
"""

from __future__ import annotations

import copy
import time
from typing import Any, ClassVar

from edgeship.compiler.passes import training
from edgeship.compiler.passes.base import Pass, PassContext, Setting, WorkingModel, count, flag, positive, register
from edgeship.errors import UsageError


@register
class QuantizationAwareTraining(Pass):
    name = "quantize.qat"
    summary = "fine-tune with int8 fake quantization of Linear/Conv2d inputs and weights, distilled from the fp32 model"
    settings: ClassVar[dict[str, Setting]] = {
        **training.SCHEDULE,
        "epochs": Setting(2, count(1)),
        "lr": Setting(1e-5, positive),
        "batch_size": Setting(16, count(1)),
        "samples": Setting(256, count(1)),
        "labels": Setting(False, flag),
    }

    def run(self, model: WorkingModel, ctx: PassContext) -> tuple[WorkingModel, dict[str, Any]]:
        import torch

        from edgeship.compiler.passes.qat_layers import InputRanges, supported, unwrap, wrap

        s = ctx.settings
        started = time.perf_counter()
        data = ctx.calibration_needed(self.name, "measures the int8 ranges and fine-tunes on it")
        data = data.take(min(s["samples"], len(data)))
        # Distillation needs no labels, so training data (when given) adds samples. Digits CNN, 256
        # calibration and 1437 training images, mean held-out int8 error 1.73e-4: 1.35e-4 after training
        # on the calibration images, 1.05e-4 on the training images (3 seeds each).
        tune, where = (
            (ctx.training, ("training", "--train")) if ctx.training is not None else (data, ("calibration", "--calib"))
        )
        if s["labels"]:
            training.labels_needed(
                tune, f"{self.name} with labels: true", "or set labels: false to learn from the fp32 model alone",
                *where,
            )  # fmt: skip
        module = model.module.eval()
        layers = {n: m for n, m in module.named_modules() if n and isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
        if not layers:
            raise UsageError(
                f"{self.name}: the model has no Linear or Conv2d layer; it fake-quantizes those layers' inputs and "
                "weights, so there is nothing to train for int8"
            )
        teacher = copy.deepcopy(module).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)

        batch = model.source.feed_batch
        with torch.no_grad(), InputRanges({n: m for n, m in layers.items() if supported(m)}) as measured:
            want = self._outputs(model, module, data, batch)
        skipped = {
            n: "its class has a forward of its own" for n, m in layers.items() if not supported(m)
        } | {
            n: "it did not run in the forward pass (its weight is read elsewhere)"
            for n, m in layers.items()
            if supported(m) and n not in measured.ranges
        }  # fmt: skip
        ranges = {n: measured.ranges[n] for n in layers if n in measured.ranges}
        if not ranges:
            raise UsageError(
                f"{self.name}: none of the model's Linear or Conv2d layers can be fake-quantized "
                f"({'; '.join(f'{n}: {why}' for n, why in list(skipped.items())[:3])})"
            )
        wrap(module, {layers[n]: r for n, r in ranges.items()})
        try:
            tuned, kept_epoch, (before, after) = self._fine_tune(model, module, teacher, ctx, tune, data, want, batch)
        finally:
            unwrap(module)
        with torch.no_grad():
            fp32 = _compare(self._outputs(model, module, data, batch), want)
        tuned["data"] = where[0]
        tuned["kept_epoch"] = kept_epoch
        entry = {
            "pass": self.name,
            "settings": dict(s),
            "calibration_samples": len(data),
            "layers": len(ranges),
            "ranges": {n: [_sig(min(lo, 0.0)), _sig(max(hi, 0.0))] for n, (lo, hi) in ranges.items()},
            "skipped": skipped,
            "int8_cosine_before": round(before[1], 6),
            "int8_cosine_after": round(after[1], 6),
            "int8_error_before": _sig(before[0]),
            "int8_error_after": _sig(after[0]),
            "fp32_cosine_after": round(fp32[1], 6),
            "training": tuned,
            "seconds": round(time.perf_counter() - started, 2),
            "note": (
                "on the calibration samples against the fp32 model before the pass: cosine of the worst sample and "
                "error (squared error over squared output, all samples) of the fake-quantized (int8) model, cosine "
                "of the float model after; ranges: [min, max] of each layer's matmul input (widened to hold 0), "
                "frozen while training; kept_epoch: the epoch whose weights were kept (0: those before training)"
            ),
        }
        model.module = module.eval()
        return model, entry

    def _fine_tune(
        self,
        model: WorkingModel,
        module: Any,
        teacher: Any,
        ctx: PassContext,
        tune: Any,
        data: Any,
        want: Any,
        batch: int,
    ) -> tuple[dict[str, Any], int, tuple[tuple[float, float], tuple[float, float]]]:
        """Train the wrapped ``module`` toward ``teacher``; keep the epoch (0: the weights before training)
        whose fake-quantized outputs on the calibration samples ``data`` are nearest ``want``, the
        teacher's. Returns the training summary, that epoch, and (error, worst cosine) before and kept.

        Where int8 costs the model little (the tests' tiny BERT, whose Linears lose 1e-7 in cosine)
        training makes the fake-quantized model worse than it started (loss 4e-6 -> 1.2e-5), and
        without this choice the pass would return it. With ``labels: true`` the loss aims at the
        labels, which the distance to the teacher cannot judge: the last epoch is kept.
        """
        import torch

        s = ctx.settings
        use_labels = s["labels"]
        for p in module.parameters():
            p.requires_grad_(True)

        def loss(inputs: tuple[Any, ...], labels: Any) -> Any:
            with torch.no_grad():
                target = training.first_output(teacher(*inputs))
            out = training.first_output(module(*inputs))
            value = torch.nn.functional.mse_loss(out, target) / target.pow(2).mean().clamp(min=1e-12)
            if use_labels:
                value = value + torch.nn.functional.cross_entropy(out, labels)
            return value

        def measure() -> tuple[float, float]:
            with torch.no_grad():
                return _compare(self._outputs(model, module, data, batch), want)

        before = measure()
        best: dict[str, Any] = {"epoch": 0, "score": before, "state": _snapshot(module)}
        ctx.progress(f"{self.name}: fake-quantized, worst int8 cosine on the calibration data {before[1]:.4f}")

        def after_epoch(epoch: int) -> None:
            score = measure()
            if use_labels or score[0] < best["score"][0]:
                best.update(epoch=epoch, score=score, state=_snapshot(module))

        tuned = training.train(
            model, list(module.parameters()), tune, loss, **training.schedule(s), seed=ctx.seed,
            progress=ctx.progress, what=self.name, eval_mode=True, after_epoch=after_epoch,
        )  # fmt: skip
        module.load_state_dict(best["state"])
        tuned["loss"] = "mse to the fp32 model's output / its mean square" + (
            " + cross-entropy on labels" if use_labels else ""
        )
        ctx.progress(
            f"{self.name}: kept epoch {best['epoch']}, worst int8 cosine on the calibration data {best['score'][1]:.4f}"
        )
        return tuned, int(best["epoch"]), (before, best["score"])

    @staticmethod
    def _outputs(model: WorkingModel, module: Any, data: Any, batch: int) -> Any:
        """The first output of ``module`` on every sample of ``data``, one flattened row per sample."""
        import torch

        rows = [
            training.first_output(module(*model.inputs_of(feed))).reshape(len(next(iter(feed.values()))), -1)
            for feed in data.batches(batch)
        ]
        return torch.cat(rows).double()


def _compare(got: Any, want: Any) -> tuple[float, float]:
    """(squared error over squared ``want``, smallest per-row cosine) of two (samples, features) tensors."""
    import torch

    error = float((got - want).pow(2).sum() / want.pow(2).sum().clamp(min=1e-300))
    return error, float(torch.nn.functional.cosine_similarity(got, want, dim=1, eps=1e-12).min())


def _snapshot(module: Any) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _sig(value: float) -> float:
    return float(f"{value:.6g}")
