"""Nodes against the operator schemas of the model's opsets: op, attributes, input/output counts.

A rewrite that emits an op or an attribute its model's opset does not have (``Reshape(allowzero)``
at opset 12, ``LayerNormalization`` at 16, a ``Squeeze`` with axes as an input at 12) makes a model
ONNX Runtime refuses to load. ONNX's checker would say so, but it needs the whole model serialized
(weights included); these checks read only the nodes, so the pipeline can run them after every pass
that changed the model and name the pass that broke it.

Standard domains are checked against ONNX's schemas, ``com.microsoft`` against the contrib schemas
this ONNX Runtime registers (ONNX has none for them: its checker lets any such node by; the input
validation in :mod:`graphopt.validate` uses the same checks). Other domains (model-local functions,
custom ops) are not checked. Types are left to shape inference and ONNX Runtime.

A check is keyed by the node's signature (domain, op, opset, which inputs are given, output count,
attribute names and types); a model has few distinct signatures, and each is checked once.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from typing import Any

import onnx
import onnx_ir as ir

__all__ = [
    "CONTRIB_DOMAIN",
    "Signature",
    "contrib_problem",
    "contrib_schema",
    "model_problems",
    "model_signatures",
    "node_problem",
    "node_signature",
    "ort_contrib_schemas",
    "ort_schema",
    "problem_signatures",
    "signature_problem",
]

CONTRIB_DOMAIN = "com.microsoft"
#: Domains ONNX has schemas for ("ai.onnx" is the default domain's other spelling).
_ONNX_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training"})

#: (domain, op_type, opset version or None, inputs given: their count when all are, else True/False
#: per slot, output count, attributes as (name, type or "REF") in the node's order).
Signature = tuple[str, str, "int | None", "int | tuple[bool, ...]", int, tuple[tuple[str, Any], ...]]


def node_signature(node: ir.Node, opsets: Mapping[str, int]) -> Signature:
    """What the schema checks look at, as a hashable key (cheap: it is computed for every node
    after every pass that changed the model)."""
    domain = node.domain
    if domain == "ai.onnx":
        domain = ""
    version = opsets.get(domain)
    if version is None and domain == "":
        version = opsets.get("ai.onnx")
    inputs = node.inputs
    given: int | tuple[bool, ...] = (
        len(inputs) if None not in inputs else tuple(v is not None for v in inputs)
    )
    # (onnx_ir's Attributes is a UserDict: its ``data`` dict iterates several times faster)
    attributes = getattr(node.attributes, "data", node.attributes)
    attrs = tuple((k, "REF" if a.is_ref() else a.type) for k, a in attributes.items()) if attributes else ()
    return (domain, node.op_type, version, given, len(node.outputs), attrs)


def node_problem(node: ir.Node, opsets: Mapping[str, int]) -> str | None:
    """Why ``node`` does not fit its schema at ``opsets`` (the imports of its graph), or None."""
    return signature_problem(node_signature(node, opsets))


@functools.cache
def signature_problem(sig: Signature) -> str | None:
    """Why a node of this signature does not fit its schema, or None (also for unchecked domains)."""
    domain, op_type, version, given, n_outputs, attr_types = sig
    inputs = (True,) * given if isinstance(given, int) else given
    attrs = {k: t if t == "REF" else _type_name(t) for k, t in attr_types}
    if domain not in _ONNX_DOMAINS and domain != CONTRIB_DOMAIN:
        return None
    if version is None:
        return f"{_qualified(domain, op_type)} is in domain '{domain or 'ai.onnx'}', which the model does not import"
    if domain == CONTRIB_DOMAIN:
        return contrib_problem(op_type, version, inputs, n_outputs, attrs)
    try:
        schema = onnx.defs.get_schema(op_type, version, domain)
    except onnx.defs.SchemaError:
        ort_only = ort_schema(domain, op_type, version) if domain == "" else None
        if ort_only is None:
            return f"{op_type} is not an operator of opset {version}{_since(op_type, domain, version)}"
        # An op ONNX Runtime adds to the ONNX domain (SimplifiedLayerNormalization, the ONNX
        # domain's LayerNormalization before opset 17): onnxscript's ORT fusions emit them.
        where = f"{op_type} (ONNX Runtime's, in the ONNX domain)"
        return _attribute_problem(ort_only, attrs, where, None, op_type, domain) or _io_problem(
            ort_only, inputs, n_outputs, where
        )
    if schema.deprecated:
        return f"{op_type} is deprecated at opset {version}"
    where = f"{op_type} at opset {version}"
    return _attribute_problem(schema, attrs, where, version, op_type, domain) or _io_problem(
        schema, inputs, n_outputs, where
    )


def contrib_problem(
    op_type: str, version: int, inputs: tuple[bool, ...], n_outputs: int, attrs: Mapping[str, str]
) -> str | None:
    """Why a com.microsoft node does not fit ONNX Runtime's contrib schema at ``version``, or None.
    ``attrs`` maps attribute names to type names (``"INTS"``; ``"REF"`` for a reference)."""
    schema = contrib_schema(op_type, version)
    if schema is None:
        return f"com.microsoft::{op_type} is not an operator of ONNX Runtime's com.microsoft domain (opset {version})"
    where = f"com.microsoft::{op_type}"
    return _attribute_problem(schema, attrs, where, None, op_type, CONTRIB_DOMAIN) or _io_problem(
        schema, inputs, n_outputs, where
    )


def _attribute_problem(
    schema: Any, attrs: Mapping[str, str], where: str, version: int | None, op_type: str, domain: str
) -> str | None:
    for name, kind in attrs.items():
        spec = schema.attributes.get(name)
        if spec is None:
            later = _attribute_since(op_type, domain, name, version) if version is not None else ""
            return f"{where} has no attribute '{name}'{later}"
        want = _type_name(spec.type)
        if kind != "REF" and kind != want:
            return f"attribute '{name}' of {where} must be {want}, not {kind}"
    missing = sorted(k for k, spec in schema.attributes.items() if spec.required and k not in attrs)
    if missing:
        return f"{where} lacks required attribute(s) {missing}"
    return None


def _io_problem(schema: Any, inputs: tuple[bool, ...], n_outputs: int, where: str) -> str | None:
    n = len(inputs)
    if n > schema.max_input or not schema.min_output <= n_outputs <= schema.max_output:
        return (
            f"{where} takes {_range(schema.min_input, schema.max_input)} inputs and "
            f"{_range(schema.min_output, schema.max_output)} outputs, not {n} and {n_outputs}"
        )
    single = onnx.defs.OpSchema.FormalParameterOption.Single
    for i, param in enumerate(schema.inputs):
        if param.option == single and (i >= len(inputs) or not inputs[i]):
            return f"{where} needs input {i} ('{param.name}'), which is missing"
    return None


def _range(lo: int, hi: int) -> str:
    return str(lo) if lo == hi else f"{lo}-{hi}" if hi < 2**31 - 1 else f"{lo} or more"


def _type_name(kind: Any) -> str:
    return getattr(kind, "name", None) or str(kind).rpartition(".")[2]


def _qualified(domain: str, op_type: str) -> str:
    return f"{domain}::{op_type}" if domain else op_type


def _since(op_type: str, domain: str, version: int) -> str:
    """' (it exists from opset N)' when a later opset has the op, else ''."""
    try:
        newest = onnx.defs.get_schema(op_type, domain)
    except onnx.defs.SchemaError:
        return ""
    for v in range(version + 1, newest.since_version + 1):
        try:
            onnx.defs.get_schema(op_type, v, domain)
            return f" (it exists from opset {v})"
        except onnx.defs.SchemaError:
            continue
    return ""


def _attribute_since(op_type: str, domain: str, name: str, version: int) -> str:
    """' (OP has it from opset N)' when a later version of the op has the attribute, else ''."""
    try:
        newest = onnx.defs.get_schema(op_type, domain).since_version
    except onnx.defs.SchemaError:
        return ""
    for v in range(version + 1, newest + 1):
        schema = onnx.defs.get_schema(op_type, v, domain)
        if schema.since_version == v and name in schema.attributes:
            return f" ({op_type} has it from opset {v})"
    return ""


def model_signatures(model: ir.Model) -> Iterator[tuple[ir.Node, Signature]]:
    """Each node of ``model`` (main graph, subgraphs, functions) with its signature; calls of the
    model's own functions are left out (they have no schema)."""
    local = set(model.functions)
    yield from _graph_signatures(model.graph, model.opset_imports, local)
    for f in model.functions.values():
        yield from _graph_signatures(f, {**model.opset_imports, **f.opset_imports}, local)


