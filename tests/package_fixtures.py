"""Fixtures that build real, signed packages on disk."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edgeship.runtime.package import (
    Golden,
    Manifest,
    Provenance,
    TensorSpec,
    TrustedKeys,
    generate_key,
    write_package,
)


@dataclass
class Publisher:
    key: Ed25519PrivateKey
    trusted: TrustedKeys


def draft_manifest(**overrides: object) -> Manifest:
    fields: dict[str, object] = {
        "name": "digits-cnn",
        "version": 3,
        "target": "linux-x86_64",
        "format": "onnx",
        "precision": "fp32",
        "artifact_path": "model/model.onnx",
        "inputs": (TensorSpec("x", "float32", (None, 1, 8, 8)),),
        "outputs": (TensorSpec("logits", "float32", (None, 10)),),
        "files": (),
        "provenance": Provenance(tools={"edgeship": "test"}),
        "golden": Golden("golden/vectors.npz", rtol=1e-4, atol=1e-5),
        "report_path": "report/report.json",
    }
    fields.update(overrides)
    return Manifest(**fields)  # type: ignore[arg-type]


def sample_contents() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    import io

    buf = io.BytesIO()
    np.savez(
        buf,
        **{
            "input:x": rng.standard_normal((2, 1, 8, 8), dtype=np.float32),
            "output:logits": rng.standard_normal((2, 1, 10), dtype=np.float32),
        },
    )
    return {
        "model/model.onnx": rng.bytes(3000),
        "model/model.onnx.data": rng.bytes(5000),
        "golden/vectors.npz": buf.getvalue(),
        "report/report.json": b'{"checks": []}',
    }


@pytest.fixture(scope="session")
def publisher() -> Publisher:
    key = generate_key()
    return Publisher(key, TrustedKeys.of([key.public_key()]))


@pytest.fixture(scope="session")
def stranger() -> Publisher:
    key = generate_key()
    return Publisher(key, TrustedKeys.of([key.public_key()]))


@pytest.fixture
def make_package(tmp_path: Path, publisher: Publisher) -> Callable[..., Path]:
    counter = iter(range(1_000_000))

    def make(
        contents: dict[str, bytes] | None = None, key: Ed25519PrivateKey | None = None, **overrides: object
    ) -> Path:
        out = tmp_path / f"pkg{next(counter)}.edgepkg"
        write_package(out, draft_manifest(**overrides), contents or sample_contents(), [key or publisher.key])
        return out

    return make


@pytest.fixture
def package(make_package: Callable[..., Path]) -> Path:
    return make_package()
