"""The input model against the ONNX spec, before any pass runs.

An invalid model reaching the passes makes them crash (exit 3) or, worse, "optimize" and write a
model nobody can run (exit 0). So :func:`validate_model` refuses it first, with one line saying
what is wrong and where (node, value or tensor), using ONNX's own checker and strict shape and
type inference where they cover it, and graphopt's own checks where they fall short:

* text fields must be UTF-8 (protobuf requires it; the Python runtime hands out ``bytes`` for a
  broken one, which later breaks serialization) and string attributes decodable (onnx_ir keeps
  them as ``str``);
* every node input, subgraph reference and graph output must name a defined value, with no cycle
  (:mod:`graphopt.topology`): the checker only reports "not topologically sorted" for all of
  these, while a graph merely listed out of order is fine for ONNX Runtime, so graphopt sorts it;
* tensor data must match its dims and dtype exactly (the checker lets more data than the shape
  needs pass, which the IR cannot reshape), declared element types must be ONNX data types;
* calls of model-local functions must name a function and fit its inputs and outputs;
* contrib ops (``com.microsoft``) must match a schema this ONNX Runtime registers (name, opset,
  input/output counts, attributes): ONNX has no schemas for them, so the checker lets anything by.

What none of these catch (ONNX's shape inference does not check, say, a Conv bias's length) is
caught when a pass fails on it: ``optimize`` then asks ONNX Runtime whether it can run the input,
and reports bad input (exit 2) when it cannot either.

Validation is cheap for big models: weights are never handed to the checker (its C++ side would
copy the whole model twice); large and external tensors are replaced, in a light copy
(:mod:`graphopt.light`), by placeholders of the same dtype and shape.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator
from typing import Any

import onnx
import onnx_ir as ir
from google.protobuf.message import Message

from graphopt.errors import InvalidModelError, UnsupportedModelError
from graphopt.light import light_copy, without_declared_shapes
from graphopt.schemas import contrib_problem, contrib_schema, ort_contrib_schemas
from graphopt.topology import all_graphs, all_nodes, check_structure, describe_node

__all__ = ["KNOWN_DOMAINS", "check_supported", "validate_model"]

logger = logging.getLogger("graphopt.validate")

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

_CONTROL_FLOW = frozenset({"If", "Loop", "Scan", "SequenceMap"})


def validate_model(
    proto: onnx.ModelProto, where: str, *, folder: str | None = None, allow_custom_domains: bool = False
) -> onnx.ModelProto:
    """Refuse ``proto`` unless it is valid ONNX; returns it, or a fixed-up copy (nodes in
    topological order, Constant string attributes as string tensors). The caller's proto is
    never modified. External data must have been checked already (graphopt.external)."""
    _check_text(proto, where)
    _check_tensors(proto, where)
    _check_value_types(proto, where)
    work = proto
    if _needs_rewrite(proto, where):
        work = onnx.ModelProto()
        work.CopyFrom(proto)
        check_structure(work, where, apply=True)
        _normalize_string_constants(work, where)
    light = light_copy(work, folder, where)
    _run_checker(light, where)
    inferred, stale = _run_shape_inference(light, where, {f.name for f in proto.functions})
    _check_function_calls(proto, where, allow_custom_domains)
    _check_contrib_ops(proto, where, allow_custom_domains, inferred)
    if stale:
        # Like ONNX Runtime, use the inferred shapes, not the stale declared ones: passes must not
        # trust them, and the output must not carry them.
        if work is proto:
            work = onnx.ModelProto()
            work.CopyFrom(proto)
        _forget_declared_shapes(work, inferred)
    return work


def _forget_declared_shapes(proto: onnx.ModelProto, inferred: onnx.ModelProto | None) -> None:
    """Drop every value_info, and declare the graph outputs with their inferred shapes (none where
    inference has none); subgraph outputs keep their element types only."""
    for g, ctx in all_graphs(proto):
        del g.value_info[:]
        if ctx:
            for v in g.output:
                if v.type.WhichOneof("value") == "tensor_type":
                    v.type.tensor_type.ClearField("shape")
    for f in proto.functions:
        del f.value_info[:]
    found = {v.name: v for v in inferred.graph.output} if inferred is not None else {}
    for v in proto.graph.output:
        if v.type.WhichOneof("value") != "tensor_type":
            continue
        v.type.tensor_type.ClearField("shape")
        new = found.get(v.name)
        if new is not None and new.type.tensor_type.HasField("shape"):
            v.type.tensor_type.shape.CopyFrom(new.type.tensor_type.shape)


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
    newest_ml = onnx.defs.onnx_ml_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise UnsupportedModelError(
                f"{where}: opset {opset.version} is newer than this onnx package supports "
                f"({newest}); upgrade onnx or export with opset <= {newest}"
            )
        if opset.domain == "ai.onnx.ml" and opset.version > newest_ml:
            raise UnsupportedModelError(
                f"{where}: ai.onnx.ml opset {opset.version} is newer than this onnx package supports "
                f"({newest_ml}); upgrade onnx or export with ai.onnx.ml opset <= {newest_ml}"
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


def _node_domains(proto: onnx.ModelProto) -> Iterator[tuple[str, str]]:
    seen = set()
    for n in all_nodes(proto):
        if n.domain not in seen:
            seen.add(n.domain)
            yield n.domain, n.op_type


def _needs_rewrite(proto: onnx.ModelProto, where: str) -> bool:
    """Check the structure (raising on what is invalid); True when the nodes need sorting or a
    Constant's string attribute needs rewriting."""
    unsorted = check_structure(proto, where, apply=False)
    return unsorted or any(
        n.op_type == "Constant"
        and any(a.name in ("value_string", "value_strings") for a in n.attribute)
        and any(_undecodable(a) for a in n.attribute)
        for n in all_nodes(proto)
    )


