"""edgeship.runtime.check: a package checked in a child process, whose crash or hang the parent survives."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from edgeship.errors import ArtifactError
from edgeship.runtime.artifact_checks import check_artifact
from edgeship.runtime.check import CheckResult, run_check
from edgeship.runtime.package import load_private_key, unpack_package, write_package
from tests.model_fixtures import Models
from tests.package_fixtures import Publisher


def check(models: Models, slot: Path | str, **kwargs: object) -> CheckResult:
    kwargs.setdefault("trusted_key_paths", [models.public_key])
    kwargs.setdefault("runs", 20)
    kwargs.setdefault("threads", 1)
    return run_check(slot, **kwargs)  # type: ignore[arg-type]


def repackage(models: Models, tmp_path: Path, name: str, change: Callable[[dict[str, bytes]], None], **fields) -> Path:
    """Unpack a fixture package, let ``change`` edit its files (and ``fields`` its manifest), sign it again."""
    from dataclasses import replace

    unpacked = tmp_path / f"unpacked-{name}"
    manifest = unpack_package(models.package(name), unpacked, trusted_keys=models.trusted).manifest
    contents = {f.path: (unpacked / f.path).read_bytes() for f in manifest.files}
    change(contents)
    out = tmp_path / f"changed-{name}.edgepkg"
    write_package(out, replace(manifest, **fields), contents, [load_private_key(models.root / "keys/models.key")])
    return out


def test_a_good_package_passes_with_golden_and_latency(models: Models):
    result = check(models, models.package("tflite-fp32"))
    assert result.ok and result.code == "ok", result
    assert (result.name, result.version, result.backend) == ("digits-cnn", 1, "litert")
    assert result.library is not None and result.library.startswith("ai_edge_litert")
    assert result.golden is not None and result.golden["passed"] and result.golden["cases"] == 6
    assert result.latency_ms is not None and result.latency_ms["runs"] == 20
    assert 0 < result.latency_ms["p50"] <= result.latency_ms["p99"]
    assert result.returncode == 0


def test_an_installed_slot_is_checked_pinned_by_its_manifest_digest(models: Models, tmp_path: Path):
    slot = tmp_path / "slot-b"
    digest = unpack_package(models.package("onnx-fp32"), slot, trusted_keys=models.trusted).digest
    result = check(models, slot, manifest_digest=digest)
    assert result.ok and result.backend == "onnxruntime", result
    (slot / "manifest.json").write_bytes((slot / "manifest.json").read_bytes() + b"\n")
    changed = check(models, slot, manifest_digest=digest)
    assert changed.code == "package_error" and "reinstall" in changed.message
    assert changed.returncode == 3


def test_golden_outputs_that_differ_fail_the_check(models: Models, tmp_path: Path):
    def shift_expected_outputs(contents: dict[str, bytes]) -> None:
        with np.load(io.BytesIO(contents["golden/vectors.npz"])) as npz:
            arrays = {k: npz[k] + (1.0 if k.startswith("output:") else 0.0) for k in npz.files}
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        contents["golden/vectors.npz"] = buf.getvalue()

    pkg = repackage(models, tmp_path, "tflite-fp32", shift_expected_outputs)
    result = check(models, pkg)
    assert result.code == "golden_failed" and not result.ok, result
    assert "does not reproduce its golden vectors: case 0: output 'logits' differs by up to 1" in result.message
    assert result.golden is not None and not result.golden["passed"] and len(result.golden["failures"]) == 6
    assert result.latency_ms is not None  # still measured: the report says how fast the wrong model is
    assert result.returncode == 1


def test_latency_over_the_budget_fails_the_check(models: Models):
    result = check(models, models.package("onnx-fp32"), max_latency_ms=1e-6)
    assert result.code == "latency_budget" and not result.ok, result
    assert "over the budget of 1e-06 ms" in result.message
    assert result.golden is not None and result.golden["passed"]
    assert result.returncode == 1


def test_a_package_without_golden_vectors_cannot_pass(models: Models, tmp_path: Path):
    pkg = repackage(models, tmp_path, "onnx-fp32", lambda c: c.pop("golden/vectors.npz"), golden=None)
    result = check(models, pkg)
    assert result.code == "no_golden" and not result.ok, result
    assert result.latency_ms is not None and result.returncode == 1


def test_a_package_signed_by_another_key_is_a_package_error(models: Models, stranger: Publisher, tmp_path: Path):
    from edgeship.runtime.package.signing import public_key_pem

    other = tmp_path / "other.pub"
    other.write_bytes(public_key_pem(stranger.key.public_key()))
    result = check(models, models.package("tflite-fp32"), trusted_key_paths=[other])
    assert result.code == "package_error" and not result.ok, result
    assert "which is not a trusted key" in result.message
    assert result.name is None and result.returncode == 3


def test_a_backend_that_cannot_load_is_a_load_failure(models: Models):
    result = check(models, models.package("tflite-fp32"), options={"interpreter": "no_such_interpreter"})
    assert result.code == "load_failed" and result.returncode == 4, result
    assert "no TFLite interpreter is installed (no_such_interpreter asked for)" in result.message


def test_the_command_line_prints_one_json_line_and_exits_with_the_code(models: Models, stranger: Publisher):
    base = [sys.executable, "-m", "edgeship.runtime.check", "--json", "--runs", "3", "--option", "pool=2"]
    ok = subprocess.run(
        [*base, str(models.package("tflite-int8")), "--key", str(models.public_key)], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    line = json.loads(ok.stdout.strip().splitlines()[-1])
    assert line["code"] == "ok" and line["latency_ms"]["runs"] == 3
    assert set(line) == {"ok", "code", "message", "name", "version", "backend", "library", "golden", "latency_ms"}
    unsigned = subprocess.run([*base, str(models.package("tflite-int8"))], capture_output=True, text=True)
    assert unsigned.returncode == 2 and json.loads(unsigned.stdout)["message"].startswith("no trusted key")


# ---------------------------------------------------------------- what the parent survives


def _flatbuffer_table(data: bytes, table: int, field: int) -> int | None:
    """Absolute position of ``field`` of the FlatBuffer table at ``table`` (None when absent)."""
    vtable = table - struct.unpack_from("<i", data, table)[0]
    vtable_size = struct.unpack_from("<H", data, vtable)[0]
    if 4 + 2 * field >= vtable_size:
        return None
    offset = struct.unpack_from("<H", data, vtable + 4 + 2 * field)[0]
    return table + offset if offset else None


def _deref(data: bytes, position: int) -> int:
    return position + struct.unpack_from("<I", data, position)[0]


def omit_operand(model: bytes, builtin: int, position: int) -> bytes:
    """The TFLite model with input ``position`` of its first operator of builtin code ``builtin`` marked omitted (-1)."""
    data = bytearray(model)
    root = struct.unpack_from("<I", data, 0)[0]
    subgraph = _deref(data, _deref(data, _flatbuffer_table(data, root, 2)) + 4)  # Model.subgraphs[0]
    operator_codes = _deref(data, _flatbuffer_table(data, root, 1)) + 4  # Model.operator_codes
    operators = _deref(data, _flatbuffer_table(data, subgraph, 3))  # SubGraph.operators
    for i in range(struct.unpack_from("<I", data, operators)[0]):
        operator = _deref(data, operators + 4 + 4 * i)
        index_field = _flatbuffer_table(data, operator, 0)
        opcode_index = struct.unpack_from("<I", data, index_field)[0] if index_field else 0
        code = _deref(data, operator_codes + 4 * opcode_index)
        field = _flatbuffer_table(data, code, 3)  # OperatorCode.builtin_code
        if field is None or struct.unpack_from("<i", data, field)[0] != builtin:
            continue
        inputs = _deref(data, _flatbuffer_table(data, operator, 1))
        assert struct.unpack_from("<I", data, inputs)[0] > position
        struct.pack_into("<i", data, inputs + 4 + 4 * position, -1)
        return bytes(data)
    raise AssertionError(f"the model has no operator {builtin}")


RESHAPE, FULLY_CONNECTED = 22, 9


def reshape_without_its_shape_operand(model: bytes) -> bytes:
    """The TFLite model with its first RESHAPE's shape operand marked omitted (-1): LiteRT 2.3 dies of SIGSEGV."""
    return omit_operand(model, RESHAPE, 1)


