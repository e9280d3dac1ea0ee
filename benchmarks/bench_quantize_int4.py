"""int4 weight-only quantization on CPU: graphopt's ``quantize-weight-only`` (RTN and GPTQ) vs ONNX
Runtime's ``MatMulNBitsQuantizer``, on a Llama-style decoder.

Why: weight-only int4 is how decoder LLMs are shipped for CPU; it is only worth having from graphopt if
its file is as small, as fast and as accurate as what ORT's own quantizer writes from the same model.

Model: ``tests/models.build_llama("base")`` (8 layers, hidden 1024, GQA 16/4 heads, vocab 32000, random
weights, seeded; ``--quick``: "mini"), exported with graphopt, then ``cleanup,fuse`` (graphopt's fp32
ort-cpu file, the reference). From that one fp32 file:

* ``graphopt-rtn``: ``quantize-weight-only(bits=4, block_size=32)`` then ``cleanup``;
* ``graphopt-gptq``: the same with calibration data (``--calib`` sequences of 64 random tokens, batches
  of 4; at least K tokens so that every weight gets GPTQ rather than its RTN fallback): GPTQ
  (sequential: each activation calibrated on the model with the earlier weights already quantized);
* ``graphopt-awq``: AWQ channel scales folded into the RMSNorm before q/k/v and gate/up, then RTN;
* ``ort``: ``MatMulNBitsQuantizer(bits=4, block_size=32, is_symmetric=True, accuracy_level=4,
  op_types_to_quantize=("MatMul", "Gather"))`` — its best settings for this goal: the embedding quantized
  too (GatherBlockQuantized), block 32 symmetric, and accuracy_level 4, the fastest on CPU
  (int8 activations inside MatMulNBits; level 0 was 2-3x slower per MatMul in our op-level check).

Measured: file size (``.onnx`` + external data) relative to fp32; latency of one forward pass (batch 1,
prompt of 64 tokens and of 1 token) on ONNX Runtime CPU (ORT_ENABLE_ALL, 2 intra-op threads, no
spinning), all sessions open and run interleaved (rotated order per round) after warm-up, medians and
ratios; fidelity: cosine and max abs error of the model output (``last_hidden_state``; ``LlamaModel``
has no LM head) against fp32 on held-out token sequences; quantization wall time.

    python benchmarks/bench_quantize_int4.py            # base size
    python benchmarks/bench_quantize_int4.py --quick    # mini size, a few minutes
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import _bench
import numpy as np

WARMUP = 3


def _size(path: Path) -> int:
    """Bytes of the model file and every external-data file beside it."""
    folder = path.parent
    return sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.suffix != ".npz")


def _session(model: Any) -> Any:
    return _bench.ort_session(model)


def _ort_quantize(src: Path, dst: Path) -> float:
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)

    t0 = time.perf_counter()
    model = onnx.load(str(src))
    q = MatMulNBitsQuantizer(
        model,
        bits=4,
        block_size=32,
        is_symmetric=True,
        accuracy_level=4,
        op_types_to_quantize=("MatMul", "Gather"),
        quant_axes=(("MatMul", 0), ("Gather", 1)),
    )
    q.process()
    wall = time.perf_counter() - t0
    onnx.save_model(q.model.model, str(dst), save_as_external_data=True, location="model.onnx.data")
    return wall


def _fresh(path: Path) -> Path:
    """``path`` in an empty folder (sizes count every file in it)."""
    shutil.rmtree(path.parent, ignore_errors=True)
    path.parent.mkdir(parents=True)
    return path


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="mini model, fewer rounds (a few minutes)")
    ap.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds per prompt length")
    ap.add_argument("--calib", type=int, default=None, help="calibration sequences (64 tokens each)")
    ap.add_argument("--methods", default="rtn,gptq,awq", help="graphopt methods to run (rtn,gptq,awq)")
    ap.add_argument(
        "--accuracy-level-0",
        action="store_true",
        help="also time graphopt RTN with accuracy_level=0 (fp32 compute) to justify the default 4",
    )
    args = ap.parse_args(argv)
    size = "mini" if args.quick else "base"
    rounds = args.rounds or (15 if args.quick else 30)
    # GPTQ needs more calibration tokens than a weight has input channels (K up to 2816 here; a weight
    # with fewer gets RTN): 48 sequences x 64 tokens, in batches of 4.
    n_calib = args.calib or (16 if args.quick else 48)

    import graphopt

    work = _bench.TMP / f"quantize_int4_{size}"
    built, export_path, export_s = _bench.export_model("llama", size, work / "export")
    files: dict[str, Path] = {}
    info: dict[str, dict[str, Any]] = {}

    t0 = time.perf_counter()
    fp32 = graphopt.optimize(export_path, pipeline="cleanup,fuse").model
    files["fp32"] = _fresh(work / "fp32" / "model.onnx")
    graphopt.save(fp32, files["fp32"], external_data=True)
    info["fp32"] = {"optimize_s": time.perf_counter() - t0}

    calib = [built.feeds(min(4, n_calib - i), 64, seed=1000 + i) for i in range(0, n_calib, 4)]
    specs = {
        "graphopt-rtn": ("cleanup,fuse,quantize-weight-only(bits=4,block_size=32,method=rtn),cleanup", None),
        "graphopt-gptq": (
            "cleanup,fuse,quantize-weight-only(bits=4,block_size=32,method=gptq),cleanup",
            calib,
        ),
        "graphopt-awq": ("cleanup,fuse,quantize-weight-only(bits=4,block_size=32,method=awq),cleanup", calib),
    }
    specs = {k: v for k, v in specs.items() if k.split("-", 1)[1] in args.methods.split(",")}
    if args.accuracy_level_0:
        specs["graphopt-rtn-acc0"] = (
            "cleanup,fuse,quantize-weight-only(bits=4,block_size=32,method=rtn,accuracy_level=0),cleanup",
            None,
        )
    for name, (spec, data) in specs.items():
        t0 = time.perf_counter()
        r = graphopt.optimize(export_path, pipeline=spec, calibration=data)
        wall = time.perf_counter() - t0
        files[name] = _fresh(work / name / "model.onnx")
        graphopt.save(r.model, files[name], external_data=True)
        row = [p for p in r.report.passes if p.name == "quantize-weight-only"][-1]
        info[name] = {
            "optimize_s": wall,
            "quantize_pass_s": row.wall_s,
            "stats": row.stats,
            "details": {k: v for k, v in row.details.items() if k != "nodes"},
        }
        print(f"{name}: {wall:.1f}s {row.stats}", flush=True)
    try:
        files["ort"] = _fresh(work / "ort" / "model.onnx")
        info["ort"] = {"quantize_s": _ort_quantize(files["fp32"], files["ort"])}
    except Exception as e:  # the anchor failing is a result, not a crash of the benchmark
        info["ort"] = {"error": f"{type(e).__name__}: {e}"}
        files.pop("ort")

    results: dict[str, Any] = {
        "model": f"llama-{size}",
        "environment": _bench.environment(),
        "calibration_sequences": n_calib,
        "rounds": rounds,
        "machine_note": "2 shared cores; other jobs ran concurrently: ratios, not absolutes",
        "export_s": export_s,
        "tools": {},
    }
    fp32_bytes = _size(files["fp32"])
    sessions = {name: _session(path) for name, path in files.items()}
    held_out = [built.feeds(1, 64, seed=50 + i) for i in range(4)] + [built.feeds(2, 32, seed=60)]
    refs = [sessions["fp32"].run(None, f)[0] for f in held_out]
    for name, sess in sessions.items():
        cos, mx = [], []
        for f, ref in zip(held_out, refs):
            y = sess.run(None, f)[0]
            cos.append(_cosine(y, ref))
            mx.append(float(np.max(np.abs(y - ref))))
        results["tools"][name] = {
            **info[name],
            "bytes": _size(files[name]),
            "size_ratio": _size(files[name]) / fp32_bytes,
            "cosine_min": min(cos),
            "cosine_mean": float(np.mean(cos)),
            "max_abs": max(mx),
        }
    if "error" in info.get("ort", {}):
        results["tools"]["ort"] = info["ort"]
    names = list(sessions)
    for seq in (64, 1):
        feeds = built.feeds(1, seq, seed=7)
        for name in names:
            for _ in range(WARMUP):
                sessions[name].run(None, feeds)
        times: dict[str, list[float]] = {n: [] for n in names}
        for i in range(rounds):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                t = time.perf_counter()
                sessions[name].run(None, feeds)
                times[name].append((time.perf_counter() - t) * 1000)
        for name in names:
            results["tools"][name][f"latency_{seq}_ms"] = float(np.median(times[name]))
            results["tools"][name][f"latency_{seq}_p90_ms"] = float(np.percentile(times[name], 90))
    results["load_average"] = list(os.getloadavg())
    stem = "quantize_int4_quick" if args.quick else "quantize_int4"
    _bench.write_json(_bench.RESULTS / f"{stem}.json", results)
    md = report(results)
    (_bench.RESULTS / f"{stem}.md").write_text(md)
    print(md)
    return 0


def report(results: dict[str, Any]) -> str:
    tools = results["tools"]
    anchor = tools.get("ort", {})

    def ratio(a: float | None, b: float | None) -> str | None:
        return None if a is None or not b else f"{a / b:.2f}×"

    rows = []
    for name, t in tools.items():
        if "error" in t:
            rows.append([name, t["error"][:80]] + [None] * 8)
            continue
        rows.append(
            [
                name,
                f"{t['bytes'] / _bench.MB:.1f}",
                f"{t['size_ratio']:.3f}×",
                f"{t['latency_64_ms']:.2f}",
                ratio(t["latency_64_ms"], anchor.get("latency_64_ms")),
                f"{t['latency_1_ms']:.2f}",
                ratio(t["latency_1_ms"], anchor.get("latency_1_ms")),
                f"{t['cosine_min']:.5f}",
                f"{t['max_abs']:.4f}",
                f"{t.get('optimize_s', t.get('quantize_s', 0)):.1f}",
            ]
        )
    header = [
        "file",
        "MiB",
        "size / fp32",
        "64-token ms",
        "vs ORT",
        "1-token ms",
        "vs ORT",
        "cosine (min)",
        "max abs",
        "make s",
    ]
    env = results["environment"]
    lines = [
        f"# int4 weight-only quantization: {results['model']}",
        "",
        f"{env['cpu']}, {env['cores']} cores; onnxruntime {env['versions'].get('onnxruntime')}; "
        f"{results['rounds']} interleaved rounds, medians; {results['calibration_sequences']} calibration "
        "sequences of 64 tokens for GPTQ. " + results["machine_note"] + ".",
        "",
        "Output = `last_hidden_state` compared with the fp32 file on held-out token sequences. "
        "`make s`: graphopt's whole pipeline (export → fused → quantized); ORT: its quantizer alone on "
        "the fused fp32 file. ORT anchor: `MatMulNBitsQuantizer(bits=4, block_size=32, is_symmetric=True, "
        "accuracy_level=4, op_types_to_quantize=(MatMul, Gather))`.",
        "",
        _bench.markdown_table(header, rows),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
