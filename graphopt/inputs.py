"""Generated and loaded inputs for running a model: what ``graphopt verify`` and the numeric
checks feed when the user gives no data, and the ``--inputs`` .npz reader.

Generated inputs must be ones the model can run: sizes from the ``dims`` given (or a default),
index inputs (token ids) bounded by the table they index, floats drawn normal.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError

__all__ = [
    "NON_NUMPY_FLOATS",
    "InputsError",
    "generate_inputs",
    "input_attempts",
    "load_inputs",
    "real_inputs",
    "split_batches",
    "stacked_count",
    "static_batches",
]

logger = logging.getLogger("graphopt.inputs")

#: Float types random normal feeds are generated for (4-bit types are packed; ORT's Python
#: binding cannot take them from numpy, so those inputs must be given explicitly).
_FLOAT_TYPES = frozenset(
    {
        ir.DataType.FLOAT,
        ir.DataType.FLOAT16,
        ir.DataType.BFLOAT16,
        ir.DataType.DOUBLE,
        ir.DataType.FLOAT8E4M3FN,
        ir.DataType.FLOAT8E4M3FNUZ,
        ir.DataType.FLOAT8E5M2,
        ir.DataType.FLOAT8E5M2FNUZ,
    }
)
#: Types numpy has no native dtype for (ml_dtypes provides them; ORT's binding cannot convert them).
NON_NUMPY_FLOATS = _FLOAT_TYPES - {ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE}
#: Ops whose input ``idx`` holds indices into input 0.
_INDEX_OPS = {"Gather": 1, "GatherElements": 1, "GatherND": 1}
#: Ops that pass indices through unchanged in value (input 0 → output 0).
_PASS_THROUGH = frozenset({"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"})
#: Ops a state tensor passes through on its way to an RNN (slicing out a layer or direction).
_STATE_PATH = frozenset(
    {"Identity", "Cast", "Slice", "Gather", "Split", "Squeeze", "Unsqueeze", "Reshape", "Transpose"}
)
#: RNN ops and the input positions of their initial states.
_RNN_STATE_INPUTS = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}
#: Ops that keep a scalar's value on its way to a comparison.
_VALUE_PATH = frozenset({"Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Flatten"})
_COMPARISONS = frozenset({"Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual"})
#: Symbolic dim names exporters write for "unknown" (paddle's "?"): not a shared name.
_ANONYMOUS = frozenset({"?", "-1", "None", "none"})
#: Metadata keys under which exporters record the input size (ultralytics: imgsz).
_SIZE_KEYS = frozenset({"imgsz", "img_size", "image_size", "input_size"})
_DEFAULT_DIM = 8
#: Sizes free dims grow through when the default is too small (strided/pooled nets, detectors
#: that need multiples of 32, classifiers with a fixed feature count after Flatten).
_GROW_SIZES = (16, 32, 64, 128, 224, 256, 320, 416, 512, 640, 1024)
_MAX_SIZE = 4096
#: Generated inputs stay under this many elements in all (64 MB of float32).
_MAX_ELEMENTS = 1 << 24
_MAX_ATTEMPTS = 48
_MAX_VALUES = 4
_DEFAULT_INT_HIGH = 8
_MAX_CHAIN = 16
_GIVE_INPUTS = "give inputs explicitly (an .npz of named arrays, e.g. --inputs DATA.npz)"


class InputsError(GraphoptError):
    """Inputs cannot be generated for a model, or none of the generated ones runs it: the user
    must give them (``--inputs``) or their sizes (``--dim``). ``last_error`` holds what ONNX
    Runtime said on the last attempt, when one ran."""

    def __init__(self, message: str, last_error: str | None = None) -> None:
        super().__init__(message)
        self.last_error = last_error


# ---------------------------------------------------------------------------------------------
# Inputs


def real_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs that are not initializers (those with initializers are weights, not feeds)."""
    inits = {id(v) for v in model.graph.initializers.values()}
    init_names = set(model.graph.initializers)
    return [v for v in model.graph.inputs if id(v) not in inits and v.name not in init_names]


def _constant_shape(value: ir.Value) -> tuple[int, ...] | None:
    """Shape of ``value`` if it is an initializer or a Constant's output, else None."""
    if value.const_value is not None:
        return tuple(value.const_value.shape.numpy())
    node = value.producer()
    if node is not None and node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
        attr = node.attributes.get("value")
        if attr is not None and not attr.is_ref() and attr.type == ir.AttributeType.TENSOR:
            return tuple(int(d) for d in attr.value.shape)
        for name in ("value_ints", "value_floats", "value_strings"):
            attr = node.attributes.get(name)
            if attr is not None and not attr.is_ref():
                return (len(attr.value),)
    return None


