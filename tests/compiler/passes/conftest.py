"""A tiny residual + concat CNN trained on the digits (8x8) in about a second, for the pass tests."""

from __future__ import annotations

from typing import Any

import pytest

from edgeship.compiler import Dataset, from_module


def build(width: int = 8) -> Any:
    """Conv stem, a residual block and a concat of two branches: the couplings the dependency graph
    must cut consistently."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = torch.nn.Conv2d(1, width, 3, padding=1)
            self.bn = torch.nn.BatchNorm2d(width)
            self.res = torch.nn.Conv2d(width, width, 3, padding=1)
            self.left = torch.nn.Conv2d(width, width, 1)
            self.right = torch.nn.Conv2d(width, width, 3, padding=1)
            self.pool = torch.nn.MaxPool2d(2)
            self.hidden = torch.nn.Linear(2 * width, 32)
            self.head = torch.nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.bn(self.stem(x)))
            x = torch.relu(x + self.res(x))
            x = torch.cat([self.left(x), self.right(x)], 1)
            # Pooled before the Linear: torch-pruning 1.6 mis-tracks a concat followed by a flatten.
            x = self.pool(torch.relu(x)).mean((2, 3))
            return self.head(torch.relu(self.hidden(x)))

    return Net()


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
    return fit(build(), x_train, y_train, epochs=10)


@pytest.fixture
def source(trained: Any, digits: Any) -> Any:
    return from_module(trained, digits[1][:1], input_names=["image"], output_names=["logits"])


@pytest.fixture(scope="session")
def train_set(digits: Any) -> Dataset:
    return Dataset({"image": digits[0]}, labels=digits[2])


@pytest.fixture(scope="session")
def eval_set(digits: Any) -> Dataset:
    return Dataset({"image": digits[1]}, labels=digits[3])
