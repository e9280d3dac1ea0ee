"""Static int8 quantization: graphopt ``quantize-static`` vs ONNX Runtime's ``quantize_static``.

Why: a static int8 model is only worth having if it keeps the float model's accuracy on real labels
and runs faster than float, at least as fast as what ORT's own quantizer writes from the same model;
and calibration must not need memory that grows with the calibration set.

Per model (the digits CNN: Conv+BN+ReLU, residual Add, MaxPool, 2 Linear; and the digits MLP; both
trained here on scikit-learn's bundled handwritten digits, ``tests/digits.py``; BERT-mini and a
YOLOv8n-style detector, random weights, fidelity vs float on held-out inputs):

1. float: the export after ``cleanup,fuse(domains=[standard]),cleanup`` (BatchNorm folded), which is
   also what both quantizers start from;
2. graphopt: ``quantize-static(calibrator=C),cleanup`` for every calibrator C (auto: the default, minmax, percentile,
   entropy, mse), uint8 asymmetric activations, per-channel int8 weights (the defaults);
3. ORT: ``onnxruntime.quantization.quantize_static`` on the float model after ORT's recommended
   ``quant_pre_process`` (symbolic shape inference is skipped where it fails, as on BERT), with
   QuantFormat.QDQ, per_channel=True,
   activation_type=QUInt8, weight_type=QInt8, for each calibrate method (MinMax, Entropy,
   Percentile); the anchor is the one with the best test accuracy (ties: higher logits SQNR).

Both calibrate on the same training-split batches (never the test split). Reported: test accuracy,
SQNR of the logits vs float, file size, and CPU latency at batch 1 and 64 (ORT_ENABLE_ALL, one
intra-op thread: the machine is shared; float, graphopt and the ORT anchor interleaved, rotated
each round, after warm-up; medians and ratios).

Calibration memory: in fresh interpreters, the CNN is calibrated on N and 10×N batches streamed from
a generator (entropy calibrator: histograms); peak RSS of the calibration phase for graphopt and
for ORT's quantize_static (Entropy, which keeps every batch's outputs until the end).

    python benchmarks/bench_quantize_static.py            # full
    python benchmarks/bench_quantize_static.py --quick    # a few minutes (writes quantize_static_quick.*)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import _bench

SCRIPT = Path(__file__).resolve()
CALIBRATORS = ("auto", "minmax", "percentile", "entropy", "mse")
ORT_METHODS = ("MinMax", "Entropy", "Percentile")
PRE = "cleanup,fuse(domains=[standard]),cleanup"


def _session(model: Any, threads: int = 1) -> Any:
    return _bench.ort_session(model, threads)


def _sqnr(ref: Any, got: Any) -> float:
    import numpy as np

    ref, got = ref.astype(np.float64), got.astype(np.float64)
    noise = float(np.sum((ref - got) ** 2))
    return float("inf") if noise == 0 else 10 * float(np.log10(np.sum(ref**2) / noise))


class _Reader:
    """ORT CalibrationDataReader over the same feed dicts graphopt calibrates with."""

    def __init__(self, feeds: Any) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._it, None)


def ort_quantize(src: str, dst: str, feeds: Any, method: str) -> float:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    t0 = time.perf_counter()
    quantize_static(
        src,
        dst,
        _Reader(feeds),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=getattr(CalibrationMethod, method),
    )
    return time.perf_counter() - t0


def ort_preprocess(src: str, dst: str) -> tuple[str, str]:
    """ORT's recommended pre-processing (``quant_pre_process``: shape inference + ORT's graph
    optimizations) before its quantizer; the plain model when it fails. Returns (path, what)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for symbolic in (True, False):
        try:
            quant_pre_process(src, dst, skip_symbolic_shape=not symbolic)
            return dst, "quant_pre_process" + ("" if symbolic else " (skip_symbolic_shape)")
        except Exception:  # e.g. "Incomplete symbolic shape inference" on the BERT export
            continue
    return src, "plain (quant_pre_process failed)"


def graphopt_quantize(src: str, dst: str, feeds: Any, calibrator: str) -> tuple[float, dict[str, Any]]:
    import graphopt

    t0 = time.perf_counter()
    r = graphopt.optimize(
        graphopt.load(src),
        pipeline=f"quantize-static(calibrator={calibrator}),cleanup",
        calibration=list(feeds),
    )
    wall = time.perf_counter() - t0
    graphopt.save(r.model, dst)
    row = next(p for p in r.report.passes if p.name == "quantize-static")
    return wall, dict(row.stats)


