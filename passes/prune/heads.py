"""Attention-head unit groups: multi-head attention matched around its output projection.

The pattern is attention as exported from BERT / ViT / GPT-2: Q/K/V projections (or one fused
QKV projection + Split), Reshape [B, S, H, d] → Transpose, scores MatMul, softmax, context
MatMul, Transpose → Reshape [B, S, H·d] → output projection MatMul / Gemm. A head's group holds
its Q/K/V columns (every section of a fused QKV weight), their biases and the output
projection's rows; a literal head count in Reshape shapes (and Split sizes) is a shape fix, and
run-time shapes adapt by themselves. Grouped-query attention, rotary chains (Llama) and any
unrecognized node are skipped with the reason.
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from graphopt.passes.ir_helpers import constant_array

from .groups import BINARY, UNARY, Group, Slice, dim, element, shape_pieces, single_consumer

__all__ = ["HeadMatcher"]


def _projection(v: ir.Value) -> tuple[ir.Node, ir.Node | None, int] | None:
    """``v = MatMul(x, W) [+ b]`` with constant 2-D W and 1-D b: (matmul, add or None, bias input index)."""
    p = v.producer()
    add = None
    bias_index = -1
    if p is not None and p.op_type == "Add":
        for i in (0, 1):
            b = constant_array(p.inputs[i])
            if b is not None and b.ndim == 1:
                other = p.inputs[1 - i]
                mm = other.producer() if other is not None else None
                if mm is not None and mm.op_type == "MatMul" and single_consumer(other, False) is p:
                    add, bias_index, p = p, i, mm
                    break
        else:
            return None
    if p is not None and p.op_type == "Gemm" and add is None:
        if p.attributes.get_int("transA", 0):
            return None
        b = constant_array(p.inputs[2]) if len(p.inputs) > 2 and p.inputs[2] is not None else None
        if len(p.inputs) > 2 and p.inputs[2] is not None and (b is None or b.ndim != 1):
            return None
        w = constant_array(p.inputs[1])
        if w is None or w.ndim != 2:
            return None
        return p, (p if b is not None else None), 2
    if p is None or p.op_type != "MatMul":
        return None
    w = constant_array(p.inputs[1])
    if w is None or w.ndim != 2 or constant_array(p.inputs[0]) is not None:
        return None
    return p, add, bias_index


def _column_axis(node: ir.Node) -> int:
    """Axis of a projection weight that holds its output columns."""
    if node.op_type == "Gemm":
        return 0 if node.attributes.get_int("transB", 0) else 1
    return 1


def _row_axis(node: ir.Node) -> int:
    if node.op_type == "Gemm":
        return 1 if node.attributes.get_int("transB", 0) else 0
    return 0


class HeadMatcher:
    """BERT-style multi-head attention around one output projection (see module doc)."""

    def __init__(self, out_proj: ir.Node) -> None:
        self.o = out_proj
        self.reason: str | None = None
        #: Run-time Reshapes inside Q/K/V paths whose shape holds the head count literally.
        self.literal_fixes: list[ir.Node] = []

    def fail(self, reason: str) -> None:
        self.reason = reason

    def match(self) -> Group | None:
        o = self.o
        x = o.inputs[0]
        merge = x.producer() if x is not None else None
        if merge is None or merge.op_type != "Reshape" or single_consumer(x) is not o:
            return None
        t = merge.inputs[0].producer() if merge.inputs[0] is not None else None
        if t is None or t.op_type != "Transpose" or list(t.attributes.get_ints("perm", [])) != [0, 2, 1, 3]:
            return None
        ctx = t.inputs[0].producer() if t.inputs[0] is not None else None
        if ctx is None or ctx.op_type != "MatMul" or any(constant_array(i) is not None for i in ctx.inputs):
            return None
        # From here on it looks like attention: every failure is recorded.
        probs, v4 = ctx.inputs
        h_out = dim(ctx.outputs[0], -3)
        d = dim(ctx.outputs[0], -1)
        if not isinstance(h_out, int) or not isinstance(d, int):
            return self.fail("head count or head size not static")
        wo = constant_array(o.inputs[1])
        rows = wo.shape[_row_axis(o)]  # type: ignore[union-attr]
        if rows != h_out * d:
            return self.fail(f"output projection rows {rows} != heads*head_size {h_out}*{d}")
        if o.op_type == "Gemm" and o.attributes.get_int("transA", 0):
            return self.fail("output projection Gemm has transA")
        chain: list[ir.Node] = [o, merge, t, ctx]
        # Scores: back from the probabilities through element-wise ops to the Q·K MatMul.
        qk = None
        frontier = [probs]
        seen: set[int] = set()
        while frontier:
            val = frontier.pop()
            node = val.producer()
            if node is None or id(node) in seen:
                if node is None:
                    return self.fail(f"scores come from a graph input {val.name}")
                continue
            seen.add(id(node))
            if len(seen) > 24:
                return self.fail("score chain too long")
            if node.op_type == "MatMul" and all(constant_array(i) is None for i in node.inputs):
                if qk is not None and qk is not node:
                    return self.fail("two score MatMuls")
                qk = node
                chain.append(node)
                continue
            if node.op_type not in (UNARY | BINARY | {"Softmax", "Dropout"}):
                return self.fail(f"{node.op_type} {node.name} in the score chain")
            if node.op_type == "Softmax" and node.attributes.get_int("axis", -1) not in (-1, 3):
                return self.fail("softmax not over the keys")
            chain.append(node)
            for i in node.inputs:
                if i is None or constant_array(i) is not None and constant_array(i).size == 1:  # type: ignore[union-attr]
                    continue
                hd = dim(i, -3)
                if hd == 1:
                    continue  # mask / bias broadcast over heads
                if hd != h_out:
                    return self.fail(f"{i.name} in the score chain has head dim {hd}")
                frontier.append(i)
        if qk is None:
            return self.fail("no Q·K MatMul")
        paths = {}
        for role, val in (("q", qk.inputs[0]), ("k", qk.inputs[1]), ("v", v4)):
            got = self._split_path(val, h_out, d, chain)
            if got is None:
                return None
            paths[role] = got
        # Every node in the chain may feed only chain nodes (and Shape reads, which adapt).
        members = {id(n) for n in chain}
        for n in chain:
            if n is o:
                continue
            for out in n.outputs:
                if out.is_graph_output():
                    return self.fail(f"{out.name} is a graph output")
                for u in out.uses():
                    if id(u.node) not in members and u.node.op_type != "Shape":
                        return self.fail(f"{out.name} also feeds {u.node.op_type} {u.node.name}")
        g = Group(kind="heads", units=h_out, name=o.name or "attention")
        fused = [paths[r][4] for r in ("q", "k", "v")]
        if any(f is not None for f in fused):
            # One QKV projection split into sections (GPT-2): every section loses the same heads.
            if (
                any(f is None for f in fused)
                or len({id(f["proj"]) for f in fused}) != 1
                or sorted(f["index"] for f in fused) != list(range(fused[0]["sections"]))
            ):
                return self.fail("Q/K/V come partly from one fused projection and partly not")
            f = fused[0]
            mm, add, bias_index = f["proj"], f["add"], f["bias_index"]
            sections = f["sections"]
            g.slices.append(
                Slice(mm, 1, _column_axis(mm), d, "out", weight_name=mm.inputs[1].name or "", groups=sections)
            )
            if add is not None:
                g.slices.append(
                    Slice(add, bias_index, 0 if add is not mm else -1, d, "param", groups=sections)
                )
            g.producers.append(mm)
            for n, fix in f["fixes"]:
                g.shape_fixes.append((n, 1, fix))
            g.clear.extend(f["values"])
            if f["split_sizes"] is not None:
                g.shape_fixes.append((f["split"], 1, ("split", d)))
            for role in ("q", "k", "v"):
                g.shape_fixes.append((paths[role][3], 1, ("heads", 2)))
        else:
            for role in ("q", "k", "v"):
                mm, add, bias_index, split, _ = paths[role]
                g.slices.append(Slice(mm, 1, _column_axis(mm), d, "out", weight_name=mm.inputs[1].name or ""))
                if add is not None:
                    g.slices.append(Slice(add, bias_index, 0 if add is not mm else -1, d, "param"))
                g.producers.append(mm)
                g.shape_fixes.append((split, 1, ("heads", 2)))
        g.slices.append(Slice(o, 1, _row_axis(o), d, "in", x, -1, o.inputs[1].name or ""))
        g.shape_fixes.append((merge, 1, ("merge", d)))
        for n in self.literal_fixes:
            g.shape_fixes.append((n, 1, ("literal_heads", 0)))
        for n in chain:
            if n is not o:
                g.clear.extend(n.outputs)
        for role in ("q", "k", "v"):
            mm, add, _, _, _ = paths[role]
            g.clear.append(mm.outputs[0])
            if add is not None:
                g.clear.append(add.outputs[0])
        pieces = shape_pieces(merge.inputs[1])
        if pieces is None or len(pieces) == 0:
            return self.fail("merge Reshape shape not readable")
        try:
            _, _, last = element(pieces, sum(n for n, _ in pieces) - 1)
        except IndexError:
            return self.fail("merge Reshape shape empty")
        if last not in (-1, h_out * d):
            return self.fail(f"merge Reshape last dim {last} not understood")
        return g

    def _fused(self, section: ir.Value, h: int, d: int) -> dict[str, Any] | None:
        """``section`` is one output of ``Split(last axis)`` of a fused QKV projection, possibly
        through a row-preserving Reshape (``[B*S, 3E]`` → ``[B, S, 3E]``)."""
        split = section.producer()
        x = split.inputs[0]  # type: ignore[union-attr]
        if x is None or x.shape is None:
            return self.fail("fused QKV Split input shape unknown")
        r = x.shape.rank()
        axis = split.attributes.get_int("axis", 0)  # type: ignore[union-attr]
        if axis % r != r - 1:
            return self.fail("fused QKV Split not on the last axis")
        sections = len(split.outputs)  # type: ignore[union-attr]
        sizes = (
            constant_array(split.inputs[1]) if len(split.inputs) > 1 and split.inputs[1] is not None else None
        )  # type: ignore[union-attr]
        if len(split.inputs) > 1 and split.inputs[1] is not None and sizes is None:  # type: ignore[union-attr]
            return self.fail("fused QKV Split sizes not constant")
        if sizes is not None and any(int(v) != h * d for v in sizes.ravel()):
            return self.fail(f"fused QKV Split sizes {sizes.tolist()} are not {h}*{d} each")
        fixes: list[tuple[ir.Node, tuple[str, int]]] = []
        values = [x]
        src = x
        p = x.producer()
        if p is not None and p.op_type == "Reshape":
            y_last, in_v = x.shape[-1], p.inputs[0]
            if in_v is None or in_v.shape is None or in_v.shape[-1] != y_last or y_last != sections * h * d:
                return self.fail(f"Reshape {p.name} before the fused QKV Split does not keep rows")
            pieces = shape_pieces(p.inputs[1]) if p.inputs[1] is not None else None
            if pieces is None:
                return self.fail(f"Reshape {p.name} shape not readable")
            _, _, last = element(pieces, sum(n for n, _ in pieces) - 1)
            if last not in (-1, sections * h * d):
                return self.fail(f"Reshape {p.name} last shape element {last} not understood")
            if single_consumer(in_v, False) is not p or single_consumer(x, False) is not split:
                return self.fail("fused QKV projection output has other users")
            fixes.append((p, ("last", sections * d)))
            values.append(in_v)
            src = in_v
        proj = _projection(src)
        if proj is None:
            return self.fail("fused QKV Split does not read a projection")
        mm, add, bias_index = proj
        if single_consumer(src, False) is None:
            return self.fail("fused QKV projection output has other users")
        return {
            "proj": mm,
            "add": add,
            "bias_index": bias_index,
            "sections": sections,
            "index": list(split.outputs).index(section),
            "split": split,  # type: ignore[union-attr]
            "split_sizes": sizes,
            "fixes": fixes,
            "values": values + list(split.outputs),
        }  # type: ignore[union-attr]

    def _split_path(self, val: ir.Value, h: int, d: int, chain: list[ir.Node]):
        """Back from a Q/K/V operand to its projection through scalar scaling, Transpose and
        run-time Reshapes; returns (matmul, add, bias index, split Reshape)."""
        for _ in range(12):
            node = val.producer()
            if node is None:
                return self.fail(f"{val.name} comes from a graph input")
            if node.op_type in ("Mul", "Div"):
                c = [constant_array(i) for i in node.inputs]
                if node.op_type == "Mul" and c[0] is not None and c[0].size == 1 and c[1] is None:
                    nxt = node.inputs[1]
                elif c[1] is not None and c[1].size == 1 and c[0] is None:
                    nxt = node.inputs[0]
                else:
                    return self.fail(f"{node.op_type} {node.name} on a Q/K/V path is not a scalar scale")
                chain.append(node)
                val = nxt  # type: ignore[assignment]
                continue
            if node.op_type == "Transpose":
                chain.append(node)
                val = node.inputs[0]  # type: ignore[assignment]
                continue
            if node.op_type == "Reshape":
                src = node.inputs[0]
                proj = _projection(src) if src is not None else None
                fused = None
                if (
                    proj is None
                    and src is not None
                    and src.producer() is not None
                    and src.producer().op_type == "Split"
                ):
                    fused = self._fused(src, h, d)
                    if fused is None:
                        return None
                    proj = (fused["proj"], fused["add"], fused["bias_index"])
                if proj is not None:
                    mm, add, bias_index = proj
                    w = constant_array(mm.inputs[1])
                    cols = w.shape[_column_axis(mm)]  # type: ignore[union-attr]
                    if cols != h * d * (fused["sections"] if fused else 1):
                        return self.fail(
                            f"projection {mm.name} has {cols} columns, not {h}*{d} (grouped-query attention)"
                        )
                    y = node.outputs[0]
                    if y.shape is None or y.shape.rank() != 4 or y.shape[2] != h or y.shape[3] != d:
                        return self.fail(
                            f"split Reshape {node.name} output {y.shape} is not [B, S, {h}, {d}]"
                        )
                    pieces = shape_pieces(node.inputs[1])
                    if pieces is None:
                        return self.fail(f"split Reshape {node.name} shape not readable")
                    _, _, hv = element(pieces, 2)
                    _, _, dv = element(pieces, 3)
                    if hv not in (-1, h) or dv != d:
                        return self.fail(
                            f"split Reshape {node.name} shape elements ({hv}, {dv}) not understood"
                        )
                    nxt_users = [u.node for u in node.outputs[0].uses()]
                    if len(nxt_users) != 1 or nxt_users[0].op_type != "Transpose":
                        return self.fail(f"split Reshape {node.name} not followed by one Transpose")
                    perm = list(nxt_users[0].attributes.get_ints("perm", []))
                    if perm not in ([0, 2, 1, 3], [0, 2, 3, 1]):
                        return self.fail(f"head Transpose perm {perm} not understood")
                    if fused is None:
                        for n in (mm, add):
                            if n is not None and single_consumer(n.outputs[0], False) is None:
                                return self.fail(f"projection output {n.outputs[0].name} has other users")
                    chain.append(node)
                    return mm, add, bias_index, node, fused
                # A run-time reshape inside the path (e.g. K transposed via [B*H, S, d]).
                pieces = shape_pieces(node.inputs[1])
                if pieces is None:
                    return self.fail(f"Reshape {node.name} shape not readable")
                literal = False
                out_shape = node.outputs[0].shape
                static = [x for x in (out_shape.dims if out_shape is not None else ()) if isinstance(x, int)]
                allowed = {-1, 0, 1, d, *static} - {h}
                for _, arr in pieces:
                    if arr is None:
                        continue
                    for a in arr:
                        if int(a) == h and h not in (d, 1) and static.count(h) <= 1:
                            literal = True
                        elif int(a) not in allowed:
                            return self.fail(
                                f"Reshape {node.name} has literal dims {arr.tolist()} not understood"
                            )
                if d == h:
                    return self.fail("head size equals head count: literal dims are ambiguous")
                if literal:
                    self.literal_fixes.append(node)
                chain.append(node)
                val = src  # type: ignore[assignment]
                continue
            return self.fail(
                f"{node.op_type} {node.name} on a Q/K/V path (rotary, grouped-query or fused QKV)"
            )
        return self.fail("Q/K/V path too long")
