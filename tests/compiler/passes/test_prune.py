"""prune.channels and prune.magnitude on a residual + concat CNN, and one real compile of a pruned model."""

from __future__ import annotations

import numpy as np
import pytest

from edgeship.compiler import Dataset, Recipe, compile_model
from edgeship.compiler.passes import run_passes
from edgeship.errors import UsageError
from edgeship.runtime.package import generate_key

KEY = generate_key()


def steps(**sections):
    """Recipe-validated (name, settings) steps for ``run_passes``."""
    names = [f"{family}.{kind}" for family, kinds in sections.items() for kind in kinds]
    return [(s.name, s.settings) for s in Recipe.from_dict({"passes": names, **sections}).passes]


def test_channel_pruning_removes_channels_across_residual_and_concat(source, train_set, eval_set):
    import torch

    working = run_passes(
        source, steps(prune={"channels": {"ratio": 0.5, "epochs": 2}}), training=train_set, evaluation=eval_set
    )
    entry = working.history[0]
    pruned = working.module
    assert pruned.stem.out_channels == 4 and pruned.bn.num_features == 4
    # The residual add couples stem and res: both keep the same (halved) width.
    assert pruned.res.out_channels == pruned.stem.out_channels == pruned.res.in_channels
    # The concat feeds hidden: its input shrinks by what left and right lost.
    assert pruned.hidden.in_features == pruned.left.out_channels + pruned.right.out_channels
    assert pruned.head.out_features == 10  # the output layer is never pruned
    assert entry["after"]["params"] < 0.5 * entry["before"]["params"]
    assert entry["after"]["macs"] < 0.5 * entry["before"]["macs"]
    with torch.no_grad():
        assert pruned(torch.from_numpy(eval_set.inputs["image"][:3])).shape == (3, 10)
    assert entry["fine_tune"]["loss"] == "cross-entropy on labels"
    assert entry["accuracy_after"] > entry["accuracy_pruned"], entry


def test_naming_the_output_layer_is_an_error_that_names_it(source):
    with pytest.raises(UsageError, match=r"layer 'head' cannot be pruned: its output channels are the model's output"):
        run_passes(source, steps(prune={"channels": {"layers": ["stem", "head"]}}))


def test_naming_a_layer_without_channels_or_a_missing_one(source):
    with pytest.raises(UsageError, match=r"layer 'pool' is a MaxPool2d, which has no output channels to prune"):
        run_passes(source, steps(prune={"channels": {"layers": ["pool"]}}))
    with pytest.raises(UsageError, match=r"the model has no layer 'stme' \(did you mean 'stem'\?\)"):
        run_passes(source, steps(prune={"channels": {"layers": ["stme"]}}))
    with pytest.raises(UsageError, match=r"layer 'bn' is a BatchNorm2d, which has no weights this pass prunes"):
        run_passes(source, steps(prune={"magnitude": {"layers": ["bn"]}}))


def test_only_the_named_layers_shrink(source):
    working = run_passes(source, steps(prune={"channels": {"layers": ["hidden"], "fine_tune": False}}))
    assert working.history[0]["layers"] == {"hidden": [32, 16]}
    assert working.module.stem.out_channels == 8


def test_magnitude_pruning_is_permanent_and_survives_fine_tuning(source, train_set):
    import torch

    working = run_passes(source, steps(prune={"magnitude": {"ratio": 0.6, "epochs": 1}}), training=train_set)
    module = working.module
    assert not any(n.endswith("weight_orig") for n, _ in module.named_parameters())
    assert not any(hasattr(m, "weight_mask") for m in module.modules())
    weights = [m.weight for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    assert zeros == pytest.approx(0.6, abs=0.01)
    assert working.history[0]["sparsity"] == pytest.approx(zeros, abs=1e-4)


def test_without_labels_fine_tuning_matches_the_source_and_without_data_it_is_skipped(source, train_set):
    unlabeled = Dataset(train_set.inputs)
    tuned = run_passes(source, steps(prune={"channels": {"epochs": 1}}), training=unlabeled)
    assert tuned.history[0]["fine_tune"]["loss"] == "mse to the fp32 source's outputs"
    assert run_passes(source, steps(prune={"channels": {}})).history[0]["fine_tune"] is None


def test_pruned_model_compiles_to_tflite_and_the_package_records_the_passes(source, train_set, eval_set, tmp_path):
    import json

    import edgeship.runtime as rt
    from edgeship.runtime.package import TrustedKeys, read_manifest

    recipe = Recipe.from_dict(
        {
            "name": "pruned",
            "variants": {"android-arm64": ["fp32"]},
            "validation": {"latency_runs": 2},
            "passes": ["prune.channels"],
            "prune": {"channels": {"ratio": 0.5, "epochs": 2}},
        }
    )
    report = compile_model(
        source, ["android-arm64"], tmp_path, KEY, recipe=recipe, training=train_set, evaluation=eval_set
    )
    (variant,) = report.variants
    assert variant.error is None and variant.package is not None
    entry = json.loads(report.report_json.read_text())["passes"][0]
    assert entry["pass"] == "prune.channels" and entry["after"]["params"] < entry["before"]["params"] / 2
    # fp32 weights of the pruned model, not of the source: the artifact shrank with the layers.
    assert 0.8 * 4 * entry["after"]["params"] <= variant.metrics.weight_bytes < 4 * entry["before"]["params"] * 0.6
    assert abs(variant.metrics.accuracy - entry["accuracy_after"]) < 0.01
    manifest = read_manifest(variant.package, trusted_keys=TrustedKeys.of([KEY.public_key()])).manifest
    assert manifest.provenance.source_sha256 == source.sha256
    assert manifest.provenance.recipe["passes"] == ["prune.channels"]
    assert Recipe.from_dict({"passes": ["prune.channels"], "prune": manifest.provenance.recipe["prune"]}) == Recipe(
        passes=recipe.passes
    )
    with rt.open(variant.package, trusted_keys=TrustedKeys.of([KEY.public_key()])) as session:
        out = session.run({"image": eval_set.inputs["image"][:1]})
    assert np.asarray(next(iter(out.values()))).shape == (1, 10)


def test_ctrl_c_while_fine_tuning_leaves_no_package(source, train_set, tmp_path):
    recipe = Recipe.from_dict({"variants": {"android-arm64": ["fp32"]}, "passes": ["prune.channels"]})

    def interrupt(message: str) -> None:
        if "epoch 2/" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compile_model(source, ["android-arm64"], tmp_path, KEY, recipe=recipe, training=train_set, progress=interrupt)
    assert list(tmp_path.iterdir()) == []