_SUBGRAPH_TYPES = (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)


def _graph_signatures(
    graph: ir.Graph | ir.Function, opsets: Mapping[str, int], local: set
) -> Iterator[tuple[ir.Node, Signature]]:
    # A walk of its own: the subgraphs are found from the signature's attribute types, which
    # costs less than onnx_ir's RecursiveGraphIterator looking at every attribute again.
    for node in graph:
        sig = node_signature(node, opsets)
        if not local or (node.domain, node.op_type, node.overload) not in local:
            yield node, sig
        for name, kind in sig[5]:
            if kind in _SUBGRAPH_TYPES:
                attr = node.attributes[name]
                for sub in [attr.as_graph()] if kind == ir.AttributeType.GRAPH else attr.as_graphs():
                    yield from _graph_signatures(sub, opsets, local)


def model_problems(
    model: ir.Model, tolerated: frozenset[Signature] | set[Signature] = frozenset()
) -> Iterator[tuple[ir.Node, str]]:
    """Each node of ``model`` that does not fit its schema, with why; signatures in ``tolerated``
    (what the input model already had) are passed over."""
    for node, sig in model_signatures(model):
        if sig not in tolerated:
            problem = signature_problem(sig)
            if problem is not None:
                yield node, problem


def problem_signatures(model: ir.Model) -> set[Signature]:
    """The signatures of ``model``'s nodes that do not fit their schemas."""
    return {sig for _, sig in model_signatures(model) if signature_problem(sig) is not None}


def contrib_schema(op_type: str, version: int) -> Any:
    """ONNX Runtime's schema of com.microsoft::``op_type`` at opset ``version``, or None."""
    return ort_schema(CONTRIB_DOMAIN, op_type, version)


def ort_schema(domain: str, op_type: str, version: int) -> Any:
    """The schema ONNX Runtime registers for ``domain::op_type`` at opset ``version``, or None."""
    versions = [s for s in _ort_schemas().get((domain, op_type), []) if s.since_version <= version]
    return max(versions, key=lambda s: s.since_version) if versions else None


def ort_contrib_schemas() -> dict[str, list]:
    """ONNX Runtime's com.microsoft operator schemas by op name (every version)."""
    return {op: v for (domain, op), v in _ort_schemas().items() if domain == CONTRIB_DOMAIN}


@functools.cache
def _ort_schemas() -> dict[tuple[str, str], list]:
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c

    out: dict[tuple[str, str], list] = {}
    for s in ort_c.get_all_operator_schema():
        out.setdefault(("" if s.domain == "ai.onnx" else s.domain, s.name), []).append(s)
    return out
