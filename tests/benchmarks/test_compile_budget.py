"""benchmarks/compile_budget.py's model: the outlier channels it adds widen one activation range
without changing what the network computes (the benchmark's claim that int8 hurts it for that reason)."""

from __future__ import annotations

import numpy as np


def test_outlier_channels_widen_the_activation_range_and_keep_the_function():
    import torch

    from benchmarks.compile_budget import fold_batch_norm, mobilenet_style, with_outlier_channels

    torch.manual_seed(0)
    model = mobilenet_style()
    with torch.no_grad():  # non-trivial batch norm statistics, so that folding has something to fold
        model.train()
        model(torch.randn(64, 1, 32, 32))
    model = fold_batch_norm(model.eval())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    x = np.random.default_rng(0).random((16, 1, 32, 32), dtype=np.float32)

    def ranges(net):
        out, h = [], torch.from_numpy(x)
        with torch.no_grad():
            for layer in net.features:
                h = layer(h)
                if isinstance(layer, torch.nn.ReLU):
                    out.append(h.amax((0, 2, 3)))
            return out, net(torch.from_numpy(x))

    before, logits = ranges(model)
    widened, done = with_outlier_channels(model, x, 50.0, 2, layers=[1])
    after, logits_after = ranges(widened)
    torch.testing.assert_close(logits_after, logits, rtol=1e-4, atol=1e-4)
    (line,) = done
    assert line.startswith("block 2 pointwise 32->64")
    # ReLU outputs: stem, then (depthwise, pointwise) per block: block 2's pointwise is index 4, the
    # depthwise it feeds index 5. Two channels of each are 50x wider; the other tensors are unchanged.
    for i in (4, 5):
        ratio = (after[i] / before[i].clamp_min(1e-12))[before[i] > 0]
        assert int((ratio > 49).sum()) == 2 and int((abs(ratio - 1) < 1e-4).sum()) == len(ratio) - 2
    for i in (0, 1, 2, 3, 6, 7, 8):
        torch.testing.assert_close(after[i], before[i])
