"""IR helpers every pass family shares: node walks, constants, fresh names, opsets, and the two
ways of handing a value's uses to another.

One home for what the cleanup, fusion, quantization, pruning and precision passes (and the
backends' checks) all need, so that none of them borrows helpers from another pass's module.
"""

from __future__ import annotations

import collections
import functools
import logging
import math
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
    "complete_shapes",
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
    """ONNX shape inference for the rank/shape checks, with graphopt's fixes (what the
    ``shape-inference`` pass runs): values inside subgraphs keep their declared types, the
    initializer order is kept, and Reshapes before opset 14 get what :func:`complete_shapes`
    finds. Returns whether it added or changed shapes (a pass that ran it must then say
    "modified"); when inference fails the model is left unchanged.

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
        modified = result.modified
        # onnx's Reshape before opset 14 gives up on computed targets: fill those outputs and
        # infer again so the values after them get their shapes (a chain needs a round each).
        for _ in range(8):
            if not complete_shapes(model):
                break
            ir.passes.common.ShapeInferencePass(strict_mode=False)(model)
            modified = True
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
    return modified


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
# Shapes onnx's inference leaves out at old opsets
#
# Shapes that ONNX's inference leaves out at old opsets although the graph determines them.
#
# Why: onnx infers a Reshape's output only from a constant target shape up to Reshape-13; Reshape-14
# added symbolic data propagation and rank-only inference. Exports at opsets 11–13 compute the target
# in the graph (torch's ``x.reshape(x.shape[0], b, -1)`` becomes Shape → Gather → Unsqueeze → Concat),
# so every value after such a Reshape loses its rank, and passes that need a rank skip it: before this,
# quantize-dynamic left every MatMul of an opset-12 CRNN in float ("rank unknown").
#
# :func:`complete_shapes` fills those outputs from what the graph computes: the target's value where
# it is made of constants and dims of inferred shapes (``Shape``, ``Gather``, ``Slice``,
# ``Unsqueeze``, ``Squeeze``, ``Concat``, ``Cast``, integer arithmetic), else at least its length
# (the target tensor's own inferred shape). It reads Reshape-5/13 semantics only (0 copies the input
# dim, -1 is the remainder), which Reshape-14+ share when ``allowzero`` is 0. A value that already has
# a shape keeps it; nothing here reads a declared graph-output shape.

#: A shape tensor's known value: one entry per element (an int, a symbolic dim's name, or None
#: for unknown), and whether the tensor is a scalar.
_Dim = int | str | None
_Sym = tuple[list[_Dim], bool]

#: Longest shape tensor tracked (a shape tensor longer than this is not a shape).
_MAX_LEN = 64


def complete_shapes(model: ir.Model) -> bool:
    """Give every main-graph Reshape output without a shape the shape its target determines (see
    the module docstring); returns whether any was added (run onnx's inference again after, so
    the values downstream get theirs)."""
    values: dict[ir.Value, _Sym] = {}
    changed = False
    for node in model.graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Reshape" and len(node.inputs) >= 2 and node.outputs[0].shape is None:
            shape = _reshape_output(node, values)
            if shape is not None:
                out = node.outputs[0]
                out.shape = shape
                if out.type is None and node.inputs[0] is not None:
                    out.type = node.inputs[0].type
                changed = True
            continue
        if len(node.outputs) == 1 and node.outputs[0] is not None:
            sym = _evaluate(node, values)
            if sym is not None and len(sym[0]) <= _MAX_LEN:
                values[node.outputs[0]] = sym
    return changed


def _value(v: ir.Value | None, values: dict[ir.Value, _Sym]) -> _Sym | None:
    """The known value of an integer shape tensor (a constant or one evaluated before)."""
    if v is None:
        return None
    if v in values:
        return values[v]
    arr = constant_array(v)
    if arr is None or arr.dtype.kind not in "iu" or arr.ndim > 1 or arr.size > _MAX_LEN:
        return None
    return [int(x) for x in arr.reshape(-1)], arr.ndim == 0


def _dims(shape: ir.Shape) -> list[_Dim]:
    out: list[_Dim] = []
    for d in shape:
        if isinstance(d, int):
            out.append(d)
        else:
            out.append(d.value if isinstance(d, ir.SymbolicDim) and d.value else None)
    return out


def _evaluate(node: ir.Node, values: dict[ir.Value, _Sym]) -> _Sym | None:
    """The output value of a shape computation ``node``, or None when it is not one."""
    op = node.op_type
    ins = list(node.inputs)
    if op == "Shape":
        x = ins[0]
        if x is None or x.shape is None:
            return None
        dims = _dims(x.shape)
        start = node.attributes.get_int("start", 0)
        end = node.attributes.get_int("end", None)
        return dims[start:end], False
    if op == "Size":
        x = ins[0]
        if x is None or x.shape is None:
            return None
        dims = _dims(x.shape)
        ints = [d for d in dims if isinstance(d, int)]
        return [math.prod(ints) if len(ints) == len(dims) else None], True
    if op in ("Identity", "Cast"):
        if op == "Cast" and node.attributes.get_int("to", 0) not in (ir.DataType.INT64, ir.DataType.INT32):
            return None
        return _value(ins[0], values)
    if op == "Gather":
        return _gather(node, values)
    if op == "Unsqueeze":
        data = _value(ins[0], values)
        return (data[0], False) if data is not None and data[1] else None  # scalar -> [x]
    if op == "Squeeze":
        data = _value(ins[0], values)
        return (data[0], True) if data is not None and len(data[0]) == 1 and not data[1] else None
    if op == "Concat":
        parts = [_value(v, values) for v in ins]
        if not parts or any(p is None or p[1] for p in parts):
            return None
        return [d for p in parts if p is not None for d in p[0]], False
    if op == "Slice":
        return _slice(node, values)
    if op in ("Add", "Sub", "Mul", "Div") and len(ins) == 2:
        return _arith(op, _value(ins[0], values), _value(ins[1], values))
    return None


def _gather(node: ir.Node, values: dict[ir.Value, _Sym]) -> _Sym | None:
    data = _value(node.inputs[0], values)
    idx = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if data is None or data[1] or idx is None or idx.ndim > 1 or node.attributes.get_int("axis", 0) != 0:
        return None
    n = len(data[0])
    picked = []
    for i in idx.reshape(-1).tolist():
        i = int(i)
        if not -n <= i < n:
            return None
        picked.append(data[0][i])
    return picked, idx.ndim == 0


def _slice(node: ir.Node, values: dict[ir.Value, _Sym]) -> _Sym | None:
    data = _value(node.inputs[0], values)
    if data is None or data[1]:
        return None
    attrs = node.attributes
    if "starts" in attrs:  # Slice-1: starts/ends/axes as attributes
        starts, ends = attrs.get_ints("starts"), attrs.get_ints("ends")
        axes = attrs.get_ints("axes", None)
        steps: list[int] | None = None
    else:
        parts = [constant_array(v) if v is not None else None for v in node.inputs[1:5]]
        parts += [None] * (4 - len(parts))
        if parts[0] is None or parts[1] is None:
            return None
        if (len(node.inputs) > 3 and node.inputs[3] is not None and parts[2] is None) or (
            len(node.inputs) > 4 and node.inputs[4] is not None and parts[3] is None
        ):
            return None
        starts, ends = parts[0].tolist(), parts[1].tolist()
        axes = parts[2].tolist() if parts[2] is not None else None
        steps = parts[3].tolist() if parts[3] is not None else None
    if len(starts) != 1 or len(ends) != 1 or (axes is not None and list(axes) not in ([0], [-1])):
        return None
    step = int(steps[0]) if steps else 1
    if step == 0:
        return None
    return data[0][int(starts[0]) : int(ends[0]) : step], False


def _arith(op: str, a: _Sym | None, b: _Sym | None) -> _Sym | None:
    """Elementwise integer arithmetic; an element with an unknown operand is unknown (the length,
    which a Reshape's rank needs, stays known)."""
    if a is None or b is None:
        return None
    x, y = a[0], b[0]
    if len(x) != len(y) and 1 not in (len(x), len(y)):
        return None
    n = max(len(x), len(y))
    x, y = (x * n if len(x) == 1 else x), (y * n if len(y) == 1 else y)
    out: list[_Dim] = []
    for p, q in zip(x, y, strict=True):
        if not (isinstance(p, int) and isinstance(q, int)):
            out.append(None)
        elif op == "Add":
            out.append(p + q)
        elif op == "Sub":
            out.append(p - q)
        elif op == "Mul":
            out.append(p * q)
        else:
            out.append(int(np.trunc(p / q)) if q != 0 else None)
    return out, a[1] and b[1]


def _reshape_output(node: ir.Node, values: dict[ir.Value, _Sym]) -> ir.Shape | None:
    """The output shape ``node`` (a Reshape) determines, or None when not even its rank is known."""
    if node.attributes.get_int("allowzero", 0):
        return None
    data, target = node.inputs[0], node.inputs[1]
    known = _value(target, values)
    if known is not None and not known[1]:
        dims = list(known[0])
    elif target is not None and target.shape is not None and len(target.shape) == 1:
        length = target.shape[0]
        if not isinstance(length, int) or length > _MAX_LEN:
            return None
        dims = [None] * length
    else:
        return None
    src = _dims(data.shape) if data is not None and data.shape is not None else None
    for i, d in enumerate(dims):
        if d == 0:  # copy the input's dim (Reshape before 14, or allowzero=0)
            dims[i] = src[i] if src is not None and i < len(src) else None
        elif isinstance(d, int) and d < -1:
            return None  # an invalid target: ORT will say so, not this
    if dims.count(-1) > 1:
        return None
    if -1 in dims:
        i = dims.index(-1)
        dims[i] = _remainder(src, dims[:i] + dims[i + 1 :])
    return ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in dims])


def _remainder(src: list[_Dim] | None, others: list[_Dim]) -> _Dim:
    """The dim -1 stands for: the input's elements over the other output dims, where the symbolic
    dims cancel exactly; None when they do not."""
    if src is None or None in src or None in others:
        return None
    left = collections.Counter(d for d in src if isinstance(d, str))
    for d in others:
        if isinstance(d, str):
            if left[d] == 0:
                return None
            left[d] -= 1
    num = math.prod(d for d in src if isinstance(d, int))
    den = math.prod(d for d in others if isinstance(d, int))
    rest = [d for d, n in left.items() for _ in range(n)]
    if den == 0 or num % den:
        return None
    ratio = num // den
    if not rest:
        return ratio
    if len(rest) == 1 and ratio == 1:
        return rest[0]
    return None


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
