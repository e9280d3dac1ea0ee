"""GPTQ calibration for ``quantize-weight-only``: the Hessians ``X^T X`` of the weights' inputs,
in calibration runs that fit the memory budget.

``sequential`` (default) calibrates the weights of each input activation on the model with every
earlier weight already quantized (one run over a pruned prefix of the model per activation), so
later layers correct the error of earlier ones; ``sequential=false`` is one run from the float
model."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.errors import PipelineError

from .._common.hessians import accumulate_hessians, budget_groups
from .options import WeightOnlyOptions
from .sites import Site

__all__ = ["hessian_groups", "prefix_model"]

Key = tuple[int, bool]


def hessian_groups(
    model: ir.Model,
    by_key: dict[Key, list[Site]],
    data: Any,
    o: WeightOnlyOptions,
    details: dict[str, Any],
    skip: Collection[Key] = (),
) -> Iterator[tuple[list[Key], dict[Key, np.ndarray], int]]:
    """Yield groups of weight keys with their Hessians and the run's calibration tokens; each
    group's Hessians fit the memory budget and cost one calibration run (no data: one group, no
    Hessians). The caller rewrites a group's weights before asking for the next one, so a later
    run sees them quantized. Keys in ``skip`` get no Hessian (and cost no run)."""
    keys = list(by_key)
    if data is None:
        yield keys, {}, 0
        return

    def needs(key: Key) -> tuple[set[int], int]:
        if key in skip:
            return set(), 0
        return {id(s.node.inputs[0]) for s in by_key[key]}, by_key[key][0].w.shape[1]

    # Sequential: a new group (calibration run) for each new activation, so that a weight's
    # Hessian comes from the model with every earlier weight already quantized.
    groups = budget_groups(keys, needs, o.hessian_memory_mb * 1024 * 1024, run_per_activation=o.sequential)
    details["calibration_runs"] = len(groups)
    for gi, group in enumerate(groups):
        # One Hessian per distinct activation; a weight with several consumers sums theirs.
        names: list[str] = []
        for key in group:
            if key in skip:
                continue
            for s in by_key[key]:
                nm = s.node.inputs[0].name
                if nm and nm not in names:
                    names.append(nm)
        if not names:  # only skipped keys
            yield group, {}, 0
            continue
        run_on = prefix_model(model, names) if len(groups) > 1 else model
        acc, tokens = accumulate_hessians(
            run_on, names, data, limit=o.calibration_batches, description=f"gptq {gi + 1}/{len(groups)}"
        )
        if not acc:
            raise PipelineError("quantize-weight-only: the calibration data has no batches")
        details.setdefault("calibration_tokens", tokens)
        hess: dict[Key, np.ndarray] = {}
        for key in group:
            consumers = list(dict.fromkeys(s.node.inputs[0].name for s in by_key[key]))
            if key not in skip and all(
                n in acc for n in consumers
            ):  # an unnamed activation: RTN for this weight
                hess[key] = (
                    acc[consumers[0]] if len(consumers) == 1 else np.sum([acc[n] for n in consumers], axis=0)
                )
        del acc
        yield group, hess, tokens


def prefix_model(model: ir.Model, names: list[str]) -> ir.Model:
    """A model with only the nodes that ``names`` depend on (sharing the weight tensors), so a
    sequential calibration run for an early layer neither serializes nor runs the later ones. The
    whole model when a needed node has subgraphs (their outer-scope reads are not traced here)."""
    graph = model.graph
    by_name: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    for node in graph:
        for v in node.outputs:
            if v.name:
                by_name[v.name] = v
    needed: set[int] = set()
    stack = [by_name[n] for n in names if n in by_name]
    if len(stack) != len(names):
        return model
    while stack:
        v = stack.pop()
        node = v.producer()
        if node is None or id(node) in needed:
            continue
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return model
        needed.add(id(node))
        stack.extend(i for i in node.inputs if i is not None)
    vmap: dict[int, ir.Value] = {}

    def copy(v: ir.Value) -> ir.Value:
        nv = ir.Value(name=v.name, shape=v.shape, type=v.type, const_value=v.const_value)
        vmap[id(v)] = nv
        return nv

    inputs = [copy(v) for v in graph.inputs]
    inits: list[ir.Value] = []
    nodes: list[ir.Node] = []
    for node in graph:
        if id(node) not in needed:
            continue
        ins: list[ir.Value | None] = []
        for i in node.inputs:
            if i is not None and id(i) not in vmap:
                if i.const_value is None:  # produced later: the graph is not sorted
                    return model
                inits.append(copy(i))
            ins.append(None if i is None else vmap[id(i)])
        new = ir.Node(
            node.domain,
            node.op_type,
            ins,
            attributes=list(node.attributes.values()),
            overload=node.overload,
            num_outputs=len(node.outputs),
            version=node.version,
            name=node.name,
        )
        for o, no in zip(node.outputs, new.outputs):
            no.name, no.shape, no.type = o.name, o.shape, o.type
            vmap[id(o)] = no
        nodes.append(new)
    outputs = [vmap[id(by_name[n])] for n in names]
    pruned = ir.Graph(
        inputs,
        outputs,
        nodes=nodes,
        initializers=inits,
        opset_imports=dict(graph.opset_imports),
        name=graph.name,
    )
    return ir.Model(
        pruned,
        ir_version=model.ir_version,
        producer_name=model.producer_name,
        functions=list(model.functions.values()),
    )