def fused_ops(path: str) -> dict[str, int]:
    """Op histogram of ORT's optimized graph: are the QDQ groups integer kernels?"""
    import collections

    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    return dict(sorted(ops.items()))


def latency(files: dict[str, str], feeds: dict[str, Any], rounds: int) -> dict[str, Any]:
    """Interleaved medians (ms) for ``files`` on ``feeds``; rotated order each round."""
    import numpy as np

    sessions = {n: _session(p) for n, p in files.items()}
    for s in sessions.values():
        for _ in range(10):
            s.run(None, feeds)
    times: dict[str, list[float]] = {n: [] for n in sessions}
    names = list(sessions)
    for i in range(rounds):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            t0 = time.perf_counter()
            sessions[n].run(None, feeds)
            times[n].append((time.perf_counter() - t0) * 1000)
    return {
        n: {"median_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90))} for n, t in times.items()
    }


def run_model(kind: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    import numpy as np
    import torch

    import graphopt

    _bench.tests_on_path()
    from digits import accuracy, train_digits_cnn, train_digits_mlp

    torch.set_num_threads(1)
    d = (train_digits_cnn if kind == "cnn" else train_digits_mlp)()
    float_path = str(folder / f"{kind}_float.onnx")
    graphopt.save(graphopt.optimize(d.export(), pipeline=PRE).model, float_path)
    feeds = d.calibration(args.calibration_samples, 32)
    ref_logits = _session(float_path).run(None, {"x": d.x_test})[0]
    out: dict[str, Any] = {
        "float_test_accuracy": accuracy(ref_logits, d.y_test),
        "calibration_batches": len(feeds),
        "variants": {},
    }

    def evaluate(name: str, path: str, wall: float, extra: dict[str, Any] | None = None) -> None:
        logits = _session(path).run(None, {"x": d.x_test})[0]
        out["variants"][name] = {
            "test_accuracy": accuracy(logits, d.y_test),
            "logits_sqnr_db": round(_sqnr(ref_logits, logits), 2),
            "file_bytes": os.path.getsize(path),
            "quantize_s": round(wall, 3),
            "path": path,
            **(extra or {}),
        }

    evaluate("float", float_path, 0.0)
    for c in CALIBRATORS:
        path = str(folder / f"{kind}_graphopt_{c}.onnx")
        wall, stats = graphopt_quantize(float_path, path, feeds, c)
        evaluate(f"graphopt:{c}", path, wall, {"stats": stats})
    ort_src, out["ort_input"] = ort_preprocess(float_path, str(folder / f"{kind}_ort_pre.onnx"))
    for m in ORT_METHODS:
        path = str(folder / f"{kind}_ort_{m}.onnx")
        try:
            wall = ort_quantize(ort_src, path, feeds, m)
        except Exception as e:  # an anchor failure is a result, not a crash
            out["variants"][f"ort:{m}"] = {"error": f"{type(e).__name__}: {e}"}
            continue
        evaluate(f"ort:{m}", path, wall)

    def best(prefix: str) -> str:
        cands = [
            (v["test_accuracy"], v["logits_sqnr_db"], n)
            for n, v in out["variants"].items()
            if n.startswith(prefix) and "error" not in v
        ]
        return max(cands)[2]

    out["ort_anchor"] = best("ort:")
    out["graphopt_default"] = f"graphopt:{_default_calibrator()}"
    out["graphopt_best"] = best("graphopt:")
    timed = {
        "float": float_path,
        "graphopt": out["variants"][out["graphopt_default"]]["path"],
        "ort": out["variants"][out["ort_anchor"]]["path"],
    }
    out["ort_fused_ops"] = {n: fused_ops(p) for n, p in timed.items()}
    out["latency"] = {}
    for batch, rounds in ((1, args.rounds), (64, max(20, args.rounds // 4))):
        x = d.x_test[:batch]
        lat = latency(timed, {"x": np.ascontiguousarray(x)}, rounds)
        lat["graphopt_vs_ort"] = round(lat["graphopt"]["median_ms"] / lat["ort"]["median_ms"], 3)
        lat["graphopt_vs_float"] = round(lat["graphopt"]["median_ms"] / lat["float"]["median_ms"], 3)
        lat["rounds"] = rounds
        out["latency"][f"batch{batch}"] = lat
    for v in out["variants"].values():
        v.pop("path", None)
    return out


def run_bert(args: argparse.Namespace, folder: Path, size: str = "mini") -> dict[str, Any]:
    """BERT (transformers BertModel, random weights with perturbed norms): no labels, so fidelity is
    the cosine/SQNR of the last hidden state vs float on held-out inputs; latency at batch 1, seq 128."""
    _bench.tests_on_path()
    from models import build_bert

    b = build_bert(size)
    feeds = [b.feeds(2, 64, seed=s) for s in range(16 if not args.quick else 8)]
    held_out = [b.feeds(2, 64, seed=1000 + s) for s in range(4)]
    return run_unlabelled(
        args,
        folder,
        "bert",
        f"bert-{size}",
        b.export(),
        feeds,
        held_out,
        b.feeds(1, 128, seed=7),
        "batch1_seq128",
    )


def run_detector(args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """The YOLOv8n-style detector (``tests/models.py`` build_yolo_detector: C2f Split/Concat, SPPF
    MaxPools, Upsample, DFL head; random weights, 320x320): cosine/SQNR of the [1, 4+classes,
    anchors] output vs float on held-out images; latency at batch 1 (issue 18 defect 7)."""
    import torch

    _bench.tests_on_path()
    from models import build_yolo_detector

    torch.set_num_threads(1)
    e = build_yolo_detector()
    model = e.export()
    name = model.graph.inputs[0].name or "x"

    def image(seed: int) -> dict[str, Any]:
        return {name: e.feeds(1, 320, seed)["images"]}

    feeds = [image(s) for s in range(8 if not args.quick else 4)]
    held_out = [image(1000 + s) for s in range(4)]
    return run_unlabelled(
        args, folder, "yolo", "yolov8n-style detector", model, feeds, held_out, image(7), "batch1_320"
    )


def run_unlabelled(
    args: argparse.Namespace,
    folder: Path,
    kind: str,
    title: str,
    model: Any,
    feeds: list[dict[str, Any]],
    held_out: list[dict[str, Any]],
    timing_feeds: dict[str, Any],
    timing_label: str,
) -> dict[str, Any]:
    """Fidelity (cosine/SQNR of the first output vs float on ``held_out``) and interleaved latency
    on ``timing_feeds`` for every graphopt calibrator and ORT calibrate method."""
    import numpy as np

    import graphopt

    float_path = str(folder / f"{kind}_float.onnx")
    graphopt.save(graphopt.optimize(model, pipeline=PRE).model, float_path)
    ref_sess = _session(float_path)
    refs = [ref_sess.run(None, f)[0] for f in held_out]
    out: dict[str, Any] = {"model": title, "calibration_batches": len(feeds), "variants": {}}

    def evaluate(name: str, path: str, wall: float) -> None:
        s = _session(path)
        got = [s.run(None, f)[0] for f in held_out]
        a = np.concatenate([r.ravel() for r in refs]).astype(np.float64)
        c = np.concatenate([g.ravel() for g in got]).astype(np.float64)
        out["variants"][name] = {
            "cosine": round(float(a @ c / np.linalg.norm(a) / np.linalg.norm(c)), 6),
            "sqnr_db": round(_sqnr(a, c), 2),
            "file_bytes": os.path.getsize(path),
            "quantize_s": round(wall, 3),
            "path": path,
        }

    evaluate("float", float_path, 0.0)
    for c in CALIBRATORS:
        path = str(folder / f"{kind}_graphopt_{c}.onnx")
        wall, _ = graphopt_quantize(float_path, path, feeds, c)
        evaluate(f"graphopt:{c}", path, wall)
    ort_src, out["ort_input"] = ort_preprocess(float_path, str(folder / f"{kind}_ort_pre.onnx"))
    for m in ORT_METHODS:
        path = str(folder / f"{kind}_ort_{m}.onnx")
        try:
            wall = ort_quantize(ort_src, path, feeds, m)
        except Exception as e:
            out["variants"][f"ort:{m}"] = {"error": f"{type(e).__name__}: {e}"}
            continue
        evaluate(f"ort:{m}", path, wall)
    ort_names = [n for n, v in out["variants"].items() if n.startswith("ort:") and "error" not in v]
    out["ort_anchor"] = max(ort_names, key=lambda n: out["variants"][n]["sqnr_db"])
    out["graphopt_default"] = f"graphopt:{_default_calibrator()}"
    timed = {
        "float": float_path,
        "graphopt": out["variants"][out["graphopt_default"]]["path"],
        "ort": out["variants"][out["ort_anchor"]]["path"],
    }
    out["ort_fused_ops"] = {n: fused_ops(p) for n, p in timed.items()}
    rounds = max(20, args.rounds // 5)
    lat = latency(timed, timing_feeds, rounds)
    lat["graphopt_vs_ort"] = round(lat["graphopt"]["median_ms"] / lat["ort"]["median_ms"], 3)
    lat["graphopt_vs_float"] = round(lat["graphopt"]["median_ms"] / lat["float"]["median_ms"], 3)
    lat["rounds"] = rounds
    out["latency"] = {timing_label: lat}
    for v in out["variants"].values():
        v.pop("path", None)
    return out


def _default_calibrator() -> str:
    from graphopt.passes.quantize.static import StaticOptions

    return StaticOptions().calibrator


# ---------------------------------------------------------------------------------------------
# Calibration memory (worker in a fresh interpreter)


def memory_worker(tool: str, batches: int, model_path: str, result_file: Path) -> None:
    import numpy as np

    def gen() -> Any:
        rng = np.random.default_rng(0)
        for _ in range(batches):
            yield {"x": rng.random((64, 1, 8, 8), dtype=np.float32)}

    meter = _bench.PeakMeter()
    import onnxruntime  # noqa: F401  (imports outside the measured phase)

    import graphopt

    model = graphopt.load(model_path)
    with meter.phase("calibrate"):
        if tool == "graphopt":
            graphopt.optimize(model, pipeline="quantize-static(calibrator=entropy)", calibration=gen)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                ort_quantize(model_path, os.path.join(tmp, "q.onnx"), gen(), "Entropy")
    _bench.write_json(
        result_file,
        {
            "peak_mb": meter.peaks["calibrate"] / _bench.MB,
            "start_mb": meter.start["calibrate"] / _bench.MB,
            "wall_s": meter.wall["calibrate"],
            "method": meter.method,
        },
    )


def memory(folder: Path, n: int, timeout: float) -> dict[str, Any]:
    model = str(folder / "cnn_float.onnx")
    out: dict[str, Any] = {"batch_size": 64, "batches": [n, 10 * n]}
    for tool in ("graphopt", "ort"):
        rows = {}
        for b in (n, 10 * n):
            r = _bench.run_worker(
                SCRIPT, ["--memory-worker", tool, str(b), model], folder / "mem.json", timeout
            )
            rows[str(b)] = r.data if r.ok else {"error": r.error}
        ok = all("peak_mb" in v for v in rows.values())
        out[tool] = {
            "runs": rows,
            "growth_mb": round(rows[str(10 * n)]["peak_mb"] - rows[str(n)]["peak_mb"], 1) if ok else None,
        }
    return out


# ---------------------------------------------------------------------------------------------
# Report


def render(data: dict[str, Any]) -> str:
    lines = [
        f"# Static int8 quantization: graphopt vs ONNX Runtime quantize_static{' (quick)' if data['quick'] else ''}",
        "",
        f"Machine: {data['environment']['cpu']}, {data['environment']['cores']} cores "
        "(shared with other jobs while measured: read ratios, not absolute times). "
        f"Calibration: {data['calibration_samples']} training samples in batches of 32.",
        "",
    ]
    for kind, m in data["models"].items():
        bert = kind in ("bert", "yolo")  # no labels: cosine/SQNR vs float
        title = (
            f"## {m['model']} (output vs float on held-out inputs)"
            if bert
            else f"## digits {kind.upper()} (float test accuracy {m['float_test_accuracy']:.4f})"
        )
        lines += [title, ""]
        rows = []
        for name, v in m["variants"].items():
            if "error" in v:
                rows.append([name, v["error"][:60], None, None, None])
                continue
            mark = (
                " (anchor)"
                if name == m["ort_anchor"]
                else (" (default)" if name == m["graphopt_default"] else "")
            )
            first = f"{v['cosine']:.6f}" if bert else f"{v['test_accuracy']:.4f}"
            sq = v["sqnr_db"] if bert else v["logits_sqnr_db"]
            rows.append([name + mark, first, sq, round(v["file_bytes"] / 1024, 1), v["quantize_s"]])
        head = [
            "variant",
            "cosine" if bert else "test acc",
            "SQNR dB" if bert else "logits SQNR dB",
            "file KiB",
            "quantize s",
        ]
        lines += [
            _bench.markdown_table(head, rows),
            "",
            f"ORT quantized: {m.get('ort_input', 'plain')} of the float model.",
            "",
        ]
        lrows = []
        for b, lat in m["latency"].items():
            lrows.append(
                [
                    b,
                    round(lat["float"]["median_ms"], 4),
                    round(lat["graphopt"]["median_ms"], 4),
                    round(lat["ort"]["median_ms"], 4),
                    f"{lat['graphopt_vs_ort']}×",
                    f"{lat['graphopt_vs_float']}×",
                    lat["rounds"],
                ]
            )
        lines += [
            "Latency (median ms, interleaved, 1 intra-op thread):",
            "",
            _bench.markdown_table(
                ["batch", "float", "graphopt", "ORT anchor", "graphopt/ORT", "graphopt/float", "rounds"],
                lrows,
            ),
            "",
        ]
        ops = m["ort_fused_ops"]
        lines += ["Ops after ONNX Runtime's own optimizations (QDQ groups fused into integer kernels?):", ""]
        for n, h in ops.items():
            lines.append(f"- {n}: " + ", ".join(f"{k}×{c}" for k, c in h.items()))
        lines.append("")
    mem = data.get("memory")
    if mem:
        lines += [
            f"## Calibration peak memory (CNN, entropy, batches of {mem['batch_size']}, fresh interpreter)",
            "",
        ]
        rows = []
        for tool in ("graphopt", "ort"):
            r = mem[tool]["runs"]
            vals = [r[str(b)].get("peak_mb") for b in mem["batches"]]
            rows.append(
                [tool]
                + [
                    round(v, 1) if v is not None else r[str(b)].get("error", "")[:40]
                    for v, b in zip(vals, mem["batches"])
                ]
                + [mem[tool]["growth_mb"]]
            )
        lines += [
            _bench.markdown_table(
                ["tool"] + [f"peak MB, {b} batches" for b in mem["batches"]] + ["growth MB"], rows
            ),
            "",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer latency rounds and memory batches")
    p.add_argument(
        "--models",
        default="cnn,mlp,bert,yolo",
        help="subset of cnn,mlp,bert (BERT-mini),yolo (YOLOv8n-style)",
    )
    p.add_argument("--rounds", type=int, default=None, help="latency rounds at batch 1 (batch 64: a quarter)")
    p.add_argument("--calibration-samples", type=int, default=512)
    p.add_argument("--memory-batches", type=int, default=None, help="N (N and 10×N batches are measured)")
    p.add_argument("--timeout", type=float, default=1200)
    p.add_argument("--memory-worker", nargs=3, metavar=("TOOL", "BATCHES", "MODEL"), help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.memory_worker:
        tool, b, model = args.memory_worker
        memory_worker(tool, int(b), model, args.result_file)
        return 0
    args.rounds = args.rounds or (200 if args.quick else 1000)
    n = args.memory_batches or (10 if args.quick else 30)
    folder = _bench.TMP / "quantize_static"
    folder.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = {
        "quick": args.quick,
        "environment": _bench.environment(),
        "calibration_samples": args.calibration_samples,
        "models": {},
    }
    for kind in args.models.split(","):
        print(f"[{kind}] training, quantizing, timing ...", file=sys.stderr)
        if kind == "bert":
            data["models"][kind] = run_bert(args, folder)
        elif kind == "yolo":
            data["models"][kind] = run_detector(args, folder)
        else:
            data["models"][kind] = run_model(kind, args, folder)
    if "cnn" in data["models"]:
        print("[memory] calibration peak RSS ...", file=sys.stderr)
        data["memory"] = memory(folder, n, args.timeout)
    stem = "quantize_static_quick" if args.quick else "quantize_static"
    _bench.write_json(_bench.RESULTS / f"{stem}.json", data)
    (_bench.RESULTS / f"{stem}.md").write_text(render(data))
    print(render(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
