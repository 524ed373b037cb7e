"""The built-in target profiles: the devices edgeship compiles for out of the box.

Where each fact comes from is in docs/targets.md. In short: Jetson and Apple figures are
NVIDIA's and Apple's published specifications; quirks and the tflite-runtime 2.14 op table
were measured here (shared FACTS of 2026-11-22, and the op table by loading probe models into
tflite-runtime 2.14.0; tests/test_targets.py repeats that probe when .venv-tflite exists).

Default precision (the first of ``precisions``), and why:
- Jetson (TensorRT): fp16. It runs on the tensor cores with half the memory traffic of fp32,
  needs no calibration data and keeps accuracy for nearly every model; int8-qdq is offered
  but needs calibration and an accuracy check, so it is never chosen silently.
- Core ML: fp16. The Neural Engine computes in fp16; an fp32 ML program stays on GPU and CPU.
- LiteRT and ONNX Runtime CPU: fp32. Conversion is exact (max abs 4.8e-6 on the digits CNN)
  and fp16 is no faster on these CPUs; the quantized precisions are faster (int8-dynamic 4-6x
  on MiniLM) but change numerics, so the user asks for them and the validator checks them.
"""

from __future__ import annotations

from edgeship.targets.profile import Quirk, TargetProfile

_FACTS = "shared FACTS.md, measured 2026-11-22"

# TensorRT refuses Q/DQ with a non-zero zero point, and TensorRT 10 deprecates (11 removes)
# implicit calibration: every TensorRT profile gets explicit symmetric Q/DQ only.
_QDQ_SYMMETRIC = Quirk(
    id="qdq-symmetric-only",
    text="TensorRT builds int8 only from explicit Q/DQ with zero point 0 (symmetric activations and "
    "weights); asymmetric Q/DQ, the default of some calibrators (onnxruntime's), is refused.",
    evidence="shared FACTS.md (2026-11-22), from TensorRT's documentation (no TensorRT runs here): 'Only "
    "symmetric activations (zero point 0) fit TensorRT'; TensorRT 10.1 deprecated implicit calibrators and "
    "11.x removed them, requiring explicit Q/DQ with zero points of 0.",
)

