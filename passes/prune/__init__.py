"""Weight pruning: unstructured magnitude, N:M semi-structured, and structured pruning that shrinks the graph.

Three modes, one pass (``prune``):

* ``unstructured``: zero the smallest-magnitude weights of Conv / MatMul / Gemm weight initializers,
  per layer or with one global threshold. Embedding tables (Gather), normalization parameters,
  biases and tensors below ``min_size`` are never targets. The file keeps its dense layout, so
  ONNX Runtime's dense kernels run exactly as fast as before; only sparse storage
  (:func:`to_sparse_proto` / :func:`save_sparse`) makes the file smaller, and only above ~67 %
  sparsity (ONNX sparse tensors store int64 indices: 12 bytes per kept value vs 4 dense).
* ``N:M`` (``2:4`` ...): in every group of M consecutive weights along the reduction dimension,
  keep the N largest. MatMul ``W[K, N]``: groups along K per column; Gemm along K respecting
  ``transB``; Conv ``W[O, I, kh, kw]``: groups along I per (output channel, kh, kw), the layout
  TensorRT / cuSPARSELt use (KRSC with C innermost). :func:`satisfies_nm` checks the result.
* ``structured``: remove whole units and rewrite every dependent shape.
  - *channels / neurons*: a unit group starts at a producer (Conv output channels, MatMul / Gemm
    output columns) and follows the value through element-wise ops, per-channel BatchNorm /
    bias Adds, pooling, Transpose, flattening Reshape, residual Adds (both producers join the
    group), up to the consumers (next Conv / MatMul / Gemm input channels, rows). A group whose
    units reach anything else (a graph output, LayerNorm, Concat, Split, an op not listed) is
    left alone and the reason recorded. Groups made only of MatMul / Gemm are ``ffn`` (FFN
    neurons; a Llama gated MLP joins gate and up columns through the ``silu(gate) * up`` Mul,
    and down's rows); groups with a Conv are ``channels``.
  - *heads*: multi-head attention as exported from BERT / ViT / GPT-2 (Q/K/V projections, or
    one fused QKV projection + Split → Reshape [B, S, H, d] → Transpose, scores MatMul, softmax,
    context MatMul, Transpose → Reshape [B, S, H·d] → output projection MatMul / Gemm). Q/K/V
    columns (every section of a fused QKV weight), their biases and the output projection's rows
    are sliced per head; a literal head count in Reshape shapes (and Split sizes) is rewritten,
    run-time shapes adapt by themselves. Grouped-query attention, rotary chains (Llama) and any
    unrecognized node are skipped with the reason.

  Importance is the L1 or L2 norm of each unit's weights (producers' output slices and
  consumers' input slices, each normalized by its mean), or, with calibration data,
  ``mean|activation|`` of the unit at each consumer's input times the norm of the consumer's
  weights for that unit (Wanda-style).

Every rewrite writes new initializers (a weight shared with another node is copied, never changed
in place for structured pruning) and the report's details list every layer / group with its
decision.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.errors import PipelineError
from graphopt.ir import SPARSE_STORAGE_KEY  # metadata: graphopt.save stores sparse weights
from graphopt.passes.ir_helpers import constant_array
from graphopt.pipeline import Pass

from .closure import Closure
from .groups import Group, producer_axes
from .heads import HeadMatcher
from .masks import global_prune, nm_axis, satisfies_nm, sparsity_of
from .masks import magnitude_mask as _magnitude_mask
from .masks import nm_prune as _nm_prune
from .masks import out_axis as _out_axis
from .masks import per_output_mask as _per_output_mask
from .options import FLOAT_TYPES, TARGETS, PruneOptions, _matches, parse_mode
from .options import MODES as MODES  # the module constants stay where they were
from .rewrite import apply_keep
from .sparse import save_sparse, to_sparse_proto

__all__ = [
    "PruneOptions",
    "PrunePass",
    "parse_mode",
    "satisfies_nm",
    "nm_axis",
    "sparsity_of",
    "to_sparse_proto",
    "save_sparse",
]

logger = logging.getLogger("graphopt.passes.prune")

# ---------------------------------------------------------------------------------------------
# The pass


class PrunePass(Pass):
    """Prune weights: unstructured magnitude, N:M (2:4) semi-structured, or structured units.

    Unstructured and N:M zero weights in place of Conv/MatMul/Gemm weight initializers (never
    embeddings, norms, biases or tensors below ``min_size``); shapes do not change, and dense
    kernels run as fast as before (only sparse hardware or sparse storage benefit). Structured
    mode removes Conv channels, FFN neurons and attention heads, rewriting every dependent
    weight, per-channel parameter and shape constant; any consumer it does not understand leaves
    that unit group unpruned with the reason in the report. Changes the model's numbers by design
    (verify accuracy); never changes inputs or outputs.
    """

    name = "prune"
    Options = PruneOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if not 0.0 <= o.sparsity < 1.0:
            raise PipelineError(f"prune sparsity must be in [0, 1), got {o.sparsity}")
        self.kind, self.n, self.m = parse_mode(o.mode)
        for t in o.targets:
            if t not in TARGETS:
                raise PipelineError(f"prune target {t!r} unknown; use {', '.join(TARGETS)}")
        if o.round_to < 1:
            raise PipelineError("prune round_to must be >= 1")

    # --- selection ---
    def _selected(self, node: ir.Node, weight_name: str | None) -> str | None:
        o = self.options
        if o.include and not _matches(o.include, node, weight_name):
            return "not in include"
        if o.exclude and _matches(o.exclude, node, weight_name):
            return "excluded"
        return None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.details["mode"] = self.options.mode
        if self.kind == "structured":
            modified = self._structured(model)
        else:
            modified = self._zeroing(model)
        if self.options.sparse_storage:
            model.metadata_props[SPARSE_STORAGE_KEY] = "1"
            modified = True
        return ir.passes.PassResult(model, modified)

    # --- unstructured and N:M -----------------------------------------------------------------
    def _weight_targets(self, model: ir.Model) -> list[tuple[ir.Value, list[ir.Node], int | None, str | None]]:
        """(weight value, nodes using it, N:M axis, skip reason) per distinct weight, graph order."""
        graph = model.graph
        by_weight: dict[ir.Value, list[ir.Node]] = {}
        order: list[ir.Value] = []
        axes: dict[ir.Value, int | None] = {}
        reasons: dict[ir.Value, str | None] = {}
        for node in graph:
            if node.domain not in ("", "ai.onnx") or node.op_type not in ("Conv", "MatMul", "Gemm"):
                continue
            if len(node.inputs) < 2 or node.inputs[1] is None:
                continue
            w = node.inputs[1]
            if w.const_value is None:
                continue  # activations (attention scores), not weights
            if w not in by_weight:
                by_weight[w] = []
                order.append(w)
            by_weight[w].append(node)
            arr_shape = w.shape
            rank = arr_shape.rank() if arr_shape is not None else 0
            axis = nm_axis(node.op_type, rank, {"transB": node.attributes.get_int("transB", 0)})
            reason = None
            if w.dtype not in FLOAT_TYPES:
                reason = f"weight dtype {w.dtype} not float"
            elif node.op_type == "MatMul" and rank < 2:
                reason = "MatMul weight rank < 2"
            elif (sel := self._selected(node, w.name)) is not None:
                reason = sel
            elif w.const_value.size < self.options.min_size:
                reason = f"smaller than min_size={self.options.min_size}"
            prev = reasons.get(w)
            if w in axes and axes[w] != axis:
                reason = reason or "weight shared by layers with different reduction axes"
            axes[w] = axis
            reasons[w] = prev or reason
        for w in order:
            if reasons[w] is None:
                for u in w.uses():
                    if u.node.op_type not in ("Conv", "MatMul", "Gemm") or u.idx != 1:
                        reasons[w] = f"weight also used by {u.node.op_type} {u.node.name} (embedding/tied)"
                        break
                if w.is_graph_output():
                    reasons[w] = "weight is a graph output"
        return [(w, by_weight[w], axes[w], reasons[w]) for w in order]

    def _zeroing(self, model: ir.Model) -> bool:
        o = self.options
        targets = self._weight_targets(model)
        layers: list[dict[str, Any]] = []
        arrays: dict[ir.Value, np.ndarray] = {}
        for w, _nodes, _axis, reason in targets:
            if reason is None:
                arrays[w] = w.const_value.numpy()  # type: ignore[union-attr]
        new: dict[ir.Value, np.ndarray] = {}
        nm_reason: dict[ir.Value, str] = {}
        scores: dict[ir.Value, np.ndarray] = {}
        if o.importance == "activation":
            scores = self._weight_activation_scores(model, targets, arrays)
        if self.kind == "nm":
            for w, _nodes, axis, _reason in targets:
                if w not in arrays:
                    continue
                a = arrays[w]
                if axis is None or a.shape[axis] % self.m:
                    nm_reason[w] = f"reduction dim {a.shape[axis] if axis is not None else '?'} not a multiple of {self.m}"
                    continue
                new[w] = _nm_prune(a, self.n, self.m, axis, scores.get(w))
        elif o.scope == "global" and arrays:
            new = global_prune(arrays, scores, o.sparsity)
        else:
            out_axes = {w: _out_axis(nodes[0].op_type, a.ndim, nodes[0].attributes.get_int("transB", 0))
                        for w, nodes, _, _ in targets if (a := arrays.get(w)) is not None}
            for w, a in arrays.items():
                if w in scores:
                    new[w] = np.where(_per_output_mask(scores[w], out_axes[w], o.sparsity), 0, a).astype(a.dtype)
                    continue
                k = int(np.floor(o.sparsity * a.size))
                new[w] = np.where(_magnitude_mask(a, k), 0, a).astype(a.dtype)
        modified = False
        total_pruned = zeros = 0
        for w, nodes, axis, reason in targets:
            entry: dict[str, Any] = {"weight": w.name, "nodes": [n.name for n in nodes],
                                     "op_type": nodes[0].op_type,
                                     "shape": [d if isinstance(d, int) else str(d) for d in w.shape] if w.shape is not None else None}
            a = arrays.get(w)
            if a is not None:
                entry["sparsity_before"] = round(sparsity_of(a), 6)
                if self.kind == "nm" and axis is not None and a.shape[axis] % self.m == 0:
                    entry["already_nm"] = satisfies_nm(a, self.n, self.m, axis)
            reason = reason or nm_reason.get(w)
            if reason is not None or w not in new:
                entry.update(pruned=False, reason=reason or "nothing to prune")
                self.count(f"skipped:{(reason or 'nothing').split('=')[0].split(' (')[0]}")
                layers.append(entry)
                continue
            b = new[w]
            changed = not np.array_equal(a, b)
            if changed:
                w.const_value = ir.tensor(b, name=w.name)
                modified = True
            entry.update(pruned=True, sparsity=round(sparsity_of(b), 6))
            if self.kind == "nm":
                entry["nm_axis"] = axis
            total_pruned += b.size
            zeros += int((b == 0).sum())
            self.count("pruned_weights")
            layers.append(entry)
        self.count("zeroed", zeros)
        self.details["layers"] = layers
        self.details["pruned_sparsity"] = round(zeros / total_pruned, 6) if total_pruned else 0.0
        return modified

    def _calibration(self) -> Any:
        from graphopt.calibration import CalibrationData

        o = self.options
        source = o.calibration if o.calibration is not None else self.context.get("calibration")
        if source is None:
            raise PipelineError("prune importance=activation needs calibration data: pass calibration= to "
                                "optimize() or the prune option calibration=PATH")
        data = CalibrationData.from_any(source)
        if getattr(data, "_single_use", False):
            data = data.materialize()
            self.context["calibration"] = data
        return data

    def _weight_activation_scores(self, model: ir.Model, targets: list, arrays: dict) -> dict[ir.Value, np.ndarray]:
        """Wanda scores ``|W| · ‖x_j‖₂``: each weight times the L2 norm (over the calibration data) of
        the input feature it multiplies. Weights whose input layout is not understood keep |W|."""
        from graphopt.calibration import stream_tensors

        wanted: dict[str, int] = {}  # activation name -> feature axis
        uses: dict[ir.Value, list[tuple[str, int]]] = {}  # weight -> (activation, weight feature axis)
        for w, nodes, _axis, _reason in targets:
            if w not in arrays:
                continue
            entries = []
            for node in nodes:
                x = node.inputs[0]
                if x is None or not x.name or x.shape is None:
                    entries = []
                    break
                if node.op_type == "Conv":
                    feat, waxis = 1, 1
                elif node.op_type == "Gemm" and not node.attributes.get_int("transA", 0):
                    feat, waxis = x.shape.rank() - 1, (1 if node.attributes.get_int("transB", 0) else 0)
                elif node.op_type == "MatMul":
                    feat, waxis = x.shape.rank() - 1, arrays[w].ndim - 2
                else:
                    entries = []
                    break
                wanted[x.name] = feat
                entries.append((x.name, waxis))
            if entries:
                uses[w] = entries
        if not uses:
            return {}
        names = sorted(wanted)
        sq: dict[str, np.ndarray] = {}
        for batch in stream_tensors(model, names, self._calibration(), limit=self.options.calibration_batches,
                                    description="prune stats"):
            for name in names:
                a = np.asarray(batch[name], dtype=np.float64)
                moved = np.moveaxis(a, wanted[name], 0).reshape(a.shape[wanted[name]], -1)
                sq[name] = sq.get(name, 0) + (moved * moved).sum(axis=1)
        scores = {}
        for w, entries in uses.items():
            a = arrays[w]
            waxis = entries[0][1]
            norm = np.sqrt(sum(sq[name] for name, _ in entries if name in sq))
            if np.ndim(norm) == 0 or norm.shape[0] != a.shape[waxis]:
                continue
            shape = [1] * a.ndim
            shape[waxis] = a.shape[waxis]
            scores[w] = np.abs(a).astype(np.float64) * norm.reshape(shape)
        return scores

    # --- structured ---------------------------------------------------------------------------
    def _groups(self, model: ir.Model) -> tuple[list[Group], list[dict[str, Any]]]:
        from graphopt.passes.ir_helpers import infer_shapes

        infer_shapes(model)
        graph = model.graph
        targets = set(self.options.targets)
        groups: list[Group] = []
        skipped: list[dict[str, Any]] = []
        covered: set[int] = set()
        if "heads" in targets:
            for node in list(graph):
                if node.op_type not in ("MatMul", "Gemm") or producer_axes(node) is None:
                    continue
                hm = HeadMatcher(node)
                g = hm.match()
                if g is None:
                    if hm.reason is not None:
                        skipped.append({"kind": "heads", "group": node.name, "reason": hm.reason})
                        self.count("skipped:heads")
                    continue
                why = self._selected(node, node.inputs[1].name) or next(
                    (self._selected(p, p.inputs[1].name) for p in g.producers
                     if self._selected(p, p.inputs[1].name)), None)
                if why:
                    skipped.append({"kind": "heads", "group": g.name, "reason": why})
                    continue
                if g.units < 2:
                    skipped.append({"kind": "heads", "group": g.name, "reason": "a single head"})
                    continue
                groups.append(g)
                for p in g.producers:
                    covered.add(id(p))
        if targets & {"channels", "ffn"}:
            for node in list(graph):
                if id(node) in covered or node.op_type not in ("Conv", "MatMul", "Gemm"):
                    continue
                axes = producer_axes(node)
                if axes is None:
                    continue
                w = constant_array(node.inputs[1])
                units = int(w.shape[axes[1]])  # type: ignore[union-attr]
                g = Closure(node, units).run()
                for p in g.producers:
                    covered.add(id(p))
                name = ",".join(p.name or p.op_type for p in g.producers)
                if g.reason is None and not any(s.role == "in" for s in g.slices):
                    g.reason = "units have no consumer layer"
                if g.reason is None and g.kind not in targets:
                    g.reason = f"{g.kind} not in targets"
                if g.reason is None:
                    for s in g.slices:
                        if s.role in ("out", "in") and (why := self._selected(s.node, s.weight_name)):
                            g.reason = f"{s.node.name}: {why}"
                            break
                if g.reason is None and units < 2:
                    g.reason = "a single unit"
                if g.reason is not None:
                    skipped.append({"kind": g.kind, "group": name, "reason": g.reason})
                    self.count(f"skipped:{g.kind}")
                    continue
                g.name = name
                groups.append(g)
        return groups, skipped

    def _scores(self, model: ir.Model, groups: list[Group]) -> list[np.ndarray]:
        o = self.options
        scores: list[np.ndarray] = []
        acts: dict[ir.Value, np.ndarray] = {}
        if o.importance == "activation":
            acts = self._activation_stats(model, groups)
        for g in groups:
            total = np.zeros(g.units, dtype=np.float64)
            # A BatchNormalization right after a producer rescales its output channels: weigh the
            # producer's norms by |γ|/√(σ²+ε), the scale the next layer actually sees.
            bn_scale: dict[int, np.ndarray] = {}
            for s in g.slices:
                if s.node.op_type == "BatchNormalization" and s.index == 1:
                    bn = s.node
                    gamma, var = constant_array(bn.inputs[1]), constant_array(bn.inputs[4])
                    src = bn.inputs[0].producer() if bn.inputs[0] is not None else None
                    if gamma is not None and var is not None and src is not None:
                        eps = bn.attributes.get_float("epsilon", 1e-5)
                        bn_scale[id(src)] = np.abs(gamma.astype(np.float64)) / np.sqrt(var.astype(np.float64) + eps)
            for s in g.slices:
                if s.role not in ("out", "in"):
                    continue
                w = constant_array(s.node.inputs[s.index]).astype(np.float64)  # type: ignore[union-attr]
                per = np.moveaxis(w, s.axis, 0).reshape(s.groups, g.units, -1).transpose(1, 0, 2).reshape(g.units, -1)
                if o.importance == "l1":
                    norm = np.abs(per).sum(axis=1)
                else:
                    norm = np.sqrt((per * per).sum(axis=1))
                if s.role == "out" and id(s.node) in bn_scale:
                    norm = norm * bn_scale[id(s.node)]
                if o.importance == "activation":
                    if s.role != "in" or s.data not in acts:
                        continue
                    norm = np.sqrt((per * per).sum(axis=1)) * acts[s.data]
                total += norm / (norm.mean() + 1e-12)
            scores.append(total)
        return scores

    def _activation_stats(self, model: ir.Model, groups: list[Group]) -> dict[ir.Value, np.ndarray]:
        from graphopt.calibration import stream_tensors

        o = self.options
        data = self._calibration()
        wanted: dict[str, tuple[ir.Value, int, int, int]] = {}
        for g in groups:
            for s in g.slices:
                if s.role == "in" and s.data is not None and s.data.name:
                    wanted[s.data.name] = (s.data, s.data_axis, s.block, g.units)
        names = sorted(wanted)
        sums: dict[str, np.ndarray] = {}
        count = 0
        for batch in stream_tensors(model, names, data, limit=o.calibration_batches, description="prune stats"):
            count += 1
            for name in names:
                v, axis, block, units = wanted[name]
                a = np.abs(np.asarray(batch[name], dtype=np.float64))
                moved = np.moveaxis(a, axis, 0).reshape(units * block, -1).mean(axis=1)
                per = moved.reshape(units, block).mean(axis=1)
                sums[name] = sums.get(name, 0) + per
        if not count:
            raise PipelineError("prune importance=activation: the calibration data has no batches")
        return {wanted[n][0]: sums[n] / count for n in names}

    def _keep_counts(self, groups: list[Group], scores: list[np.ndarray]) -> list[np.ndarray]:
        """Sorted unit indices to keep per group."""
        o = self.options
        keeps: list[np.ndarray] = []
        if o.scope == "global" and groups:
            flat = np.concatenate(scores)
            k = int(np.floor(o.sparsity * flat.size))
            order = np.argsort(flat, kind="stable")
            removed = np.zeros(flat.size, dtype=bool)
            removed[order[:k]] = True
            start = 0
            for g in groups:
                r = removed[start:start + g.units]
                start += g.units
                n_remove = min(int(r.sum()), g.units - 1)
                keeps.append(self._keep(g, scores[len(keeps)], n_remove))
            return keeps
        for g, s in zip(groups, scores):
            keeps.append(self._keep(g, s, int(np.floor(o.sparsity * g.units))))
        return keeps

    def _keep(self, g: Group, score: np.ndarray, n_remove: int) -> np.ndarray:
        keep_n = max(1, g.units - n_remove)
        r = self.options.round_to
        if r > 1 and keep_n % r and g.units >= r:
            keep_n = min(g.units, int(np.ceil(keep_n / r) * r))
        order = np.argsort(-score, kind="stable")
        return np.sort(order[:keep_n])

    def _structured(self, model: ir.Model) -> bool:
        groups, skipped = self._groups(model)
        scores = self._scores(model, groups)
        keeps = self._keep_counts(groups, scores)
        graph = model.graph
        taken: set[str] = set()  # names made so far (unique_name fills it from the graph)
        report: list[dict[str, Any]] = []
        modified = False
        need_inference = False
        for g, keep in zip(groups, keeps):
            removed = np.setdiff1d(np.arange(g.units), keep)
            entry = {"kind": g.kind, "group": g.name, "units": g.units, "kept": int(keep.size),
                     "removed": [int(i) for i in removed],
                     "slices": [{"node": s.node.name, "input": s.index,
                                 "weight": s.weight_name or s.node.inputs[s.index].name,
                                 "axis": s.axis, "block": s.block, "role": s.role} for s in g.slices]}
            report.append(entry)
            if removed.size == 0:
                continue
            modified = True
            self.count(f"pruned:{g.kind}")
            self.count(f"removed_units:{g.kind}", int(removed.size))
            if apply_keep(graph, taken, g, keep):
                need_inference = True
        if modified:
            import onnx_ir.passes.common as common

            common.RemoveUnusedNodesPass()(model)
            if need_inference:
                from graphopt.passes.ir_helpers import infer_shapes

                infer_shapes(model)
        self.details["groups"] = report
        self.details["skipped"] = skipped
        total = sum(g.units for g in groups)
        self.details["removed_fraction"] = round(
            sum(len(e["removed"]) for e in report) / total, 6) if total else 0.0
        return modified
