"""edgeship.compiler.search: the compiler's searches.

* ``layers``: which layers of a quantized model to keep in float so it stays within a cosine
  of its fp32 source (the mixed-precision layer search); pure, tested with fake evaluators;
* ``fronts``: that search on a real ONNX or TFLite model: each candidate quantized by the
  quantizer the emitter ships (``compiler/quantizers/``) and scored through the runtime Session;
* ``budget``: which candidate artifact (precision, calibration, mixed precision) to ship for a
  target: the cheapest one that holds an accuracy budget on held-out data; pure, tested with
  fake evaluators.
"""
