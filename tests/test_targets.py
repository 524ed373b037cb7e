"""Target profiles: the built-in ones are valid and say what the measurements say; lookup, registration, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeship import targets
from edgeship.targets import PRECISIONS, ProfileError, Quirk, TargetProfile, UnknownTargetError

pytestmark = pytest.mark.py310

TFLITE_VENV = Path(__file__).resolve().parent.parent / ".venv-tflite" / "bin" / "python"
BUILTIN_NAMES = [
    "jetson-orin-nano",
    "jetson-agx-orin",
    "jetson-xavier-nx",
    "android-arm64",
    "ios17",
    "ios18",
    "macos-arm64",
    "linux-x86_64",
    "linux-arm64",
    "tflite-runtime-2.14",
]
# The ops the compiler's converters emit most; each must have a measured cap on tflite-runtime 2.14.
COMMON_TFLITE_OPS = {
    "CONV_2D": 7,
    "DEPTHWISE_CONV_2D": 7,
    "FULLY_CONNECTED": 10,
    "ADD": 5,
    "MUL": 7,
    "MEAN": 3,
    "SOFTMAX": 3,
    "RESHAPE": 1,
    "TRANSPOSE": 6,
    "BATCH_MATMUL": 4,
    "GATHER": 6,
    "GATHER_ND": 4,
    "CONCATENATION": 4,
    "QUANTIZE": 3,
    "DEQUANTIZE": 5,
    "AVERAGE_POOL_2D": 3,
    "MAX_POOL_2D": 3,
    "TANH": 3,
    "LOGISTIC": 3,
    "GELU": 2,
}


def edgeship(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edgeship", *args], capture_output=True, text=True, timeout=120)


def _profile(**overrides: object) -> TargetProfile:
    fields: dict[str, object] = {
        "name": "my-board",
        "description": "a test board",
        "format": "tflite",
        "precisions": ("fp32",),
        "runtime": "litert",
        "runtime_version": "2.3",
    }
    fields.update(overrides)
    return TargetProfile(**fields)  # type: ignore[arg-type]


@pytest.fixture
def restore_registry() -> Iterator[None]:
    before = {p.name for p in targets.all_targets()}
    yield
    for p in targets.all_targets():
        if p.name not in before:
            targets.unregister(p.name)


# --- the built-in profiles -------------------------------------------------------------------


def test_builtin_profiles_are_the_documented_ones_in_order():
    assert [p.name for p in targets.all_targets()][: len(BUILTIN_NAMES)] == BUILTIN_NAMES


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_every_builtin_profile_is_valid(name: str):
    p = targets.get(name)
    assert p.precisions and set(p.precisions) <= set(PRECISIONS)
    assert p.default_precision == p.precisions[0]
    assert p.format in targets.FORMATS
    assert set(p.precisions) <= targets.PRECISIONS_BY_FORMAT[p.format]
    assert p.runtime and p.runtime_version and p.description
    if p.format == "coreml":
        assert p.min_os in ("iOS17", "iOS18", "macOS14")
        assert p.default_precision == "fp16"
    if name.startswith("jetson-"):
        assert p.format == "tensorrt-onnx" and p.default_precision == "fp16" and "int8-qdq" in p.precisions
        assert p.compute_capability and p.gpu_arch == "sm_" + p.compute_capability.replace(".", "")
        assert p.has_quirk("qdq-symmetric-only")
    if p.format in ("tflite", "onnx"):
        assert p.default_precision == "fp32"
    for q in p.quirks:
        assert q.text and q.evidence, q.id
    json.dumps(p.to_dict())  # every field is JSON-ready


def test_jetson_hardware_facts():
    nano, agx, xavier = (targets.get(n) for n in ("jetson-orin-nano", "jetson-agx-orin", "jetson-xavier-nx"))
    assert (nano.compute_capability, nano.gpu_arch, nano.runtime_version) == ("8.7", "sm_87", "10.3")
    assert "dla" not in nano.delegates  # the Orin Nano has no DLA
    assert "dla" in agx.delegates and agx.compute_capability == "8.7"
    assert (xavier.compute_capability, xavier.gpu_arch, xavier.runtime_version) == ("7.2", "sm_72", "8.5")
    assert "dla" in xavier.delegates
    assert nano.memory_mib == 4096


def test_int4_block_only_on_ios18_and_macos14_matches_ios17():
    assert "int4-block" in targets.get("ios18").precisions
    assert "int4-block" not in targets.get("ios17").precisions
    mac, ios17 = targets.get("macos-arm64"), targets.get("ios17")
    assert mac.coreml_spec_version == ios17.coreml_spec_version == 8
    assert mac.precisions == ios17.precisions
    with pytest.raises(ProfileError, match=r"int4-block needs Core ML specification 9 \(iOS18"):
        _profile(format="coreml", runtime="coreml", min_os="iOS17", precisions=("fp16", "int4-block"))


def test_tflite_runtime_214_refuses_what_it_cannot_run():
    p = targets.get("tflite-runtime-2.14")
    assert (p.runtime, p.runtime_version) == ("tflite-runtime", "2.14.0")
    quirk = p.quirk("dynamic-int8-fc-per-channel-wrong")
    assert quirk is not None and "0.108" in quirk.evidence
    assert "int8-dynamic" not in p.precisions  # it runs, but computes wrong results
    assert p.max_op_versions["FULLY_CONNECTED"] == 10  # FACTS: version 12 refused; 11 measured refused too
    assert p.max_op_versions["GATHER_ND"] == 4  # FACTS: MiniLM's version 5 refused
    assert {op: p.max_op_versions[op] for op in COMMON_TFLITE_OPS} == COMMON_TFLITE_OPS
    assert p.max_op_versions["STABLEHLO_COMPOSITE"] == 0  # newer than 2.14: no kernel at all


def test_profiles_cannot_be_changed_in_place():
    p = targets.get("tflite-runtime-2.14")
    with pytest.raises(TypeError, match="read-only"):
        p.max_op_versions["FULLY_CONNECTED"] = 12
    with pytest.raises(TypeError, match="read-only"):
        p.max_op_versions.update({"GATHER_ND": 5})
    assert p.max_op_versions["FULLY_CONNECTED"] == 10
    listed = _profile(precisions=["fp32", "fp16"], delegates=["xnnpack"])
    assert listed.precisions == ("fp32", "fp16") and listed.delegates == ("xnnpack",)
    hash(listed)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"precisions": ()}, "precisions is empty"),
        ({"precisions": ("int8",)}, "unknown precision 'int8'"),
        ({"precisions": ("fp32", "fp32")}, "repeat"),
        ({"precisions": ("int8-qdq",)}, "'int8-qdq' does not exist in tflite artifacts"),
        ({"format": "openvino"}, "unknown format 'openvino'"),
        ({"name": "My Board"}, "name must be lower-case"),
        ({"runtime_version": ""}, "runtime_version must be a non-empty string"),
        ({"format": "coreml", "precisions": ("fp16",)}, "a Core ML target needs min_os"),
        ({"format": "coreml", "precisions": ("fp16",), "min_os": "iOS14"}, "needs min_os"),
        ({"format": "coreml", "precisions": ("w8a8",), "min_os": "iOS16"}, "w8a8 needs Core ML specification 8"),
        ({"format": "tensorrt-onnx", "precisions": ("fp16",)}, "needs compute_capability"),
        (
            {"format": "tensorrt-onnx", "precisions": ("fp16",), "compute_capability": "8.7", "gpu_arch": "sm_86"},
            "is gpu_arch 'sm_87', not 'sm_86'",
        ),
        ({"memory_mib": 0}, "memory_mib must be a positive integer"),
        ({"delegates": ("gpu", "gpu")}, "delegates must be distinct"),
        ({"format": "onnx", "max_op_versions": {"ADD": 1}}, "applies to TFLite builtin ops only"),
        ({"max_op_versions": {"ADD": -1}}, r"max_op_versions\['ADD'\] must be an integer >= 0"),
        ({"max_op_versions": {"add": 1}}, "is not a builtin op name"),
        ({"quirks": (Quirk("Bad Id", "x"),)}, "needs a lower-case id"),
        ({"quirks": (Quirk("a", "x"), Quirk("a", "y"))}, "quirk ids repeat"),
    ],
)
def test_a_contradictory_profile_cannot_be_built(overrides: dict[str, object], message: str):
    with pytest.raises(ProfileError, match=message) as info:
        _profile(**overrides)
    assert isinstance(info.value, ValueError)
    assert "'my-board'" in str(info.value) or "name" in overrides


# --- lookup and registration -------------------------------------------------------------------


def test_get_is_case_insensitive():
    assert targets.get("IOS17") is targets.get("ios17")


def test_unknown_target_suggests_the_nearest_names():
    with pytest.raises(UnknownTargetError) as info:
        targets.get("jetson-orin")
    assert str(info.value) == (
        "unknown target 'jetson-orin'; did you mean jetson-orin-nano, jetson-agx-orin? (edgeship targets list)"
    )
    assert isinstance(info.value, LookupError)


@pytest.mark.parametrize(
    ("typed", "suggested"),
    [("andriod-arm64", "android-arm64"), ("xavier", "jetson-xavier-nx"), ("tflite", "tflite-runtime-2.14")],
)
def test_misspelt_and_partial_names_find_their_target(typed: str, suggested: str):
    with pytest.raises(UnknownTargetError, match=f"did you mean {suggested}\\?"):
        targets.get(typed)


def test_unknown_target_with_nothing_close_points_to_the_list():
    with pytest.raises(UnknownTargetError, match="'qnn-hexagon'; see the known targets with: edgeship targets list"):
        targets.get("qnn-hexagon")


def test_register_adds_a_custom_profile(restore_registry: None):
    board = targets.register(_profile(name="rpi4-litert", precisions=("fp32", "int8-static"), memory_mib=1024))
    assert targets.get("rpi4-litert") is board
    assert targets.all_targets()[-1] is board
    with pytest.raises(UnknownTargetError, match="did you mean rpi4-litert"):
        targets.get("rpi4")
    with pytest.raises(ValueError, match="already exists; pass replace=True"):
        targets.register(_profile(name="rpi4-litert"))
    targets.register(board)  # registering the same profile again is harmless
    newer = targets.register(_profile(name="rpi4-litert", runtime_version="2.4"), replace=True)
    assert targets.get("rpi4-litert") is newer
    targets.unregister("rpi4-litert")
    with pytest.raises(UnknownTargetError):
        targets.get("rpi4-litert")


def test_register_refuses_non_profiles_and_builtins_stay(restore_registry: None):
    with pytest.raises(TypeError, match="takes a TargetProfile"):
        targets.register({"name": "x"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already exists"):
        targets.register(_profile(name="ios17", format="coreml", runtime="coreml", min_os="iOS17"))
    with pytest.raises(ValueError, match="built-in"):
        targets.unregister("ios17")


# --- the command line --------------------------------------------------------------------------


def test_cli_list_shows_every_target_with_runtime_and_default():
    result = edgeship("targets", "list")
    assert result.returncode == 0, result.stderr
    for p in targets.all_targets():
        line = next(line for line in result.stdout.splitlines() if f" {p.name} " in line)
        assert f"{p.runtime} {p.runtime_version}" in line and p.default_precision in line and p.format in line


def test_cli_list_json_is_every_profile():
    result = edgeship("targets", "list", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [p["name"] for p in listed] == BUILTIN_NAMES
    assert listed == [targets.get(n).to_dict() for n in BUILTIN_NAMES]


def test_cli_show_prints_quirks_with_evidence_and_the_op_table():
    result = edgeship("targets", "show", "tflite-runtime-2.14")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "quirk dynamic-int8-fc-per-channel-wrong" in out and "accuracy 0.108" in out
    assert "tflite-runtime 2.14.0" in out and "fp32 (default)" in out
    assert any("FULLY_CONNECTED" in line and "│ 10 " in line for line in out.splitlines())
    assert "no kernel at all" in out and "STABLEHLO_COMPOSITE" in out


def test_cli_show_jetson_has_gpu_and_memory():
    result = edgeship("targets", "show", "jetson-orin-nano")
    assert result.returncode == 0, result.stderr
    assert "sm_87 (compute capability 8.7)" in result.stdout and "4096 MiB" in result.stdout


def test_cli_show_json_is_the_profile():
    result = edgeship("targets", "show", "ios18", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == targets.get("ios18").to_dict()


def test_cli_unknown_target_is_a_one_line_usage_error():
    result = edgeship("targets", "show", "jetson-orin")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: unknown target 'jetson-orin'; did you mean jetson-orin-nano, jetson-agx-orin? (edgeship targets list)"
    )
    assert result.stdout == ""


# --- the op table against the real runtime -----------------------------------------------------

PROBE = """
import json, sys
from tflite_runtime.interpreter import Interpreter
results = {}
for path in json.load(sys.stdin):
    try:
        Interpreter(model_path=path)
        results[path] = "resolved"
    except ValueError as exc:
        # Any other error (e.g. LSTM's missing options) comes after the op version was resolved.
        refused = "Didn't find op for builtin opcode" in str(exc) or "builtin_code out of range" in str(exc)
        results[path] = "refused" if refused else "resolved"