# tflite-runtime 2.14.0: the highest version of each builtin op its BuiltinOpResolver loads,
# 0 where it has no kernel at all (ops newer than 2.14: STABLEHLO_*, DILATE, REDUCE_WINDOW, ...).
# Measured: one probe model per (op, version 1..16) loaded with tflite_runtime.interpreter in
# .venv-tflite (numpy 1.26). The 20 common ops (CONV_2D ... GELU) also match AddBuiltin(...)
# in tensorflow/lite/core/kernels/register.cc (tensorflow/tensorflow at 0314b97f, a 2.14-era
# commit; the stored index has no copy at the v2.14.0 tag itself). Files from today's converters
# can need more: a PT2E dynamic-int8 model needs FULLY_CONNECTED 12, MiniLM needs GATHER_ND 5.
# fmt: off
TFLITE_RUNTIME_214_MAX_OP_VERSIONS: dict[str, int] = {
    "ABS": 5, "ADD": 5, "ADD_N": 1, "ARG_MAX": 3, "ARG_MIN": 3, "ASSIGN_VARIABLE": 1, "ATAN2": 1,
    "AVERAGE_POOL_2D": 3, "BATCH_MATMUL": 4, "BATCH_TO_SPACE_ND": 4, "BIDIRECTIONAL_SEQUENCE_LSTM": 3,
    "BIDIRECTIONAL_SEQUENCE_RNN": 3, "BITCAST": 1, "BITWISE_XOR": 1, "BROADCAST_ARGS": 1, "BROADCAST_TO": 3,
    "BUCKETIZE": 1, "CALL": 0, "CALL_ONCE": 1, "CAST": 5, "CEIL": 1, "COMPLEX_ABS": 1, "CONCATENATION": 4,
    "CONCAT_EMBEDDINGS": 0, "CONV_2D": 7, "CONV_3D": 1, "CONV_3D_TRANSPOSE": 1, "COS": 1, "CUMSUM": 1,
    "DENSIFY": 1, "DEPTHWISE_CONV_2D": 7, "DEPTH_TO_SPACE": 2, "DEQUANTIZE": 5, "DILATE": 0, "DIV": 2,
    "DYNAMIC_UPDATE_SLICE": 1, "ELU": 1, "EMBEDDING_LOOKUP": 3, "EMBEDDING_LOOKUP_SPARSE": 1, "EQUAL": 4,
    "EXP": 2, "EXPAND_DIMS": 1, "FAKE_QUANT": 2, "FILL": 4, "FLOOR": 1, "FLOOR_DIV": 3, "FLOOR_MOD": 2,
    "FULLY_CONNECTED": 10, "GATHER": 6, "GATHER_ND": 4, "GELU": 2, "GREATER": 2, "GREATER_EQUAL": 3,
    "HARD_SWISH": 1, "HASHTABLE": 1, "HASHTABLE_FIND": 1, "HASHTABLE_IMPORT": 1, "HASHTABLE_LOOKUP": 1,
    "HASHTABLE_SIZE": 1, "IF": 1, "IMAG": 1, "L2_NORMALIZATION": 2, "L2_POOL_2D": 1, "LEAKY_RELU": 2,
    "LESS": 3, "LESS_EQUAL": 2, "LOCAL_RESPONSE_NORMALIZATION": 1, "LOG": 1, "LOGICAL_AND": 1,
    "LOGICAL_NOT": 1, "LOGICAL_OR": 1, "LOGISTIC": 3, "LOG_SOFTMAX": 2, "LSH_PROJECTION": 1, "LSTM": 4,
    "MATRIX_DIAG": 1, "MATRIX_SET_DIAG": 1, "MAXIMUM": 4, "MAX_POOL_2D": 3, "MEAN": 3, "MINIMUM": 4,
    "MIRROR_PAD": 3, "MUL": 7, "MULTINOMIAL": 1, "NEG": 1, "NON_MAX_SUPPRESSION_V4": 1,
    "NON_MAX_SUPPRESSION_V5": 1, "NOT_EQUAL": 3, "ONE_HOT": 1, "PACK": 4, "PAD": 4, "PADV2": 4, "POW": 1,
    "PRELU": 1, "QUANTIZE": 3, "RANDOM_STANDARD_NORMAL": 1, "RANDOM_UNIFORM": 1, "RANGE": 2, "RANK": 1,
    "READ_VARIABLE": 1, "REAL": 1, "REDUCE_ALL": 1, "REDUCE_ANY": 1, "REDUCE_MAX": 3, "REDUCE_MIN": 3,
    "REDUCE_PROD": 2, "REDUCE_WINDOW": 0, "RELU": 3, "RELU6": 3, "RELU_0_TO_1": 1, "RELU_N1_TO_1": 1,
    "RESHAPE": 1, "RESIZE_BILINEAR": 4, "RESIZE_NEAREST_NEIGHBOR": 4, "REVERSE_SEQUENCE": 1, "REVERSE_V2": 3,
    "RFFT2D": 1, "RIGHT_SHIFT": 1, "RNN": 3, "ROUND": 1, "RSQRT": 2, "SCATTER_ND": 1, "SEGMENT_SUM": 1,
    "SELECT": 4, "SELECT_V2": 2, "SHAPE": 1, "SIGN": 2, "SIN": 1, "SKIP_GRAM": 1, "SLICE": 6, "SOFTMAX": 3,
    "SPACE_TO_BATCH_ND": 4, "SPACE_TO_DEPTH": 2, "SPARSE_TO_DENSE": 3, "SPLIT": 4, "SPLIT_V": 2, "SQRT": 1,
    "SQUARE": 1, "SQUARED_DIFFERENCE": 2, "SQUEEZE": 2, "STABLEHLO_ABS": 0, "STABLEHLO_ADD": 0,
    "STABLEHLO_AND": 0, "STABLEHLO_BROADCAST_IN_DIM": 0, "STABLEHLO_CASE": 0, "STABLEHLO_CBRT": 0,
    "STABLEHLO_CLAMP": 0, "STABLEHLO_COMPARE": 0, "STABLEHLO_COMPOSITE": 0, "STABLEHLO_CONCATENATE": 0,
    "STABLEHLO_CONVERT": 0, "STABLEHLO_CONVOLUTION": 0, "STABLEHLO_COSINE": 0, "STABLEHLO_CUSTOM_CALL": 0,
    "STABLEHLO_DIVIDE": 0, "STABLEHLO_DOT_GENERAL": 0, "STABLEHLO_DYNAMIC_SLICE": 0,
    "STABLEHLO_DYNAMIC_UPDATE_SLICE": 0, "STABLEHLO_EXPONENTIAL": 0, "STABLEHLO_FLOOR": 0,
    "STABLEHLO_GATHER": 0, "STABLEHLO_IOTA": 0, "STABLEHLO_LOG": 0, "STABLEHLO_LOGISTIC": 0,
    "STABLEHLO_MAXIMUM": 0, "STABLEHLO_MINIMUM": 0, "STABLEHLO_MULTIPLY": 0, "STABLEHLO_NEGATE": 0,
    "STABLEHLO_OR": 0, "STABLEHLO_PAD": 0, "STABLEHLO_POWER": 0, "STABLEHLO_REDUCE": 0,
    "STABLEHLO_REDUCE_WINDOW": 0, "STABLEHLO_REMAINDER": 0, "STABLEHLO_RESHAPE": 0,
    "STABLEHLO_RNG_BIT_GENERATOR": 0, "STABLEHLO_RSQRT": 0, "STABLEHLO_SCATTER": 0, "STABLEHLO_SELECT": 0,
    "STABLEHLO_SHIFT_LEFT": 0, "STABLEHLO_SLICE": 0, "STABLEHLO_SORT": 0, "STABLEHLO_SUBTRACT": 0,
    "STABLEHLO_TANH": 0, "STABLEHLO_TRANSPOSE": 0, "STABLEHLO_WHILE": 0, "STRIDED_SLICE": 8, "SUB": 5,
    "SUM": 2, "SVDF": 4, "TANH": 3, "TILE": 3, "TOPK_V2": 3, "TRANSPOSE": 6, "TRANSPOSE_CONV": 4,
    "UNIDIRECTIONAL_SEQUENCE_LSTM": 4, "UNIDIRECTIONAL_SEQUENCE_RNN": 3, "UNIQUE": 1, "UNPACK": 4,
    "UNSORTED_SEGMENT_MAX": 1, "UNSORTED_SEGMENT_MIN": 1, "UNSORTED_SEGMENT_PROD": 1,
    "UNSORTED_SEGMENT_SUM": 1, "VAR_HANDLE": 1, "WHERE": 2, "WHILE": 1, "ZEROS_LIKE": 1,
}
# fmt: on

