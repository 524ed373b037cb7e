"""The training loop the passes share: deterministic on the CPU given a seed, with progress, and Ctrl-C safe.

Determinism: the seed sets torch's global RNG (dropout, adapter initialisation) and a private
generator that shuffles the batches, so the same seed, data and thread count give the same weights
bit for bit (tests/compiler/passes/test_determinism.py checks accuracy to 1e-6). Ctrl-C raises
``KeyboardInterrupt`` out of the loop after saying which epoch it stopped in: the pass never returns a
half-trained model, and the compile writes nothing (packages are written only after every pass ran).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from edgeship.compiler.data import Dataset
from edgeship.compiler.passes.base import Progress, Setting, WorkingModel, choice, count, flag, positive
from edgeship.errors import UsageError

# The training keys every pass that trains shares (distill.kd with its own number of epochs).
SCHEDULE: dict[str, Setting] = {
    "epochs": Setting(3, count(1)),
    "lr": Setting(1e-3, positive),
    "optimizer": Setting("adam", choice("adam", "sgd")),
    "batch_size": Setting(64, count(1)),
}
# The fine-tuning keys of the prune passes.
FINE_TUNE: dict[str, Setting] = {"fine_tune": Setting(True, flag), **SCHEDULE}


def schedule(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The ``train`` keyword arguments a pass's configured ``SCHEDULE`` keys give."""
    return {key: settings[key] for key in SCHEDULE}


Loss = Callable[[tuple[Any, ...], Any], Any]  # (inputs, labels or None) -> scalar loss tensor


def batches(data: Dataset, model: WorkingModel, batch_size: int, generator: Any) -> Iterator[tuple[Any, Any]]:
    """Shuffled (inputs, labels) batches as tensors; labels are None when the data has none."""
    import torch

    order = torch.randperm(len(data), generator=generator).numpy()
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        feed = {k: v[idx] for k, v in data.inputs.items()}
        labels = None if data.labels is None else torch.from_numpy(np.asarray(data.labels)[idx].astype(np.int64))
        yield model.inputs_of(feed), labels


def train(
    model: WorkingModel,
    parameters: list[Any],
    data: Dataset,
    loss: Loss,
    *,
    epochs: int,
    lr: float,
    optimizer: str,
    batch_size: int,
    seed: int,
    progress: Progress,
    what: str,
    modules: tuple[Any, ...] = (),
    eval_mode: bool = False,
    after_epoch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Run ``epochs`` of ``loss`` over ``data`` updating ``parameters``; returns a JSON-safe summary.

    ``modules`` (besides ``model.module``) are put in train mode too (feature adapters), unless
    ``eval_mode``: then every module stays in eval mode while its parameters train (no dropout,
    BatchNorm normalises with its running statistics and keeps them; what ``quantize.qat`` needs
    to match a frozen teacher). ``after_epoch(epoch)`` runs after each epoch (1-based), for a pass
    that keeps the best epoch. Raises ``KeyboardInterrupt`` on Ctrl-C after reporting where it
    stopped, leaving the caller nothing to use.
    """
    import torch

    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    opt = (
        torch.optim.Adam(parameters, lr=lr)
        if optimizer == "adam"
        else torch.optim.SGD(parameters, lr=lr, momentum=0.9, nesterov=True)
    )
    started = time.perf_counter()
    losses: list[float] = []
    for mod in (model.module, *modules):
        mod.train(not eval_mode)
    try:
        for epoch in range(1, epochs + 1):
            total, seen = 0.0, 0
            for inputs, labels in batches(data, model, batch_size, generator):
                opt.zero_grad()
                value = loss(inputs, labels)
                if not torch.isfinite(value):
                    raise UsageError(
                        f"{what}: the training loss became {float(value)} in epoch {epoch}; lower the learning rate (lr)"
                    )
                value.backward()
                opt.step()
                n = len(inputs[0])
                total += float(value.detach()) * n
                seen += n
            losses.append(total / max(seen, 1))
            progress(f"{what}: epoch {epoch}/{epochs}, loss {losses[-1]:.4f}")
            if after_epoch is not None:
                after_epoch(epoch)
    except KeyboardInterrupt:
        progress(f"{what}: interrupted in epoch {len(losses) + 1}/{epochs}; nothing is written")
        raise
    finally:
        for mod in (model.module, *modules):
            mod.eval()
    return {
        "epochs": epochs,
        "optimizer": optimizer,
        "lr": lr,
        "batch_size": batch_size,
        "samples": len(data),
        "loss_per_epoch": [round(v, 6) for v in losses],
        "seconds": round(time.perf_counter() - started, 2),
    }


def first_output(out: Any) -> Any:
    """The first output of a module (losses and accuracy use it)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def accuracy(model: WorkingModel, module: Any, data: Dataset | None) -> float | None:
    """Top-1 accuracy of ``module``'s first output on labelled ``data`` (None without labels)."""
    import torch

    if data is None or data.labels is None:
        return None
    module.eval()
    hits = 0
    with torch.no_grad():
        for i in range(0, len(data), 256):
            feed = {k: v[i : i + 256] for k, v in data.inputs.items()}
            out = first_output(module(*model.inputs_of(feed)))
            hits += int((out.argmax(-1).numpy() == np.asarray(data.labels)[i : i + 256]).sum())
    return hits / len(data)


def size(model: WorkingModel, module: Any) -> dict[str, int]:
    """Parameters and multiply-accumulates of one forward pass on the source's example inputs."""
    import torch
    import torch_pruning as tp

    example = model.inputs_of(model.source.example)
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(module, example if len(example) > 1 else example[0])
    return {"params": int(params), "macs": int(macs)}


def labels_needed(data: Dataset, what: str, fix: str, kind: str = "training", option: str = "--train") -> None:
    """Raise ``UsageError`` when ``data`` (the ``kind`` data, given with ``option``) has no labels."""
    if data.labels is None:
        raise UsageError(f"{what} needs labels in the {kind} data ('labels' array in the {option} .npz); {fix}")