print(json.dumps(results))
"""


def _probe_model(op: str, version: int) -> bytes:
    """A one-operator model (two float inputs, one output) whose op code is ``op`` at ``version``.

    The interpreter resolves op versions when it is constructed, before any kernel looks at
    tensors, so the op does not need inputs that suit it.
    """
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    code = getattr(schema.BuiltinOperator, op)
    opcode = schema.OperatorCodeT()
    opcode.builtinCode, opcode.deprecatedBuiltinCode, opcode.version = code, min(code, 127), version
    tensors = []
    for name in ("a", "b", "y"):
        t = schema.TensorT()
        t.name, t.shape, t.type, t.buffer = name, [1, 4], schema.TensorType.FLOAT32, 0
        tensors.append(t)
    node = schema.OperatorT()
    node.opcodeIndex, node.inputs, node.outputs = 0, [0, 1], [2]
    graph = schema.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = tensors, [0, 1], [2], [node]
    model = schema.ModelT()
    model.version, model.operatorCodes, model.subgraphs, model.buffers = 3, [opcode], [graph], [schema.BufferT()]
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


@pytest.mark.skipif(not TFLITE_VENV.exists(), reason=".venv-tflite is missing: run 'make test', which creates it")
def test_tflite_runtime_214_loads_exactly_the_listed_op_versions(tmp_path: Path):
    pytest.importorskip("ai_edge_litert")
    pytest.importorskip("flatbuffers")
    expected: dict[str, str] = {}
    for op, highest in targets.get("tflite-runtime-2.14").max_op_versions.items():
        cases = [(highest, "resolved"), (highest + 1, "refused")] if highest else [(1, "refused")]
        for version, outcome in cases:
            path = tmp_path / f"{op}.{version}.tflite"
            path.write_bytes(_probe_model(op, version))
            expected[str(path)] = outcome
    proc = subprocess.run(
        [str(TFLITE_VENV), "-c", PROBE], input=json.dumps(list(expected)), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    wrong = {Path(p).stem: (want, measured[p]) for p, want in expected.items() if measured[p] != want}
    assert not wrong, wrong
