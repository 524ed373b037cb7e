"""distill.kd: student derived or given, feature matching with adapters, and the errors it raises."""

from __future__ import annotations

import pytest

from edgeship.compiler import Dataset, Recipe
from edgeship.compiler.passes import run_passes
from edgeship.errors import UsageError
from examples.digits import residual_cnn


def kd(**settings):
    return [
        ("distill.kd", Recipe.from_dict({"passes": ["distill.kd"], "distill": {"kd": settings}}).passes[0].settings)
    ]


def test_student_derived_by_pruning_learns_from_the_teacher(source, train_set, eval_set):
    working = run_passes(source, kd(student_ratio=0.5, epochs=8, lr=3e-3), training=train_set, evaluation=eval_set)
    entry = working.history[0]
    assert entry["after"]["params"] < entry["teacher"]["params"] / 2
    assert working.module.stem.out_channels == 4
    assert entry["accuracy_after"] > 0.6, entry  # ten classes: chance is 0.1
    assert len(entry["training"]["loss_per_epoch"]) == 8
    assert entry["accuracy_teacher"] > 0.8


def test_a_given_student_is_trained_and_the_recipe_module_stays_untouched(source, train_set):
    import torch

    student = residual_cnn(width=4)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    working = run_passes(source, kd(student=student, epochs=1, features={"res": "res"}), training=train_set)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert working.module is not student and working.module.res.out_channels == 4
    entry = working.history[0]
    assert entry["student"] == "given" and entry["adapters"] == 1  # 4 -> 8 channels: a 1x1 conv adapter
    assert entry["settings"]["student"] == "<Net module>"


def test_teacher_and_student_with_different_output_shapes_are_refused(source, train_set):
    import torch

    student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 5))
    with pytest.raises(UsageError, match=r"the teacher's output has shape \(1, 10\) and the student's \(1, 5\)"):
        run_passes(source, kd(student=student), training=train_set)


def test_training_data_without_labels_when_the_loss_needs_them(source, train_set):
    unlabeled = Dataset(train_set.inputs)
    with pytest.raises(UsageError, match=r"hard-label loss \(alpha 0.5\) needs labels .* or set alpha: 0"):
        run_passes(source, kd(), training=unlabeled)
    working = run_passes(source, kd(alpha=0, epochs=1), training=unlabeled)  # soft targets only: no labels needed
    assert working.history[0]["training"]["epochs"] == 1
    with pytest.raises(UsageError, match=r"distill.kd needs training data"):
        run_passes(source, kd())


def test_feature_pairs_must_differ_only_in_channels(source, train_set):
    with pytest.raises(UsageError, match=r"features 'stem' .* and 'pool' .* differ in more than their channels"):
        run_passes(source, kd(features={"stem": "pool"}, epochs=1), training=train_set)
    with pytest.raises(UsageError, match=r"no layer 'stm'"):
        run_passes(source, kd(features={"stm": "stem"}), training=train_set)


def test_a_student_in_a_yaml_recipe_must_be_a_module():
    with pytest.raises(UsageError, match=r"student must be a torch.nn.Module given through the Python API"):
        Recipe.from_dict({"passes": ["distill.kd"], "distill": {"kd": {"student": "resnet18"}}})
