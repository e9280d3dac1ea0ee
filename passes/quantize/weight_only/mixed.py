"""Mixed precision for ``quantize-weight-only``: which weights get 8 bits instead of ``bits``.

Not a fixed list of layer names: each candidate weight's sensitivity is measured end to end. The
float model runs once on a few input batches (the calibration data, or generated inputs), then
once per weight with only that weight replaced by its ``bits``-bit round trip (the weights are
fed as graph inputs of one private session, so no model is rebuilt per weight). The sensitivity
is the resulting error of the model's outputs (relative squared error, or KL divergence for
logits). Weights are then promoted to 8 bits in order of sensitivity per extra byte until the
byte budget (``int8_budget`` times the all-``bits`` size) is spent; weights that read the same
input are promoted together (``mixed_siblings``) so that ``lower-ort-cpu`` can still pack them
into one product.

Measured rather than guessed because it is not the same weights from one model to the next: on
SmolLM2 the tied embedding / LM head table matters far more than any one layer, and which layers
come next differs between decoders.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx_ir as ir

from .blocks import dequantize, quantize_rtn
from .options import WeightOnlyOptions
from .sites import Site

__all__ = ["choose_bits", "offset_extra_bytes", "quantized_bytes"]

Key = tuple[int, bool]


def quantized_bytes(n: int, k: int, bits: int, block_size: int, symmetric: bool, scale_bytes: int) -> int:
    """Bytes of a ``[N, K]`` weight quantized block-wise: levels, scales and zero points."""
    blocks = math.ceil(k / block_size)
    size = n * blocks * (block_size * bits // 8 + scale_bytes)
    if not symmetric:
        size += n * math.ceil(blocks * bits / 8)
    return size


def offset_extra_bytes(weights: list[np.ndarray], o: WeightOnlyOptions) -> int:
    """Bytes the weights (``[N, K]``) with float block offsets take beyond their plain
    ``bits``-bit form (zero points and the offset columns; see
    :func:`.blocks.with_offset_columns`)."""
    extra = 0
    for w in weights:
        n, k = w.shape
        scale_bytes = 2 if w.dtype == np.float16 else 4
        extra += quantized_bytes(n, k + k // o.block_size, o.bits, o.block_size, False, scale_bytes)
        extra -= quantized_bytes(n, k, o.bits, o.block_size, o.symmetric, scale_bytes)
    return extra


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def _score(ref: list[np.ndarray], out: list[np.ndarray], metric: str) -> float:
    """Mean over the outputs of their relative squared error, or (``kl``) of the KL divergence
    of the softmax over the last axis (the outputs are logits) from the float model's."""
    errs = []
    for r, o in zip(ref, out):
        if metric == "kl":
            lp, lq = _log_softmax(r), _log_softmax(o)
            errs.append(float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1))))
            continue
        r64 = r.astype(np.float64)
        errs.append(float(np.sum(np.square(o.astype(np.float64) - r64)) / (np.sum(np.square(r64)) + 1e-30)))
    return float(np.mean(errs)) if errs else 0.0


def _batches(data: Any, model: ir.Model, o: WeightOnlyOptions) -> list[dict[str, np.ndarray]]:
    if data is not None:
        return [dict(b) for b in data.batches(o.mixed_batches)]
    from graphopt.inputs import generate_inputs

    return [generate_inputs(model, seed=i) for i in range(o.mixed_batches)]


