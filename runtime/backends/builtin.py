"""Registers the backends that ship with edgeship. Imported by the Session; native libraries load lazily."""

from __future__ import annotations

from edgeship.runtime.backends.coreml import CoreMLBackend
from edgeship.runtime.backends.litert import LiteRTBackend
from edgeship.runtime.backends.onnxruntime import OnnxRuntimeBackend
from edgeship.runtime.backends.registry import register
from edgeship.runtime.backends.tensorrt import TensorRTBackend

register(LiteRTBackend, priority=10)
register(OnnxRuntimeBackend, priority=10)
register(TensorRTBackend, priority=20)  # ahead of ONNX Runtime for tensorrt-onnx packages on a Jetson
register(CoreMLBackend, priority=10)
