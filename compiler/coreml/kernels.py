"""Numpy kernels for the Core ML (MIL) ops that coremltools gives no numpy ``value_inference`` for,
or whose ``value_inference`` is too slow or wrong for evaluation (exact GELU through
``np.vectorize(math.erf)``, reductions that break on numpy 2).

Every function here is pure: numpy arrays in, numpy arrays out, no coremltools. Floating
inputs arrive as float32 (the evaluator widens float16 before calling) and results are
returned in float32 or the integer type the op defines; the evaluator rounds them to the
dtype the program declares. Semantics follow the MIL op reference of coremltools 9.0
(``coremltools/converters/mil/mil/ops/defs``); each function names the op it implements.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

Array = np.ndarray[Any, Any]


# ---------------------------------------------------------------- padding and windows


def resolve_pads(
    pad_type: str,
    in_sizes: Sequence[int],
    kernel: Sequence[int],
    strides: Sequence[int],
    dilations: Sequence[int],
    custom: Sequence[int] | None,
) -> list[tuple[int, int]]:
    """(begin, end) padding per spatial dimension for MIL ``pad_type`` valid / same / same_lower / custom.

    "same" puts the odd element of padding at the end, "same_lower" at the beginning
    (as coremltools' ``aggregated_pad`` and the Core ML spec define them).
    """
    pad_type = pad_type.lower()
    n = len(kernel)
    if pad_type == "valid":
        return [(0, 0)] * n
    if pad_type == "custom":
        if custom is None or len(custom) != 2 * n:
            raise ValueError(f"custom padding needs {2 * n} values, got {custom!r}")
        return [(int(custom[2 * i]), int(custom[2 * i + 1])) for i in range(n)]
    if pad_type in ("same", "same_lower"):
        pads = []
        for size, k, s, d in zip(in_sizes, kernel, strides, dilations):
            extent = (k - 1) * d + 1
            total = max(0, s * math.ceil(size / s) - size + extent - s)
            small, big = total // 2, total - total // 2
            pads.append((small, big) if pad_type == "same" else (big, small))
        return pads
    raise ValueError(f"unknown pad_type {pad_type!r}")


def _windows(x: Array, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int]) -> Array:
    """View of ``x`` (N, C, *spatial, already padded) as (N, C, *out, *kernel) windows."""
    n = len(kernel)
    extents = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    axes = tuple(range(2, 2 + n))
    view = sliding_window_view(x, extents, axis=axes)
    index = (slice(None), slice(None))
    index += tuple(slice(None, None, s) for s in strides)
    index += tuple(slice(None, None, d) for d in dilations)
    return view[index]


# ---------------------------------------------------------------- convolution and pooling


def conv(
    x: Array,
    weight: Array,
    bias: Array | None,
    strides: Sequence[int],
    pad_type: str,
    pad: Sequence[int] | None,
    dilations: Sequence[int],
    groups: int,
) -> Array:
    """MIL ``conv``: x (N, C_in, *D), weight (C_out, C_in / groups, *K), 1 to 3 spatial dims."""
    spatial = x.ndim - 2
    kernel = weight.shape[2:]
    pads = resolve_pads(pad_type, x.shape[2:], kernel, strides, dilations, pad)
    xp = np.pad(x, [(0, 0), (0, 0), *pads])
    win = _windows(xp, kernel, strides, dilations)  # N, C, *O, *K
    batch, channels = x.shape[:2]
    out_sizes = win.shape[2 : 2 + spatial]
    c_out = weight.shape[0]
    cin_g, cout_g = channels // groups, c_out // groups
    # N, G, Cin_g, *O, *K -> N, G, *O, Cin_g, *K -> N, G, P, Cin_g * prod(K)
    win = win.reshape(batch, groups, cin_g, *out_sizes, *kernel)
    order = (0, 1, *range(3, 3 + spatial), 2, *range(3 + spatial, 3 + 2 * spatial))
    cols = win.transpose(order).reshape(batch, groups, int(np.prod(out_sizes)), cin_g * int(np.prod(kernel)))
    w = weight.reshape(groups, cout_g, cin_g * int(np.prod(kernel))).transpose(0, 2, 1)
    out = np.matmul(cols, w[None])  # N, G, P, Cout_g
    out = out.transpose(0, 1, 3, 2).reshape(batch, c_out, *out_sizes)
    if bias is not None:
        out = out + bias.reshape((1, c_out) + (1,) * spatial)
    return out


def _pool_out_size(size: int, k: int, s: int, pad: tuple[int, int], ceil_mode: bool) -> int:
    # coremltools' spatial_dimensions_out_shape, including its ceil-mode correction.
    if not ceil_mode:
        return (size + pad[0] + pad[1] - k) // s + 1
    out = (size + pad[0] + pad[1] - k + s - 1) // s + 1
    if (out - 1) * s >= size + pad[0] and (pad[0] > 0 or pad[1] > 0):
        out -= 1
    return out


def pool(
    x: Array,
    kind: str,
    kernel: Sequence[int],
    strides: Sequence[int],
    pad_type: str,
    pad: Sequence[int] | None,
    ceil_mode: bool,
    exclude_padding_from_average: bool = False,
) -> Array:
    """MIL ``max_pool`` (``kind="max"``) and ``avg_pool`` (``kind="avg"``) over x (N, C, *D).

    Average pooling divides by the window's elements inside the explicitly padded input
    (inside the unpadded input with ``exclude_padding_from_average``); positions that only
    ceil mode adds are never counted, as in PyTorch.
    """
    spatial = x.ndim - 2
    ones = [1] * spatial
    pads = resolve_pads(pad_type, x.shape[2:], kernel, strides, ones, pad)
    outs = [_pool_out_size(size, k, s, p, ceil_mode) for size, k, s, p in zip(x.shape[2:], kernel, strides, pads)]
    # Extra end padding so that every output window lies inside the array.
    full = [
        (p[0], max(p[1], (o - 1) * s + k - size - p[0]))
        for size, k, s, p, o in zip(x.shape[2:], kernel, strides, pads, outs)
    ]
    fill = -np.inf if kind == "max" else 0.0
    xp = np.pad(x, [(0, 0), (0, 0), *full], constant_values=fill)
    win = _windows(xp, kernel, strides, ones)
    crop: tuple[Any, ...] = tuple(slice(0, o) for o in outs)
    index = (slice(None), slice(None), *crop)
    win = win[index]
    axes = tuple(range(2 + spatial, 2 + 2 * spatial))
    if kind == "max":
        return np.asarray(win.max(axis=axes))
    total = win.sum(axis=axes)
    # Count the elements each window covers in the region that counts toward the divisor.
    mask = np.zeros([size + b + e for size, (b, e) in zip(x.shape[2:], full)], dtype=np.float32)
    region = tuple(
        slice(b, b + size) if exclude_padding_from_average else slice(0, b + size + p[1])
        for size, (b, _), p in zip(x.shape[2:], full, pads)
    )
    mask[region] = 1.0
    counts = _windows(mask[None, None], kernel, strides, ones)
    corner = (0, 0, *crop)
    counts = counts[corner].sum(axis=tuple(range(spatial, 2 * spatial)))
    return np.asarray(total / np.maximum(counts, 1.0))


# ---------------------------------------------------------------- normalization


def batch_norm(
    x: Array, mean: Array, variance: Array, gamma: Array | None, beta: Array | None, epsilon: float
) -> Array:
    """MIL ``batch_norm``: per-channel (axis 1) inference-mode normalization."""
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    out = (x - mean.reshape(shape)) / np.sqrt(variance.reshape(shape) + epsilon)
    if gamma is not None:
        out = out * gamma.reshape(shape)
    if beta is not None:
        out = out + beta.reshape(shape)
    return out


def instance_norm(x: Array, gamma: Array | None, beta: Array | None, epsilon: float) -> Array:
    """MIL ``instance_norm``: normalize each (sample, channel) over the spatial dims."""
    axes = tuple(range(2, x.ndim))
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    out = (x - mean) / np.sqrt(var + epsilon)
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
    if gamma is not None:
        out = out * gamma.reshape(shape)
    if beta is not None:
        out = out + beta.reshape(shape)
    return out


def layer_norm(x: Array, axes: Sequence[int] | None, gamma: Array | None, beta: Array | None, epsilon: float) -> Array:
    """MIL ``layer_norm``: normalize over ``axes`` (all when None); gamma/beta have the shape of those dims."""
    rank = x.ndim
    norm_axes = tuple(sorted(a % rank for a in axes)) if axes is not None else tuple(range(rank))
    mean = x.mean(axis=norm_axes, keepdims=True)
    centred = x - mean
    var = (centred * centred).mean(axis=norm_axes, keepdims=True)
    out = centred / np.sqrt(var + epsilon)
    shape = [x.shape[i] if i in norm_axes else 1 for i in range(rank)]
    if gamma is not None:
        out = out * gamma.reshape(shape)
    if beta is not None:
        out = out + beta.reshape(shape)
    return out


# ---------------------------------------------------------------- activations


def erf(x: Array) -> Array:
    """Error function, vectorised: Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7,
    below float32 resolution near 1), evaluated in float64."""
    z = np.asarray(x, dtype=np.float64)
    t = 1.0 / (1.0 + 0.3275911 * np.abs(z))
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    return np.sign(z) * (1.0 - poly * np.exp(-z * z))


def gelu(x: Array, mode: str) -> Array:
    """MIL ``gelu`` with mode EXACT, TANH_APPROXIMATION or SIGMOID_APPROXIMATION."""
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))
    if mode == "SIGMOID_APPROXIMATION":
        return x * sigmoid(1.702 * x)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def sigmoid(x: Array) -> Array:
    """Logistic function without overflow warnings for large negative inputs."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def softmax(x: Array, axis: int) -> Array:
    """MIL ``softmax`` along ``axis`` (max-subtracted)."""
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------- reductions


