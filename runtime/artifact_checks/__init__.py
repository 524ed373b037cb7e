"""Cheap structural checks of a model file, run before a native interpreter opens it.

LiteRT, ONNX Runtime and TensorRT parse model files in C++ and can crash the whole
process on a damaged one. A package whose signature and hashes are valid can still hold
a bad model (a buggy compiler, the wrong file packaged), so ``check_artifact`` looks at
the file's structure first, in pure Python (standard library only), and raises
``ArtifactError`` with one actionable line when something is off.

What the checks promise:

* Every read is bounds-checked against the file size, and no memory is allocated in
  proportion to a size field read from the file before that field was checked against
  the file size. Files are memory-mapped, never read whole.
* Work is proportional to the number of structures (tables, vectors, protobuf fields),
  not to the bytes of weights; a FlatBuffer whose tables refer to the same bytes over
  and over is refused once the references outnumber a quarter of the file's bytes.
* The only exception raised on a bad file is ``ArtifactError``. A file that passes is
  well-formed enough for the native parser to read without going out of bounds; it is
  not proven to compute anything sensible (that is what the golden vectors are for).

What is checked, by manifest format (each check's docstring lists what it leaves out):

* ``tflite`` (``check_tflite``, ``tflite.py``): the ``TFL3`` FlatBuffer, every table, vector
  and string the interpreter walks, schema version 3, every index in range, no subgraph
  input or operator output that is a constant, data stored after the FlatBuffer.
* ``onnx`` and ``tensorrt-onnx`` (``check_onnx``, ``onnx.py``): the protobuf wire format of
  the model and its graph, ``ir_version``, a graph with an output, an opset import, and
  external data files that lie inside the model's directory and are long enough.
* ``coreml`` (``check_mlpackage``, ``mlpackage.py``): an ``.mlpackage`` directory of only
  directories and regular files, its ``Manifest.json``, and a root model spec whose
  top-level wire format is sound and has a ``specificationVersion``.

The readers they share: ``model_file.py`` (memory-mapped files), ``flatbuffer.py`` and
``protobuf.py`` (bounds-checked walks over the two encodings).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from edgeship.errors import ArtifactError
from edgeship.runtime.artifact_checks.mlpackage import check_mlpackage
from edgeship.runtime.artifact_checks.onnx import check_onnx
from edgeship.runtime.artifact_checks.tflite import check_tflite

__all__ = ["check_artifact", "check_mlpackage", "check_onnx", "check_tflite"]


def check_artifact(fmt: str, path: str | os.PathLike[str]) -> None:
    """Raise ``ArtifactError`` unless ``path`` looks like a well-formed artifact of format ``fmt``.

    ``fmt`` is a manifest format: ``"tflite"``, ``"onnx"``, ``"tensorrt-onnx"`` (checked as
    ONNX: the device builds the engine from it) or ``"coreml"`` (an ``.mlpackage``
    directory). An unknown format is refused with ``ArtifactError`` too. The message is
    one line: what is wrong, which file, what to do.
    """
    check = _CHECKS.get(fmt)
    if check is None:
        raise ArtifactError(f"{os.fspath(path)}: unknown artifact format {fmt!r} (known: {', '.join(sorted(_CHECKS))})")
    check(Path(path))


_CHECKS: dict[str, Callable[[Path], None]] = {
    "tflite": check_tflite,
    "onnx": check_onnx,
    "tensorrt-onnx": check_onnx,
    "coreml": check_mlpackage,
}
