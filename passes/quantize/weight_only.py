"""Weight-only quantization: 4- or 8-bit block-wise weights for MatMul/Gemm (and embeddings),
lowered to ONNX Runtime's ``com.microsoft`` ``MatMulNBits`` and ``GatherBlockQuantized``.

Why weight-only: decoder LLMs on CPU are bound by reading weights, not by arithmetic, so shrinking
the weights 4-8x shrinks both the file and the memory traffic of every token, while activations
stay float (no activation calibration, little accuracy loss).

Layout (ORT 1.32 schemas): a MatMul weight ``B [K, N]`` is quantized in blocks of ``block_size``
along the reduction axis K. ``MatMulNBits`` takes ``B`` packed as uint8 ``[N, k_blocks, blob]``
(``blob = block_size * bits / 8``, two 4-bit values per byte, low nibble first), ``scales
[N, k_blocks]`` in A's dtype, and optional ``zero_points`` (uint8, packed like B, ``[N,
ceil(k_blocks * bits / 8)]``); without zero points ORT uses ``2^(bits-1)``, so the symmetric
variant stores ``q = round(w / s) + 2^(bits-1)`` with ``s = w_absmax_signed / -2^(bits-1)`` (the
largest magnitude maps exactly to the most negative level, as ORT's MLAS quantizer does). K that is
not a multiple of ``block_size`` is zero-padded (ORT reads only K values).

Embeddings (``Gather`` on a float ``[vocab, hidden]`` constant, axis 0) become
``GatherBlockQuantized`` (uint8 data packed along hidden, ``quantize_axis=1``), which holds most of
a small LLM's bytes.

Methods: ``rtn`` (round to nearest per block) needs no data; ``gptq`` (Frantar et al. 2022) uses
calibration data: for each weight it accumulates ``H = sum X^T X`` over the weight's input
activations (streamed batch by batch, O(K^2) memory per weight, never O(tokens)) and quantizes the
columns of K in order, spreading each column's rounding error over the not-yet-quantized columns
through the Cholesky factor of ``H^-1`` (lazy batches of columns; dampening; optional act-order
with static groups so the blocks stay contiguous for ``MatMulNBits``). ``sequential`` (default)
calibrates the weights of each input activation on the model with every earlier weight already
quantized (one ORT run over a pruned prefix of the model per activation), so later layers correct
the error of earlier ones; ``sequential=false`` is one run from the float model. A weight with fewer
calibration tokens than K (``gptq_min_tokens``) gets RTN: its ``H`` is rank-deficient and GPTQ would
fit the calibration rows rather than the data. ``awq`` (Lin et al. 2023) scales each input channel
by ``mean|x|^alpha`` (alpha searched per layer on kept calibration rows, by layer-output error) and
folds ``1/s`` exactly into whatever makes the activation: a norm's scale/bias, or a decomposed
RMSNorm's Mul by a constant, through Reshapes that keep K last; elsewhere it does nothing.
``awq-gptq`` applies both.

All numerics are numpy with one BLAS thread, so the output bytes do not depend on the machine.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from typing import Any, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from graphopt.errors import PipelineError

from ..ir_helpers import MS_DOMAIN, constant_array, unique_name
from .base import CommonOptions, QuantizePassBase

__all__ = [
    "QuantizeWeightOnlyPass",
    "WeightOnlyOptions",
    "QuantizedWeight",
    "quantize_rtn",
    "gptq_inverse_factor",
    "gptq_quantize",
    "gptq_sweep",
    "dequantize",
    "pack_blocks",
    "unpack_blocks",
]

logger = logging.getLogger("graphopt.passes.quantize.weight_only")

_FLOAT_DTYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclasses.dataclass
class WeightOnlyOptions(CommonOptions):
    """Options of ``quantize-weight-only``."""

    bits: int = dataclasses.field(default=4, metadata=_doc("weight bits: 4 (mode int4) or 8 (mode int8-weight)"))
    block_size: int = dataclasses.field(
        default=32, metadata=_doc("weights per scale along K: a power of two >= 16 (smaller = more accurate)"))
    symmetric: bool = dataclasses.field(
        default=True, metadata=_doc("True: no zero points; False: per-block zero points (asymmetric)"))
    accuracy_level: int = dataclasses.field(
        default=4, metadata=_doc("MatMulNBits accuracy_level: 0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 compute "
                                 "(fastest on CPU)"))
    method: Literal["auto", "rtn", "gptq", "awq", "awq-gptq"] = dataclasses.field(
        default="auto", metadata=_doc("rtn (no data); with calibration data: gptq, awq (scales folded into the "
                                      "preceding norm, then rtn), awq-gptq (both); auto: gptq with data else rtn"))
    min_size: int = dataclasses.field(
        default=4096, metadata=_doc("leave weights with fewer than this many elements (K*N) in float"))
    quantize_embeddings: bool = dataclasses.field(
        default=True, metadata=_doc("Gather on a [vocab, hidden] constant -> GatherBlockQuantized"))
    lm_head: bool = dataclasses.field(
        default=True, metadata=_doc("quantize a MatMul/Gemm whose result is a graph output (the LM head); "
                                    "False keeps it float"))
    damp: float = dataclasses.field(
        default=0.01, metadata=_doc("gptq: dampening added to H's diagonal, as a fraction of its mean"))
    gptq_min_tokens: float = dataclasses.field(
        default=1.0, metadata=_doc("gptq: calibration tokens needed per input channel (K); a weight with fewer "
                                   "gets RTN (its X^T X is rank-deficient and GPTQ would overfit)"))
    act_order: bool = dataclasses.field(
        default=False, metadata=_doc("gptq: quantize columns by decreasing H diagonal (static groups)"))
    scale_search: bool = dataclasses.field(
        default=False, metadata=_doc("per block, try clipping the range (ratios 1.0..0.75) and keep the scale "
                                    "with the least rounding error; False: plain full-range RTN"))
    calibration_batches: int | None = dataclasses.field(
        default=None, metadata=_doc("gptq: use at most this many calibration batches (None: all)"))
    sequential: bool = dataclasses.field(
        default=True, metadata=_doc("gptq: calibrate the weights of each input activation on the model with the "
                                    "earlier weights already quantized (one calibration run each; False: one "
                                    "run, all from the float model)"))
    awq_grid: int = dataclasses.field(
        default=11, metadata=_doc("awq: exponents tried for the channel scales, evenly in [0, 1] (0 = no scaling)"))
    awq_tokens: int = dataclasses.field(
        default=512, metadata=_doc("awq: calibration rows kept per activation to score the exponents"))
    awq_min_gain: float = dataclasses.field(
        default=0.05, metadata=_doc("awq: keep a layer unscaled unless scaling cuts its output error on the kept "
                                    "rows by at least this fraction"))
    hessian_memory_mb: int = dataclasses.field(
        default=1024, metadata=_doc("gptq: Hessians held at once (float64); more weights = more calibration runs"))


# ---------------------------------------------------------------------------------------------
# Numerics (numpy; W is in [N, K] orientation: one row per output, K = reduction axis)


@dataclasses.dataclass
class QuantizedWeight:
    """Block-quantized ``W [N, K]``: levels ``q [N, k_blocks, block_size]`` (uint8, unpacked),
    ``scales [N, k_blocks]`` (storage dtype) and ``zero_points [N, k_blocks]`` (uint8) or None."""

    q: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    bits: int
    k: int

    @property
    def block_size(self) -> int:
        return int(self.q.shape[2])


def _pad_k(w: np.ndarray, block_size: int) -> np.ndarray:
    k = w.shape[1]
    kp = -(-k // block_size) * block_size
    if kp == k:
        return w
    return np.concatenate([w, np.zeros((w.shape[0], kp - k), w.dtype)], axis=1)


#: Clipping ratios tried by the scale search (1.0 = the block's full range, plain RTN).
SEARCH_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def block_params(blocks: np.ndarray, bits: int, symmetric: bool, scale_dtype: Any = np.float32,
                 search: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Per-block scale and zero point (as float32 arrays ``blocks.shape[:-1]``) for values in the
    last axis; the scale is rounded to its storage dtype first so ``q`` matches what ORT dequantizes.

    ``search``: also try the range shrunk by :data:`SEARCH_RATIOS` and keep, per block, the one
    with the least squared rounding error (clipping a few outliers often lowers it)."""
    if not search:
        return _block_params(blocks, bits, symmetric, scale_dtype, 1.0)
    best_s, best_z = _block_params(blocks, bits, symmetric, scale_dtype, 1.0)
    best_e = _block_error(blocks, best_s, best_z, bits)
    for r in SEARCH_RATIOS[1:]:
        s, z = _block_params(blocks, bits, symmetric, scale_dtype, r)
        e = _block_error(blocks, s, z, bits)
        better = e < best_e
        best_s, best_z, best_e = (np.where(better, s, best_s), np.where(better, z, best_z),
                                  np.where(better, e, best_e))
    return best_s, best_z


