"""The emitter interface: what every target format's emitter takes and returns.

An emitter turns the compiler's model into the artifact one target format runs. Each one
is a subclass of ``Emitter`` registered by format (``edgeship.compiler.emitters.register``);
the pipeline looks it up by the target profile's ``format`` and knows nothing else about it.

* ``format``: the artifact format, one of ``edgeship.targets.FORMATS`` (the manifest's ``format``);
  ``label``: how error messages name it ("TensorRT").
* ``precisions``: the precisions its code builds; ``targets.PRECISIONS_BY_FORMAT[format]`` must
  not offer one it cannot build (tests/compiler/emitters/test_registry.py checks that they agree).
* ``sources``: the ``SourceModel.kind`` values it converts ("torch", "onnx", "keras").
* ``check(profile, precision)``: refuses, before any conversion work, what this emitter cannot
  build for that profile (``plan()`` calls it for every requested variant).
* ``emit(request)``: writes the artifact into ``request.workdir`` and returns ``Emitted``.
* ``calibration_methods``: per precision, the calibration methods (``recipe.calibration_method``)
  besides ``minmax`` that change its artifact; ``layer_search``: the precisions for which it runs
  the layer search to ``recipe.quantize.min_cosine``. The budget search builds its candidates
  from these two (``compiler/search/budget.py``).
* ``validation_backend``: the runtime backend the host check runs the artifact on;
  ``needs_hardware``: what that host check cannot say (listed in the compile report).
"""

from __future__ import annotations

import hashlib
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from edgeship.compiler.data import Dataset
from edgeship.compiler.recipe import Recipe
from edgeship.compiler.source import SourceModel
from edgeship.errors import UsageError
from edgeship.runtime.package.manifest import TensorSpec
from edgeship.targets import TargetProfile


@dataclass
class Emitted:
    """An artifact written into ``workdir``.

    ``artifact`` is the package path of the artifact (a file, or a directory for
    ``.mlpackage``); ``files`` maps every package path the artifact needs (model, external
    data, build spec) to the file on disk. ``inputs``/``outputs`` are the model's tensors as
    the manifest must describe them (dtypes and quantization of the artifact's own I/O).
    ``notes`` say what the emitter decided (what stayed in float, which calibration).
    """

    format: str
    precision: str
    artifact: str
    files: dict[str, Path]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    weight_bytes: int
    route: str
    notes: list[str] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.files.values())


class ConversionCache:
    """The fp32 conversions of one model, made once and shared by every variant built from it.

    Every emitter starts from an fp32 conversion of the model (the ONNX export, the litert-torch
    conversion) and quantizes that; a budget search builds up to eight candidates per target, each
    of which used to convert the model again (about 5 s per TFLite conversion of a small CNN).
    ``fp32(key, path, make)`` runs ``make`` once per ``key`` into the cache directory and copies the
    result to ``path`` (a copy: emitters edit their fp32 file in place). A conversion that raised
    raises the same error again without converting a second time.

    ``references(feeds, compute)`` does the same for the fp32 model's outputs on a list of feeds
    (the layer search's reference on the calibration data, computed again by every mixed-precision
    candidate before), keyed by the feeds' contents.

    Valid only while the model does not change: the pipeline makes one per compile, after the
    passes, for the working model every variant converts (``EmitRequest.cache``).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._made: dict[str, Path | BaseException] = {}
        #: How many conversions ``fp32`` made and how many it served from the cache, per key.
        self.made: dict[str, int] = {}
        self.reused: dict[str, int] = {}
        self._references: dict[str, list[Mapping[str, Any]]] = {}

    def fp32(self, key: str, path: Path, make: Callable[[Path], None]) -> None:
        """Write the conversion named ``key`` (one word: "onnx", "tflite") to ``path``."""
        found = self._made.get(key)
        if found is None:
            self.root.mkdir(parents=True, exist_ok=True)
            cached = self.root / f"{key}-fp32"
            self.made[key] = self.made.get(key, 0) + 1
            try:
                make(cached)
            except BaseException as exc:
                if isinstance(exc, Exception):  # not Ctrl-C: that must not be replayed as the model's fault
                    self._made[key] = exc
                raise
            self._made[key] = found = cached
        else:
            self.reused[key] = self.reused.get(key, 0) + 1
        if isinstance(found, BaseException):
            raise found
        shutil.copyfile(found, path)

    def references(
        self, feeds: Sequence[Mapping[str, Any]], compute: Callable[[Mapping[str, Any]], Mapping[str, Any]]
    ) -> list[Mapping[str, Any]]:
        """``[compute(feed) for feed in feeds]``, computed once per distinct list of feeds (by content)."""
        digest = hashlib.sha256()
        for feed in feeds:
            for name in sorted(feed):
                value = np.ascontiguousarray(feed[name])
                digest.update(f"{name}|{value.dtype}|{value.shape}|".encode())
                digest.update(value.tobytes())
        key = digest.hexdigest()
        if key not in self._references:
            self.made["references"] = self.made.get("references", 0) + 1
            self._references[key] = [compute(feed) for feed in feeds]
        else:
            self.reused["references"] = self.reused.get("references", 0) + 1
        return self._references[key]


def convert_fp32(cache: ConversionCache | None, key: str, path: Path, make: Callable[[Path], None]) -> None:
    """``make(path)``, or its result from ``cache`` when another variant of the compile made it."""
    if cache is None:
        make(path)
    else:
        cache.fp32(key, path, make)


def fp32_references(
    cache: ConversionCache | None,
    feeds: Sequence[Mapping[str, Any]],
    compute: Callable[[Mapping[str, Any]], Mapping[str, Any]],
) -> list[Mapping[str, Any]]:
    """The fp32 model's outputs on ``feeds``: from ``cache`` when another candidate computed them."""
    return [compute(feed) for feed in feeds] if cache is None else cache.references(feeds, compute)


