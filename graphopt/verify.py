"""Numeric verification: run reference and candidate on ONNX Runtime CPU, compare every output.

This is how graphopt proves that an optimization preserved a model's meaning. ONNX Runtime's
own graph optimizations are disabled by default so that the comparison checks graphopt's
rewrites, not ORT's (which could hide a bug or add differences of their own).
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import logging
import math
import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError
from graphopt.inputs import (
    NON_NUMPY_FLOATS,
    InputsError,
    input_attempts,
    load_inputs,
    split_batches,
    static_batches,
)

__all__ = [
    "OutputComparison",
    "VerificationResult",
    "ort_error_text",
    "run_model",
    "runnable_inputs",
    "verify",
]

logger = logging.getLogger("graphopt.verify")


def _ir_dtype_of_ort_type(type_str: str) -> ir.DataType | None:
    """``tensor(bfloat16)`` → DataType.BFLOAT16 for types numpy lacks natively, else None."""
    if not (type_str.startswith("tensor(") and type_str.endswith(")")):
        return None
    dt = ir.DataType.__members__.get(type_str[len("tensor(") : -1].upper())
    return dt if dt in NON_NUMPY_FLOATS else None


def _to_feed(value: Any) -> Any:
    """numpy arrays of ml_dtypes types (bfloat16, float8) become OrtValues: ORT's binding
    cannot convert them itself."""
    import onnxruntime as ort

    if isinstance(value, np.ndarray) and value.dtype.kind == "V":
        try:
            dt = ir.DataType.from_numpy(value.dtype)
        except Exception:
            return value
        if dt in NON_NUMPY_FLOATS:
            raw = np.ascontiguousarray(value).view(np.uint8 if dt.itemsize == 1 else np.uint16)
            return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(raw, onnx_element_type=int(dt))
    return value


def _ortvalue_to_numpy(value: Any, dt: ir.DataType) -> np.ndarray:
    """Copy a CPU OrtValue of a type numpy lacks (bfloat16, float8) into an ml_dtypes array."""
    nbytes = value.tensor_size_in_bytes()
    raw = bytes((ctypes.c_char * nbytes).from_address(value.data_ptr())) if nbytes else b""
    bits = np.uint8 if dt.itemsize == 1 else np.uint16
    return np.frombuffer(raw, dtype=bits).view(dt.numpy()).reshape(value.shape()).copy()


def _run_session(session: Any, feeds: dict[str, Any]) -> list[tuple[str, Any]]:
    import onnxruntime as ort

    wanted = [i.name for i in session.get_inputs()]
    ignored = sorted(set(feeds) - set(wanted))
    if ignored:
        logger.debug("ignoring feeds the model does not take: %s", ", ".join(ignored))
    feeds = {k: _to_feed(v) for k, v in feeds.items() if k in wanted}
    outs = session.get_outputs()
    special = {o.name: dt for o in outs if (dt := _ir_dtype_of_ort_type(o.type)) is not None}
    plain = [o.name for o in outs if o.name not in special]
    values: dict[str, Any] = {}
    if plain:
        values.update(zip(plain, session.run(plain, feeds)))
    if special:
        ort_feeds = {
            k: v if isinstance(v, ort.OrtValue) else ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v))
            for k, v in feeds.items()
        }
        names = list(special)
        for name, v in zip(names, session.run_with_ort_values(names, ort_feeds)):
            values[name] = _ortvalue_to_numpy(v, special[name])
    return [(o.name, values[o.name]) for o in outs]


@contextlib.contextmanager
def _session(model: ir.Model, *, optimize: bool = False) -> Iterator[Any]:
    """An ONNX Runtime CPU session for ``model``: ORT's graph optimizations off unless ``optimize``
    (so they neither hide nor cause differences); models near protobuf's 2 GB limit are run from
    a temporary file with external data."""
    import onnxruntime as ort

    from graphopt.ir import AUTO_EXTERNAL_BYTES, save, to_bytes, total_tensor_bytes

    so = ort.SessionOptions()
    so.log_severity_level = 4  # failures come back as exceptions; graphopt reports them (one line)
    so.use_deterministic_compute = True
    so.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    providers = ["CPUExecutionProvider"]
    if total_tensor_bytes(model) >= AUTO_EXTERNAL_BYTES:
        with tempfile.TemporaryDirectory(prefix="graphopt-verify-") as tmp:
            path = os.path.join(tmp, "model.onnx")
            save(model, path, external_data=True)
            logger.debug("running %s with external data", path)
            yield ort.InferenceSession(path, so, providers=providers)
        return
    yield ort.InferenceSession(to_bytes(model), so, providers=providers)


def run_model(model: Any, feeds: dict[str, Any], *, optimize: bool = False) -> list[tuple[str, Any]]:
    """Run ``model`` on ONNX Runtime CPU and return ``(name, value)`` per graph output, in order.

    ORT's graph optimizations are off unless ``optimize`` (so they neither hide nor cause
    differences). Models near protobuf's 2 GB limit are run from a temporary file with external
    data. Feeds the model does not take are ignored.
    """
    from graphopt.ir import load

    with _session(load(model), optimize=optimize) as session:
        return _run_session(session, feeds)


def _first_running(
    session: Any, model: ir.Model, dims: dict[str, int] | None, seed: int
) -> tuple[dict[str, Any], list[tuple[str, Any]]]:
    """The first of :func:`graphopt.inputs.input_attempts` that ``session`` runs, with its outputs.

    Only a failure while a node runs (a size or value the graph cannot take) moves on to the next
    attempt; one before any node runs (the feeds against the declared inputs) cannot improve.
    """
    tried = 0
    last = label = ""
    for label, feeds in input_attempts(model, dims=dims, seed=seed):
        tried += 1
        try:
            outputs = _run_session(session, feeds)
        except Exception as e:  # whatever ONNX Runtime says: the next attempt, or the error below
            last = ort_error_text(e)
            logger.debug("generated inputs (%s) do not run: %s", label, last)
            if "while running" not in str(e):
                break
            continue
        if tried > 1:
            logger.info("generated inputs run with %s", label)
        return feeds, outputs
    what = (
        f"{tried} generated input sets, the last with {label}" if tried > 1 else f"generated inputs ({label})"
    )
    raise InputsError(
        f"reference model cannot run on ONNX Runtime: {last} (tried {what}); give real inputs with "
        "--inputs FILE.npz (named arrays) or sizes with --dim NAME=SIZE (INPUT:AXIS=SIZE for an unnamed dim)",
        last_error=last,
    )


def runnable_inputs(model: Any, *, dims: dict[str, int] | None = None, seed: int = 0) -> dict[str, Any]:
    """Generated inputs ``model`` runs on (see :func:`graphopt.inputs.input_attempts`): the
    default sizes, else grown free dims and the values the graph compares scalars with.
    Raises :class:`~graphopt.inputs.InputsError` (exit 2) when none runs."""
    from graphopt.ir import load

    model = load(model)
    with _reference_session(model) as session:
        return _first_running(session, model, dims, seed)[0]


@contextlib.contextmanager
def _reference_session(model: ir.Model) -> Iterator[Any]:
    try:
        with _session(model) as session:
            yield session
    except GraphoptError:
        raise
    except Exception as e:
        raise GraphoptError(f"reference model cannot run on ONNX Runtime: {ort_error_text(e)}") from None


def ort_refusal(
    model: Any, *, inputs: dict[str, Any] | None = None, dims: dict[str, int] | None = None
) -> str | None:
    """Why ONNX Runtime cannot load ``model`` or run it (one line), or None when it can: on the
    caller's ``inputs`` when given (the user's data decides, not inputs made up here), else on
    generated ones (sized by ``dims``). The oracle for input that ONNX's checker lets through but
    that is invalid all the same (a Conv bias of the wrong length): asked only after a pass failed
    on the model."""
    from graphopt.ir import load

    try:
        model = load(model)
        with _session(model) as session:
            if inputs is not None:
                _run_session(session, inputs)
                return None
            try:
                _first_running(session, model, dims, 0)
            except InputsError as e:  # inputs that cannot be made up: loading it is all that can be tried
                return e.last_error or None
    except Exception as e:  # whatever ONNX Runtime says
        return ort_error_text(e)
    return None


#: ``[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : `` (repeated inside nested statuses).
_ORT_PREFIX = re.compile(r"\[ONNXRuntimeError\] : \d+ : \w+ : ")
#: ``/onnxruntime_src/.../reshape_helper.h:47 onnxruntime::ReshapeHelper::ReshapeHelper(...) ``.
_ORT_SOURCE = re.compile(r"\S*/\S+\.(?:cc|h|cpp|hpp):\d+ [^()]*\([^()]*\)(?: const)? ")
_MAX_MESSAGE = 400


def ort_error_text(e: BaseException) -> str:
    """ONNX Runtime's message as one whole line: status prefixes and C++ source locations
    dropped; a very long one cut at a sentence end, never mid-sentence."""
    text = " ".join(str(e).split())
    text = _ORT_SOURCE.sub("", _ORT_PREFIX.sub("", text)).strip()
    if not text:
        return type(e).__name__
    if len(text) > _MAX_MESSAGE:
        cut = text.rfind(". ", 0, _MAX_MESSAGE)
        text = text[: cut + 1] + " (...)" if cut > 0 else text
    return text


# ---------------------------------------------------------------------------------------------
# Results


def _json_float(v: float | None) -> float | str | None:
    """inf/nan as strings, so ``json.dumps(..., allow_nan=False)`` accepts the result."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else str(v)