def test_only_optional_operands_may_be_omitted(models: Models, tmp_path: Path):
    model = models.artifact("digits_fp32.tflite").read_bytes()
    no_bias = tmp_path / "no-bias.tflite"
    no_bias.write_bytes(omit_operand(model, FULLY_CONNECTED, 2))
    check_artifact("tflite", no_bias)  # a fully-connected layer without bias is legal
    no_weights = tmp_path / "no-weights.tflite"
    no_weights.write_bytes(omit_operand(model, FULLY_CONNECTED, 1))
    with pytest.raises(ArtifactError, match="omits input 1, which builtin operator 9 requires"):
        check_artifact("tflite", no_weights)


def test_a_model_that_would_crash_the_interpreter_is_refused_before_it_is_loaded(models: Models, tmp_path: Path):
    """An omitted required operand: LiteRT 2.3 dies of SIGSEGV on it, the structural checks refuse it first."""
    crafted = tmp_path / "crafted.tflite"
    crafted.write_bytes(reshape_without_its_shape_operand(models.artifact("digits_fp32.tflite").read_bytes()))
    # Without the check, the interpreter really crashes (in a child, so this test survives it) ...
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from ai_edge_litert.interpreter import Interpreter; "
            "i = Interpreter(model_path=sys.argv[1]); i.allocate_tensors(); i.invoke()",
            str(crafted),
        ],
        capture_output=True,
        timeout=120,
    )
    assert probe.returncode == -signal.SIGSEGV, probe.stderr[-500:]
    # ... and the structural checks refuse it, so no edgeship process loads it.
    with pytest.raises(ArtifactError, match="omits input 1"):
        check_artifact("tflite", crafted)

    def break_reshape(contents: dict[str, bytes]) -> None:
        contents["model/digits.tflite"] = reshape_without_its_shape_operand(contents["model/digits.tflite"])

    result = check(models, repackage(models, tmp_path, "tflite-fp32", break_reshape))
    assert not result.ok and result.code == "package_error" and "omits input 1" in result.message, result


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the child through /proc")
def test_a_child_killed_by_a_signal_mid_run_is_reported_as_a_crash(models: Models):
    results: list[CheckResult] = []
    # A latency loop long enough that the child is still running when the signal arrives.
    worker = threading.Thread(
        target=lambda: results.append(check(models, models.package("onnx-fp32"), runs=10**8, timeout=600))
    )
    before = set(_children(os.getpid()))
    worker.start()
    child = None
    while child is None and worker.is_alive():
        new = set(_children(os.getpid())) - before
        child = next(iter(new), None)
        threading.Event().wait(0.05)
    assert child is not None
    threading.Event().wait(1.0)  # let it get into the model, past the imports
    os.kill(child, signal.SIGSEGV)
    worker.join(timeout=60)
    assert results and results[0].code == "crashed", results
    assert results[0].message == "the model crashed the interpreter (SIGSEGV)"


def test_a_child_that_runs_too_long_is_killed_and_reported(models: Models):
    result = check(models, models.package("onnx-fp32"), runs=10**8, timeout=3)
    assert result.code == "timeout" and not result.ok
    assert "did not finish within 3 s" in result.message


def test_a_child_without_a_result_line_is_an_error(models: Models):
    result = check(models, models.package("onnx-fp32"), python="/bin/true")
    assert result.code == "error" and "exited 0 without a result" in result.message
    missing = check(models, models.package("onnx-fp32"), python="/nonexistent/python")
    assert missing.code == "error" and "cannot start /nonexistent/python" in missing.message
