"""MiniLM static int8 with and without outlier smoothing (``quantize.smooth``), side by side.

all-MiniLM-L6-v2 exactly as ``benchmarks/compile_quality.py`` builds it (token embeddings, sequence
128, padding zeroed; 256 recombined calibration sentences; the 66 held-out sentences), once as is
("plain") and once after the ``quantize.smooth`` pass ("smoothed", SmoothQuant with ``--alpha`` on
``--layers``); with ``--qat`` also "smoothed+qat": ``quantize.qat`` at its defaults after smoothing
(training on the calibration sentences), its trained ranges carried into ONNX int8-qdq, TFLite
int8-static and Core ML w8a8 as the emitters carry them. Each is quantized with the quantizers the
emitters ship:

* ONNX Runtime int8-qdq (static Q/DQ, MinMax) and int8-dynamic: all-int8 cosine, then the layer search
  (``search.fronts.choose``, fallback auto, aiming at 0.995 + ``--margin`` on the calibration sentences)
  and how many of the quantizable nodes it sets apart; the search's artifact measured on held-out data;
* TFLite int8-static (ai-edge-quantizer, global min/max): all-int8 cosine (``--tflite-search``
  also runs its layer search: about 13 minutes per configuration here);
* Core ML w8a8 (``--coreml``): the Core ML emitter, activation ranges from ``--coreml-samples``
  calibration sentences, run through the numpy reference evaluator; all int8, then with the w8a8
  layer search (``min_cosine``, the input activations of the ops it sets apart stay float);
* host latency on one thread of every ONNX artifact, interleaved (as compile_quality measures it),
  against the plain fp32 model.

Cosine: per held-out sentence over the whole 128x384 output, to the plain fp32 model, the worst
sentence ("cos min", what the goal checks). Reproduce::

    cd /work/main && .venv/bin/python -m benchmarks.minilm_int8 [--qat] [--coreml] [--tflite-search] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import compile_quality as cq
from benchmarks import machine

TARGET = cq.TARGET_COSINE


def smooth_module(
    case: cq.Case, alpha: float | str, layers: str, qat: bool = False
) -> tuple[Any, list[dict[str, Any]]]:
    """The case's module after ``quantize.smooth`` (and ``quantize.qat`` at its defaults when ``qat``)
    calibrated on the case's calibration sentences; with the passes' report entries."""
    from edgeship.compiler import Dataset, Recipe
    from edgeship.compiler.passes import run_passes

    recipe = Recipe.from_dict(
        {
            "passes": ["quantize.smooth", *(["quantize.qat"] if qat else [])],
            "quantize": {"smooth": {"alpha": alpha, "layers": layers}},
        }
    )
    working = run_passes(
        _source(case, case.module),
        [(step.name, step.settings) for step in recipe.passes],
        calibration=Dataset(dict(case.calibration)),
    )
    return working.module, list(working.history)


def _source(case: cq.Case, module: Any) -> Any:
    from edgeship.compiler import from_module

    return from_module(
        module,
        tuple(case.evaluation[k][:1] for k in case.input_names),
        input_names=case.input_names,
        output_names=[case.output_name],
    )


def build_rows(
    case: cq.Case,
    config: str,
    module: Any,
    work: Path,
    args: argparse.Namespace,
    say: Callable[[str], None],
    ranges: dict[str, list[float]] | None = None,
) -> list[cq.Row]:
    """Every artifact of one configuration (plain, smoothed or smoothed+qat), not yet measured.
    ``ranges``: what ``quantize.qat`` trained each layer's input with, carried into ONNX int8-qdq,
    TFLite int8-static and Core ML w8a8 as the emitters carry them. The ONNX and TFLite layer
    searches aim at the case's own fp32 model, not at ``module`` (QAT changed its weights); the
    Core ML one, inside ``emit_coreml``, aims at ``module``."""
    import torch

    from edgeship.compiler.emitters.onnx import _drop_value_info, export_fp32
    from edgeship.compiler.emitters.tflite import _convert
    from edgeship.compiler.quantizers import carried_ranges
    from edgeship.compiler.quantizers.onnx import OnnxQuantizer, layer_inputs
    from edgeship.compiler.quantizers.tflite import TFLiteQuantizer, tflite_candidates, tflite_layer_inputs
    from edgeship.compiler.search.fronts import choose, onnx_float_nodes, tflite_float_ops

    work.mkdir(parents=True, exist_ok=True)
    source = _source(case, module)
    feeds = [case.feed(i, case.calibration) for i in range(len(case.calibration["input_ids"]))]
    with torch.no_grad():
        refs = [
            {case.output_name: case.module(*(torch.from_numpy(f[k]) for k in case.input_names)).numpy()} for f in feeds
        ]
    rows: list[cq.Row] = []

    def row(fmt: str, precision: str, route: str, path: Path, t0: float, **extra: Any) -> cq.Row:
        r = cq.Row(case.name, fmt, precision, config, route, artifact=str(path), compile_s=time.perf_counter() - t0)
        r.size_bytes = cq.artifact_bytes(path)
        for k, v in extra.items():
            setattr(r, k, v)
        rows.append(r)
        return r

    say(f"  {config}: ONNX export")
    t0 = time.perf_counter()
    fp32 = work / "fp32.onnx"
    export_fp32(source, fp32)
    _drop_value_info(fp32)
    row("onnx", "fp32", "torch.onnx", fp32, t0)
    for precision in ("int8-qdq", "int8-dynamic"):
        say(f"  {config}: ONNX {precision}")
        t0 = time.perf_counter()
        carried: dict[str, tuple[float, float]] = {}
        if ranges and precision == "int8-qdq":
            carried, note = carried_ranges(layer_inputs(fp32, ranges), ranges)
            say(f"  {config}: {note}")
        quantizer = OnnxQuantizer(
            precision, calibration=feeds if precision == "int8-qdq" else None, input_ranges=carried
        )
        out = work / f"{precision}.onnx"
        quantizer(fp32, out, [])
        row("onnx", precision, "all int8", out, t0)
        if precision == "int8-dynamic" and not args.search_dynamic:
            continue
        say(f"  {config}: ONNX {precision} layer search")
        t0 = time.perf_counter()
        found, used = choose(
            onnx_float_nodes, fp32, quantizer, feeds, refs, TARGET + args.margin, args.max_fraction,
            args.fallback,
        )  # fmt: skip
        mixed = work / f"{precision}-mixed.onnx"
        quantizer(fp32, mixed, list(found.kept_float))
        candidates = len(quantizer.candidates(fp32))
        r = row(
            "onnx", precision, f"layer search ({used})", mixed, t0, kept_float=list(found.kept_float), fallback=used
        )
        r.notes.append(f"set apart {len(found.kept_float)} of {candidates}; {found.summary()}")
    say(f"  {config}: TFLite convert + int8-static")
    t0 = time.perf_counter()
    tfl32 = work / "fp32.tflite"
    with cq._chatter_to(work / "convert.log"):
        _convert(source, tfl32, "android-arm64")
    row("tflite", "fp32", "litert-torch", tfl32, t0)
    carried_t: dict[str, tuple[float, float]] = {}
    if ranges:
        carried_t, note = carried_ranges(tflite_layer_inputs(tfl32, module, ranges), ranges)
        say(f"  {config}: {note}")
    quantizer_t = TFLiteQuantizer("int8-static", calibration=feeds, input_ranges=carried_t)
    static = work / "int8-static.tflite"
    quantizer_t(tfl32, static, [])
    row("tflite", "int8-static", "all int8", static, t0)
    say(f"  {config}: TFLite w8a16")
    t0 = time.perf_counter()
    quantizer_16 = TFLiteQuantizer("w8a16", calibration=feeds)
    w8a16 = work / "w8a16.tflite"
    quantizer_16(tfl32, w8a16, [])
    r = row("tflite", "w8a16", "int16 activations", w8a16, t0)
    wide = quantizer_16.wide_ops(tfl32)
    quantized = len(tflite_candidates(tfl32, quantizer_16.recipe()))
    r.notes.append(f"{len(wide)} of the {quantized} ops w8a16 quantizes left float (a tensor wider than +-1000)")
    if args.tflite_search:
        t0 = time.perf_counter()
        found, used = choose(
            tflite_float_ops, tfl32, quantizer_t, feeds, refs, TARGET + args.margin, args.max_fraction,
            args.fallback,
        )  # fmt: skip
        mixed = work / "int8-static-mixed.tflite"
        quantizer_t(tfl32, mixed, list(found.kept_float))
        candidates = len(quantizer_t.candidates(tfl32))
        r = row("tflite", "int8-static", f"layer search ({used})", mixed, t0, kept_float=list(found.kept_float))
        r.notes.append(f"set apart {len(found.kept_float)} of {candidates}; {found.summary()}")
    if args.coreml:
        from edgeship.compiler import coreml
        from edgeship.compiler.coreml.emit import emit_coreml

        coreml.register()

        searches: list[tuple[str, str, dict[str, Any]]] = [
            ("w8a8", "coremltools, reference evaluator", {}),
            ("w8a8-mixed", "layer search, reference evaluator",
             {"min_cosine": TARGET + args.margin, "max_float_fraction": args.max_fraction}),
        ]  # fmt: skip
        for name, route, search in searches:
            say(f"  {config}: Core ML {route} ({args.coreml_samples} calibration sentences)")
            t0 = time.perf_counter()
            path = work / f"{name}.mlpackage"
            with cq._chatter_to(work / "coreml.log"):
                result = emit_coreml(
                    module,
                    tuple(torch.from_numpy(case.evaluation[k][:1]) for k in case.input_names),
                    case.input_names,
                    [case.output_name],
                    "w8a8",
                    "iOS17",
                    path,
                    calibration=feeds[: args.coreml_samples],
                    trained_ranges=ranges,
                    **search,
                )
            r = row("coreml", "w8a8", route, path, t0)
            if result.search is not None:
                found = result.search
                r.kept_float = list(found.kept_float)
                r.notes.append(f"set apart {len(found.kept_float)} of {found.candidates}; {found.summary()}")
    return rows


def table(rows: Sequence[cq.Row], fp32_ms: dict[str, float]) -> list[str]:
    """The rows as markdown; latency as a ratio to the fp32 artifact of the same format (plain when built)."""
    lines = [
        "| config | format | precision | route | cos min | cos mean | sentence cos min | set apart | ms (1 thread) | x fp32 |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        apart = next((n.split(";")[0].removeprefix("set apart ") for n in r.notes if n.startswith("set apart")), "")
        base = fp32_ms.get(r.format)
        ratio = f"{r.latency_ms / base:.2f}" if r.latency_ms and base else ""
        lines.append(
            f"| {r.path} | {r.format} | {r.precision} | {r.route} | {cq._fmt(r.cos_min, 4)} | {cq._fmt(r.cos_mean, 4)} "
            f"| {cq._fmt(r.sentence_cos_min, 4)} | {apart} | {cq._fmt(r.latency_ms, 2)} | {ratio} |"
            + (f" error: {r.error}" if r.error else "")
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--alpha",
        type=lambda v: v if v == "auto" else float(v),
        default=None,
        help="SmoothQuant migration strength (0..1, or auto); default: the pass's",
    )
    parser.add_argument("--layers", default="layernorm", help="layernorm (Linears fed by a LayerNorm) or all")
    parser.add_argument("--margin", type=float, default=0.001, help="layer search target = 0.995 + margin")
    parser.add_argument(
        "--max-fraction", type=float, default=0.10, help="share of layers the search may set apart (the goal: 10 %%)"
    )
    parser.add_argument("--coreml", action="store_true", help="also Core ML w8a8 through the reference evaluator")
    parser.add_argument("--coreml-samples", type=int, default=64)
    parser.add_argument("--tflite-search", action="store_true", help="also the TFLite int8-static layer search (slow)")
    parser.add_argument("--search-dynamic", action="store_true", help="also the ONNX int8-dynamic layer search")
    parser.add_argument("--fallback", default="weight-only", help="layers set apart: weight-only, float or auto")
    parser.add_argument(
        "--qat",
        action="store_true",
        help="also smoothed+qat: quantize.qat at its defaults after smoothing, its trained ranges carried",
    )
    parser.add_argument("--only", choices=("plain", "smoothed", "smoothed+qat"), help="build one configuration")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of interleaved ONNX latency")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    if args.alpha is None:
        from edgeship.compiler.passes import get

        args.alpha = get("quantize.smooth").settings["alpha"].default
    machine.single_thread_env()
    import torch

    torch.set_num_threads(1)
    started = time.perf_counter()

    def say(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="minilm-int8-"))
    say(f"machine: {machine.describe()}; work in {work}")
    case = cq.minilm_case()
    rows: list[cq.Row] = []
    entry: dict[str, Any] | None = None
    qat_entry: dict[str, Any] | None = None
    # Smoothed first: its figures are the new ones; each configuration is measured and printed as it ends.
    configs = ("smoothed", *(("smoothed+qat",) if args.qat else ()), "plain")
    for config in configs:
        if args.only and config != args.only:
            continue
        module = case.module
        ranges = None
        if config.startswith("smoothed"):
            if config == "smoothed+qat":
                say("  quantize.smooth + quantize.qat (training on the calibration sentences)")
            module, history = smooth_module(case, args.alpha, args.layers, qat=config == "smoothed+qat")
            entry = history[0]
            say(f"  smoothed {entry['layers']} Linears; outlier ratio {entry['outlier_ratio_before']} -> "
                f"{entry['outlier_ratio_after']}; fp32 output change {entry['fp32_output_change']:.1e}")  # fmt: skip
            if config == "smoothed+qat":
                qat_entry = {k: v for k, v in history[1].items() if k != "ranges"}
                ranges = history[1]["ranges"]
                say(f"  quantize.qat: {qat_entry}")
        with cq._quiet_warnings():
            built = build_rows(case, config, module, work / config.replace("+", "-"), args, say, ranges)
        cq.measure_quality(case, built, say)
        rows += built
        print("\n".join(table(built, {})), flush=True)
        for r in built:
            for note in r.notes:
                print(f"  {r.path} {r.format} {r.precision} {r.route}: {note}", flush=True)
    cq.measure_latency(case, [r for r in rows if r.format in ("onnx", "tflite")], args.seconds, 0.25, say)
    fp32_ms: dict[str, float] = {}  # per format, the plain model's fp32 when it was built
    for r in rows:
        if r.precision == "fp32" and r.latency_ms and (r.format not in fp32_ms or r.path == "plain"):
            fp32_ms[r.format] = r.latency_ms
    print(f"MiniLM static int8, plain vs quantize.smooth (alpha {args.alpha}, layers {args.layers})")
    print(f"machine: {machine.describe()}")
    if qat_entry:
        print(f"quantize.qat: {qat_entry}")
    if entry:
        print(f"smoothing: {entry['layers']} Linears, outlier ratio (max/median channel) {entry['outlier_ratio_before']} "
              f"-> {entry['outlier_ratio_after']}, fp32 output change {entry['fp32_output_change']:.1e}")  # fmt: skip
    print("\n".join(table(rows, fp32_ms)))
    for r in rows:
        for note in r.notes:
            print(f"  {r.path} {r.format} {r.precision} {r.route}: {note}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine.describe(),
                    "smoothing": entry,
                    "qat": qat_entry,
                    "rows": [r.__dict__ for r in rows],
                },
                indent=2,
                default=str,
            )
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
