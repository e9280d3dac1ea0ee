"""Rewriting for ``quantize-static``: QuantizeLinear/DequantizeLinear pairs on the activations,
weights stored as int8 initializers (per channel) behind a DequantizeLinear, biases as int32 at
``input_scale * weight_scale``."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from ...ir_helpers import constant_array, new_initializer, unique_name
from .._common.int8 import int8_symmetric
from .plan import QT, Plan
from .run import QRANGE, Run

__all__ = ["apply", "insert_qdq"]


def apply(run: Run, plan: Plan, ranges: dict[tuple[str, bool], tuple[float, float]]) -> None:
    """Rewrite the graph as ``plan`` says, with the activation ranges ``ranges``."""
    taken: set[str] = set()
    _set_activation_params(run, plan, ranges)
    _insert_pairs(run, plan, taken)
    w_scales = _weights(run, plan, taken)
    _biases(run, plan, w_scales, taken)
    run.graph.sort()


def _set_activation_params(run: Run, plan: Plan, ranges: dict[tuple[str, bool], tuple[float, float]]) -> None:
    """Set every tensor's (scale, zero point): roots first, then the passthrough tensors sharing
    them; the report gets what each quantized activation ended up with."""
    for v in plan.order:
        qt = plan.tensors[v]
        if qt.shared_from is not None:
            continue
        if qt.table is not None:  # same numbers as the table's own DequantizeLinear below
            _, tscale = _quantize_weight(constant_array(qt.table), None)  # type: ignore[arg-type]
            qt.params = (tscale, np.array(0, np.int8))
            qt.wide = False
            continue
        t, sym = run.act(qt.wide)
        qmin, qmax, npt, _ = QRANGE[t]
        rmin, rmax = ranges[(qt.range_from, qt.wide)]
        qt.params = _activation_params(rmin, rmax, qmin, qmax, sym, npt)
    for v in plan.order:
        qt = plan.tensors[v]
        if qt.shared_from is not None:
            qt.params = plan.tensors[qt.shared_from].params
    # what each quantized activation ended up with, for the report (and for debugging a range)
    report: dict[str, Any] = {}
    for v in plan.order:
        qt = plan.tensors[v]
        scale, zp = qt.params  # type: ignore[misc]
        rng = (
            None
            if qt.shared_from is not None or qt.table is not None
            else [float(f"{r:.6g}") for r in ranges[(qt.range_from, qt.wide)]]
        )
        report[v.name or ""] = {
            "range": rng,
            "scale": float(scale),
            "zero_point": int(zp),
            "bits": 16 if qt.wide else 8,
        }
    run.details["activations"] = report


def _insert_pairs(run: Run, plan: Plan, taken: set[str]) -> None:
    """A Q/DQ pair on every planned tensor (16-bit ones in com.microsoft below opset 21)."""
    model, graph = run.model, run.graph
    opset = model.opset_imports.get("", 0)

    def qdq_domain(wide: bool) -> str:
        if wide and opset < 21:
            model.opset_imports.setdefault("com.microsoft", 1)
            return "com.microsoft"
        return ""

    param_values: dict[ir.Value, tuple[ir.Value, ir.Value]] = {}
    for v in plan.order:
        qt = plan.tensors[v]
        src = qt.shared_from if qt.shared_from is not None else v
        if src not in param_values:
            scale, zp = qt.params  # type: ignore[misc]
            stem = (src.name or "act").replace("/", "_")
            param_values[src] = (
                new_initializer(graph, f"{stem}_scale", scale, taken),
                new_initializer(graph, f"{stem}_zero_point", zp, taken),
            )
        s_val, z_val = param_values[src]
        insert_qdq(graph, v, qt, s_val, z_val, qdq_domain(qt.wide), taken)
        run.count("qdq_pairs")


def _weights(run: Run, plan: Plan, taken: set[str]) -> dict[tuple[int, int], np.ndarray]:
    """Planned weights → int8 initializers behind a DequantizeLinear (one per weight and axis);
    returns each (node, input)'s weight scale."""
    graph = run.graph
    weight_cache: dict[tuple[int, int | None], tuple[ir.Value, np.ndarray]] = {}
    w_scales: dict[tuple[int, int], np.ndarray] = {}
    for node, idx, axis in plan.weights:
        w_val = node.inputs[idx]
        assert w_val is not None
        axis = axis if run.options.per_channel and run.per_axis else None
        key = (id(w_val), axis)
        if key not in weight_cache:
            w = constant_array(w_val)
            assert w is not None
            q, scale = _quantize_weight(w, axis)
            stem = (w_val.name or "weight").replace("/", "_")
            q_v = new_initializer(graph, f"{stem}_quantized", q, taken)
            s_v = new_initializer(graph, f"{stem}_scale", scale, taken)
            z_v = new_initializer(graph, f"{stem}_zero_point", np.zeros(scale.shape, np.int8), taken)
            attrs = {"axis": axis} if axis is not None else {}
            out = ir.Value(
                name=unique_name(graph, f"{stem}_dequantized", taken), shape=w_val.shape, type=w_val.type
            )
            dq = ir.node(
                "DequantizeLinear",
                [q_v, s_v, z_v],
                attrs,
                outputs=[out],
                name=unique_name(graph, f"{stem}_DequantizeLinear", taken),
            )
            graph.insert_before(graph.node(0), dq) if len(graph) else graph.append(dq)
            weight_cache[key] = (out, scale)
            run.count("weights_int8")
        out, scale = weight_cache[key]
        node.replace_input_with(idx, out)
        w_scales[(id(node), idx)] = scale
    return w_scales


