"""External data and sparse initializers of an input model, checked before anything reads them.

Every external reference, wherever it sits (initializers, sparse initializers' values and
indices, tensor attributes, subgraphs, local functions), is resolved against the model's folder,
never the current working directory, and refused when it is absolute, contains ``..``, goes
through a symbolic link, names a hard-linked or non-regular file, or reaches past the file's end
(the CVE-2022-25882 / CVE-2024-27318 / CVE-2026-27489 class of hole). Sparse initializers are
densified here (onnx_ir has no sparse tensors), reading their external parts through the same
checks.
"""

from __future__ import annotations

import math
import ntpath
import os
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.errors import ModelLoadError, UnsafeExternalDataError

__all__ = [
    "check_external_protos",
    "check_external_tensor",
    "densify_sparse_initializers",
    "expected_nbytes",
    "safe_relative",
]

#: Largest dense tensor a sparse initializer may expand to (what one protobuf message could hold).
MAX_DENSE_BYTES = 2**31 - 1


def _is_absolute(location: str) -> bool:
    return (
        os.path.isabs(location)
        or ntpath.isabs(location)
        or bool(ntpath.splitdrive(location)[0])
        or location.startswith(("\\", "/"))
    )


def safe_relative(location: str, folder: str, where: str, what: str) -> str:
    """Resolve ``location`` inside ``folder``; refuse absolute paths, escapes and symlinks."""
    if not location or "\x00" in location:
        raise UnsafeExternalDataError(f"{where}: {what} has an empty or invalid location")
    if _is_absolute(location):
        raise UnsafeExternalDataError(
            f"{where}: {what} location '{location}' is an absolute path; external data must "
            "be a relative path inside the model's folder"
        )
    parts = location.replace("\\", "/").split("/")
    if ".." in parts:
        raise UnsafeExternalDataError(
            f"{where}: {what} location '{location}' contains '..' and may leave the model's "
            "folder; move the data file next to the model"
        )
    root = os.path.realpath(folder)
    current = root
    for part in parts:
        if part in ("", "."):
            continue
        current = os.path.join(current, part)
        if os.path.islink(current):
            raise UnsafeExternalDataError(
                f"{where}: {what} location '{location}' goes through a symbolic link; "
                "copy the data file next to the model instead"
            )
    resolved = os.path.realpath(current)
    if os.path.commonpath([resolved, root]) != root:
        raise UnsafeExternalDataError(
            f"{where}: {what} location '{location}' resolves outside the model's folder"
        )
    return resolved


def expected_nbytes(tensor: ir.ExternalTensor) -> int:
    count = math.prod(tensor.shape.numpy())
    return math.ceil(count * tensor.dtype.bitwidth / 8)


def _check_region(
    location: str, offset: int, length: int | None, expected: int, folder: str, where: str, what: str
) -> tuple[str, int, int]:
    """The checked (path, offset, length) of an external data region."""
    path = safe_relative(location, folder, where, what)
    if not os.path.exists(path):
        raise ModelLoadError(
            f"{where}: {what} is missing: file '{location}' not found next to the model; "
            "copy the data file into the model's folder"
        )
    st = os.stat(path)
    if not os.path.isfile(path):
        raise UnsafeExternalDataError(f"{where}: {what} '{location}' is not a regular file")
    if st.st_nlink > 1:
        raise UnsafeExternalDataError(
            f"{where}: {what} '{location}' is a hard-linked file; copy it to a plain file next to the model"
        )
    length = expected if length is None else length
    if offset < 0 or length < 0:
        raise UnsafeExternalDataError(f"{where}: {what} has a negative offset or length")
    if length < expected:
        raise UnsafeExternalDataError(
            f"{where}: {what} has length {length} but its shape and dtype need {expected} bytes"
        )
    if offset + length > st.st_size:
        raise UnsafeExternalDataError(
            f"{where}: {what} reads bytes {offset}..{offset + length} of '{location}', "
            f"which has only {st.st_size} bytes; the data file is truncated or does not belong "
            "to this model"
        )
    return path, offset, length


def check_external_tensor(tensor: ir.ExternalTensor, folder: str, where: str) -> None:
    """Refuse an external reference that escapes, links, is missing or lies past the file's end."""
    what = f"external data of tensor '{tensor.name}'"
    _check_region(
        os.fspath(tensor.location),
        tensor.offset or 0,
        tensor.length,
        expected_nbytes(tensor),
        folder,
        where,
        what,
    )


# ---------------------------------------------------------------------------------------------
# The same checks on the protobuf, before it is deserialized


def tensor_protos(proto: onnx.ModelProto) -> Iterator[tuple[onnx.TensorProto, str]]:
    """Every TensorProto of the model with a description of where it sits: initializers, sparse
    initializers' values and indices, tensor attributes, in subgraphs and local functions too."""
    graphs: list[tuple[onnx.GraphProto, str]] = [(proto.graph, "")]
    nodes: list[tuple[onnx.NodeProto, str]] = [
        (n, f" in function '{f.name}'") for f in proto.functions for n in f.node
    ]
    while graphs or nodes:
        if graphs:
            g, ctx = graphs.pop()
            for t in g.initializer:
                yield t, f"initializer '{t.name}'{ctx}"
            for sp in g.sparse_initializer:
                yield sp.values, f"sparse initializer '{sp.values.name}'{ctx}"
                yield sp.indices, f"indices of sparse initializer '{sp.values.name}'{ctx}"
            nodes.extend((n, ctx) for n in g.node)
            continue
        n, ctx = nodes.pop()
        for a in n.attribute:
            where = (
                f"attribute '{a.name}' of "
                + (f"node '{n.name}' ({n.op_type})" if n.name else f"a {n.op_type} node")
                + ctx
            )
            if a.HasField("t"):
                yield a.t, where
            for t in a.tensors:
                yield t, where
            if a.HasField("sparse_tensor"):
                yield a.sparse_tensor.values, where
                yield a.sparse_tensor.indices, where
            for sp in a.sparse_tensors:
                yield sp.values, where
                yield sp.indices, where
            sub = f" in a subgraph of node '{n.name or n.op_type}'{ctx}"
            if a.HasField("g"):
                graphs.append((a.g, sub))
            graphs.extend((g, sub) for g in a.graphs)


