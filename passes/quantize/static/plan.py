"""Planning for ``quantize-static``: which tensors get a Q/DQ pair, which weights become int8
and which biases int32, following the placement's rules; every candidate node's decision and
its reason.

Safe because every rewrite is a quantize-dequantize of a value whose dtype is known to be
float32; nodes whose inputs are of unknown dtype, or whose weights are not constants, stay float
and their decision says why."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from ...ir_helpers import constant_array, is_standard
from .._common.norms import NORM_OPS
from ..base import matches_any
from .placement import Placement
from .run import Run

__all__ = ["ISLAND", "POWER", "QT", "Plan", "eligible", "plan_graph", "weight_axis"]

_FLOAT = ir.DataType.FLOAT

#: Consumers that make an Add part of a residual stream: normalizations, fused or decomposed.
_NORM_CONSUMERS = NORM_OPS | {"ReduceMean", "Pow"}
#: The decision of an elementwise op that reads or writes a power of one tensor (:func:`_power_degree`).
POWER = "reads or writes a power of one tensor (x², x³: one 8-bit grid cannot hold its range; stays float)"
#: The decision of an elementwise op left float by :func:`_islands`.
ISLAND = "no quantized Conv/MatMul/Gemm in reach (Q/DQ would only add rounding and work; stays float)"


@dataclasses.dataclass
class QT:
    """One activation tensor to quantize."""

    value: ir.Value
    range_from: str  # the value whose calibrated range is used (a removed Relu's output)
    shared_from: ir.Value | None = None  # passthrough: reuse this tensor's parameters
    wide: bool = False  # 16-bit
    absorbs: ir.Node | None = None  # removed activation whose output this pair replaces
    table: ir.Value | None = None  # embedding output: the parameters of this int8 table
    params: tuple[np.ndarray, np.ndarray] | None = None  # (scale, zero point)


@dataclasses.dataclass
class Plan:
    """What to quantize: activation tensors (in order), weights (node, input, channel axis),
    biases (node, input, the activation, weight input, axis), each candidate's decision, and the
    aliases of absorbed activations."""

    tensors: dict[ir.Value, QT] = dataclasses.field(default_factory=dict)
    order: list[ir.Value] = dataclasses.field(default_factory=list)
    weights: list[tuple[ir.Node, int, int | None]] = dataclasses.field(default_factory=list)
    biases: list[tuple[ir.Node, int, ir.Value, int, int | None]] = dataclasses.field(default_factory=list)
    nodes: list[tuple[ir.Node, bool, str]] = dataclasses.field(default_factory=list)
    alias: dict[ir.Value, ir.Value] = dataclasses.field(default_factory=dict)

    def quantized(self, v: ir.Value | None) -> ir.Value | None:
        """The tensor carrying ``v``'s quantization (``v`` itself, or the input of a removed Relu)."""
        if v is None:
            return None
        v = self.alias.get(v, v)
        return v if v in self.tensors else None

    def add(self, qt: QT) -> None:
        if qt.value not in self.tensors:
            self.tensors[qt.value] = qt
            self.order.append(qt.value)


