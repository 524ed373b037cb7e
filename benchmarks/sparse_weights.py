"""What sparse weights buy in the artifacts: 2:4 and unstructured pruning, next to the unpruned model.

The CNN of benchmarks/compression.py (convolutions of 64-64-128-128 channels with BatchNorm, mean
pooling, one Linear; digits upsampled to 32x32) is compiled three times through ``compile_model``
for ``ios17`` (Core ML fp16) and ``jetson-orin-nano`` (TensorRT fp16): unpruned; with
``passes: [prune.sparse24]``; with ``passes: [prune.magnitude]`` (ratio 0.75, global). Both passes
fine-tune on the training images. Printed per artifact: weight bytes (the Core ML weight blob; the
ONNX initializers for TensorRT), the whole artifact's bytes, accuracy on the 360 test images (Core ML
through the numpy reference evaluator of the MIL program, TensorRT's ONNX through ONNX Runtime), and
for TensorRT whether ``build_spec.json`` asks for sparse kernels (``sparsity_2_4``).

What this does not measure: any latency. 2:4 kernels run only on an Ampere/Orin GPU's sparse tensor
cores, and Core ML's handling of sparse weights (decompressed at load, or kept sparse in memory) only on
Apple hardware; neither is here. The ONNX for TensorRT stays dense on disk (TensorRT reads dense weights
and finds the pattern itself), so its size does not change.

Reproduce::

    cd /work/main && .venv/bin/python -m benchmarks.sparse_weights [--quick] [--json OUT]

``--quick`` (CI size): 8-16 channels, one epoch; its numbers mean nothing beyond "the path runs".
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.compression import FULL, QUICK, THREAD_ENV, accuracy, cnn, data, train
from benchmarks.machine import describe

TARGETS = ["ios17", "jetson-orin-nano"]
RECIPES: dict[str, dict[str, Any]] = {
    "unpruned": {},
    "prune.sparse24": {"passes": ["prune.sparse24"], "prune": {"sparse24": {"lr": 1e-3}}},
    "prune.magnitude 0.75": {"passes": ["prune.magnitude"], "prune": {"magnitude": {"ratio": 0.75, "lr": 1e-3}}},
}


def compile_all(teacher: Any, d: tuple[Any, ...], epochs: int, work: Path, say: Any) -> dict[str, Any]:
    from edgeship.compiler import Dataset, Recipe, compile_model, from_module
    from edgeship.runtime.backends.tensorrt_spec import BuildSpec
    from edgeship.runtime.package import TrustedKeys, generate_key, unpack_package

    x_train, x_test, y_train, y_test = d
    key = generate_key()
    source = from_module(teacher, x_test[:1], input_names=["image"], output_names=["logits"])
    rows: dict[str, Any] = {}
    for label, extra in RECIPES.items():
        settings = json.loads(json.dumps(extra))
        for section in settings.get("prune", {}).values():
            section["epochs"] = epochs
        recipe = Recipe.from_dict(
            {
                "variants": {"ios17": ["fp16"], "jetson-orin-nano": ["fp16"]},
                "validation": {"latency_runs": 1},
                **settings,
            }
        )
        say(f"compiling: {label}")
        report = compile_model(
            source,
            TARGETS,
            work / label.replace(" ", "-"),
            key,
            recipe=recipe,
            training=Dataset({"image": x_train}, labels=y_train),
            evaluation=Dataset({"image": x_test}, labels=y_test),
            progress=lambda m: say(f"  {m}"),
        )
        entries = json.loads(report.report_json.read_text())["passes"]
        for v in report.variants:
            if v.error or v.package is None:
                raise SystemExit(f"{label} {v.target}: {v.error}")
            row: dict[str, Any] = {
                "weight_bytes": v.metrics.weight_bytes,
                "size_bytes": v.metrics.size_bytes,
                "accuracy": v.metrics.accuracy,
                "pass": entries[0] if entries else None,
            }
            if v.target.startswith("jetson"):
                out = work / f"unpacked-{label.replace(' ', '-')}"
                unpack_package(v.package, out, trusted_keys=TrustedKeys.of([key.public_key()]), durable=False)
                row["sparsity_2_4"] = BuildSpec.from_json((out / "model" / "build_spec.json").read_bytes()).sparsity_2_4
            rows[f"{label} | {v.target}"] = row
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CI size: tiny widths, one epoch")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    os.environ.update(THREAD_ENV)
    import torch

    torch.set_num_threads(1)
    size = QUICK if args.quick else FULL
    started = time.perf_counter()

    def say(msg: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f}s] {msg}", file=sys.stderr, flush=True)

    print(f"machine: {describe()}")
    d = data()
    say(f"training the CNN ({size.widths[0]}-{size.widths[0]}-{size.widths[1]}-{size.widths[1]} channels)")
    teacher = train(cnn(size.widths), d[0], d[2], size.epochs, 0, say)
    print(f"unpruned torch accuracy {accuracy(teacher, d[1], d[3]):.4f}")
    with tempfile.TemporaryDirectory(prefix="edgeship-sparse-") as tmp:
        rows = compile_all(teacher, d, size.fine_tune_epochs, Path(tmp), say)
    print("| model | target | weight bytes | vs unpruned | artifact bytes | accuracy | sparsity_2_4 |")
    print("|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        label, target = name.split(" | ")
        base = rows[f"unpruned | {target}"]["weight_bytes"]
        flag = row.get("sparsity_2_4", "-")
        print(
            f"| {label} | {target} | {row['weight_bytes']} | {row['weight_bytes'] / base:.2f}x | "
            f"{row['size_bytes']} | {row['accuracy']:.4f} | {flag} |"
        )
    for name, row in rows.items():
        if row["pass"] and name.endswith("ios17"):
            p = row["pass"]
            print(
                f"{p['pass']}: sparsity {p['sparsity']}, accuracy before {p['accuracy_before']:.4f}, "
                f"pruned {p['accuracy_pruned']:.4f}, after fine-tuning {p['accuracy_after']:.4f}"
            )
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"machine": describe(), "rows": rows}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
