"""What carrying ``quantize.qat``'s ranges into the artifact changes, per static-int8 format.

The digits CNN of the passes' tests (``examples.digits.residual_cnn``: convolutions with a
BatchNorm, a residual block, a concat, two Linears) is trained per seed, fine-tuned by
``quantize.qat`` at its defaults on 256 calibration images, and emitted by each static-int8 emitter twice from the same tuned model: once with the pass's report entry (the
emitter quantizes each layer's input with the range the pass trained with) and once without it
(the emitter calibrates the tuned model again on the same 256 images, min/max). Printed per format
and seed: the int8 error on the 360 held-out images, 1 - cosine of the logits to the fp32 model
before QAT, worst and mean. ONNX int8-qdq and TensorRT's Q/DQ ONNX run in ONNX Runtime, TFLite
int8-static in LiteRT (both through the runtime Session, as the layer search scores candidates),
Core ML w8a8 in the numpy reference evaluator of the MIL program.

What this does not measure: speed (the ranges change no kernel), nor TensorRT or Core ML on their
devices.

Reproduce::

    cd /work/main && .venv/bin/python -m benchmarks.qat_ranges [--seeds 0 1 2] [--quick] [--json OUT]

``--quick`` (CI size): one seed, 64 held-out images; its numbers mean nothing beyond "the path runs".
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import describe

#: (target, precision): one per static-int8 emitter.
FORMATS = [
    ("linux-x86_64", "int8-qdq"),
    ("android-arm64", "int8-static"),
    ("jetson-orin-nano", "int8-qdq"),
    ("ios17", "w8a8"),
]
CALIBRATION = 256


def errors(got: np.ndarray, want: np.ndarray) -> tuple[float, float]:
    """1 - cosine per sample (the layer search's ``cosines``): (worst, mean)."""
    from edgeship.compiler.search.fronts import cosines

    err = 1 - cosines([{"logits": got}], [{"logits": want}])
    return float(err.max()), float(err.mean())


def run_artifact(fmt: str, path: Path, x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The artifact's logits for each image of ``x``, one at a time."""
    if fmt == "coreml":
        from edgeship.compiler.coreml.reference import ReferenceEvaluator

        evaluator = ReferenceEvaluator(path)
        return np.concatenate([evaluator.run({"image": x[i : i + 1]})["logits"] for i in range(len(x))])
    from edgeship.compiler.search.fronts import open_candidate

    with open_candidate(path, {"image": x[:1]}, {"logits": reference[:1]}, threads=1) as session:
        return np.concatenate([np.asarray(session.run({"image": x[i : i + 1]})["logits"]) for i in range(len(x))])


def measure(seed: int, held_out: int, work: Path, say: Any) -> list[dict[str, Any]]:
    import torch

    from edgeship import targets
    from edgeship.compiler import Dataset, Recipe, from_module
    from edgeship.compiler.emitters import get
    from edgeship.compiler.emitters.base import EmitRequest
    from edgeship.compiler.passes import run_passes
    from examples.digits import fit, load_data, residual_cnn

    x_train, x_test, y_train, _ = load_data()
    x_test = x_test[:held_out]
    torch.manual_seed(seed)
    model = fit(residual_cnn(), x_train, y_train, epochs=10, seed=seed)
    with torch.no_grad():
        want = model(torch.from_numpy(x_test)).numpy()
    source = from_module(model, x_test[:1], input_names=["image"], output_names=["logits"])
    calibration = Dataset({"image": x_train[:CALIBRATION]})
    steps = [(s.name, s.settings) for s in Recipe.from_dict({"passes": ["quantize.qat"]}).passes]
    working = run_passes(source, steps, calibration=calibration, seed=seed)
    entry, tuned = working.history[-1], working.as_source()
    rows = []
    for target, precision in FORMATS:
        profile = targets.get(target)
        row: dict[str, Any] = {"seed": seed, "target": target, "format": profile.format, "precision": precision}
        for label, passes in (("recalibrated", ()), ("carried", (entry,))):
            workdir = work / f"{seed}-{target}-{label}"
            emitted = get(profile.format).emit(
                EmitRequest(tuned, profile, precision, workdir, calibration, Recipe(), passes)
            )
            path = workdir / "model.mlpackage" if profile.format == "coreml" else emitted.files[emitted.artifact]
            row[label] = errors(run_artifact(profile.format, path, x_test, want), want)
        say(
            f"seed {seed} {target} {precision}: recalibrated {row['recalibrated'][0]:.2e} / {row['recalibrated'][1]:.2e}, "
            f"carried {row['carried'][0]:.2e} / {row['carried'][1]:.2e}"
        )
        rows.append(row)
    return rows


def report(rows: list[dict[str, Any]], seeds: list[int], held_out: int) -> list[str]:
    lines = [
        f"quantize.qat ranges carried vs calibrated again; digits CNN, {CALIBRATION} calibration images, "
        f"{held_out} held out, seeds {seeds}",
        describe(),
        "int8 error = 1 - cosine of the logits to the fp32 model before QAT, worst / mean over the held-out images",
        "",
        "| format | precision | seed | calibrated again | QAT ranges carried | mean ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        (rw, rm), (cw, cm) = row["recalibrated"], row["carried"]
        lines.append(
            f"| {row['format']} | {row['precision']} | {row['seed']} | {rw:.2e} / {rm:.2e} | {cw:.2e} / {cm:.2e} "
            f"| {cm / rm:.2f} |"
        )
    for target, precision in FORMATS:
        mine = [r for r in rows if r["target"] == target]
        rm = float(np.mean([r["recalibrated"][1] for r in mine]))
        cm = float(np.mean([r["carried"][1] for r in mine]))
        lines.append(
            f"{target} {precision}: mean over seeds {rm:.3e} calibrated again, {cm:.3e} carried ({cm / rm:.2f}x)"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    parser.add_argument("--quick", action="store_true", help="CI size: one seed, 64 held-out images")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    seeds, held_out = ([args.seeds[0]], 64) if args.quick else (args.seeds, 360)
    started = time.perf_counter()

    def say(text: str) -> None:
        print(f"[{time.perf_counter() - started:6.1f} s] {text}", file=sys.stderr, flush=True)

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="edgeship-qat-ranges-") as tmp:
        for seed in seeds:
            rows += measure(seed, held_out, Path(tmp), say)
    print("\n".join(report(rows, seeds, held_out)))
    print(f"took {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
