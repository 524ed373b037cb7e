"""Keras and SavedModel input (the tensorflow extra) compiled to TFLite targets."""

from __future__ import annotations

import pytest

import edgeship.runtime as rt
from edgeship.compiler import Dataset, Recipe, compile_model, from_keras
from edgeship.errors import UsageError
from edgeship.runtime.package import TrustedKeys, generate_key

KEY = generate_key()
TRUSTED = TrustedKeys.of([KEY.public_key()])


@pytest.fixture(scope="module")
def keras_digits(tmp_path_factory):
    tf = pytest.importorskip("tensorflow")
    from examples.digits import load_data

    x_train, x_test, y_train, y_test = load_data()
    x_train, x_test = x_train.reshape(len(x_train), 64), x_test.reshape(len(x_test), 64)
    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential(
        [tf.keras.Input((64,), name="image"), tf.keras.layers.Dense(64, activation="relu"), tf.keras.layers.Dense(10)]
    )
    model.compile(optimizer="adam", loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x_train, y_train, epochs=20, batch_size=64, verbose=0)
    root = tmp_path_factory.mktemp("keras")
    model.save(root / "digits.keras")
    model.export(str(root / "saved"), verbose=False)
    return root, x_train, x_test, y_test


@pytest.mark.parametrize("kind", ["keras", "savedmodel"])
def test_keras_and_savedmodel_compile_to_tflite(keras_digits, tmp_path, kind):
    root, x_train, x_test, y_test = keras_digits
    source = from_keras(root / ("digits.keras" if kind == "keras" else "saved"))
    recipe = Recipe.from_dict(
        {"variants": {"android-arm64": ["fp32", "int8-dynamic"]}, "validation": {"latency_runs": 2}}
    )
    name = source.inputs[0].name
    report = compile_model(
        source,
        ["android-arm64"],
        tmp_path / "d",
        KEY,
        recipe=recipe,
        calibration=Dataset({name: x_train}),
        evaluation=Dataset({name: x_test}, labels=y_test),
    )
    assert not report.failed, [v.error for v in report.failed]
    for variant in report.variants:
        assert variant.metrics.accuracy >= 0.9 and variant.metrics.accuracy_drop_points <= 1.0
        with rt.open(variant.package, trusted_keys=TRUSTED) as session:
            assert session.check_golden().passed


def test_keras_source_for_a_non_tflite_target_is_refused(keras_digits, tmp_path):
    root, *_ = keras_digits
    with pytest.raises(UsageError, match="compile to TFLite targets only"):
        compile_model(from_keras(root / "digits.keras"), ["linux-x86_64"], tmp_path / "d", KEY)
