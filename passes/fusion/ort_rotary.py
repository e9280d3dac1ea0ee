"""Rotary embeddings of transformers ≥ 5 → ``com.microsoft.RotaryEmbedding`` with a cos/sin cache.

Why onnxscript misses them: its ``cos-sin-cache`` rule (``ort_fusions/cos_sin_cache.py``) expects
transformers 4's angles, ``Transpose(MatMul(inv_freq[1,E,1], Cast(Unsqueeze(positions))), [0,2,1])``;
transformers 5 computes ``position_ids[..., None].float() * inv_freq``, which exports as
``Mul(Cast(Unsqueeze(positions)), inv_freq[E])`` already in ``[B, S, E]`` layout (MatchingTracer:
"OpType mismatch: expected Transpose, got Mul"), and onnxscript's ``rotary-embedding`` then leaves
private ``ai.onnxruntime._fusion.RotaryEmbedding`` nodes that ``fuse-ort`` inlines back. The
matched forms are in :func:`fuse_rotary_embedding`, the cache in :class:`_Builder`. Per-batch
``[B, S]`` positions (a ``position_ids`` input, as KV-cache exports have) get a cache computed at run
time, one row per token: nothing bounds them for a constant cache. Static-shape exports
fold the whole angle computation into constant ``[1, 1, S, head]`` tables; those become the cache
directly (row s multiplies token s, whatever the angles).
"""

from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np
import onnx_ir as ir

from ..ir_helpers import MS_DOMAIN, graph_nodes, opset_guarded, rank, unique_name
from ..ir_helpers import constant_array as constant
from .matching import PRIVATE_DOMAIN, is_op, other, producer, replace_with, same_dim, scalar, single_use

logger = logging.getLogger("graphopt.passes.fusion")

__all__ = ["fuse_rotary_embedding", "sequence_bounds"]

#: Graph metadata the torch exporter writes: the value range of every symbolic dim.
RANGE_CONSTRAINTS_KEY = "pkg.torch.export.ExportedProgram.range_constraints"
#: Largest constant cache (elements per table); above it the cache is computed at run time.
MAX_CACHE_ELEMENTS = 1 << 22
_ROPE_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16})  # the CPU kernel's types
_INT_TYPES = frozenset({ir.DataType.INT64, ir.DataType.INT32})


def sequence_bounds(model: ir.Model) -> dict[str, int]:
    """Upper bounds of symbolic dims from the exporter's range constraints (finite ones only)."""
    text = model.graph.metadata_props.get(RANGE_CONSTRAINTS_KEY) or model.metadata_props.get(
        RANGE_CONSTRAINTS_KEY
    )
    if not text:
        return {}
    out = {}
    for name, hi in re.findall(r"([A-Za-z_][\w.]*)\s*:\s*VR\[\s*[^,\]]+,\s*([^\]\s]+)\s*\]", text):
        if re.fullmatch(r"\d+", hi):
            out[name] = int(hi)
    return out


def _ints(value: ir.Value | None) -> list[int] | None:
    arr = constant(value)
    if arr is None or arr.dtype.kind not in "iu" or arr.ndim > 1:
        return None
    return [int(v) for v in arr.reshape(-1)]


def _axes(node: ir.Node) -> list[int] | None:
    """Unsqueeze axes: input (opset ≥ 13) or attribute."""
    if len(node.inputs) > 1:
        return _ints(node.inputs[1])
    attr = node.attributes.get("axes")
    return None if attr is None else [int(a) for a in attr.as_ints()]


def _normalized(axes: list[int], out_rank: int) -> set[int] | None:
    norm = {a + out_rank if a < 0 else a for a in axes}
    return norm if len(norm) == len(axes) and all(0 <= a < out_rank for a in norm) else None


def _unsqueezed_layout(steps: list[list[int]]) -> list[bool] | None:
    """Where a 1-D tensor's axis ends up after Unsqueezes applied in order (True marks it)."""
    layout = [True]
    for axes in steps:
        norm = _normalized(axes, len(layout) + len(axes))
        if norm is None:
            return None
        it = iter(layout)
        layout = [False if i in norm else next(it) for i in range(len(layout) + len(axes))]
    return layout


@dataclasses.dataclass
class _Trig:
    fn: ir.Node  # the Cos/Sin node
    emb: ir.Value  # its input, Concat(freqs, freqs)
    scale: float  # a constant factor after Cos/Sin (transformers' attention_scaling), 1.0 if none
    dtype: ir.DataType  # dtype of the table the rotation multiplies by (after an optional Cast)


