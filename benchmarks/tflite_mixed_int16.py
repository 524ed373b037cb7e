"""Can TFLite int8-static of all-MiniLM-L6-v2 reach cosine 0.995 with int16 activations on a few ops?

Issue 11 asks for MiniLM static int8 at cosine >= 0.995 with at most 10 % of the quantizable layers
set apart. Setting layers apart in float does not get TFLite there (docs/benchmarks.md): its int8
fully connected kernel writes an int8 output, so the residual stream is rounded to one int8 scale
per tensor whatever stays float, and that stream carries outlier channels. ai-edge-quantizer can mix
int8 and int16 (16x8) activations per op: a requantize goes where the two meet, and LiteRT runs the
result. This measures that route, op groups picked by the scopes litert-torch gives MiniLM's modules:

* ``int8``: every op int8-static (edgeship's ``TFLiteQuantizer("int8-static")``: global min/max).
* ``residual-int16``: int16 activations on the residual stream: the residual and embedding ADDs and
  every op of the 13 LayerNorms.
* ``residual+ffn-out-int16``: also the 6 FFN output fully connected ops (their outputs reach +-192
  and feed the residual ADD).
* ``all-int16``: every op int16 (TFLite's 16x8 mode, ``w8a16`` in edgeship).
* ``matmuls-int8``: the reverse question, whether int8 on the 48 matrix multiplies alone (36 fully
  connected, 12 batch matmuls; ONNX Runtime's Q/DQ route quantizes these and nothing else) can hold
  0.995 when every other op keeps 16 bits: int16 everywhere but there. TFLite gives an int8 fully
  connected op an int8 output, so this rounds what each one writes too.
* ``matmuls-int8-but-projections``: the same with the 12 projections that write into the residual
  stream (attention output and FFN output) int16 as well: 25 % of the matrix multiplies set apart.

In every int16 variant the attention mask ADD, SOFTMAX and SQUARED_DIFFERENCE stay float: the
mask (-10,000) takes a whole int16 range SOFTMAX reads again, and ai-edge-quantizer has no int16
SQUARED_DIFFERENCE (the LayerNorm variance), so it would stay int8 there, worst sentence 0.72.

Printed per variant: the worst and mean cosine of the token embeddings to fp32 PyTorch over the
held-out sentences of ``benchmarks.compile_quality``, how many ops are int8, int16 or float, and the
median latency in the LiteRT interpreter (1 thread, one sentence) next to fp32's, as a ratio.

Reproduce::

    cd /work/main && .venv/bin/python -m benchmarks.tflite_mixed_int16 [--quick] [--json OUT]

Full size: the 256 calibration and 66 held-out sentences of ``compile_quality``, 50 timed runs
(about 4.5 min here). ``--quick`` (CI size): 8 calibration and 8 held-out sentences, 5 timed runs, no
all-int16; its numbers mean nothing beyond "the path runs". ``--smooth``: the
model after ``quantize.smooth`` at its defaults (cosines still to the plain fp32 model).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.machine import describe

#: ai-edge-quantizer's TensorType codes in the flatbuffer.
_FLOAT32, _INT16, _INT8 = 0, 7, 9
Selector = Callable[[str, str], bool]


def _owner(scope: str) -> str:
    """The module an op belongs to: the last ``/`` path of its ``;``-separated scope (litert-torch
    joins the names of fused ops, so a substring test would catch a neighbour's ops)."""
    parts = [p for p in scope.split(";") if "/" in p]
    return parts[-1] if parts else scope


#: How many ops of MiniLM-L6's fp32 TFLite each part of the groups below picks: 6 layers, 13
#: LayerNorms of 14 ops each (the squared difference among them). A part that picks another count
#: means litert-torch named the scopes otherwise, and the rows would measure something else.
EXPECTED_PARTS = {
    "residual_add": 12,
    "embedding_add": 1,
    "layer_norm": 13 * 14,
    "ffn_out": 6,
    "mask_add": 6,
    "softmax": 6,
    "squared_difference": 13,
    "matmul": 6 * 6 + 6 * 2,
    "residual_projection": 12,
}


def _parts() -> dict[str, Selector]:
    from edgeship.compiler.quantizers.tflite import _op_type

    def residual_add(key: str, scope: str) -> bool:
        return _op_type(key) == "ADD" and bool(
            re.search(
                r"(BertSelfOutput_output|BertOutput_output)/torch\.nn\.modules\.linear\.Linear_dense$", _owner(scope)
            )
        )

    def embedding_add(key: str, scope: str) -> bool:
        return _op_type(key) == "ADD" and "/" not in scope

    def layer_norm(key: str, scope: str) -> bool:
        return _op_type(key) not in ("FULLY_CONNECTED", "BATCH_MATMUL") and "LayerNorm" in _owner(scope)

    def ffn_out(key: str, scope: str) -> bool:
        return _op_type(key) == "FULLY_CONNECTED" and "BertOutput_output" in _owner(scope)

    def residual_projection(key: str, scope: str) -> bool:
        return _op_type(key) == "FULLY_CONNECTED" and bool(
            re.search(r"(BertSelfOutput_output|BertOutput_output)/", _owner(scope))
        )

    def mask_add(key: str, scope: str) -> bool:
        return _op_type(key) == "ADD" and "BertSelfAttention_self" in scope and "LayerNorm" not in scope

    return {
        "residual_add": residual_add,
        "embedding_add": embedding_add,
        "layer_norm": layer_norm,
        "ffn_out": ffn_out,
        "mask_add": mask_add,
        "softmax": lambda key, scope: _op_type(key) == "SOFTMAX",
        "squared_difference": lambda key, scope: _op_type(key) == "SQUARED_DIFFERENCE",
        "matmul": lambda key, scope: _op_type(key) in ("FULLY_CONNECTED", "BATCH_MATMUL"),
        "residual_projection": residual_projection,
    }


def _groups(parts: dict[str, Selector]) -> dict[str, Selector]:
    def pick(*names: str) -> Selector:
        return lambda key, scope: any(parts[n](key, scope) for n in names)

    float_ops = pick("mask_add", "softmax", "squared_difference")
    matmul, projection = parts["matmul"], parts["residual_projection"]
    return {
        "residual": pick("residual_add", "embedding_add", "layer_norm"),
        "ffn_out": pick("ffn_out"),
        "float": float_ops,
        "all": lambda key, scope: not float_ops(key, scope),
        "all-but-matmuls": lambda key, scope: not float_ops(key, scope) and not matmul(key, scope),
        "residual-projections": projection,
    }


def check_parts(ops: list[tuple[str, str]], parts: dict[str, Selector]) -> None:
    """Raise unless each part picks as many of ``ops`` as ``EXPECTED_PARTS`` says."""
    found = {name: sum(1 for key, scope in ops if sel(key, scope)) for name, sel in parts.items()}
    if found != EXPECTED_PARTS:
        raise RuntimeError(f"the op groups picked {found} of MiniLM's ops; expected {EXPECTED_PARTS}")


#: variant: (groups given int16 activations). The int16 variants leave the "float" group float.
VARIANTS: dict[str, tuple[str, ...]] = {
    "int8": (),
    "residual-int16": ("residual",),
    "residual+ffn-out-int16": ("residual", "ffn_out"),
    "all-int16": ("all",),
    "matmuls-int8": ("all-but-matmuls",),
    "matmuls-int8-but-projections": ("all-but-matmuls", "residual-projections"),
}


def build(
    fp32: Path, ops: list[tuple[str, str]], out: Path, quantizer: Any, int16: Selector, float_ops: Selector
) -> None:
    """``quantizer``'s int8-static recipe, plus int16 activations (the op config of
    ``static_wi8_ai16``, which edgeship's ``w8a16`` ships) for the ``ops`` ``int16`` picks and none
    for those ``float_ops`` picks (one int16 entry per op type: ai-edge-quantizer keys them so)."""
    from ai_edge_quantizer import algorithm_manager, qtyping, recipe
    from ai_edge_quantizer import quantizer as aeq

    from edgeship.compiler.quantizers.tflite import _left_float, _op_type

    q = aeq.Quantizer(str(fp32), quantizer.recipe())
    config = qtyping.OpQuantizationConfig.from_dict(recipe.static_wi8_ai16()[0]["op_config"])
    by_type: dict[str, list[str]] = {}
    for key, scope in ops:
        if int16(key, scope):
            by_type.setdefault(key, []).append(scope)
    for key, scopes in by_type.items():
        try:
            q.update_quantization_recipe(
                regex="^(?:" + "|".join(re.escape(s) for s in dict.fromkeys(scopes)) + ")$",
                operation_name=key,
                op_config=config,
                algorithm_key=algorithm_manager.AlgorithmName.MIN_MAX_UNIFORM_QUANT,
            )
        except ValueError:  # no int16 policy for this op type
            # SQUARED_DIFFERENCE: the float entry below takes it. EMBEDDING_LOOKUP keeps the
            # int8 recipe's entry (int8 table, float rows out).
            if _op_type(key) not in ("SQUARED_DIFFERENCE", "EMBEDDING_LOOKUP"):
                raise
    _left_float(q, [scope for key, scope in ops if float_ops(key, scope)])
    q.quantize(quantizer._calibrate(fp32), enable_progress_report=False).export_model(str(out), overwrite=True)


def op_census(path: Path) -> dict[str, int]:
    """Ops by the activations they compute on: int8, int16, float, and the (re)quantize ops between."""
    from ai_edge_litert.schema_py_generated import BuiltinOperator
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    model = fb.read_model(path.read_bytes())
    subgraph = model.subgraphs[0]
    counts: Counter[str] = Counter()
    for op in subgraph.operators:
        code = model.operatorCodes[op.opcodeIndex]
        builtin = max(code.builtinCode, code.deprecatedBuiltinCode)
        types = {
            subgraph.tensors[i].type
            for i in [*op.inputs, *op.outputs]
            if i >= 0 and model.buffers[subgraph.tensors[i].buffer].data is None
        }
        if builtin in (BuiltinOperator.QUANTIZE, BuiltinOperator.DEQUANTIZE):
            counts["quantize/dequantize"] += 1
        elif _INT16 in types:
            counts["int16"] += 1
        elif _INT8 in types and _FLOAT32 not in types:
            counts["int8"] += 1
        else:
            counts["float"] += 1
    return dict(counts)


def measure(path: Path, case: Any, sentences: int, runs: int) -> dict[str, Any]:
    """Worst and mean cosine to fp32 PyTorch over ``sentences`` held-out sentences, and the median
    latency of one sentence (the bare LiteRT interpreter, 1 thread, as ``compile_quality`` times)."""
    from benchmarks.compile_quality import tflite_runner
    from edgeship.compiler.search.fronts import cosines

    runner = tflite_runner(path, case.input_names)
    got = [{"out": runner.run(case.feed(i))} for i in range(sentences)]
    cos = cosines(got, [{"out": case.reference[i : i + 1]} for i in range(sentences)])
    native = runner.prepare(case.feed(0))
    for _ in range(3):
        runner.call(native)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        runner.call(native)
        times.append(time.perf_counter() - start)
    return {"worst": float(cos.min()), "mean": float(cos.mean()), "ms": float(np.median(times) * 1e3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI size: 8 + 8 sentences, 5 runs, no all-int16")
    parser.add_argument(
        "--smooth", action="store_true", help="quantize.smooth (its defaults) first; cosines still to the plain fp32"
    )
    parser.add_argument("--json", type=Path, help="write the rows here")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import litert_torch
    import torch

    from benchmarks.compile_quality import minilm_case
    from edgeship.compiler.quantizers.tflite import TFLiteQuantizer, tflite_ops

    torch.set_num_threads(1)
    print(describe())
    start = time.time()
    case = minilm_case()
    module = case.module
    if args.smooth:
        from benchmarks.minilm_int8 import smooth_module
        from edgeship.compiler.passes import get

        defaults = get("quantize.smooth").settings
        module, history = smooth_module(case, defaults["alpha"].default, defaults["layers"].default)
        print(
            f"quantize.smooth: {history[0]['layers']} Linears, fp32 output change {history[0]['fp32_output_change']:.1e}"
        )
    calibration, sentences, runs = (8, 8, 5) if args.quick else (len(case.calibration["input_ids"]), case.samples, 50)
    variants = [v for v in VARIANTS if not (args.quick and v == "all-int16")]
    parts = _parts()
    groups = _groups(parts)
    feeds = [case.feed(i, case.calibration) for i in range(calibration)]
    quantizer = TFLiteQuantizer("int8-static", calibration=feeds)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgeship-mixed-") as tmp:
        fp32 = Path(tmp) / "fp32.tflite"
        example = tuple(torch.from_numpy(case.evaluation[k][:1]) for k in case.input_names)
        litert_torch.convert(module, example).export(str(fp32))
        ops = [(key, scope) for key, scope, _ in tflite_ops(fp32)]
        check_parts(ops, parts)
        base = measure(fp32, case, sentences, runs)
        model = "MiniLM-L6 TFLite" + (" (smoothed)" if args.smooth else "")
        print(f"{model}, {calibration} calibration / {sentences} held-out sentences, {runs} timed runs")
        print(f"{'variant':30} {'cosine worst':>12} {'mean':>8} {'int8':>5} {'int16':>5} {'float':>5} {'(de)q':>5} "
              f"{'ms':>8} {'vs fp32':>8}")  # fmt: skip
        print(f"{'fp32':30} {base['worst']:12.4f} {base['mean']:8.4f} {'':>5} {'':>5} {'':>5} {'':>5} "
              f"{base['ms']:8.1f} {1.0:7.2f}x")  # fmt: skip
        for name in variants:
            chosen = VARIANTS[name]
            out = Path(tmp) / f"{name}.tflite"

            def picks(key: str, scope: str, chosen: tuple[str, ...] = chosen) -> bool:
                return any(groups[g](key, scope) for g in chosen)

            if chosen:
                build(fp32, ops, out, quantizer, picks, groups["float"])
            else:
                quantizer(fp32, out, [])  # int8-static as the TFLite emitter ships it
            row = {"variant": name, **measure(out, case, sentences, runs), "ops": op_census(out)}
            row["latency_vs_fp32"] = row["ms"] / base["ms"]
            census = row["ops"]
            print(f"{name:30} {row['worst']:12.4f} {row['mean']:8.4f} {census.get('int8', 0):5d} {census.get('int16', 0):5d} "
                  f"{census.get('float', 0):5d} {census.get('quantize/dequantize', 0):5d} {row['ms']:8.1f} "
                  f"{row['latency_vs_fp32']:7.2f}x")  # fmt: skip
            rows.append(row)
    print(f"({time.time() - start:.0f} s)")
    if args.json:
        args.json.write_text(json.dumps({"smooth": args.smooth, "fp32": base, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
