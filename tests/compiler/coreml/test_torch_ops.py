"""edgeship's Core ML translations of torch ops (``compiler/coreml/torch_ops.py``), each converted from a
tiny torch module with coremltools and run through the numpy reference evaluator against PyTorch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("coremltools")
torch = pytest.importorskip("torch")

from edgeship.compiler.coreml import ReferenceEvaluator, torch_ops  # noqa: E402

RNG = np.random.default_rng(0)


class Fn(torch.nn.Module):
    """A module that applies ``fn`` to its inputs; ``buffers`` become traced constants."""

    def __init__(self, fn: Any, **buffers: Any) -> None:
        super().__init__()
        self.fn = fn
        for name, value in buffers.items():
            self.register_buffer(name, value)

    def forward(self, *xs: Any) -> Any:
        return self.fn(self, *xs)


def _run(
    monkeypatch: Any, uses: tuple[str, ...], module: Any, inputs: tuple[Any, ...], path: Path
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Convert ``module`` with the translations installed and check that the ones named in ``uses`` ran
    (else the test would check nothing); return (torch output, evaluator output) pairs."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    torch_ops.install()
    called: list[str] = []
    for op in uses:
        original = _TORCH_OPS_REGISTRY[op]

        def spy(context: Any, node: Any, original: Any = original, op: str = op) -> None:
            called.append(op)
            original(context, node)

        monkeypatch.setitem(_TORCH_OPS_REGISTRY.name_to_func_mapping, op, spy)
    module.eval()
    with torch.no_grad():
        traced = torch.jit.trace(module, inputs)
        want = module(*inputs)
    want = list(want) if isinstance(want, tuple) else [want]
    ct.convert(
        traced,
        convert_to="mlprogram",
        minimum_deployment_target=ct.target.iOS17,
        inputs=[
            ct.TensorType(name=f"in{i}", shape=tuple(x.shape), dtype=np.float32 if x.is_floating_point() else np.int32)
            for i, x in enumerate(inputs)
        ],
        outputs=[ct.TensorType(name=f"out{i}") for i in range(len(want))],
        compute_precision=ct.precision.FLOAT32,
    ).save(str(path))
    evaluator = ReferenceEvaluator(path)
    feeds = {
        f"in{i}": x.numpy().astype(np.float32 if x.is_floating_point() else np.int32) for i, x in enumerate(inputs)
    }
    got = evaluator.run(feeds)
    assert set(uses) <= set(called), f"the traced graph never reached {set(uses) - set(called)}"
    return [(w.numpy(), got[f"out{i}"]) for i, w in enumerate(want)]


def _assert_matches(pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    for i, (want, got) in enumerate(pairs):
        assert got.shape == want.shape, f"output {i}: shape {got.shape} != {want.shape}"
        if want.dtype == np.bool_ or np.issubdtype(want.dtype, np.integer):
            np.testing.assert_array_equal(got, want.astype(got.dtype), err_msg=f"output {i}")
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"output {i}")


def _randn(*shape: int) -> Any:
    return torch.from_numpy(RNG.standard_normal(shape).astype(np.float32))


def test_new_ones_keeps_shape_and_dtype_of_float_int_and_bool_tensors(tmp_path, monkeypatch):
    ids = torch.from_numpy(RNG.integers(0, 5, (2, 4)))
    module = Fn(
        lambda m, x, i: (
            x + x.new_ones(x.shape),
            i * i.new_ones((1, 4)),
            ((x > 0) & x.new_ones((), dtype=torch.bool)).float(),
            x.new_ones((2, 3), dtype=torch.int64).sum(-1).float(),
        )
    )
    pairs = _run(monkeypatch, ("new_ones",), module, (_randn(2, 4), ids), tmp_path / "m.mlpackage")
    _assert_matches(pairs)


@pytest.mark.parametrize(
    ("name", "fn", "make"),
    [
        ("last-axis", lambda m, x: torch.diff(x), lambda: (_randn(3, 6),)),
        ("n2-axis1", lambda m, x: torch.diff(x, n=2, dim=1), lambda: (_randn(2, 5, 3),)),
        (
            "prepend-append",
            lambda m, x, p, a: torch.diff(x, dim=-1, prepend=p, append=a),
            lambda: (_randn(2, 4), _randn(2, 1), _randn(2, 2)),
        ),
        # transformers' masking_utils.find_packed_sequence_indices: int64 position ids, prepend first - 1
        (
            "position-ids",
            lambda m, i: (torch.diff(i, prepend=i[:, :1] - 1, dim=-1) != 1).cumsum(-1).float(),
            lambda: (torch.tensor([[0, 1, 2, 0, 1, 5]]),),
        ),
        ("bool", lambda m, x: torch.diff(x > 0).float(), lambda: (_randn(2, 7),)),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_diff_matches_torch(tmp_path, monkeypatch, name, fn, make):
    pairs = _run(monkeypatch, ("diff",), Fn(fn), make(), tmp_path / "m.mlpackage")
    _assert_matches(pairs)


def test_int_of_a_traced_size_converts_under_numpy_2(tmp_path, monkeypatch):
    """BERT slices ``position_ids[:, past : seq_length + past]``: the trace holds ``aten::Int`` of a size
    sum that coremltools folds to a one-element array, then calls ``int(array)``, which numpy 2 refuses."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.torch import ops

    module = Fn(lambda m, x: x + m.positions[:, 0 : x.shape[1] + 0], positions=torch.arange(10.0).expand(1, -1))
    traced = torch.jit.trace(module, (_randn(2, 5),))
    with monkeypatch.context() as stock:  # coremltools' own converter: the failure this translation fixes
        stock.setitem(ops._TORCH_OPS_REGISTRY.name_to_func_mapping, "int", ops._int)
        with pytest.raises(TypeError, match="only 0-dimensional arrays"):
            ct.convert(traced, convert_to="mlprogram", inputs=[ct.TensorType(name="in0", shape=(2, 5))])
    pairs = _run(monkeypatch, ("int",), module, (_randn(2, 5),), tmp_path / "m.mlpackage")
    _assert_matches(pairs)


def test_install_is_idempotent_and_names_its_ops():
    torch_ops.install()
    torch_ops.install()
    from coremltools.converters.mil.frontend.torch.torch_op_registry import _TORCH_OPS_REGISTRY

    for op in torch_ops.TRANSLATED_OPS:
        assert op in _TORCH_OPS_REGISTRY, op