def _trig(v4d: ir.Value, fn_type: str) -> _Trig | None:
    """``Unsqueeze([Cast](fn(emb)·[scale]), [1])``."""
    u = producer(v4d, "Unsqueeze")
    if u is None or rank(v4d) != 4 or _normalized(_axes(u) or [], 4) != {1}:
        return None
    t = u.inputs[0]
    dtype = t.dtype  # type: ignore[union-attr]
    cast = producer(t, "Cast")
    if cast is not None:
        t = cast.inputs[0]
    scale = 1.0
    mul = producer(t, "Mul")
    if mul is not None:
        for a, c in (mul.inputs, mul.inputs[::-1]):
            s = scalar(c, a)  # type: ignore[arg-type]
            if s is not None and producer(a, fn_type) is not None:
                t, scale = a, s
                break
        else:
            return None
    fn = producer(t, fn_type)
    if fn is None or dtype is None:
        return None
    return _Trig(fn, fn.inputs[0], scale, dtype)  # type: ignore[arg-type]


@dataclasses.dataclass
class _Freqs:
    freqs: ir.Value  # [1, S, E] = positions · inv_freq
    producer: ir.Node  # the Mul
    inv_freq: np.ndarray  # [E] float32
    positions: ir.Value  # 1-D integer [S]


def _freqs(emb: ir.Value) -> _Freqs | str:
    """The angles behind ``emb``; a reason string when they are not the supported form."""
    cat = producer(emb, "Concat")
    if cat is None or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1]:
        return "emb is not Concat(freqs, freqs)"
    freqs = cat.inputs[0]
    if rank(freqs) != 3 or cat.attributes.get_int("axis", 0) not in (-1, 2):  # type: ignore[arg-type]
        return "emb is not a rank-3 concatenation on the last axis"
    mul = producer(freqs, "Mul")
    if mul is None:
        return "freqs is not a Mul (transformers 4's MatMul form is onnxscript's cos-sin-cache)"
    for a, inv in (mul.inputs, mul.inputs[::-1]):
        arr = constant(inv)
        if arr is None or arr.dtype != np.float32 or arr.ndim == 0 or arr.ndim > 3:
            continue
        if any(d != 1 for d in arr.shape[:-1]):
            continue
        # One Cast(…, float) and one or more Unsqueezes, in any order, lead back to the integer
        # positions (transformers 5 without an attention mask unsqueezes twice: [S] → [1, S] → [1, S, 1]).
        cur, cast_seen, unsqueezes = a, False, []
        for _ in range(4):
            node = producer(cur, "Cast", "Unsqueeze")
            if node is None:
                break
            if node.op_type == "Cast":
                if cast_seen or node.attributes.get_int("to", 0) != ir.DataType.FLOAT:
                    return "positions are not cast to float"
                cast_seen = True
            else:
                axes = _axes(node)
                if axes is None:
                    return "Unsqueeze axes are not constant"
                unsqueezes.append(axes)
            cur = node.inputs[0]
        if not cast_seen or not unsqueezes or cur is None or cur.dtype not in _INT_TYPES:
            return "angles are not Cast(Unsqueeze(integer positions)) · inv_freq"
        if rank(cur) == 2 and len(unsqueezes) == 1:
            # Per-batch positions [B, S] (a position_ids input, e.g. with a KV cache) → [B, S, E].
            if _normalized(unsqueezes[0], 3) != {2}:
                return "per-batch positions are not unsqueezed to [B, S, 1]"
            return _Freqs(freqs, mul, arr.reshape(-1).astype(np.float32), cur)  # type: ignore[arg-type]
        if rank(cur) != 1 or _unsqueezed_layout(unsqueezes[::-1]) != [False, True, False]:
            return "positions are not 1-D, unsqueezed to [1, S, 1]"
        return _Freqs(freqs, mul, arr.reshape(-1).astype(np.float32), cur)  # type: ignore[arg-type]
    return "no constant float32 inv_freq of shape [..., E] in the angle Mul"


@dataclasses.dataclass
class _Site:
    x: ir.Value
    nodes: list[ir.Node]  # the nodes the RotaryEmbedding replaces; the last is the final Add
    cos: _Trig | None  # the computed tables, or None when ``table`` holds constant ones
    sin: _Trig | None
    #: Constant cos/sin caches ``[S, h]`` read off constant ``[.., S, 2h]`` tables (static-shape
    #: exports fold the whole angle computation), row s for token s.
    table: tuple[np.ndarray, np.ndarray] | None = None


