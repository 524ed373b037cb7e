"""The pass registry, the working model, and the recipe's passes section."""

from __future__ import annotations

import pytest
import yaml

from edgeship.compiler import Recipe
from edgeship.compiler.passes import WorkingModel, get, names, run_passes
from edgeship.compiler.recipe import passes_to_dict
from edgeship.errors import UsageError


def test_builtin_passes_are_registered_by_name():
    assert {"prune.magnitude", "prune.channels", "distill.kd"} <= set(names())
    assert get("prune.channels").name == "prune.channels"


def test_unknown_pass_name_suggests_the_nearest():
    with pytest.raises(UsageError, match=r"unknown compiler pass 'prune.chanels' \(did you mean 'prune.channels'\?\)"):
        get("prune.chanels")
    with pytest.raises(UsageError, match=r"did you mean 'distill.kd'"):
        Recipe.from_dict({"passes": ["distil.kd"]})


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.2, True, "half"])
def test_pruning_ratio_outside_0_1_is_refused(bad):
    for name in ("channels", "magnitude"):
        with pytest.raises(UsageError, match=rf"prune.{name}.ratio must be a number strictly between 0 and 1"):
            Recipe.from_dict({"passes": [f"prune.{name}"], "prune": {name: {"ratio": bad}}})
    with pytest.raises(UsageError, match=r"student_ratio must be a number strictly between 0 and 1"):
        Recipe.from_dict({"passes": ["distill.kd"], "distill": {"kd": {"student_ratio": bad}}})


def test_unknown_pass_setting_names_the_key():
    with pytest.raises(UsageError, match=r"prune.channels: unknown key 'ratoi' \(did you mean 'ratio'\?\)"):
        Recipe.from_dict({"passes": ["prune.channels"], "prune": {"channels": {"ratoi": 0.5}}})


def test_settings_for_a_pass_the_recipe_does_not_list_are_refused():
    with pytest.raises(UsageError, match=r"settings for prune.magnitude but passes does not list it"):
        Recipe.from_dict({"passes": ["prune.channels"], "prune": {"magnitude": {"ratio": 0.3}}})
    with pytest.raises(UsageError, match=r"prune.chanels is not a compiler pass"):
        Recipe.from_dict({"prune": {"chanels": {}}})


def test_recipe_round_trip_of_the_passes_keys(tmp_path):
    recipe = Recipe.from_dict(
        {
            "passes": ["prune.channels", "distill.kd"],
            "seed": 7,
            "prune": {"channels": {"ratio": 0.25, "ignore": ["stem"], "epochs": 2, "optimizer": "sgd"}},
            "distill": {"kd": {"temperature": 2, "alpha": 0.3, "features": {"res": "res"}}},
        }
    )
    assert [s.name for s in recipe.passes] == ["prune.channels", "distill.kd"]
    assert recipe.passes[0].settings["ratio"] == 0.25 and recipe.passes[1].settings["temperature"] == 2.0
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(passes_to_dict(recipe)))
    assert Recipe.from_yaml(path) == recipe


def test_working_model_leaves_the_source_untouched(source, train_set):
    import torch

    before = {k: v.clone() for k, v in source.module.state_dict().items()}
    settings = Recipe.from_dict({"passes": ["prune.channels"]}).passes[0].settings
    working = run_passes(source, [("prune.channels", settings)], training=train_set)
    assert working.source is source and working.module is not source.module
    after = source.module.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert working.as_source().sha256 == source.sha256
    assert [e["pass"] for e in working.history] == ["prune.channels"]


def test_a_torch_export_program_is_refused_with_what_to_do(source):
    import torch

    from edgeship.compiler import from_module

    program = torch.export.export(source.module, (torch.from_numpy(source.example["image"]),))
    exported = from_module(program.module(), source.example["image"])
    with pytest.raises(UsageError, match=r"cannot be trained or have layers removed; compile the eager nn.Module"):
        WorkingModel.of(exported)
