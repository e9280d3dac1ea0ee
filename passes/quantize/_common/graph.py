"""Graph edits every quantization mode makes: a constant array as a new initializer."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ...ir_helpers import unique_name

__all__ = ["add_initializer"]


def add_initializer(graph: ir.Graph, base: str, array: np.ndarray, taken: set[str]) -> ir.Value:
    """Register ``array`` as an initializer of ``graph`` named ``base`` (or ``base_<i>`` when that
    is taken, see :func:`unique_name`) and return its value."""
    name = unique_name(graph, base, taken)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value
