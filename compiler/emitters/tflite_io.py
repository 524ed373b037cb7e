"""The I/O of TFLite artifacts: how a manifest describes it (``io_specs``), and float I/O for
full-integer models (``float_io``).

ai-edge-quantizer's static int8 models take and return int8. Some apps want the artifact itself
to take floats (no quantization code in the app); ``float_io`` rewrites the graph with the
FlatBuffer object API, keeping the signature's names, with QUANTIZE in front of every int8 input
and DEQUANTIZE after every int8 output.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgeship.runtime.package.manifest import Quantization, TensorSpec


def io_specs(path: Path) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The model's inputs and outputs as a manifest describes them, under the model's own tensor
    names and in the interpreter's order: dtype, shape (None for a dynamic dimension) and, for
    int8/uint8/int16 tensors, the affine quantization the runtime applies to the caller's floats."""
    from ai_edge_litert.interpreter import Interpreter

    from edgeship.runtime.backends.litert import _info

    interp = Interpreter(model_path=str(path))

    def spec(detail: dict[str, Any]) -> TensorSpec:
        info = _info(detail)
        dtype = info.dtype.name
        params = detail.get("quantization_parameters", {})
        scales = list(np.asarray(params.get("scales", [])).ravel())
        quant = None
        if dtype in ("int8", "uint8", "int16") and scales:
            zeros = [int(z) for z in np.asarray(params["zero_points"]).ravel()]
            axis = int(params.get("quantized_dimension", 0)) if len(scales) > 1 else None
            quant = Quantization(tuple(float(s) for s in scales), tuple(zeros), axis)
        return TensorSpec(info.name, dtype, info.shape, quant)

    return tuple(spec(d) for d in interp.get_input_details()), tuple(spec(d) for d in interp.get_output_details())


def float_io(model_bytes: bytes) -> bytes:
    """Return the model with float32 inputs and outputs wherever they were int8/uint8."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(model_bytes, 0)
    sg = model.subgraphs[0]
    sg.inputs = [int(i) for i in sg.inputs]
    sg.outputs = [int(i) for i in sg.outputs]
    quantized = (schema.TensorType.INT8, schema.TensorType.UINT8)
    remap: dict[int, int] = {}
    front: list[Any] = []
    for pos, idx in enumerate(list(sg.inputs)):
        if sg.tensors[idx].type in quantized:
            twin = _float_twin(schema, sg, idx)
            front.append(_op(schema, _opcode(schema, model, schema.BuiltinOperator.QUANTIZE), twin, idx))
            sg.inputs[pos] = remap[idx] = twin
    for pos, idx in enumerate(list(sg.outputs)):
        if sg.tensors[idx].type in quantized:
            twin = _float_twin(schema, sg, idx)
            sg.operators.append(_op(schema, _opcode(schema, model, schema.BuiltinOperator.DEQUANTIZE), idx, twin))
            sg.outputs[pos] = remap[idx] = twin
    sg.operators = front + list(sg.operators)
    for signature in model.signatureDefs or []:
        for mapping in list(signature.inputs or []) + list(signature.outputs or []):
            mapping.tensorIndex = remap.get(mapping.tensorIndex, mapping.tensorIndex)
    builder = flatbuffers.Builder(len(model_bytes) + 1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def _float_twin(schema: Any, sg: Any, idx: int) -> int:
    source = sg.tensors[idx]
    twin = schema.TensorT()
    name = source.name.decode() if isinstance(source.name, bytes) else source.name
    twin.name = f"{name}_float"
    twin.shape = source.shape
    twin.shapeSignature = source.shapeSignature
    twin.type = schema.TensorType.FLOAT32
    twin.buffer = 0
    sg.tensors.append(twin)
    return len(sg.tensors) - 1


def _opcode(schema: Any, model: Any, builtin: int) -> int:
    for i, code in enumerate(model.operatorCodes):
        if max(code.builtinCode, code.deprecatedBuiltinCode) == builtin:
            return i
    code = schema.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127)
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _op(schema: Any, opcode: int, source: int, target: int) -> Any:
    op = schema.OperatorT()
    op.opcodeIndex = opcode
    op.inputs = [source]
    op.outputs = [target]
    return op
