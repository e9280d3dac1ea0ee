"""Which type and shape annotations an optimized file carries: those the input declared.

Shape inference annotates every value while the passes run (the rewrites' checks need ranks and
shapes). Written out, that is one value_info entry per value, and a long graph's file grows with
its node count although ONNX Runtime infers all of it again. ``optimize`` records which
intermediate values the input annotated (in ``model.meta``, never written); serialization hides the
others' annotations, and the in-memory model keeps them all.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import onnx_ir as ir

__all__ = ["DECLARED_KEY", "declared_annotations", "declared_annotations_only"]

#: ``model.meta`` key (in memory, never written): names of the intermediate values whose type or
#: shape the input model declared. Serialization leaves the others' annotations out (see
#: :func:`declared_annotations_only`).
DECLARED_KEY = "graphopt.declared_annotations"


def _intermediate_values(model: ir.Model) -> Iterator[ir.Value]:
    """Node outputs that are not graph outputs, main graph and subgraphs (functions left alone)."""
    for graph in model.graphs():
        outputs = {id(v) for v in graph.outputs}
        for node in graph:
            yield from (v for v in node.outputs if id(v) not in outputs)


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
    hidden: list[tuple[ir.Value, Any, Any]] = []
    if declared is not None:
        for v in _intermediate_values(model):
            if v.name not in declared and (v.type is not None or v.shape is not None):
                hidden.append((v, v.type, v.shape))
                v.type = None
                v.shape = None
    try:
        yield
    finally:
        for v, t, shape in hidden:
            v.type = t
            v.shape = shape
