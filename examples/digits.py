"""A small CNN trained on scikit-learn's bundled digits: the demo's, the tests' and the benchmarks' model.

8x8 grey images in [0, 1], NCHW, 10 classes. Training takes a few seconds on one core.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Digits:
    model: Any  # torch.nn.Module, eval mode
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    accuracy: float

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def load_data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    x_train, x_test, y_train, y_test = train_test_split(x, digits.target, test_size=0.2, random_state=0)
    return x_train, x_test, y_train.astype(np.int64), y_test.astype(np.int64)


def build(width: int = 16):
    """The CNN; ``width`` 16 gives about 40k parameters, 37 about 100k. It flattens instead of
    using ``AdaptiveAvgPool2d``, which litert-torch cannot convert with a dynamic batch."""
    import torch

    return torch.nn.Sequential(
        torch.nn.Conv2d(1, width, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.Conv2d(width, 2 * width, 3, padding=1),
        torch.nn.ReLU(),
        torch.nn.MaxPool2d(2),
        torch.nn.Flatten(),
        torch.nn.Linear(2 * width * 4 * 4, 64),
        torch.nn.ReLU(),
        torch.nn.Linear(64, 10),
    )


def residual_cnn(width: int = 8) -> Any:
    """A conv stem with BatchNorm, a residual block and a concat of two branches, pooled into two
    Linears: the couplings pruning's dependency graph must cut consistently, and a BatchNorm folded
    into a conv. The compiler passes' tests and ``benchmarks.qat_ranges`` train it."""
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


def fit(
    model: Any,
    x: np.ndarray,
    y: np.ndarray,
    *,
    epochs: int,
    seed: int = 0,
    lr: float = 3e-3,
    each_epoch: Callable[[int], None] | None = None,
) -> Any:
    """Train a classifier with Adam and cross-entropy in shuffled batches of 64, deterministically for
    ``seed`` (the shuffling; seed torch before building the model for its initial weights); returns it
    in eval mode. Shared by the demo, the compiler benchmarks and the passes' tests."""
    import torch

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i : i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx]).backward()
            opt.step()
        if each_epoch is not None:
            each_epoch(epoch)
    return model.eval()


def train(width: int = 16, epochs: int = 15, seed: int = 0) -> Digits:
    """Train the CNN deterministically; returns the model in eval mode with its test accuracy."""
    import torch

    torch.manual_seed(seed)
    x_train, x_test, y_train, y_test = load_data()
    model = fit(build(width), x_train, y_train, epochs=epochs, seed=seed)
    with torch.no_grad():
        acc = float((model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean())
    return Digits(model, x_train, y_train, x_test, y_test, acc)
