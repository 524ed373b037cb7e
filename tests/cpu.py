"""What the test machine's CPU does to int8 results.

ONNX Runtime's integer kernels multiply u8 by s8 and, on x86 CPUs without VNNI (AVX2 only), add
pairs of products in int16, which saturates (the ``linux-x86_64`` profile's quirk). There the int8
error of a model is the saturation's more than the rounding's: the digits CNN's int8-qdq worst
held-out error was 0.046 (1 - cosine) on an AVX2-only AMD EPYC against below 0.003 on AVX-512
VNNI CPUs. Tests that measure int8 rounding itself run ONNX Runtime without its integer fusions
there (``ORT_OPTIMIZATION``: the Q/DQ arithmetic as the graph writes it) or widen their bounds.
"""

from __future__ import annotations

import platform

from benchmarks.machine import cpu

#: True on an x86 CPU whose int8 dot products saturate in ONNX Runtime (no AVX-512 VNNI or AVX-VNNI).
INT8_SATURATES = platform.machine().lower() in ("x86_64", "amd64") and not ({"avx512_vnni", "avx_vnni"} & set(cpu()[1]))


def ort_session_options():  # type: ignore[no-untyped-def]
    """ONNX Runtime session options that compute Q/DQ graphs as written where ``INT8_SATURATES``
    (``ORT_ENABLE_BASIC``: no QLinearConv / QGemm / MatMulIntegerToFloat fusions), the default elsewhere."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if INT8_SATURATES:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    return options
