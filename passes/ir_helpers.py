"""IR helpers every pass family shares: node walks, constants, fresh names, opsets, and the two
ways of handing a value's uses to another.

One home for what the cleanup, fusion, quantization, pruning and precision passes (and the
backends' checks) all need, so that none of them borrows helpers from another pass's module.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common

from graphopt.annotations import adopt_declared_dims
from graphopt.schemas import node_problem

__all__ = [
    "MS_DOMAIN",
    "STANDARD_DOMAINS",
    "all_nodes",
    "constant_array",
    "fresh_name",
    "graph_nodes",
    "infer_shapes",
    "is_standard",
    "model_opset",
    "new_initializer",
    "new_nodes_problem",
    "opset_guarded",
    "rank",
    "replace_value",
    "static_shape",
    "take_place",
    "unique_name",
]

#: What infer_shapes logs under (the shape-inference pass's logger).
_cleanup_logger = logging.getLogger("graphopt.passes.cleanup")
_logger = logging.getLogger("graphopt.passes")

#: ONNX Runtime's contrib-op domain.
MS_DOMAIN = "com.microsoft"
#: The two spellings of the default ONNX domain.
STANDARD_DOMAINS = ("", "ai.onnx")


def is_standard(node: ir.Node, *op_types: str) -> bool:
    """True for a default-domain node of one of ``op_types``."""
    return node.domain in STANDARD_DOMAINS and node.op_type in op_types


def all_nodes(model: ir.Model) -> list[ir.Node]:
    """Every node of the main graph, its subgraphs and the model's functions (a snapshot: safe to
    mutate the model while iterating)."""
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for f in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(f))
    return nodes


def graph_nodes(model: ir.Model) -> Iterator[ir.Node]:
    """Every node of the main graph and its subgraphs (snapshot, safe to mutate while iterating).
    Functions are left out: their opset imports are their own."""
    return iter(list(ir.traversal.RecursiveGraphIterator(model.graph)))


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """Constant content of an initializer or Constant output; never a graph input's (overridable)."""
    if value is None or value.is_graph_input():
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
        return None if tensor is None else tensor.numpy()
    except Exception:  # malformed Constant, unreadable external data
        return None


def rank(value: ir.Value | None) -> int | None:
    """The value's rank, None when its shape (or the value) is unknown."""
    return None if value is None or value.shape is None else len(value.shape)


def static_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The value's shape when every dim is a known int, else None."""
    if value is None or value.shape is None:
        return None
    dims = []
    for d in value.shape:
        if not isinstance(d, int):
            return None
        dims.append(d)
    return tuple(dims)


def model_opset(model: ir.Model) -> int:
    """The model's default-domain opset version (0 when it imports none)."""
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)) or 0)


def fresh_name(graph: ir.Graph | ir.Function, base: str) -> str:
    """``base`` or ``base_<k>``, whichever first names no value of ``graph`` (initializers,
    inputs, node outputs): onnxscript overwrites an initializer of the same name."""
    taken = {v.name for v in graph.inputs}
    if isinstance(graph, ir.Graph):
        taken.update(graph.initializers)
    taken.update(v.name for n in graph for v in n.outputs)
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    return name


def unique_name(graph: ir.Graph, base: str, taken: set[str]) -> str:
    """A value/initializer name not used in ``graph`` or its subgraphs; ``taken`` collects the
    names made so far (filled from the graph on first use), so many names cost one walk."""
    if not taken:
        taken.update(graph.initializers.keys())
        for v in graph.inputs:
            if v.name:
                taken.add(v.name)
        for n in ir.traversal.RecursiveGraphIterator(graph):
            for o in n.outputs:
                if o.name:
                    taken.add(o.name)
    name, i = base, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


def take_place(old: ir.Value, new: ir.Value) -> None:
    """Make ``new`` take ``old``'s place: every use, and its graph-output slot and name (the model's
    interface keeps its names). Unlike :func:`replace_value`, the producer of ``old`` stays (it may
    have other outputs to hand over); ``new`` must be made inside the same graph."""
    name = old.name if old.is_graph_output() else None
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    if name is not None:
        old.name = None
        new.name = name


def replace_value(node: ir.Node, old: ir.Value, new: ir.Value) -> bool:
    """Make every user of ``old`` (``node``'s output) use ``new`` and drop ``node``.

    Returns False (and changes nothing) when that is unsafe: ``old`` is an output of its graph
    and ``new`` cannot take its name (it is a graph input, an initializer, another graph output,
    or comes from an outer scope).
    """
    graph = node.graph
    if graph is None:
        return False
    if old.is_graph_output():
        producer = new.producer()
        if (
            new.is_graph_input()
            or new.is_initializer()
            or new.is_graph_output()
            or producer is None
            or producer.graph is not graph
        ):
            return False
        outputs = graph.outputs
        # Keep the richer type/shape.
        if new.type is None:
            new.type = old.type
        if new.shape is None:
            new.shape = old.shape
        name = old.name
        old.name = None
        new.name = name
        for i, v in enumerate(outputs):
            if v is old:
                outputs[i] = new
    old.replace_all_uses_with(new)
    if any(o.uses() or o.is_graph_output() for o in node.outputs):
        return True  # another output still in use (e.g. a Dropout mask); DCE decides later
    graph.remove(node, safe=True)
    return True


def infer_shapes(model: ir.Model) -> bool:
    """ONNX shape inference for the rank/shape checks, with graphopt's two fixes (what the
    ``shape-inference`` pass runs): values inside subgraphs keep their declared types, and the
    initializer order is kept. Returns whether it added or changed shapes (a pass that ran it must
    then say "modified"); when inference fails the model is left unchanged.

    The first inference on a model whose declared shapes were set aside (graphopt.annotations)
    fills the dims it confirms in part from the declarations and infers once more from them."""
    return bool(adopt_declared_dims(model, _infer_shapes))


