"""What the compression passes buy: structured pruning and distillation, next to the unpruned model / labels alone.

(a) **Structured pruning** (``prune.channels``, 50% of the channels, fine-tuned) of a wider CNN
    (convolutions of 64-64-128-128 channels with BatchNorm, global mean pooling, one Linear) trained
    on scikit-learn's digits upsampled to 32x32. Both the unpruned model and the pruned one go through
    ``compile_model`` (android-arm64: TFLite fp32 and int8-static, calibrated on 256 training images,
    validated on the 360 test images with labels); the pruned one with the recipe
    ``passes: [prune.channels]``, so the pass runs inside the compile. Printed: parameters and MACs
    (``torch_pruning.utils.count_ops_and_params``) before/after, accuracy of the unpruned model, of the
    pruned one before and after fine-tuning, of every artifact, and host latency of each artifact
    through the runtime ``Session`` (one thread, no statistics), interleaved: blocks of calls in a
    shuffled order each round, the figure is the median per-call time over blocks.
    Goals: params and MACs at most 0.5x; latency >= 1.5x lower for fp32 and int8; accuracy after
    fine-tuning within 1 point of the unpruned model.

(b) **Distillation** (``distill.kd``, T=4, alpha=0.5): a student with 24-24-48-48 channels (>= 4x fewer
    parameters than the teacher of (a)) trained with KD from that teacher, against the same student
    (same initialisation per seed, same epochs, optimiser and data) trained on the labels alone
    (``alpha: 1``, the same loop with the teacher's term weighted 0). Test accuracy, mean and spread
    (sample standard deviation) over 3 seeds. Goal: KD's mean above labels-alone's.

Reproduce::

    cd /work/main && .venv/bin/python -m benchmarks.compression [--quick] [--json OUT] [--seconds S]

``--quick`` (CI size, seconds): 8-16 channels, one epoch, one seed, 1 s of latency; its numbers mean
nothing beyond "the path runs". The machine is shared and noisy: trust the interleaved ratios more than
absolute times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import THREAD_ENV, describe

Array = np.ndarray[Any, Any]


@dataclass(frozen=True)
class Size:
    widths: tuple[int, int]
    student: tuple[int, int]
    epochs: int
    fine_tune_epochs: int
    kd_epochs: int
    seeds: tuple[int, ...]
    seconds: float


FULL = Size((64, 128), (24, 48), 15, 5, 8, (0, 1, 2), 20.0)
QUICK = Size((8, 16), (4, 8), 1, 1, 1, (0,), 1.0)


def data() -> tuple[Array, Array, Array, Array]:
    """Digits upsampled to 32x32 (bilinear), the split of examples/digits.py."""
    import torch

    from examples.digits import load_data

    x_train, x_test, y_train, y_test = load_data()

    def up(x: Array) -> Array:
        t = torch.nn.functional.interpolate(torch.from_numpy(x), size=(32, 32), mode="bilinear", align_corners=False)
        return t.numpy().astype(np.float32)

    return up(x_train), up(x_test), y_train, y_test


def cnn(widths: tuple[int, int]) -> Any:
    """Two stages of two 3x3 convolutions (with BatchNorm), max-pooled, then mean pooling and one Linear.

    The mean pooling (instead of a flatten) converts with litert-torch and keeps torch-pruning's
    dependency graph exact."""
    import torch

    a, b = widths

    def block(cin: int, cout: int) -> list[Any]:
        return [torch.nn.Conv2d(cin, cout, 3, padding=1), torch.nn.BatchNorm2d(cout), torch.nn.ReLU()]

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = torch.nn.Sequential(
                *block(1, a), *block(a, a), torch.nn.MaxPool2d(2), *block(a, b), *block(b, b), torch.nn.MaxPool2d(2)
            )
            self.classifier = torch.nn.Linear(b, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features(x).mean((2, 3)))

    return Net()


def train(model: Any, x: Array, y: Array, epochs: int, seed: int, say: Callable[[str], None]) -> Any:
    import torch

    from examples.digits import fit

    torch.manual_seed(seed)
    return fit(
        model, x, y, epochs=epochs, seed=seed, lr=2e-3, each_epoch=lambda e: say(f"  teacher epoch {e + 1}/{epochs}")
    )


def accuracy(model: Any, x: Array, y: Array) -> float:
    import torch

    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def session_latency(packages: dict[str, Path], trusted: Any, feed: Array, seconds: float) -> dict[str, float]:
    """Median per-call ms of ``Session.run`` per package, interleaved in shuffled blocks."""
    import edgeship.runtime as rt

    sessions = {k: rt.open(p, trusted_keys=trusted, threads=1, stats=False) for k, p in packages.items()}
    try:
        calls = {}
        for key, s in sessions.items():
            for _ in range(3):
                s.run({"image": feed})
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < 0.05 or n < 2:
                s.run({"image": feed})
                n += 1
            calls[key] = max(1, round(0.05 / ((time.perf_counter() - t0) / n)))
        blocks: dict[str, list[float]] = {k: [] for k in sessions}
        rng = random.Random(0)
        start, rounds = time.perf_counter(), 0
        while rounds < 5 or time.perf_counter() - start < seconds:
            order = list(sessions)
            rng.shuffle(order)
            for key in order:
                s, k = sessions[key], calls[key]
                t0 = time.perf_counter()
                for _ in range(k):
                    s.run({"image": feed})
                blocks[key].append((time.perf_counter() - t0) / k)
            rounds += 1
        return {k: float(np.median(v) * 1e3) for k, v in blocks.items()}
    finally:
        for s in sessions.values():
            s.close()


def pruning(size: Size, work: Path, teacher: Any, d: tuple[Array, ...], say: Callable[[str], None]) -> dict[str, Any]:
    from edgeship.compiler import Dataset, Recipe, compile_model, from_module
    from edgeship.runtime.package import TrustedKeys, generate_key

    x_train, x_test, y_train, y_test = d
    key = generate_key()
    source = from_module(teacher, x_test[:1], input_names=["image"], output_names=["logits"])
    base = {
        "variants": {"android-arm64": ["fp32", "int8-static"]},
        "calibration": {"samples": 256},
        "validation": {"latency_runs": 3},
    }
    kwargs: dict[str, Any] = {
        "calibration": Dataset({"image": x_train}),
        "evaluation": Dataset({"image": x_test}, labels=y_test),
        "progress": lambda m: say(f"  {m}"),
    }
    say("(a) compiling the unpruned model")
    plain = compile_model(source, ["android-arm64"], work / "plain", key, recipe=Recipe.from_dict(base), **kwargs)
    say("(a) compiling with passes: [prune.channels] (ratio 0.5, fine-tuned)")
    recipe = Recipe.from_dict(
        {
            **base,
            "passes": ["prune.channels"],
            "prune": {"channels": {"ratio": 0.5, "epochs": size.fine_tune_epochs, "lr": 1e-3}},
        }
    )
    pruned = compile_model(
        source,
        ["android-arm64"],
        work / "pruned",
        key,
        recipe=recipe,
        training=Dataset({"image": x_train}, labels=y_train),
        **kwargs,
    )
    entry = json.loads(pruned.report_json.read_text())["passes"][0]
    variants = {("unpruned", v.precision): v for v in plain.variants} | {
        ("pruned", v.precision): v for v in pruned.variants
    }
    failed = {f"{k[0]} {k[1]}": v.error for k, v in variants.items() if v.error}
    if failed:
        raise SystemExit(f"compile failed: {failed}")
    say(f"(a) latency through the runtime Session, {size.seconds:g} s interleaved")
    latency = session_latency(
        {f"{k[0]} {k[1]}": v.package for k, v in variants.items() if v.package},
        TrustedKeys.of([key.public_key()]),
        x_test[:1],
        size.seconds,
    )
    artifacts = {
        name: {
            "accuracy": v.metrics.accuracy,
            "size_bytes": v.metrics.size_bytes,
            "latency_ms": latency[name],
        }
        for name, v in ((f"{k[0]} {k[1]}", v) for k, v in variants.items())
    }
    return {"entry": entry, "artifacts": artifacts}


def distillation(size: Size, teacher: Any, d: tuple[Array, ...], say: Callable[[str], None]) -> dict[str, Any]:
    import torch

    from edgeship.compiler import Dataset, Recipe, from_module
    from edgeship.compiler.passes import run_passes

    x_train, x_test, y_train, y_test = d
    source = from_module(teacher, x_test[:1], input_names=["image"], output_names=["logits"])
    train_set = Dataset({"image": x_train}, labels=y_train)
    eval_set = Dataset({"image": x_test}, labels=y_test)
    results: dict[str, list[float]] = {"kd": [], "labels": []}
    params = {}
    for seed in size.seeds:
        torch.manual_seed(1000 + seed)
        student = cnn(size.student)  # the same initial weights for both runs of this seed
        for mode, alpha in (("kd", 0.5), ("labels", 1.0)):
            settings = {"student": student, "alpha": alpha, "temperature": 4.0, "epochs": size.kd_epochs, "lr": 2e-3}
            steps = Recipe.from_dict({"passes": ["distill.kd"], "distill": {"kd": settings}}).passes
            say(f"(b) seed {seed}: student trained on {'teacher + labels' if mode == 'kd' else 'labels alone'}")
            working = run_passes(
                source, [(s.name, s.settings) for s in steps], training=train_set, evaluation=eval_set, seed=seed
            )
            entry = working.history[0]
            results[mode].append(entry["accuracy_after"])
            params = {"teacher": entry["teacher"], "student": entry["after"]}
    return {"params": params, "accuracy": results}


def spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * mean:.2f} +- {100 * sd:.2f}"


def report(a: dict[str, Any], b: dict[str, Any], teacher_acc: float, size: Size) -> list[str]:
    e = a["entry"]
    lines = []
    pr, mr = e["after"]["params"] / e["before"]["params"], e["after"]["macs"] / e["before"]["macs"]
    lines.append("(a) structured pruning, 50% of the channels (prune.channels), digits 32x32")
    lines.append(f"    params {e['before']['params']:,} -> {e['after']['params']:,} ({pr:.3f}x)")
    lines.append(f"    MACs   {e['before']['macs']:,} -> {e['after']['macs']:,} ({mr:.3f}x)")
    lines.append(
        f"    accuracy (torch): unpruned {100 * e['accuracy_before']:.2f}, pruned {100 * e['accuracy_pruned']:.2f}, "
        f"after {size.fine_tune_epochs} fine-tuning epochs {100 * e['accuracy_after']:.2f}"
    )
    art = a["artifacts"]
    lines.append(f"    {'artifact':<22}{'accuracy':>9}{'KiB':>9}{'latency ms':>12}")
    for name, row in art.items():
        acc = f"{100 * row['accuracy']:.2f}" if row["accuracy"] is not None else "-"
        lines.append(f"    {name:<22}{acc:>9}{row['size_bytes'] / 1024:>9.1f}{row['latency_ms']:>12.3f}")
    speed = {p: art[f"unpruned {p}"]["latency_ms"] / art[f"pruned {p}"]["latency_ms"] for p in ("fp32", "int8-static")}
    drop = 100 * (e["accuracy_before"] - e["accuracy_after"])
    goals = [
        ("params and MACs at most 0.5x", pr <= 0.5 and mr <= 0.5),
        (f"fp32 latency >= 1.5x lower ({speed['fp32']:.2f}x)", speed["fp32"] >= 1.5),
        (f"int8 latency >= 1.5x lower ({speed['int8-static']:.2f}x)", speed["int8-static"] >= 1.5),
        (f"accuracy within 1 point after fine-tuning (drop {drop:.2f})", drop <= 1.0),
    ]
    ratio = b["params"]["teacher"]["params"] / b["params"]["student"]["params"]
    lines.append("")
    lines.append(
        f"(b) distillation (distill.kd, T=4, alpha=0.5): teacher {b['params']['teacher']['params']:,} params "
        f"(accuracy {100 * teacher_acc:.2f}), student {b['params']['student']['params']:,} ({ratio:.1f}x smaller), "
        f"{size.kd_epochs} epochs, seeds {list(size.seeds)}"
    )
    kd, labels = b["accuracy"]["kd"], b["accuracy"]["labels"]
    lines.append(f"    student with KD       {spread(kd)}  ({', '.join(f'{100 * v:.2f}' for v in kd)})")
    lines.append(f"    student, labels alone {spread(labels)}  ({', '.join(f'{100 * v:.2f}' for v in labels)})")
    goals.append((f"student >= 4x smaller ({ratio:.1f}x)", ratio >= 4))
    goals.append(("KD mean above labels-alone mean", statistics.fmean(kd) > statistics.fmean(labels)))
    lines.append("")
    lines += [f"{'PASS' if ok else 'FAIL'}  {what}" for what, ok in goals]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI size: tiny widths, one epoch, one seed")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--seconds", type=float, help="interleaved latency time (default 20, quick 1)")
    args = parser.parse_args(argv)
    os.environ.update(THREAD_ENV)
    import torch

    torch.set_num_threads(1)
    size = QUICK if args.quick else FULL
    if args.seconds is not None:
        size = dataclasses.replace(size, seconds=args.seconds)
    started = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    print(f"machine: {describe()}")
    print(f"torch {torch.__version__}, torch-pruning {__import__('torch_pruning').__version__}")
    d = data()
    say(f"training the teacher ({size.widths[0]}-{size.widths[0]}-{size.widths[1]}-{size.widths[1]} channels)")
    teacher = train(cnn(size.widths), d[0], d[2], size.epochs, 0, say)
    teacher_acc = accuracy(teacher, d[1], d[3])
    with tempfile.TemporaryDirectory(prefix="edgeship-compression-") as tmp:
        a = pruning(size, Path(tmp), teacher, d, say)
    b = distillation(size, teacher, d, say)
    for line in report(a, b, teacher_acc, size):
        print(line)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps({"machine": describe(), "pruning": a, "distillation": b}, indent=2, default=str)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
