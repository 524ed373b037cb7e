"""Validation scores every output of a model, and the headline figure is the worst output's."""

from __future__ import annotations

import numpy as np
import pytest

from edgeship.compiler import Dataset, Recipe, compile_model, from_module
from edgeship.runtime.package import generate_key

KEY = generate_key()


def two_outputs():
    """Logits, and features from a layer with tiny weights: fp16 rounds those to a few subnormal
    steps (ONNX Runtime computes in fp32 on this CPU, but the stored weights are fp16), so the
    second output of the fp16 artifact drifts (cosine about 0.96) while the first stays exact."""
    import torch

    class TwoOutputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.head = torch.nn.Linear(16, 8)
            self.features = torch.nn.Linear(16, 8)
            with torch.no_grad():
                self.features.weight.mul_(1e-6)
                self.features.bias.mul_(1e-6)

        def forward(self, x):
            return self.head(x), self.features(x)

    return TwoOutputs()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    x = np.random.default_rng(0).standard_normal((64, 16)).astype(np.float32)
    source = from_module(two_outputs(), x[:1], input_names=["x"], output_names=["logits", "features"])
    recipe = Recipe.from_dict({"variants": {"linux-x86_64": ["fp32", "fp16"]}, "validation": {"latency_runs": 2}})
    out = tmp_path_factory.mktemp("dist")
    return compile_model(source, ["linux-x86_64"], out, KEY, recipe=recipe, calibration=Dataset({"x": x})), out


def test_every_output_is_scored(compiled):
    report, _ = compiled
    fp32 = next(v for v in report.variants if v.precision == "fp32")
    assert set(fp32.metrics.outputs) == {"logits", "features"}
    for figures in fp32.metrics.outputs.values():
        assert figures["cosine_min"] > 0.99999 and figures["max_abs_error"] < 1e-5
    assert fp32.package is not None and fp32.error is None


def test_a_second_output_broken_by_fp16_fails_the_variant(compiled):
    report, out = compiled
    fp16 = next(v for v in report.variants if v.precision == "fp16")
    per = fp16.metrics.outputs
    assert per["logits"]["cosine_min"] > 0.9999  # the first output alone would have passed
    assert per["features"]["cosine_min"] < 0.999
    assert fp16.metrics.worst_output == "features"
    assert fp16.metrics.cosine_min == per["features"]["cosine_min"]
    assert fp16.metrics.cosine_mean == min(p["cosine_mean"] for p in per.values())
    assert fp16.package is None and "output 'features'" in fp16.error
    assert not list(out.glob("*fp16*.edgepkg"))