def reduce(kind: str, x: Array, axes: Sequence[int] | None, keep_dims: bool) -> Array:
    """MIL ``reduce_<kind>`` over ``axes`` (all when None).

    ``keep_dims`` is passed to numpy as a Python bool: numpy 2 rejects the numpy bool that
    coremltools' own ``value_inference`` passes.
    """
    axis = tuple(int(a) for a in axes) if axes is not None else None
    keep = bool(keep_dims)
    if kind == "sum":
        return np.sum(x, axis=axis, keepdims=keep)
    if kind == "mean":
        return np.mean(x, axis=axis, keepdims=keep)
    if kind == "max":
        return np.max(x, axis=axis, keepdims=keep)
    if kind == "min":
        return np.min(x, axis=axis, keepdims=keep)
    if kind == "prod":
        return np.prod(x, axis=axis, keepdims=keep)
    if kind == "sum_square":
        return np.sum(x * x, axis=axis, keepdims=keep)
    if kind == "l1_norm":
        return np.sum(np.abs(x), axis=axis, keepdims=keep)
    if kind == "l2_norm":
        return np.sqrt(np.sum(x * x, axis=axis, keepdims=keep))
    if kind == "log_sum":
        return np.log(np.sum(x, axis=axis, keepdims=keep))
    if kind == "log_sum_exp":
        m = np.max(x, axis=axis, keepdims=True)
        out = np.log(np.sum(np.exp(x - m), axis=axis, keepdims=True)) + m
        return out if keep else np.squeeze(out, axis=axis)
    raise ValueError(f"unknown reduction {kind!r}")


