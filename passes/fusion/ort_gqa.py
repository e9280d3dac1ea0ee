"""Decoder self-attention → ``com.microsoft.GroupQueryAttention``, on every layer of real exports.

Why not onnxscript's rules: its SDPA → GQA chain expects transformers 4's KV-cache exports (a
``position_ids`` input, its Trilu causal-mask recipe) and its SDPA pattern does not see through the
reshapes a static-shape export folds together (K repeated through ``[B·H, S, D]``); on
transformers-5 exports it fused no layer (static shapes) or gave MultiHeadAttention (symbolic ones).

What is matched, from each ``Softmax`` outwards (plain Python over the IR, see :func:`_match`)::

    q = [RoPE](Transpose(Reshape(Q, [B, S, H, Dh]), [0, 2, 1, 3]))       Q: [B, S, H·Dh]
    k = [RoPE](Transpose(Reshape(K, [B, S, Hkv, Dh]), [0, 2, 1, 3]))     K, V: [B, S, Hkv·Dh]
    k, v repeated to H heads (Unsqueeze/Expand/Reshape, head h reads kv head h // (H/Hkv)),
    k transposed (any Reshape/Transpose route), scalar scales anywhere on q, kᵀ or the scores
    out = Reshape(Transpose(MatMul(Softmax(q·kᵀ·scale ⊕ mask), v), [0, 2, 1, 3]), [B, S, H·Dh])

``⊕ mask`` is ``Add`` of an additive mask or ``Where(mask, scores, -big)``, optionally followed
by the exporter's ``Where(IsNaN(p), 0, p)`` guard (a no-op here: a causal row always keeps its
diagonal). The layout of every K/V route is checked by tracking which source axis each dim holds
(:class:`_Layout`), so any order of reshapes that the exporter or constant folding produced is
accepted exactly when it computes repeat_kv and the key transpose.

RoPE is ``com.microsoft.RotaryEmbedding`` (made by the rotary rules that run first). With
``position_ids`` the one-element constant 0 (positions 0..S-1) and constant caches it moves
inside GroupQueryAttention (``do_rotary=1``), which computes the same positions for a prompt. Any
other positions shared by q and k (a ``position_ids`` input) stay a RotaryEmbedding, moved onto the
``[B, S, N·Dh]`` projections GroupQueryAttention reads (``do_rotary=0``): the kernel would compute
positions from the lengths, an assumption about the caller that the graph does not make.

KV cache (exports with past/present per layer): k and v may pass through
``Concat(past, new, axis=2)`` after the RoPE, with ``past`` a ``[B, Hkv, P, Dh]`` graph input;
then ``past`` becomes the op's past_key/past_value and its present_key/present_value take the
Concat's place (the ``present.*`` outputs), so the caller can share past and present buffers. The
mask must then read a declared padding input spanning past and new tokens (GroupQueryAttention's
total_sequence_length is its width). ONNX Runtime's kernel refuses a multi-token chunk after a past
for batch > 1 (a run-time error, not a wrong answer).

The mask is proved GroupQueryAttention's by :mod:`ort_decoder_masks` (evaluated, not guessed);
a mask that also reads a padding-mask input is accepted only when the pass is told that input
follows GroupQueryAttention's convention (``padding_mask``): then ``seqlens_k`` is
``sum(mask) - 1`` per row, otherwise the full length. A proved sliding window becomes
``local_window_size``. Anything unproved is left alone.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import onnx_ir as ir

from ..ir_helpers import MS_DOMAIN, constant_array, graph_nodes, rank, take_place
from .matching import add_contrib_opset, is_op, same_dim, scalar
from .ort_decoder_masks import BLOCKED, Lengths, prove_causal_mask

logger = logging.getLogger("graphopt.passes.fusion")

__all__ = ["fuse_group_query_attention"]

_GQA_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})  # the CPU kernel's types
_LAYOUT_OPS = ("Reshape", "Transpose", "Unsqueeze", "Expand", "Mul", "Div")

Atom = tuple[str, object]  # (name, size): size an int or a SymbolicDim


class _Layout:
    """Which source axes each dim of a tensor holds, in memory order (size-1 axes dropped).

    Starts from a ``[B, S, C]`` projection; a Reshape may split the last source axis once (into
    heads and head size) and otherwise only regroups adjacent axes; Transpose permutes the groups;
    Unsqueeze adds empty ones; Expand fills an empty one with the repeat axis ``g``. Every step is
    checked against the inferred output shape, so the final grouping is what the ops compute.
    """

    def __init__(self, value: ir.Value, names: str = "bsc") -> None:
        """Layout of ``value`` whose dims are the source axes ``names`` (one letter each)."""
        self.groups: list[list[Atom]] = [[(n, d)] for n, d in zip(names, value.shape)]  # type: ignore[arg-type]
        self.scale = 1.0

    @staticmethod
    def _size(atoms: list[Atom]) -> tuple[int, list[str]]:
        n, syms = 1, []
        for _, d in atoms:
            if isinstance(d, int):
                n *= d
            else:
                syms.append(str(d))
        return n, syms

    def apply(self, node: ir.Node, out: ir.Value) -> bool:
        op = node.op_type
        if op == "Concat":  # Concat(past, new) on the sequence axis: s now counts past + new tokens
            if self.names() != [["b"], ["c0"], ["s"], ["c1"]] or out.shape is None or rank(out) != 4:
                return False
            self.groups[2] = [("s", out.shape[2])]
            return True
        if op in ("Mul", "Div"):
            s = scalar(node.inputs[1], out) if len(node.inputs) == 2 else None
            if s is None or s == 0:
                return False
            self.scale *= s if op == "Mul" else 1.0 / s
            return True
        if op == "Transpose":
            perm = node.attributes.get_ints("perm", None)
            if perm is None or sorted(perm) != list(range(len(self.groups))):
                return False
            self.groups = [self.groups[p] for p in perm]
            return True
        if out.shape is None or any(not isinstance(d, int) and d.value is None for d in out.shape):
            return False
        dims = list(out.shape)
        if op == "Unsqueeze":
            axes = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
            if axes is None:
                return False
            r = len(self.groups) + axes.size
            norm = sorted({int(a) + r if a < 0 else int(a) for a in axes.reshape(-1)})
            groups = iter(self.groups)
            self.groups = [[] if i in norm else next(groups) for i in range(r)]
            return len(dims) == r
        if op == "Expand":
            if len(dims) != len(self.groups):
                return False
            for i, (g, d) in enumerate(zip(self.groups, dims)):
                n, syms = self._size(g)
                if not g and isinstance(d, int) and d > 1:
                    if any(a[0] == "g" for grp in self.groups for a in grp):
                        return False
                    self.groups[i] = [("g", d)]
                elif (
                    not (d == 1 and not g)
                    and not (syms == [] and d == n)
                    and not (n == 1 and len(syms) == 1 and not isinstance(d, int) and str(d) == syms[0])
                ):
                    return False
            return True
        if op == "Reshape":
            return self._reshape(dims)
        return False

    def _reshape(self, dims: list[int | ir.SymbolicDim]) -> bool:
        atoms = [a for g in self.groups for a in g if a[1] != 1]
        known = {str(a[1]) for a in atoms if not isinstance(a[1], int)}
        # At most one dim inference could not name (e.g. ``unk__3`` for a -1): it holds whatever
        # the dims before and after it leave, matched from both ends.
        wild = [i for i, d in enumerate(dims) if not isinstance(d, int) and str(d) not in known]
        if len(wild) > 1:
            return False
        if not wild:
            groups = self._take(dims, atoms)
            if groups is None or atoms:
                return False
        else:
            w = wild[0]
            head = self._take(dims[:w], atoms)
            rest = [(n, d) for n, d in reversed(atoms)]
            tail = self._take(dims[w + 1 :][::-1], rest, split=False)
            if head is None or tail is None or not rest:
                return False
            groups = [*head, list(reversed(rest)), *[g[::-1] for g in tail[::-1]]]
        self.groups = groups
        return True

    def _take(
        self, dims: list[int | ir.SymbolicDim], atoms: list[Atom], split: bool = True
    ) -> list[list[Atom]] | None:
        """Consume ``atoms`` (in place) into one group per dim; None when they do not fit."""
        groups: list[list[Atom]] = []
        for d in dims:
            if d == 1:
                groups.append([])
                continue
            cur: list[Atom] = []
            while True:
                n, syms = self._size(cur)
                if cur and (
                    (isinstance(d, int) and not syms and n == d)
                    or (not isinstance(d, int) and n == 1 and syms == [str(d)])
                ):
                    break
                if not atoms:
                    return None
                a = atoms.pop(0)
                # Split the projection axis c into (heads, head size) when d divides it.
                if (
                    split
                    and a[0] == "c"
                    and isinstance(d, int)
                    and isinstance(a[1], int)
                    and not cur
                    and a[1] > d
                ):
                    if a[1] % d:
                        return None
                    atoms.insert(0, ("c1", a[1] // d))
                    a = ("c0", d)
                cur.append(a)
                n, syms = self._size(cur)
                if isinstance(d, int) and (syms or n > d):
                    return None
            groups.append(cur)
        return groups

    def names(self) -> list[list[str]]:
        return [[a[0] for a in g if a[1] != 1] for g in self.groups]


@dataclasses.dataclass
class _Rope:
    node: ir.Node
    position_ids: ir.Value
    cos: ir.Value
    sin: ir.Value


@dataclasses.dataclass
class _Side:
    """One of q, k, v: its ``[B, S, N·Dh]`` projection, head count, and the RoPE on the way."""

    proj: ir.Value
    heads: int
    head_size: int
    rope: _Rope | None
    scale: float
    past: ir.Value | None = None  # the past input a KV cache concatenates before the new tokens
    present: ir.Value | None = None  # Concat(past, new): the present output


def _cache_concat(node: ir.Node) -> ir.Value | None:
    """The past graph input of ``Concat(past, new, axis=2)`` on ``[B, N, S, D]`` tensors, else None."""
    if not is_op(node, "Concat") or len(node.inputs) != 2 or rank(node.outputs[0]) != 4:
        return None
    if node.attributes.get_int("axis", 0) not in (2, -2):
        return None
    past = node.inputs[0]
    if past is None or not past.is_graph_input() or rank(past) != 4:
        return None
    return past


def _rope(node: ir.Node) -> _Rope | None:
    if node.domain != MS_DOMAIN or node.op_type != "RotaryEmbedding" or len(node.inputs) != 4:
        return None
    if (
        node.attributes.get_int("interleaved", 0) != 0
        or node.attributes.get_int("rotary_embedding_dim", 0) != 0
    ):
        return None
    x, pos, cos, sin = node.inputs
    if x is None or pos is None or cos is None or sin is None:
        return None
    return _Rope(node, pos, cos, sin)


def _side(value: ir.Value, expected: list[list[str]]) -> _Side | None:
    """Walk back from ``value`` through layout ops (and at most one RoPE, applied on
    ``[B, N, S, Dh]``) to a rank-3 projection; accept when the layout ends as ``expected``
    (atoms: b, s, c0 = heads, c1 = head size, g = the repeat axis)."""
    chain: list[ir.Node] = []
    rope: _Rope | None = None
    concat: ir.Node | None = None
    cur = value
    for _ in range(16):
        node = cur.producer()
        if node is None:
            break
        r = _rope(node) if rope is None else None
        if r is not None:
            rope = r
        elif concat is None and rope is None and _cache_concat(node) is not None:
            concat = node
            chain.append(node)
            cur = node.inputs[1]  # type: ignore[assignment]
            continue
        elif not is_op(node, *_LAYOUT_OPS) or node.inputs[0] is None:
            break
        elif node.op_type in ("Mul", "Div") and scalar(node.inputs[1], cur) is None:
            break
        chain.append(node)
        cur = node.inputs[0]  # type: ignore[assignment]
    if rank(cur) != 3 or cur.shape is None or not chain:
        return None
    layout = _Layout(cur)
    for node in reversed(chain):
        if rope is not None and node is rope.node:
            if layout.names() != [["b"], ["c0"], ["s"], ["c1"]]:
                return None
            continue
        if not layout.apply(node, node.outputs[0]):
            return None
    if layout.names() != expected:
        return None
    sizes = {a[0]: a[1] for g in layout.groups for a in g}
    heads, head = sizes.get("c0"), sizes.get("c1")
    if not isinstance(heads, int) or not isinstance(head, int):
        return None
    if concat is not None:
        return _Side(cur, heads, head, rope, layout.scale, concat.inputs[0], concat.outputs[0])
    return _Side(cur, heads, head, rope, layout.scale)


@dataclasses.dataclass
class _Match:
    q: _Side
    k: _Side
    v: _Side
    group: int
    mask: ir.Value
    additive: bool
    output: ir.Value  # the [B, S, H·Dh] value GroupQueryAttention's output replaces
    final: ir.Node


def _match(sm: ir.Node) -> _Match | str:
    """The attention around Softmax ``sm``; a reason string when it is not the supported form."""
    if rank(sm.inputs[0]) != 4 or sm.attributes.get_int("axis", -1) not in (-1, 3):
        return "Softmax is not over the last axis of a rank-4 tensor"
    probs = sm.outputs[0]
    users = [u.node for u in probs.uses()]
    if len(users) == 2 and {n.op_type for n in users} == {"IsNaN", "Where"}:
        isnan = next(n for n in users if n.op_type == "IsNaN")
        where = next(n for n in users if n.op_type == "Where")
        zero = constant_array(where.inputs[1])
        if (
            where.inputs[0] is not isnan.outputs[0]
            or where.inputs[2] is not probs
            or zero is None
            or np.any(zero)
        ):
            return "Softmax guard is not Where(IsNaN(p), 0, p)"
        probs = where.outputs[0]
        users = [u.node for u in probs.uses()]
    if len(users) != 1 or not is_op(users[0], "MatMul") or users[0].inputs[0] is not probs:
        return "Softmax output does not feed one MatMul with V"
    pv = users[0]
    att = pv.outputs[0]
    if att.shape is None or len(att.shape) != 4:
        return "attention output rank is not 4"
    # Back to [B, S, H·Dh] through single-use Reshape/Transpose (heads merged after the transpose).
    layout, out, final = _Layout(att, "bhsd"), att, None
    for _ in range(4):
        if layout.names() == [["b"], ["s"], ["h", "d"]]:
            break
        uses = list(out.uses())
        nxt = uses[0].node if len(uses) == 1 and not out.is_graph_output() else None
        if not is_op(nxt, "Reshape", "Transpose") or not layout.apply(nxt, nxt.outputs[0]):  # type: ignore[union-attr,arg-type]
            return "attention output is not merged back to [B, S, H·Dh]"
        final, out = nxt, nxt.outputs[0]  # type: ignore[union-attr]
    if final is None or layout.names() != [["b"], ["s"], ["h", "d"]]:
        return "attention output is not merged back to [B, S, H·Dh]"

    x = sm.inputs[0]
    mask: ir.Value | None = None
    additive = True
    node = x.producer() if x is not None else None
    scores = None
    if is_op(node, "Add"):
        for a, m in (node.inputs, node.inputs[::-1]):  # type: ignore[union-attr]
            p = a.producer() if a is not None else None
            if is_op(p, "MatMul", "Mul", "Div"):
                scores, mask = a, m
                break
    elif is_op(node, "Where"):
        c, a, neg = node.inputs  # type: ignore[union-attr]
        big = scalar(neg, a) if a is not None else None
        if big is not None and big <= BLOCKED:
            scores, mask, additive = a, c, False
    if scores is None or mask is None:
        return "no mask before Softmax (not causal attention)"
    scale = 1.0
    mm = scores.producer()
    while is_op(mm, "Mul", "Div"):
        c = scalar(mm.inputs[1], scores) if mm is not None and len(mm.inputs) == 2 else None
        if c is None or c == 0 or mm is None or mm.inputs[0] is None:
            return "scores scaled by a non-constant"
        scale *= c if mm.op_type == "Mul" else 1.0 / c
        scores = mm.inputs[0]
        mm = scores.producer()  # type: ignore[union-attr]
    if not is_op(mm, "MatMul"):
        return "scores are not a MatMul"
    q = _side(mm.inputs[0], [["b"], ["c0"], ["s"], ["c1"]])  # type: ignore[union-attr,arg-type]
    if q is None:
        return "query is not a head split of a [B, S, H·Dh] projection"
    for group_layout in ([["b"], ["c0", "g"], ["c1"], ["s"]], [["b"], ["c0"], ["c1"], ["s"]]):
        k = _side(mm.inputs[1], group_layout)  # type: ignore[union-attr,arg-type]
        v_layout = [group_layout[0], group_layout[1], group_layout[3], group_layout[2]]
        v = _side(pv.inputs[1], v_layout)  # type: ignore[arg-type]
        if k is not None and v is not None:
            break
    else:
        return "key/value are not head splits of projections repeated to the query heads"
    if k.head_size != q.head_size or v.head_size != q.head_size or k.heads != v.heads:
        return "head sizes differ"
    if q.heads % k.heads:
        return "query heads are not a multiple of the key/value heads"
    if q.head_size % 8:
        return f"head size {q.head_size} is not a multiple of 8 (the kernel refuses it at run time)"
    if v.rope is not None or (q.rope is None) != (k.rope is None):
        return "rotary embedding on only one of q, k (or on v)"
    if v.scale != 1.0:
        return "value is scaled"
    if q.past is not None or (k.past is None) != (v.past is None):
        return "the KV cache is concatenated on only one of key and value (or on the query)"
    if k.past is not None and v.past is not None:
        if k.past.dtype != k.proj.dtype or v.past.dtype != v.proj.dtype:
            return "past and new keys/values differ in dtype"
        if not all(same_dim(a, b) for a, b in zip(k.past.shape, v.past.shape)):  # type: ignore[arg-type]
            return "past key and past value differ in shape"
        if (
            k.past.shape[1] != k.heads  # type: ignore[index]
            or k.past.shape[3] != k.head_size  # type: ignore[index]
            or not same_dim(k.past.shape[0], k.proj.shape[0])  # type: ignore[index]
        ):
            return "past key is not [B, kv heads, past, head size]"
    for side in (q, k, v):
        if not all(same_dim(side.proj.shape[i], q.proj.shape[i]) for i in (0, 1)):  # type: ignore[index]
            return "q, k, v projections differ in batch or sequence (cross-attention or a cache)"
    oshape = out.shape
    if (
        oshape is None
        or len(oshape) != 3
        or not same_dim(oshape[0], q.proj.shape[0])  # type: ignore[index]
        or not same_dim(oshape[1], q.proj.shape[1])  # type: ignore[index]
        or oshape[2] != q.heads * q.head_size
    ):
        return "attention output is not reshaped to [B, S, H·Dh]"
    if q.proj.dtype not in _GQA_TYPES or {k.proj.dtype, v.proj.dtype, out.dtype} != {q.proj.dtype}:
        return f"dtype {q.proj.dtype} has no GroupQueryAttention CPU kernel"
    q.scale *= scale * k.scale
    return _Match(q, k, v, q.heads // k.heads, mask, additive, out, final)  # type: ignore[arg-type]


#: :func:`_rotary_caches`' answer when the RoPE stays outside GroupQueryAttention (do_rotary=0).
_OUTSIDE = "outside"


def _rotary_caches(m: _Match) -> tuple[ir.Value, ir.Value] | None | str:
    """(cos, sin) caches for do_rotary, None without RoPE; :data:`_OUTSIDE` when q and k share one
    RoPE whose positions are not 0..S-1 (e.g. a position_ids input of a KV-cache export: the kernel
    would compute positions from the lengths, an assumption about the caller the graph does not
    make), a reason when the RoPE cannot be kept."""
    qr, kr = m.q.rope, m.k.rope
    if qr is None or kr is None:
        return None
    if qr.position_ids is not kr.position_ids or qr.cos is not kr.cos or qr.sin is not kr.sin:
        pos_q, pos_k = constant_array(qr.position_ids), constant_array(kr.position_ids)
        if pos_q is None or pos_k is None or not np.array_equal(pos_q, pos_k):
            return "q and k rotary use different positions"
        for a, b in ((qr.cos, kr.cos), (qr.sin, kr.sin)):
            x, y = constant_array(a), constant_array(b)
            if x is None or y is None or not np.array_equal(x, y):
                return "q and k rotary use different caches"
    pos = constant_array(qr.position_ids)
    if pos is None or pos.size != 1 or int(pos.reshape(-1)[0]) != 0:
        same = qr.position_ids is kr.position_ids and qr.cos is kr.cos and qr.sin is kr.sin
        return (
            _OUTSIDE if same and _plain_rope(qr.node) and _plain_rope(kr.node) else "rotary positions differ"
        )
    cos, sin = constant_array(qr.cos), constant_array(qr.sin)
    if cos is None or sin is None or cos.ndim != 2 or cos.shape != sin.shape:
        return "rotary caches are not constant [max positions, Dh/2]"
    if 2 * cos.shape[1] != m.q.head_size or qr.cos.dtype != m.q.proj.dtype:
        return "rotary does not cover the whole head in the projection's dtype"
    return qr.cos, qr.sin


def _plain_rope(node: ir.Node) -> bool:
    """A RotaryEmbedding that computes the same on ``[B, S, N·D]`` (given num_heads) as on ``[B, N, S, D]``."""
    known = {"interleaved", "num_heads", "rotary_embedding_dim", "scale", "is_packed_batching"}
    attrs = node.attributes
    return (
        set(attrs) <= known
        and attrs.get_int("is_packed_batching", 0) == 0
        and attrs.get_float("scale", 1.0) == 1.0
    )


def _rope_outside(side: _Side, model: ir.Model, before: ir.Node) -> ir.Value:
    """``side``'s RoPE moved onto its ``[B, S, N·D]`` projection (what GroupQueryAttention reads)."""
    r = side.rope
    assert r is not None
    node = ir.node(
        "RotaryEmbedding",
        [side.proj, r.position_ids, r.cos, r.sin],
        {"interleaved": 0, "num_heads": side.heads},
        domain=MS_DOMAIN,
        name=f"{r.node.name}_bsd" if r.node.name else None,
    )
    node.outputs[0].type, node.outputs[0].shape = side.proj.type, side.proj.shape
    model.graph.insert_before(before, node)
    return node.outputs[0]


