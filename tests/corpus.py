"""Shared helpers for running models on ONNX Runtime in tests (reference semantics: no ORT rewrites)."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnxruntime as ort


def session(model_bytes: bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    return ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])


def run(model_bytes: bytes, feeds: dict[str, Any]) -> list[Any]:
    return session(model_bytes).run(None, feeds)


def assert_same(ref: Any, got: Any, rtol: float = 1e-3, atol: float = 1e-4, where: str = "") -> None:
    """Floats within rtol/atol (NaN where NaN), everything else exactly equal."""
    if isinstance(ref, list):
        assert isinstance(got, list) and len(got) == len(ref), f"{where}: sequence length differs"
        for i, (r, g) in enumerate(zip(ref, got)):
            assert_same(r, g, rtol, atol, f"{where}[{i}]")
        return
    if ref is None:
        assert got is None, f"{where}: expected None"
        return
    ref = np.asarray(ref)
    got = np.asarray(got)
    assert ref.shape == got.shape, f"{where}: shape {got.shape} != {ref.shape}"
    assert ref.dtype == got.dtype, f"{where}: dtype {got.dtype} != {ref.dtype}"
    if ref.dtype.kind == "f" or ref.dtype.kind == "c" or str(ref.dtype) in ("bfloat16",):
        r = ref.astype(np.float64)
        g = got.astype(np.float64)
        np.testing.assert_allclose(g, r, rtol=rtol, atol=atol, equal_nan=True, err_msg=where)
    else:
        np.testing.assert_array_equal(got, ref, err_msg=where)
