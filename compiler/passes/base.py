"""The pass interface: a pass takes a working model and a context, returns the model and a report entry.

A ``WorkingModel`` holds the torch module being transformed, beside the frozen fp32 ``SourceModel``
it came from: the source stays the reference every artifact is validated against and the hash the
package provenance names, while passes replace ``WorkingModel.module`` and append what they did to
``WorkingModel.history``. Passes are registered by name (``prune.channels``) and declare their recipe
settings as a table of ``Setting`` parsers, so the recipe validates a pass's section without running
it (an unknown key or a bad value is a ``UsageError`` naming it).

This module imports no torch: the recipe validates pass names and settings cheaply.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from edgeship.compiler.data import Dataset
from edgeship.compiler.source import SourceModel
from edgeship.errors import UsageError

Progress = Callable[[str], None]


@dataclass
class WorkingModel:
    """The module passes transform, the frozen source it started from, and what was done to it.

    ``module`` starts as a deep copy of ``source.module``: no pass ever touches the source.
    ``history`` holds one report entry (a JSON-safe dict) per pass, in order.
    """

    source: SourceModel
    module: Any
    history: list[dict[str, Any]] = field(default_factory=list)
    #: A copy taken part-way (``run_passes(snapshot_after=...)``), as a source for the emitters.
    snapshot: SourceModel | None = None

    @classmethod
    def of(cls, source: SourceModel) -> WorkingModel:
        """A working copy of a PyTorch source; raises ``UsageError`` for sources passes cannot train."""
        import torch

        if source.kind != "torch" or not isinstance(source.module, torch.nn.Module):
            raise UsageError(
                f"compiler passes transform PyTorch modules; this source is {source.kind}: "
                "compile the nn.Module from Python (edgeship.compiler.from_module) to prune or distill it"
            )
        module = copy.deepcopy(source.module)
        # A torch.export program's module calls aten ops on bare tensors: no Conv/Linear layers to shrink,
        # and some versions refuse train mode.
        layers = (torch.nn.modules.conv._ConvNd, torch.nn.Linear)
        exported = isinstance(module, torch.fx.GraphModule) and not any(isinstance(m, layers) for m in module.modules())
        try:
            module.train()
        except NotImplementedError:
            exported = True
        if exported:
            raise UsageError(
                "this source is a torch.export program, which cannot be trained or have layers removed; "
                "compile the eager nn.Module from Python (edgeship.compiler.from_module) to prune or distill it"
            ) from None
        module.eval()
        return cls(source, module)

    def as_source(self) -> SourceModel:
        """The working module as a ``SourceModel`` for the emitters: same I/O names and examples, and
        the frozen source's hash (provenance names the source and the recipe that transformed it)."""
        return dataclasses.replace(self.source, module=self.module.eval())

    def inputs_of(self, feed: Mapping[str, Any]) -> tuple[Any, ...]:
        """Torch tensors in the source's input order from a feed dict of arrays."""
        import numpy as np
        import torch

        return tuple(torch.from_numpy(np.ascontiguousarray(feed[t.name])) for t in self.source.inputs)


@dataclass
class PassContext:
    """What a pass may use besides the model: its validated recipe section and the data.

    ``training`` has labels when the user gave them; ``evaluation`` is the held-out set the compile
    validates on (labels optional). ``seed`` makes every training step reproducible on the CPU.
    """

    settings: dict[str, Any]
    calibration: Dataset | None = None
    training: Dataset | None = None
    evaluation: Dataset | None = None
    seed: int = 0
    progress: Progress = lambda _msg: None

    def calibration_needed(self, what: str, use: str) -> Dataset:
        """The calibration data, or ``UsageError`` saying that pass ``what`` needs it (--calib) for ``use``."""
        if self.calibration is None or len(self.calibration) == 0:
            raise UsageError(f"{what} needs calibration data (--calib): it {use}")
        return self.calibration


@dataclass(frozen=True)
class Setting:
    """One recipe key of a pass: its default and a parser that validates (raising ``UsageError``)."""

    default: Any
    parse: Callable[[Any, str], Any]