_TFLITE_214_QUIRKS = (
    Quirk(
        id="dynamic-int8-fc-per-channel-wrong",
        text="Dynamic-range int8 FULLY_CONNECTED with per-channel weights loads and runs but computes "
        "wrong results (the hybrid per-channel kernel); int8-dynamic is therefore not offered. "
        "Per-tensor dynamic int8 was not measured.",
        evidence=f"{_FACTS}: digits CNN dynamic int8 from ai-edge-quantizer and from litert-torch runs on "
        "tflite-runtime 2.14 with accuracy 0.108 (dynamic int8 from the same tools keeps accuracy on "
        "ai-edge-litert 2.3); "
        "PT2E dynamic int8 refuses to load (FULLY_CONNECTED version 12).",
    ),
    Quirk(
        id="op-versions-capped",
        text="The runtime loads only the builtin op versions in max_op_versions (FULLY_CONNECTED <= 10, "
        "GATHER_ND <= 4, ...); a file needing a newer version fails to load with \"Didn't find op for "
        'builtin opcode". Every builtin op of the 2.14.0 runtime is listed; 0 means no kernel at all.',
        evidence=f"{_FACTS}: PT2E dynamic int8 refused (FULLY_CONNECTED 12), MiniLM refused (GATHER_ND 5). "
        "Table: probe models of every builtin op at versions 1-16 loaded into tflite-runtime 2.14.0; the 20 "
        "common ops agree with tensorflow/lite/core/kernels/register.cc (tensorflow/tensorflow 0314b97f).",
    ),
    Quirk(
        id="static-int8-not-on-xnnpack",
        text="Full-integer (int8-static) models run on the reference int8 kernels, not XNNPACK: correct "
        "but about 5x slower than on ai-edge-litert.",
        evidence=f"{_FACTS}: static int8 runs on tflite-runtime 2.14, not on XNNPACK, ~5x slower.",
    ),
)

