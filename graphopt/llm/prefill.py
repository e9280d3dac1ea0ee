"""An int8-GEMM prompt model next to the int4 one: ``prefill.onnx`` and genai's decoder pipeline.

Why: ONNX Runtime's CPU ``MatMulNBits`` (the only int4 GEMM onnxruntime-genai runs) computes a
64-token prompt at about float32's speed, while its int8 ``DynamicQuantizeMatMul`` takes about a
third of that time (``benchmarks/bench_int4_kernels.py``). One token at a time (decode) both are
alike and int4 reads half the bytes. So the prompt runs on a second graph whose projections are
``DynamicQuantizeMatMul`` and the tokens after it on the int4 graph, in onnxruntime-genai's
``decoder-pipeline`` (``run_on_prompt`` / ``run_on_token_gen``), as ``MatMulInteger`` on
per-token 7-bit activations (:func:`_per_token`).

The prompt graph stores no weights of its own: it reads the int4 model's ``MatMulNBits``
initializers (the same bytes of ``model.onnx.data``) and turns them into int8 with plain ops
(nibble unpacking, the block scales and zero points, per-column requantization), which ONNX Runtime
constant-folds when it loads the session. The folder stays the int4 folder's size; the session
holds the int8 copy in memory. Block offsets (``block_offsets``) are folded into the weight, so
the prompt graph reads ``x`` itself, not ``[x | block sums]``. The LM head (N = vocabulary) stays
int4: the prompt graph computes the last position's logits only.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["PREFILL_FILE", "pipeline_config", "write_prefill_model"]

PREFILL_FILE = "prefill.onnx"


class _Builder:
    """New nodes and small initializers for one graph, with unique names; equal constants are
    added once (every projection needs the same shifts, axes and bounds)."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.names = {n for node in graph.node for n in (*node.input, *node.output)}
        self.names |= {i.name for i in graph.initializer}
        self.nodes: list[onnx.NodeProto] = []
        self.consts: dict[tuple[str, tuple[int, ...], bytes], str] = {}

    def name(self, base: str) -> str:
        name, i = base, 0
        while name in self.names:
            i += 1
            name = f"{base}_{i}"
        self.names.add(name)
        return name

    def const(self, base: str, value: np.ndarray) -> str:
        key = (value.dtype.str, value.shape, value.tobytes())
        if key not in self.consts:
            self.consts[key] = self.name(base)
            self.graph.initializer.append(numpy_helper.from_array(value, self.consts[key]))
        return self.consts[key]

    def op(self, op_type: str, inputs: list[str], base: str, domain: str = "", **attrs: Any) -> str:
        out = self.name(base)
        self.nodes.append(helper.make_node(op_type, inputs, [out], name=out, domain=domain, **attrs))
        return out


def _unpack_nibbles(b: _Builder, packed: str, shape: list[int], base: str) -> str:
    """uint8 bytes of two 4-bit values each (low nibble first) → uint8 values, ``shape``."""
    four = b.const(f"{base}_four", np.array(4, np.uint8))
    high = b.op("BitShift", [packed, four], f"{base}_high", direction="RIGHT")
    low = b.op(
        "Sub", [packed, b.op("BitShift", [high, four], f"{base}_high_up", direction="LEFT")], f"{base}_low"
    )
    axis = b.const(f"{base}_last", np.array([-1], np.int64))
    pair = b.op(
        "Concat",
        [b.op("Unsqueeze", [low, axis], f"{base}_l"), b.op("Unsqueeze", [high, axis], f"{base}_h")],
        f"{base}_pair",
        axis=-1,
    )
    return b.op("Reshape", [pair, b.const(f"{base}_shape", np.array(shape, np.int64))], f"{base}_values")


