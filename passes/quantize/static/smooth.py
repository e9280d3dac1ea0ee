"""SmoothQuant for ``quantize-static`` (``smooth_quant=alpha``): normalization outputs are scaled
down per channel and the MatMul/Gemm weights reading them up, ``s = max|x|^a / max|w|^(1-a)``,
so one per-tensor activation scale fits the residual stream's outlier channels. Only where the
division folds exactly into the norm's scale/bias (or a decomposed RMSNorm's Mul by a constant)
and every reader is a quantized MatMul/Gemm."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from ...ir_helpers import constant_array, new_initializer
from .._common.fold import channel_chain, channel_params, divided_by, fold_into
from ..calibrators import ChannelAbsMax
from .calibrate import stream
from .run import Run

__all__ = ["smooth_quant"]


def smooth_quant(run: Run) -> tuple[tuple[Any, ...], bool]:
    """Scale LayerNormalization outputs down per channel and the weights reading them up."""
    alpha = float(run.options.smooth_quant)  # type: ignore[arg-type]
    graph = run.graph
    ops = run.ops()
    sites: list[tuple[ir.Node, list[ir.Node]]] = []
    skipped: list[dict[str, str]] = []
    for node in graph:
        if (
            node.op_type not in ("MatMul", "Gemm")
            or node.op_type not in ops
            or node.domain not in ("", "ai.onnx")
        ):
            continue
        x = node.inputs[0]
        if x is None:
            continue
        src = channel_chain(x, stop_at_shared=True)[-1]  # single-consumer reshapes keeping the channel axis
        prod = src.producer()
        if prod is None:
            continue
        if any(prod is p for p, _ in sites) or any(s["site"] == (prod.name or "") for s in skipped):
            continue
        why = _smooth_reason(prod, src, x, graph)
        if why is None:
            readers = list(x.consumers())
            for r in readers:
                ok, sel_why = run.selected(r)
                if not ok:
                    why = f"reader {r.name} not quantized ({sel_why})"
                    break
        if why is not None:
            skipped.append({"site": prod.name or "", "reason": why})
            continue
        sites.append((prod, list(x.consumers())))
    run.details["smooth_quant"] = {"alpha": alpha, "applied": [p.name for p, _ in sites], "skipped": skipped}
    if not sites:
        return ("smooth", alpha, ()), False
    names = [p.outputs[0].name or "" for p, _ in sites]
    cache = run.cache()
    key = ("smooth-stats", run.source_key(), run.options.max_batches, tuple(names))
    if key not in cache:
        stats = {n: ChannelAbsMax() for n in names}
        for values in stream(
            run.model,
            names,
            run.data,
            run.options.max_batches,
            run.options.progress,
            "quantize-static: smoothing",
        ):
            for n, arr in values.items():
                stats[n].update(arr)
        cache[key] = {n: s.values for n, s in stats.items()}
    act_max = cache[key]
    taken: set[str] = set()
    for prod, readers in sites:
        a = act_max[prod.outputs[0].name or ""]
        if a is None:
            continue
        ws = [constant_array(r.inputs[1]) for r in readers]
        # weight rows indexed by input channel: MatMul [K,N]; Gemm transB=1 [N,K]
        rows = [
            np.abs(w.T if (r.op_type == "Gemm" and r.attributes.get_int("transB", 0)) else w).max(axis=1)
            for r, w in zip(readers, ws)
        ]  # type: ignore[union-attr]
        wmax = np.maximum.reduce(rows)
        s = np.power(np.maximum(a, 1e-5), alpha) / np.power(np.maximum(wmax, 1e-5), 1.0 - alpha)
        s = np.clip(s, 1e-4, 1e4).astype(np.float32)
        fold_into(
            graph, prod, _smooth_params(prod) or [], divided_by(s), lambda v, _i: f"{v.name}_smooth", taken
        )
        for r, w in zip(readers, ws):
            transb = r.op_type == "Gemm" and r.attributes.get_int("transB", 0)
            scaled = w * (s[None, :] if transb else s[:, None])  # type: ignore[index]
            r.replace_input_with(
                1, new_initializer(graph, f"{r.inputs[1].name}_smooth", scaled.astype(w.dtype), taken)
            )
        run.count("smooth_quant_sites")
    return ("smooth", alpha, tuple(names)), True


def _smooth_params(prod: ir.Node) -> list[int] | None:
    """Inputs of ``prod`` holding per-channel constants that a division by ``s`` can absorb: a
    normalization's scale (and bias; not the fused skip-norms, which run after the com.microsoft
    fusions this pass precedes), or the constant operand of ``Mul(x, gamma)`` (the last op of a
    decomposed RMSNorm, as Llama exports)."""
    return channel_params(prod, skip_norms=False)


def _smooth_reason(prod: ir.Node, ln_out: ir.Value, x: ir.Value, graph: ir.Graph) -> str | None:
    """Why the producer of a MatMul input cannot absorb a per-channel division (None if it can)."""
    params = _smooth_params(prod)
    if params is None:
        return f"producer {prod.op_type} has no per-channel constant scale to fold into"
    if (
        prod.op_type != "Mul"
        and prod.attributes.get_int("axis", -1) != -1
        and not (ln_out.shape is not None and prod.attributes.get_int("axis", -1) == len(ln_out.shape) - 1)
    ):
        return f"{prod.op_type} does not normalize the last axis"
    if len(prod.outputs) > 1 and any(o is not None and o.consumers() for o in prod.outputs[1:]):
        return f"{prod.op_type}'s extra outputs are used"
    channels = ln_out.shape[-1] if ln_out.shape is not None and len(ln_out.shape) else None
    if not isinstance(channels, int):
        return "channel count unknown"
    scale = None
    for i in params:
        arr = constant_array(prod.inputs[i])
        if arr is None or arr.dtype != np.float32 or arr.shape[-1:] != (channels,) or arr.size != channels:
            return f"{prod.op_type} input {i} is not a per-channel float32 constant"
        scale = arr
    if scale is None:
        return f"{prod.op_type} has no scale"
    if x in graph.outputs or ln_out in graph.outputs:
        return f"{prod.op_type} output is a graph output"
    if ln_out is not prod.outputs[0]:
        return f"not the {prod.op_type}'s first output"
    for r in x.consumers():
        if r.op_type not in ("MatMul", "Gemm") or r.inputs[0] is not x or len(r.inputs) < 2:
            return f"output also read by {r.op_type} {r.name}"
        w = constant_array(r.inputs[1])
        if w is None or w.ndim != 2 or w.dtype != np.float32:
            return f"{r.name} weight is not a 2-D float32 constant"
        if r.op_type == "Gemm" and r.attributes.get_int("transA", 0):
            return f"{r.name} has transA=1"
        transb = r.op_type == "Gemm" and r.attributes.get_int("transB", 0)
        k = w.shape[1] if transb else w.shape[0]
        if k != channels:
            return f"{r.name} weight does not match the channel count"
    return None
