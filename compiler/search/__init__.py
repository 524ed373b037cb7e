"""edgeship.compiler.search: the compiler's searches, pure and tested with fake evaluators.

* ``layers``: which layers of a quantized model to keep in float so it stays within a cosine
  of its fp32 source (the mixed-precision layer search);
* ``budget``: which candidate artifact (precision, calibration, mixed precision) to ship for a
  target: the cheapest one that holds an accuracy budget on held-out data.
"""
