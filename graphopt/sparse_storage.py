"""Sparse storage of pruned weights: mostly-zero initializers written as ONNX
``sparse_initializer`` (COO) when that is smaller; ``graphopt.save`` applies it to models that
``prune(sparse_storage=true)`` marked."""

from __future__ import annotations

import numpy as np
import onnx

__all__ = ["SPARSE_STORAGE_KEY", "to_sparse_proto"]


#: Model metadata key: "1" = ``save`` stores mostly-zero weights as sparse initializers
#: (set by ``prune(sparse_storage=true)``).
SPARSE_STORAGE_KEY = "graphopt.sparse_storage"


def to_sparse_proto(proto: onnx.ModelProto, *, min_sparsity: float | None = None) -> onnx.ModelProto:
    """Move mostly-zero float initializers of the main graph to ``sparse_initializer`` (COO with
    linearized int64 indices, as the ONNX checker requires), in place; returns ``proto``.

    A tensor is stored sparse only when that is smaller: 8 index bytes plus the value per
    non-zero, so float32 above ~67 % zeros; ``min_sparsity`` raises the bar. ONNX Runtime (and
    graphopt's ``load``) densify sparse initializers when they load the model.
    """
    from onnx import numpy_helper

    graph = proto.graph
    keep = []
    moved = 0
    for t in graph.initializer:
        if (
            t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
            or t.data_location == onnx.TensorProto.EXTERNAL
        ):
            keep.append(t)
            continue
        arr = numpy_helper.to_array(t)
        nnz = int(np.count_nonzero(arr))
        sparsity = 1 - nnz / arr.size if arr.size else 0.0
        if (
            arr.size < 16
            or (min_sparsity is not None and sparsity < min_sparsity)
            or nnz * (arr.itemsize + 8) >= arr.nbytes
        ):
            keep.append(t)
            continue
        flat = arr.ravel()
        idx = np.flatnonzero(flat).astype(np.int64)
        values = numpy_helper.from_array(flat[idx], t.name)
        indices = numpy_helper.from_array(idx, t.name + "_indices")
        graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(values, indices, list(arr.shape)))
        moved += 1
    if moved:
        del graph.initializer[:]
        graph.initializer.extend(keep)
    return proto
