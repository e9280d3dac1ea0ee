"""The input model against the ONNX spec, before any pass runs.

An invalid model reaching the passes makes them crash (exit 3) or, worse, "optimize" and write a
model nobody can run (exit 0). So :func:`validate_model` refuses it first, with one line saying
what is wrong and where (node, value or tensor), using ONNX's own checker and strict shape and
type inference where they cover it, and graphopt's own checks where they fall short:

* text fields must be UTF-8 (protobuf requires it; the Python runtime hands out ``bytes`` for a
  broken one, which later breaks serialization) and string attributes decodable (onnx_ir keeps
  them as ``str``);
* every node input, subgraph reference and graph output must name a defined value, with no cycle:
  the checker only reports "not topologically sorted" for all of these, while an out-of-order
  graph is fine for ONNX Runtime, so graphopt sorts it (stable) instead of refusing it;
* tensor data must match its dims and dtype exactly: the checker lets more data than the shape
  needs pass, which the IR cannot reshape;
* contrib ops (``com.microsoft``) must be ops this ONNX Runtime registers: ONNX has no schemas
  for them, so the checker lets any name through.

Validation is cheap for big models: weights are never handed to the checker (its C++ side would
copy the whole model twice); large and external tensors are replaced, in a light copy, by
placeholders of the same dtype and shape.
"""

from __future__ import annotations

import functools
import heapq
import math
import re
from collections.abc import Iterator, MutableSequence, Sequence

import onnx
import onnx_ir as ir
from google.protobuf.message import Message

from graphopt.errors import InvalidModelError, UnsupportedModelError

__all__ = ["KNOWN_DOMAINS", "check_supported", "validate_model"]

#: Operator domains ONNX Runtime implements. A node in any other domain (and not a model-local
#: function) is an op nobody here can run, fold or verify.
KNOWN_DOMAINS = frozenset(
    {
        "",
        "ai.onnx",
        "ai.onnx.ml",
        "ai.onnx.training",
        "ai.onnx.preview",
        "ai.onnx.preview.training",
        "com.microsoft",
        "com.microsoft.nchwc",
        "com.microsoft.experimental",
        "com.ms.internal.nhwc",
    }
)

#: Inline tensors larger than this are not handed to the checker (a placeholder is).
LIGHT_BYTES = 1 << 20
_CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def validate_model(
    proto: onnx.ModelProto, where: str, *, folder: str | None = None, allow_custom_domains: bool = False
) -> onnx.ModelProto:
    """Refuse ``proto`` unless it is valid ONNX; returns it, or a fixed-up copy (nodes in
    topological order, Constant string attributes as string tensors). The caller's proto is
    never modified. External data must have been checked already (graphopt.external)."""
    _check_text(proto, where)
    _check_tensors(proto, where)
    work = proto
    if _needs_rewrite(proto, where):
        work = onnx.ModelProto()
        work.CopyFrom(proto)
        _check_structure(work, where, apply=True)
        _normalize_string_constants(work, where)
    light = _light_copy(work, folder, where)
    _run_checker(light, where)
    _run_shape_inference(light, where, {f.name for f in proto.functions})
    if not allow_custom_domains:
        _check_contrib_ops(proto, where)
    return work


# ---------------------------------------------------------------------------------------------
# Supported versions and domains (before anything else)


