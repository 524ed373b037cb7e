"""Real models for runtime tests: the digits CNN as TFLite (fp32, static int8) and ONNX, packaged and signed.

Built once per test run and shared by the xdist workers through a file lock, because
training and conversion take tens of seconds.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from edgeship.runtime.package import (
    Golden,
    Manifest,
    Preprocessing,
    Provenance,
    Quantization,
    TensorSpec,
    TrustedKeys,
    load_private_key,
    load_public_key,
    write_keypair,
    write_package,
)
from edgeship.runtime.stats import compute_baseline


@dataclass(frozen=True)
class Models:
    root: Path
    public_key: Path
    x_test: np.ndarray
    y_test: np.ndarray
    torch_accuracy: float

    @property
    def trusted(self) -> TrustedKeys:
        return TrustedKeys.of([load_public_key(self.public_key)])

    def package(self, name: str) -> Path:
        return self.root / f"{name}.edgepkg"

    def artifact(self, name: str) -> Path:
        return self.root / name


def golden_npz(inputs: dict[str, np.ndarray], outputs: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{f"input:{k}": v for k, v in inputs.items()}, **{f"output:{k}": v for k, v in outputs.items()})
    return buf.getvalue()


def _build(root: Path) -> None:
    import litert_torch
    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from litert_torch.quantize.quant_config import QuantConfig
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    from examples.digits import train

    torch.set_num_threads(1)
    digits = train()
    model = digits.model
    np.save(root / "x_test.npy", digits.x_test)
    np.save(root / "y_test.npy", digits.y_test)
    (root / "accuracy.json").write_text(json.dumps(digits.accuracy))
    write_keypair(root / "keys", "models")
    key = load_private_key(root / "keys/models.key")
    one = torch.from_numpy(digits.x_test[:1])
    calib = digits.x_train[:256]
    with torch.no_grad():
        calib_out = model(torch.from_numpy(calib)).numpy()
        golden_in = digits.x_test[:6]
        golden_out = model(torch.from_numpy(golden_in)).numpy()
    baseline = json.dumps(compute_baseline({"image": [calib]}, {"logits": [calib_out]})).encode()
    cases_in = golden_in[:, None]  # 6 cases of batch 1
    cases_out = golden_out[:, None]
    tools = {"torch": torch.__version__, "litert-torch": litert_torch.__version__}

    def package(
        name: str,
        fmt: str,
        artifact: Path,
        artifact_name: str,
        inputs,
        outputs,
        golden: bytes,
        tol: Golden,
        precision: str = "fp32",
        extra_files: dict | None = None,
    ) -> None:
        draft = Manifest(
            name="digits-cnn",
            version=1,
            target="linux-x86_64",
            format=fmt,
            precision=precision,
            artifact_path=f"model/{artifact_name}",
            inputs=inputs,
            outputs=outputs,
            files=(),
            golden=tol,
            baseline_path="baseline/stats.json",
            provenance=Provenance(tools=tools),
        )
        contents = {f"model/{artifact_name}": artifact, "golden/vectors.npz": golden, "baseline/stats.json": baseline}
        contents.update(extra_files or {})
        write_package(root / f"{name}.edgepkg", draft, contents, [key])

    image = TensorSpec("image", "float32", (1, 1, 8, 8))
    logits = TensorSpec("logits", "float32", (1, 10))
    tight = Golden("golden/vectors.npz", rtol=1e-4, atol=1e-4)

    # TFLite fp32
    litert_torch.convert(model, (one,)).export(str(root / "digits_fp32.tflite"))
    package(
        "tflite-fp32",
        "tflite",
        root / "digits_fp32.tflite",
        "digits.tflite",
        (image,),
        (logits,),
        golden_npz({"image": cases_in}, {"logits": cases_out}),
        tight,
    )

    # TFLite static int8 with int8 I/O (PT2E)
    quantizer = PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
    prepared = prepare_pt2e(torch.export.export(model, (one,)).module(), quantizer)
    for x in calib:
        prepared(torch.from_numpy(x[None]))
    converted = convert_pt2e(prepared, fold_quantize=False)
    litert_torch.convert(converted, (one,), quant_config=QuantConfig(pt2e_quantizer=quantizer)).export(
        str(root / "digits_int8.tflite")
    )
    from ai_edge_litert.interpreter import Interpreter

    interp = Interpreter(model_path=str(root / "digits_int8.tflite"), num_threads=1)
    interp.allocate_tensors()
    din, dout = interp.get_input_details()[0], interp.get_output_details()[0]
    (si, zi), (so, zo) = din["quantization"], dout["quantization"]
    outs = []
    for x in golden_in:
        q = np.clip(np.rint(x[None] / si + zi), -128, 127).astype(np.int8)
        interp.set_tensor(din["index"], q)
        interp.invoke()
        outs.append((interp.get_tensor(dout["index"]).astype(np.float32) - zo) * so)
    package(
        "tflite-int8",
        "tflite",
        root / "digits_int8.tflite",
        "digits.tflite",
        (TensorSpec("image", "int8", (1, 1, 8, 8), Quantization((si,), (zi,))),),
        (TensorSpec("logits", "int8", (1, 10), Quantization((so,), (zo,))),),
        golden_npz({"image": cases_in}, {"logits": np.stack(outs)}),
        Golden("golden/vectors.npz", rtol=0.0, atol=so * 1.01),
        precision="int8-static",
    )

    # ONNX fp32, dynamic batch
    batch = torch.export.Dim("batch", min=1, max=1024)
    torch.onnx.export(
        model,
        (torch.from_numpy(digits.x_test[:2]),),
        str(root / "digits.onnx"),
        dynamo=True,
        external_data=False,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes=({0: batch},),
        verbose=False,
    )
    dyn_image = TensorSpec("image", "float32", (None, 1, 8, 8))
    dyn_logits = TensorSpec("logits", "float32", (None, 10))
    package(
        "onnx-fp32",
        "onnx",
        root / "digits.onnx",
        "digits.onnx",
        (dyn_image,),
        (dyn_logits,),
        golden_npz({"image": cases_in}, {"logits": cases_out}),
        tight,
    )

    # The same ONNX model, but the caller passes NHWC images in 0..16: the manifest's preprocessing
    # transposes and scales them.
    pre = Preprocessing(layout_from="NHWC", layout_to="NCHW", scale=1 / 16)
    raw_cases = (cases_in * 16.0).transpose(0, 1, 3, 4, 2)
    package(
        "onnx-preprocessed",
        "onnx",
        root / "digits.onnx",
        "digits.onnx",
        (TensorSpec("image", "float32", (None, 1, 8, 8), preprocessing=pre),),
        (dyn_logits,),
        golden_npz({"image": raw_cases}, {"logits": cases_out}),
        tight,
    )
    _build_two_input(root, key, tools)
    (root / "done").write_text("ok")


class _TwoInput:
    """A bag-of-embeddings text classifier: two inputs (token ids, mask), like a transformer's."""

    @staticmethod
    def build():
        import torch

        class Model(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.emb = torch.nn.Embedding(100, 8)
                self.fc = torch.nn.Linear(8, 4)

            def forward(self, tokens, mask):
                e = self.emb(tokens) * mask.unsqueeze(-1)
                return self.fc(e.sum(1) / mask.sum(1, keepdim=True).clamp(min=1))

        torch.manual_seed(1)
        return Model().eval()


def _build_two_input(root: Path, key, tools: dict) -> None:
    """Two-input model as TFLite (native names args_0/args_1, int32 ids) and ONNX (names match)."""
    import litert_torch
    import torch

    model = _TwoInput.build()
    rng = np.random.default_rng(3)
    tokens = rng.integers(0, 100, size=(5, 1, 16)).astype(np.int64)
    mask = np.ones((5, 1, 16), np.float32)
    mask[:, :, 11:] = 0
    with torch.no_grad():
        out = np.stack([model(torch.from_numpy(t), torch.from_numpy(m)).numpy() for t, m in zip(tokens, mask)])
    t0, m0 = torch.from_numpy(tokens[0]), torch.from_numpy(mask[0])
    litert_torch.convert(model, (t0, m0)).export(str(root / "two.tflite"))
    torch.onnx.export(
        model,
        (t0, m0),
        str(root / "two.onnx"),
        dynamo=True,
        external_data=False,
        input_names=["tokens", "mask"],
        output_names=["scores"],
        verbose=False,
    )
    for name, fmt, path, id_dtype in (
        ("two-tflite", "tflite", "two.tflite", "int32"),
        ("two-onnx", "onnx", "two.onnx", "int64"),
    ):
        draft = Manifest(
            name="bag-of-embeddings",
            version=1,
            target="linux-x86_64",
            format=fmt,
            precision="fp32",
            artifact_path=f"model/{path}",
            inputs=(TensorSpec("tokens", id_dtype, (1, 16)), TensorSpec("mask", "float32", (1, 16))),
            outputs=(TensorSpec("scores", "float32", (1, 4)),),
            files=(),
            golden=Golden("golden/vectors.npz", rtol=1e-4, atol=1e-5),
            provenance=Provenance(tools=tools),
        )
        golden = golden_npz({"tokens": tokens.astype(id_dtype), "mask": mask}, {"scores": out})
        write_package(
            root / f"{name}.edgepkg", draft, {f"model/{path}": root / path, "golden/vectors.npz": golden}, [key]
        )


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent / "edgeship-models"
    shared.mkdir(exist_ok=True)
    with FileLock(str(shared) + ".lock"):
        if not (shared / "done").exists():
            for p in shared.iterdir():
                if p.is_file():
                    p.unlink()
            _build(shared)
    return Models(
        shared,
        shared / "keys/models.pub",
        np.load(shared / "x_test.npy"),
        np.load(shared / "y_test.npy"),
        json.loads((shared / "accuracy.json").read_text()),
    )
