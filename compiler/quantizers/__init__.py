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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
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