def fuse_group_query_attention(model: ir.Model, padding_inputs: frozenset[str] = frozenset()) -> int:
    """Rewrite every provably causal decoder self-attention to GroupQueryAttention (see the module
    docstring); ``padding_inputs`` names the inputs that follow its padding convention."""
    prover = prove_causal_mask(model, padding_inputs)
    lengths = Lengths(model)
    count = 0
    for sm in list(graph_nodes(model)):
        if sm.graph is not model.graph or not is_op(sm, "Softmax") or sm.inputs[0] is None:
            continue
        m = _match(sm)
        if isinstance(m, str):
            logger.debug("gqa: %s skipped: %s", sm.name, m)
            continue
        if not math.isfinite(m.q.scale) or m.q.scale <= 0:
            continue
        caches = _rotary_caches(m)
        if isinstance(caches, str) and caches != _OUTSIDE:
            logger.debug("gqa: %s skipped: %s", sm.name, caches)
            continue
        proof = prover.prove(m.mask, m.additive, m.q.proj, m.k.past)
        if isinstance(proof, str):
            logger.debug("gqa: %s skipped: %s", sm.name, proof)
            continue
        lens = lengths.get(m.q.proj, m.k.past is not None, proof, m.final)
        if isinstance(lens, str):
            logger.debug("gqa: %s skipped: %s", sm.name, lens)
            continue
        q, k = m.q.proj, m.k.proj
        if isinstance(caches, str):  # _OUTSIDE
            q, k = _rope_outside(m.q, model, m.final), _rope_outside(m.k, model, m.final)
            caches = None
        inputs: list[ir.Value | None] = [q, k, m.v.proj, m.k.past, m.v.past, *lens]
        if caches is not None:
            inputs += list(caches)
        attrs = {
            "num_heads": m.q.heads,
            "kv_num_heads": m.k.heads,
            "scale": float(m.q.scale),
            "do_rotary": int(caches is not None),
            "rotary_interleaved": 0,
        }
        if proof.window > 0:
            attrs["local_window_size"] = proof.window
        node = ir.node(
            "GroupQueryAttention", inputs, attrs, domain=MS_DOMAIN, name=m.final.name, num_outputs=3
        )
        out = node.outputs[0]
        out.type, out.shape = m.output.type, m.output.shape
        model.graph.insert_before(m.final, node)
        take_place(m.output, out)
        for old, new in ((m.k.present, node.outputs[1]), (m.v.present, node.outputs[2])):
            if old is not None:
                new.type, new.shape = old.type, old.shape
                take_place(old, new)
        add_contrib_opset(model)
        count += 1
    if count:
        # The replaced attention is dead now; drop it so later rules see single-use projections.
        import onnx_ir.passes.common as common

        common.RemoveUnusedNodesPass()(model)
    return count