def reduce_arg(kind: str, x: Array, axis: int, keep_dims: bool) -> Array:
    """MIL ``reduce_argmax`` / ``reduce_argmin`` (int32 indices)."""
    out = np.argmax(x, axis=axis) if kind == "argmax" else np.argmin(x, axis=axis)
    if keep_dims:
        out = np.expand_dims(out, axis)
    return out.astype(np.int32)


def cumsum(x: Array, axis: int, exclusive: bool, reverse: bool) -> Array:
    """MIL ``cumsum``."""
    data = np.flip(x, axis=axis) if reverse else x
    out = np.cumsum(data, axis=axis)
    if exclusive:
        out = out - data
    return np.flip(out, axis=axis) if reverse else out


# ---------------------------------------------------------------- tensor shape ops


def reshape(x: Array, shape: Sequence[int], zero_from_right: bool) -> Array:
    """MIL ``reshape``. A 0 copies an input dimension: by position (iOS15/16), or counted from
    the right with 1 when out of range (iOS17+, ``zero_from_right``). -1 is inferred."""
    target = [int(d) for d in shape]
    rank = x.ndim
    for i, d in enumerate(target):
        if d == 0:
            if zero_from_right:
                j = rank - (len(target) - i)
                target[i] = x.shape[j] if 0 <= j < rank else 1
            else:
                target[i] = x.shape[i]
    return x.reshape(target)


def gather(x: Array, indices: Array, axis: int, batch_dims: int) -> Array:
    """MIL ``gather`` (negative indices count from the end), with ``batch_dims`` leading batch dims."""
    axis = axis % x.ndim
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    if batch_dims == 0:
        return np.take(x, idx, axis=axis)
    batch_shape = x.shape[:batch_dims]
    parts = [np.take(x[b], idx[b], axis=axis - batch_dims) for b in np.ndindex(*batch_shape)]
    return np.stack(parts).reshape(*batch_shape, *parts[0].shape)


