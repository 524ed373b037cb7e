"""Training in passes is deterministic given the seed (same seed, same accuracy to 1e-6)."""

from __future__ import annotations

from edgeship.compiler import Recipe
from edgeship.compiler.passes import run_passes


def test_same_seed_gives_the_same_accuracy_twice_and_another_seed_does_not(source, train_set, eval_set):
    import torch

    recipe = {
        "passes": ["prune.channels", "distill.kd"],
        "prune": {"channels": {"epochs": 1}},
        "distill": {"kd": {"epochs": 1, "student_ratio": 0.3}},
    }

    def run(seed: int):
        steps = Recipe.from_dict({**recipe, "seed": seed}).passes
        return run_passes(
            source, [(s.name, s.settings) for s in steps], training=train_set, evaluation=eval_set, seed=seed
        )

    first, second, other = run(3), run(3), run(4)
    for a, b in zip(first.history, second.history):
        assert abs(a["accuracy_after"] - b["accuracy_after"]) <= 1e-6
    assert all(torch.equal(v, second.module.state_dict()[k]) for k, v in first.module.state_dict().items())
    assert any(not torch.equal(v, other.module.state_dict()[k]) for k, v in first.module.state_dict().items())