def check_supported(
    proto: onnx.ModelProto, where: str = "<model>", *, allow_custom_domains: bool = False
) -> None:
    """Refuse models whose opset or operator domains graphopt cannot handle safely."""
    if proto.ir_version > onnx.IR_VERSION:
        raise UnsupportedModelError(
            f"{where}: IR version {proto.ir_version} is newer than this onnx package supports "
            f"({onnx.IR_VERSION}); upgrade onnx or re-export with an older IR version"
        )
    newest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise UnsupportedModelError(
                f"{where}: opset {opset.version} is newer than this onnx package supports "
                f"({newest}); upgrade onnx or export with opset <= {newest}"
            )
    if allow_custom_domains:
        return
    local = {f.domain for f in proto.functions}
    for domain, op_type in _node_domains(proto):
        if domain not in KNOWN_DOMAINS and domain not in local:
            raise UnsupportedModelError(
                f"{where}: operator {domain}::{op_type} is in an unknown custom domain "
                f"'{domain}' that ONNX Runtime cannot run, so graphopt cannot optimize or verify "
                "it; remove the custom op or pass allow_custom_domains=True "
                "(--allow-custom-domains) to leave those nodes untouched"
            )


def _all_nodes(proto: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    """Every node: main graph, subgraphs (any depth) and local functions."""
    stack: list[onnx.NodeProto] = [n for f in proto.functions for n in f.node]
    stack.extend(proto.graph.node)
    while stack:
        n = stack.pop()
        yield n
        for a in n.attribute:
            if a.HasField("g"):
                stack.extend(a.g.node)
            for g in a.graphs:
                stack.extend(g.node)


def _node_domains(proto: onnx.ModelProto) -> Iterator[tuple[str, str]]:
    seen = set()
    for n in _all_nodes(proto):
        if n.domain not in seen:
            seen.add(n.domain)
            yield n.domain, n.op_type


def _node(n: onnx.NodeProto, index: int | None = None) -> str:
    if n.name:
        return f"node '{n.name}' ({n.op_type})"
    return f"node #{index} ({n.op_type})" if index is not None else f"a nameless {n.op_type} node"


# ---------------------------------------------------------------------------------------------
# Text fields


def _check_text(proto: onnx.ModelProto, where: str) -> None:
    """Every protobuf ``string`` field must hold UTF-8 text (upb hands out ``bytes`` otherwise)."""
    stack: list[Message] = [proto]
    while stack:
        msg = stack.pop()
        if isinstance(msg, onnx.TensorProto):  # never list the data fields (that would copy them)
            _text(msg.name, "name", "TensorProto", where)
            _text(msg.doc_string, "doc_string", "TensorProto", where)
            stack.extend(msg.external_data)
            stack.extend(msg.metadata_props)
            continue
        for fd, value in msg.ListFields():
            if fd.type == fd.TYPE_STRING:
                for v in value if fd.is_repeated else (value,):
                    _text(v, fd.name, type(msg).__name__, where)
            elif fd.type == fd.TYPE_MESSAGE:
                if fd.is_repeated:
                    stack.extend(value)
                else:
                    stack.append(value)
        if isinstance(msg, onnx.AttributeProto) and msg.type in (msg.STRING, msg.STRINGS):
            for s in [msg.s] if msg.type == msg.STRING else list(msg.strings):
                try:
                    s.decode("utf-8")
                except UnicodeDecodeError:
                    if msg.name in ("value_string", "value_strings"):
                        continue  # Constant's: rewritten to a string tensor (bytes are fine there)
                    raise InvalidModelError(
                        f"{where}: string attribute '{msg.name}' holds bytes that are not UTF-8 text "
                        f"({s[:40]!r}); ONNX attribute strings are UTF-8: fix the attribute"
                    ) from None


def _text(value: object, field: str, message: str, where: str) -> None:
    if not isinstance(value, str):
        shown = value[:40] if isinstance(value, bytes) else value
        raise InvalidModelError(
            f"{where}: the {field} field of a {message} is not UTF-8 text ({shown!r}); "
            "the file is corrupt or not an ONNX model"
        )


def _normalize_string_constants(proto: onnx.ModelProto, where: str) -> None:
    """Constant(value_string(s)=...) as Constant(value=<string tensor>): the same value, but held as
    bytes, so text that is not UTF-8 survives (onnx_ir decodes string attributes)."""
    for n in _all_nodes(proto):
        if n.op_type != "Constant" or n.domain not in ("", "ai.onnx"):
            continue
        for i, a in enumerate(n.attribute):
            if a.name == "value_string" and a.type == a.STRING:
                t = onnx.helper.make_tensor("", onnx.TensorProto.STRING, [], [a.s])
            elif a.name == "value_strings" and a.type == a.STRINGS:
                t = onnx.helper.make_tensor("", onnx.TensorProto.STRING, [len(a.strings)], list(a.strings))
            else:
                continue
            del n.attribute[i]
            n.attribute.append(onnx.helper.make_attribute("value", t))
            break


# ---------------------------------------------------------------------------------------------
# Structure: definitions, uses, order


def _needs_rewrite(proto: onnx.ModelProto, where: str) -> bool:
    """Check the structure (raising on what is invalid); True when the nodes need sorting or a
    Constant's string attribute needs rewriting."""
    unsorted = _check_structure(proto, where, apply=False)
    return unsorted or any(
        n.op_type == "Constant"
        and any(a.name in ("value_string", "value_strings") for a in n.attribute)
        and any(_undecodable(a) for a in n.attribute)
        for n in _all_nodes(proto)
    )


def _undecodable(a: onnx.AttributeProto) -> bool:
    try:
        for s in [a.s] if a.type == a.STRING else list(a.strings):
            s.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _check_structure(proto: onnx.ModelProto, where: str, *, apply: bool) -> bool:
    """Every graph and local function: defined names, no cycle, outputs produced. Returns whether
    any graph is out of topological order (sorted in place when ``apply``)."""
    unsorted = False
    for f in proto.functions:
        ctx = f" in function '{f.name}'"
        defined = set(f.input)
        unsorted |= _sort_nodes(f.node, defined, set(), ctx, where, apply)[1]
        for o in f.output:
            if o not in defined and not any(o in n.output for n in f.node):
                raise InvalidModelError(
                    f"{where}: output '{o}'{ctx} is not produced by any node of the function"
                )
    unsorted |= _check_graph(proto.graph, set(), "", where, apply, main=True)[1]
    return unsorted


def _check_graph(
    g: onnx.GraphProto, outer: set[str], ctx: str, where: str, apply: bool, main: bool = False
) -> tuple[set[str], bool]:
    """Check one graph; returns (names it uses from the enclosing scopes, whether it was unsorted)."""
    defined: set[str] = set()
    for i, v in enumerate(g.input):
        if not v.name:
            raise InvalidModelError(f"{where}: graph input #{i}{ctx} has an empty name; name it")
        defined.add(v.name)
    defined.update(t.name for t in g.initializer)
    defined.update(sp.values.name for sp in g.sparse_initializer)
    if main and not g.output:
        raise InvalidModelError(f"{where}: the graph has no outputs, so there is nothing to compute")
    free, unsorted = _sort_nodes(g.node, defined, outer, ctx, where, apply)
    produced = defined | {o for n in g.node for o in n.output if o}
    for i, v in enumerate(g.output):
        if not v.name:
            raise InvalidModelError(f"{where}: graph output #{i}{ctx} has an empty name; name it")
        if v.name in produced:
            continue
        if v.name in outer:
            free.add(v.name)
            continue
        raise InvalidModelError(
            f"{where}: graph output '{v.name}'{ctx} is not a graph input, initializer or output of any node"
        )
    return free, unsorted


def _sort_nodes(
    nodes: MutableSequence[onnx.NodeProto],
    defined: set[str],
    outer: set[str],
    ctx: str,
    where: str,
    apply: bool,
) -> tuple[set[str], bool]:
    producer: dict[str, int] = {}
    for i, n in enumerate(nodes):
        for o in n.output:
            if not o:
                continue
            if o in producer or o in defined:
                other = (
                    _node(nodes[producer[o]], producer[o])
                    if o in producer
                    else "a graph input or initializer"
                )
                raise InvalidModelError(
                    f"{where}: value '{o}'{ctx} is defined twice ({other} and {_node(n, i)}); ONNX values have "
                    "one definition: rename one"
                )
            producer[o] = i
    visible = defined | set(producer) | outer
    free: set[str] = set()
    deps: list[set[int]] = []
    subgraphs_unsorted = False
    for i, n in enumerate(nodes):
        needed = [x for x in n.input if x]
        for a in n.attribute:
            subs = ([a.g] if a.HasField("g") else []) + list(a.graphs)
            for sub in subs:
                used, sub_unsorted = _check_graph(
                    sub, visible, f" in a subgraph of {_node(n, i)}{ctx}", where, apply
                )
                needed.extend(sorted(used))
                subgraphs_unsorted |= sub_unsorted
        mine = set()
        for x in needed:
            if x in producer:
                mine.add(producer[x])
            elif x in defined:
                continue
            elif x in outer:
                free.add(x)
            else:
                raise InvalidModelError(
                    f"{where}: {_node(n, i)}{ctx} reads '{x}', which is not a graph input, initializer or "
                    "output of any node" + (" (nor a value of an enclosing graph)" if ctx else "")
                )
        deps.append(mine)
    order = _topological_order(nodes, deps, ctx, where)
    unsorted = order != list(range(len(nodes)))
    if unsorted and apply:
        ordered = []
        for i in order:
            copy = onnx.NodeProto()
            copy.CopyFrom(nodes[i])
            ordered.append(copy)
        del nodes[:]
        nodes.extend(ordered)
    return free, unsorted or subgraphs_unsorted


def _topological_order(
    nodes: Sequence[onnx.NodeProto], deps: list[set[int]], ctx: str, where: str
) -> list[int]:
    """Kahn's algorithm, stable (a sorted graph keeps its order); refuses a cycle, naming it."""
    users: list[list[int]] = [[] for _ in nodes]
    missing = [len(d) for d in deps]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    ready = [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            missing[u] -= 1
            if missing[u] == 0:
                heapq.heappush(ready, u)
    if len(order) < len(nodes):
        left = sorted(set(range(len(nodes))) - set(order))
        cycle = _a_cycle(left, deps)
        if len(cycle) == 2:
            raise InvalidModelError(
                f"{where}: {_node(nodes[cycle[0]], cycle[0])}{ctx} reads its own output; "
                "ONNX graphs must be acyclic"
            )
        names = " -> ".join(_node(nodes[i], i) for i in cycle)
        raise InvalidModelError(f"{where}: nodes{ctx} form a cycle: {names}; ONNX graphs must be acyclic")
    return order


def _a_cycle(left: list[int], deps: list[set[int]]) -> list[int]:
    """One cycle among the nodes Kahn's algorithm could not order (first node repeated at the end)."""
    rest = set(left)
    i = left[0]
    path: list[int] = []
    seen: dict[int, int] = {}
    while i not in seen:
        seen[i] = len(path)
        path.append(i)
        i = min(j for j in deps[i] if j in rest)  # a node left over always waits for another one
    return [*path[seen[i] :], i]


# ---------------------------------------------------------------------------------------------
# Tensors


def _check_tensors(proto: onnx.ModelProto, where: str) -> None:
    """Every tensor: a known dtype, dims >= 0, and exactly the data its dims and dtype need."""
    from graphopt.external import tensor_protos

    for t, desc in tensor_protos(proto):
        try:
            dtype = ir.DataType(t.data_type)
        except ValueError:
            raise InvalidModelError(
                f"{where}: {desc} has data type {t.data_type}, which is not an ONNX data type"
            ) from None
        if dtype == ir.DataType.UNDEFINED:
            raise InvalidModelError(f"{where}: {desc} has no data type")
        if any(d < 0 for d in t.dims):
            raise InvalidModelError(f"{where}: {desc} has a negative dimension in {list(t.dims)}")
        if t.data_location == onnx.TensorProto.EXTERNAL:
            continue  # checked against its file by graphopt.external
        count = math.prod(t.dims)
        if t.HasField("raw_data"):
            if dtype == ir.DataType.STRING:
                raise InvalidModelError(f"{where}: {desc} is a STRING tensor with raw_data; use string_data")
            need = math.ceil(count * dtype.bitwidth / 8)
            got = len(t.raw_data)
            if got != need:
                raise InvalidModelError(
                    f"{where}: {desc} has {got:,} bytes of data but dims {list(t.dims)} of {dtype.name} need "
                    f"{need:,}; the tensor is truncated or its dims are wrong"
                )
            continue
        fields = [
            (f, len(getattr(t, f)))
            for f in ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")
            if len(getattr(t, f))
        ]
        if len(fields) != 1:
            continue  # the checker names what is missing or doubled
        field, got = fields[0]
        if dtype != ir.DataType.STRING and dtype.bitwidth < 8:
            continue  # packed sub-byte values: the checker checks them
        need = count * (2 if dtype in (ir.DataType.COMPLEX64, ir.DataType.COMPLEX128) else 1)
        if got != need:
            raise InvalidModelError(
                f"{where}: {desc} has {got:,} values in {field} but dims {list(t.dims)} need {need:,}; the "
                "tensor is truncated or its dims are wrong"
            )


def _light_copy(proto: onnx.ModelProto, folder: str | None, where: str) -> onnx.ModelProto:
    """What the checker sees: the model with every large or external tensor replaced by a
    placeholder of the same dtype and shape (a Constant of an empty sparse tensor), or, where a
    placeholder cannot stand in (old opsets), read in; small tensors are kept for the checker."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    sparse_ok = opset >= 11  # Constant(sparse_value) exists from opset 11
    light = onnx.ModelProto()
    for field in ("ir_version", "producer_name", "producer_version", "domain", "model_version"):
        if proto.HasField(field):
            setattr(light, field, getattr(proto, field))
    light.opset_import.extend(proto.opset_import)
    for f in proto.functions:
        lf = light.functions.add()
        lf.CopyFrom(f) if not any(_heavy_node(n) for n in f.node) else _light_function(lf, f, folder, where)
    _light_graph(light.graph, proto.graph, folder, where, sparse_ok, main=True, ir_version=proto.ir_version)
    return light


def _heavy(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL or t.ByteSize() > LIGHT_BYTES


def _heavy_node(n: onnx.NodeProto) -> bool:
    return any(
        (a.HasField("t") and _heavy(a.t))
        or a.HasField("g")
        or len(a.graphs)
        or any(_heavy(t) for t in a.tensors)
        or (
            a.HasField("sparse_tensor")
            and (_heavy(a.sparse_tensor.values) or _heavy(a.sparse_tensor.indices))
        )
        for a in n.attribute
    )


def _placeholder(t: onnx.TensorProto) -> onnx.SparseTensorProto:
    sp = onnx.SparseTensorProto()
    sp.values.data_type = t.data_type
    sp.values.dims.append(0)
    sp.indices.data_type = onnx.TensorProto.INT64
    sp.indices.dims.append(0)
    sp.dims.extend(t.dims)
    return sp


def _inline(t: onnx.TensorProto, folder: str | None, where: str) -> onnx.TensorProto:
    if t.data_location != onnx.TensorProto.EXTERNAL:
        return t
    from graphopt.external import _read_external

    if folder is None:  # graphopt.external refused this already
        raise InvalidModelError(
            f"{where}: tensor '{t.name}' keeps its data in an external file; load from a path"
        )
    return _read_external(t, folder, where, f"external data of tensor '{t.name}'")


def _light_graph(
    out: onnx.GraphProto,
    g: onnx.GraphProto,
    folder: str | None,
    where: str,
    sparse_ok: bool,
    main: bool = False,
    ir_version: int = 0,
) -> None:
    out.name = g.name
    out.input.extend(g.input)
    out.output.extend(g.output)
    out.value_info.extend(g.value_info)
    inputs = {v.name for v in g.input}
    for t in g.initializer:
        if not _heavy(t):
            out.initializer.append(t)
        elif t.name in inputs:
            continue  # the graph input declares its type and shape
        elif sparse_ok:
            c = out.node.add(op_type="Constant", output=[t.name], name=f"initializer:{t.name}")
            c.attribute.append(onnx.helper.make_attribute("sparse_value", _placeholder(t)))
        elif main and ir_version >= 4:
            out.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            out.initializer.append(_inline(t, folder, where))
    for sp in g.sparse_initializer:
        # Shape inference types a sparse initializer as a sparse tensor, never the dense tensor its
        # readers see (ONNX Runtime densifies it): a Constant of it gives them the dense type.
        light_sp = onnx.SparseTensorProto()
        light_sp.dims.extend(sp.dims)
        light_sp.values.CopyFrom(_inline(sp.values, folder, where))
        light_sp.indices.CopyFrom(_inline(sp.indices, folder, where))
        name = sp.values.name
        if name in inputs:
            continue
        if sparse_ok:
            c = out.node.add(op_type="Constant", output=[name], name=f"sparse_initializer:{name}")
            c.attribute.append(onnx.helper.make_attribute("sparse_value", light_sp))
        elif main:
            out.input.append(onnx.helper.make_tensor_value_info(name, sp.values.data_type, list(sp.dims)))
        else:
            out.sparse_initializer.append(light_sp)
    for n in g.node:
        if not _heavy_node(n):
            out.node.append(n)
        else:
            _light_node(out.node.add(), n, folder, where, sparse_ok)


def _light_function(out: onnx.FunctionProto, f: onnx.FunctionProto, folder: str | None, where: str) -> None:
    out.CopyFrom(f)
    del out.node[:]
    for n in f.node:
        _light_node(out.node.add(), n, folder, where, sparse_ok=False) if _heavy_node(n) else out.node.append(
            n
        )


def _light_node(
    out: onnx.NodeProto, n: onnx.NodeProto, folder: str | None, where: str, sparse_ok: bool
) -> None:
    for field in ("name", "op_type", "domain", "overload"):
        setattr(out, field, getattr(n, field))
    out.input.extend(n.input)
    out.output.extend(n.output)
    for a in n.attribute:
        b = out.attribute.add()
        for field in ("name", "ref_attr_name", "doc_string", "type"):
            if a.HasField(field):
                setattr(b, field, getattr(a, field))
        if a.HasField("g"):
            _light_graph(b.g, a.g, folder, where, sparse_ok)
        for g in a.graphs:
            _light_graph(b.graphs.add(), g, folder, where, sparse_ok)
        if a.HasField("t"):
            if a.name == "value" and n.op_type == "Constant" and sparse_ok and _heavy(a.t):
                out.attribute.pop()
                out.attribute.append(onnx.helper.make_attribute("sparse_value", _placeholder(a.t)))
                continue
            b.t.CopyFrom(_inline(a.t, folder, where))
        for t in a.tensors:
            b.tensors.append(_inline(t, folder, where))
        if a.HasField("sparse_tensor"):
            b.sparse_tensor.dims.extend(a.sparse_tensor.dims)
            b.sparse_tensor.values.CopyFrom(_inline(a.sparse_tensor.values, folder, where))
            b.sparse_tensor.indices.CopyFrom(_inline(a.sparse_tensor.indices, folder, where))
        for field in ("f", "i", "s", "tp"):
            if a.HasField(field):
                if field == "tp":
                    b.tp.CopyFrom(a.tp)
                else:
                    setattr(b, field, getattr(a, field))
        b.floats.extend(a.floats)
        b.ints.extend(a.ints)
        b.strings.extend(a.strings)
        b.sparse_tensors.extend(a.sparse_tensors)
        b.type_protos.extend(a.type_protos)


# ---------------------------------------------------------------------------------------------
# ONNX's checker and strict shape inference; ONNX Runtime's contrib ops


def _run_checker(light: onnx.ModelProto, where: str) -> None:
    try:
        onnx.checker.check_model(light)
    except onnx.checker.ValidationError as e:
        raise InvalidModelError(f"{where}: not a valid ONNX model: {_checker_message(str(e))}") from None


def _checker_message(text: str) -> str:
    first, _, rest = text.strip().partition("\n")
    m = re.search(r"Name: (.*?) OpType: (\S*)", rest)
    if m:
        node = f"node '{m.group(1)}' ({m.group(2)})" if m.group(1) else f"a {m.group(2) or 'nameless'} node"
        return f"{node}: {first.strip()}"
    return first.strip()


def _run_shape_inference(light: onnx.ModelProto, where: str, local_functions: set[str]) -> None:
    try:
        onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as e:
        errors = [err for err in _inference_errors(str(e)) if not _onnx_function_bug(err, local_functions)]
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise InvalidModelError(
                f"{where}: not a valid ONNX model: {_readable(errors[0])}{more}"
            ) from None


_ENTRY = re.compile(r"^\(op_type:(?P<op>[^,)]*)(?:, node name: (?P<name>[^)]*))?\): (?P<text>.*)$")


def _inference_errors(text: str) -> list[str]:
    """The separate errors of an InferenceError message (one per node, nested ones kept whole)."""
    text = text.strip()
    head = "[ShapeInferenceError] Inference error(s): "
    if not text.startswith(head):
        return [text.splitlines()[0] if text else "shape inference failed"]
    return [line for line in text[len(head) :].splitlines() if line.strip()]


def _onnx_function_bug(error: str, local_functions: set[str]) -> bool:
    """An error raised inside the function body ONNX itself defines for a standard op (e.g. strict
    inference fails in MeanVarianceNormalization's body for every model): not the model's fault."""
    m = _ENTRY.match(error)
    if not m or "Inference error(s): (op_type:" not in m.group("text"):
        return False
    op = m.group("op")
    if op in _CONTROL_FLOW or op in local_functions:
        return False
    try:
        schema = onnx.defs.get_schema(op)
    except onnx.defs.SchemaError:
        return False
    # (not in onnx's type stubs, present at run time)
    return bool(
        getattr(schema, "has_function", False) or getattr(schema, "has_context_dependent_function", False)
    )


def _readable(error: str) -> str:
    def node(m: re.Match) -> str:
        return f"node '{m.group(2)}' ({m.group(1)}): " if m.group(2) else f"a {m.group(1)} node: "

    text = re.sub(r"\(op_type:([^,)]*)(?:, node name: ([^)]*))?\): ", node, error)
    text = re.sub(r"\[(Shape|Type)InferenceError\] |Inference error\(s\): ", "", text)
    return " ".join(text.split())


def _check_contrib_ops(proto: onnx.ModelProto, where: str) -> None:
    """ONNX has no schemas for ONNX Runtime's contrib ops: check their names against ORT's."""
    ms = {n.op_type: n for n in _all_nodes(proto) if n.domain == "com.microsoft"}
    if not ms:
        return
    local = {f.name for f in proto.functions if f.domain == "com.microsoft"}
    known = _ort_contrib_ops()
    for op, n in sorted(ms.items()):
        if op not in known and op not in local:
            raise InvalidModelError(
                f"{where}: {_node(n)} is not an operator of ONNX Runtime's com.microsoft domain; fix the op "
                "type (or pass --allow-custom-domains if a custom ONNX Runtime build provides it)"
            )


@functools.cache
def _ort_contrib_ops() -> frozenset[str]:
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    return frozenset(s.name for s in ort_c.get_all_operator_schema() if s.domain == "com.microsoft")
