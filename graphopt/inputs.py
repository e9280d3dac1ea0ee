"""Generated and loaded inputs for running a model: what ``graphopt verify`` and the numeric
checks feed when the user gives no data, and the ``--inputs`` .npz reader.

Generated inputs must be ones the model can run: sizes from the ``dims`` given (or a default),
index inputs (token ids) bounded by the table they index, floats drawn normal.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError

__all__ = ["NON_NUMPY_FLOATS", "generate_inputs", "load_inputs", "real_inputs"]

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
_DEFAULT_DIM = 8
_DEFAULT_INT_HIGH = 8
_MAX_CHAIN = 16
_GIVE_INPUTS = "give inputs explicitly (an .npz of named arrays, e.g. --inputs DATA.npz)"


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


def _concrete_shape(value: ir.Value, dims: dict[str, int]) -> list[int]:
    """Fill symbolic dims from ``dims`` (else 1 for batch-like names, else 8) and unknown dims with 8."""
    if value.shape is None:
        raise GraphoptError(f"input '{value.name}' has no declared shape (unknown rank); {_GIVE_INPUTS}")
    out = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(d)
            continue
        name = d.value if isinstance(d, ir.SymbolicDim) else None
        if name is not None and name in dims:
            out.append(int(dims[name]))
        elif name is not None and "batch" in name.lower():
            out.append(1)
        else:
            out.append(_DEFAULT_DIM)
    return out


def generate_inputs(model: Any, *, dims: dict[str, int] | None = None, seed: int = 0) -> dict[str, Any]:
    """Seeded feeds for every real graph input, made from its declared type and shape.

    Floats are standard normal. Integers must stay valid: indices into a Gather-style table stay
    below the table size, names with "mask" get ones, names with "position" an ``arange`` along
    the last axis, other integers ``[0, 8)``. Symbolic dims come from ``dims`` (default: 1 for
    names containing "batch", else 8). Non-tensor inputs cannot be made up and raise.
    """
    from graphopt.ir import load

    model = load(model)
    dims = dict(dims or {})
    rng = np.random.default_rng(seed)
    feeds: dict[str, Any] = {}
    for value in real_inputs(model):
        name = value.name or ""
        if not isinstance(value.type, ir.TensorType):
            kind = "no declared type" if value.type is None else f"type {value.type}"
            raise GraphoptError(
                f"input '{name}' has {kind}; only tensor inputs can be generated, so {_GIVE_INPUTS}"
            )
        dtype = value.type.dtype
        shape = _concrete_shape(value, dims)
        lname = name.lower()
        if dtype in _FLOAT_TYPES:
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
                arr = rng.integers(0, high, shape).astype(np_dtype)
        else:
            raise GraphoptError(
                f"input '{name}' has dtype {dtype.name}, which cannot be generated; {_GIVE_INPUTS}"
            )
        feeds[name] = np.ascontiguousarray(arr)
        logger.debug("generated input %s: %s %s", name, arr.dtype, arr.shape)
    return feeds


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
# Running
