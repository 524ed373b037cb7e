"""Int8 rounding as ONNX Runtime's Q/DQ quantizer applies it at deployment
(``onnxruntime.quantization.quant_utils.compute_scale_zp``), in torch: activations asymmetric int8
over a calibrated [min, max] that holds 0, zero point ``round(-128 - min / scale)``; weights
symmetric int8 per output channel, scale ``absmax / 127``, values in -127..127.

One definition for the passes that simulate it: ``quantize.qat`` trains through it (the gradient is
the identity, a straight-through estimator), ``quantize.smooth`` with ``alpha: auto`` measures
each migration strength with it. Imported only when a pass runs (it imports torch).
"""

from __future__ import annotations

import torch


def fake_int8_activation(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """``x`` rounded to the 256 levels of asymmetric int8 over [lo, hi] (lo <= 0 <= hi) and back.

    Values outside the range clamp to its ends. The gradient is the identity (straight-through
    estimator): ``x + (q(x) - x).detach()``.
    """
    step = (hi - lo) / 255.0
    if step <= torch.finfo(torch.float32).tiny:
        return x  # an input that was 0 throughout: ORT quantizes it with scale 1, which keeps 0 exact
    zero = round(-128 - lo / step)
    q = ((x / step).round() + zero).clamp(-128, 127).sub(zero).mul(step)
    return x + (q - x).detach()


def fake_int8_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to symmetric int8 per output channel (axis 0, scale ``absmax / 127``) and back;
    straight-through gradient. A channel of zeros stays zeros."""
    steps = w.detach().abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp(min=1e-12) / 127.0
    q = (w / steps).round().clamp(-127, 127).mul(steps)
    return w + (q - w).detach()
