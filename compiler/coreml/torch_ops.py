"""Translations coremltools 9.0's PyTorch frontend lacks (or gets wrong) for models as written in
Hugging Face ``transformers``: the one place edgeship supplies Core ML conversions of torch ops.

Each function below is a coremltools torch-frontend converter, registered with
``register_torch_op`` by ``install()`` (once per process, before ``ct.convert``). Found by
converting transformers 5.23 models with random weights (BERT, DistilBERT, GPT-2, ViT,
ConvNeXt; ``tests/compiler/test_transformers_models.py``) through ``torch.jit.trace``:

* ``int`` (``aten::Int`` of a traced size computation, e.g. BERT's
  ``position_ids[:, past : seq_length + past]``): coremltools folds the size to a one-element
  1-D array and calls ``int(array)``, which numpy 2 refuses ("only 0-dimensional arrays can be
  converted to Python scalars"). Replaced by a cast that takes the array's single item.
* ``new_ones`` (DistilBERT, and transformers' ``masking_utils`` in every model that builds an
  attention mask through it): not implemented in coremltools.
* ``diff`` (GPT-2-style decoders: ``masking_utils.find_packed_sequence_indices`` diffs the
  position ids): not implemented in coremltools.

Each translation is tested against PyTorch through the reference evaluator
(``tests/compiler/coreml/test_torch_ops.py``). Relies on coremltools' private frontend helpers
(``_get_inputs``, the dtype tables), like ``reference.py``: pinned to coremltools 9.0.
"""

from __future__ import annotations

from typing import Any

import numpy as np

_installed = False

#: The torch ops this module converts (or converts instead of coremltools).
TRANSLATED_OPS = ("int", "new_ones", "diff")


def install() -> None:
    """Register the translations with coremltools' torch frontend (idempotent).

    ``int`` replaces coremltools' own converter (``override=True``); the others are new. Raises ``CoreMLVersionError`` when coremltools is not the version this was written for.
    """
    global _installed
    if _installed:
        return
    from edgeship.compiler.coreml.reference import coremltools_module

    coremltools_module()  # checks the version
    from coremltools.converters.mil.frontend.torch.torch_op_registry import register_torch_op

    register_torch_op(_int, torch_alias=["int"], override=True)
    register_torch_op(new_ones, override=True)
    register_torch_op(diff, override=True)
    _installed = True


def _int(context: Any, node: Any) -> None:
    """``int(t)`` on a scalar or a one-element tensor: a constant when ``t`` is known at conversion
    time (taking the single item, which numpy 2 requires), else a cast to int32."""
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.mil import Builder as mb

    x = _get_inputs(context, node, expected=1)[0]
    if not (len(x.shape) == 0 or all(d == 1 for d in x.shape)):
        raise ValueError(f"node {node.name}: int() of a tensor with shape {x.shape}, not one element")
    if x.can_be_folded_to_const():
        result = mb.const(val=int(np.asarray(x.val).reshape(-1)[0]), name=node.name)
    else:
        if len(x.shape) > 0:
            x = mb.squeeze(x=x, name=node.name + "_item")
        result = mb.cast(x=x, dtype="int32", name=node.name)
    context.add(result, node.name)


def new_ones(context: Any, node: Any) -> None:
    """``x.new_ones(size, dtype=None, ...)``: a tensor of ones of shape ``size``, with ``dtype``
    or else ``x``'s dtype (int64 and float64 become int32 and float32, as everywhere in Core ML)."""
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs, _get_kwinputs
    from coremltools.converters.mil.frontend.torch.utils import NUM_TO_NUMPY_DTYPE
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    inputs = _get_inputs(context, node, min_expected=2)
    x, size = inputs[0], inputs[1]
    dtype_var = inputs[2] if len(inputs) > 2 and inputs[2] is not None else None
    if dtype_var is None:
        dtype_var = (_get_kwinputs(context, node, "dtype", default=[None]) or [None])[0]
    if dtype_var is not None and dtype_var.val is not None:
        np_dtype = np.dtype(NUM_TO_NUMPY_DTYPE[int(dtype_var.val)])
    else:
        np_dtype = np.dtype(types.nptype_from_builtin(x.dtype))
    if np_dtype == np.bool_:
        value: Any = True
    elif np.issubdtype(np_dtype, np.integer):
        value = np.int32(1)
    elif np_dtype == np.float16:
        value = np.float16(1)
    else:
        value = np.float32(1)
    if isinstance(size, list):  # dimensions as separate scalars: known now, or some computed at run time
        known = all(d.val is not None for d in size)
        shape_val = [int(np.asarray(d.val).reshape(-1)[0]) for d in size] if known else None
        if not known:
            size = mb.concat(values=size, axis=0)
    else:
        shape_val = None if size.val is None else [int(d) for d in np.asarray(size.val).reshape(-1)]
    if shape_val is not None:
        result = mb.const(val=np.full(tuple(shape_val), value, dtype=np.asarray(value).dtype), name=node.name)
    else:
        result = mb.fill(shape=size, value=value, name=node.name)
    context.add(result, node.name)


def diff(context: Any, node: Any) -> None:
    """``torch.diff(x, n=1, dim=-1, prepend=None, append=None)``: ``x[1:] - x[:-1]`` along ``dim``,
    ``n`` times, after concatenating ``prepend`` and ``append``. Booleans diff as exclusive or, as
    torch does."""
    from coremltools.converters.mil.frontend.torch.ops import _get_inputs
    from coremltools.converters.mil.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    inputs = _get_inputs(context, node, min_expected=1)
    x = inputs[0]
    n = int(inputs[1].val) if len(inputs) > 1 and inputs[1] is not None else 1
    dim = int(inputs[2].val) if len(inputs) > 2 and inputs[2] is not None else -1
    prepend = inputs[3] if len(inputs) > 3 else None
    append = inputs[4] if len(inputs) > 4 else None
    rank = len(x.shape)
    axis = dim % rank
    parts = [v for v in (prepend, x, append) if v is not None]
    if len(parts) > 1:
        x = mb.concat(values=parts, axis=axis)
    for i in range(n):
        length = x.shape[axis]
        if isinstance(length, int) and length < 1:
            break
        begin_hi, begin_lo = [0] * rank, [0] * rank
        end_hi, end_lo = [0] * rank, [0] * rank
        begin_hi[axis], end_lo[axis] = 1, -1
        mask = [True] * rank
        mask[axis] = False
        end_mask_hi = [True] * rank
        hi = mb.slice_by_index(x=x, begin=begin_hi, end=end_hi, begin_mask=[False] * rank, end_mask=end_mask_hi)
        lo = mb.slice_by_index(x=x, begin=begin_lo, end=end_lo, begin_mask=[True] * rank, end_mask=mask)
        name = node.name if i == n - 1 else f"{node.name}_{i}"
        x = mb.logical_xor(x=hi, y=lo, name=name) if types.is_bool(x.dtype) else mb.sub(x=hi, y=lo, name=name)
    context.add(x, node.name)