def _undecodable(a: onnx.AttributeProto) -> bool:
    try:
        for s in [a.s] if a.type == a.STRING else list(a.strings):
            s.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


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
    for n in all_nodes(proto):
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


def _check_value_types(proto: onnx.ModelProto, where: str) -> None:
    """Declared element types of graph inputs, outputs and value_info must be ONNX data types
    (shape inference stops at the first bad one with a bare ValueError that names nothing)."""

    def element_types(t: onnx.TypeProto) -> Iterator[int]:
        kind = t.WhichOneof("value")
        if kind in ("tensor_type", "sparse_tensor_type"):
            yield getattr(t, kind).elem_type
        elif kind == "sequence_type":
            yield from element_types(t.sequence_type.elem_type)
        elif kind == "optional_type":
            yield from element_types(t.optional_type.elem_type)
        elif kind == "map_type":
            yield t.map_type.key_type
            yield from element_types(t.map_type.value_type)

    values = [(v, ctx) for g, ctx in all_graphs(proto) for v in (*g.input, *g.output, *g.value_info)]
    values += [(v, f" in function '{f.name}'") for f in proto.functions for v in f.value_info]
    for v, ctx in values:
        for dtype in element_types(v.type):
            try:
                known = ir.DataType(dtype) != ir.DataType.UNDEFINED
            except ValueError:
                known = False
            if not known:
                raise InvalidModelError(
                    f"{where}: value '{v.name}'{ctx} is declared with element type {dtype}, which is not an "
                    "ONNX data type"
                ) from None


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