# JetPack 6.0 shipped TensorRT 8.6; 6.1 and 6.2 ship 10.3. A fleet still on 6.0 needs its own profile.
_JETPACK6 = "JetPack 6.1/6.2 (L4T r36.4): TensorRT 10.3, CUDA 12.6"

BUILTIN_PROFILES: tuple[TargetProfile, ...] = (
    TargetProfile(
        name="jetson-orin-nano",
        description=f"NVIDIA Jetson Orin Nano 8 GB (Ampere GPU, no DLA); {_JETPACK6}. The engine is built "
        "and cached on the device. 8 GB is shared by CPU and GPU: half is the model's budget.",
        format="tensorrt-onnx",
        precisions=("fp16", "int8-qdq", "fp32"),
        runtime="tensorrt",
        runtime_version="10.3",
        gpu_arch="sm_87",
        compute_capability="8.7",
        memory_mib=4096,
        delegates=("cuda",),
        quirks=(_QDQ_SYMMETRIC,),
    ),
    TargetProfile(
        name="jetson-agx-orin",
        description=f"NVIDIA Jetson AGX Orin 32 GB / 64 GB (Ampere GPU, 2 DLA cores); {_JETPACK6}. "
        "The budget is half of the 32 GB module's shared memory.",
        format="tensorrt-onnx",
        precisions=("fp16", "int8-qdq", "fp32"),
        runtime="tensorrt",
        runtime_version="10.3",
        gpu_arch="sm_87",
        compute_capability="8.7",
        memory_mib=16384,
        delegates=("cuda", "dla"),
        quirks=(_QDQ_SYMMETRIC,),
    ),
    TargetProfile(
        name="jetson-xavier-nx",
        description="NVIDIA Jetson Xavier NX 8 GB (Volta GPU, 2 DLA cores); JetPack 5.1 (L4T r35): "
        "TensorRT 8.5, CUDA 11.4. TensorRT 8.5 still has implicit int8 calibration, but edgeship emits "
        "explicit Q/DQ only (TensorRT builds Q/DQ networks since 8.0).",
        format="tensorrt-onnx",
        precisions=("fp16", "int8-qdq", "fp32"),
        runtime="tensorrt",
        runtime_version="8.5",
        gpu_arch="sm_72",
        compute_capability="7.2",
        memory_mib=4096,
        delegates=("cuda", "dla"),
        quirks=(_QDQ_SYMMETRIC,),
    ),
    TargetProfile(
        name="android-arm64",
        description="Android phones (arm64-v8a) with LiteRT: XNNPACK on the CPU by default, the GPU delegate, "
        "and NNAPI (deprecated from Android 15; int8-static suits it best).",
        format="tflite",
        precisions=("fp32", "int8-dynamic", "int8-static", "fp16", "int8-weight-only", "w8a16"),
        runtime="litert",
        runtime_version="2.3",
        delegates=("xnnpack", "gpu", "nnapi"),
    ),
    TargetProfile(
        name="ios17",
        description="iPhone and iPad on iOS 17 or later: Core ML ML program, specification 8 "
        "(Neural Engine, GPU, CPU).",
        format="coreml",
        precisions=("fp16", "int8-weight-only", "w8a8", "palettized-4bit", "fp32"),
        runtime="coreml",
        runtime_version="8",
        min_os="iOS17",
        delegates=("ane", "gpu"),
    ),
    TargetProfile(
        name="ios18",
        description="iPhone and iPad on iOS 18 or later: Core ML ML program, specification 9; adds int4 "
        "per-block weights and joint compression.",
        format="coreml",
        precisions=("fp16", "int8-weight-only", "w8a8", "palettized-4bit", "int4-block", "fp32"),
        runtime="coreml",
        runtime_version="9",
        min_os="iOS18",
        delegates=("ane", "gpu"),
    ),
    TargetProfile(
        name="macos-arm64",
        description="Apple-silicon Macs on macOS 14 or later: Core ML specification 8, the same opset as iOS 17.",
        format="coreml",
        precisions=("fp16", "int8-weight-only", "w8a8", "palettized-4bit", "fp32"),
        runtime="coreml",
        runtime_version="8",
        min_os="macOS14",
        delegates=("ane", "gpu"),
    ),
    TargetProfile(
        name="linux-x86_64",
        description="x86-64 Linux servers and gateways with ONNX Runtime on the CPU execution provider.",
        format="onnx",
        precisions=("fp32", "int8-dynamic", "int8-qdq", "fp16"),
        runtime="onnxruntime",
        runtime_version="1.31",
        quirks=(
            Quirk(
                id="fp16-computes-in-fp32",
                text="ONNX Runtime's CPU provider runs an fp16 model by casting back to fp32: the file is half "
                "the size but inference is no faster.",
                evidence=f"{_FACTS}: 'On x86 CPU, ORT runs fp16 models by casting back to fp32: no speed-up.'",
            ),
            Quirk(
                id="int8-dynamic-depends-on-vnni",
                text="Dynamic int8 (u8 activations x s8 weights) saturates pairs of products in int16 on x86 CPUs "
                "without VNNI (AVX2 only): the same model can be less accurate there than on the CPU it was "
                "validated on. Q/DQ int8 can differ there too, where ONNX Runtime fuses it into integer kernels "
                "(QGemm, MatMulIntegerToFloat, QLinearMatMul). The compile report's numbers are the compile "
                "host's; for int8-dynamic the recipe's quantize.reduce_range (7-bit weights) avoids it at a cost "
                "in accuracy.",
                evidence="Measured on an AVX2-only AMD EPYC while writing tests/compiler/search/test_fronts.py: its outlier MLP "
                "with fc2 in float gave cosine 0.965 with 8-bit weights (>= 0.995 on the CPU the test was written "
                "on) and >= 0.995 with 7-bit weights; the test now uses reduce_range to pass on both kinds of CPU. "
                "MiniLM int8-qdq (smoothed, 4 of 48 MatMuls float) on an AVX2-only EPYC: worst held-out cosine "
                "0.9948 with ONNX Runtime's default optimizations, 0.9952 with its integer fusions off "
                "(ORT_ENABLE_BASIC); 0.9955 on an AVX-512 VNNI EPYC but 0.9946 on a VNNI Xeon, so the CPU "
                "changes more than the saturation.",
            ),
        ),
    ),
    TargetProfile(
        name="linux-arm64",
        description="arm64 Linux boards (Raspberry Pi 5 class) with LiteRT (ai-edge-litert) on XNNPACK.",
        format="tflite",
        precisions=("fp32", "int8-dynamic", "int8-static", "int8-weight-only", "fp16", "w8a16"),
        runtime="litert",
        runtime_version="2.3",
        delegates=("xnnpack",),
    ),
    TargetProfile(
        name="tflite-runtime-2.14",
        description="A device that has only tflite-runtime 2.14 (numpy 1): older op versions only, "
        "and no dynamic-range int8.",
        format="tflite",
        precisions=("fp32", "fp16", "int8-weight-only", "int8-static"),
        runtime="tflite-runtime",
        runtime_version="2.14.0",
        delegates=("xnnpack",),
        max_op_versions=TFLITE_RUNTIME_214_MAX_OP_VERSIONS,
        quirks=_TFLITE_214_QUIRKS,
    ),
)
