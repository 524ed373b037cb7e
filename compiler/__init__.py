"""edgeship.compiler: PyTorch and ONNX in; TFLite, Core ML, TensorRT and ONNX out; every artifact validated.

Host side; needs the ``compiler`` extra. Importing this package is cheap: torch, litert-torch,
onnx and coremltools load when a compile needs them.

```python
from edgeship.compiler import compile_model, from_module, load_data
from edgeship.runtime.package import load_private_key

source = from_module(model, example_inputs, input_names=["image"], output_names=["logits"])
report = compile_model(source, ["android-arm64", "linux-x86_64"], "dist/", load_private_key("keys/edgeship.key"),
                       calibration=load_data("calib.npz"), evaluation=load_data("eval.npz"), name="digits-cnn")
```
"""

from edgeship.compiler.data import Dataset
from edgeship.compiler.data import load as load_data
from edgeship.compiler.pipeline import CompileReport, VariantResult, compile_model, plan
from edgeship.compiler.recipe import Recipe
from edgeship.compiler.source import SourceModel, from_keras, from_module, from_onnx, from_pt2

__all__ = [
    "CompileReport",
    "Dataset",
    "Recipe",
    "SourceModel",
    "VariantResult",
    "compile_model",
    "from_keras",
    "from_module",
    "from_onnx",
    "from_pt2",
    "load_data",
    "plan",
]