def _biases(run: Run, plan: Plan, w_scales: dict[tuple[int, int], np.ndarray], taken: set[str]) -> None:
    """Planned biases → int32 at ``input_scale * weight_scale`` behind a DequantizeLinear."""
    graph = run.graph
    for node, idx, x, w_idx, _axis in plan.biases:
        qx = plan.quantized(x)
        b_val = node.inputs[idx]
        wscale = w_scales.get((id(node), w_idx))
        if qx is None or b_val is None or wscale is None:
            continue
        xscale = plan.tensors[qx].params[0]  # type: ignore[index]
        b = constant_array(b_val)
        assert b is not None
        bscale = (xscale.astype(np.float32) * wscale.astype(np.float32)).astype(np.float32)
        if not run.per_axis:  # opset < 13: one scale, no axis
            if bscale.size != 1:
                continue
            bscale = bscale.reshape(())
        elif bscale.size == 1 and b.size != 1:
            bscale = np.full(b.shape, bscale.reshape(()), np.float32)
        if run.per_axis and bscale.shape != b.shape:
            continue
        safe = np.where(bscale > 0, bscale, 1.0)
        bq = np.clip(np.round(b.astype(np.float64) / safe), -(2**31), 2**31 - 1).astype(np.int32)
        stem = (b_val.name or "bias").replace("/", "_")
        q_v = new_initializer(graph, f"{stem}_quantized", bq, taken)
        s_v = new_initializer(graph, f"{stem}_scale", bscale, taken)
        z_v = new_initializer(graph, f"{stem}_zero_point", np.zeros(bscale.shape, np.int32), taken)
        out = ir.Value(
            name=unique_name(graph, f"{stem}_dequantized", taken), shape=b_val.shape, type=b_val.type
        )
        dq = ir.node(
            "DequantizeLinear",
            [q_v, s_v, z_v],
            {"axis": 0} if run.per_axis else {},
            outputs=[out],
            name=unique_name(graph, f"{stem}_DequantizeLinear", taken),
        )
        graph.insert_before(node, dq)
        node.replace_input_with(idx, out)
        run.count("biases_int32")


def insert_qdq(
    graph: ir.Graph, v: ir.Value, qt: QT, scale: ir.Value, zp: ir.Value, domain: str, taken: set[str]
) -> None:
    """Q(v)→DQ and every reader of ``v`` (or of the absorbed Relu's output) reads the DQ."""
    stem = (v.name or "act").replace("/", "_")
    q_out = ir.Value(
        name=unique_name(graph, f"{stem}_quantized", taken), shape=v.shape, type=ir.TensorType(zp.dtype)
    )  # type: ignore[arg-type]
    dq_out = ir.Value(name=unique_name(graph, f"{stem}_dequantized", taken), shape=v.shape, type=v.type)
    uses = list(v.uses())  # before the Q node becomes one
    q = ir.node(
        "QuantizeLinear",
        [v, scale, zp],
        outputs=[q_out],
        domain=domain,
        name=unique_name(graph, f"{stem}_QuantizeLinear", taken),
    )
    dq = ir.node(
        "DequantizeLinear",
        [q_out, scale, zp],
        outputs=[dq_out],
        domain=domain,
        name=unique_name(graph, f"{stem}_DequantizeLinear", taken),
    )
    for user, index in uses:
        user.replace_input_with(index, dq_out)
    producer = v.producer()
    if producer is not None:
        graph.insert_after(producer, [q, dq])
    else:
        graph.insert_before(graph.node(0), [q, dq])
    replaced = v
    if qt.absorbs is not None:
        relu = qt.absorbs
        replaced = relu.outputs[0]
        for user, index in list(replaced.uses()):
            user.replace_input_with(index, dq_out)
        graph.remove(relu, safe=True)
    take_output_name(graph, replaced, dq_out, taken)


def take_output_name(graph: ir.Graph, old: ir.Value, new: ir.Value, taken: set[str]) -> None:
    """If ``old`` is a graph output, ``new`` replaces it there under its name."""
    if old.is_graph_input():
        return  # a graph input passed straight through keeps its name and float value
    for i, out in enumerate(graph.outputs):
        if out is old:
            name = old.name
            old.name = unique_name(graph, f"{name}_float", taken)
            new.name = name
            graph.outputs[i] = new


def _activation_params(
    rmin: float, rmax: float, qmin: int, qmax: int, symmetric: bool, npt: type
) -> tuple[np.ndarray, np.ndarray]:
    """(scale float32 scalar, zero point scalar) from a range that always includes 0."""
    rmin, rmax = min(float(rmin), 0.0), max(float(rmax), 0.0)
    if symmetric:
        amax = max(-rmin, rmax)
        half = (qmax - qmin) // 2
        scale = amax / half if amax > 0 else 1.0
        zp = 0 if qmin < 0 else (qmax + 1) // 2
    else:
        scale = (rmax - rmin) / (qmax - qmin) if rmax > rmin else 1.0
        zp = int(np.clip(round(qmin - rmin / scale), qmin, qmax))
    scale = max(scale, 1e-12)
    return np.array(scale, np.float32), np.array(zp, npt)


def _quantize_weight(w: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 in [-127, 127], per channel along ``axis`` (or per tensor)."""
    reduce_axes = None if axis is None else tuple(i for i in range(w.ndim) if i != axis)
    return int8_symmetric(w, reduce_axes, qmax=127, float32_scale=True)
