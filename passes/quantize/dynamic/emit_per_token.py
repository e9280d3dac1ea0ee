"""Per-token activations: each row (token) of a MatMul input quantized with its own range, in the
graph, then ``com.microsoft.MatMulIntegerToFloat`` times the row scale.

ORT has no kernel with a per-row activation scale or zero point (``MatMulIntegerToFloat`` and
``DynamicQuantizeMatMul`` take scalars), hence the extra row-sized nodes; the levels are uint8
with one scalar zero point so ORT runs its fast u8×s8 kernels:

* asymmetric (norm outputs): 255 levels over the row's own range with zero a level,
  ``q = round(255·x / (hi − lo)) + z`` per row. x is padded with a few zero columns (``Pad``) that
  become ``z``, and the int8 weight gains matching rows summing to ``−ΣW_q`` per column, so the
  kernel computes ``Σ(q − z)·W_q`` exactly in int32 and only the row-range ``Mul`` runs over its
  output. Rows reaching further below zero than above are quantized mirrored, so every zero point
  is ≤ 128 and the zero-point rows may reach ±127 without int16 overflow on CPUs without VNNI.
  Asymmetric weights or opsets below 18 add ``lo ⊗ ΣW`` back after the kernel instead.
* inputs bounded below by ``-c`` (GELU, SiLU, ReLU): ``q = round(255·(x + c) / max(x + c))``,
  ``c·ΣW`` comes back through the bias.
* symmetric (``asymmetric=false``, attention outputs): ``q = round(127·x / max|x|) + 128``.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from ...ir_helpers import MS_DOMAIN, constant_array
from .._common.int8 import quantize_weight

if TYPE_CHECKING:
    from .run import Run

__all__ = [
    "TokenLevels",
    "lower_bound",
    "per_token_input",
    "per_token_matmul",
    "plan_zero_columns",
    "zero_point_rows",
]

#: Largest magnitude of a zero-point row entry (see :func:`plan_zero_columns`).
ZERO_ROW_MAX = 127

#: Ops whose outputs have a lower bound -c (c = the shift that makes them non-negative). GELU:
#: min x·Φ(x) = -0.16997 (erf), -0.17004 (tanh form); x·σ(αx): -0.27846/α.
_LOWER_BOUNDS = {
    "Relu": 0.0,
    "Sigmoid": 0.0,
    "Softmax": 0.0,
    "Gelu": 0.1701,
    "BiasGelu": 0.1701,
    "FastGelu": 0.1701,
}


@dataclasses.dataclass
class TokenLevels:
    """A per-token quantized activation: uint8 levels, row maxima, the scalar scale and zero point
    the kernel dequantizes the levels with, and the shift added before quantizing."""

    levels: ir.Value
    rowmax: ir.Value
    scale: ir.Value
    zero_point: ir.Value
    shift: float
    #: Row minima (asymmetric levels): added back as rowmin ⊗ ΣW after the kernel.
    rowmin: ir.Value | None = None
    #: Integer per-row zero point carried into the kernel by this many extra columns of the
    #: levels (asymmetric levels with symmetric weights); None: not this scheme.
    zero_columns: int | None = None
    #: Split channels appended (once per extra copy) before the zero columns.
    copies: np.ndarray | None = None


def lower_bound(x: ir.Value) -> float | None:
    """``c`` such that ``x >= -c`` everywhere, from the op that made ``x`` (looking through
    reshapes and the outlier split's 0/1 mask), or None when nothing bounds it."""
    node = x.producer()
    for _ in range(6):
        if node is None:
            return None
        if node.op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"):
            node = node.inputs[0].producer() if node.inputs[0] is not None else None
            continue
        if node.op_type == "Mul" and len(node.inputs) == 2:
            mask = constant_array(node.inputs[1])
            if mask is not None and mask.size and float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0:
                node = node.inputs[0].producer() if node.inputs[0] is not None else None
                continue  # x·m with m in [0, 1] keeps x's lower bound
            return None
        if node.op_type == "QuickGelu" and node.domain == MS_DOMAIN:
            alpha = node.attributes.get_float("alpha", 1.702)
            return 0.27847 / alpha if alpha > 0 else None
        return _LOWER_BOUNDS.get(node.op_type)
    return None


def zero_point_rows(q: np.ndarray, rows: int) -> np.ndarray:
    """``rows`` int8 rows whose sum per column is ``-Σ_k q[k]``, spread evenly (entries ≤ 127)."""
    target = -q.astype(np.int64).sum(axis=0)
    if rows == 0:
        if target.any():
            raise AssertionError("zero-point rows: the weight's column sums need rows")
        return np.zeros((0, q.shape[1]), q.dtype)
    size, sign = np.abs(target), np.sign(target)
    base, extra = size // rows, size % rows
    out = base[None, :] + (np.arange(rows)[:, None] < extra[None, :])
    if out.max(initial=0) > ZERO_ROW_MAX:
        raise AssertionError("zero-point rows: too few rows for the weight's column sums")
    return (out * sign[None, :]).astype(q.dtype)


def plan_zero_columns(run: Run) -> dict[int, tuple[int, np.ndarray | None]]:
    """How many zero-point columns each per-token input needs: enough that every consumer's
    ``-ΣW_q`` per output column splits into int8 rows of magnitude ≤ 127 (zero points ≤ 128,
    see :func:`per_token_input`: u8·s8 pairs of padding columns then stay inside int16 on CPUs
    without VNNI, where x86 kernels add products in pairs with saturation), a multiple of 4 (the
    kernels pack K by 4). Weights are quantized here (and kept) because their column sums decide
    it. Returns, per input, the column count and the input's split channels (the same for all its
    consumers: decided per input). ORT's MatMulIntegerToFloat takes one scalar zero point for A;
    the columns stand in for a per-row one. Asymmetric weights (a zero point per column) keep the
    rowmin ⊗ ΣW term after the kernel instead."""
    o = run.options
    need: dict[int, tuple[int, np.ndarray | None]] = {}
    if not o.symmetric:
        return need
    for p in run.plans:
        if not p.per_token or p.node.op_type == "Gather":
            continue
        x = p.node.inputs[0]
        if p.quantized is None:
            w = p.weight
            if p.side is not None:
                w = w.copy()
                w[p.side[1]] = 0.0
            p.quantized = quantize_weight(
                w, per_channel=o.per_channel, symmetric=True, reduce_range=o.reduce_range
            )
        q = p.quantized[0].astype(np.int64)
        if p.copies is not None:
            q = np.concatenate([q, q[p.copies]])
        total = int(np.abs(q.sum(axis=0)).max(initial=0))
        rows = -(-total // ZERO_ROW_MAX)  # ceil
        columns = -(-rows // 4) * 4
        previous = need.get(id(x), (4, None))[0]  # ≥ 4: the padding holds 0
        need[id(x)] = (max(previous, columns), p.copies)
    return need


def per_token_input(run: Run, x: ir.Value, before: ir.Node, asymmetric: bool) -> TokenLevels:
    """``x`` quantized per row (token), made once per value and shared by its consumers; the
    levels are uint8 with one scalar zero point, so ORT runs its fast u8×s8 kernels.

    * ``asymmetric``: 255 levels over the row's own range with zero in it, an integer zero
      point per row carried into the kernel by extra columns (:func:`plan_zero_columns`);
      with asymmetric weights, ``q = round(255·(x − lo) / (hi − lo))`` from the row's minimum
      and ``lo ⊗ ΣW`` added back after the kernel (:func:`per_token_matmul`).
    * symmetric: ``q = round(127·x / max|x|) + 128``.
    * a known lower bound ``-c`` (GELU, SiLU, ReLU outputs, see :func:`lower_bound`) overrides
      both: ``q = round(255·(x + c) / max(x + c))``, the shift back out of the bias (``c·ΣW``).

    A row of zeros (or a constant row, asymmetric) divides 0 by 0; its levels are then
    arbitrary but finite and are multiplied by a range of 0, so the row comes out exact."""
    hit = run.per_token.get(id(x))
    if hit is not None:
        return hit
    graph = run.graph
    base = x.name or "activation"
    shift = lower_bound(x)
    nodes: list[ir.Node] = []

    def node(op: str, inputs: list[ir.Value], suffix: str, attrs: list[ir.Attr] | None = None) -> ir.Value:
        n = ir.Node("", op, inputs, attributes=attrs or [], num_outputs=1, name=run.name(f"{base}_{suffix}"))
        n.outputs[0].name = run.name(f"{base}_{suffix}")
        n.outputs[0].type = x.type
        nodes.append(n)
        return n.outputs[0]

    def row(op: str, v: ir.Value, suffix: str) -> ir.Value:
        """ReduceMax/ReduceMin over the last axis, kept (axes an input from opset 18 on)."""
        if run.opset >= 18:
            axes = run.shared_const("per_token_axes", np.array([-1], np.int64))
            return node(op, [v, axes], suffix, [ir.AttrInt64("keepdims", 1)])
        return node(op, [v], suffix, [ir.AttrInt64s("axes", [-1]), ir.AttrInt64("keepdims", 1)])

    rmin = None
    columns, copies = run.zero_columns.get(id(x), (None, None))
    if shift is not None or not asymmetric or run.opset < 18:
        columns = None
    if columns is None and copies is not None:  # the smoothing divided split channels
        raise AssertionError(f"quantize-dynamic: split channels of '{x.name}' without zero-point columns")
    if columns is not None:
        # Integer zero point per row. x is padded with ``columns`` zeros first, so the row's
        # minimum and maximum include 0 (zero is a level) and the padding turns into the zero
        # point itself below. 255 levels over [lo, hi]: q = round(255·x / (hi − lo)) + z with
        # z = round(−255·lo / (hi − lo)) (mirrored rows: q = z − round(255·x / (hi − lo)),
        # z = round(255·hi / (hi − lo)), times −(hi − lo) after the kernel); in the padding
        # q = z. The extra columns of z meet rows of W summing to −ΣW (see
        # plan_zero_columns), so nothing runs over the output but the row scale. A row of
        # zeros divides 0 by 0: its levels are garbage, times a range of 0.
        levels, zero = 255.0, 0
        if copies is None:
            padded = node(
                "Pad",
                [
                    x,
                    run.shared_const(f"per_token_pads_{columns}", np.array([0, columns], np.int64)),
                    None,
                    run.shared_const("per_token_axes", np.array([-1], np.int64)),
                ],
                "padded",
            )
        else:  # split channels, then the zero columns (channel 0 times 0)
            index = np.concatenate([copies, np.zeros(columns, np.int64)])
            keep = np.concatenate([np.ones(copies.size, np.float32), np.zeros(columns, np.float32)])
            extra = node(
                "Gather", [x, run.init(f"{base}_copy_index", index)], "copies", [ir.AttrInt64("axis", -1)]
            )
            extra = node("Mul", [extra, run.init(f"{base}_copy_keep", keep)], "copies_kept")
            padded = node("Concat", [x, extra], "padded", [ir.AttrInt64("axis", -1)])
        lo = row("ReduceMin", padded, "rowmin")
        hi = row("ReduceMax", padded, "rowmax")
        span = node("Sub", [hi, lo], "rowrange")
        # A row reaching further below zero than above is quantized mirrored (levels of −x,
        # range negated): every zero point is then ≤ 128, so a pair of padding columns
        # (z·r + z·r) stays inside int16 with rows up to ±127 (half the columns of ±64).
        flip = node(
            "Less",
            [
                node("Add", [hi, lo], "row_balance"),
                run.shared_const("per_token_zero", np.array(0.0, np.float32)),
            ],
            "row_mirrored",
        )
        flip.type = ir.TensorType(ir.DataType.BOOL)
        rmax = node("Where", [flip, node("Neg", [span], "rowrange_negated"), span], "rowrange_signed")
        # ``base`` becomes this value: the names of the nodes below start with its text form
        # (``%"<name>"<type,shape>``), as they always have (the output bytes stay the same).
        base = node("Where", [flip, hi, lo], "row_far_side")  # type: ignore[assignment]
        far = base
        neg_inv = node(
            "Div",
            [run.shared_const("per_token_minus_255", np.array(-255.0, np.float32)), rmax],
            "neg_inverse_step",
        )
        z = node("Round", [node("Mul", [far, neg_inv], "zero_point_real")], "row_zero_point")
        v = node("Sub", [z, node("Mul", [padded, neg_inv], "scaled")], "shifted_levels")
        unit = run.shared_const("per_token_unit_step", np.array(1.0, np.float32))
        scale = run.shared_const(f"per_token_scale_{levels:g}", np.array(1.0 / levels, np.float32))
        zp = run.shared_const(f"per_token_zero_point_{zero}", np.array(zero, np.uint8))
        quant = node("QuantizeLinear", [v, unit, zp], "levels")
        quant.type = ir.TensorType(ir.DataType.UINT8)
        for n in nodes:
            graph.insert_before(before, n)
        hit = TokenLevels(quant, rmax, scale, zp, 0.0, None, columns, copies)
        run.per_token[id(x)] = hit
        run.count("per_token_inputs")
        return hit
    if shift is None and asymmetric:
        # x = lo + range·q/255 per row: the row minimum comes back after the kernel as lo ⊗ ΣW
        # (MatMulIntegerToFloat takes one scalar zero point). Zero need not be a level: these
        # are MatMul inputs, not padded images. A constant row has range 0; its levels are
        # arbitrary, times 0, and lo ⊗ ΣW alone is its exact product.
        levels, zero = 255.0, 0
        rmin = row("ReduceMin", x, "rowmin")
        v = node("Sub", [x, rmin], "from_low")
        rmax = node("Sub", [row("ReduceMax", x, "rowmax"), rmin], "rowrange")
    elif shift is None:
        v, levels, zero = x, 127.0, 128
        rmax = row("ReduceMax", node("Abs", [x], "abs"), "rowmax")
    else:
        v, levels, zero = x, 255.0, 0
        if shift > 0:
            v = node(
                "Add",
                [x, run.shared_const(f"per_token_shift_{shift:g}", np.array(shift, np.float32))],
                "shifted",
            )
        rmax = row("ReduceMax", v, "rowmax")
    scale = run.shared_const(f"per_token_scale_{levels:g}", np.array(1.0 / levels, np.float32))
    zp = run.shared_const(f"per_token_zero_point_{zero}", np.array(zero, np.uint8))
    quant = node("QuantizeLinear", [node("Div", [v, rmax], "rownorm"), scale, zp], "levels")
    quant.type = ir.TensorType(ir.DataType.UINT8)
    for n in nodes:
        graph.insert_before(before, n)
    hit = TokenLevels(quant, rmax, scale, zp, shift or 0.0, rmin)
    run.per_token[id(x)] = hit
    run.count("per_token_inputs")
    return hit


def per_token_matmul(
    run: Run,
    node: ir.Node,
    a: ir.Value,
    qw: ir.Value,
    scale: ir.Value,
    zp: ir.Value,
    base: str,
    bias: np.ndarray | None,
    center: np.ndarray | None = None,
    asymmetric: bool = False,
) -> tuple[ir.Value, np.ndarray | None]:
    """``MatMulIntegerToFloat`` of the per-token levels, times the row scale (maximum or range);
    asymmetric levels: the weight gains the zero-point rows, or (asymmetric weights) the row
    minimum's term follows. Returns the output and the bias to add after it (input shift and
    centering folded in)."""
    graph = run.graph
    t = per_token_input(run, a, node, asymmetric)
    q = qw.const_value.numpy()
    if t.zero_columns is not None:
        # Σ(q_x − z)·W_q = [q_x, z, …, z]·[W_q; R] with the rows of R summing to −ΣW_q.
        body = q if t.copies is None else np.concatenate([q, q[t.copies]])
        aug = np.concatenate([body, zero_point_rows(body, t.zero_columns)]).astype(q.dtype)
        qw.const_value = ir.tensor(aug, name=qw.name)
        qw.shape = ir.Shape(aug.shape)
    inputs: list[ir.Value | None] = [t.levels, qw, t.scale, scale, t.zero_point]
    if not run.options.symmetric:
        inputs.append(zp)
    mm = ir.Node(MS_DOMAIN, "MatMulIntegerToFloat", inputs, num_outputs=1, name=run.name(base + "_quant"))
    mm.outputs[0].name = run.name(base + "_int_out")
    mul = ir.Node("", "Mul", [mm.outputs[0], t.rowmax], num_outputs=1, name=run.name(base + "_rowscale"))
    mul.outputs[0].name = run.name(base + "_quant_out")
    graph.insert_before(node, mm)
    graph.insert_before(node, mul)
    result = mul.outputs[0]
    if t.rowmin is None and not t.shift and center is None:
        return result, bias
    # The weight as the kernel sees it: the terms below are exact against the int8 product.
    wd = (
        q.astype(np.float64) - zp.const_value.numpy().astype(np.float64)
    ) * scale.const_value.numpy().astype(np.float64)
    if t.rowmin is not None:  # x = lo + (x − lo): lo ⊗ ΣW after the kernel
        colsum = run.init(base + "_colsum", wd.sum(axis=0).astype(np.float32))
        low = ir.Node("", "Mul", [t.rowmin, colsum], num_outputs=1, name=run.name(base + "_low_term"))
        low.outputs[0].name = run.name(base + "_low_term")
        add = ir.Node("", "Add", [result, low.outputs[0]], num_outputs=1, name=run.name(base + "_low_add"))
        add.outputs[0].name = run.name(base + "_quant_asym")
        graph.insert_before(node, low)
        graph.insert_before(node, add)
        result = add.outputs[0]
    if t.shift or center is not None:  # x·W = (x + c)·W − c·ΣW and (x − δ)·W + δ·W
        bias = np.zeros(wd.shape[1]) if bias is None else bias.astype(np.float64)
        if t.shift:
            bias = bias - t.shift * wd.sum(axis=0)
        if center is not None:
            bias = bias + center @ wd
    return result, bias