def eligible(node: ir.Node, kind: str, placement: Placement) -> str | None:
    """Why ``node`` cannot be quantized (dtype, constness), independent of its neighbours."""
    if kind == "compute":
        x = node.inputs[0] if node.inputs else None
        w = node.inputs[1] if len(node.inputs) > 1 else None
        if x is None or w is None:
            return "missing input"
        if x.dtype != _FLOAT:
            return f"input dtype {x.dtype or 'unknown'} is not float32"
        if node.op_type == "Gemm" and node.attributes.get_int("transA", 0):
            return "transA=1"
        if constant_array(x) is not None:
            return "first input is a constant"
        wc = constant_array(w)
        if wc is None:
            if node.op_type != "MatMul":
                return "weight is not a constant"
            if w.dtype != _FLOAT:
                return f"input dtype {w.dtype or 'unknown'} is not float32"
            return None
        if wc.dtype != np.float32:
            return f"weight dtype {wc.dtype} is not float32"
        return None
    if kind == "embedding":
        table = constant_array(node.inputs[0]) if node.inputs else None
        if table is None:
            return "table is not a constant"
        if table.dtype != np.float32:
            return f"table dtype {table.dtype} is not float32"
        return None
    ins = [v for v in node.inputs if v is not None]
    if not ins:
        return "no inputs"
    if kind in ("passthrough", "removable"):
        ins = ins[:1]
    for v in ins:
        if v.dtype != _FLOAT:
            return f"input dtype {v.dtype or 'unknown'} is not float32"
    if kind == "removable" and node.op_type == "Clip":
        # Clip(0, M) → Q is Q alone: the calibrated range is [0, ≤M] and Q saturates there.
        lo = constant_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        hi_v = node.inputs[2] if len(node.inputs) > 2 else None
        if lo is None or lo.size != 1 or float(lo.reshape(())) != 0.0:
            return "Clip's minimum is not a constant 0"
        if hi_v is not None and constant_array(hi_v) is None:
            return "Clip's maximum is not a constant"
    if kind == "qlinear" and not placement.constant_operands:
        if any(constant_array(v) is not None for v in ins):
            return "constant operand (stays float)"
    if kind == "qlinear" and any(_power_degree(v) >= 2 for v in [*ins, *node.outputs[:1]]):
        return POWER
    if placement.float_norm_residuals and node.op_type == "Add":
        consumers = {c.op_type for o in node.outputs for c in o.consumers()}
        if consumers & _NORM_CONSUMERS:
            return "residual Add into a normalization (outlier channels; stays float)"
        if "Softmax" in consumers:
            return "attention-mask Add into Softmax (mask values dwarf the scores; stays float)"
    return None


