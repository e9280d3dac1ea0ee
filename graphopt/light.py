"""The model as ONNX's checker sees it: every large or external tensor replaced by a placeholder.

ONNX's checker and shape inference take the model as one serialized message: its C++ side would copy
every weight twice, and an external reference makes the checker look for the data file relative
to the current working directory. Weights matter to neither check, only their dtype and shape, so
:func:`light_copy` replaces large (over ``LIGHT_BYTES``) and external tensors by a Constant of an
empty sparse tensor of the same dtype and shape, or, where that cannot stand in (opsets before 11,
tensor attributes other than a Constant's value), reads the (small, already checked) data in.
"""

from __future__ import annotations

import onnx

from graphopt.errors import InvalidModelError

__all__ = ["LIGHT_BYTES", "light_copy", "without_declared_shapes"]

#: Inline tensors larger than this are not handed to the checker (a placeholder is).
LIGHT_BYTES = 1 << 20


def light_copy(proto: onnx.ModelProto, folder: str | None, where: str) -> onnx.ModelProto:
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
    _relax_unshaped_io(light.graph, opset)
    return light


def _unshaped(v: onnx.ValueInfoProto) -> bool:
    return v.type.WhichOneof("value") == "tensor_type" and not v.type.tensor_type.HasField("shape")


def _relax_unshaped_io(g: onnx.GraphProto, opset: int) -> None:
    """ONNX's checker wants a shape on every tensor the main graph takes or returns; ONNX Runtime
    does not (no shape is an unknown rank), nor does graphopt. So here an unshaped output is left
    out of the outputs (its producer is still checked, and graphopt's own checks saw it defined) and
    an unshaped input is made by a Reshape to an unknown shape, which is what shape inference
    downstream then sees: a tensor of that type and unknown rank."""
    keep = [v for v in g.output if not _unshaped(v)]
    if len(keep) != len(g.output):
        del g.output[:]
        g.output.extend(keep)
    if opset < 5:  # Reshape takes its shape as an input from opset 5
        return
    initializers = {t.name for t in g.initializer}
    reshapes = []
    for v in list(g.input):
        if not _unshaped(v) or v.name in initializers:
            continue
        name, flat, shape = v.name, f"{v.name}::flat", f"{v.name}::shape"
        v.name = flat
        v.type.tensor_type.shape.dim.add().dim_param = "graphopt::n"
        g.input.append(onnx.helper.make_tensor_value_info(shape, onnx.TensorProto.INT64, ["graphopt::rank"]))
        reshapes.append(
            onnx.helper.make_node("Reshape", [flat, shape], [name], name=f"unshaped input:{name}")
        )
    if reshapes:
        nodes = []
        for n in g.node:
            copy = onnx.NodeProto()
            copy.CopyFrom(n)
            nodes.append(copy)
        del g.node[:]
        g.node.extend(reshapes + nodes)


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


def without_declared_shapes(light: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of a light model that declares no shapes but its inputs': no value_info, and graph and
    subgraph outputs of their element type only (for shape inference, not for the checker)."""
    from graphopt.topology import all_graphs

    out = onnx.ModelProto()
    out.CopyFrom(light)
    for g, _ in all_graphs(out):
        del g.value_info[:]
        for v in g.output:
            if v.type.WhichOneof("value") == "tensor_type":
                v.type.tensor_type.ClearField("shape")
    for f in out.functions:
        del f.value_info[:]
    return out
