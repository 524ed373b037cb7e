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
