"""The end-to-end demo, as far as edgeship goes today.

Trains a small CNN on scikit-learn's bundled digits, exports it to TFLite (litert-torch)
and ONNX, packages each signed with golden vectors and a drift baseline, then does what a
device does: verify, unpack, open with the runtime, check the golden vectors, measure
accuracy and latency, watch drift, and refuse a tampered package while keeping the
model it had. Every number printed is measured in this run.

Not in the demo yet (their issues are open): the compiler's quantization and its Core ML /
TensorRT emitters, the device agent and the fleet manager.
"""

from __future__ import annotations

import io
import json
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
    print("$ edgeship " + " ".join(map(str, args)), flush=True)
    result = subprocess.run([sys.executable, "-m", "edgeship", *map(str, args)], capture_output=True, text=True)
    sys.stdout.write(result.stdout)
    sys.stdout.write("".join(line + "\n" for line in result.stderr.splitlines() if not line.startswith("INFO:")))
    print(f"(exit {result.returncode})", flush=True)
    return result


def main() -> None:
    import torch

    import edgeship.runtime as rt
    from edgeship.runtime.package import Golden, Manifest, Provenance, TensorSpec, load_private_key, write_package
    from edgeship.runtime.stats import compute_baseline
    from examples.digits import train

    torch.set_num_threads(1)
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir()

    step("1. train a small CNN on scikit-learn's digits (8x8 images, 10 classes)")
    t0 = time.perf_counter()
    digits = train()
    model, x_test, y_test = digits.model, digits.x_test, digits.y_test
    print(
        f"{digits.parameters} parameters, PyTorch test accuracy {digits.accuracy:.3f} ({time.perf_counter() - t0:.1f} s)"
    )

    step("2. export: TFLite with litert-torch, ONNX with torch.onnx")
    one = torch.from_numpy(x_test[:1])
    t0 = time.perf_counter()
    import litert_torch

    litert_torch.convert(model, (one,)).export(str(OUT / "digits.tflite"))
    torch.onnx.export(
        model,
        (one,),
        str(OUT / "digits.onnx"),
        dynamo=True,
        external_data=False,
        input_names=["image"],
        output_names=["logits"],
        verbose=False,
    )
    for name in ("digits.tflite", "digits.onnx"):
        print(f"{name}: {(OUT / name).stat().st_size} bytes")
    print(f"({time.perf_counter() - t0:.1f} s)")

    step("3. create a signing key")
    cli("keys", "generate", "--out", OUT / "keys")
    key = load_private_key(OUT / "keys/edgeship.key")

    step("4. package each artifact, signed, with golden vectors and a drift baseline")
    with torch.no_grad():
        calib_out = model(torch.from_numpy(digits.x_train)).numpy()
        golden_out = np.stack([model(torch.from_numpy(x[None])).numpy() for x in x_test[:8]])
    buf = io.BytesIO()
    np.savez(buf, **{"input:image": x_test[:8, None], "output:logits": golden_out})
    baseline = json.dumps(compute_baseline({"image": [digits.x_train]}, {"logits": [calib_out]})).encode()
    packages = {}
    for fmt, artifact in (("tflite", "digits.tflite"), ("onnx", "digits.onnx")):
        draft = Manifest(
            name="digits-cnn",
            version=1,
            label="demo",
            target="linux-x86_64",
            format=fmt,
            precision="fp32",
            artifact_path=f"model/{artifact}",
            inputs=(TensorSpec("image", "float32", (1, 1, 8, 8)),),
            outputs=(TensorSpec("logits", "float32", (1, 10)),),
            files=(),
            golden=Golden("golden/vectors.npz", rtol=1e-4, atol=1e-4),
            baseline_path="baseline/stats.json",
            provenance=Provenance(tools={"torch": torch.__version__, "litert-torch": litert_torch.__version__}),
        )
        pkg = OUT / f"digits-cnn-{fmt}-v1.edgepkg"
        contents = {
            f"model/{artifact}": OUT / artifact,
            "golden/vectors.npz": buf.getvalue(),
            "baseline/stats.json": baseline,
        }
        write_package(pkg, draft, contents, [key])
        packages[fmt] = pkg
    cli("pkg", "inspect", packages["tflite"], "--key", OUT / "keys/edgeship.pub")

    step("5. on the device: verify and unpack into a slot, open it with the runtime")
    cli("pkg", "unpack", packages["tflite"], "--key", OUT / "keys/edgeship.pub", "--out", OUT / "slot-b")
    for fmt, source in (("tflite", OUT / "slot-b"), ("onnx", packages["onnx"])):
        with rt.open(source, trusted_keys=[OUT / "keys/edgeship.pub"], threads=1) as session:
            golden = session.check_golden()
            preds = np.array([session.run(x[None])["logits"].argmax() for x in x_test])
            print(
                f"{fmt:6} on {session.backend_name:11}: golden vectors {'PASS' if golden.passed else 'FAIL'} "
                f"(max abs error {golden.max_abs_error:.1e}), accuracy {(preds == y_test).mean():.3f}"
            )
    cli("bench", OUT / "slot-b", "--key", OUT / "keys/edgeship.pub", "--runs", "2000", "--threads", "1")

    step("6. statistics and drift: normal images, then a camera gone wrong (inverted images)")
    with rt.open(OUT / "slot-b", trusted_keys=[OUT / "keys/edgeship.pub"], threads=1) as session:
        for x in x_test[:300]:
            session.run(x[None])
        normal = session.stats_snapshot()
    with rt.open(OUT / "slot-b", trusted_keys=[OUT / "keys/edgeship.pub"], threads=1) as session:
        for x in x_test[:300]:
            session.run((1.0 - x)[None])
        broken = session.stats_snapshot()
    for label, snap in (("normal", normal), ("inverted", broken)):
        d_in, d_out = snap["inputs"]["image"]["drift"], snap["outputs"]["logits"]["drift"]
        print(
            f"{label:9} input PSI {d_in['psi']:.3f}  KS {d_in['ks']:.3f}   class-mix PSI {d_out['class_psi']:.3f}   "
            f"p50 latency {snap['latency']['p50_ms'] * 1000:.0f} us"
        )

    step("7. tamper with the model inside a package: the device refuses it and keeps what it had")
    bad = OUT / "tampered.edgepkg"
    data = bytearray(packages["tflite"].read_bytes())
    with tarfile.open(packages["tflite"]) as tar:
        offset = tar.getmember("model/digits.tflite").offset_data
    data[offset + 200] ^= 0x01
    bad.write_bytes(bytes(data))
    result = cli("pkg", "unpack", bad, "--key", OUT / "keys/edgeship.pub", "--out", OUT / "slot-a")
    assert result.returncode != 0 and not (OUT / "slot-a").exists()
    with rt.open(OUT / "slot-b", trusted_keys=[OUT / "keys/edgeship.pub"]) as session:
        print(
            f"slot-b still serves the verified model: golden vectors {'PASS' if session.check_golden().passed else 'FAIL'}"
        )

    print(
        "\nNot in this demo yet: quantization and the Core ML/TensorRT emitters (compiler), the device agent, "
        "the fleet manager (open issues)."
    )


if __name__ == "__main__":
    main()
