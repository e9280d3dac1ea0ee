"""ONNX Runtime's CPU kernels for one decoder projection: why graphopt's int4 prefill cannot reach
0.6x of the builder's with MatMulNBits (issue 17).

Why: an LLM's prefill is mostly its projections at M = prompt length. This times one projection
(SmolLM2's MLP shape by default, K=576 -> N=1536) as each kernel ONNX Runtime offers: float32
MatMul, int8 ``DynamicQuantizeMatMul`` (per-column scales; twice int4's bytes), and int4
``MatMulNBits`` at block sizes 32/64/128 with ``accuracy_level`` 4 (int8 activations, what both
graphopt and the builder emit) and 1 (float). All sessions interleaved, rotated each round;
medians; random weights (kernel speed does not depend on the values).

    python benchmarks/bench_int4_kernels.py                 # M = 1 and 64, 2 threads
    python benchmarks/bench_int4_kernels.py --m 1,64,512 --k 576 --n 1536 --rounds 300
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import _bench
import numpy as np
from onnx import TensorProto, helper, numpy_helper


def _model(nodes: list[Any], inits: list[Any], m: int, k: int, n: int) -> Any:
    graph = helper.make_graph(
        nodes,
        "projection",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [m, n])],
        inits,
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def variants(m: int, k: int, n: int) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    w = rng.standard_normal((k, n)).astype(np.float32)
    out["float32 MatMul"] = _model(
        [helper.make_node("MatMul", ["A", "W"], ["Y"])], [numpy_helper.from_array(w, "W")], m, k, n
    )
    w8 = rng.integers(-127, 128, (k, n)).astype(np.int8)
    scale = np.full((n,), 0.01, np.float32)
    out["int8 DynamicQuantizeMatMul"] = _model(
        [helper.make_node("DynamicQuantizeMatMul", ["A", "W", "s"], ["Y"], domain="com.microsoft")],
        [numpy_helper.from_array(w8, "W"), numpy_helper.from_array(scale, "s")],
        m,
        k,
        n,
    )
    # int4 stored (ONNX INT4 + per-block scales, MatMulNBits' bytes), int8 at load: ONNX Runtime
    # constant-folds Cast → Mul → Div → Round → Cast on initializers into the int8 B that
    # DynamicQuantizeMatMul prepacks, so the file holds int4 and the GEMM runs on int8.
    blocks = k // 32
    q4 = rng.integers(-8, 8, (blocks, 32, n)).astype(np.int8)
    scale4 = (rng.random((blocks, 1, n)) * 0.01 + 0.001).astype(np.float32)
    w4 = (q4 * scale4).reshape(k, n)
    scale8 = (np.abs(w4).max(0) / 127).astype(np.float32)
    folded = [
        helper.make_node("Cast", ["W4"], ["wf0"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["wf0", "d"], ["wf1"]),
        helper.make_node("Reshape", ["wf1", "shape"], ["wf"]),
        helper.make_node("Div", ["wf", "s"], ["wq0"]),
        helper.make_node("Round", ["wq0"], ["wq1"]),
        helper.make_node("Cast", ["wq1"], ["W"], to=TensorProto.INT8),
        helper.make_node("DynamicQuantizeMatMul", ["A", "W", "s"], ["Y"], domain="com.microsoft"),
    ]
    w4_tensor = helper.make_tensor("W4", TensorProto.INT4, list(q4.shape), q4.flatten().tolist())
    model = _model(
        folded,
        [
            w4_tensor,
            numpy_helper.from_array(scale4, "d"),
            numpy_helper.from_array(scale8, "s"),
            numpy_helper.from_array(np.array([k, n], np.int64), "shape"),
        ],
        m,
        k,
        n,
    )
    model.opset_import[0].version = 21  # INT4 from opset 21
    out["int4 stored, int8 DynamicQuantizeMatMul (folded at load)"] = model
    for block in (32, 64, 128):
        if k % block:
            continue
        blocks = k // block
        packed = rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8)
        scales = (rng.random(n * blocks) * 0.01).astype(np.float32)
        for level in (4, 1) if block == 32 else (4,):
            node = helper.make_node(
                "MatMulNBits",
                ["A", "B", "S"],
                ["Y"],
                domain="com.microsoft",
                K=k,
                N=n,
                bits=4,
                block_size=block,
                accuracy_level=level,
            )
            inits = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
            out[f"int4 MatMulNBits block {block} accuracy_level {level}"] = _model([node], inits, m, k, n)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--m", default="1,64", help="comma-separated row counts (tokens)")
    p.add_argument("--k", type=int, default=576)
    p.add_argument("--n", type=int, default=1536)
    p.add_argument("--rounds", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="int4_kernels", help="results file stem in benchmarks/results/")
    args = p.parse_args(argv)
    rows = []
    for m in [int(x) for x in args.m.split(",")]:
        sessions = {
            name: _bench.ort_session(model, args.threads)
            for name, model in variants(m, args.k, args.n).items()
        }
        feeds = {"A": np.random.default_rng(1).standard_normal((m, args.k)).astype(np.float32)}
        times = _bench.interleaved_ms(sessions, feeds, args.rounds, warmup=20)
        base = _bench.median(times["float32 MatMul"])
        for name, ts in times.items():
            ms = _bench.median(ts)
            assert ms is not None and base is not None
            gmacs = m * args.k * args.n / (ms * 1e6)
            rows.append([m, name, round(ms * 1000, 1), round(ms / base, 3), round(gmacs, 1)])
            print(f"M={m:4d} {name:45s} {ms * 1000:8.1f} us  {ms / base:5.2f}x float  {gmacs:6.1f} GMAC/s")
    env = _bench.environment()
    header = ["M", "kernel", "median µs", "× float32", "GMAC/s"]
    text = "\n".join(
        [
            "# ONNX Runtime CPU kernels for one decoder projection",
            "",
            f"`python benchmarks/bench_int4_kernels.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
            f" — {env['cpu']}, {args.threads} threads, K={args.k}, N={args.n}, {args.rounds} interleaved"
            f" rounds, medians; onnxruntime {env['versions'].get('onnxruntime')}; {env['date']}.",
            "",
            _bench.markdown_table(header, rows),
            "",
        ]
    )
    (_bench.RESULTS / f"{args.out}.md").write_text(text)
    _bench.write_json(
        _bench.RESULTS / f"{args.out}.json", {"environment": env, "settings": vars(args), "rows": rows}
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
