"""The accuracy budget search on a depthwise-separable (MobileNet-style) CNN: every candidate and the winner.

Model: scikit-learn's digits upsampled to 32x32 (bilinear), a stem convolution and four
depthwise-separable blocks (depthwise 3x3 + pointwise 1x1, batch norm, ReLU6), global mean,
linear head; trained deterministically on the CPU (seed 0). Depthwise layers are the classic
case where one int8 scale per tensor hurts: each channel has its own range.

For each target (TFLite ``android-arm64``, ONNX Runtime ``linux-x86_64``), ``compile_model``
runs with ``--max-accuracy-drop`` (default 0.5 points) on the 360 held-out test images (labels),
calibrated on 256 training images, then again with ``--min-cosine`` (default 0.999), which int8
misses; it prints every candidate tried (size, accuracy drop, cosine,
host latency on one thread, verdict), the winner and why. The plain baseline is the first
candidate itself: post-training int8 with the emitter's defaults.

Reproduce::

    cd /work/main && .venv/bin/python -m benchmarks.compile_budget [--max-drop 0.5] [--targets android-arm64,linux-x86_64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import machine


def mobilenet_style(width: int = 16) -> Any:
    import torch
    from torch import nn

    def block(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False),
            nn.BatchNorm2d(cin),
            nn.ReLU6(),
            nn.Conv2d(cin, cout, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU6(),
        )

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, width, 3, 2, 1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU6(),
                block(width, 2 * width, 1),
                block(2 * width, 4 * width, 2),
                block(4 * width, 4 * width, 1),
                block(4 * width, 8 * width, 2),
            )
            self.head = nn.Linear(8 * width, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.features(x).mean((2, 3)))  # not AdaptiveAvgPool2d: see docs/compiler.md

    return Net()


def digits_32() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    import torch

    from examples.digits import load_data

    x_train, x_test, y_train, y_test = load_data()

    def up(x: np.ndarray) -> np.ndarray:
        t = torch.nn.functional.interpolate(torch.from_numpy(x), size=(32, 32), mode="bilinear", align_corners=False)
        return t.numpy().astype(np.float32)

    return up(x_train), up(x_test), y_train, y_test


def train(x: np.ndarray, y: np.ndarray, epochs: int = 12, seed: int = 0) -> Any:
    import torch

    torch.manual_seed(seed)
    model = mobilenet_style()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
    return model.eval()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-drop", type=float, default=0.5, help="accuracy budget, points")
    parser.add_argument("--min-cosine", type=float, default=0.999, help="cosine budget of the second run")
    parser.add_argument("--targets", default="android-arm64,linux-x86_64")
    parser.add_argument("--latency-runs", type=int, default=50)
    args = parser.parse_args(argv)
    machine.single_thread_env()
    import torch

    from edgeship.compiler import Dataset, Recipe, compile_model, from_module
    from edgeship.compiler.search.budget import Budget
    from edgeship.runtime.package import generate_key

    torch.set_num_threads(1)
    print(f"machine: {machine.describe()}")
    start = time.perf_counter()
    x_train, x_test, y_train, y_test = digits_32()
    model = train(x_train, y_train)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    params = sum(p.numel() for p in model.parameters())
    print(
        f"model: MobileNet-style CNN, {params:,} parameters, digits 32x32; fp32 PyTorch accuracy {acc:.4f} "
        f"on {len(y_test)} test images (trained in {time.perf_counter() - start:.1f} s)"
    )
    source = from_module(model, x_test[:1], input_names=["image"], output_names=["logits"])
    recipe = Recipe.from_dict({"name": "mobilenet-digits", "validation": {"latency_runs": args.latency_runs}})
    budgets = [Budget(max_accuracy_drop=args.max_drop), Budget(min_cosine=args.min_cosine)]
    with tempfile.TemporaryDirectory(prefix="edgeship-budget-") as tmp:
        for n, (budget, target) in enumerate((b, t) for b in budgets for t in args.targets.split(",")):
            began = time.perf_counter()
            report = compile_model(
                source,
                [target],
                Path(tmp) / f"{n}-{target}",
                generate_key(),
                recipe=recipe,
                calibration=Dataset({"image": x_train[:256]}),
                evaluation=Dataset({"image": x_test}, labels=y_test),
                budget=budget,
            )
            found = report.searches[target]
            print(f"\n{target}: budget {found['budget']}; search took {time.perf_counter() - began:.0f} s")
            print(f"  {'candidate':<52} {'KiB':>7} {'drop pts':>8} {'cos min':>8} {'ms':>7}  verdict")
            for t in found["trials"]:
                verdict = "WINNER" if t["name"] == found["winner"] else t["verdict"]
                print(
                    f"  {t['name']:<52} {t['size_bytes'] / 1024:7.1f} {_f(t['accuracy_drop'], 2):>8} "
                    f"{_f(t['cosine'], 5):>8} {_f(t['latency_ms'], 3):>7}  {verdict}"
                )
            if found["not_tried"]:
                print(f"  not tried: {', '.join(found['not_tried'])}")
            print(f"  {found['reason']}")
    return 0


def _f(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    raise SystemExit(main())