def _data_dims(data: ir.Value) -> tuple[int | None, ...] | None:
    """Static dims of a Gather's data: exact for constants, from shape info otherwise."""
    shape = _constant_shape(data)
    if shape is not None:
        return shape
    if data.shape is None:
        return None
    return tuple(d if isinstance(d, int) else None for d in data.shape)


def _gather_bound(node: ir.Node) -> int | None:
    """Exclusive upper bound for indices fed to a Gather-style ``node`` (None when unknown)."""
    data = node.inputs[0] if node.inputs else None
    if data is None:
        return None
    dims = _data_dims(data)
    if not dims:
        return None
    rank = len(dims)
    if node.op_type == "GatherND":
        attr = node.attributes.get("batch_dims")
        batch = attr.as_int() if attr is not None and not attr.is_ref() else 0
        indices = node.inputs[1]
        k = None
        if indices is not None and indices.shape is not None and len(indices.shape) > 0:
            last = indices.shape[len(indices.shape) - 1]
            k = last if isinstance(last, int) else None
        span = dims[batch : batch + k] if k is not None else dims[batch:]
        if not span or any(d is None for d in span):
            return None
        return min(span)  # type: ignore[type-var]
    attr = node.attributes.get("axis")
    axis = attr.as_int() if attr is not None and not attr.is_ref() else 0
    if axis < 0:
        axis += rank
    if not 0 <= axis < rank:
        return None
    return dims[axis]


def _index_bound(value: ir.Value, depth: int = 0) -> int | None:
    """Smallest table size among Gather-style ops that use ``value`` (through value-preserving
    ops) as indices, or None when it is not used as indices anywhere."""
    if depth > _MAX_CHAIN:
        return None
    bound: int | None = None
    for node, idx in value.uses():
        found = None
        if node.domain in ("", "ai.onnx") and _INDEX_OPS.get(node.op_type) == idx:
            found = _gather_bound(node)
        elif node.domain in ("", "ai.onnx") and node.op_type in _PASS_THROUGH and idx == 0 and node.outputs:
            found = _index_bound(node.outputs[0], depth + 1)
        if found is not None and found > 0:
            bound = found if bound is None else min(bound, found)
    return bound


def _dim_name(d: Any) -> str | None:
    """A symbolic dim's name; None for an unnamed or unknown one (no name, ``?``, a literal -1:
    exporters write those for "any size")."""
    if isinstance(d, ir.SymbolicDim) and d.value and d.value not in _ANONYMOUS:
        return d.value
    return None


def _is_fixed(d: Any) -> bool:
    """A literal size. A negative one means "any" (exporters write -1); a 0 is kept: ONNX Runtime
    holds an input declared 0 to 0."""
    return isinstance(d, int) and d >= 0


def _const_array(value: ir.Value) -> np.ndarray | None:
    """Value of an initializer or a Constant's output, else None."""
    if value.const_value is not None:
        try:
            return value.const_value.numpy()
        except Exception:  # a type numpy cannot hold: not a value a comparison could use
            return None
    node = value.producer()
    if node is None or node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for name, attr in node.attributes.items():
        if attr.is_ref():
            return None
        if name == "value" and attr.type == ir.AttributeType.TENSOR:
            return attr.value.numpy()
        if name in ("value_int", "value_float", "value_ints", "value_floats"):
            return np.asarray(attr.value)
    return None


def _if_owners(model: ir.Model) -> dict[int, ir.Node]:
    """``id(branch graph) → If node`` for every If in the model, subgraphs included."""
    owners: dict[int, ir.Node] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "If" and node.domain in ("", "ai.onnx"):
            for attr in node.attributes.values():
                if not attr.is_ref() and attr.type == ir.AttributeType.GRAPH:
                    owners[id(attr.value)] = node
    return owners


def _reaches(
    value: ir.Value, through: frozenset[str], found: Any, owners: dict[int, ir.Node], depth: int = 0
) -> list[Any]:
    """What ``found(node, index)`` returns (when not None) for uses of ``value``, following the
    outputs of ops in ``through``. Uses inside an If's branches are uses too, and a branch output
    continues as the If's output at the same position."""
    if depth > _MAX_CHAIN:
        return []
    out: list[Any] = []
    for node, idx in value.uses():
        if node.domain not in ("", "ai.onnx"):
            continue
        hit = found(node, idx)
        if hit is not None:
            out.append(hit)
        elif node.op_type in through:
            for o in node.outputs:
                out.extend(_reaches(o, through, found, owners, depth + 1))
                owner = owners.get(id(o.graph)) if o.is_graph_output() else None
                if owner is not None and o.graph is not None:
                    pos = [i for i, g in enumerate(o.graph.outputs) if g is o]
                    for i in pos:
                        if i < len(owner.outputs):
                            out.extend(_reaches(owner.outputs[i], through, found, owners, depth + 1))
    return out


