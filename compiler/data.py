"""Calibration and evaluation data: loading, checking, batching.

Data is a mapping from model input name to an array whose leading axis is the model's
batch axis, holding N samples; ``labels`` (N,) for classification accuracy, or
``reference`` outputs by name. Loaded from an ``.npz`` (arrays named after the inputs,
plus optional ``labels``), a folder of ``.npy`` files named after the inputs, or built
from a Python iterable of feed dicts.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeship.errors import UsageError
from edgeship.runtime.package.manifest import TensorSpec

Array = np.ndarray[Any, Any]
LABELS = "labels"


@dataclass(frozen=True)
class Dataset:
    """N samples per input (leading axis), with optional labels or reference outputs."""

    inputs: dict[str, Array]
    labels: Array | None = None
    reference: dict[str, Array] = field(default_factory=dict)
    source: str = "data"

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def batches(self, batch: int) -> Iterator[dict[str, Array]]:
        """Feed dicts of ``batch`` samples (the last one may be smaller)."""
        for i in range(0, len(self), batch):
            yield {k: v[i : i + batch] for k, v in self.inputs.items()}

    def take(self, n: int, offset: int = 0) -> Dataset:
        """The samples ``offset .. offset+n``."""
        sl = slice(offset, offset + n)
        return Dataset(
            {k: v[sl] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[sl],
            {k: v[sl] for k, v in self.reference.items()},
            self.source,
        )


def load(source: str | Path | Mapping[str, Any] | Iterable[Mapping[str, Any]], what: str = "data") -> Dataset:
    """Load data from an ``.npz``, a folder of ``.npy``, a dict of arrays, or an iterable of feed dicts.

    Raises ``UsageError`` for a missing file, an empty set or arrays of unequal length.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_dir():
            files = sorted(path.glob("*.npy"))
            if not files:
                raise UsageError(f"{what} folder {path} holds no .npy files (one per input, named after it)")
            arrays = {f.stem: np.load(f, allow_pickle=False) for f in files}
        elif path.is_file():
            try:
                with np.load(path, allow_pickle=False) as npz:
                    arrays = {k: npz[k] for k in npz.files}
            except (ValueError, OSError) as exc:
                raise UsageError(f"{what} file {path} is not an .npz archive: {exc}") from None
        else:
            raise UsageError(f"{what} {path} does not exist")
        name = str(path)
    elif isinstance(source, Mapping):
        arrays, name = {k: np.asarray(v) for k, v in source.items()}, what
    else:
        feeds = list(source)
        if not feeds:
            raise UsageError(f"the {what} set is empty")
        keys = set(feeds[0])
        arrays = {k: np.concatenate([np.asarray(f[k]) for f in feeds]) for k in keys}
        name = what
    labels = arrays.pop(LABELS, None)
    reference = {k[len("reference:") :]: arrays.pop(k) for k in list(arrays) if k.startswith("reference:")}
    if not arrays:
        raise UsageError(f"the {what} set {name} holds no input arrays")
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise UsageError(f"{what} arrays have different sample counts: {lengths}")
    if next(iter(lengths.values())) == 0:
        raise UsageError(f"the {what} set {name} is empty")
    if labels is not None and len(labels) != next(iter(lengths.values())):
        raise UsageError(f"{what} has {len(labels)} labels for {next(iter(lengths.values()))} samples")
    return Dataset(arrays, labels, reference, name)


def check_against(data: Dataset, inputs: tuple[TensorSpec, ...], what: str) -> Dataset:
    """Check names, shapes (past the batch axis), dtype kinds and finiteness against the model's inputs.

    Returns the data with arrays cast to the inputs' dtypes. Raises ``UsageError`` naming the problem.
    """
    names = [t.name for t in inputs]
    missing = [n for n in names if n not in data.inputs]
    if missing:
        have = ", ".join(sorted(data.inputs)) or "nothing"
        raise UsageError(
            f"{what} lacks input {', '.join(map(repr, missing))} (it has {have}); name arrays after the model's inputs"
        )
    cast = {}
    for spec in inputs:
        arr = data.inputs[spec.name]
        want = tuple(spec.shape[1:])
        if arr.ndim != len(spec.shape) or any(w is not None and g != w for g, w in zip(arr.shape[1:], want)):
            shown = "(N, " + ", ".join("?" if d is None else str(d) for d in want) + ")"
            raise UsageError(f"{what} input {spec.name!r} has shape {arr.shape}, expected {shown}")
        kind = np.dtype("float32" if spec.dtype.startswith("float") else spec.dtype).kind
        if arr.dtype.kind != kind and not (arr.dtype.kind in "iu" and kind in "iu"):
            raise UsageError(f"{what} input {spec.name!r} has dtype {arr.dtype}, expected {spec.dtype}")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            raise UsageError(f"{what} input {spec.name!r} holds {bad} NaN/Inf values; clean the data first")
        cast[spec.name] = arr.astype(np.float32 if kind == "f" else spec.dtype, copy=False)
    return Dataset(cast, data.labels, data.reference, data.source)


def split(data: Dataset, held_out: int) -> tuple[Dataset, Dataset]:
    """Split into (calibration, held-out) with ``held_out`` samples at the end (at least one each)."""
    n = len(data)
    k = min(held_out, max(1, n // 2)) if n > 1 else 0
    if k == 0:
        return data, data
    return data.take(n - k), data.take(k, n - k)
