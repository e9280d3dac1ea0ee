"""Constant and shape readers that constant folding and no-op removal share."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

__all__ = ["broadcast", "const_value"]


def const_value(value: ir.Value | None) -> np.ndarray | None:
    """The constant content of a value (initializer or Constant output), if small enough to read.

    Reads ``value.const_value`` only (set on initializers and on the values onnxscript's folder
    has evaluated), unlike :func:`~graphopt.passes.ir_helpers.constant_array`, which also looks
    through a Constant node's attribute.
    """
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    try:
        return value.const_value.numpy()
    except Exception:
        return None


def broadcast(*shapes: Sequence[int]) -> tuple[int, ...] | None:
    """The broadcast of static shapes (numpy's rules), None when they do not broadcast."""
    try:
        return tuple(int(x) for x in np.broadcast_shapes(*[tuple(int(d) for d in s) for s in shapes]))
    except ValueError:
        return None