def choose_bits(
    model: ir.Model,
    by_key: dict[Key, list[Site]],
    tied: dict[int, Key],
    tables: dict[int, ir.Value],
    data: Any,
    o: WeightOnlyOptions,
    details: dict[str, Any],
    offsets: set[Key] | None = None,
) -> dict[Key, int]:
    """``{key: 8}`` for the weights promoted to 8 bits (the others keep ``o.bits``).

    ``tied``: the Gather nodes' ids whose table is a site's weight (``{id(gather): key}``) and
    ``tables`` their table values (``{id(gather): value}``): a tied table is fed to both uses.
    ``offsets``: the weights quantized with float block offsets. Their extra bytes come out of
    the budget first, and they are exact at ``bits``, so not candidates."""
    offsets = offsets or set()
    if o.int8_budget <= 0 or o.bits >= 8 or not by_key:
        return {}
    import onnxruntime as ort

    from graphopt.ir import to_bytes

    scale_bytes = 2 if next(iter(by_key.values()))[0].w.dtype == np.float16 else 4
    extra: dict[Key, int] = {}
    base_bytes = 0
    for key, sites in by_key.items():
        n, k = sites[0].w.shape
        low = quantized_bytes(n, k, o.bits, o.block_size, o.symmetric, scale_bytes)
        high = quantized_bytes(n, k, 8, o.block_size, o.symmetric, scale_bytes)
        base_bytes += low
        extra[key] = high - low
    budget = o.int8_budget * base_bytes - offset_extra_bytes([by_key[k][0].w for k in offsets], o)
    if budget <= 0:
        details["mixed_precision"] = {"budget_bytes": 0, "spent_bytes": 0, "measured": 0, "promoted": 0}
        return {}

    # Every weight becomes a graph input of one private session (exact ones too: fed from the
    # arrays already in memory rather than copied into the session); the caller's model is untouched.
    feeds_of: dict[Key, list[tuple[str, bool]]] = {}  # key -> [(input name, transposed layout)]
    for key, sites in by_key.items():
        name = sites[0].weight.name
        if name is None:
            continue
        feeds_of[key] = [(name, bool(key[1]))]
    for gid, key in tied.items():
        value = tables.get(gid)
        table = value.name if value is not None else None
        if key in feeds_of and table is not None and table not in {n for n, _ in feeds_of[key]}:
            feeds_of[key].append((table, True))  # a [vocab, hidden] copy of the table
    work = model.clone()
    graph = work.graph
    for key in list(feeds_of):
        if any(name not in graph.initializers for name, _ in feeds_of[key]):
            del feeds_of[key]  # read from a Constant node, not an initializer: stays at o.bits
    for name in sorted({n for entries in feeds_of.values() for n, _ in entries}):
        init = graph.initializers.pop(name)
        init.const_value = None
        graph.inputs.append(init)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(to_bytes(work), so, providers=["CPUExecutionProvider"])
    del work
    inputs = {i.name for i in session.get_inputs()}
    out_names = [
        v.name for v in model.graph.outputs if v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16) and v.name
    ]
    if o.mixed_outputs:
        out_names = [n for n in out_names if n in o.mixed_outputs] or out_names

    floats: dict[str, np.ndarray] = {}
    for key, entries in feeds_of.items():
        site = by_key[key][0]
        for name, transposed in entries:
            floats[name] = site.w if transposed else np.ascontiguousarray(site.w.T)
    batches = [{n: v for n, v in b.items() if n in inputs} for b in _batches(data, model, o)]
    refs = [session.run(out_names, {**b, **floats}) for b in batches]
    scores: dict[Key, float] = {}
    for key, entries in feeds_of.items():
        if key in offsets:
            continue  # exact at o.bits: nothing to gain
        site = by_key[key][0]
        rounded = dequantize(quantize_rtn(site.w, o.bits, o.block_size, o.symmetric, site.w.dtype.type))
        rounded = rounded.astype(site.w.dtype)
        swapped = dict(floats)
        for name, transposed in entries:
            swapped[name] = rounded if transposed else np.ascontiguousarray(rounded.T)
        scores[key] = float(
            np.mean(
                [
                    _score(r, session.run(out_names, {**b, **swapped}), o.mixed_metric)
                    for b, r in zip(batches, refs)
                ]
            )
        )
    # Weights that read the same input (Q/K/V, gate/up) are promoted together: ONNX Runtime runs
    # them as one product only when they have the same bits (lower-ort-cpu packs them).
    units: dict[int, list[Key]] = {}
    for key in scores:
        units.setdefault(id(by_key[key][0].node.inputs[0]), []).append(key)
    groups = list(units.values()) if o.mixed_siblings else [[k] for k in scores]
    chosen: dict[Key, int] = {}
    spent = 0
    for group in sorted(
        groups, key=lambda g: sum(scores[k] for k in g) / max(sum(extra[k] for k in g), 1), reverse=True
    ):
        cost = sum(extra[k] for k in group)
        if spent + cost > budget:
            continue
        for key in group:
            chosen[key] = 8
        spent += cost
    ranked = sorted(scores, key=lambda k: scores[k], reverse=True)
    details["mixed_precision"] = {
        "budget_bytes": int(budget),
        "spent_bytes": int(spent),
        "measured": len(scores),
        "batches": len(batches),
        "promoted": len(chosen),
        "most_sensitive": [
            {
                "weight": by_key[k][0].weight.name,
                "error": float(f"{scores[k]:.4g}"),
                "bits": chosen.get(k, o.bits),
            }
            for k in ranked[:10]
        ],
    }
    return chosen
