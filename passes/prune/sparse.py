"""Sparse storage of pruned weights: the file shrinks, the graph does not change.

Unstructured pruning keeps the dense layout (ONNX Runtime's dense kernels run as before); only
storing mostly-zero initializers as ONNX sparse tensors makes the file smaller, and only above
~67 % sparsity (sparse tensors store int64 indices: 12 bytes per kept value vs 4 dense). The work
is graphopt.ir's; these are the pass family's entry points to it.
"""

from __future__ import annotations

import os
from typing import Any

import onnx_ir as ir

__all__ = ["save_sparse", "to_sparse_proto"]


def to_sparse_proto(model: ir.Model | Any, *, min_sparsity: float | None = None) -> Any:
    """``onnx.ModelProto`` with mostly-zero weights as sparse initializers (graphopt.sparse_storage.to_sparse_proto)."""
    from graphopt.sparse_storage import to_sparse_proto as _to_sparse

    proto = ir.serde.serialize_model(model) if isinstance(model, ir.Model) else model
    return _to_sparse(proto, min_sparsity=min_sparsity)


def save_sparse(model: ir.Model, path: str) -> int:
    """Write ``model`` atomically with sparse initializers (``graphopt.save(sparse=True)``); returns the file size."""
    from graphopt.ir import save

    save(model, path, sparse=True, settings=False)
    return os.path.getsize(path)