def _constant_tables(cos4d: ir.Value, sin4d: ir.Value, x: ir.Value) -> tuple[np.ndarray, np.ndarray] | None:
    """``[S, h]`` caches when ``cos4d``/``sin4d`` are constants ``[1, 1, S, 2h]`` (or ``[1, S, 2h]``,
    ``[S, 2h]``) whose two halves are equal (rotate-half tables) and S is x's static sequence length.

    Row s of the table multiplies token s, so RotaryEmbedding with position_ids ``[0]`` (rows 0..S-1)
    computes exactly what the graph does, whatever angles the table holds."""
    seq, head = x.shape[2], x.shape[3]  # type: ignore[index]
    if not isinstance(seq, int) or not isinstance(head, int) or x.dtype not in _ROPE_TYPES:
        return None
    out = []
    for v in (cos4d, sin4d):
        arr = constant(v)
        if arr is None or arr.dtype != x.dtype.numpy() or not 2 <= arr.ndim <= 4:  # type: ignore[union-attr]
            return None
        if arr.shape[-2:] != (seq, head) or any(d != 1 for d in arr.shape[:-2]):
            return None
        arr = arr.reshape(seq, head)
        h = head // 2
        if not np.array_equal(arr[:, :h], arr[:, h:]):
            return None
        out.append(np.ascontiguousarray(arr[:, :h]))
    return out[0], out[1]


def _slice(node: ir.Node | None, x: ir.Value) -> tuple[int, int] | None:
    """(start, end) of a step-1 Slice of ``x`` on its last axis."""
    if node is None or node.inputs[0] is not x or not 3 <= len(node.inputs) <= 5:
        return None
    starts, ends = _ints(node.inputs[1]), _ints(node.inputs[2])
    axes = _ints(node.inputs[3]) if len(node.inputs) > 3 else None
    steps = _ints(node.inputs[4]) if len(node.inputs) > 4 else [1]
    if starts is None or ends is None or axes is None or steps != [1] or len(starts) != 1 or len(ends) != 1:
        return None
    if _normalized(axes, 4) != {3}:
        return None
    return starts[0], ends[0]


def _match_site(neg: ir.Node) -> _Site | None:
    """``x·cos4d + Concat(-x[..., h:], x[..., :h])·sin4d`` around the ``Neg``."""
    s2 = producer(neg.inputs[0], "Slice")
    if s2 is None or not single_use(neg.inputs[0]):
        return None
    x = s2.inputs[0]
    if x is None or rank(x) != 4:
        return None
    heads, head = x.shape[1], x.shape[3]  # type: ignore[index]
    if not isinstance(heads, int) or not isinstance(head, int) or head % 2:
        return None
    h = head // 2
    neg_out = neg.outputs[0]
    if not single_use(neg_out):
        return None
    rot = neg_out.uses()[0].node
    if not is_op(rot, "Concat") or len(rot.inputs) != 2 or rot.inputs[0] is not neg_out:
        return None
    if rot.attributes.get_int("axis", 0) not in (-1, 3):
        return None
    s1 = producer(rot.inputs[1], "Slice")
    b1, b2 = _slice(s1, x), _slice(s2, x)
    if b1 != (0, h) or b2 is None or b2[0] != h or b2[1] < head or not single_use(rot.inputs[1]):
        return None
    rot_out = rot.outputs[0]
    if not single_use(rot_out):
        return None
    m2 = rot_out.uses()[0].node
    sin4d = other(m2, rot_out) if is_op(m2, "Mul") else None
    if sin4d is None or not single_use(m2.outputs[0]):
        return None
    add = m2.outputs[0].uses()[0].node
    m1_out = other(add, m2.outputs[0]) if is_op(add, "Add") else None
    m1 = producer(m1_out, "Mul")
    if m1 is None or not single_use(m1_out):
        return None
    cos4d = other(m1, x)
    if cos4d is None:
        return None
    nodes = [s1, s2, neg, rot, m2, m1, add]
    if any(n.graph is not add.graph for n in nodes):  # type: ignore[union-attr]
        return None
    cos, sin = _trig(cos4d, "Cos"), _trig(sin4d, "Sin")
    if cos is None or sin is None:
        table = _constant_tables(cos4d, sin4d, x)
        return None if table is None else _Site(x, nodes, None, None, table)  # type: ignore[arg-type]
    return _Site(x, nodes, cos, sin)  # type: ignore[arg-type]