def _run_shape_inference(
    light: onnx.ModelProto, where: str, local_functions: set[str]
) -> tuple[onnx.ModelProto | None, bool]:
    """Strict shape and type inference; returns the model with what it inferred (None when it
    cannot say more than that the model is valid) and whether a declared shape was stale.

    A declared shape (a graph or subgraph output, value_info) that contradicts the inferred one is
    not refused: ONNX Runtime warns and uses the inferred shape, and exporters leave such stale
    shapes behind (a contradicting element type is refused: ONNX Runtime refuses it). Such a
    conflict can stop inference before it reaches the rest of the graph, so inference then runs
    again on a copy that declares no shapes but the inputs', and that run's verdict counts."""
    try:
        return _strict_inference(light, where, local_functions), False
    except _DeclaredShapeConflict as conflict:
        logger.info("%s: %s (ONNX Runtime ignores the declared shape; so does this check)", where, conflict)
    undeclared = without_declared_shapes(light)
    try:
        return _strict_inference(undeclared, where, local_functions), True
    except _DeclaredShapeConflict:  # the inputs' own declared shapes against their initializers
        return None, True


class _DeclaredShapeConflict(Exception):
    pass


def _strict_inference(model: onnx.ModelProto, where: str, local_functions: set[str]) -> onnx.ModelProto:
    # data_prop: shapes computed from constants (a Reshape target made by a Concat) are checked too
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError) as e:
        errors = [err for err in _inference_errors(str(e)) if not _onnx_function_bug(err, local_functions)]
        conflicts = [err for err in errors if _SHAPE_CONFLICT in err]
        errors = [err for err in errors if _SHAPE_CONFLICT not in err]
        if errors:
            more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
            raise InvalidModelError(
                f"{where}: not a valid ONNX model: {_readable(errors[0])}{more}"
            ) from None
        if conflicts:
            raise _DeclaredShapeConflict(_readable(conflicts[0])) from None
        # only ONNX's own function-body errors: what can be inferred besides them
        try:
            return onnx.shape_inference.infer_shapes(model)
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError):
            return model


_SHAPE_CONFLICT = "Inferred shape and existing shape differ"
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


def _check_function_calls(proto: onnx.ModelProto, where: str, allow_custom_domains: bool) -> None:
    """Calls of model-local functions: the function exists and takes that many inputs and outputs
    (ONNX's checker does not look at call sites; ONNX Runtime refuses such a call)."""
    functions = {(f.domain, f.name, f.overload): f for f in proto.functions}
    domains = {f.domain for f in proto.functions}
    for n in all_nodes(proto):
        f = functions.get((n.domain, n.op_type, n.overload))
        if f is None:
            if n.domain in domains and n.domain not in KNOWN_DOMAINS and not allow_custom_domains:
                raise InvalidModelError(
                    f"{where}: {describe_node(n)} calls '{n.domain}::{n.op_type}', which no function of the model defines"
                )
            continue
        if len(n.input) > len(f.input) or len(n.output) > len(f.output):
            raise InvalidModelError(
                f"{where}: {describe_node(n)} calls function '{f.name}' with {len(n.input)} inputs and {len(n.output)} "
                f"outputs; it takes at most {len(f.input)} and {len(f.output)}"
            )
        for i, formal in enumerate(f.input):
            if (i >= len(n.input) or not n.input[i]) and _required_in_body(f, formal, proto):
                raise InvalidModelError(
                    f"{where}: {describe_node(n)} gives no value for input '{formal}' of function '{f.name}', "
                    "which its body needs"
                )


def _required_in_body(f: onnx.FunctionProto, formal: str, proto: onnx.ModelProto) -> bool:
    """Whether a node of ``f``'s body takes ``formal`` as a required (not optional) input."""
    versions = {o.domain: o.version for o in (*proto.opset_import, *f.opset_import)}
    for n in f.node:
        for i, name in enumerate(n.input):
            if name != formal:
                continue
            try:
                schema = onnx.defs.get_schema(n.op_type, versions.get(n.domain, 1), n.domain)
            except onnx.defs.SchemaError:
                return True  # a call of another function or an unknown op: take it as required
            option = schema.inputs[min(i, len(schema.inputs) - 1)].option if schema.inputs else None
            if option != onnx.defs.OpSchema.FormalParameterOption.Optional:
                return True
    return False


