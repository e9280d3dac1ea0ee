"""Folding a per-channel factor into the op that makes an activation's channels.

SmoothQuant (dynamic and static), AWQ (weight-only) and centering (dynamic) divide, multiply or
shift an activation per channel. Where the activation comes from a normalization (its scale and
shift are per channel) or a ``Mul`` by a per-channel constant (a decomposed RMSNorm's last op),
possibly through reshapes that keep the channel axis last (GPT-2's Conv1D flattens ``[B, S, C]``
to ``[B*S, C]``), the factor folds into those constants and costs nothing at run time. Each mode
decides when folding is safe for it (which consumers, which dtypes); this module finds the op
and its constants and rewrites them.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from ...ir_helpers import constant_array, new_initializer
from .norms import norm_of

__all__ = ["RESHAPE_OPS", "channel_chain", "channel_params", "divided_by", "fold_into", "last_dim"]

#: Ops that pass their first input's values through in order (a reshape of the same data).
RESHAPE_OPS = ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity")


def last_dim(value: ir.Value) -> int | None:
    """The size of ``value``'s last axis when it is known (an int), else None."""
    if value.shape is None or value.shape.rank() == 0:
        return None
    d = value.shape[-1]
    return d if isinstance(d, int) else None


def channel_chain(
    x: ir.Value,
    *,
    ops: tuple[str, ...] = ("Reshape",),
    max_steps: int | None = None,
    channels: int | None = None,
    stop_at_shared: bool = False,
) -> list[ir.Value]:
    """``x`` and the values it is made from through default-domain ``ops`` nodes that keep the
    last axis, nearest first: channel ``c`` of the last one is channel ``c`` of ``x``.

    A step needs the last axis to be the same int on both sides (``channels``: that int);
    ``max_steps`` bounds the walk; ``stop_at_shared`` ends it before a value other nodes read too.
    The producer of the last value is the op a per-channel factor may fold into."""
    chain = [x]
    current = x
    while max_steps is None or len(chain) <= max_steps:
        node = current.producer()
        if node is None or node.op_type not in ops or node.domain != "" or not node.inputs:
            break
        src = node.inputs[0]
        if src is None:
            break
        size = last_dim(src)
        if size is None or size != last_dim(current) or (channels is not None and size != channels):
            break
        if stop_at_shared and len(src.uses()) != 1:
            break
        chain.append(src)
        current = src
    return chain


def channel_params(node: ir.Node, *, skip_norms: bool = True) -> list[int] | None:
    """The inputs of ``node`` holding the constants that scale its output per channel: a
    normalization's scale and shift (those it has), or the one constant operand of a ``Mul``;
    None when ``node`` is neither (or a ``Mul`` without exactly one constant operand).
    ``skip_norms=False`` leaves out the fused skip-normalizations."""
    norm = norm_of(node)
    if norm is not None and (skip_norms or not norm.skip):
        return [i for i in norm.params if len(node.inputs) > i and node.inputs[i] is not None]
    if node.op_type == "Mul" and node.domain == "" and len(node.inputs) == 2:
        consts = [i for i in (0, 1) if constant_array(node.inputs[i]) is not None]
        return consts if len(consts) == 1 else None
    return None


def fold_into(
    graph: ir.Graph,
    node: ir.Node,
    inputs: list[int],
    new_value: Callable[[np.ndarray], np.ndarray],
    name: Callable[[ir.Value, int], str],
    taken: set[str],
) -> None:
    """Replace each constant input ``i`` of ``node`` in ``inputs`` by a new initializer holding
    ``new_value(old array)``, named ``name(old value, i)`` (made unique with ``taken``)."""
    for i in inputs:
        old = node.inputs[i]
        assert old is not None
        arr = constant_array(old)
        assert arr is not None
        node.replace_input_with(i, new_initializer(graph, name(old, i), new_value(arr), taken))


def divided_by(s: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """A ``new_value`` for :func:`fold_into`: the constant divided by ``s`` per channel (in float32,
    stored in the constant's dtype)."""
    return lambda arr: (arr.astype(np.float32) / s).astype(arr.dtype)
