"""edgeship.runtime: what runs on the device. The model package format lives in ``edgeship.runtime.package``.

This package must import without torch, tensorflow, onnx or coremltools, and on Python 3.10.
"""