def _rnn_state_use(node: ir.Node, idx: int) -> bool | None:
    return True if idx in _RNN_STATE_INPUTS.get(node.op_type, ()) else None


def _compared_constants(node: ir.Node, idx: int) -> list[Any] | None:
    """The constant a comparison holds its other operand against (``sr == 16000``)."""
    if node.op_type not in _COMPARISONS or len(node.inputs) != 2:
        return None
    other = node.inputs[1 - idx]
    arr = _const_array(other) if other is not None else None
    if arr is None or arr.dtype.kind not in "iuf" or arr.size > 4:
        return None
    return [v.item() for v in np.unique(arr.ravel())]


def _single_element(value: ir.Value) -> bool:
    return value.shape is not None and all(d == 1 for d in value.shape)


@dataclasses.dataclass
class _Layout:
    """How generated inputs are shaped and which values the search may vary.

    ``shapes`` maps each input to its dims: a fixed size, :data:`_BATCH`, or the key of a free dim
    (a symbolic dim's name, shared by every input that names it, or ``input:axis`` for an unnamed
    one). Free dims not at axis 0 are the ``grown`` ones (spatial sizes, sequence lengths). ``values``
    holds, for single-element inputs compared with constants in the graph, the constants to try.
    """

    shapes: dict[str, list[int | str]]
    grown: list[str]
    values: dict[str, list[Any]]
    hinted: list[int]


_BATCH = "\0batch"


def _layout(model: ir.Model, dims: dict[str, int]) -> _Layout:
    """Dims given by name, or ``INPUT:AXIS`` for an unnamed one, are kept as given."""
    bad = {k: v for k, v in dims.items() if int(v) < 0}
    if bad:
        raise InputsError(f"dims must be sizes >= 0, got {bad}; give e.g. --dim NAME=16")
    tensors = [v for v in real_inputs(model) if isinstance(v.type, ir.TensorType) and v.shape is not None]
    at_axis0: set[str] = set()
    for v in tensors:
        for axis, d in enumerate(v.shape or ()):
            name = _dim_name(d)
            if name is not None and axis == 0 and len(v.shape or ()) >= 2:
                at_axis0.add(name)
    shapes: dict[str, list[int | str]] = {}
    grown: list[str] = []
    values: dict[str, list[Any]] = {}
    owners = _if_owners(model)
    for v in tensors:
        assert v.shape is not None
        rank = len(v.shape)
        # An RNN's initial state: its only free dim is the batch (hidden size and directions are
        # fixed by the weights), so it must match the data's batch.
        state = any(not _is_fixed(d) and _dim_name(d) is None for d in v.shape) and bool(
            _reaches(v, _STATE_PATH, _rnn_state_use, owners)
        )
        row: list[int | str] = []
        for axis, d in enumerate(v.shape):
            name = _dim_name(d)
            given = dims.get(name if name is not None else f"{v.name}:{axis}")
            if _is_fixed(d):
                row.append(int(d))  # type: ignore[arg-type]  # an int, _is_fixed says
            elif given is not None:
                row.append(int(given))
            elif name is not None and "batch" in name.lower():
                row.append(_BATCH)
            elif name is None and (state or (axis == 0 and rank >= 2)):
                row.append(_BATCH)
            else:
                key = name if name is not None else f"{v.name}:{axis}"
                row.append(key)
                if key not in grown and not (axis == 0 and rank >= 2) and key not in at_axis0:
                    grown.append(key)
        shapes[v.name or ""] = row
        if _single_element(v):
            found = [c for cs in _reaches(v, _VALUE_PATH, _compared_constants, owners) for c in cs]
            if isinstance(v.type, ir.TensorType) and v.type.dtype == ir.DataType.BOOL:
                found = [True, False]
            if found:
                # Each constant (the branch where it matches), then one matching none (the others).
                options = list(dict.fromkeys(found))[: _MAX_VALUES - 1]
                if not isinstance(options[0], bool):
                    options.append(1 if 1 not in options else int(max(options)) + 1)
                values[v.name or ""] = options
    return _Layout(shapes, grown, values, _size_hints(model))


