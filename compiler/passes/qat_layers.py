"""The torch side of ``quantize.qat``: int8 fake quantization of Linear and Conv2d layers.

Imported only when the pass runs (it imports torch); ``compiler/passes/qat.py`` holds the pass.
The rounding is ``compiler/passes/int8.py``'s (ONNX Runtime's Q/DQ quantizer at deployment).
"""

from __future__ import annotations

from typing import Any

import torch

from edgeship.compiler.passes.int8 import fake_int8_activation, fake_int8_weight
from edgeship.compiler.passes.smooth_layers import SmoothedLinear


def supported(layer: torch.nn.Module) -> bool:
    """Whether ``layer`` is a Linear or Conv2d whose forward this module knows how to fake-quantize:
    ``nn.Linear`` and ``SmoothedLinear`` (``quantize.smooth``), ``nn.Conv2d``; not subclasses with a
    forward of their own, whose arithmetic it cannot see."""
    forward = type(layer).forward
    if isinstance(layer, torch.nn.Linear):
        return forward in (torch.nn.Linear.forward, SmoothedLinear.forward)
    return isinstance(layer, torch.nn.Conv2d) and forward is torch.nn.Conv2d.forward


def matmul_input(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The tensor ``layer``'s matrix multiply (or convolution) reads: a ``SmoothedLinear`` multiplies
    its input by ``inv_scale`` first, and that product is what a deployed Q/DQ model quantizes."""
    return x * layer.inv_scale if isinstance(layer, SmoothedLinear) else x


class FakeQuantized(torch.nn.Module):
    """A Linear or Conv2d computing on int8-rounded input and weights (float in, float out).

    ``lo``/``hi``: the frozen range of the input the matmul reads (``matmul_input``). The weight is
    rounded from the layer's current weight at every call, so training moves the float weights and
    the rounding follows. Where the weight had exact zeros when wrapped (``prune.magnitude``,
    ``prune.sparse24``) they stay zeros: the mask stops their gradient, so the optimizer never
    moves them. Attributes the wrapper does not have (``weight``, ``in_features``) are the layer's,
    so model code that reads them still runs. ``unwrap`` puts the layers back.
    """

    def __init__(self, layer: torch.nn.Linear | torch.nn.Conv2d, lo: float, hi: float) -> None:
        super().__init__()
        self.layer = layer
        self.lo, self.hi = min(lo, 0.0), max(hi, 0.0)
        zeros = layer.weight.detach() == 0
        self.mask: torch.Tensor | None = (~zeros).to(layer.weight.dtype) if bool(zeros.any()) else None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_modules", {}).get("layer")
            if layer is None:
                raise
            return getattr(layer, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        weight = layer.weight if self.mask is None else layer.weight * self.mask
        xq = fake_int8_activation(matmul_input(layer, x), self.lo, self.hi)
        wq = fake_int8_weight(weight)
        if isinstance(layer, torch.nn.Linear):
            return torch.nn.functional.linear(xq, wq, layer.bias)
        return layer._conv_forward(xq, wq, layer.bias)


class InputRanges:
    """Forward pre-hooks recording, per layer, the min and max of the tensor its matmul reads over
    every call (ONNX Runtime's MinMax calibration), and which layers ran at all.

    A context manager: the hooks go on entering and are removed on exit.
    """

    def __init__(self, layers: dict[str, torch.nn.Module]) -> None:
        self.layers = layers
        self.ranges: dict[str, tuple[float, float]] = {}
        self._handles: list[Any] = []

    def _hook(self, name: str) -> Any:
        def hook(layer: torch.nn.Module, args: tuple[Any, ...]) -> None:
            x = matmul_input(layer, args[0].detach())
            lo, hi = float(x.min()), float(x.max())
            seen = self.ranges.get(name)
            self.ranges[name] = (lo, hi) if seen is None else (min(seen[0], lo), max(seen[1], hi))

        return hook

    def __enter__(self) -> InputRanges:
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]
        return self

    def __exit__(self, *_exc: Any) -> None:
        for handle in self._handles:
            handle.remove()


def wrap(module: torch.nn.Module, ranges: dict[Any, tuple[float, float]]) -> list[FakeQuantized]:
    """Replace every layer in ``ranges`` (by identity; a layer registered under two parents is
    replaced in both, by one wrapper) with a ``FakeQuantized`` over its range. Returns the wrappers."""
    wrappers: dict[int, FakeQuantized] = {}
    for parent in list(module.modules()):
        for child_name, child in list(parent._modules.items()):
            if isinstance(child, (torch.nn.Linear, torch.nn.Conv2d)) and child in ranges:
                if id(child) not in wrappers:
                    wrappers[id(child)] = FakeQuantized(child, *ranges[child])
                setattr(parent, child_name, wrappers[id(child)])
    return list(wrappers.values())


def unwrap(module: torch.nn.Module) -> None:
    """Put back every layer ``wrap`` replaced: the module has its own classes and names again."""
    for parent in list(module.modules()):
        for child_name, child in list(parent._modules.items()):
            if isinstance(child, FakeQuantized):
                setattr(parent, child_name, child.layer)