def _block_error(blocks: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    q = _levels(blocks, scale[..., None], zp[..., None], bits)
    return np.sum(np.square((q - zp[..., None]) * scale[..., None] - blocks), axis=-1)


def _block_params(blocks: np.ndarray, bits: int, symmetric: bool, scale_dtype: Any, ratio: float
                  ) -> tuple[np.ndarray, np.ndarray]:
    maxq = (1 << bits) - 1
    if symmetric:
        half = float(1 << (bits - 1))
        idx = np.abs(blocks).argmax(axis=-1)[..., None]
        peak = np.take_along_axis(blocks, idx, axis=-1)[..., 0]
        scale = peak * ratio / -half
        zp = np.full(scale.shape, half, np.float32)
    else:
        lo = np.minimum(blocks.min(axis=-1), 0.0) * ratio
        hi = np.maximum(blocks.max(axis=-1), 0.0) * ratio
        scale = (hi - lo) / maxq
        zp = None
    scale = np.where(scale == 0, 1.0, scale).astype(scale_dtype).astype(np.float32)
    scale = np.where(scale == 0, 1.0, scale).astype(np.float32)  # fp16 underflow
    if zp is None:
        zp = np.clip(np.round(-lo / scale), 0, maxq).astype(np.float32)
    return scale, zp


def _levels(w: np.ndarray, scale: np.ndarray, zp: np.ndarray, bits: int) -> np.ndarray:
    return np.clip(np.round(w / scale) + zp, 0, (1 << bits) - 1)


def quantize_rtn(w: np.ndarray, bits: int, block_size: int, symmetric: bool,
                 scale_dtype: Any = np.float32, search: bool = False) -> QuantizedWeight:
    """Round-to-nearest block quantization of ``w [N, K]`` (``search``: see :func:`block_params`)."""
    n, k = w.shape
    blocks = _pad_k(w.astype(np.float32), block_size).reshape(n, -1, block_size)
    scale, zp = block_params(blocks, bits, symmetric, scale_dtype, search)
    q = _levels(blocks, scale[..., None], zp[..., None], bits).astype(np.uint8)
    return QuantizedWeight(q, scale.astype(scale_dtype), None if symmetric else zp.astype(np.uint8), bits, k)


def dequantize(qw: QuantizedWeight) -> np.ndarray:
    """``W [N, K]`` (float32) as ORT reconstructs it from ``qw``."""
    zp = (np.float32(1 << (qw.bits - 1)) if qw.zero_points is None
          else qw.zero_points.astype(np.float32)[..., None])
    w = (qw.q.astype(np.float32) - zp) * qw.scales.astype(np.float32)[..., None]
    return w.reshape(w.shape[0], -1)[:, : qw.k]


def gptq_inverse_factor(h: np.ndarray, damp: float) -> np.ndarray:
    """Upper Cholesky factor of ``(H + damp·mean(diag H)·I)^-1`` (float64; H is modified in
    place), the matrix GPTQ's column sweep divides by. A singular H gets a stronger damping."""
    k = h.shape[0]
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    try:
        return np.linalg.cholesky(np.linalg.inv(h)).T
    except np.linalg.LinAlgError:
        h[np.diag_indices(k)] += float(np.mean(np.diag(h)))
        return np.linalg.cholesky(np.linalg.inv(h)).T


def gptq_sweep(W: np.ndarray, hinv: np.ndarray, quantize_column: Any, lazy: int = 128) -> None:
    """GPTQ's column sweep (Frantar et al. 2022) over ``W [N, K]`` (float64, updated in place).

    ``quantize_column(col, window, i)`` returns the dequantized column ``window[:, i]`` (``window``
    is ``W[:, i1:i2]`` with the error updates so far, so a quantizer may pick block scales from it)
    and records its levels; the rounding error of each column is spread over the later columns in
    proportion to the inverse Hessian, which is what makes GPTQ better than rounding each weight."""
    kp = W.shape[1]
    for i1 in range(0, kp, lazy):
        i2 = min(i1 + lazy, kp)
        W1 = W[:, i1:i2].copy()
        E1 = np.zeros_like(W1)
        Hi = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            x = W1[:, i]
            err = (x - quantize_column(i1 + i, W1, i)) / Hi[i, i]
            W1[:, i:] -= np.outer(err, Hi[i, i:])
            E1[:, i] = err
        if i2 < kp:
            W[:, i2:] -= E1 @ hinv[i1:i2, i2:]


def gptq_quantize(w: np.ndarray, h: np.ndarray, bits: int, block_size: int, symmetric: bool, *,
                  damp: float = 0.01, act_order: bool = False, scale_dtype: Any = np.float32,
                  search: bool = False, lazy: int = 128) -> QuantizedWeight:
    """GPTQ of ``w [N, K]`` given ``h = sum X^T X [K, K]`` (float64 inside; deterministic).

    Scales of a block are chosen from the block's error-updated weights when its first column is
    reached; with ``act_order`` they are fixed from the original weights (static groups), since
    MatMulNBits needs each block's K range contiguous."""
    n, k = w.shape
    kp = -(-k // block_size) * block_size
    nb = kp // block_size
    W = np.zeros((n, kp), np.float64)
    W[:, :k] = w
    H = np.zeros((kp, kp), np.float64)
    H[:k, :k] = h
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    static = None
    if act_order:
        s0, z0 = block_params(W.reshape(n, nb, block_size).astype(np.float32), bits, symmetric, scale_dtype,
                              search)
        static = (s0.astype(np.float64), z0.astype(np.float64))
        perm = np.argsort(-np.diag(H), kind="stable")
    else:
        perm = np.arange(kp)
    W = W[:, perm]
    H = H[perm][:, perm]
    hinv = gptq_inverse_factor(H, damp)
    lazy = max(block_size, (lazy // block_size) * block_size)
    Q = np.zeros((n, kp), np.float64)
    scales = np.zeros((n, nb), np.float64)
    zps = np.zeros((n, nb), np.float64)
    if static is not None:
        scales, zps = static
    maxq = (1 << bits) - 1

    def quantize_column(col: int, window: np.ndarray, i: int) -> np.ndarray:
        if static is None:
            g = col // block_size
            if col % block_size == 0:
                s, z = block_params(window[:, i : i + block_size].astype(np.float32), bits, symmetric,
                                    scale_dtype, search)
                scales[:, g], zps[:, g] = s, z
        else:
            g = perm[col] // block_size
        s, z = scales[:, g], zps[:, g]
        q = np.clip(np.round(window[:, i] / s) + z, 0, maxq)
        Q[:, col] = q
        return (q - z) * s

    gptq_sweep(W, hinv, quantize_column, lazy)
    inv = np.argsort(perm)
    Q = Q[:, inv]
    qz = None if symmetric else zps.astype(np.uint8)
    return QuantizedWeight(Q.reshape(n, nb, block_size).astype(np.uint8), scales.astype(scale_dtype), qz, bits, k)


def pack_blocks(q: np.ndarray, bits: int) -> np.ndarray:
    """uint8 levels ``[..., m]`` → packed bytes ``[..., m * bits / 8]`` (low nibble first)."""
    q = q.astype(np.uint8)
    if bits == 8:
        return q
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros(q.shape[:-1] + (1,), np.uint8)], axis=-1)
    return (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)


def unpack_blocks(packed: np.ndarray, bits: int, count: int | None = None) -> np.ndarray:
    """Inverse of :func:`pack_blocks` (``count`` trims a padded last axis)."""
    if bits == 8:
        return packed
    out = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(packed.shape[:-1] + (-1,))
    return out if count is None else out[..., :count]


# ---------------------------------------------------------------------------------------------
# The pass


@dataclasses.dataclass
class _Site:
    """A MatMul/Gemm to rewrite: its weight (as ``W [N, K]``), bias and where the weight comes from."""

    node: ir.Node
    key: tuple[int, bool]  # (id of the weight value, transposed)
    w: np.ndarray
    dtype: ir.DataType
    bias: np.ndarray | None


class QuantizeWeightOnlyPass(QuantizePassBase):
    """Block-wise int4/int8 weight-only quantization of MatMul/Gemm weights (and embeddings) for
    ONNX Runtime (``com.microsoft`` MatMulNBits / GatherBlockQuantized; ORT CPU/CUDA only).

    Safe because only constant 2-D float weights whose consumer's input dtype and rank are known are
    rewritten, Gemm only with ``transA=0``, ``alpha=beta=1`` and a constant bias broadcastable to
    ``[N]``; anything else stays float with the reason in the report. A weight shared by several
    MatMuls is quantized once. ``method=gptq`` (or ``auto`` with calibration data) needs
    calibration batches and runs the model on ONNX Runtime to collect ``X^T X`` per weight.
    """

    name = "quantize-weight-only"
    modes: ClassVar[dict[str, dict[str, Any]]] = {"int4": {"bits": 4}, "int8-weight": {"bits": 8}}
    Options: ClassVar[type] = WeightOnlyOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        if o.bits not in (4, 8):
            raise PipelineError(f"quantize-weight-only: bits must be 4 or 8, got {o.bits}")
        bs = o.block_size
        if bs < 16 or bs & (bs - 1):
            raise PipelineError(f"quantize-weight-only: block_size must be a power of two >= 16 (16, 32, 64, 128), "
                                f"got {bs}")
        if o.accuracy_level not in (0, 1, 2, 3, 4):
            raise PipelineError(f"quantize-weight-only: accuracy_level must be 0..4, got {o.accuracy_level}")
        if o.min_size < 0:
            raise PipelineError(f"quantize-weight-only: min_size must be >= 0, got {o.min_size}")
        if not 0 <= o.damp < 1:
            raise PipelineError(f"quantize-weight-only: damp must be in [0, 1), got {o.damp}")
        if o.calibration_batches is not None and o.calibration_batches < 1:
            raise PipelineError("quantize-weight-only: calibration_batches must be >= 1 (or None for all)")

    # --- candidate checks -------------------------------------------------------------------
    def _matmul_site(self, node: ir.Node, graph_outputs: set[int]) -> tuple[_Site | None, str]:
        o = self.options
        if len(node.inputs) < 2 or node.inputs[0] is None or node.inputs[1] is None:
            return None, "missing inputs"
        a, b = node.inputs[0], node.inputs[1]
        w = constant_array(b)
        if w is None or b.is_graph_input():
            return None, "weight not constant"
        if b.dtype not in _FLOAT_DTYPES or w.dtype != _FLOAT_DTYPES[b.dtype]:
            return None, f"weight dtype {b.dtype} not float32/float16"
        if a.dtype is None:
            return None, "input dtype unknown"
        if a.dtype != b.dtype:
            return None, f"input dtype {a.dtype} differs from the weight's"
        if w.ndim != 2:
            return None, f"weight is {w.ndim}-D, not 2-D"
        if a.shape is None:
            return None, "input rank unknown"
        trans = False
        bias = None
        if node.op_type == "MatMul":
            if a.shape.rank() < 2:
                return None, "input is 1-D"
        else:  # Gemm
            attrs = node.attributes
            if attrs.get_int("transA", 0) != 0:
                return None, "Gemm transA=1"
            if attrs.get_float("alpha", 1.0) != 1.0:
                return None, "Gemm alpha != 1"
            trans = attrs.get_int("transB", 0) != 0
            n = w.shape[0] if trans else w.shape[1]
            if len(node.inputs) > 2 and node.inputs[2] is not None:
                c = constant_array(node.inputs[2])
                if c is None or node.inputs[2].is_graph_input():
                    return None, "Gemm bias not constant"
                if attrs.get_float("beta", 1.0) != 1.0:
                    return None, "Gemm beta != 1"
                if c.size not in (1, n) or (c.ndim == 2 and c.shape[0] != 1) or c.ndim > 2:
                    return None, f"Gemm bias {c.shape} is not broadcast over rows"
                bias = np.broadcast_to(c.reshape(-1), (n,)).astype(w.dtype)
        wt = w if trans else w.T  # [N, K]
        n, k = wt.shape
        if k < 16:
            return None, f"K={k} < 16"
        if k * n < o.min_size:
            return None, f"too small ({k}x{n} < min_size {o.min_size})"
        if not o.lm_head and any(id(v) in graph_outputs for v in node.outputs):
            return None, "lm_head kept float"
        return _Site(node, (id(b), trans), wt, b.dtype, bias), ""

    def _gather_reason(self, node: ir.Node) -> tuple[np.ndarray | None, str]:
        o = self.options
        data = node.inputs[0] if node.inputs else None
        w = constant_array(data)
        if w is None or data is None or data.is_graph_input():
            return None, "data not constant"
        if data.dtype not in _FLOAT_DTYPES or w.dtype != _FLOAT_DTYPES[data.dtype]:
            return None, f"data dtype {data.dtype} not float32/float16"
        if w.ndim != 2:
            return None, f"data is {w.ndim}-D, not a [vocab, hidden] table"
        if node.attributes.get_int("axis", 0) not in (0, -2):
            return None, "gather axis is not 0"
        if len(node.inputs) < 2 or node.inputs[1] is None:
            return None, "missing indices"
        if w.shape[1] % o.block_size:
            return None, f"hidden {w.shape[1]} not a multiple of block_size {o.block_size}"
        if w.size < o.min_size:
            return None, f"too small ({w.shape[0]}x{w.shape[1]} < min_size {o.min_size})"
        return w, ""

    # --- main -------------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        # One BLAS thread: the same bytes on every machine (a thread count changes summation order),
        # and OpenBLAS's spin-waiting made GPTQ's many small factorizations 10x slower on a busy CPU.
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # optional (scikit-learn's dependency)
            return self._call(model)
        with threadpool_limits(1, user_api="blas"):
            return self._call(model)

    def _call(self, model: ir.Model) -> ir.passes.PassResult:
        o = self.options
        graph = model.graph
        graph_outputs = {id(v) for v in graph.outputs}
        sites: list[_Site] = []
        gathers: list[tuple[ir.Node, np.ndarray]] = []
        for node in list(graph):
            if node.domain == "" and node.op_type in ("MatMul", "Gemm"):
                if len(node.inputs) < 2 or constant_array(node.inputs[1]) is None:
                    continue  # activation x activation MatMul: not a candidate
                ok, reason = self.selected(node)
                site = None
                if ok:
                    site, reason = self._matmul_site(node, graph_outputs)
                if site is None:
                    self.decide(node, False, reason)
                else:
                    sites.append(site)
            elif node.domain == MS_DOMAIN and node.op_type == "Attention":
                if len(node.inputs) > 1 and node.inputs[1] is not None:
                    self.decide(node, False, "packed QKV weight inside fused Attention")
            elif node.domain == "" and node.op_type == "Gather" and o.quantize_embeddings:
                table = constant_array(node.inputs[0]) if node.inputs else None
                if table is None or table.ndim != 2 or table.dtype.kind != "f":
                    continue  # not an embedding table (index arithmetic on constants)
                ok, reason = self.selected(node)
                w = None
                if ok:
                    w, reason = self._gather_reason(node)
                if w is None:
                    self.decide(node, False, reason)
                else:
                    gathers.append((node, w))
        if not sites and not gathers:
            return ir.passes.PassResult(model, False)

        method = o.method
        data = self.calibration_data() if method != "rtn" and sites else None
        if method != "auto" and method != "rtn" and data is None:
            raise PipelineError(f"quantize-weight-only: method={method} needs calibration data; pass "
                                "calibration=... (an .npz or a list of feed dicts) or use method=rtn")
        if method == "auto":
            method = "gptq" if data is not None else "rtn"
        self.details["method"] = method
        hessians: dict[tuple[int, bool], np.ndarray] = {}
        taken: set[str] = set()
        made: dict[tuple[int, bool], tuple[ir.Value, ir.Value, ir.Value | None]] = {}
        by_key: dict[tuple[int, bool], list[_Site]] = {}
        for s in sites:
            by_key.setdefault(s.key, []).append(s)
        if method.startswith("awq"):
            self._awq(model, sites, by_key, data, taken)
        replaced: list[ir.Value] = []
        weights: list[dict[str, Any]] = []
        self.details["weights"] = weights
        if model.opset_imports.get(MS_DOMAIN) is None:
            model.opset_imports[MS_DOMAIN] = 1
        gptq = method in ("gptq", "awq-gptq")
        self._tokens = 0
        for group, hess in self._hessian_groups(model, by_key, data if gptq else None):
            hessians = hess
            for key in group:
                first = by_key[key][0]
                sdt = _FLOAT_DTYPES[first.dtype]
                h = hessians.pop(key, None)
                how = method
                k = first.w.shape[1]
                if h is not None and self._tokens < o.gptq_min_tokens * k:
                    # H has rank <= tokens < K: GPTQ would fit the calibration rows, not the data.
                    h, how = None, f"rtn (gptq: {self._tokens} calibration tokens < {o.gptq_min_tokens:g}*K={k})"
                    self.count("gptq_fallback_rtn")
                if h is not None:
                    qw = gptq_quantize(first.w, h, o.bits, o.block_size, o.symmetric,
                                       damp=o.damp, act_order=o.act_order, scale_dtype=sdt,
                                       search=o.scale_search)
                else:
                    qw = quantize_rtn(first.w, o.bits, o.block_size, o.symmetric, sdt, o.scale_search)
                weights.append(_error_row(first, qw, h))
                made[key] = self._initializers(graph, qw, first.node.inputs[1].name or "weight", taken)
                for site in by_key[key]:
                    replaced.append(site.node.inputs[1])
                    self._rewrite_matmul(graph, site, qw, made[key], taken)
                    self.decide(site.node, True, f"{how} {o.bits}-bit")
        for node, w in gathers:
            replaced.append(node.inputs[0])
            self._rewrite_gather(graph, node, w, taken)
            self.decide(node, True, f"rtn {o.bits}-bit embedding")
        self._drop_unused(graph, replaced)
        return ir.passes.PassResult(model, True)

    # --- AWQ -------------------------------------------------------------------------------
    def _awq(self, model: ir.Model, sites: list[_Site], by_key: dict[tuple[int, bool], list[_Site]], data: Any,
             taken: set[str]) -> None:
        """Activation-aware scaling (Lin et al. 2023): per input channel ``s = mean|x|^alpha``, weights
        ``W * s`` quantized, ``x / s`` folded exactly into the preceding norm's scale (and bias) or a
        decomposed norm's Mul by a constant (see :func:`_awq_fold`). Only where that output feeds
        nothing but the quantized weights of this group; alpha is chosen
        per group by the layer-output error on kept calibration rows (alpha=0 = plain RTN, so it never
        does worse there)."""
        from graphopt.calibration import stream_tensors

        o = self.options
        groups: dict[int, list[_Site]] = {}
        for site in sites:
            groups.setdefault(id(site.node.inputs[0]), []).append(site)
        folds: list[tuple[ir.Node, list[int], list[_Site]]] = []
        skipped: dict[str, int] = {}
        for group in groups.values():
            fold, reason = _awq_fold(group, by_key)
            if fold is None:
                skipped[reason] = skipped.get(reason, 0) + 1
            else:
                folds.append((*fold, group))
        self.details["awq_skipped"] = skipped
        if not folds:
            self.details["awq_folded"] = 0
            return
        names = [g[0].node.inputs[0].name for *_, g in folds]
        sums = {n: None for n in names}
        rows: dict[str, list[np.ndarray]] = {n: [] for n in names}
        kept = dict.fromkeys(names, 0)
        for values in stream_tensors(model, names, data, limit=o.calibration_batches, description="awq"):
            for n in names:
                x = np.asarray(values[n], np.float32)
                x = x.reshape(-1, x.shape[-1])
                a = np.abs(x).astype(np.float64).sum(axis=0)
                sums[n] = a if sums[n] is None else sums[n] + a
                if kept[n] < o.awq_tokens:
                    rows[n].append(x[: o.awq_tokens - kept[n]])
                    kept[n] += rows[n][-1].shape[0]
        grid = np.linspace(0.0, 1.0, max(o.awq_grid, 2))
        alphas = []
        for (node, indices, group), n in zip(folds, names):
            mean = np.maximum(sums[n] / max(kept[n], 1), 1e-8)
            x = np.concatenate(rows[n]).astype(np.float32)
            keys = list(dict.fromkeys(site.key for site in group))
            best, best_loss, plain = None, np.inf, None
            for alpha in grid:
                scale = mean**alpha
                scale = (scale / np.sqrt(scale.max() * scale.min())).astype(np.float32)
                loss = 0.0
                for key in keys:
                    first = by_key[key][0]
                    w = first.w.astype(np.float32)
                    qw = quantize_rtn(w * scale[None, :], o.bits, o.block_size, o.symmetric,
                                      _FLOAT_DTYPES[first.dtype], o.scale_search)
                    d = (dequantize(qw) / scale[None, :] - w).T
                    loss += float(np.sum(np.square(x @ d)))
                if plain is None:
                    plain = (float(alpha), scale, loss)  # alpha = 0: no scaling
                if loss < best_loss:
                    best, best_loss = (float(alpha), scale), loss
            alpha, scale = best  # type: ignore[misc]
            if best_loss > (1.0 - o.awq_min_gain) * plain[2]:  # type: ignore[index]
                # A gain this small on the kept rows is within what the choice itself overfits.
                alpha, scale = plain[0], plain[1]  # type: ignore[index]
            alphas.append(round(alpha, 3))
            if alpha == 0.0:
                continue
            for key in keys:
                for site in by_key[key]:
                    site.w = (site.w.astype(np.float32) * scale[None, :]).astype(site.w.dtype)
            for idx in indices:
                v = node.inputs[idx]
                arr = constant_array(v)
                new = (arr.astype(np.float32) / scale).astype(arr.dtype)
                node.replace_input_with(idx, _initializer(model.graph, unique_name(
                    model.graph, f"{v.name or 'norm'}_awq", taken), new))
        self.details["awq_folded"] = sum(a > 0 for a in alphas)
        self.details["awq_alphas"] = alphas

    # --- calibration ------------------------------------------------------------------------
    def _hessian_groups(self, model: ir.Model, by_key: dict[tuple[int, bool], list[_Site]], data: Any
                        ) -> Iterator[tuple[list[tuple[int, bool]], dict[tuple[int, bool], np.ndarray]]]:
        """Yield groups of weight keys with their Hessians; each group's Hessians fit the memory
        budget and cost one calibration run (no data: one group, no Hessians). The caller rewrites a
        group's weights before asking for the next one, so a later run sees them quantized."""
        keys = list(by_key)
        if data is None:
            yield keys, {}
            return
        from graphopt.calibration import stream_tensors

        budget = self.options.hessian_memory_mb * 1024 * 1024
        groups: list[list[tuple[int, bool]]] = [[]]
        held: set[int] = set()  # activations whose Hessian the current group already holds
        used = 0
        for key in keys:
            k = by_key[key][0].w.shape[1]
            fresh = {id(s.node.inputs[0]) for s in by_key[key]} - held
            size = k * k * 8 * len(fresh)
            # Sequential: a new group (calibration run) for each new activation, so that a weight's
            # Hessian comes from the model with every earlier weight already quantized.
            if groups[-1] and (used + size > budget or (self.options.sequential and fresh)):
                groups.append([])
                held, used = set(), 0
                fresh = {id(s.node.inputs[0]) for s in by_key[key]}
                size = k * k * 8 * len(fresh)
            groups[-1].append(key)
            held |= fresh
            used += size
        self.details["calibration_runs"] = len(groups)
        for gi, group in enumerate(groups):
            # One Hessian per distinct activation; a weight with several consumers sums theirs.
            names: list[str] = []
            for key in group:
                for s in by_key[key]:
                    nm = s.node.inputs[0].name
                    if nm and nm not in names:
                        names.append(nm)
            acc: dict[str, np.ndarray] = {}
            tokens = 0
            run_on = _prefix_model(model, names) if len(groups) > 1 else model
            for values in stream_tensors(run_on, names, data, limit=self.options.calibration_batches,
                                         description=f"gptq {gi + 1}/{len(groups)}"):
                for nm in names:
                    x = np.asarray(values[nm], dtype=np.float64)
                    x = x.reshape(-1, x.shape[-1])
                    if nm in acc:
                        acc[nm] += x.T @ x
                    else:
                        acc[nm] = x.T @ x
                tokens += x.shape[0]
            if not acc:
                raise PipelineError("quantize-weight-only: the calibration data has no batches")
            self.details.setdefault("calibration_tokens", tokens)
            self._tokens = tokens
            hess: dict[tuple[int, bool], np.ndarray] = {}
            for key in group:
                consumers = list(dict.fromkeys(s.node.inputs[0].name for s in by_key[key]))
                if all(n in acc for n in consumers):  # an unnamed activation: RTN for this weight
                    hess[key] = acc[consumers[0]] if len(consumers) == 1 else np.sum(
                        [acc[n] for n in consumers], axis=0)
            del acc
            yield group, hess

    # --- rewriting --------------------------------------------------------------------------
    def _initializers(self, graph: ir.Graph, qw: QuantizedWeight, base: str, taken: set[str]
                      ) -> tuple[ir.Value, ir.Value, ir.Value | None]:
        n, nb, _ = qw.q.shape
        packed = pack_blocks(qw.q, qw.bits)
        b = _initializer(graph, unique_name(graph, f"{base}_q{qw.bits}", taken), packed)
        s = _initializer(graph, unique_name(graph, f"{base}_scales", taken), qw.scales.reshape(n, nb))
        z = None
        if qw.zero_points is not None:
            z = _initializer(graph, unique_name(graph, f"{base}_zero_points", taken),
                             pack_blocks(qw.zero_points, qw.bits))
        return b, s, z

    def _rewrite_matmul(self, graph: ir.Graph, site: _Site, qw: QuantizedWeight,
                        inits: tuple[ir.Value, ir.Value, ir.Value | None], taken: set[str]) -> None:
        o = self.options
        node = site.node
        b, s, z = inits
        inputs: list[ir.Value | None] = [node.inputs[0], b, s, z]
        if site.bias is not None:
            bias = _initializer(graph, unique_name(graph, f"{node.inputs[1].name or 'weight'}_bias", taken),
                                site.bias)
            inputs += [None, bias]
        while inputs and inputs[-1] is None:
            inputs.pop()
        n, k = site.w.shape
        new = ir.Node(
            MS_DOMAIN, "MatMulNBits", inputs,
            attributes=[ir.AttrInt64("K", k), ir.AttrInt64("N", n), ir.AttrInt64("bits", qw.bits),
                        ir.AttrInt64("block_size", qw.block_size),
                        ir.AttrInt64("accuracy_level", o.accuracy_level)],
            num_outputs=1, name=node.name, version=1,
        )
        _replace(graph, node, new)

    def _rewrite_gather(self, graph: ir.Graph, node: ir.Node, w: np.ndarray, taken: set[str]) -> None:
        o = self.options
        qw = quantize_rtn(w, o.bits, o.block_size, o.symmetric, w.dtype.type, o.scale_search)
        v, h = w.shape
        base = node.inputs[0].name or "embedding"
        data = _initializer(graph, unique_name(graph, f"{base}_q{o.bits}", taken),
                            pack_blocks(qw.q.reshape(v, h), o.bits))
        scales = _initializer(graph, unique_name(graph, f"{base}_scales", taken), qw.scales)
        inputs: list[ir.Value | None] = [data, node.inputs[1], scales]
        if qw.zero_points is not None:
            inputs.append(_initializer(graph, unique_name(graph, f"{base}_zero_points", taken),
                                       pack_blocks(qw.zero_points, o.bits)))
        new = ir.Node(
            MS_DOMAIN, "GatherBlockQuantized", inputs,
            attributes=[ir.AttrInt64("bits", o.bits), ir.AttrInt64("block_size", o.block_size),
                        ir.AttrInt64("gather_axis", 0), ir.AttrInt64("quantize_axis", 1)],
            num_outputs=1, name=node.name, version=1,
        )
        _replace(graph, node, new)

    def _drop_unused(self, graph: ir.Graph, values: list[ir.Value]) -> None:
        """Remove the float weights this pass replaced, where nothing else reads them."""
        outputs = {id(v) for v in graph.outputs}
        seen: set[int] = set()
        for v in values:
            if id(v) in seen or v.uses() or id(v) in outputs or v.is_graph_input():
                continue
            seen.add(id(v))
            if v.name and graph.initializers.get(v.name) is v:
                graph.initializers.pop(v.name)
            elif (p := v.producer()) is not None and p.op_type == "Constant" and p.graph is graph:
                graph.remove(p, safe=True)


#: Norms whose output is ``normalized * gamma (+ beta)`` over the last axis: (domain, op) -> (gamma, beta)
#: input indices (beta None when the op has none).
_NORMS: dict[tuple[str, str], tuple[int, int | None]] = {
    ("", "LayerNormalization"): (1, 2),
    ("", "RMSNormalization"): (1, None),
    ("", "SimplifiedLayerNormalization"): (1, None),
    (MS_DOMAIN, "SimplifiedLayerNormalization"): (1, None),
    (MS_DOMAIN, "LayerNormalization"): (1, 2),
    (MS_DOMAIN, "SkipLayerNormalization"): (2, 3),
    (MS_DOMAIN, "SkipSimplifiedLayerNormalization"): (2, None),
}


def _last_dim(v: ir.Value) -> int | None:
    if v.shape is None or v.shape.rank() == 0:
        return None
    d = v.shape[-1]
    return d if isinstance(d, int) else None


def _awq_fold(group: list[_Site], by_key: dict[tuple[int, bool], list[_Site]]
              ) -> tuple[tuple[ir.Node, list[int]] | None, str]:
    """Where ``x / s`` folds exactly for sites sharing input ``x``: the node making ``x`` (through
    Reshapes that keep the last axis K) and the inputs of it to divide by ``s`` along the last axis —
    a norm's scale (and bias), or a Mul's constant per-channel operand (a decomposed RMSNorm) — or
    None with the reason."""
    x = group[0].node.inputs[0]
    k = group[0].w.shape[1]
    nodes = {id(s.node) for s in group}
    if x.is_graph_output() or any(id(u.node) not in nodes for u in x.uses()):
        return None, "input has other consumers"
    while (p := x.producer()) is not None and p.domain == "" and p.op_type == "Reshape":
        src = p.inputs[0]
        if src is None or _last_dim(src) != k or _last_dim(x) != k:
            break  # per-channel scaling commutes with a Reshape only when K stays the last axis
        if src.is_graph_output() or len(src.uses()) != 1:
            return None, "input has other consumers"
        x = src
    node = x.producer()
    if node is None:
        return None, "input not from a norm or a Mul by a constant"
    if (node.domain, node.op_type) in _NORMS:
        if node.outputs[0] is not x:
            return None, "input not the norm's output"
        gi, bi = _NORMS[(node.domain, node.op_type)]
        axis = node.attributes.get_int("axis", -1)
        if axis != -1 and (x.shape is None or axis != x.shape.rank() - 1):
            return None, "norm not over the last axis"
        if len(node.inputs) <= gi or node.inputs[gi] is None:
            return None, "norm has no scale"
        indices = [i for i in (gi, bi) if i is not None and len(node.inputs) > i and node.inputs[i] is not None]
    elif node.domain == "" and node.op_type == "Mul" and _last_dim(x) == k:
        indices = [i for i in (0, 1) if constant_array(node.inputs[i]) is not None]
        if len(indices) != 1:
            return None, "Mul has no single constant operand"
    else:
        return None, "input not from a norm or a Mul by a constant"
    for i in indices:
        arr = constant_array(node.inputs[i])
        if arr is None or arr.size != k or arr.shape[-1] != k:
            return None, "scale/bias not a constant per-channel [K]"
    for site in group:
        if any(id(u.node) not in nodes for u in site.node.inputs[1].uses()):
            return None, "weight shared outside the group"
        if any(id(s.node) not in nodes for s in by_key[site.key]):
            return None, "weight shared outside the group"
    return (node, indices), ""


def _prefix_model(model: ir.Model, names: list[str]) -> ir.Model:
    """A model with only the nodes that ``names`` depend on (sharing the weight tensors), so a
    sequential calibration run for an early layer neither serializes nor runs the later ones. The
    whole model when a needed node has subgraphs (their outer-scope reads are not traced here)."""
    graph = model.graph
    by_name: dict[str, ir.Value] = {v.name: v for v in graph.inputs if v.name}
    for node in graph:
        for v in node.outputs:
            if v.name:
                by_name[v.name] = v
    needed: set[int] = set()
    stack = [by_name[n] for n in names if n in by_name]
    if len(stack) != len(names):
        return model
    while stack:
        v = stack.pop()
        node = v.producer()
        if node is None or id(node) in needed:
            continue
        if any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS) for a in node.attributes.values()):
            return model
        needed.add(id(node))
        stack.extend(i for i in node.inputs if i is not None)
    vmap: dict[int, ir.Value] = {}

    def copy(v: ir.Value) -> ir.Value:
        nv = ir.Value(name=v.name, shape=v.shape, type=v.type, const_value=v.const_value)
        vmap[id(v)] = nv
        return nv

    inputs = [copy(v) for v in graph.inputs]
    inits: list[ir.Value] = []
    nodes: list[ir.Node] = []
    for node in graph:
        if id(node) not in needed:
            continue
        ins: list[ir.Value | None] = []
        for i in node.inputs:
            if i is not None and id(i) not in vmap:
                if i.const_value is None:  # produced later: the graph is not sorted
                    return model
                inits.append(copy(i))
            ins.append(None if i is None else vmap[id(i)])
        new = ir.Node(node.domain, node.op_type, ins, attributes=list(node.attributes.values()),
                      overload=node.overload, num_outputs=len(node.outputs), version=node.version, name=node.name)
        for o, no in zip(node.outputs, new.outputs):
            no.name, no.shape, no.type = o.name, o.shape, o.type
            vmap[id(o)] = no
        nodes.append(new)
    outputs = [vmap[id(by_name[n])] for n in names]
    pruned = ir.Graph(inputs, outputs, nodes=nodes, initializers=inits,
                      opset_imports=dict(graph.opset_imports), name=graph.name)
    return ir.Model(pruned, ir_version=model.ir_version, producer_name=model.producer_name,
                    functions=list(model.functions.values()))