def _external_fields(t: onnx.TensorProto, where: str, what: str) -> tuple[str, int, int | None]:
    entries = {e.key: e.value for e in t.external_data}
    try:
        offset = int(entries.get("offset") or 0)
        length = int(entries["length"]) if entries.get("length") else None
    except ValueError:
        raise UnsafeExternalDataError(f"{where}: {what} has a non-numeric offset or length") from None
    return entries.get("location", ""), offset, length


def _proto_nbytes(t: onnx.TensorProto, where: str, what: str) -> int:
    """Bytes the tensor's dims and fixed-width dtype need; refuses dtypes that cannot be external."""
    try:
        dtype = ir.DataType(t.data_type)
    except ValueError:
        raise ModelLoadError(
            f"{where}: {what}: tensor data type {t.data_type} is not an ONNX data type"
        ) from None
    if dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED):
        raise ModelLoadError(
            f"{where}: {what}: a {dtype.name} tensor cannot be stored as external data (only fixed-size "
            "types can); store it inline"
        )
    if any(d < 0 for d in t.dims):
        raise ModelLoadError(f"{where}: {what}: negative dimension in {list(t.dims)}")
    return math.ceil(math.prod(t.dims) * dtype.bitwidth / 8)


def check_external_protos(proto: onnx.ModelProto, folder: str | None, where: str) -> int:
    """Check every external reference of ``proto`` against ``folder``; returns how many there are."""
    count = 0
    for t, desc in tensor_protos(proto):
        if t.data_location != onnx.TensorProto.EXTERNAL:
            continue
        count += 1
        what = f"external data of {desc}"
        if folder is None:
            raise ModelLoadError(
                f"{where}: the model keeps weights in external data files; load it from its "
                "path or pass base_dir= the folder that holds the data files"
            )
        location, offset, length = _external_fields(t, where, what)
        _check_region(location, offset, length, _proto_nbytes(t, where, what), folder, where, what)
    return count


def _read_external(t: onnx.TensorProto, folder: str, where: str, what: str) -> onnx.TensorProto:
    """A copy of ``t`` with its external data read in (through every check)."""
    from graphopt.files import open_regular

    location, offset, length = _external_fields(t, where, what)
    path, offset, length = _check_region(
        location, offset, length, _proto_nbytes(t, where, what), folder, where, what
    )
    with open_regular(path, what, ModelLoadError) as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise UnsafeExternalDataError(f"{where}: {what}: the data file '{location}' changed while being read")
    out = onnx.TensorProto()
    out.CopyFrom(t)
    out.ClearField("external_data")
    out.data_location = onnx.TensorProto.DEFAULT
    out.raw_data = data[: _proto_nbytes(t, where, what)]
    return out


def densify_sparse_initializers(proto: onnx.ModelProto, where: str, folder: str | None) -> onnx.ModelProto:
    """Sparse initializers as dense ones (a copy; the caller's proto is untouched).

    onnx_ir has no sparse tensors and would drop them, leaving the nodes that read them without
    an input; ONNX Runtime densifies them at load time anyway, so graphopt does the same. External
    values or indices are read from the model's folder through the checks above.
    """
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    graph = out.graph
    for sp in graph.sparse_initializer:
        name = sp.values.name
        what = f"sparse initializer '{name}'"
        parts = []
        for part in (sp.values, sp.indices):
            if part.data_location == onnx.TensorProto.EXTERNAL:
                if folder is None:
                    raise ModelLoadError(
                        f"{where}: {what} keeps its data in an external file; load the model from its path "
                        "or pass base_dir= the folder that holds the data files"
                    )
                part = _read_external(part, folder, where, f"external data of {what}")
            parts.append(part)
        dims = tuple(int(d) for d in sp.dims)
        try:
            values = numpy_helper.to_array(parts[0])
            indices = numpy_helper.to_array(parts[1]).astype(np.int64)
            if any(d < 0 for d in dims):
                raise ValueError(f"negative dimension in {list(dims)}")
            if math.prod(dims) * values.dtype.itemsize > MAX_DENSE_BYTES:
                raise ValueError(f"its dense shape {list(dims)} would take over 2 GB")
            if values.ndim != 1 or indices.shape[:1] != values.shape:
                raise ValueError(
                    f"{values.shape[0] if values.ndim else 0} values but indices of shape "
                    f"{list(indices.shape)}"
                )
            dense = np.zeros(dims, dtype=values.dtype)
            if indices.ndim == 2:  # [nnz, rank] coordinates
                if indices.shape[1] != len(dims) or (indices < 0).any() or (indices >= np.array(dims)).any():
                    raise ValueError("coordinates out of range")
                dense[tuple(indices.T)] = values
            else:  # linearized indices
                if indices.size and (indices.min() < 0 or indices.max() >= dense.size):
                    raise ValueError("indices out of range")
                dense.reshape(-1)[indices] = values
        except Exception as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ModelLoadError(f"{where}: {what} is malformed ({first})") from None
        graph.initializer.append(numpy_helper.from_array(dense, name))
    del graph.sparse_initializer[:]
    return out