def _size_hints(model: ir.Model) -> list[int]:
    """Input sizes a model's metadata states (detector exports record ``imgsz``, e.g. [640, 640])."""
    hints: list[int] = []
    for key, text in model.metadata_props.items():
        if key.lower() in _SIZE_KEYS:
            hints.extend(int(t) for t in re.findall(r"\d+", text) if 0 < int(t) <= _MAX_SIZE)
    return sorted(set(hints))


def _shape_of(row: list[int | str], layout: _Layout, size: int) -> list[int]:
    """Concrete dims: fixed ones as they are, batch 1, grown ones ``size``, other free ones 8."""
    return [
        d if isinstance(d, int) else 1 if d == _BATCH else size if d in layout.grown else _DEFAULT_DIM
        for d in row
    ]


def generate_inputs(
    model: Any,
    *,
    dims: dict[str, int] | None = None,
    seed: int = 0,
    size: int | None = None,
    choice: int = 0,
) -> dict[str, Any]:
    """Seeded feeds for every real graph input, made from its declared type and shape.

    Floats are standard normal. Integers must stay valid: indices into a Gather-style table stay
    below the table size, names with "mask" get ones, names with "position" an ``arange`` along
    the last axis, other integers ``[0, 8)`` (``[1, 8)`` for a single value: a count or a rate).
    Dims come from ``dims`` by name; batch dims (named "batch", an unnamed axis 0, an RNN state's
    free dim) are 1; other symbolic, unnamed or non-positive dims are ``size`` (default 8). A
    single-element input the graph compares with constants (a sample rate checked against 8000 and
    16000) gets one of those constants, the ``choice``-th. Non-tensor inputs cannot be made up.
    :func:`input_attempts` varies ``size`` and ``choice`` to find inputs a model runs.
    """
    from graphopt.ir import load

    model = load(model)
    return _generate(model, _layout(model, dict(dims or {})), seed, size or _DEFAULT_DIM, choice)


