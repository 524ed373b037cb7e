"""Core ML: PyTorch -> ``.mlpackage`` at six precisions, and a numpy reference evaluator that checks
ML programs on Linux (and runs them through the runtime's ``Session`` as ``coreml-reference``).

Importing this package is cheap and has no side effects: coremltools and torch load on first
use, and the reference backend is registered only when ``register()`` is called.
"""

from edgeship.compiler.coreml.backend import CoreMLReferenceBackend, register
from edgeship.compiler.coreml.emit import PRECISIONS, CoreMLResult, check_request, emit_coreml
from edgeship.compiler.coreml.reference import (
    CoreMLVersionError,
    EvaluationError,
    ReferenceEvaluator,
    UnsupportedOpError,
    supported_ops,
    unsupported_ops,
)

__all__ = [
    "PRECISIONS",
    "CoreMLReferenceBackend",
    "CoreMLResult",
    "CoreMLVersionError",
    "EvaluationError",
    "ReferenceEvaluator",
    "UnsupportedOpError",
    "check_request",
    "emit_coreml",
    "register",
    "supported_ops",
    "unsupported_ops",
]
