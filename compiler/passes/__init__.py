"""Compiler passes: transformations of the working model before any artifact is emitted.

A recipe lists them by name (``passes: [prune.channels, distill.kd]``) with one settings section
per pass (``prune: {channels: {ratio: 0.5}}``); ``compile_model`` runs them in order on a copy of
the source, then emits every variant from the result. The fp32 source stays the reference the
variants are validated against. Docs: docs/passes.md.

```python
from edgeship.compiler.passes import WorkingModel, PassContext, get
model, entry = get("prune.channels").run(WorkingModel.of(source), PassContext(settings, training=data))
```
"""

from __future__ import annotations

import copy
import dataclasses
import time
from typing import Any

from edgeship.compiler.data import Dataset
from edgeship.compiler.passes.base import Pass, PassContext, Progress, Setting, WorkingModel, get, names, register
from edgeship.compiler.source import SourceModel


def run_passes(
    source: SourceModel,
    steps: list[tuple[str, dict[str, Any]]],
    *,
    calibration: Dataset | None = None,
    training: Dataset | None = None,
    evaluation: Dataset | None = None,
    seed: int = 0,
    progress: Progress | None = None,
    snapshot_after: int | None = None,
) -> WorkingModel:
    """Run ``steps`` ((pass name, validated settings) in order) on a working copy of ``source``.

    ``snapshot_after``: keep a copy of the model as it was after that many steps (``WorkingModel.snapshot``).

    Each pass's report entry is appended to the returned model's ``history``. Raises ``UsageError``
    for a source passes cannot transform or data a pass cannot use; Ctrl-C propagates as
    ``KeyboardInterrupt`` with nothing written.
    """
    say = progress or (lambda _msg: None)
    model = WorkingModel.of(source)
    for index, (name, settings) in enumerate(steps):
        say(f"pass {index + 1}/{len(steps)}: {name}")
        started = time.perf_counter()
        ctx = PassContext(settings, calibration, training, evaluation, seed + index, say)
        model, entry = get(name).run(model, ctx)
        entry.setdefault("pass", name)
        entry.setdefault("seconds", round(time.perf_counter() - started, 2))
        entry["seed"] = seed + index
        model.history.append(entry)
        if snapshot_after == index + 1:
            model.snapshot = dataclasses.replace(model.source, module=copy.deepcopy(model.module).eval())
    return model


__all__ = ["Pass", "PassContext", "Setting", "WorkingModel", "get", "names", "register", "run_passes"]
