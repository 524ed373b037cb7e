"""The TFLite quantizer the emitter ships (compiler/quantizers/tflite.py): which op scopes it offers
a search, what its recipe stores int8, and the scope regexes its recipes take. Real ai-edge-quantizer."""

from __future__ import annotations

from edgeship.compiler.quantizers.tflite import TFLiteQuantizer, scope_regex, tflite_ops


def test_embedding_lookups_are_no_weight_only_candidates_in_static_int8(tmp_path):
    # Their int8 path already is weight-only; setting one apart could only make the table float.
    import litert_torch
    import torch

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Embedding(50, 16), torch.nn.Linear(16, 4)).eval()
    ids = torch.tensor([[1, 7, 3]], dtype=torch.int32)
    fp32 = tmp_path / "emb.tflite"
    litert_torch.convert(model, (ids,)).export(str(fp32))
    lookups = [scope for key, scope, _ in tflite_ops(fp32) if key.value == "EMBEDDING_LOOKUP"]
    assert len(lookups) == 1
    feeds = [{"ids": ids.numpy()}]
    quantize = TFLiteQuantizer("int8-static", calibration=feeds)
    assert lookups[0] not in quantize.candidates(fp32) and quantize.candidates(fp32)
    quantize.fallback = "float"
    assert lookups[0] in quantize.candidates(fp32)
    # And the static model stores the table int8 (the recipe's dynamic config for lookups).
    out = tmp_path / "static.tflite"
    quantize(fp32, out, [])
    from edgeship.compiler.emitters.tflite import weight_bytes

    assert weight_bytes(out) < 0.4 * weight_bytes(fp32)


def test_scope_regex_matches_exactly_one_scope():
    import re

    regex = scope_regex("model/fc2;1;")
    assert re.search(regex, "model/fc2;1;")
    assert not re.search(regex, "model/fc2;1;model/fc2;2;")
    assert not re.search(regex, "xmodel/fc2;1;")


def test_w8a16_holds_a_bert_that_int8_static_loses_and_keeps_the_mask_float(tmp_path):
    """TFLite 16x8 (int8 weights, int16 activations) on a BERT with LayerNorm outlier channels: the
    ops around the additive attention mask stay float (one int16 scale for both the -10,000 and the
    attention scores would round the scores away), and the worst held-out sample stays close to fp32 where int8-static
    loses 100 times as much."""
    import pytest

    pytest.importorskip("transformers")
    import numpy as np

    from edgeship.compiler import Dataset, Recipe, compile_model
    from edgeship.runtime.package import generate_key
    from tests.compiler.passes.test_smooth import source_of, tiny_bert, tokens

    report = compile_model(
        source_of(tiny_bert(outliers=25.0)),
        ["android-arm64"],
        tmp_path / "dist",
        generate_key(),
        recipe=Recipe.from_dict(
            {
                "name": "bert",
                "variants": {"android-arm64": ["int8-static", "w8a16"]},
                "validation": {"min_cosine": 0},  # both are packaged: the test compares them
            }
        ),
        calibration=Dataset(tokens(32, 1)),
        evaluation=Dataset(tokens(16, 2)),
    )
    by_precision = {v.precision: v for v in report.variants}
    w8a16, int8 = by_precision["w8a16"], by_precision["int8-static"]
    assert w8a16.package is not None and int8.package is not None, (w8a16, int8)
    wide = [n for n in w8a16.notes if "wider than +-1000" in n]
    assert wide and int(wide[0].split()[0]) >= 2, w8a16.notes  # at least the mask add and its softmax
    assert any(n.startswith("int16 (TFLite 16x8) activations") for n in w8a16.notes)
    print(f"tiny BERT worst cosine: w8a16 {w8a16.metrics.cosine_min:.4f}, int8-static {int8.metrics.cosine_min:.4f}")
    # measured: 0.99994 against 0.99348 (1 - cosine 100x smaller)
    assert w8a16.metrics.cosine_min > 0.999
    assert 1 - w8a16.metrics.cosine_min < (1 - int8.metrics.cosine_min) / 10
    assert np.isfinite(w8a16.metrics.latency_median_ms)