def _generate(model: ir.Model, layout: _Layout, seed: int, size: int, choice: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    feeds: dict[str, Any] = {}
    for value in real_inputs(model):
        name = value.name or ""
        if not isinstance(value.type, ir.TensorType):
            kind = "no declared type" if value.type is None else f"type {value.type}"
            raise InputsError(
                f"input '{name}' has {kind}; only tensor inputs can be generated, so {_GIVE_INPUTS}"
            )
        if value.shape is None:
            raise InputsError(f"input '{name}' has no declared shape (unknown rank); {_GIVE_INPUTS}")
        dtype = value.type.dtype
        shape = _shape_of(layout.shapes[name], layout, size)
        lname = name.lower()
        if name in layout.values:
            options = layout.values[name]
            arr = np.full(shape, options[choice % len(options)], dtype=dtype.numpy())
        elif dtype in _FLOAT_TYPES:
            arr = rng.standard_normal(shape).astype(dtype.numpy())
        elif dtype == ir.DataType.BOOL:
            arr = rng.integers(0, 2, shape).astype(bool)
        elif dtype == ir.DataType.STRING:
            arr = np.full(shape, "a", dtype=object)
        elif dtype.is_integer() and dtype.itemsize >= 1:
            np_dtype = dtype.numpy()
            bound = _index_bound(value)
            if "mask" in lname:
                arr = np.full(shape, 1 if bound is None or bound > 1 else 0, dtype=np_dtype)
            elif "position" in lname and shape:
                pos = np.arange(shape[-1])
                if bound is not None:
                    pos = pos % bound
                arr = np.broadcast_to(pos, shape).astype(np_dtype)
            else:
                high = bound if bound is not None else _DEFAULT_INT_HIGH
                if dtype.is_signed() is False:
                    high = min(high, int(np.iinfo(np_dtype).max) + 1)
                low = 1 if bound is None and math.prod(shape) == 1 and high > 1 else 0
                arr = rng.integers(low, high, shape).astype(np_dtype)
        else:
            raise InputsError(
                f"input '{name}' has dtype {dtype.name}, which cannot be generated; {_GIVE_INPUTS}"
            )
        feeds[name] = np.array(arr, order="C")  # a copy; ascontiguousarray makes a scalar 1-D
        logger.debug("generated input %s: %s %s", name, arr.dtype, arr.shape)
    return feeds


def input_attempts(
    model: Any, *, dims: dict[str, int] | None = None, seed: int = 0
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Generated inputs to try in turn until the model runs: ``(what was varied, feeds)``.

    First the default sizes; then the sizes the model's metadata states; then the free
    non-batch dims (spatial sizes, sequence lengths) grown together through sizes that strided
    and pooled nets accept (powers of two, multiples of 32), while the inputs stay under a
    memory bound. A scalar the graph compares with constants takes each constant at every size
    before the value matching none is tried (a sample rate of 16000 at a larger size is a truer
    input than a rate of 1). Deterministic: the same model and arguments give the same attempts.
    """
    from graphopt.ir import load

    model = load(model)
    layout = _layout(model, dict(dims or {}))
    sizes = [_DEFAULT_DIM]
    if layout.grown:
        sizes += [s for s in (*layout.hinted, *_GROW_SIZES) if s not in sizes]
    sizes = [
        s
        for s in sizes
        if s == _DEFAULT_DIM
        or sum(math.prod(_shape_of(row, layout, s)) for row in layout.shapes.values()) <= _MAX_ELEMENTS
    ]
    choices = max((len(v) for v in layout.values.values()), default=1)
    phases = [range(choices - 1), range(choices - 1, choices)] if choices > 1 else [range(1)]
    n = 0
    for phase in phases:
        for size in sizes:
            for choice in phase:
                n += 1
                if n > _MAX_ATTEMPTS:
                    return
                yield _label(layout, size, choice), _generate(model, layout, seed, size, choice)


def _label(layout: _Layout, size: int, choice: int) -> str:
    parts = []
    if layout.grown:
        parts.append(f"{', '.join(layout.grown[:4])} = {size}")
    parts += [f"{name} = {vals[choice % len(vals)]}" for name, vals in layout.values.items()]
    return "; ".join(parts) or "the declared sizes"


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read feeds from an .npz file of named arrays.

    Never unpickles: object arrays are refused from their headers, as are negative or oversized
    shapes and headers that disagree with the stored size, before any data is decompressed; only a
    regular file is opened (a FIFO would block).
    """
    from graphopt.files import npz_infos, open_npz, read_npz_array

    path = os.fspath(path)
    if not os.path.lexists(path):
        raise GraphoptError(f"{path}: no such input file; give an .npz of named arrays")
    if path.endswith(".npy"):
        raise GraphoptError(
            f"{path}: holds a single array, not named arrays; save the inputs with numpy.savez"
        )
    infos = npz_infos(path)
    with open_npz(path) as zf:
        return {i.name: read_npz_array(zf, i, path) for i in infos}


# ---------------------------------------------------------------------------------------------
# Stacked samples


def static_batches(model: ir.Model) -> dict[str, tuple[int, int]]:
    """``{input: (fixed first dim, rank)}`` when every real tensor input has a fixed first dim (a
    static batch); empty when one has a symbolic one: then the batch is that one, and another
    input's fixed first dim (a recurrent state's layers) is no batch to split by."""
    out: dict[str, tuple[int, int]] = {}
    for v in real_inputs(model):
        if isinstance(v.type, ir.TensorType) and v.shape is not None and len(v.shape) >= 1:
            first = v.shape[0]
            if not (isinstance(first, int) and first > 0):
                return {}
            out[v.name or ""] = (first, len(v.shape))
    return out


def stacked_count(
    shapes: dict[str, tuple[int | None, ...]], batches: dict[str, tuple[int, int]]
) -> dict[str, int]:
    """For each array (by its shape) that stacks several of the model's static batches on its first
    axis (8 samples for a model of batch 1), how many it stacks; arrays that already fit, or whose
    rank is not the input's, are left out. ``batches``: :func:`static_batches`."""
    counts: dict[str, int] = {}
    for name, shape in shapes.items():
        spec = batches.get(name)
        if spec is None or len(shape) != spec[1] or shape[0] is None:
            continue
        b = spec[0]
        if b > 0 and shape[0] > b and shape[0] % b == 0:
            counts[name] = shape[0] // b
    return counts


def split_batches(feeds: dict[str, Any], batches: dict[str, tuple[int, int]]) -> list[dict[str, Any]]:
    """Feeds holding N stacked samples, split into the static batch the model takes (see
    :func:`static_batches`); a feed that already fits goes with every part (a shared state or
    sample rate). Unchanged (one part) when nothing stacks or the feeds stack different counts:
    then ONNX Runtime says what does not fit. A model with a symbolic batch takes the whole."""
    shapes = {name: tuple(arr.shape) for name, arr in feeds.items() if hasattr(arr, "shape")}
    counts = stacked_count(shapes, batches)
    if not counts or len(set(counts.values())) != 1:
        return [feeds]
    k = next(iter(counts.values()))
    parts = []
    for i in range(k):
        part = {}
        for name, arr in feeds.items():
            if name in counts:
                b = batches[name][0]
                part[name] = arr[i * b : (i + 1) * b]
            else:
                part[name] = arr
        parts.append(part)
    return parts