def _bilinear_axis(x: Array, axis: int, size: int, align_corners: bool, half_pixel_centers: bool) -> Array:
    """Linear interpolation of ``x`` along ``axis`` to ``size`` samples (one axis of MIL ``upsample_bilinear``)."""
    n = x.shape[axis]
    i = np.arange(size, dtype=np.float64)
    if align_corners:
        src = i * ((n - 1) / (size - 1)) if size > 1 else np.zeros(size)
    elif half_pixel_centers:
        src = (i + 0.5) * (n / size) - 0.5
    else:
        src = i * (n / size)
    src = np.clip(src, 0, n - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n - 1)
    shape = [1] * x.ndim
    shape[axis] = size
    frac = (src - lo).reshape(shape)
    return np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac


def upsample_bilinear(
    x: Array, out_height: int, out_width: int, align_corners: bool, half_pixel_centers: bool
) -> Array:
    """MIL ``upsample_bilinear`` on the last two axes of ``x``, to ``out_height`` x ``out_width``.
    Grid points as the op reference defines them: ``i * (in - 1) / (out - 1)`` with ``align_corners``,
    ``(i + 0.5) * in / out - 0.5`` with ``half_pixel_centers`` (the scale recomputed from the sizes,
    as PyTorch's ``recompute_scale_factor=True``), else ``i * in / out``; clamped to the input."""
    y = _bilinear_axis(x.astype(np.float32), x.ndim - 2, out_height, align_corners, half_pixel_centers)
    return _bilinear_axis(y, x.ndim - 1, out_width, align_corners, half_pixel_centers).astype(np.float32)


def gather_nd(x: Array, indices: Array, batch_dims: int) -> Array:
    """MIL ``gather_nd``: ``indices`` (K) hold coordinates into the dimensions of ``x`` (D) after its
    ``batch_dims`` leading batch dimensions; output shape ``K[:-1] + D[batch_dims + K[-1]:]``.
    Negative coordinates count from the end (as ``gather``)."""
    idx = np.asarray(indices).astype(np.int64)
    depth = idx.shape[-1]
    batch_shape = x.shape[:batch_dims]
    if idx.shape[:batch_dims] != batch_shape:
        raise ValueError(f"gather_nd: indices batch dims {idx.shape[:batch_dims]} differ from x's {batch_shape}")
    indexed = np.asarray(x.shape[batch_dims : batch_dims + depth], np.int64)
    idx = np.where(idx < 0, idx + indexed, idx)
    xb = x.reshape(-1, *x.shape[batch_dims:])
    ib = idx.reshape(len(xb), -1, depth)
    parts = [xb[b][tuple(ib[b][:, j] for j in range(depth))] for b in range(len(xb))]
    return np.stack(parts).reshape(*idx.shape[:-1], *x.shape[batch_dims + depth :])


def concat(values: Sequence[Array], axis: int, interleave: bool) -> Array:
    """MIL ``concat``; with ``interleave`` the inputs' slices along ``axis`` alternate."""
    if not interleave:
        return np.concatenate(values, axis=axis)
    stacked = np.stack(values, axis=axis + 1 if axis >= 0 else axis)
    shape = list(values[0].shape)
    shape[axis] = shape[axis] * len(values)
    return stacked.reshape(shape)


def split(x: Array, axis: int, num_splits: int | None, split_sizes: Sequence[int] | None) -> list[Array]:
    """MIL ``split`` into ``num_splits`` equal parts or parts of ``split_sizes``."""
    if split_sizes is not None:
        bounds = np.cumsum([int(s) for s in split_sizes])[:-1]
        return list(np.split(x, bounds, axis=axis))
    assert num_splits is not None
    size = x.shape[axis]
    step = math.ceil(size / num_splits)
    return list(np.split(x, list(range(step, size, step)), axis=axis))


# ---------------------------------------------------------------- quantization


def _per_axis(param: Array, rank: int, axis: int | None) -> Array:
    """Broadcast a scalar or per-axis vector quantization parameter to ``rank`` dims."""
    param = np.asarray(param)
    if param.ndim == 0 or axis is None:
        return param
    shape = [1] * rank
    shape[axis % rank] = param.shape[0]
    return param.reshape(shape)


