"""Which type and shape annotations the passes trust, and which an optimized file carries.

Declared shapes are claims, not facts: an exporter may declare an output ``[1, seqlen]`` that the
model computes as ``(20, 1, 8210)``, and ONNX Runtime only warns about it. A rewrite that builds a
Reshape target from such a claim changes the model's outputs. So before the passes run,
:func:`set_aside_declared_shapes` removes the shapes of every value an ONNX op computes (graph
outputs, value_info, values inside subgraphs) and keeps them aside in ``model.meta``: the passes then see
only what shape inference derives from the inputs' shapes (which ONNX Runtime enforces) and the
constants. Element types stay (the input validation refuses contradicting ones). The outputs of
ops ONNX's inference does not know (contrib and custom ops, ONNX Runtime's own ops in the ONNX
domain) keep their declarations: nothing can confirm or refute them, and without them nothing after
such an op has a shape. So do a subgraph's inputs and outputs, the body's interface (see
:func:`_computed_values`).

After the first shape inference, :func:`adopt_declared_dims` gives back what inference confirms
only in part: where it derives a declared shape's rank and contradicts none of its sizes, the dims
it left unknown are taken from the declaration. ONNX's inference cannot cancel symbols (the ``-1``
of ``view(batch, seq, -1, 16)`` on ``[batch, seq, 64]`` stays unknown) and drops names at a Slice
or Expand, and the attention fusions need those dims; the exporter (torch's tracer) computed them.
A graph output's declaration gets less: only the names of its symbolic dims (a name states no
size, only that dims of that name are equal), never a size inference did not derive: outputs are
where the ``[1, seqlen]`` kind of claim lives (an exporter's dynamic-axes labels, hand edits). A
declaration inference cannot give a rank to is dropped whole.

Shape inference annotates every value while the passes run (the rewrites' checks need ranks and
shapes). Written out, that is one value_info entry per value, and a long graph's file grows with
its node count although ONNX Runtime infers all of it again. ``optimize`` records which
intermediate values the input annotated (in ``model.meta``, never written); serialization hides the
others' annotations, and gives the graph outputs back their declared dims where the inferred shape
has less and does not contradict them; the in-memory model keeps what inference found.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import onnx
import onnx_ir as ir

__all__ = [
    "DECLARED_KEY",
    "DECLARED_SHAPES_KEY",
    "declared_annotations",
    "adopt_declared_dims",
    "declared_annotations_only",
    "set_aside_declared_shapes",
]

#: ``model.meta`` key (in memory, never written): names of the intermediate values whose type or
#: shape the input model declared. Serialization leaves the others' annotations out (see
#: :func:`declared_annotations_only`).
DECLARED_KEY = "graphopt.declared_annotations"
#: ``model.meta`` key (in memory, never written): the declared shapes :func:`set_aside_declared_shapes`
#: removed, by value name; serialization declares the graph outputs with them where inference has
#: less and does not contradict them.
DECLARED_SHAPES_KEY = "graphopt.declared_shapes"


def _intermediate_values(model: ir.Model) -> Iterator[ir.Value]:
    """Node outputs that are not graph outputs, main graph and subgraphs (functions left alone)."""
    for graph in model.graphs():
        outputs = {id(v) for v in graph.outputs}
        for node in graph:
            yield from (v for v in node.outputs if id(v) not in outputs)


@functools.cache
def _inferable(domain: str, op_type: str) -> bool:
    """Whether ONNX's shape inference has a schema for the op (not so for ONNX Runtime's contrib
    ops, nor for its own ops in the ONNX domain such as SimplifiedLayerNormalization)."""
    return domain in ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training") and onnx.defs.has(
        op_type, "" if domain == "ai.onnx" else domain
    )


def _computed_values(model: ir.Model) -> Iterator[ir.Value]:
    """Every value a node of an ONNX op computes, main graph (graph outputs included) and
    subgraphs. Left out, keeping their declared shapes: the outputs of ops ONNX's inference does
    not know (ONNX Runtime's contrib ops, custom ops, the model's functions: their declarations are
    all there is, and a graphopt-fused model's come from the rewrites), and a subgraph's inputs and
    outputs (a Loop body's, an If branch's): they are the body's interface, which ONNX's inference
    checks against the values the node passes in and the body computes (the input validation
    drops a contradicted one), and graphopt's inference keeps a subgraph's annotations as they are."""
    for graph in model.graphs():
        interface = set() if graph is model.graph else {id(v) for v in graph.outputs}
        for node in graph:
            if _inferable(node.domain, node.op_type):
                yield from (v for v in node.outputs if id(v) not in interface)


def set_aside_declared_shapes(model: ir.Model) -> bool:
    """Remove the declared shapes of the values nodes compute (see the module docstring) and record
    them in ``model.meta``; the main graph's inputs and initializers keep theirs. Runs once per
    model (a second call finds the record and changes nothing: the shapes are inferred ones by
    then). Returns whether it removed any."""
    if DECLARED_SHAPES_KEY in model.meta:
        return False
    record: dict[str, ir.Shape] = {}
    for v in _computed_values(model):
        if v.shape is not None:
            if v.name:
                record.setdefault(v.name, v.shape)
            v.shape = None
    model.meta[DECLARED_SHAPES_KEY] = record
    return bool(record)


#: ``model.meta`` key: set once :func:`adopt_declared_dims` has run.
_DIMS_ADOPTED_KEY = "graphopt.declared_dims_adopted"


def adopt_declared_dims(model: ir.Model, infer: Callable[[ir.Model], bool | None]) -> bool | None:
    """Run ``infer`` (shape inference: whether it changed anything, None when it failed). The first
    time on a model whose declared shapes were set aside, also: where inference confirms a declared
    shape's rank and contradicts none of its sizes, fill the dims it left unknown from the
    declaration (see the module docstring for which), put every undeclared value back as it was
    before and infer again, so that what follows from the filled dims is derived from them. Later
    inferences keep what was filled. Returns whether anything changed (None: inference failed)."""
    record = model.meta.get(DECLARED_SHAPES_KEY)
    if not record or model.meta.get(_DIMS_ADOPTED_KEY):
        return infer(model)
    undeclared = [(v, v.type, v.shape) for v in _computed_values(model) if not v.name or v.name not in record]
    modified = infer(model)
    if modified is None:
        return None
    model.meta[_DIMS_ADOPTED_KEY] = True
    outputs = {id(v) for v in model.graph.outputs}
    changed = False
    for v in _computed_values(model):
        declared = record.get(v.name) if v.name else None
        if declared is not None and v.shape is not None:
            filled = _with_declared_dims(v.shape, declared, sizes=id(v) not in outputs)
            if filled is not None:
                v.shape = filled
                changed = True
    if not changed:
        return modified
    # Undeclared values as they were (inference also types some wrongly, e.g. a sequence as a
    # tensor, and a second run would then refuse its own output), then what follows from the fill.
    for v, t, shape in undeclared:
        v.type = t
        v.shape = shape
    infer(model)
    return True


def _unknown(d: int | ir.SymbolicDim) -> bool:
    """An inferred dim that says nothing: no name, or a name ONNX's inference made up."""
    return not isinstance(d, int) and (d.value is None or d.value.startswith("unk__"))


def _with_declared_dims(inferred: ir.Shape, declared: ir.Shape, sizes: bool) -> ir.Shape | None:
    """``inferred`` with the declared dims where it has unknown ones (names always, fixed sizes
    when ``sizes``), or None (no change, or the declaration contradicts inference: another rank,
    another fixed size, or a fixed size where inference has an input's named dim; then none of it
    is trusted)."""
    if len(inferred) != len(declared):
        return None
    dims: list[int | ir.SymbolicDim] = []
    changed = False
    for a, b in zip(inferred, declared):
        if isinstance(b, int) and not _unknown(a) and a != b:
            return None  # another size, or a size where inference follows an input's dim
        if _unknown(a) and (sizes if isinstance(b, int) else b.value is not None):
            dims.append(b)
            changed = True
        else:
            dims.append(a)
    return ir.Shape(dims) if changed else None


def _merged(inferred: ir.Shape | None, declared: ir.Shape | None) -> ir.Shape | None:
    """What the file declares: the declared shape with the sizes inference proved, or the inferred
    shape alone where the declared one contradicts it (as in :func:`_with_declared_dims`)."""
    if declared is None or inferred is None:
        return declared if inferred is None else inferred
    if len(inferred) != len(declared):
        return inferred
    dims: list[int | ir.SymbolicDim] = []
    for a, b in zip(inferred, declared):
        if isinstance(b, int) and not _unknown(a) and a != b:
            return inferred
        dims.append(a if isinstance(a, int) or (not isinstance(b, int) and b.value is None) else b)
    return ir.Shape(dims)


def declared_annotations(model: ir.Model) -> set[str]:
    """Names of the intermediate values that carry a type or shape (what a file declares)."""
    return {
        v.name for v in _intermediate_values(model) if v.name and (v.type is not None or v.shape is not None)
    }


@contextlib.contextmanager
def declared_annotations_only(model: ir.Model) -> Iterator[None]:
    """While serializing an optimized model, hide the types and shapes that shape inference added
    during the passes: they served the rewrites' checks, ONNX Runtime infers them again, and
    written out they make the file grow with the node count (a value_info entry per value). The
    in-memory model keeps them."""
    declared = model.meta.get(DECLARED_KEY)
    shapes = model.meta.get(DECLARED_SHAPES_KEY) or {}
    hidden: list[tuple[ir.Value, Any, Any]] = []
    if declared is not None:
        for v in _intermediate_values(model):
            if v.name not in declared and (v.type is not None or v.shape is not None):
                hidden.append((v, v.type, v.shape))
                v.type = None
                v.shape = None
    if shapes:
        # The graph outputs are the model's interface: declared as the input declared them where
        # inference has less. Intermediates carry what the passes found (a pass may have changed a
        # value's shape under its name: pruned heads).
        for v in model.graph.outputs:
            if v.name in shapes:
                merged = _merged(v.shape, shapes[v.name])
                if merged is not v.shape:
                    hidden.append((v, v.type, v.shape))
                    v.shape = merged
    try:
        yield
    finally:
        for v, t, shape in hidden:
            v.type = t
            v.shape = shape