def plan_graph(run: Run, use_selection: bool) -> Plan:
    """The plan over the graph; ``use_selection``: honour include/exclude (else every candidate,
    to calibrate once for all later runs)."""
    graph = run.graph
    placement = run.placement
    plan = Plan()
    ops = run.ops()
    o = run.options
    _, sym = run.act(False)
    removable_ok = not sym  # Relu/Clip vanish into a Q only when its zero point is qmin
    patterns16 = list(o.activations16)
    outputs = set(graph.outputs)
    decided: set[ir.Node] = set()

    def candidate(n: ir.Node) -> str | None:
        if n.domain not in ("", "ai.onnx") or n.op_type not in ops:
            return None
        return placement.kind(n.op_type)

    def allowed(n: ir.Node) -> tuple[str | None, str]:
        kind = candidate(n)
        if kind is None:
            return None, ""
        if use_selection:
            ok, why = run.selected(n)
            if not ok:
                return None, why
        why = eligible(n, kind, placement)
        return (kind, "") if why is None else (None, why)

    anchors = ops & (placement.compute | placement.embedding)
    islands = _islands(graph, allowed) if placement.float_islands and anchors else set()

    def usable(n: ir.Node) -> tuple[str | None, str]:
        return (None, ISLAND) if n in islands else allowed(n)

    def wants_input(consumer: ir.Node, depth: int = 0) -> bool:
        kind, _ = usable(consumer)
        if kind in ("compute", "qlinear"):
            return True
        if kind == "removable" and removable_ok:
            return True
        if kind == "passthrough" and depth < 2:
            return any(wants_input(c, depth + 1) for o in _moved(consumer) for c in o.consumers())
        return False

    def quantize_output(n: ir.Node) -> None:
        y = n.outputs[0]
        consumers = list(y.consumers())
        if (
            len(consumers) == 1
            and consumers[0].op_type in placement.removable
            and removable_ok
            and y not in outputs
            and consumers[0].outputs[0] not in outputs
        ):
            relu = consumers[0]
            kind, _why = usable(relu)
            if kind == "removable":
                plan.add(QT(y, relu.outputs[0].name or "", absorbs=relu))
                plan.alias[relu.outputs[0]] = y
                plan.nodes.append((relu, True, "absorbed by the quantize of its input (zero point at qmin)"))
                decided.add(relu)
                return
        plan.add(QT(y, y.name or ""))

    def quantize_input(v: ir.Value) -> None:
        if plan.quantized(v) is None:
            plan.add(QT(v, v.name or ""))

    for node in graph:
        if node in decided:
            continue
        kind = candidate(node)
        if kind is None:
            continue
        if use_selection:
            ok, why = run.selected(node)
            if not ok:
                plan.nodes.append((node, False, why))
                continue
        why = ISLAND if node in islands else eligible(node, kind, placement)
        if why is not None:
            plan.nodes.append((node, False, why))
            continue
        if kind == "compute":
            x, w = node.inputs[0], node.inputs[1]
            quantize_input(x)
            wc = constant_array(w)
            if wc is None:  # MatMul of two activations
                quantize_input(w)
            else:
                plan.weights.append((node, 1, weight_axis(node, wc)))
                if (
                    placement.quantize_bias
                    and node.op_type in ("Conv", "Gemm")
                    and len(node.inputs) > 2
                    and node.inputs[2] is not None
                ):
                    b = node.inputs[2]
                    bc = constant_array(b)
                    ok_bias = bc is not None and bc.dtype == np.float32 and bc.ndim == 1
                    if node.op_type == "Gemm":
                        ok_bias = (
                            ok_bias
                            and node.attributes.get_float("alpha", 1.0) == 1.0
                            and node.attributes.get_float("beta", 1.0) == 1.0
                        )
                    if ok_bias:
                        plan.biases.append((node, 2, x, 1, weight_axis(node, wc)))
            y = node.outputs[0]
            if node.op_type in placement.output_required or (
                placement.quantize_outputs and any(wants_input(c) for c in y.consumers())
            ):
                quantize_output(node)
            plan.nodes.append((node, True, ""))
        elif kind == "qlinear":
            for v in node.inputs:
                if v is not None:
                    quantize_input(v)
            if placement.quantize_outputs:
                quantize_output(node)
            plan.nodes.append((node, True, ""))
        elif kind == "passthrough":
            src = plan.quantized(node.inputs[0])
            if src is None:
                plan.nodes.append((node, False, "input not quantized (runs in float)"))
                continue
            if placement.quantize_outputs:
                for out in _moved(node):
                    plan.add(QT(out, out.name or "", shared_from=src))
            plan.nodes.append((node, True, "runs on the quantized input"))
        elif kind == "embedding":
            plan.weights.append((node, 0, None))
            plan.add(QT(node.outputs[0], "", table=node.inputs[0]))
            plan.nodes.append((node, True, "int8 table, lookup on int8"))
        else:  # removable activation not absorbed
            reason = (
                "symmetric activations: the zero point is not qmin"
                if not removable_ok
                else "input not quantized by a single-consumer producer (runs in float)"
            )
            plan.nodes.append((node, False, reason))

    if patterns16:
        _mark_wide(plan, patterns16)
    return plan


def _power_degree(value: ir.Value | None) -> int:
    """d when ``value`` is c·x^d for one non-constant tensor x (a tree of Mul, and Pow with a
    constant integer exponent, over x and constants; e.g. x·x, x·(x·(0.044715·x))), else 0.

    Why it matters: such a tensor's range is the d-th power of x's, so one linear 8-bit grid
    spans orders of magnitude and rounds most values to zero (decomposed LayerNorm's x² and
    mean², tanh-GELU's x³), and a qlinear op reading or writing it would need that grid."""

    def factors(v: ir.Value) -> tuple[ir.Value, ir.Value] | None:
        node = v.producer()
        if (
            node is None
            or not is_standard(node, "Mul", "Pow")
            or len(node.inputs) != 2
            or None in node.inputs
        ):
            return None
        return node.inputs[0], node.inputs[1]  # type: ignore[return-value]

    def degree(v: ir.Value, x: ir.Value, depth: int) -> int | None:
        if v is x:
            return 1
        if constant_array(v) is not None:
            return 0
        pair = factors(v) if depth < 6 else None
        if pair is None:
            return None
        a, b = pair
        da = degree(a, x, depth + 1)
        if da is None:
            return None
        if v.producer().op_type == "Mul":  # type: ignore[union-attr]
            db = degree(b, x, depth + 1)
            return None if db is None else da + db
        exp = constant_array(b)
        if exp is None or exp.size != 1 or exp.dtype.kind not in "fiu":
            return None
        e = float(np.asarray(exp, np.float64).reshape(-1)[0])
        return da * int(e) if e.is_integer() and 1 <= e <= 8 else None

    if value is None or factors(value) is None:
        return 0
    bases: list[ir.Value] = []
    stack = [(value, 0)]
    while stack:  # every non-constant value of the product tree is a candidate x
        v, depth = stack.pop()
        if constant_array(v) is not None:
            continue
        if v is not value:
            bases.append(v)
        pair = factors(v) if depth < 6 else None
        if pair is not None:
            stack.extend((p, depth + 1) for p in pair)
    for x in bases:
        d = degree(value, x, 0)
        if d is not None and d >= 2:
            return d
    return 0