def quantize(x: Array, scale: Array, zero_point: Array | None, axis: int | None, output_dtype: str) -> Array:
    """MIL ``quantize``: ``clip(round_half_even(x / scale) + zero_point)`` to int8 or uint8."""
    dtype = np.dtype(np.int8 if output_dtype == "int8" else np.uint8)
    info = np.iinfo(dtype)
    q = np.rint(x / _per_axis(scale, x.ndim, axis))
    if zero_point is not None:
        q = q + _per_axis(zero_point, x.ndim, axis).astype(np.float32)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(x: Array, scale: Array, zero_point: Array | None, axis: int | None) -> Array:
    """MIL ``dequantize`` and ``constexpr_affine_dequantize``: ``scale * (x - zero_point)``."""
    data = x.astype(np.float32)
    if zero_point is not None:
        data = data - _per_axis(zero_point, x.ndim, axis).astype(np.float32)
    return data * _per_axis(scale, x.ndim, axis).astype(np.float32)


def blockwise_shift_scale(data: Array, scale: Array, offset: Array | None) -> Array:
    """MIL ``constexpr_blockwise_shift_scale``: ``scale * (data - offset)``, one scale per block.

    ``scale`` and ``offset`` have the rank of ``data``; the block size along each dim is
    ``data.shape[i] // scale.shape[i]``.
    """
    out = data.astype(np.float32)
    if offset is not None:
        out = out - _repeat_blocks(offset.astype(np.float32), data.shape)
    return out * _repeat_blocks(scale.astype(np.float32), data.shape)


def _repeat_blocks(param: Array, shape: Sequence[int]) -> Array:
    for axis, (size, n) in enumerate(zip(shape, param.shape)):
        if size != n:
            param = np.repeat(param, size // n, axis=axis)
    return param


def unpack_bits(packed: Array, nbits: int, count: int) -> Array:
    """Unpack ``count`` unsigned ``nbits``-bit indices stored LSB first in a uint8 vector."""
    bits = np.unpackbits(packed.astype(np.uint8), bitorder="little")[: count * nbits]
    weights = (1 << np.arange(nbits)).astype(np.uint16)
    return (bits.reshape(count, nbits).astype(np.uint16) * weights).sum(axis=1)


def lut_to_dense_ios16(indices: Array, lut: Array, shape: Sequence[int]) -> Array:
    """MIL iOS16 ``constexpr_lut_to_dense``: one LUT of 2/4/16/64/256 entries, packed indices."""
    nbits = round(math.log2(lut.shape[0]))
    count = int(np.prod([int(s) for s in shape]))
    return lut[unpack_bits(indices, nbits, count)].reshape([int(s) for s in shape])


def lut_to_dense_ios18(indices: Array, lut: Array, vector_axis: int | None) -> Array:
    """MIL iOS18 ``constexpr_lut_to_dense``: per-block LUTs (lut rank = indices rank + 2), scalar or
    vector palettization (a vector of VECTOR_SIZE values per index, laid along ``vector_axis``)."""
    rank = indices.ndim
    n_palettes, vsize = lut.shape[-2], lut.shape[-1]
    block_counts = lut.shape[:rank]
    # Which LUT each element uses: its block index along every dim.
    idx = indices.astype(np.int64)
    selectors = []
    for axis in range(rank):
        block = indices.shape[axis] // block_counts[axis]
        pos = np.arange(indices.shape[axis]) // block
        shape = [1] * rank
        shape[axis] = indices.shape[axis]
        selectors.append(np.broadcast_to(pos.reshape(shape), indices.shape))
    flat = lut.reshape(*block_counts, n_palettes, vsize)
    where = (*selectors, idx)
    values = flat[where]  # indices.shape + (vsize,)
    if vsize == 1:
        return values[..., 0]
    assert vector_axis is not None
    axis = vector_axis % rank
    values = np.moveaxis(values, -1, axis + 1)
    shape = list(indices.shape)
    shape[axis] *= vsize
    return values.reshape(shape)


def sparse_to_dense(nonzero_data: Array, mask: Array, shape: Sequence[int] | None = None) -> Array:
    """MIL ``constexpr_sparse_to_dense``: scatter ``nonzero_data`` where the (bit-packed in iOS16) mask is 1."""
    if shape is not None:
        count = int(np.prod([int(s) for s in shape]))
        flags = np.unpackbits(mask.astype(np.uint8), bitorder="little")[:count].astype(bool)
        out = np.zeros(count, dtype=nonzero_data.dtype)
        out[flags] = nonzero_data
        return out.reshape([int(s) for s in shape])
    out = np.zeros(mask.shape, dtype=nonzero_data.dtype)
    out[mask.astype(bool)] = nonzero_data
    return out
