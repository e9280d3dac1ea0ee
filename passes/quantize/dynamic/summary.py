"""What ``quantize-dynamic`` did to the model's weights, in one line, and a notice when it could
not help.

Why: dynamic int8 only has kernels for MatMul/Gemm/Attention (and embedding Gathers when asked);
a convolutional or recurrent model keeps nearly all of its weights in float, and a report row that
only says "nothing changed" reads like success. The summary counts the weight layers and the share
of the weight bytes quantized; the notice (when less than half of the weights were quantized) names
the op types holding the rest and the mode that would quantize them.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from ...ir_helpers import constant_array, graph_nodes

if TYPE_CHECKING:
    from .plan import Plan

__all__ = ["LAYER_OPS", "weight_summary"]

#: Op types that hold a model's weight matrices ("layers" in the summary); FusedConv counts as Conv.
LAYER_OPS = frozenset(
    {"Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "RNN", "Attention", "Gather", "Einsum"}
)
_CONV = frozenset({"Conv", "ConvTranspose"})
_RECURRENT = frozenset({"LSTM", "GRU", "RNN"})

#: Below this share of the weight bytes quantized, the report carries a notice.
NOTICE_BELOW = 0.5


def _op(node: ir.Node) -> str:
    return "Conv" if node.op_type == "FusedConv" else node.op_type


def _float_weights(model: ir.Model) -> tuple[dict[str, int], dict[str, int], int, int]:
    """(float constant bytes per op type of their first consumer, weight layers per op type,
    total float constant bytes, those of them inside subgraphs). A layer is a node of
    :data:`LAYER_OPS` with a float constant input of rank >= 2."""
    seen: set[int] = set()
    by_op: collections.Counter[str] = collections.Counter()
    layers: collections.Counter[str] = collections.Counter()
    nested = 0
    for node in graph_nodes(model):
        op = _op(node)
        is_layer = False
        for v in node.inputs:
            if v is None or id(v) in seen:
                continue
            arr = constant_array(v)
            if arr is None or arr.dtype.kind != "f":
                continue
            seen.add(id(v))
            by_op[op] += arr.nbytes
            nested += arr.nbytes if node.graph is not model.graph else 0
            is_layer = is_layer or arr.ndim >= 2
        if is_layer and op in LAYER_OPS:
            layers[op] += 1
    return dict(by_op), dict(layers), sum(by_op.values()), nested


def weight_summary(
    model: ir.Model, plans: list[Plan], decisions: list[Any], op_types: list[str]
) -> tuple[str, str | None]:
    """(summary line, notice or None) for the float ``model`` (before the plans are applied)."""
    by_op, layers, total, nested = _float_weights(model)
    quantized = sum(int(p.weight.nbytes) for p in plans)
    n_layers = sum(layers.values())
    kinds = "/".join(sorted(layers)) or "weight"
    share = quantized / total if total else 0.0
    summary = (
        f"dynamic int8 quantized {len(plans)} of {n_layers} {kinds} layers "
        f"({100 * share:.0f}% of the float weights)"
    )
    if total == 0 or share >= NOTICE_BELOW:
        return summary, None
    rest = collections.Counter({op: b for op, b in by_op.items() if op in LAYER_OPS})
    for p in plans:  # what stays float per op type
        rest[_op(p.node)] -= int(p.weight.nbytes)
    rest = collections.Counter({op: b for op, b in rest.items() if b > 0})
    floats = ", ".join(f"{op} {100 * b / total:.0f}%" for op, b in rest.most_common(3) if b >= total / 100)
    line = summary + (f"; in float: {floats}" if floats else "")
    hints = []
    if nested >= total * NOTICE_BELOW:
        # Say where the weights are, not a mode that would not reach them either.
        hints.append(
            f"{100 * nested / total:.0f}% of the weights sit inside If/Loop subgraphs, "
            "which graphopt's quantizers do not enter"
        )
    for op, _ in rest.most_common() if not hints else []:
        if op in _CONV and not any("static" in h for h in hints):
            hints.append("convolutional models need --quantize static with --calibration (int8 Conv)")
        elif op in _RECURRENT:
            hints.append(f"no graphopt mode quantizes {op}")
        elif op == "Gather" and "Gather" not in op_types:
            hints.append("embedding tables are quantized with op_types including Gather")
    if not hints:
        reasons = collections.Counter(d.reason for d in decisions if not d.quantized and d.reason)
        hints.append(
            "kept float: {} ({} layer{})".format(
                *reasons.most_common(1)[0], "s" * (reasons.most_common(1)[0][1] > 1)
            )
            if reasons
            else "nothing here has an int8 dynamic kernel"
        )
    hint = "; ".join(hints)
    return line, f"{line}: {hint}"
