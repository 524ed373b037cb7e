"""What an emitter returns: the artifact files and what the manifest must say about them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from edgeship.runtime.package.manifest import TensorSpec


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