def _why_not(site: _Site, f: _Freqs | str) -> str | None:
    """None when the site and its angles fit RotaryEmbedding; else the reason."""
    if isinstance(f, str):
        return f
    x, cos, sin = site.x, site.cos, site.sin
    assert cos is not None and sin is not None
    if cos.emb is not sin.emb or cos.scale != sin.scale or cos.dtype != sin.dtype:
        return "cos and sin tables are not computed alike"
    if x.dtype not in _ROPE_TYPES or cos.dtype != x.dtype:
        return f"dtype {x.dtype} (table {cos.dtype}) has no RotaryEmbedding CPU kernel"
    if 2 * f.inv_freq.size != x.shape[3]:  # type: ignore[index]
        return "rotation is not over the whole head (2·E != head size)"
    pos_shape = f.positions.shape
    assert pos_shape is not None
    if not same_dim(pos_shape[-1], x.shape[2]):  # type: ignore[index]
        return "positions are not one per token of x"
    if len(pos_shape) == 2 and not same_dim(pos_shape[0], x.shape[0]):  # type: ignore[index]
        return "per-batch positions are not one row per batch row of x"
    return None


class _Builder:
    """Creates (once per angle table) the position ids and cos/sin caches.

    The op reads cache row ``position_ids[0] + s`` for token ``s`` (position_ids of one element) or
    ``position_ids[b, s]`` (``[B, S]``); a ``[1, S]`` tensor is rejected when the batch is > 1, so batch-
    shared positions are passed as the one-element form. Two ways to build the cache:

    * **constant** (what onnxscript does when it knows the largest position): ``p = Range(0, S, 1)`` and
      the sequence length has a known bound ``N`` (a static dim, or the exporter's range constraint
      ``pkg.torch.export.ExportedProgram.range_constraints``, i.e. the ``Dim(max=…)`` of the export,
      normally ``max_position_embeddings``). The cache has ``N`` rows computed in float32 like the
      graph; position_ids = ``[0]``. A longer sequence fails loudly in the kernel ("sequence_length >
      max_sequence_length"), it is never read out of bounds.
    * **computed** (any other batch-shared positions, e.g. ``Range(past, past+S)``, or no bound): the
      cache is ``Cos``/``Sin`` of ``freqs`` reshaped to ``[S, E]`` (row s = position p[s]), with
      position_ids = ``[0]``. Exact for any position values. Per-batch positions ``[B, S]`` likewise
      get ``[B·S, E]`` rows, read through position_ids ``Reshape(Range(0, B·S), [B, S])``.
    """

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self.bounds = sequence_bounds(model)
        self.names: set[str] = set()  # filled by unique_name on first use
        self.cache: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}
        self.position_ids: ir.Value | None = None
        self.constant: dict[tuple, tuple[ir.Value, ir.Value, ir.Value]] = {}

    def _initializer(self, base: str, array: np.ndarray) -> ir.Value:
        name = unique_name(self.graph, base, self.names)
        value = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=ir.tensor(array, name=name),
        )
        self.graph.register_initializer(value)
        return value

    def _rows(self, site: _Site, f: _Freqs) -> int | None:
        """Rows of a constant cache when positions are 0..S-1 and S has a known bound."""
        rng = producer(f.positions, "Range")
        if rng is None:
            return None
        start, delta = constant(rng.inputs[0]), constant(rng.inputs[2])
        if start is None or delta is None or start.size != 1 or delta.size != 1:
            return None
        if int(start.reshape(-1)[0]) != 0 or int(delta.reshape(-1)[0]) != 1:
            return None
        dim = site.x.shape[2]  # type: ignore[index]
        rows = dim if isinstance(dim, int) else self.bounds.get(getattr(dim, "value", None) or "")
        if rows is None or rows <= 0 or rows * f.inv_freq.size > MAX_CACHE_ELEMENTS:
            return None
        return rows

    def _position_ids(self) -> ir.Value:
        if self.position_ids is None:
            self.position_ids = self._initializer("rotary_position_ids", np.zeros([1], dtype=np.int64))
        return self.position_ids

    def constant_tables(self, table: tuple[np.ndarray, np.ndarray]) -> tuple[ir.Value, ir.Value, ir.Value]:
        """Caches read off constant tables (one pair per distinct table content)."""
        cos, sin = table
        key = (cos.shape, cos.tobytes(), sin.tobytes())
        if key not in self.constant:
            self.constant[key] = (
                self._position_ids(),
                self._initializer("rotary_cos_cache", cos),
                self._initializer("rotary_sin_cache", sin),
            )
        return self.constant[key]

    def tables(self, site: _Site, f: _Freqs) -> tuple[ir.Value, ir.Value, ir.Value]:
        assert site.cos is not None
        key = id(site.cos.emb)
        if key in self.cache:
            return self.cache[key]
        if rank(f.positions) == 2:
            self.cache[key] = self._per_batch(site, f)
            return self.cache[key]
        self._position_ids()
        rows = self._rows(site, f)
        dtype = site.cos.dtype.numpy()
        if rows is not None:
            angles = (
                np.arange(rows, dtype=np.float32)[:, None] * f.inv_freq[None, :]
            )  # float32, like the graph
            tables = []
            for fn in (np.cos, np.sin):
                t = fn(angles.astype(np.float64)).astype(np.float32)
                if site.cos.scale != 1.0:
                    t = t * np.float32(site.cos.scale)
                tables.append(t.astype(dtype))
            cos = self._initializer("rotary_cos_cache", tables[0])
            sin = self._initializer("rotary_sin_cache", tables[1])
        else:
            cos, sin = self._computed(site, f)
        self.cache[key] = (self.position_ids, cos, sin)  # type: ignore[assignment]
        return self.cache[key]

    def _per_batch(self, site: _Site, f: _Freqs) -> tuple[ir.Value, ir.Value, ir.Value]:
        """Cos/Sin rows for every token of per-batch positions, and the ids that read them in order."""
        cos, sin = self._computed(site, f)
        pos = f.positions
        new: list[ir.Node] = []

        def add(op: str, inputs: list[ir.Value], shape: list, attrs: dict | None = None) -> ir.Value:
            node = ir.node(op, inputs, attrs)
            node.outputs[0].dtype, node.outputs[0].shape = ir.DataType.INT64, ir.Shape(shape)
            node.outputs[0].name = unique_name(self.graph, f"rotary_{op.lower()}", self.names)
            new.append(node)
            return node.outputs[0]

        shape = add("Shape", [pos], [2])
        size = add("Size", [pos], [])
        zero = self._initializer("rotary_zero", np.array(0, dtype=np.int64))
        one = self._initializer("rotary_one", np.array(1, dtype=np.int64))
        flat = add("Range", [zero, size, one], [None])
        ids = add("Reshape", [flat, shape], list(pos.shape))  # type: ignore[arg-type]
        f.producer.graph.insert_after(f.producer, new)  # type: ignore[union-attr]
        return ids, cos, sin

    def _computed(self, site: _Site, f: _Freqs) -> tuple[ir.Value, ir.Value]:
        """Cos/Sin of freqs as [S, E] (row s = position p[s]), inserted after the angle Mul."""
        e = f.inv_freq.size
        rows = f.positions.shape[0] if rank(f.positions) == 1 else None  # type: ignore[index]
        shape2d = ir.Shape([rows, e])
        flat = ir.node(
            "Reshape", [f.freqs, self._initializer("rotary_freqs_2d", np.array([-1, e], dtype=np.int64))]
        )
        new = [flat]

        def add(op: str, inputs: list[ir.Value], dtype: ir.DataType, attrs: dict | None = None) -> ir.Value:
            node = ir.node(op, inputs, attrs)
            node.outputs[0].dtype, node.outputs[0].shape = dtype, shape2d
            new.append(node)
            return node.outputs[0]

        flat.outputs[0].dtype, flat.outputs[0].shape = ir.DataType.FLOAT, shape2d
        outs = []
        for fn in ("Cos", "Sin"):
            out = add(fn, [flat.outputs[0]], ir.DataType.FLOAT)
            if site.cos.scale != 1.0:
                scale = self._initializer("rotary_scale", np.array(site.cos.scale, dtype=np.float32))
                out = add("Mul", [out, scale], ir.DataType.FLOAT)
            if site.cos.dtype != ir.DataType.FLOAT:
                out = add("Cast", [out], site.cos.dtype, {"to": site.cos.dtype})
            outs.append(out)
        f.producer.graph.insert_after(f.producer, new)  # type: ignore[union-attr]
        return outs[0], outs[1]


