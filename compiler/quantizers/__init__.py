"""edgeship.compiler.quantizers: the int8 quantizers the emitters ship, one module per format.

* ``onnx``: ``OnnxQuantizer`` (``onnxruntime.quantization`` with the ONNX emitter's settings) and
  ``onnx_candidates``, the graph nodes it can quantize;
* ``tflite``: ``TFLiteQuantizer`` (ai-edge-quantizer with the TFLite emitter's settings) and the
  readers of a TFLite model's op scopes (``tflite_ops``, ``tflite_candidates``, ``tflite_skipped``).

A quantizer is a callable ``quantize(fp32_path, out_path, keep_float)`` (``Quantize``) that
writes the quantized model leaving the named layers in float, with what those layers become
set by its ``fallback`` (``FALLBACKS``). The emitters call them to build an artifact; the layer
search (``edgeship.compiler.search.fronts``) calls the same objects to build its candidates, so
it searches with exactly the quantization that ships. ONNX layer names are graph node names;
TFLite names are ai-edge-quantizer op *scopes* (the op's output tensor names joined by ``;``,
with a trailing ``;``).

``carried_ranges`` turns the input ranges ``quantize.qat`` trained each PyTorch layer with into
ranges of the tensors a format's layers read, for every emitter that quantizes those tensors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

Array = np.ndarray[Any, Any]
#: One batch of inputs: input name -> array, the batch axis first.
Feed = Mapping[str, Array]
#: ``quantize(fp32_path, out_path, keep_float)``: write the quantized model to ``out_path``,
#: leaving the named layers (ONNX node names / TFLite op scopes) in float.
Quantize = Callable[[Path, Path, list[str]], None]
#: What the layers a search sets apart become: int8 weights with float compute, or plain float.
FALLBACKS = ("weight-only", "float")
#: How a report describes each fallback.
FALLBACK_NOTES = {
    "weight-only": "int8 weights with float compute where the layer has weights, else float",
    "float": "kept in float",
}


def carried_ranges(
    found: Mapping[str, Sequence[str]], trained: Mapping[str, Sequence[float]], *, symmetric: bool = False
) -> tuple[dict[str, tuple[float, float]], str]:
    """``({tensor: (min, max)}, note)``: each tensor a layer's matrix multiply reads (``found``:
    ``{layer: [tensor, ...]}``, one per call, from the format's own ``layer_inputs``) with the range
    ``quantize.qat`` trained that layer with (``trained``: ``{layer: [min, max]}`` over every call).
    A tensor several layers read (query, key and value) gets the union of their ranges. The note
    says how many layers were found and names the ones that were not; ``symmetric``: the quantizer
    takes ``max(|min|, |max|)`` of a range, and the note says so."""
    carried: dict[str, tuple[float, float]] = {}
    for layer, tensors in found.items():
        lo, hi = (float(v) for v in trained[layer])
        for tensor in tensors:
            seen = carried.get(tensor, (lo, hi))
            carried[tensor] = (min(seen[0], lo), max(seen[1], hi))
    missing = sorted(set(trained) - set(found))
    note = (
        f"activation ranges of {len(found)} of {len(trained)} layers from quantize.qat (the ranges it trained with"
        + ("; symmetric here, max(|min|, |max|) / 127" if symmetric else "")
        + "), the other tensors calibrated"
        + (f"; not found in the graph: {missing}" if missing else "")
    )
    return carried, note