@dataclasses.dataclass
class OutputComparison:
    """How one output of the candidate compares with the reference's."""

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
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape) if self.shape is not None else None,
            "passed": self.passed,
            "max_abs": _json_float(self.max_abs),
            "max_rel": _json_float(self.max_rel),
            "cosine": _json_float(self.cosine),
            "sqnr_db": _json_float(self.sqnr_db),
            "mismatches": self.mismatches,
            "note": self.note,
        }


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
        """One line: the error, or the first failing outputs with their worst differences."""
        if self.error:
            return self.error
        bad = [o for o in self.outputs if not o.passed]
        if not bad:
            return f"all {len(self.outputs)} outputs match (rtol={self.rtol:g}, atol={self.atol:g})"
        parts = []
        for o in bad[:3]:
            text = f"'{o.name}'"
            if o.max_abs is not None:
                text += f" max_abs={_fmt(o.max_abs)}"
            if o.max_rel is not None:
                text += f" max_rel={_fmt(o.max_rel)}"
            if o.note:
                text += f" ({o.note})"
            parts.append(text)
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        return (
            f"{len(bad)} of {len(self.outputs)} outputs differ (rtol={self.rtol:g}, atol={self.atol:g}): "
            + "; ".join(parts)
            + more
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe summary (no inputs; non-finite floats as strings)."""
        return {
            "passed": self.passed,
            "rtol": _json_float(self.rtol),
            "atol": _json_float(self.atol),
            "error": self.error,
            "outputs": [o.to_dict() for o in self.outputs],
        }

    def table(self) -> str:
        """Compact aligned table: output, shape, max_abs, max_rel, cosine, SQNR dB, ok/FAIL."""
        rows = [("output", "shape", "max_abs", "max_rel", "cosine", "SQNR dB", "ok")]
        for o in self.outputs:
            if o.shape is None:
                shape = "-"
            else:
                shape = "x".join(map(str, o.shape)) if o.shape else "scalar"
            rows.append(
                (
                    o.name,
                    shape,
                    _fmt(o.max_abs),
                    _fmt(o.max_rel),
                    _fmt(o.cosine, 6),
                    _fmt(o.sqnr_db, fixed=True),
                    "ok" if o.passed else "FAIL" + (f" ({o.note})" if o.note else ""),
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        if self.error:
            lines.append(f"error: {self.error}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _fmt(v: float | None, digits: int = 3, *, fixed: bool = False) -> str:
    if v is None:
        return "-"
    if math.isnan(v) or math.isinf(v):
        return str(v)
    return f"{v:.1f}" if fixed else f"{v:.{digits}g}"


# ---------------------------------------------------------------------------------------------
# Comparison


def _is_float(dtype: np.dtype) -> bool:
    if dtype.kind in "fc":
        return True
    return dtype.kind == "V" and dtype.name.startswith(("bfloat", "float"))


def _float_metrics(
    name: str, dtype: str, shape: tuple[int, ...], ref: np.ndarray, got: np.ndarray, rtol: float, atol: float
) -> OutputComparison:
    """NaNs and infinities must match exactly; finite values within ``atol + rtol * |ref|``."""
    wide = np.complex128 if ref.dtype.kind == "c" else np.float64
    r = ref.astype(wide).ravel()
    g = got.astype(wide).ravel()
    notes = []
    ok = True
    nan_r, nan_g = np.isnan(r), np.isnan(g)
    if not np.array_equal(nan_r, nan_g):
        ok = False
        notes.append(f"NaN at {int(np.count_nonzero(nan_r != nan_g))} positions differ")
    inf_r, inf_g = np.isinf(r), np.isinf(g)
    inf_bad = (inf_r | inf_g) & ~(nan_r | nan_g) & ~((inf_r & inf_g) & (r == g))
    if np.any(inf_bad):
        ok = False
        notes.append(f"infinities at {int(np.count_nonzero(inf_bad))} positions differ")
    finite = np.isfinite(r) & np.isfinite(g)
    rf, gf = r[finite], g[finite]
    err = np.abs(gf - rf)
    mag = np.abs(rf)
    out_of_tol = err > atol + rtol * mag
    n_bad = int(np.count_nonzero(out_of_tol))
    if n_bad:
        ok = False
        notes.append(f"{n_bad} of {r.size} elements out of tolerance")
    max_abs = float(err.max()) if err.size else 0.0
    max_rel = float((err / np.maximum(mag, 1e-12)).max()) if err.size else 0.0
    nr, ng = float(np.linalg.norm(rf)), float(np.linalg.norm(gf))
    if nr == 0 and ng == 0:
        cosine = 1.0
    elif nr == 0 or ng == 0:
        cosine = 0.0
    else:
        cosine = float(np.real(np.vdot(rf, gf)) / (nr * ng))
    noise = float(np.sum(err**2))
    signal = nr**2
    if noise == 0:
        sqnr = math.inf
    elif signal == 0:
        sqnr = -math.inf
    else:
        sqnr = 10 * math.log10(signal / noise)
    mismatches = n_bad + int(np.count_nonzero((nan_r != nan_g) | inf_bad))
    return OutputComparison(
        name, dtype, shape, ok, max_abs, max_rel, cosine, sqnr, mismatches, "; ".join(notes)
    )


def _compare(name: str, ref: Any, got: Any, rtol: float, atol: float) -> OutputComparison:
    """Compare one output value (tensor, sequence, map or optional) of candidate vs reference."""
    if ref is None or got is None:
        ok = ref is None and got is None
        note = "" if ok else ("candidate is None, reference is not" if got is None else "reference is None")
        return OutputComparison(name, "optional", None, ok, note=note)
    if isinstance(ref, dict) or isinstance(got, dict):
        if not (isinstance(ref, dict) and isinstance(got, dict)) or set(ref) != set(got):
            return OutputComparison(name, "map", None, False, note="map keys differ")
        parts = [_compare(f"{name}[{k!r}]", ref[k], got[k], rtol, atol) for k in ref]
        return _merge(name, "map", (len(ref),), parts)
    if isinstance(ref, (list, tuple)) or isinstance(got, (list, tuple)):
        if not (isinstance(ref, (list, tuple)) and isinstance(got, (list, tuple))):
            return OutputComparison(name, "sequence", None, False, note="one side is not a sequence")
        if len(ref) != len(got):
            return OutputComparison(
                name, "sequence", (len(ref),), False, note=f"sequence length {len(got)} != {len(ref)}"
            )
        parts = [_compare(f"{name}[{i}]", r, g, rtol, atol) for i, (r, g) in enumerate(zip(ref, got))]
        return _merge(name, "sequence", (len(ref),), parts)

    ref = np.asarray(ref)
    got = np.asarray(got)
    dtype = str(ref.dtype)
    shape = tuple(int(d) for d in ref.shape)
    if got.shape != ref.shape:
        return OutputComparison(name, dtype, shape, False, note=f"shape {tuple(got.shape)} != {shape}")
    if got.dtype != ref.dtype:
        return OutputComparison(name, dtype, shape, False, note=f"dtype {got.dtype} != {ref.dtype}")
    if ref.size == 0:
        return OutputComparison(name, dtype, shape, True, mismatches=0, note="empty")
    if _is_float(ref.dtype):
        return _float_metrics(name, dtype, shape, ref, got, rtol, atol)
    diff_mask = ref != got
    mismatches = int(np.count_nonzero(diff_mask))
    max_abs = None
    if ref.dtype.kind in "iub":
        max_abs = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64))))
    note = "" if mismatches == 0 else f"{mismatches} of {ref.size} elements differ"
    return OutputComparison(
        name, dtype, shape, mismatches == 0, max_abs=max_abs, mismatches=mismatches, note=note
    )


def _merge(name: str, kind: str, shape: tuple[int, ...], parts: list[OutputComparison]) -> OutputComparison:
    """One row for a sequence/map: the worst metric over its elements."""

    def pick(attr: str, fn: Any) -> Any:
        vals = [getattr(p, attr) for p in parts if getattr(p, attr) is not None]
        return fn(vals) if vals else None

    bad = [p for p in parts if not p.passed]
    note = f"{bad[0].name}: {bad[0].note}" if bad else ""
    return OutputComparison(
        name,
        kind,
        shape,
        not bad,
        max_abs=pick("max_abs", max),
        max_rel=pick("max_rel", max),
        cosine=pick("cosine", min),
        sqnr_db=pick("sqnr_db", min),
        mismatches=pick("mismatches", sum),
        note=note,
    )


# ---------------------------------------------------------------------------------------------
# Entry point


def verify(
    reference: Any,
    candidate: Any,
    inputs: dict[str, Any] | str | os.PathLike | None = None,
    *,
    rtol: float = 1e-3,
    atol: float = 1e-4,
    dims: dict[str, int] | None = None,
    seed: int = 0,
    min_cosine: float | None = None,
) -> VerificationResult:
    """Run both models on the same inputs and compare every output by position.

    ``min_cosine`` switches float outputs from element-wise closeness to a fidelity criterion
    (cosine to the reference at least this high): the right check for quantized or pruned models,
    which are meant to differ element-wise.

    ``inputs``: None (generated from the reference), a dict of arrays, or an .npz path. A
    candidate that fails or differs gives ``passed=False`` (never an exception); only a reference
    that cannot run raises :class:`GraphoptError`, because then nothing can be checked.
    """
    from graphopt.ir import load

    ref_model = load(reference)
    cand_model = load(candidate)
    if inputs is None:
        # The generated inputs the reference runs on: default sizes, else grown ones.
        with _reference_session(ref_model) as session:
            feeds, expected = _first_running(session, ref_model, dims, seed)
        parts = [feeds]
    else:
        feeds = load_inputs(inputs) if isinstance(inputs, (str, os.PathLike)) else dict(inputs)
        # N stacked samples for a model of static batch b: run N/b batches, compare them all.
        parts = split_batches(feeds, static_batches(ref_model))
        try:
            expected = _join([run_model(ref_model, part) for part in parts])
        except GraphoptError:
            raise
        except Exception as e:
            raise GraphoptError(f"reference model cannot run on ONNX Runtime: {ort_error_text(e)}") from None
    try:
        got = _join([run_model(cand_model, part) for part in parts])
    except Exception as e:
        msg = f"candidate model cannot run on ONNX Runtime: {ort_error_text(e)}"
        logger.warning("%s", msg)
        return VerificationResult([], False, rtol, atol, msg, feeds)

    outputs = []
    for (rname, rv), (gname, gv) in zip(expected, got):
        cmp = _compare(rname, rv, gv, rtol, atol)
        if rname != gname:
            cmp.passed = False
            cmp.note = f"candidate output is named '{gname}'" + (f"; {cmp.note}" if cmp.note else "")
        if (
            min_cosine is not None
            and cmp.cosine is not None
            and rname == gname
            and not cmp.note.startswith(("shape", "dtype"))
        ):
            special = "NaN" in cmp.note or "infinities" in cmp.note  # never acceptable
            cmp.passed = bool(not special and np.isfinite(cmp.cosine) and cmp.cosine >= min_cosine)
            cmp.note = "; ".join(
                [n for n in cmp.note.split("; ") if n and "out of tolerance" not in n]
                + [f"cosine {'≥' if cmp.passed else '<'} {min_cosine:g} required"]
            )
        outputs.append(cmp)
    for rname, _ in expected[len(got) :]:
        outputs.append(OutputComparison(rname, "-", None, False, note="missing from the candidate"))
    for gname, _ in got[len(expected) :]:
        outputs.append(OutputComparison(gname, "-", None, False, note="not an output of the reference"))

    result = VerificationResult(outputs, all(o.passed for o in outputs), rtol, atol, None, feeds)
    if result.passed:
        logger.info("verification passed: %d outputs", len(outputs))
    else:
        logger.info("verification failed: %s", result.failure_summary())
    return result


def _join(runs: list[list[tuple[str, Any]]]) -> list[tuple[str, Any]]:
    """The outputs of one run, or of several (batches of stacked samples) stacked along a new
    first axis (a list where their shapes differ)."""
    if len(runs) == 1:
        return runs[0]
    joined = []
    for i, (name, _) in enumerate(runs[0]):
        values = [run[i][1] for run in runs]
        arrays = all(isinstance(v, np.ndarray) for v in values)
        same = arrays and len({(v.shape, v.dtype) for v in values}) == 1
        joined.append((name, np.stack(values) if same else values))
    return joined
