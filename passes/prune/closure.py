"""Channel and FFN-neuron unit groups: the closure of one producer layer's output units.

A group starts at a producer (Conv output channels, MatMul / Gemm output columns) and follows
the value through element-wise ops, per-channel BatchNorm / bias Adds, pooling, Transpose,
flattening Reshape, residual Adds (both producers join the group), up to the consumers (next
Conv / MatMul / Gemm input channels, rows). A group whose units reach anything else (a graph
output, LayerNorm, Concat, Split, an op not listed) is blocked with the reason. Groups of only
MatMul / Gemm are ``ffn`` (a Llama gated MLP joins gate and up columns through the
``silu(gate) * up`` Mul); groups with a Conv are ``channels``. How units pass through each
non-layer op is :mod:`.unit_ops`.
"""

from __future__ import annotations

import onnx_ir as ir

from graphopt.passes.ir_helpers import constant_array

from . import unit_ops
from .groups import BINARY, LAYERS, POOL, REDUCE, UNARY, Group, Slice, dim, producer_axes, rank

__all__ = ["Closure"]


class Closure:
    """Collect every tensor slice that depends on one producer's output units."""

    def __init__(self, seed: ir.Node, units: int) -> None:
        self.group = Group(kind="ffn", units=units, name=seed.name or seed.op_type)
        self.handled: set[tuple[int, str]] = set()
        self.work: list[tuple[ir.Value, int, int]] = []
        self._seed = seed

    def block(self, reason: str) -> None:
        if self.group.reason is None:
            self.group.reason = reason

    def run(self) -> Group:
        self.producer(self._seed)
        steps = 0
        while self.work and self.group.reason is None:
            steps += 1
            if steps > 5000:
                self.block("unit group too large to analyse")
                break
            v, axis, block = self.work.pop()
            self.visit(v, axis, block)
        return self.group

    # --- values ---
    def push(self, v: ir.Value, axis: int, block: int) -> None:
        known = self.group.values.get(v)
        if known is not None:
            if known != (axis, block):
                self.block(f"value {v.name} reached with two unit layouts")
            return
        self.work.append((v, axis, block))
        self.group.values[v] = (axis, block)

    def visit(self, v: ir.Value, axis: int, block: int) -> None:
        if v.is_graph_output():
            self.block(f"units reach graph output {v.name}")
            return
        if v.is_graph_input():
            self.block(f"units come from graph input {v.name}")
            return
        full = self.group.units * block
        d = dim(v, axis)
        if not isinstance(d, int) or d != full:
            self.block(f"value {v.name} has dim {d} at axis {axis}, expected {full}")
            return
        if v.const_value is not None or (v.producer() is None and not v.is_graph_input()):
            self.block(f"constant {v.name} reached through an op")
            return
        p = v.producer()
        if p is not None:
            if p.op_type in LAYERS and p.domain in ("", "ai.onnx"):
                self.producer(p)
            elif (id(p), "node") not in self.handled:
                self.node(p, v)
        for u in v.uses():
            node = u.node
            if node.op_type in LAYERS and node.domain in ("", "ai.onnx"):
                self.consumer(node, v, u.idx, axis, block)
            elif (id(node), "node") not in self.handled:
                self.node(node, v, u.idx)

    # --- nodes ---
    def producer(self, node: ir.Node) -> None:
        key = (id(node), "producer")
        if key in self.handled:
            return
        self.handled.add(key)
        axes = producer_axes(node)
        if axes is None:
            self.block(f"{node.op_type} {node.name} is not a prunable producer")
            return
        widx, waxis, out_axis = axes
        if node.op_type == "Conv":
            self.group.kind = "channels"
        self.group.producers.append(node)
        self.group.slices.append(Slice(node, widx, waxis, 1, "out", weight_name=node.inputs[widx].name or ""))
        if len(node.inputs) > 2 and node.inputs[2] is not None:
            b = constant_array(node.inputs[2])
            if b is None:
                self.block(f"bias of {node.name} is not constant")
                return
            if node.op_type == "Gemm":
                if b.size == 1:
                    pass
                elif b.ndim >= 1 and b.shape[-1] == self.group.units:
                    self.group.slices.append(Slice(node, 2, -1, 1, "param"))
                else:
                    self.block(f"Gemm bias {b.shape} of {node.name} is not per output column")
                    return
            else:
                self.group.slices.append(Slice(node, 2, 0, 1, "param"))
        out = node.outputs[0]
        if node.op_type == "MatMul":
            r = rank(out)
            if r is None:
                self.block(f"rank of {out.name} unknown")
                return
        self.push(out, out_axis, 1)

    def consumer(self, node: ir.Node, v: ir.Value, index: int, axis: int, block: int) -> None:
        key = (id(node), "consumer")
        if key in self.handled:
            return
        self.handled.add(key)
        if index != 0:
            self.block(f"units feed the weight input of {node.op_type} {node.name}")
            return
        axes = producer_axes(node)
        if axes is None:
            self.block(f"{node.op_type} {node.name} with a non-constant or grouped weight consumes the units")
            return
        r = rank(v)
        if node.op_type == "Conv":
            self.group.kind = "channels"
            if r is None or axis != 1 - r:
                self.block(f"units of {v.name} are not on the Conv channel axis")
                return
            self.group.slices.append(Slice(node, 1, 1, block, "in", v, axis, node.inputs[1].name or ""))
        elif node.op_type == "MatMul":
            if axis != -1:
                self.block(f"units of {v.name} are not on the MatMul reduction axis")
                return
            self.group.slices.append(Slice(node, 1, 0, block, "in", v, axis, node.inputs[1].name or ""))
        else:  # Gemm
            if node.attributes.get_int("transA", 0) or axis != -1 or r != 2:
                self.block(f"Gemm {node.name} reads the units transposed or not 2-D")
                return
            waxis = 1 if node.attributes.get_int("transB", 0) else 0
            self.group.slices.append(Slice(node, 1, waxis, block, "in", v, axis, node.inputs[1].name or ""))

    def node(self, node: ir.Node, v: ir.Value, index: int | None = None) -> None:
        """``v`` (tracked) is ``node``'s output (index None) or its input ``index``."""
        axis, block = self.group.values[v]
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            self.block(f"{node.domain}::{op} {node.name} not understood")
            return
        self.handled.add((id(node), "node"))
        if op in UNARY or op == "Dropout" or op == "Clip":
            unit_ops.unary(self, node, axis, block)
        elif op in BINARY:
            unit_ops.binary(self, node, axis, block)
        elif op in ("BatchNormalization", "InstanceNormalization"):
            unit_ops.normalization(self, node, axis, block)
        elif op in POOL:
            unit_ops.pool(self, node, axis, block)
        elif op in REDUCE and index == 0:
            unit_ops.reduction(self, node, axis, block)
        elif op == "Transpose":
            unit_ops.transpose(self, node, v, axis, block)
        elif op in ("Reshape", "Flatten") and index == 0:
            unit_ops.flatten(self, node, axis, block)
        else:
            where = "output" if index is None else f"input {index}"
            self.block(f"{op} {node.name} ({where}) not understood for unit pruning")