def _match_private(node: ir.Node) -> _Site | None:
    """onnxscript's intermediate ``ai.onnxruntime._fusion.RotaryEmbedding(x, cos4d, sin4d)`` (its
    ``rotary-embedding`` rule checked the rotate-half form; its ``cos-sin-cache`` rule did not fire)."""
    if len(node.inputs) != 3 or None in node.inputs or node.attributes.get_int("interleaved", 0) != 0:
        return None
    x, cos4d, sin4d = node.inputs
    if rank(x) != 4 or not isinstance(x.shape[1], int) or not isinstance(x.shape[3], int):  # type: ignore[union-attr, index]
        return None
    cos, sin = _trig(cos4d, "Cos"), _trig(sin4d, "Sin")  # type: ignore[arg-type]
    if cos is None or sin is None:
        return None
    return _Site(x, [node], cos, sin)  # type: ignore[arg-type]


def fuse_rotary_embedding(model: ir.Model) -> int:
    """Rotary embeddings with Mul-form angles → ``com.microsoft.RotaryEmbedding``: the decomposed
    rotate-half form, or onnxscript's intermediate op when its rotary rule ran first.

    Matches either the decomposed site, starting at the rotate-half ``Neg``, or onnxscript's
    intermediate op ``ai.onnxruntime._fusion.RotaryEmbedding(x, cos4d, sin4d)`` for the same site (when
    onnxscript's ``rotary-embedding`` ran first), so it works wherever ``fuse-ort`` places it::

        x·Unsqueeze(cos, 1) + Concat(-x[..., h:], x[..., :h])·Unsqueeze(sin, 1)      x: [B, heads, S, 2h]
        cos, sin = [Cast](Cos(emb)·[scale]), [Cast](Sin(emb)·[scale])     emb = Concat(freqs, freqs, -1)
        freqs = Cast(Unsqueeze(p, [0, 2]), float) · inv_freq               p: 1-D positions [S]

    (positions may be unsqueezed in more than one step), or cos/sin that are constant rotate-half
    tables (both halves equal) of x's static sequence length, and emits
    ``RotaryEmbedding(x, position_ids, cos_cache, sin_cache, interleaved=0, num_heads=x.shape[1])``.

    Per-batch positions (``[B, S]``, e.g. a ``position_ids`` input) never get a constant cache: the
    kernel does not bound-check position ids, so it would be read out of bounds for positions past
    its end, and nothing in the graph bounds them. They get a computed one (see :class:`_Builder`).
    """
    builder: _Builder | None = None
    count = 0
    for node in graph_nodes(model):
        if node.graph is not model.graph:
            continue
        if is_op(node, "Neg") and len(node.inputs) == 1:
            site = _match_site(node)
        elif node.domain == PRIVATE_DOMAIN and node.op_type == "RotaryEmbedding":
            site = _match_private(node)
        else:
            continue
        if site is None:
            continue
        builder = builder or _Builder(model)
        if site.table is not None:
            position_ids, cos, sin = builder.constant_tables(site.table)
        else:
            assert site.cos is not None
            f = _freqs(site.cos.emb)
            reason = _why_not(site, f)
            if reason is not None:
                logger.debug("rotary-embedding-mul: %s skipped: %s", site.nodes[-1].name, reason)
                continue
            assert isinstance(f, _Freqs)
            position_ids, cos, sin = builder.tables(site, f)
        final = site.nodes[-1]
        rope = ir.node(
            "RotaryEmbedding",
            [site.x, position_ids, cos, sin],
            {"interleaved": 0, "num_heads": int(site.x.shape[1])},  # type: ignore[index, arg-type]
            domain=MS_DOMAIN,
            name=final.name,
        )
        count += replace_with(model, final, rope, site.nodes)
    return count


def fuse_cos_sin_cache_then_cse(model: ir.Model) -> int:
    """onnxscript's ``cos-sin-cache`` rule (transformers 4's MatMul-form angles), then CSE.

    Each layer's rotary embedding gets its own copy of the cache; CSE merges them so that the
    partial-rotary rule after it sees one shared cache (as ``fuse_xformers`` does).
    """
    import onnx_ir.passes.common as common
    from onnxscript.rewriter.ort_fusions import cos_sin_cache

    n = opset_guarded(cos_sin_cache.cos_sin_cache_rules).apply_to_model(model)
    if n:
        common.CommonSubexpressionEliminationPass()(model)
    return n