def _check_contrib_ops(
    proto: onnx.ModelProto, where: str, allow_custom_domains: bool, inferred: onnx.ModelProto | None = None
) -> None:
    """ONNX has no schemas for ONNX Runtime's contrib ops, so its checker lets any com.microsoft
    node through: check the opset version, op names, input/output counts and attributes against
    the schemas this ONNX Runtime registers (types are left to it)."""
    version = next((o.version for o in proto.opset_import if o.domain == "com.microsoft"), None)
    nodes = [n for n in all_nodes(proto) if n.domain == "com.microsoft"]
    if version is None and not nodes:
        return
    schemas = ort_contrib_schemas()
    newest = max(s.since_version for versions in schemas.values() for s in versions)
    if version is not None and version > newest:
        raise UnsupportedModelError(
            f"{where}: com.microsoft opset {version} is newer than this ONNX Runtime knows ({newest}); "
            f"import com.microsoft opset {newest}"
        )
    if allow_custom_domains:
        return
    local = {f.name for f in proto.functions if f.domain == "com.microsoft"}
    for n in nodes:
        if n.op_type in local:
            continue
        attrs = {
            a.name: "REF" if a.ref_attr_name else onnx.AttributeProto.AttributeType.Name(a.type)
            for a in n.attribute
        }
        problem = contrib_problem(
            n.op_type, version or newest, tuple(bool(i) for i in n.input), len(n.output), attrs
        )
        if problem is not None:
            hint = (
                "; fix the op type (or pass --allow-custom-domains if a custom ONNX Runtime build provides it)"
                if contrib_schema(n.op_type, version or newest) is None
                else ""
            )
            raise InvalidModelError(f"{where}: {describe_node(n)}: {problem}{hint}")
        s = contrib_schema(n.op_type, version or newest)
        if inferred is not None:
            _check_contrib_types(n, s, _value_types(inferred), where)


def _value_types(inferred: onnx.ModelProto) -> dict[str, str]:
    """ONNX Runtime's type string (``tensor(float)``) of every main-graph value shape inference typed."""
    out = {}
    for t in inferred.graph.initializer:
        if t.data_type in _TYPE_NAMES:
            out[t.name] = f"tensor({_TYPE_NAMES[t.data_type]})"
    for v in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if v.type.WhichOneof("value") == "tensor_type" and v.type.tensor_type.elem_type in _TYPE_NAMES:
            out[v.name] = f"tensor({_TYPE_NAMES[v.type.tensor_type.elem_type]})"
    return out


def _check_contrib_types(n: onnx.NodeProto, schema: Any, types: dict[str, str], where: str) -> None:
    """The input types of a contrib node against its schema's type constraints (where known)."""
    if not schema.inputs:
        return
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    bound: dict[str, tuple[str, str]] = {}
    for i, name in enumerate(n.input):
        if not name or name not in types:
            continue
        param = schema.inputs[min(i, len(schema.inputs) - 1)].typeStr
        ok = allowed.get(param, {param})
        if types[name] not in ok:
            raise InvalidModelError(
                f"{where}: {describe_node(n)}: input '{name}' is {types[name]}, which com.microsoft::{n.op_type} "
                f"does not take there ({', '.join(sorted(ok))})"
            )
        if param in allowed:
            first = bound.setdefault(param, (name, types[name]))
            if first[1] != types[name]:
                raise InvalidModelError(
                    f"{where}: {describe_node(n)}: inputs '{first[0]}' ({first[1]}) and '{name}' ({types[name]}) "
                    "must have the same type"
                )


_TYPE_NAMES = {
    onnx.TensorProto.FLOAT: "float",
    onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.INT8: "int8",
    onnx.TensorProto.UINT16: "uint16",
    onnx.TensorProto.INT16: "int16",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.STRING: "string",
    onnx.TensorProto.BOOL: "bool",
    onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.DOUBLE: "double",
    onnx.TensorProto.UINT32: "uint32",
    onnx.TensorProto.UINT64: "uint64",
    onnx.TensorProto.BFLOAT16: "bfloat16",
}