def _infer_shapes(model: ir.Model) -> bool | None:
    # Values inside subgraphs keep their declared types: onnx's inference can type an If
    # output of sequence type as a tensor there (seen on test_loop16_seq_none), which
    # ONNX Runtime then rejects. Main-graph annotations are checked by ORT's own inference.
    saved = []
    for node in all_nodes(model):
        if node.graph is not model.graph:
            for v in node.outputs:
                saved.append((v, v.type, v.shape))
    # onnx_ir's pass takes large initializers out and puts them back at the end, which
    # reorders graph.initializers (different output bytes although nothing changed).
    orders = [(g, list(g.initializers.values())) for g in model.graphs()]
    try:
        result = ir.passes.common.ShapeInferencePass(strict_mode=False)(model)
    except Exception as e:
        _cleanup_logger.info("shape inference failed, model left unchanged: %s", e)
        return None
    for graph, values in orders:
        if list(graph.initializers.values()) != values and set(graph.initializers.values()) == set(values):
            graph.initializers.clear()
            for v in values:
                graph.initializers[v.name] = v
    for v, t, shape in saved:
        v.type = t
        v.shape = shape
    return result.modified


def new_initializer(graph: ir.Graph, base: str, array: np.ndarray, taken: set[str]) -> ir.Value:
    """Register ``array`` as a new initializer of ``graph``, named by :func:`unique_name` from
    ``base`` (``taken`` as there), and return its value (typed and shaped like ``array``)."""
    name = unique_name(graph, base, taken)
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(np.require(array, requirements="C"), name=name),
    )  # (ascontiguousarray makes 0-d 1-d)
    graph.register_initializer(value)
    return value


# ---------------------------------------------------------------------------------------------
# Rewrites that fit the model's opset


def scope_opsets(model: ir.Model, scope: ir.Graph | ir.Function) -> Mapping[str, int]:
    """The opset imports the nodes of ``scope`` are read against: a function's own (over the
    model's), the model's for the main graph and its subgraphs (a subgraph imports nothing)."""
    if isinstance(scope, ir.Function):
        return {**model.opset_imports, **scope.opset_imports}
    return model.opset_imports


#: Constant's typed value attributes (opset 12) and the numpy dtype of the tensor they stand for.
_CONSTANT_VALUE_ATTRS = {
    "value_int": np.int64,
    "value_ints": np.int64,
    "value_float": np.float32,
    "value_floats": np.float32,
}


def _legalize_constant(node: ir.Node, opsets: Mapping[str, int]) -> None:
    """A ``Constant(value_int(s)/value_float(s))`` (opset 12) as ``Constant(value=tensor)``, which
    every opset has: onnxscript's folder and rules emit the typed form whatever the opset."""
    if not is_standard(node, "Constant") or len(node.attributes) != 1:
        return
    ((name, attr),) = node.attributes.items()
    dtype = _CONSTANT_VALUE_ATTRS.get(name)
    if dtype is None or attr.is_ref() or opsets.get("", opsets.get("ai.onnx", 0)) >= 12:
        return
    tensor = ir.tensor(np.array(attr.value, dtype=dtype))
    node.attributes.pop(name)
    node.attributes["value"] = ir.AttrTensor("value", tensor)


def new_nodes_problem(nodes: Sequence[ir.Node], opsets: Mapping[str, int]) -> str | None:
    """Why nodes a rewrite is about to insert do not fit the schemas at ``opsets`` (an op or
    attribute the opset lacks, an input form it does not take), or None. Typed Constants are
    first rewritten to the form every opset has."""
    for node in nodes:
        _legalize_constant(node, opsets)
        problem = node_problem(node, opsets)
        if problem is not None:
            return problem
    return None


@functools.cache
def _guarded_rule_class() -> type:
    from onnxscript.rewriter import pattern

    class OpsetGuardedRule(pattern.RewriteRule):
        """An onnxscript rule that leaves a site alone when its replacement does not fit the
        model's opsets (the rules build their replacements for the newest opset)."""

        def __init__(self, rule: pattern.RewriteRule) -> None:  # a copy of the rule's state
            self.__dict__.update(rule.__dict__)

        def try_rewrite(self, model, graph_or_function, node, **kwargs):
            imports = [(s, dict(s.opset_imports)) for s in (graph_or_function, model.graph)]
            delta = super().try_rewrite(model, graph_or_function, node, **kwargs)
            if delta is None:
                return None
            problem = new_nodes_problem(delta.new_nodes, scope_opsets(model, graph_or_function))
            if problem is None:
                return delta
            for scope, before in imports:  # the imports the rejected replacement added
                scope.opset_imports.clear()
                scope.opset_imports.update(before)
            _logger.debug("rule %s skipped at %s: %s", self.name, node.name, problem)
            return None

    return OpsetGuardedRule


def opset_guarded(rules: Any) -> Any:
    """``rules`` (an onnxscript ``RewriteRule``, ``RewriteRuleSet`` or list of rules) as a rule set
    that rewrites only where the replacement fits the model's opsets: every rule must emit only
    ops and attributes that exist there, and onnxscript's rules do not check (``Reshape`` with
    ``allowzero``, ``Squeeze``/``Split`` with axes or sizes as inputs, ops of later opsets)."""
    from onnxscript.rewriter import pattern

    if isinstance(rules, pattern.RewriteRule):
        rules = [rules]
    elif isinstance(rules, pattern.RewriteRuleSet):
        rules = rules.rules
    guard = _guarded_rule_class()
    guarded: list[Any] = [r if isinstance(r, guard) else guard(r) for r in rules]
    return pattern.RewriteRuleSet(guarded)