def _int8_weight(b: _Builder, node: onnx.NodeProto, k_in: int, base: str, opset: int) -> tuple[str, str]:
    """(int8 ``[k_in, N]``, float ``[N]`` scales) from ``node``'s 4-bit ``MatMulNBits`` weight, the
    offset columns folded in when ``k_in`` is less than the node's K."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    k, n, bs = int(attrs["K"]), int(attrs["N"]), int(attrs["block_size"])
    blocks = -(-k // bs)
    q = b.op(
        "Cast",
        [_unpack_nibbles(b, node.input[1], [n, blocks, bs], f"{base}_q")],
        f"{base}_qf",
        to=TensorProto.FLOAT,
    )
    if len(node.input) > 3 and node.input[3]:
        zp_bytes = -(-blocks // 2)
        zp = _unpack_nibbles(b, node.input[3], [n, 2 * zp_bytes], f"{base}_zp")
        starts, ends = (
            b.const(f"{base}_zp_start", np.array([0], np.int64)),
            b.const(f"{base}_zp_end", np.array([blocks], np.int64)),
        )
        one = b.const(f"{base}_one", np.array([1], np.int64))
        zp = b.op("Slice", [zp, starts, ends, one], f"{base}_zp_blocks")
        zp = b.op("Cast", [zp], f"{base}_zpf", to=TensorProto.FLOAT)
        zp = b.op("Unsqueeze", [zp, b.const(f"{base}_ax", np.array([-1], np.int64))], f"{base}_zp3")
    else:
        zp = b.const(f"{base}_zp8", np.array(8.0, np.float32))
    scales = b.op(
        "Reshape",
        [node.input[2], b.const(f"{base}_s_shape", np.array([n, blocks, 1], np.int64))],
        f"{base}_s",
    )
    w = b.op("Mul", [b.op("Sub", [q, zp], f"{base}_centred"), scales], f"{base}_w3")
    flat = b.op(
        "Reshape", [w, b.const(f"{base}_flat", np.array([n, blocks * bs], np.int64))], f"{base}_wflat"
    )
    zero, last = (
        b.const(f"{base}_zero", np.array([0], np.int64)),
        b.const(f"{base}_lastax", np.array([1], np.int64)),
    )
    main = b.op(
        "Slice", [flat, zero, b.const(f"{base}_kin", np.array([k_in], np.int64)), last], f"{base}_main"
    )
    if k_in < k:  # offsets: one column per block of x, read against x's block sums
        off = b.op(
            "Slice",
            [
                flat,
                b.const(f"{base}_off0", np.array([k_in], np.int64)),
                b.const(f"{base}_off1", np.array([k], np.int64)),
                last,
            ],
            f"{base}_off",
        )
        off = b.op("Unsqueeze", [off, b.const(f"{base}_offax", np.array([-1], np.int64))], f"{base}_off3")
        off = b.op(
            "Expand",
            [off, b.const(f"{base}_offshape", np.array([n, k - k_in, bs], np.int64))],
            f"{base}_offx",
        )
        off = b.op(
            "Reshape", [off, b.const(f"{base}_offflat", np.array([n, k_in], np.int64))], f"{base}_offk"
        )
        main = b.op("Add", [main, off], f"{base}_folded")
    wt = b.op("Transpose", [main], f"{base}_kn", perm=[1, 0])
    absw = b.op("Abs", [wt], f"{base}_abs")
    if opset >= 18:
        colmax = b.op("ReduceMax", [absw, zero], f"{base}_colmax", keepdims=0)
    else:
        colmax = b.op("ReduceMax", [absw], f"{base}_colmax", keepdims=0, axes=[0])
    scale = b.op("Div", [colmax, b.const(f"{base}_127", np.array(127.0, np.float32))], f"{base}_s8raw")
    scale = b.op("Max", [scale, b.const(f"{base}_tiny", np.array(1e-12, np.float32))], f"{base}_s8")
    lo, hi = (
        b.const(f"{base}_lo", np.array(-127.0, np.float32)),
        b.const(f"{base}_hi", np.array(127.0, np.float32)),
    )
    levels = b.op(
        "Clip",
        [b.op("Round", [b.op("Div", [wt, scale], f"{base}_ratio")], f"{base}_round"), lo, hi],
        f"{base}_clip",
    )
    return b.op("Cast", [levels], f"{base}_w8", to=TensorProto.INT8), scale


def _per_token(b: _Builder, x: str, base: str) -> tuple[str, str, str]:
    """(uint8 levels, row scales, zero point) of ``x`` quantized per row (token), symmetric.

    ``DynamicQuantizeMatMul`` quantizes the whole prompt's activations with one scale, and one
    outlier token or channel coarsens every other row (measured on SmolLM2: greedy continuations
    left the float model's sooner than with the int4 graph alone). Per row the scale follows each
    token. Levels are 7-bit around 64 (``round(63·x / max|x|) + 64``): ``MatMulInteger``'s fast
    u8×s8 path, without the int16 overflow that 8-bit activations against ±127 weights can reach
    on CPUs without VNNI."""
    axis = b.const(f"{base}_axis", np.array([-1], np.int64))
    peak = b.op("ReduceMax", [b.op("Abs", [x], f"{base}_abs"), axis], f"{base}_peak", keepdims=1)
    s63 = b.const(f"{base}_63", np.array(63.0, np.float32))
    tiny = b.const(f"{base}_tiny", np.array(1e-12, np.float32))
    scale = b.op("Max", [b.op("Div", [peak, s63], f"{base}_s"), tiny], f"{base}_scale")
    levels = b.op("Round", [b.op("Div", [x, scale], f"{base}_ratio")], f"{base}_round")
    shifted = b.op("Add", [levels, b.const(f"{base}_64", np.array(64.0, np.float32))], f"{base}_shift")
    return (
        b.op("Cast", [shifted], f"{base}_u8", to=TensorProto.UINT8),
        scale,
        b.const(f"{base}_zp", np.array(64, np.uint8)),
    )


def write_prefill_model(folder: Path, vocab_size: int, decode_file: str = "model.onnx") -> int:
    """Write ``folder/prefill.onnx`` from the int4 model in ``folder`` (reading its external data
    in place); the number of projections turned into int8 GEMMs (0: nothing written)."""
    model = onnx.load(str(folder / decode_file), load_external_data=False)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        return 0
    graph = model.graph
    producers = {o: node for node in graph.node for o in node.output}
    b = _Builder(graph)
    replaced: dict[int, list[onnx.NodeProto]] = {}
    rows: dict[str, tuple[str, str, str]] = {}
    for node in graph.node:
        if node.op_type != "MatMulNBits" or node.domain != "com.microsoft":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if (
            int(attrs.get("bits", 4)) != 4
            or int(attrs["N"]) >= vocab_size
            or len(node.input) > 4
            and any(node.input[4:])
        ):
            continue  # 8-bit, the LM head, g_idx or bias: stays MatMulNBits
        a, k = node.input[0], int(attrs["K"])
        k_in, bs = k, int(attrs["block_size"])
        concat = producers.get(a)
        if concat is not None and concat.op_type == "Concat" and len(concat.input) == 2 and k % (bs + 1) == 0:
            sums = producers.get(concat.input[1])
            if sums is not None and sums.op_type == "ReduceSum":
                a, k_in = concat.input[0], k // (bs + 1) * bs
        b.nodes = []
        if a not in rows:
            rows[a] = _per_token(b, a, b.name(f"{a}_rows"))
        levels, row_scale, zero_point = rows[a]
        base = b.name(f"{node.name or 'matmulnbits'}_int8")
        w8, scale = _int8_weight(b, node, k_in, base, opset)
        acc = b.op("MatMulInteger", [levels, w8, zero_point], f"{base}_acc")
        y = b.op(
            "Mul", [b.op("Cast", [acc], f"{base}_accf", to=TensorProto.FLOAT), row_scale], f"{base}_rows"
        )
        b.nodes.append(helper.make_node("Mul", [y, scale], list(node.output), name=node.name))
        replaced[id(node)] = b.nodes
    if not replaced:
        return 0
    nodes = [n for node in graph.node for n in replaced.get(id(node), [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.save(model, str(folder / PREFILL_FILE))
    return len(replaced)


def pipeline_config(genai: dict[str, Any], folder: Path, decode_file: str = "model.onnx") -> dict[str, Any]:
    """``genai`` turned into a ``decoder-pipeline``: ``prefill.onnx`` runs the prompt, the int4
    model every step after it; both read and write the same inputs and outputs."""
    model = onnx.load(str(folder / decode_file), load_external_data=False)
    inputs = [i.name for i in model.graph.input]
    outputs = [o.name for o in model.graph.output]
    cfg = copy.deepcopy(genai)
    decoder = cfg["model"]["decoder"]
    decoder.pop("filename", None)
    # inherit: the decoder's session options (threads) apply to both sessions, not ORT's defaults
    stage = {"inputs": inputs, "outputs": outputs, "inherit_session_options": True}
    decoder["pipeline"] = [
        {"prompt": {"filename": PREFILL_FILE, **stage, "run_on_prompt": True, "run_on_token_gen": False}},
        {
            "token_generation": {
                "filename": decode_file,
                **stage,
                "run_on_prompt": False,
                "run_on_token_gen": True,
            }
        },
    ]
    cfg["model"]["type"] = "decoder-pipeline"
    return cfg
