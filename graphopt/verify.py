"""Numeric verification: run reference and candidate on ONNX Runtime CPU, compare every output.

ONNX Runtime's own graph optimizations are disabled by default so that the comparison checks
graphopt's rewrites, not ORT's (which could hide a bug or add differences of their own).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError

__all__ = [
    "OutputComparison",
    "VerificationResult",
    "generate_inputs",
    "load_inputs",
    "run_model",
    "verify",
]

logger = logging.getLogger("graphopt.verify")

_FLOAT_TYPES = {
    ir.DataType.FLOAT,
    ir.DataType.FLOAT16,
    ir.DataType.BFLOAT16,
    ir.DataType.DOUBLE,
}
_INDEX_OPS = {"Gather": 1, "GatherElements": 1, "GatherND": 1}
_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}
_DEFAULT_DIM = 8


# ---------------------------------------------------------------------------------------------
# Inputs


def _real_inputs(model: ir.Model) -> list[ir.Value]:
    inits = set(model.graph.initializers.values())
    return [v for v in model.graph.inputs if v not in inits]


def _index_bound(value: ir.Value, depth: int = 0) -> int | None:
    """Smallest table size among Gather-style ops that use ``value`` as indices (or None)."""
    if depth > 8:
        return None
    bound: int | None = None
    for use in value.uses():
        node, idx = use.node, use.idx
        candidate = None
        if node.op_type in _INDEX_OPS and idx == _INDEX_OPS[node.op_type] and node.domain in ("", "ai.onnx"):
            data = node.inputs[0]
            if data is not None and data.shape is not None:
                axis_attr = node.attributes.get("axis")
                axis = axis_attr.as_int() if axis_attr is not None else 0
                try:
                    dim = data.shape[axis]
                except IndexError:
                    dim = None
                if isinstance(dim, int) and dim > 0:
                    candidate = dim
        elif node.op_type in _PASS_THROUGH and idx == 0 and node.outputs:
            candidate = _index_bound(node.outputs[0], depth + 1)
        if candidate is not None:
            bound = candidate if bound is None else min(bound, candidate)
    return bound


def _concrete_shape(value: ir.Value, dims: dict[str, int]) -> list[int]:
    if value.shape is None:
        raise GraphoptError(
            f"input '{value.name}' has no declared shape; give inputs explicitly (--inputs DATA.npz)"
        )
    out = []
    for d in value.shape:
        if isinstance(d, int):
            out.append(d)
            continue
        name = getattr(d, "value", None)
        if isinstance(name, str) and name in dims:
            out.append(int(dims[name]))
        elif isinstance(name, str) and "batch" in name.lower():
            out.append(1)
        else:
            out.append(_DEFAULT_DIM)
    return out


def generate_inputs(model: Any, *, dims: dict[str, int] | None = None, seed: int = 0) -> dict[str, Any]:
    """Seeded feeds for every real graph input, from declared types and shapes.

    Floats are standard normal; token-id-like integers stay inside the table they index;
    masks are ones, positions ``arange``. Symbolic dims come from ``dims`` (default: 1 for
    names containing "batch", else 8).
    """
    from graphopt.ir import load

    model = load(model)
    dims = dict(dims or {})
    rng = np.random.default_rng(seed)
    feeds: dict[str, Any] = {}
    for value in _real_inputs(model):
        assert value.name is not None
        if not isinstance(value.type, ir.TensorType):
            raise GraphoptError(
                f"input '{value.name}' is of type {value.type}, which cannot be generated; "
                "give inputs explicitly (--inputs DATA.npz)"
            )
        dtype = value.dtype
        assert dtype is not None
        shape = _concrete_shape(value, dims)
        lname = value.name.lower()
        if dtype in _FLOAT_TYPES:
            arr = rng.standard_normal(shape).astype(dtype.numpy())
        elif dtype == ir.DataType.BOOL:
            arr = rng.integers(0, 2, shape).astype(bool)
        elif dtype == ir.DataType.STRING:
            arr = np.full(shape, "a", dtype=object)
        elif dtype.is_integer():
            np_dtype = dtype.numpy()
            if "mask" in lname:
                arr = np.ones(shape, dtype=np_dtype)
            elif "position" in lname and shape:
                arr = np.broadcast_to(np.arange(shape[-1]), shape).astype(np_dtype).copy()
            else:
                high = _index_bound(value) or 8
                arr = rng.integers(0, high, shape).astype(np_dtype)
        else:
            raise GraphoptError(
                f"input '{value.name}' has dtype {dtype.name}, which cannot be generated; "
                "give inputs explicitly (--inputs DATA.npz)"
            )
        feeds[value.name] = arr
    return feeds


def load_inputs(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read feeds from an .npz file. Never unpickles (``allow_pickle=False``)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GraphoptError(f"{path}: no such input file; give an .npz of named arrays")
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise GraphoptError(
                f"{path}: contains object arrays, which are not allowed (they would need unpickling); "
                "save plain numeric arrays"
            ) from None
        raise GraphoptError(f"{path}: not a readable .npz file ({e})") from None
    except (OSError, EOFError) as e:
        raise GraphoptError(f"{path}: not a readable .npz file ({e})") from None


# ---------------------------------------------------------------------------------------------
# Running


def run_model(model: Any, feeds: dict[str, Any], *, optimize: bool = False) -> list[tuple[str, Any]]:
    """Run on ONNX Runtime CPU and return (name, value) per graph output, in order."""
    import onnxruntime as ort

    from graphopt.ir import AUTO_EXTERNAL_BYTES, load, save, to_bytes, total_tensor_bytes

    model = load(model)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    providers = ["CPUExecutionProvider"]
    if total_tensor_bytes(model) >= AUTO_EXTERNAL_BYTES:
        with tempfile.TemporaryDirectory(prefix="graphopt-verify-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            save(model, path, external_data=True)
            session = ort.InferenceSession(path, so, providers=providers)
            outputs = session.run(None, feeds)
    else:
        session = ort.InferenceSession(to_bytes(model), so, providers=providers)
        outputs = session.run(None, feeds)
    names = [o.name for o in session.get_outputs()]
    return list(zip(names, outputs))


# ---------------------------------------------------------------------------------------------
# Comparison


@dataclasses.dataclass
class OutputComparison:
    name: str
    dtype: str
    shape: tuple[int, ...] | None
    passed: bool
    max_abs: float | None = None
    max_rel: float | None = None
    cosine: float | None = None
    sqnr_db: float | None = None
    mismatches: int | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["shape"] = list(self.shape) if self.shape is not None else None
        for k in ("max_abs", "max_rel", "cosine", "sqnr_db"):
            v = d[k]
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = str(v)
        return d


@dataclasses.dataclass
class VerificationResult:
    """Per-output comparison of a candidate model against its reference."""

    outputs: list[OutputComparison]
    passed: bool
    rtol: float
    atol: float
    error: str | None = None
    inputs: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False)

    def failure_summary(self) -> str:
        if self.error:
            return self.error
        bad = [o for o in self.outputs if not o.passed]
        if not bad:
            return "all outputs match"
        parts = []
        for o in bad[:3]:
            if o.max_abs is not None:
                parts.append(f"'{o.name}' max_abs={o.max_abs:.3g} max_rel={o.max_rel or 0:.3g}"
                             + (f" ({o.note})" if o.note else ""))
            else:
                parts.append(f"'{o.name}' {o.note or 'differs'}")
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return f"{len(bad)} of {len(self.outputs)} outputs differ (rtol={self.rtol:g}, atol={self.atol:g}): " + (
            "; ".join(parts) + more
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "rtol": self.rtol,
            "atol": self.atol,
            "error": self.error,
            "outputs": [o.to_dict() for o in self.outputs],
        }

    def table(self) -> str:
        rows = [("output", "shape", "max_abs", "max_rel", "cosine", "SQNR dB", "ok")]
        for o in self.outputs:
            rows.append((
                o.name,
                "x".join(map(str, o.shape)) if o.shape else ("-" if o.shape is None else "scalar"),
                _fmt(o.max_abs),
                _fmt(o.max_rel),
                _fmt(o.cosine, 6),
                _fmt(o.sqnr_db, 1),
                "ok" if o.passed else "FAIL" + (f" ({o.note})" if o.note else ""),
            ))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fmt(v: float | None, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf"
    return f"{v:.{digits}g}" if digits != 1 else f"{v:.1f}"


def _is_float(arr: np.ndarray) -> bool:
    return arr.dtype.kind in "fc" or arr.dtype.name in ("bfloat16", "float16")


def _compare(name: str, ref: Any, got: Any, rtol: float, atol: float) -> OutputComparison:
    if ref is None or got is None:
        ok = ref is None and got is None
        return OutputComparison(name, "optional", None, ok, note="" if ok else "one side is None")
    if isinstance(ref, list) or isinstance(got, list):
        if not (isinstance(ref, list) and isinstance(got, list)) or len(ref) != len(got):
            return OutputComparison(name, "sequence", None, False, note="sequence length differs")
        parts = [_compare(f"{name}[{i}]", r, g, rtol, atol) for i, (r, g) in enumerate(zip(ref, got))]
        bad = [p for p in parts if not p.passed]
        max_abs = max((p.max_abs for p in parts if p.max_abs is not None), default=None)
        return OutputComparison(name, "sequence", (len(ref),), not bad, max_abs=max_abs,
                                note=bad[0].note if bad else "")
    ref = np.asarray(ref)
    got = np.asarray(got)
    dtype = str(ref.dtype)
    shape = tuple(int(d) for d in ref.shape)
    if got.shape != ref.shape:
        return OutputComparison(name, dtype, shape, False, note=f"shape {tuple(got.shape)} != {shape}")
    if got.dtype != ref.dtype:
        return OutputComparison(name, dtype, shape, False, note=f"dtype {got.dtype} != {ref.dtype}")
    if ref.size == 0:
        return OutputComparison(name, dtype, shape, True, 0.0, 0.0, 1.0, math.inf, 0)
    if not _is_float(ref):
        if ref.dtype.kind in "iub":
            diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
            mism = int(np.count_nonzero(ref != got))
            return OutputComparison(name, dtype, shape, mism == 0, float(diff.max()), None, None, None, mism,
                                    "" if mism == 0 else f"{mism} elements differ")
        mism = int(np.count_nonzero(ref != got))
        return OutputComparison(name, dtype, shape, mism == 0, mismatches=mism,
                                note="" if mism == 0 else f"{mism} elements differ")
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    note = ""
    nan_r, nan_g = np.isnan(r), np.isnan(g)
    ok = True
    if not np.array_equal(nan_r, nan_g):
        ok, note = False, "NaN positions differ"
    inf_r, inf_g = np.isinf(r), np.isinf(g)
    if not np.array_equal(np.where(inf_r, r, 0), np.where(inf_g, g, 0)):
        ok, note = False, note or "infinities differ"
    finite = np.isfinite(r) & np.isfinite(g)
    rf, gf = r[finite], g[finite]
    err = np.abs(gf - rf)
    max_abs = float(err.max()) if err.size else 0.0
    max_rel = float((err / np.maximum(np.abs(rf), 1e-12)).max()) if err.size else 0.0
    if err.size and not np.all(err <= atol + rtol * np.abs(rf)):
        ok = False
        note = note or f"{int(np.count_nonzero(err > atol + rtol * np.abs(rf)))} elements out of tolerance"
    nr, ng = float(np.linalg.norm(rf)), float(np.linalg.norm(gf))
    if nr == 0 and ng == 0:
        cosine = 1.0
    elif nr == 0 or ng == 0:
        cosine = 0.0
    else:
        cosine = float(np.dot(rf.ravel(), gf.ravel()) / (nr * ng))
    noise = float(np.sum(err**2))
    signal = float(np.sum(rf**2))
    sqnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    mism = int(np.count_nonzero(err > atol + rtol * np.abs(rf)))
    return OutputComparison(name, dtype, shape, ok, max_abs, max_rel, cosine, sqnr, mism, note)


def verify(
    reference: Any,
    candidate: Any,
    inputs: dict[str, Any] | str | os.PathLike | None = None,
    *,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    dims: dict[str, int] | None = None,
    seed: int = 0,
) -> VerificationResult:
    """Compare ``candidate`` with ``reference`` on the same inputs; never raises on a mismatch.

    Raises :class:`GraphoptError` only when the reference itself cannot run (bad input).
    """
    from graphopt.ir import load

    ref_model = load(reference)
    cand_model = load(candidate)
    if inputs is None:
        feeds = generate_inputs(ref_model, dims=dims, seed=seed)
    elif isinstance(inputs, (str, os.PathLike)):
        feeds = load_inputs(inputs)
    else:
        feeds = dict(inputs)
    try:
        expected = run_model(ref_model, feeds)
    except GraphoptError:
        raise
    except Exception as e:
        raise GraphoptError(f"reference model cannot run on ONNX Runtime: {_first_line(e)}") from None
    try:
        got = run_model(cand_model, feeds)
    except Exception as e:
        return VerificationResult([], False, rtol, atol, f"candidate model cannot run on ONNX Runtime: "
                                  f"{_first_line(e)}", feeds)
    if len(got) != len(expected):
        return VerificationResult([], False, rtol, atol,
                                  f"candidate has {len(got)} outputs, reference has {len(expected)}", feeds)
    outputs = []
    for (rname, rv), (gname, gv) in zip(expected, got):
        cmp = _compare(rname, rv, gv, rtol, atol)
        if rname != gname:
            cmp.passed = False
            cmp.note = f"output name '{gname}' != '{rname}'"
        outputs.append(cmp)
    return VerificationResult(outputs, all(o.passed for o in outputs), rtol, atol, None, feeds)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:300]
    return type(e).__name__