def _error_row(site: _Site, qw: QuantizedWeight, h: np.ndarray | None) -> dict[str, Any]:
    """Report row of one quantized weight: relative squared error of the weight and, with
    calibration data, weighted by the input's per-channel energy ``diag(H)`` (an output-error proxy)."""
    n, k = site.w.shape
    w = site.w.astype(np.float64)
    d = dequantize(qw).astype(np.float64) - w
    row: dict[str, Any] = {"weight": site.node.inputs[1].name or "", "K": int(k), "N": int(n),
                           "nodes": len(site.node.inputs[1].uses()),
                           "rel_error": round(float(np.sum(d * d) / max(np.sum(w * w), 1e-30)), 8)}
    if h is not None:
        e = np.diag(h)
        row["act_weighted_error"] = round(float(np.sum(e * np.sum(d * d, axis=0)) /
                                                max(float(np.sum(e * np.sum(w * w, axis=0))), 1e-30)), 8)
    return row


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    t = ir.tensor(np.ascontiguousarray(array), name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(t.dtype), const_value=t)
    graph.register_initializer(value)
    return value


def _replace(graph: ir.Graph, old: ir.Node, new: ir.Node) -> None:
    out, new_out = old.outputs[0], new.outputs[0]
    new_out.shape, new_out.type = out.shape, out.type
    ir.convenience.replace_nodes_and_values(graph, old, [old], [new], [out], [new_out])
