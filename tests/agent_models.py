"""Small real models and signed packages for the device-agent tests, built without torch.

Each model is an ONNX graph made with ``onnx.helper`` (so this also runs in the Python 3.10
device venv) and packaged exactly as the compiler packages: golden vectors computed by
ONNX Runtime from the very artifact, a drift baseline, an ed25519 signature. Variants:

* ``good(version)``: a 4 -> 3 classifier whose weights depend on the version (its golden
  vectors pass; its top-1 agrees with every other ``good`` model on typical inputs).
* ``bad_golden``: golden outputs perturbed before signing (fails validation on the device).
* ``slow``: the same I/O through a stack of 1024-wide layers (passes its golden vectors; many
  times slower, which the health window's latency gate must catch).
* ``disagreeing``: negated weights (passes its golden vectors; its top-1 differs from ``good``).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeship.runtime.package import Golden, Manifest, Provenance, TensorSpec, write_package
from edgeship.runtime.stats import compute_baseline

IN, OUT = 4, 3
X_NAME, Y_NAME = "x", "logits"


def _weights(version: int, negate: bool = False) -> tuple[np.ndarray, np.ndarray]:
    base = np.array([[2.0, -1.0, 0.5], [-0.5, 2.0, 0.0], [0.3, 0.2, 2.0], [-1.0, 0.5, -0.5]], np.float32)
    w = base * (1.0 + 0.01 * version)
    b = np.array([0.1, -0.1, 0.0], np.float32) * version
    if negate:
        w = -w
    return w.astype(np.float32), b.astype(np.float32)


def onnx_model(w: np.ndarray, b: np.ndarray, *, slow_layers: int = 0, width: int = 1024) -> bytes:
    """x (N, 4) float32 -> logits (N, 3) = x @ w + b, optionally through ``slow_layers`` wide layers first.

    The wide layers are exact identities padded with zeros (x -> [x, 0...] -> ... -> x), so the
    slow model computes the same function at many times the cost.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
    current = X_NAME
    if slow_layers:
        up = np.zeros((IN, width), np.float32)
        up[:, :IN] = np.eye(IN, dtype=np.float32)
        inits.append(numpy_helper.from_array(up, "up"))
        nodes.append(helper.make_node("MatMul", [current, "up"], ["h0"]))
        current = "h0"
        square = np.zeros((width, width), np.float32)
        square[:IN, :IN] = np.eye(IN, dtype=np.float32)
        inits.append(numpy_helper.from_array(square, "sq"))
        for i in range(slow_layers):
            nodes.append(helper.make_node("MatMul", [current, "sq"], [f"h{i + 1}"]))
            current = f"h{i + 1}"
        down = np.zeros((width, IN), np.float32)
        down[:IN, :] = np.eye(IN, dtype=np.float32)
        inits.append(numpy_helper.from_array(down, "down"))
        nodes.append(helper.make_node("MatMul", [current, "down"], ["h_out"]))
        current = "h_out"
    nodes.append(helper.make_node("Gemm", [current, "w", "b"], [Y_NAME]))
    graph = helper.make_graph(
        nodes,
        "agent-test",
        [helper.make_tensor_value_info(X_NAME, TensorProto.FLOAT, ["N", IN])],
        [helper.make_tensor_value_info(Y_NAME, TensorProto.FLOAT, ["N", OUT])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="edgeship-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def sample_inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, IN)).astype(np.float32)


def _run(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return np.asarray(session.run([Y_NAME], {X_NAME: x})[0])


@dataclass(frozen=True)
class PackageSpec:
    name: str = "sensor-net"
    version: int = 1
    target: str = "linux-x86_64"
    kind: str = "good"  # good | bad_golden | slow | disagreeing
    slow_layers: int = 12
    padding_mib: int = 0
    """Extra random bytes in the package (``extra/padding.bin``): downloads and unpacking that take a while."""


def build_package(out: Path, key: Ed25519PrivateKey, spec: PackageSpec = PackageSpec()) -> Path:
    """Write a signed ``.edgepkg`` for ``spec`` to ``out`` and return ``out``."""
    w, b = _weights(spec.version, negate=spec.kind == "disagreeing")
    artifact = onnx_model(w, b, slow_layers=spec.slow_layers if spec.kind == "slow" else 0)
    golden_in = sample_inputs(6, seed=spec.version)[:, None, :]  # 6 cases of batch 1
    golden_out = np.stack([_run(artifact, x) for x in golden_in])
    if spec.kind == "bad_golden":
        golden_out = golden_out + 0.5
    calib = sample_inputs(256, seed=100)
    baseline = compute_baseline({X_NAME: [calib]}, {Y_NAME: [_run(artifact, calib)]})
    buf = io.BytesIO()
    np.savez(buf, **{f"input:{X_NAME}": golden_in, f"output:{Y_NAME}": golden_out})
    draft = Manifest(
        name=spec.name,
        version=spec.version,
        target=spec.target,
        format="onnx",
        precision="fp32",
        artifact_path="model/model.onnx",
        inputs=(TensorSpec(X_NAME, "float32", (None, IN)),),
        outputs=(TensorSpec(Y_NAME, "float32", (None, OUT)),),
        files=(),
        golden=Golden("golden/vectors.npz", rtol=1e-4, atol=1e-5),
        baseline_path="baseline/stats.json",
        provenance=Provenance(tools={"edgeship-tests": spec.kind}),
    )
    contents: dict[str, Any] = {
        "model/model.onnx": artifact,
        "golden/vectors.npz": buf.getvalue(),
        "baseline/stats.json": json.dumps(baseline).encode(),
    }
    if spec.padding_mib:
        contents["extra/padding.bin"] = np.random.default_rng(spec.version).bytes(spec.padding_mib << 20)
    write_package(out, draft, contents, [key])
    return out


def expected_top1(version: int, x: np.ndarray) -> np.ndarray:
    w, b = _weights(version)
    return (x @ w + b).argmax(axis=1)
