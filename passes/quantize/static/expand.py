"""Ops a backend runs as their ONNX function body anyway, expanded before Q/DQ placement.

Why: ONNX Runtime's CPU provider has no HardSwish kernel. It inlines HardSwish-14's function
body, ``x · HardSigmoid(x, 1/6, ½)``, when it loads the model, *after* the Q/DQ pairs were placed
around the single HardSwish node; its QDQ fusions then see a Mul whose operands carry no Q/DQ
and a Q/DQ group that no longer matches (measured on PP-OCR's MobileNetV3 classifier at opset
14: output cosine 0.960, against 0.9996 for the same model whose HardSwish was written as
HardSigmoid·Mul). Expanding first hands the placement the ops the provider really runs: the Mul
becomes a QLinearMul like any other, and the float result is the same computation.
"""

from __future__ import annotations

import onnx_ir as ir

from ...ir_helpers import is_standard, replace_value

__all__ = ["expand_functions"]


def _hard_swish(node: ir.Node) -> list[ir.Node] | None:
    if len(node.inputs) != 1 or node.inputs[0] is None:
        return None
    x = node.inputs[0]
    name = node.name or "hard_swish"
    gate = ir.node("HardSigmoid", [x], {"alpha": 1.0 / 6.0, "beta": 0.5}, name=f"{name}/hard_sigmoid")
    gate.outputs[0].type, gate.outputs[0].shape = x.type, x.shape
    return [gate, ir.node("Mul", [x, gate.outputs[0]], name=name)]


_EXPANSIONS = {"HardSwish": _hard_swish}


def expand_functions(graph: ir.Graph, op_types: frozenset[str]) -> int:
    """Replace each node of ``op_types`` (those :data:`_EXPANSIONS` knows) by its function body;
    the number expanded."""
    count = 0
    for node in list(graph):
        if node.op_type not in op_types or not is_standard(node, node.op_type):
            continue
        body = _EXPANSIONS[node.op_type](node)
        if body is None:
            continue
        old, new = node.outputs[0], body[-1].outputs[0]
        new.type, new.shape = old.type, old.shape
        graph.insert_before(node, body)
        if not replace_value(node, old, new):
            graph.remove(body, safe=True)
            continue
        count += 1
    return count