def test_w8a16_refuses_float_io_before_converting(tmp_path):
    import numpy as np
    import pytest
    import torch

    from edgeship.compiler import Dataset, from_module
    from edgeship.compiler.emitters.tflite import emit
    from edgeship.errors import UsageError

    x = np.zeros((1, 4), np.float32)
    source = from_module(torch.nn.Linear(4, 2).eval(), x, input_names=["x"])
    with pytest.raises(UsageError, match="static_io: float is for int8-static; a w8a16 model keeps its int16 I/O"):
        emit(source, "w8a16", tmp_path / "w", Dataset({"x": x}), static_io="float")
    assert not (tmp_path / "w").exists()  # refused before any work


def test_layer_inputs_follow_module_paths_through_lists_shared_inputs_and_repeated_calls(tmp_path):
    """``tflite_layer_inputs`` finds each Linear's fully connected op from litert-torch's tensor names:
    inside a ModuleList (iterated, so it has no scope of its own), three siblings reading one tensor
    (whose weights' names list each other's scopes), a layer called twice (one input per call)."""
    import litert_torch
    import torch

    from edgeship.compiler.quantizers.tflite import tflite_layer_inputs

    class Block(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList([torch.nn.Linear(8, 8) for _ in range(2)])
            self.query, self.key, self.value = (torch.nn.Linear(8, 8) for _ in range(3))
            self.out = torch.nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for layer in self.layers:
                x = torch.relu(layer(x))
            mixed = self.query(x) * self.key(x) + self.value(x)
            return self.out(mixed) + self.out(torch.relu(mixed))

    torch.manual_seed(0)
    model = torch.nn.Sequential(Block(), torch.nn.Linear(8, 3)).eval()
    fp32 = tmp_path / "block.tflite"
    litert_torch.convert(model, (torch.ones(2, 8),)).export(str(fp32))
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    found = tflite_layer_inputs(fp32, model, [*linears, "0.missing"])
    assert set(found) == set(linears), found
    assert len(found["0.out"]) == 2 and len(set(found["0.out"])) == 2  # one per call, each its own input
    assert found["0.query"] == found["0.key"] == found["0.value"]  # the same tensor: the second ReLU's output
    assert found["0.layers.0"] != found["0.layers.1"]


def test_layer_inputs_look_through_same_scale_ops_and_skip_activation_matmuls_and_shared_scopes(tmp_path):
    """What a layer reads through a pool, a transpose or a reshape takes that tensor's scale in
    ai-edge-quantizer, so its range is set in front of them (here the conv's output); attention
    scores (two activations multiplied) are no layer's; two ModuleLists' first Linears share
    litert-torch's scope (``Linear_0``) and are left out rather than guessed."""
    import litert_torch
    import torch
    from ai_edge_quantizer.utils import tfl_flatbuffer_utils as fb

    from edgeship.compiler.quantizers.tflite import tflite_layer_inputs

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
            self.fc = torch.nn.Linear(4 * 4 * 4, 8)
            self.q, self.k = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
            self.a = torch.nn.ModuleList([torch.nn.Linear(8, 8)])
            self.b = torch.nn.ModuleList([torch.nn.Linear(8, 8)])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(torch.nn.functional.max_pool2d(self.conv(x), 2).flatten(1)).unsqueeze(1)
            scores = self.q(h) @ self.k(h).transpose(1, 2)
            h = scores * h
            for layer in (*self.a, *self.b):
                h = layer(h)
            return h

    torch.manual_seed(0)
    model = Net().eval()
    fp32 = tmp_path / "net.tflite"
    litert_torch.convert(model, (torch.ones(1, 1, 8, 8),)).export(str(fp32))
    found = tflite_layer_inputs(fp32, model, ["conv", "fc", "q", "k", "a.0", "b.0"])
    assert set(found) == {"conv", "fc", "q", "k"}, found
    assert all(len(tensors) == 1 for tensors in found.values()), found
    flat = fb.read_model(fp32.read_bytes())
    subgraph = flat.subgraphs[0]
    ops = [
        (fb.TFL_OP_CODE_TO_NAME[flat.operatorCodes[op.opcodeIndex].builtinCode].value, op) for op in subgraph.operators
    ]

    def output(kind: str) -> str:
        return next(subgraph.tensors[op.outputs[0]].name.decode() for k, op in ops if k == kind)

    assert "BATCH_MATMUL" in [k for k, _ in ops]  # the scores are computed, and mapped to no layer
    assert found["conv"] == [subgraph.tensors[subgraph.inputs[0]].name.decode()]  # in front of the NCHW reshape
    assert found["fc"] == [output("DEPTHWISE_CONV_2D")]  # max pool, transpose and reshape take its scale
    assert found["q"] == found["k"] == [output("FULLY_CONNECTED")]  # both read fc's output