class Pass(ABC):
    """Base of every pass. Subclasses set ``name``, ``summary`` and ``settings`` and implement ``run``."""

    name: ClassVar[str]
    summary: ClassVar[str]
    settings: ClassVar[dict[str, Setting]] = {}

    def configure(self, raw: Any, where: str) -> dict[str, Any]:
        """Validate a recipe section; return every setting with defaults filled in."""
        if raw is None:
            raw = {}
        if not isinstance(raw, Mapping):
            raise UsageError(f"{where} must be a mapping, not {type(raw).__name__}")
        unknown = sorted(str(k) for k in raw if k not in self.settings)
        if unknown:
            guess = difflib.get_close_matches(unknown[0], sorted(self.settings), n=1)
            hint = f"did you mean {guess[0]!r}?" if guess else f"known: {', '.join(sorted(self.settings))}"
            raise UsageError(f"{where}: unknown key {unknown[0]!r} ({hint})")
        out = {}
        for key, setting in self.settings.items():
            value = raw.get(key, setting.default)
            out[key] = value if value is None and setting.default is None else setting.parse(value, f"{where}.{key}")
        return out

    @abstractmethod
    def run(self, model: WorkingModel, ctx: PassContext) -> tuple[WorkingModel, dict[str, Any]]:
        """Transform ``model`` (a copy the pass owns); return it and the pass's report entry."""


_REGISTRY: dict[str, type[Pass]] = {}


def register(cls: type[Pass]) -> type[Pass]:
    """Class decorator: make a pass available by its ``name`` (``family.kind``)."""
    if "." not in cls.name:
        raise ValueError(f"pass names are 'family.kind' (prune.channels), not {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def _builtins() -> None:
    # Importing the modules registers their passes; they import torch only when a pass runs.
    from edgeship.compiler.passes import distill, prune, qat, smooth, sparse24  # noqa: F401


def names() -> list[str]:
    """Every registered pass name, sorted."""
    _builtins()
    return sorted(_REGISTRY)


def get(name: str) -> Pass:
    """The pass registered as ``name``; ``UsageError`` suggesting the nearest name otherwise."""
    _builtins()
    cls = _REGISTRY.get(name)
    if cls is None:
        guess = difflib.get_close_matches(str(name), sorted(_REGISTRY), n=1, cutoff=0.5)
        hint = f"did you mean {guess[0]!r}?" if guess else f"known passes: {', '.join(sorted(_REGISTRY))}"
        raise UsageError(f"unknown compiler pass {name!r} ({hint})")
    return cls()


# Parsers shared by the passes' settings tables.


def ratio(value: Any, where: str) -> float:
    """A fraction strictly between 0 and 1 (a pruning ratio)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise UsageError(f"{where} must be a number strictly between 0 and 1 (a share of channels), not {value!r}")
    return float(value)


def unit(value: Any, where: str) -> float:
    """A number in [0, 1] (a loss weight)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise UsageError(f"{where} must be a number in 0..1, not {value!r}")
    return float(value)


def positive(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise UsageError(f"{where} must be a number > 0, not {value!r}")
    return float(value)


def non_negative(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise UsageError(f"{where} must be a number >= 0, not {value!r}")
    return float(value)


def count(minimum: int) -> Callable[[Any, str], int]:
    def parse(value: Any, where: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise UsageError(f"{where} must be an integer >= {minimum}, not {value!r}")
        return value

    return parse


def flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{where} must be true or false, not {value!r}")
    return value


def choice(*options: str) -> Callable[[Any, str], str]:
    def parse(value: Any, where: str) -> str:
        if value not in options:
            raise UsageError(f"{where} must be one of {', '.join(options)}, not {value!r}")
        return str(value)

    return parse


def names_list(value: Any, where: str) -> list[str]:
    """A list of module names (``features.0``); a single name is accepted as a list of one."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where} must be a list of layer names (as in model.named_modules())")
    return list(value)