def _islands(graph: ir.Graph, allowed: Callable[[ir.Node], tuple[str | None, str]]) -> set[ir.Node]:
    """The quantizable elementwise ops (``qlinear`` kind) with no quantized Conv/MatMul/Gemm or
    lookup table in reach: connected to none through other quantizable ops.

    Why they stay float: a Q/DQ pair pays off where an integer kernel consumes or produces it.
    Between float neighbours, a QLinearMul/QLinearAdd only adds a quantize and a dequantize and
    rounds its values, and such islands are where rounding hurts most: the x·x and x³ terms of
    decomposed LayerNorm/GELU (tf2onnx, jax2tf), whose ranges span several orders of magnitude.
    """
    kinds: dict[ir.Node, str] = {}
    for n in graph:
        kind, _ = allowed(n)
        if kind is not None:
            kinds[n] = kind
    parent: dict[ir.Node, ir.Node] = {n: n for n in kinds}

    def root(n: ir.Node) -> ir.Node:
        while parent[n] is not n:
            parent[n] = parent[parent[n]]
            n = parent[n]
        return n

    for n in kinds:
        for out in n.outputs:
            for c in out.consumers():
                if c in kinds:
                    parent[root(c)] = root(n)
    anchored = {root(n) for n, kind in kinds.items() if kind in ("compute", "embedding")}
    return {n for n, kind in kinds.items() if kind == "qlinear" and root(n) not in anchored}


def _moved(node: ir.Node) -> list[ir.Value]:
    """The outputs of a passthrough node that carry its input's values: every piece of a Split,
    else the first output (MaxPool's second output holds int64 indices)."""
    return [o for o in node.outputs if o is not None] if node.op_type == "Split" else node.outputs[:1]


def _mark_wide(plan: Plan, patterns16: list[str]) -> None:
    """16-bit: a tensor is wide when its producer or a quantized consumer matches
    ``activations16``; passthrough groups share one width."""
    quantized_nodes = {n for n, q, _ in plan.nodes if q}

    def is16(n: ir.Node | None) -> bool:
        return n is not None and n in quantized_nodes and matches_any(n, patterns16)

    for v in plan.order:
        qt = plan.tensors[v]
        users = list(v.consumers())
        if qt.absorbs is not None:
            users += list(qt.absorbs.outputs[0].consumers())
        qt.wide = is16(v.producer()) or any(is16(c) for c in users) or is16(qt.absorbs)
    for v in plan.order:  # a passthrough group is wide if any member is
        qt = plan.tensors[v]
        if qt.shared_from is not None and qt.wide:
            plan.tensors[qt.shared_from].wide = True
    for v in plan.order:
        qt = plan.tensors[v]
        if qt.shared_from is not None:
            qt.wide = plan.tensors[qt.shared_from].wide


def weight_axis(node: ir.Node, w: np.ndarray) -> int | None:
    """The output-channel axis of a weight (None: per-tensor)."""
    if node.op_type == "Conv":
        return 0
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    if node.op_type == "MatMul" and w.ndim == 2:
        return 1
    return None
