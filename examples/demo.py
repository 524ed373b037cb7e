"""The end-to-end demo, as far as edgeship goes today.

Trains a small CNN on scikit-learn's bundled digits, exports it to ONNX, packages it
signed with golden vectors, then does what a device does: verify, unpack, run, and
check the outputs against the golden vectors. Finally it tampers with the package and
shows the refusal. Every number printed is measured in this run.

Not in the demo yet (their issues are open): the runtime Session, the compiler's
TFLite/Core ML/TensorRT emitters, the device agent and the fleet manager.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

OUT = Path(os.environ.get("EDGESHIP_DEMO_OUT", "demo-out"))


def step(title: str) -> None:
    print(f"\n== {title}", flush=True)


def cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edgeship", *map(str, args)]
    print("$ edgeship " + " ".join(map(str, args)))
    result = subprocess.run(cmd, capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    sys.stdout.write(result.stderr)
    print(f"(exit {result.returncode})")
    return result


def main() -> None:
    import torch

    from edgeship.runtime.package import Golden, Manifest, Provenance, TensorSpec, load_private_key, write_package

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()

    step("1. train a small CNN on scikit-learn's digits (8x8 images, 10 classes)")
    t0 = time.perf_counter()
    from examples.digits import train

    digits = train()
    model, x_test, y_test, acc = digits.model, digits.x_test, digits.y_test, digits.accuracy
    params = digits.parameters
    print(f"{params} parameters, test accuracy {acc:.3f} ({time.perf_counter() - t0:.1f} s)")

    step("2. export to ONNX (torch.onnx, dynamo exporter)")
    onnx_path = OUT / "digits.onnx"
    torch.onnx.export(
        model,
        (torch.from_numpy(x_test[:1]),),
        str(onnx_path),
        dynamo=True,
        external_data=False,
        input_names=["image"],
        output_names=["logits"],
        verbose=False,
    )
    print(f"{onnx_path}: {onnx_path.stat().st_size} bytes")

    step("3. create a signing key")
    cli("keys", "generate", "--out", OUT / "keys")

    step("4. write a signed package with golden vectors")
    golden_x = x_test[:4, None]  # 4 cases of one image each: (cases, 1, 1, 8, 8)
    with torch.no_grad():
        golden_y = np.stack([model(torch.from_numpy(x)).numpy() for x in golden_x])
    buf = io.BytesIO()
    np.savez(buf, **{"input:image": golden_x, "output:logits": golden_y})
    draft = Manifest(
        name="digits-cnn",
        version=1,
        label="demo",
        target="linux-x86_64",
        format="onnx",
        precision="fp32",
        artifact_path="model/digits.onnx",
        inputs=(TensorSpec("image", "float32", (1, 1, 8, 8)),),
        outputs=(TensorSpec("logits", "float32", (1, 10)),),
        files=(),
        golden=Golden("golden/vectors.npz", rtol=1e-4, atol=1e-4),
        provenance=Provenance(
            tools={"torch": torch.__version__}, source_sha256=hashlib.sha256(onnx_path.read_bytes()).hexdigest()
        ),
    )
    pkg = OUT / "digits-cnn-v1.edgepkg"
    write_package(
        pkg,
        draft,
        {"model/digits.onnx": onnx_path, "golden/vectors.npz": buf.getvalue()},
        [load_private_key(OUT / "keys/edgeship.key")],
    )
    cli("pkg", "inspect", pkg, "--key", OUT / "keys/edgeship.pub")

    step("5. on the device: verify, unpack, run with ONNX Runtime, compare with the golden vectors")
    cli("pkg", "verify", pkg, "--key", OUT / "keys/edgeship.pub")
    cli("pkg", "unpack", pkg, "--key", OUT / "keys/edgeship.pub", "--out", OUT / "slot-b")
    import onnxruntime as ort

    session = ort.InferenceSession(str(OUT / "slot-b/model/digits.onnx"), providers=["CPUExecutionProvider"])
    golden = np.load(OUT / "slot-b/golden/vectors.npz")
    got = np.stack([session.run(None, {"image": x})[0] for x in golden["input:image"]])
    print(f"max abs difference to golden outputs: {np.abs(got - golden['output:logits']).max():.2e}")
    preds = np.array([session.run(None, {"image": x[None]})[0].argmax() for x in x_test])
    print(f"ONNX Runtime accuracy on {len(x_test)} test digits: {(preds == y_test).mean():.3f} (PyTorch: {acc:.3f})")

    step("6. tamper with the model inside the package: the device refuses it and keeps what it had")
    bad = OUT / "tampered.edgepkg"
    data = bytearray(pkg.read_bytes())
    with tarfile.open(pkg) as tar:
        offset = tar.getmember("model/digits.onnx").offset_data
    data[offset + 200] ^= 0x01
    bad.write_bytes(bytes(data))
    result = cli("pkg", "unpack", bad, "--key", OUT / "keys/edgeship.pub", "--out", OUT / "slot-a")
    assert result.returncode != 0 and not (OUT / "slot-a").exists()
    print(f"slot-b still holds the verified model: {(OUT / 'slot-b/model/digits.onnx').is_file()}")

    print("\nNot in this demo yet: runtime Session, compiler emitters, device agent, fleet manager (open issues).")


if __name__ == "__main__":
    main()
