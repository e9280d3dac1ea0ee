"""prune sparse_storage: mostly-zero weights stored as ONNX sparse initializers, a smaller file
that graphopt and ONNX Runtime load back.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from prune_helpers import _prune, built

import graphopt
from graphopt.passes.prune import save_sparse, to_sparse_proto
from graphopt.verify import run_model

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def bert():
    return built("bert")


def test_sparse_storage_shrinks_the_file_and_loads_in_onnxruntime(tmp_path, bert):
    ex, model = bert
    pruned, _ = _prune(model, sparsity=0.9, sparse_storage=True)
    assert pruned.metadata_props.get("graphopt.sparse_storage") == "1"
    dense_path, sparse_path, auto_path = (
        tmp_path / "dense.onnx",
        tmp_path / "sparse.onnx",
        tmp_path / "auto.onnx",
    )
    graphopt.save(pruned, dense_path, sparse=False)
    size = save_sparse(pruned, str(sparse_path))
    graphopt.save(pruned, auto_path)  # the pass's metadata flag asks graphopt.save for sparse storage
    assert auto_path.read_bytes() == sparse_path.read_bytes()
    # graphopt loads its own sparse files back (densified, as ONNX Runtime does)
    reloaded = graphopt.load(sparse_path)
    np.testing.assert_array_equal(
        run_model(reloaded, ex.feeds(2, 12))[0][1], run_model(pruned, ex.feeds(2, 12))[0][1]
    )
    assert size < 0.75 * dense_path.stat().st_size  # embeddings and norms stay dense
    proto = onnx.load(str(sparse_path))
    assert len(proto.graph.sparse_initializer) >= 12
    onnx.checker.check_model(proto)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(sparse_path), providers=["CPUExecutionProvider"])
    feeds = ex.feeds(2, 12)
    got = sess.run(None, feeds)[0]
    np.testing.assert_allclose(got, run_model(pruned, feeds)[0][1], atol=1e-5)
    # at 50 % COO storage would be larger than dense: nothing is converted
    half, _ = _prune(model, sparsity=0.5)
    assert len(to_sparse_proto(half).graph.sparse_initializer) == 0
