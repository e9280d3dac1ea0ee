"""Proof that a decoder's attention mask is what GroupQueryAttention implements, and the
``seqlens_k`` / ``total_sequence_length`` inputs that stand for it.

GroupQueryAttention has no mask input: it applies causal attention over the first
``seqlens_k[b] + 1`` keys of each batch row (right padding). A rewrite to it is exact only where
the graph's mask allows exactly those keys. Exports build that mask in many ways (transformers 4's
Trilu/Where chain, transformers 5's index comparisons through GatherND and CumSum, or one folded
constant in static-shape exports), so rather than matching one recipe this module *evaluates* the
mask computation (its backward cone, extracted into a small model run on ONNX Runtime) and compares
it with the causal mask entry by entry:

* the cone may read graph inputs only through ``Shape`` (so the mask is a function of the sizes),
  except one input the caller declares as a padding mask that follows GroupQueryAttention's
  convention (``1`` for the first ``L_b`` tokens of row b, ``0`` after: right padding);
* with static shapes the mask is a constant and one evaluation is a proof;
* with symbolic sizes the cone is evaluated at sample sizes that span every integer constant it
  holds (a constant larger than :data:`MAX_WINDOW` makes the check fail: a window that large agrees
  with the causal mask on every size one could afford to evaluate);
* with a padding input, at every sample size for all-ones rows and for right-padded rows; rows of
  padded query tokens are not compared (their outputs are padding, and no valid token attends to
  them);
* over a KV cache (a past-key input whose dim 2 is the past length), at sizes (batch, sequence,
  past) with the padding input spanning past + sequence: prompts, decode steps and chunks after a
  past (right padding is compared for prompts only: after a past, GroupQueryAttention reads row b's
  past as its first ``seqlens_k[b] + 1 - S`` slots, the graph's Concat only when rows are full);
* a sliding window (each query sees its last W keys) is proved like the causal mask: every
  integer constant of the cone up to :data:`MAX_WINDOW` (give or take one) is a candidate W, and
  the sizes go past the largest one; sizes past it where the graph's own mask computation fails
  (an export indexing a window-sized buffer) are sizes the model cannot run at, and are skipped.

An additive mask must hold exactly 0 where attention is allowed and a value at or below
:data:`BLOCKED` (or -inf) where it is not; a boolean mask selects the scores where it is true.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir

from ..ir_helpers import constant_array, model_opset, rank, unique_name
from .matching import same_dim

logger = logging.getLogger("graphopt.passes.fusion")

__all__ = ["MaskProof", "Lengths", "prove_causal_mask", "BLOCKED", "MAX_PROBE", "MAX_WINDOW"]

#: Additive mask entries at or below this block attention (exp underflows to exactly 0 in float32
#: for any score difference a real model produces); transformers uses the dtype's minimum or -inf.
BLOCKED = -1e9
#: Largest integer constant a symbolic-size mask computation may hold; the sample sizes go past it.
MAX_PROBE = 64
#: Largest sliding window recognised (GroupQueryAttention's ``local_window_size``): proving one means
#: evaluating a prompt longer than the window, a ``[W + 3, W + 3]`` mask.
MAX_WINDOW = 4096
#: Largest mask computation evaluated (nodes).
MAX_CONE = 4000
#: Ops a mask computation may use (index arithmetic, comparisons, shapes; no control flow).
_CONE_OPS = frozenset(
    """Abs Add And Cast CastLike Concat Constant ConstantOfShape CumSum Div Equal Expand Flatten Gather
    GatherElements GatherND Greater GreaterOrEqual Identity IsInf IsNaN Less LessOrEqual Max Min Mod
    Mul Neg Not Or Range ReduceMax ReduceMin ReduceSum Reshape Shape Size Slice Squeeze Sub Tile
    Transpose Trilu Unsqueeze Where Xor""".split()
)
_SAMPLE_SIZES = ((1, 1), (2, 1), (1, 2), (2, 3), (3, 5), (2, 8), (1, 13))
#: (batch, sequence, past) samples for attention over a KV cache: prompts (past 0), decode steps and
#: chunks after a past, totals past :data:`MAX_PROBE`.
_CACHE_SIZES = (
    *((b, s, 0) for b, s in _SAMPLE_SIZES),
    (2, MAX_PROBE + 3, 0),
    (1, 1, 1),
    (2, 1, 3),
    (1, 1, 5),
    (2, 2, 4),
    (3, 1, 8),
    (2, 3, 13),
    (1, 1, MAX_PROBE + 2),
    (2, 1, MAX_PROBE + 3),
)


@dataclasses.dataclass(frozen=True)
class MaskProof:
    """The mask is causal (``padding is None``) or causal ∧ the padding input's right-padded rows,
    and, when ``window`` > 0, each query sees only its last ``window`` keys (itself included): what
    GroupQueryAttention's ``local_window_size`` computes (a sliding window, e.g. Mistral's)."""

    padding: ir.Value | None = None
    window: int = -1


def _cone(mask: ir.Value) -> list[ir.Node] | str:
    """The nodes that compute ``mask``, in topological order; a reason when unsupported."""
    seen: set[int] = set()
    order: list[ir.Node] = []
    stack: list[tuple[ir.Node, bool]] = []
    if (p := mask.producer()) is not None:
        stack.append((p, False))
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.domain not in ("", "ai.onnx") or node.op_type not in _CONE_OPS:
            return f"mask computation uses {node.domain or 'ai.onnx'}.{node.op_type}"
        if len(seen) > MAX_CONE:
            return f"mask computation has more than {MAX_CONE} nodes"
        stack.append((node, True))
        for v in node.inputs:
            if v is not None and (q := v.producer()) is not None and id(q) not in seen:
                stack.append((q, False))
    return order


def _sources(cone: list[ir.Node], graph: ir.Graph) -> tuple[list[ir.Value], list[ir.Value]]:
    """(graph inputs, initializers) the cone reads."""
    inputs, inits, seen = [], [], set()
    graph_inputs = {id(v) for v in graph.inputs}
    for node in cone:
        for v in node.inputs:
            if v is None or v.producer() is not None or id(v) in seen:
                continue
            seen.add(id(v))
            (inputs if id(v) in graph_inputs else inits).append(v)
    return inputs, inits


def _extract(model: ir.Model, cone: list[ir.Node], inputs: list[ir.Value], mask: ir.Value) -> bytes:
    """The cone as a standalone model: ``inputs`` in, ``mask`` out."""
    vmap: dict[int, ir.Value] = {}
    new_inputs = []
    for v in inputs:
        nv = ir.Value(name=v.name, shape=v.shape, type=v.type)
        vmap[id(v)] = nv
        new_inputs.append(nv)
    nodes, inits = [], []
    for node in cone:
        args = []
        for v in node.inputs:
            if v is None:
                args.append(None)
                continue
            if id(v) not in vmap:  # an initializer
                nv = ir.Value(name=v.name, shape=v.shape, type=v.type, const_value=v.const_value)
                vmap[id(v)] = nv
                inits.append(nv)
            args.append(vmap[id(v)])
        new = ir.Node(
            node.domain,
            node.op_type,
            args,
            attributes=list(node.attributes.values()),
            num_outputs=len(node.outputs),
            version=node.version,
        )
        for old, nv in zip(node.outputs, new.outputs):
            nv.name, nv.type, nv.shape = old.name, old.type, old.shape
            vmap[id(old)] = nv
        nodes.append(new)
    out = vmap[id(mask)]
    graph = ir.Graph(
        new_inputs,
        [out],
        nodes=nodes,
        initializers=inits,
        opset_imports={"": model.opset_imports.get("", model.opset_imports.get("ai.onnx", 18))},
        name="mask",
    )
    return ir.serde.serialize_model(ir.Model(graph, ir_version=model.ir_version)).SerializeToString()


def _int_constants(cone: list[ir.Node], inits: list[ir.Value]) -> list[int]:
    values = [constant_array(v) for v in inits]
    values += [constant_array(n.outputs[0]) for n in cone if n.op_type == "Constant"]
    out = []
    for arr in values:
        if arr is not None and arr.dtype.kind in "iu" and arr.size <= 64:
            out += [int(x) for x in arr.reshape(-1)]
    return out


def _allowed(mask: np.ndarray, additive: bool) -> np.ndarray | None:
    """Boolean [.., S, T] of allowed entries; None when an additive entry is neither 0 nor blocked."""
    if not additive:
        return mask.astype(bool)
    m = mask.astype(np.float64)
    ok = m == 0
    blocked = m <= BLOCKED
    if not np.all(ok | blocked):
        return None
    return ok


def _expected(
    batch: int, seq: int, total: int, lengths: np.ndarray | None, window: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """(allowed [B, S, T], rows that must match [B, S]) for GroupQueryAttention's semantics: query
    token i sits at position ``T - S + i`` (after the past) and sees keys up to it."""
    past = total - seq
    i = np.arange(seq)[:, None]
    j = np.arange(total)[None, :]
    allowed = j <= i + past
    if window > 0:
        allowed = allowed & (i + past - j < window)
    causal = np.broadcast_to(allowed, (batch, seq, total))
    if lengths is None:
        return causal, np.ones((batch, seq), dtype=bool)
    valid_key = j[None, :, :] < lengths[:, None, None]
    valid_row = (i[None, :, 0] + past) < lengths[:, None]
    return causal & valid_key, valid_row


@dataclasses.dataclass(frozen=True)
class _Dims:
    """The query's symbolic batch/sequence (and the cache's past) dims, and sizes to evaluate at."""

    q_batch: object
    q_seq: object
    q_past: object
    batch: int
    seq: int
    past: int


class _Prover:
    """Evaluates one mask computation at the sample sizes (results cached per mask value)."""

    def __init__(self, model: ir.Model, padding_inputs: frozenset[str]) -> None:
        self.model = model
        self.padding_inputs = padding_inputs
        self.cache: dict[tuple[int, bool, bool], MaskProof | str] = {}

    def prove(
        self, mask: ir.Value, additive: bool, query: ir.Value, past: ir.Value | None = None
    ) -> MaskProof | str:
        key = (id(mask), additive, past is not None)
        if key not in self.cache:
            self.cache[key] = self._prove(mask, additive, query, past)
        return self.cache[key]

    def _prove(
        self, mask: ir.Value, additive: bool, query: ir.Value, past: ir.Value | None
    ) -> MaskProof | str:
        graph = self.model.graph
        if mask.shape is None or rank(mask) not in (2, 3, 4):
            return "mask rank unknown or not 2-4"
        arr = constant_array(mask)
        if arr is not None and past is not None:
            return "constant mask over a KV cache of any length"
        if arr is not None:  # a folded mask: [.., S, T] with static S and T
            return self._check_constant(arr, additive, query)
        cone = _cone(mask)
        if isinstance(cone, str):
            return cone
        inputs, inits = _sources(cone, graph)
        cone_ids = {id(n) for n in cone}
        padding = None
        for v in inputs:
            readers = [u.node for u in v.uses() if id(u.node) in cone_ids]
            if all(n.op_type == "Shape" for n in readers):
                continue
            if v.name not in self.padding_inputs:
                return f"mask depends on the values of input {v.name!r} (not declared a padding mask)"
            if padding is not None or rank(v) != 2:
                return f"padding input {v.name!r} is not the one rank-2 padding mask"
            padding = v
        constants = _int_constants(cone, inits)
        big = [abs(c) for c in constants if MAX_PROBE < abs(c) < 2**31]
        if big and max(big) > MAX_WINDOW:
            return f"mask computation holds constant {max(big)} (a window?) beyond the sizes it can be checked at"
        # A window is one of the cone's constants (give or take one): every candidate is compared
        # at every size, and the sizes go past the largest one.
        windows = [-1] + sorted(
            {
                w
                for c in constants
                if 0 < abs(c) <= MAX_WINDOW
                for w in (abs(c) - 1, abs(c), abs(c) + 1)
                if w > 0
            }
        )
        q_batch, q_seq = query.shape[0], query.shape[1]  # type: ignore[index]
        q_past = past.shape[2] if past is not None and past.shape is not None else None
        if past is not None and (q_past is None or isinstance(q_past, int)):
            return "past length is not a symbolic dim"
        try:
            blob = _extract(self.model, cone, inputs, mask)
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            so.log_severity_level = 3
            session = ort.InferenceSession(blob, so, providers=["CPUExecutionProvider"])
        except Exception as e:  # an op ORT cannot run standalone: no proof
            return f"mask computation could not be evaluated ({type(e).__name__})"
        static = isinstance(q_batch, int) and isinstance(q_seq, int) and past is None
        sizes: list[tuple[int, int, int]]
        if static:
            sizes = [(q_batch, q_seq, 0)]  # type: ignore[list-item]
        elif past is None:
            sizes = [(b, s, 0) for b, s in _SAMPLE_SIZES] + [(2, MAX_PROBE + 3, 0)]
        else:
            sizes = list(_CACHE_SIZES)
        probes = len(sizes)
        if big and not static:
            top = max(big)
            sizes.append((1, top + 3, 0))
            if past is not None:
                sizes += [(1, 1, top + 2), (2, 1, top + 5)]
        failed: dict[int, str] = {}
        rng = np.random.default_rng(0)
        for n, (batch, seq, past_len) in enumerate(sizes):
            if not static and (isinstance(q_batch, int) and batch != q_batch):
                batch = q_batch
            if not static and isinstance(q_seq, int):
                seq = q_seq
            dims = _Dims(q_batch, q_seq, q_past, batch, seq, past_len)
            feeds = self._feeds(inputs, padding, dims)
            if isinstance(feeds, str):
                return feeds
            variants: list[np.ndarray | None] = [None]
            if padding is not None:
                total = feeds[padding.name].shape[1]
                variants = [np.full(batch, total)]
                # Right padding of a prompt. After a past, GroupQueryAttention reads row b's past as
                # its first seqlens_k[b] + 1 - S positions, which is the graph's Concat(past, new)
                # only when every row is full: only all-ones rows are compared there.
                if past_len == 0:
                    variants += [rng.integers(max(1, total - seq + 1), total + 1, batch) for _ in range(2)]
            for lengths in variants:
                if lengths is not None:
                    assert padding is not None
                    row = np.arange(feeds[padding.name].shape[1])[None, :] < lengths[:, None]
                    feeds[padding.name] = row.astype(padding.dtype.numpy())  # type: ignore[union-attr]
                try:
                    (out,) = session.run(None, feeds)
                except Exception as e:
                    if n >= probes:
                        # Past the window the graph's own mask computation fails (an export that
                        # indexes a window-sized buffer): the model cannot run there, so these sizes
                        # constrain nothing.
                        logger.debug("mask computation fails beyond the window: %s", e)
                        break
                    return f"mask computation failed at batch {batch}, sequence {seq}, past {past_len} ({type(e).__name__}: {str(e)[:300]})"
                if past is not None and np.asarray(out).shape[-1] != past_len + seq:
                    return f"mask width is not past + sequence length (batch {batch}, sequence {seq})"
                for w in windows:
                    if w not in failed:
                        reason = self._compare(np.asarray(out), additive, batch, seq, lengths, w)
                        if reason:
                            failed[w] = f"{reason} (batch {batch}, sequence {seq})"
                if len(failed) == len(windows):
                    return failed[-1]
        proved = [w for w in windows if w not in failed]
        if len(proved) > 1 and -1 not in proved:
            return f"mask matches windows {proved} alike (sizes too small to tell)"
        # Several only when the sizes that tell them apart do not run: then each agrees with the
        # graph wherever it runs, and plain causal attention is the simplest.
        return MaskProof(padding, proved[0])

    def _feeds(
        self, inputs: list[ir.Value], padding: ir.Value | None, sizes: _Dims
    ) -> dict[str, np.ndarray] | str:
        feeds = {}
        for v in inputs:
            if v.shape is None or v.dtype is None:
                return f"input {v.name!r} has no shape or type"
            dims = []
            for i, d in enumerate(v.shape):
                if isinstance(d, int):
                    dims.append(d)
                elif same_dim(d, sizes.q_batch):
                    dims.append(sizes.batch)
                elif same_dim(d, sizes.q_seq):
                    dims.append(sizes.seq)
                elif sizes.q_past is not None and same_dim(d, sizes.q_past):
                    dims.append(sizes.past)
                elif sizes.q_past is not None and v is padding and i == 1:
                    dims.append(sizes.past + sizes.seq)  # the mask covers past and new tokens
                else:
                    return f"input {v.name!r} dim {i} ({d}) is neither the batch nor the sequence"
            feeds[v.name] = np.zeros(dims, dtype=v.dtype.numpy())
            if v is padding:
                feeds[v.name] += 1
        return feeds

    def _check_constant(self, arr: np.ndarray, additive: bool, query: ir.Value) -> MaskProof | str:
        seq = query.shape[1]  # type: ignore[index]
        if not isinstance(seq, int) or arr.ndim < 2:
            return "constant mask for a symbolic sequence length"
        batch = arr.shape[0] if arr.ndim == 4 else 1
        return self._compare(arr, additive, batch, seq, None) or MaskProof()

    @staticmethod
    def _compare(
        out: np.ndarray, additive: bool, batch: int, seq: int, lengths: np.ndarray | None, window: int = -1
    ) -> str:
        allowed = _allowed(out, additive)
        if allowed is None:
            return "additive mask holds values that are neither 0 nor blocking"
        total = allowed.shape[-1]
        if allowed.shape[-2] != seq or total < seq:
            return f"mask is {list(allowed.shape)}, not [.., {seq}, ≥{seq}]"
        while allowed.ndim < 4:
            allowed = allowed[None]
        if allowed.shape[0] not in (1, batch):
            return "mask batch does not broadcast"
        allowed = np.broadcast_to(allowed, (batch, allowed.shape[1], seq, total))
        expected, rows = _expected(batch, seq, total, lengths, window)
        for h in range(allowed.shape[1]):
            if not np.array_equal(allowed[:, h][rows], expected[rows]):
                return "mask is not the causal mask" + (" with right padding" if lengths is not None else "")
        return ""


def prove_causal_mask(model: ir.Model, padding_inputs: frozenset[str] = frozenset()) -> _Prover:
    """A prover for ``model``: ``prover.prove(mask, additive, query[, past])`` returns a
    :class:`MaskProof` or the reason the mask is not GroupQueryAttention's. ``query`` is the
    ``[B, S, ...]`` query projection (its dims name the batch and sequence sizes); ``past`` the
    ``[B, H, P, D]`` past-key input of attention over a KV cache (its dim 2 names the past length;
    the padding input then spans past and new tokens)."""
    return _Prover(model, padding_inputs)


class Lengths:
    """``seqlens_k`` and ``total_sequence_length``: constants for static shapes, else computed once
    per source (the padding-mask input, or one per query projection) at the top of the graph."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.graph = model.graph
        self.names: set[str] = set()
        self.cache: dict[int, tuple[ir.Value, ir.Value]] = {}

    def _const(self, base: str, array: np.ndarray) -> ir.Value:
        name = unique_name(self.graph, base, self.names)
        value = ir.Value(
            name=name,
            shape=ir.Shape(array.shape),
            type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
            const_value=ir.tensor(array, name=name),
        )
        self.graph.register_initializer(value)
        return value

    def _node(
        self, op: str, inputs: list[ir.Value], attrs: dict | None = None, *, before: ir.Node
    ) -> ir.Value:
        node = ir.node(op, inputs, attrs)
        node.outputs[0].name = unique_name(self.graph, f"gqa_{op.lower()}", self.names)
        self.graph.insert_before(before, node)
        return node.outputs[0]

    def _source(self, proj: ir.Value) -> ir.Value:
        """A graph input whose first two dims are the projection's batch and sequence (shared by
        every layer: e.g. input_ids), else the projection itself."""
        for v in self.graph.inputs:
            if (rank(v) or 0) >= 2 and all(same_dim(v.shape[i], proj.shape[i]) for i in (0, 1)):  # type: ignore[index]
                return v
        return proj

    def get(
        self, query: ir.Value, cached: bool, proof: MaskProof, before: ir.Node
    ) -> tuple[ir.Value, ir.Value] | str:
        """(seqlens_k, total_sequence_length) for attention of ``query`` ([B, S, ..]) whose mask is
        ``proof``, computed before ``before``; ``cached``: it reads a KV cache."""
        if cached and proof.padding is None:
            return "a KV cache without a declared padding mask (no total length to read)"
        src = proof.padding if proof.padding is not None else self._source(query)
        if id(src) in self.cache:
            return self.cache[id(src)]
        batch, seq = query.shape[0], query.shape[1]  # type: ignore[index]
        if proof.padding is None and isinstance(batch, int) and isinstance(seq, int):
            out = (
                self._const("gqa_seqlens_k", np.full([batch], seq - 1, dtype=np.int32)),
                self._const("gqa_total_sequence_length", np.array(seq, dtype=np.int32)),
            )
            self.cache[id(src)] = out
            return out
        if model_opset(self.model) < 15:
            return "opset < 15 (Shape with start/end)"
        # Graph inputs are available from the first node on; a projection only before its user.
        if src.producer() is None:
            before = next(iter(self.graph))
        one = self._const("gqa_one", np.array([1], dtype=np.int64))
        if proof.padding is not None:
            mask = (
                src
                if src.dtype == ir.DataType.INT64
                else self._node("Cast", [src], {"to": ir.DataType.INT64}, before=before)
            )
            axes = self._const("gqa_axes", np.array([1], dtype=np.int64))
            total = self._node("ReduceSum", [mask, axes], {"keepdims": 0}, before=before)
            seqlens = self._node("Sub", [total, one], before=before)
            length = self._node("Shape", [src], {"start": 1, "end": 2}, before=before)
        else:
            b = self._node("Shape", [src], {"start": 0, "end": 1}, before=before)
            length = self._node("Shape", [src], {"start": 1, "end": 2}, before=before)
            last = self._node("Sub", [length, one], before=before)
            seqlens = self._node("Expand", [last, b], before=before)
        seqlens32 = self._node("Cast", [seqlens], {"to": ir.DataType.INT32}, before=before)
        total32 = self._node("Cast", [length], {"to": ir.DataType.INT32}, before=before)
        seqlens32.dtype, seqlens32.shape = ir.DataType.INT32, ir.Shape([batch])
        total32.dtype, total32.shape = ir.DataType.INT32, ir.Shape([1])
        self.cache[id(src)] = (seqlens32, total32)
        return self.cache[id(src)]
