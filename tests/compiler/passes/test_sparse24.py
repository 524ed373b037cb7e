"""prune.sparse24: the 2:4 pattern on every eligible layer, kept through fine-tuning, and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from edgeship.compiler import Recipe
from edgeship.compiler.passes import run_passes
from edgeship.compiler.passes.sparse24 import is_2_4, mask_2_4
from edgeship.errors import UsageError


def steps(settings: dict) -> list:
    recipe = Recipe.from_dict({"passes": ["prune.sparse24"], "prune": {"sparse24": settings}})
    return [(s.name, s.settings) for s in recipe.passes]


def groups_of_4(weight) -> np.ndarray:
    """Zeros per group of 4 input channels, computed independently of the pass's own helpers."""
    w = weight.detach().numpy()
    w = np.moveaxis(w, 1, -1)  # input channels last: [out, *kernel, in]
    return (w.reshape(*w.shape[:-1], w.shape[-1] // 4, 4) == 0).sum(-1)


def test_every_group_of_4_keeps_2_zeros_after_fine_tuning_and_the_function_stays_close(source, train_set, eval_set):
    import torch

    working = run_passes(source, steps({"epochs": 4, "lr": 3e-3}), training=train_set, evaluation=eval_set)
    entry = working.history[0]
    module = working.module
    assert entry["layers_2_4"] == ["head", "hidden", "left", "res", "right"]
    assert entry["dense"] == {"stem": "1 input channel(s) per group, not a multiple of 4"}
    for name in entry["layers_2_4"]:
        zeros = groups_of_4(getattr(module, name).weight)
        assert zeros.min() >= 2, name
    assert not any(n.endswith("weight_orig") for n, _ in module.named_parameters())
    assert entry["sparsity"] == pytest.approx(0.5, abs=0.01)
    # Fine-tuning moved the weights (the kept ones changed) and won back what the mask cost.
    assert entry["fine_tune"]["loss"] == "cross-entropy on labels"
    assert entry["accuracy_pruned"] < entry["accuracy_before"] - 0.2, entry  # the mask alone costs a lot here
    assert entry["accuracy_after"] >= entry["accuracy_before"] - 0.02, entry
    x = torch.from_numpy(eval_set.inputs["image"])
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(module(x), source.module(x), dim=1)
    assert float(cos.mean()) > 0.9


def test_without_training_data_the_mask_alone_is_applied(source):
    working = run_passes(source, steps({}))
    assert working.history[0]["fine_tune"] is None
    assert all(is_2_4(getattr(working.module, n).weight) for n in working.history[0]["layers_2_4"])
    assert not is_2_4(working.module.stem.weight)


def test_mask_keeps_the_two_largest_magnitudes_of_each_group_along_input_channels():
    import torch

    w = torch.tensor([[0.1, -3.0, 2.0, 0.5, 4.0, 0.0, -0.2, 1.0]])
    assert mask_2_4(w).tolist() == [[0, 1, 1, 0, 1, 0, 0, 1]]
    conv = torch.randn(3, 8, 2, 2)
    masked = conv * mask_2_4(conv)
    assert (groups_of_4(masked) == 2).all()
    # Grouped along dim 1, not along the flattened kernel: each (out, kh, kw) position has its own groups.
    assert is_2_4(masked) and not is_2_4(masked.transpose(1, 2).contiguous().reshape(3, 8, 2, 2) + 1)


def test_naming_a_layer_that_cannot_be_2_4_says_why(source):
    with pytest.raises(UsageError, match=r"layer 'stem' cannot be 2:4 sparse: 1 input channel\(s\) per group"):
        run_passes(source, steps({"layers": ["stem", "res"]}))
    with pytest.raises(UsageError, match=r"layer 'bn' cannot be 2:4 sparse: a BatchNorm2d has no Conv/Linear weight"):
        run_passes(source, steps({"layers": ["bn"]}))
    with pytest.raises(UsageError, match=r"no layer 'rse' \(did you mean 'res'\?\)"):
        run_passes(source, steps({"layers": ["rse"]}))


def test_only_named_layers_and_not_ignored_ones_become_sparse(source):
    working = run_passes(source, steps({"layers": ["res", "hidden"], "ignore": ["hidden"], "fine_tune": False}))
    entry = working.history[0]
    assert entry["layers_2_4"] == ["res"] and entry["dense"] == {"hidden": "ignored by the recipe"}
    assert not is_2_4(working.module.left.weight)


def test_a_model_with_no_eligible_layer_is_refused(digits):
    import torch

    from edgeship.compiler import from_module

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64 + 1, 10)).eval()
    x = np.zeros((1, 65), np.float32)
    src = from_module(model, x, input_names=["x"], output_names=["y"])
    with pytest.raises(UsageError, match=r"no Conv or Linear layer of the model can be 2:4 sparse \(1: 65 input"):
        run_passes(src, steps({}))
