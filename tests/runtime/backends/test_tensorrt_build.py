"""The device's engine build: which TensorRT builder settings a build spec becomes.

Runs ``_build_engine`` against a recording stand-in for the ``tensorrt`` module
(tests/runtime/backends/fake_tensorrt.py): it proves the flags the runtime sets, up to the
library boundary. Whether TensorRT then builds, and picks sparse kernels, needs a GPU (hil/).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from edgeship.errors import ModelLoadError
from edgeship.runtime.backends.tensorrt import _build_engine
from edgeship.runtime.backends.tensorrt_spec import BuildSpec
from tests.runtime.backends.fake_tensorrt import BuilderFlag, FakeTensorRTModule

onnx = pytest.importorskip("onnx")


class _Logger:
    def __init__(self) -> None:
        self.errors: list[str] = []


@pytest.fixture
def graph(tmp_path: Path) -> Path:
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    model = helper.make_model(
        helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        )
    )
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path))
    return path


def build(graph: Path, **spec: Any) -> set[BuilderFlag]:
    trt = FakeTensorRTModule()
    plan = _build_engine(
        trt,  # type: ignore[arg-type]
        _Logger(),
        graph,
        BuildSpec.from_dict({"min_tensorrt_version": "10.0", "workspace_mib": 256, **spec}),
    )
    assert plan == b"fake plan"
    (config,) = trt.configs
    return config.flags


@pytest.mark.parametrize(
    ("precision", "flags"),
    [("fp32", set()), ("fp16", {BuilderFlag.FP16}), ("int8", {BuilderFlag.INT8, BuilderFlag.FP16})],
)
def test_sparsity_2_4_in_the_spec_sets_sparse_weights_on_the_builder(graph: Path, precision: str, flags: set[Any]):
    assert build(graph, precision=precision, sparsity_2_4=True) == flags | {BuilderFlag.SPARSE_WEIGHTS}
    assert build(graph, precision=precision) == flags  # absent means dense kernels only


def test_a_graph_the_parser_refuses_is_a_load_error(tmp_path: Path):
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"not onnx")
    with pytest.raises(ModelLoadError, match=r"TensorRT's ONNX parser refused model\.onnx"):
        build(bad, precision="fp16", sparsity_2_4=True)