@dataclass(frozen=True)
class EmitRequest:
    """Everything an emitter gets for one variant.

    ``source``: the model to convert (its ``kind`` is one of the emitter's ``sources``).
    ``profile``: the target (format, runtime version, min_os, op-version caps).
    ``precision``: one of the profile's precisions, already accepted by ``Emitter.check``.
    ``workdir``: an empty-or-missing directory the emitter owns; the artifact files go there.
    ``calibration``: representative inputs, or None (precisions that need them refuse without).
    ``recipe``: the compile recipe (quantization rules, sensitivity search, TFLite I/O type).
    ``passes``: the report entries of the passes that made ``source`` (empty for the source itself);
    emitters read what a pass left for them there (``sparse_2_4_layers``).
    ``cache``: fp32 conversions of ``source`` shared with the other variants of the compile, or
    None (convert here).
    """

    source: SourceModel
    profile: TargetProfile
    precision: str
    workdir: Path
    calibration: Dataset | None = None
    recipe: Recipe = field(default_factory=Recipe)
    passes: tuple[Mapping[str, Any], ...] = ()
    cache: ConversionCache | None = None

    @property
    def sparse_2_4_layers(self) -> tuple[list[str], list[str]]:
        """(layers whose weights are 2:4 sparse now, layers a pass made 2:4 that a later pass changed).

        The names come from ``prune.sparse24``'s report entries; each is checked on ``source.module``,
        so a later pass that retrained or reshaped a layer cannot make an emitter promise a pattern the
        weights no longer have.
        """
        from edgeship.compiler.passes.sparse24 import LAYERS_KEY, is_2_4

        named = sorted({n for entry in self.passes for n in entry.get(LAYERS_KEY, ())})
        if not named or self.source.module is None:
            return [], named
        modules = dict(self.source.module.named_modules())
        kept = [n for n in named if n in modules and is_2_4(getattr(modules[n], "weight", None))]
        return kept, [n for n in named if n not in kept]

    @property
    def trained_ranges(self) -> dict[str, list[float]]:
        """``{layer: [min, max]}``: the input ranges ``quantize.qat`` trained each layer's matrix
        multiply with, when it is the last pass (a later pass would change what the layers read);
        else empty. Emitters that quantize the same tensors use them instead of calibrating."""
        last = self.passes[-1] if self.passes else {}
        return dict(last.get("ranges", {})) if last.get("pass") == "quantize.qat" else {}

    @property
    def batch(self) -> int:
        """The batch the calibration data is fed in: 1 for a fixed batch dimension, else 32."""
        return self.source.feed_batch


class Emitter(ABC):
    """One target format's emitter. Subclasses set the class attributes and implement ``emit``.

    Emitters are stateless; the registry holds one instance per format.
    """

    format: ClassVar[str]
    label: ClassVar[str] = ""  # how people name the format ("Core ML"); the format string if empty
    precisions: ClassVar[tuple[str, ...]]
    sources: ClassVar[frozenset[str]] = frozenset({"torch"})
    calibration_methods: ClassVar[Mapping[str, tuple[str, ...]]] = {}
    layer_search: ClassVar[tuple[str, ...]] = ()
    validation_backend: ClassVar[str] = "auto"
    needs_hardware: ClassVar[tuple[str, ...]] = ()

    def check(self, profile: TargetProfile, precision: str) -> None:
        """Raise ``UsageError`` (one line naming the target, the precision and what it offers) when
        this emitter cannot build ``precision`` for ``profile``. Does no conversion work.

        Subclasses extend it with what depends on the profile (a runtime version, an OS minimum).
        """
        if precision not in self.precisions:
            offered = [p for p in profile.precisions if p in self.precisions]
            raise UsageError(
                f"target {profile.name} cannot run precision {precision!r}: the {self.label or self.format} emitter builds "
                f"{', '.join(self.precisions)}; the target offers {', '.join(offered) or 'none of them'}"
            )

    @abstractmethod
    def emit(self, request: EmitRequest) -> Emitted:
        """Write the artifact into ``request.workdir``. Raises ``UsageError`` (an ``EdgeshipError``)
        for what cannot be built; any other exception is a converter crash."""
