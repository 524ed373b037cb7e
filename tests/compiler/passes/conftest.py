"""A tiny residual + concat CNN (``examples.digits.residual_cnn``) trained on the digits (8x8) in about a
second, for the pass tests."""

from __future__ import annotations

from typing import Any

import pytest

from edgeship.compiler import Dataset, from_module
from examples.digits import residual_cnn


@pytest.fixture(scope="session")
def digits() -> Any:
    from examples.digits import load_data

    return load_data()


@pytest.fixture(scope="session")
def trained(digits: Any) -> Any:
    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    from examples.digits import fit

    x_train, _x_test, y_train, _y_test = digits
    return fit(residual_cnn(), x_train, y_train, epochs=10)


@pytest.fixture
def source(trained: Any, digits: Any) -> Any:
    return from_module(trained, digits[1][:1], input_names=["image"], output_names=["logits"])


@pytest.fixture(scope="session")
def train_set(digits: Any) -> Dataset:
    return Dataset({"image": digits[0]}, labels=digits[2])


@pytest.fixture(scope="session")
def eval_set(digits: Any) -> Dataset:
    return Dataset({"image": digits[1]}, labels=digits[3])
