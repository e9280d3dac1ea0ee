"""Peak memory of graphopt on a model over protobuf's 2 GB limit: load → optimize → save.

Why: the weights of a large model must stay on disk (memory-mapped external data) through the
whole pipeline; a pass that copies every weight, or a save that materialises the model, shows up
as peak RSS well above the weight size. The goal is peak RSS < 1.5 × the weight bytes.

The model (``--layers`` MatMul+bias+ReLU layers of ``--weight-mb`` float32 weights each, plus an
Identity, a foldable bias constant and a shape chain per model so cleanup has work to do) is
written straight to external data, one chunk of rows at a time, so generating it never holds a
whole weight in memory. Then, each in a fresh interpreter:

1. ``measure``: graphopt.load → graphopt.optimize(target="ort-cpu") → graphopt.save(external
   data), with the peak RSS of each phase (kernel high-water mark, reset per phase) and the
   anonymous / file-backed split sampled from outside the process;
2. ``attribute`` (when the goal is missed, or with ``--attribute``): the same pipeline pass by
   pass, with each pass's own peak, to name the pass or function responsible;
3. ``check`` (skip with ``--no-check``): the original and the saved model run on ONNX Runtime on
   a small input; outputs must agree.

    python benchmarks/bench_large_model.py                 # 5 × 512 MiB = 2.5 GiB of weights
    python benchmarks/bench_large_model.py --layers 2 --weight-mb 64 --keep   # small smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import _bench
import numpy as np

SCRIPT = Path(__file__).resolve()
GOAL = 1.5
SEED = 0


# ---------------------------------------------------------------------------------------------
# Model generation (streams weights to disk)


def layer_dims(layers: int, weight_mb: float) -> list[int]:
    """Feature sizes d0..dL: weights alternate [a, 2a] and [2a, a] with a*2a*4 bytes = weight_mb."""
    a = int(math.sqrt(weight_mb * _bench.MB / 8))
    a -= a % 64
    return [a if i % 2 == 0 else 2 * a for i in range(layers + 1)]


def generate(folder: Path, layers: int, weight_mb: float, chunk_mb: int = 32) -> dict[str, Any]:
    """Write ``model.onnx`` + ``model.onnx.data`` into ``folder``; returns what was written."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    dims = layer_dims(layers, weight_mb)
    data_name = "model.onnx.data"
    initializers: list[TensorProto] = []
    offset = 0
    t0 = time.perf_counter()
    with open(folder / data_name, "wb") as f:
        for i in range(layers):
            rows, cols = dims[i], dims[i + 1]
            pad = (-offset) % 65536
            f.write(b"\0" * pad)
            offset += pad
            rng = np.random.default_rng(SEED + i)
            scale = np.float32(1.0 / math.sqrt(rows))
            step = max(1, chunk_mb * _bench.MB // (cols * 4))
            for r in range(0, rows, step):
                chunk = rng.standard_normal((min(step, rows - r), cols), dtype=np.float32)
                chunk *= scale
                f.write(chunk.tobytes())
            length = rows * cols * 4
            t = TensorProto(name=f"w{i}", data_type=TensorProto.FLOAT, dims=[rows, cols])
            t.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(offset)), ("length", str(length))):
                entry = t.external_data.add()
                entry.key, entry.value = k, v
            initializers.append(t)
            offset += length
    gen_s = time.perf_counter() - t0

    nodes = []
    h = "x"
    for i in range(layers):
        rng = np.random.default_rng(1000 + i)
        bias = rng.standard_normal(dims[i + 1]).astype(np.float32) * np.float32(0.1)
        nodes += [
            helper.make_node("Identity", [h], [f"id{i}"]),
            helper.make_node("MatMul", [f"id{i}", f"w{i}"], [f"mm{i}"]),
            # bias = half_bias * 2, written as Constant nodes: folding and lifting have work to do.
            helper.make_node("Constant", [], [f"hb{i}"], value=numpy_helper.from_array(bias / 2, f"hb{i}")),
            helper.make_node(
                "Constant", [], [f"two{i}"], value=numpy_helper.from_array(np.float32(2.0), f"two{i}")
            ),
            helper.make_node("Mul", [f"hb{i}", f"two{i}"], [f"b{i}"]),
            helper.make_node("Add", [f"mm{i}", f"b{i}"], [f"a{i}"]),
        ]
        h = f"a{i}"
        if i < layers - 1:
            nodes.append(helper.make_node("Relu", [h], [f"r{i}"]))
            h = f"r{i}"
    # Shape chain: reshape to [batch, -1] computed from the input's shape (a no-op reshape).
    nodes += [
        helper.make_node("Shape", [h], ["shp"]),
        helper.make_node("Constant", [], ["zero"], value=numpy_helper.from_array(np.int64(0), "zero")),
        helper.make_node("Gather", ["shp", "zero"], ["bsz"], axis=0),
        helper.make_node(
            "Constant", [], ["ax"], value=numpy_helper.from_array(np.array([0], np.int64), "ax")
        ),
        helper.make_node("Unsqueeze", ["bsz", "ax"], ["bsz1"]),
        helper.make_node(
            "Constant", [], ["m1"], value=numpy_helper.from_array(np.array([-1], np.int64), "m1")
        ),
        helper.make_node("Concat", ["bsz1", "m1"], ["newshape"], axis=0),
        helper.make_node("Reshape", [h, "newshape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "large_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", dims[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", dims[-1]])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, str(folder / "model.onnx"))
    weight_bytes = sum(dims[i] * dims[i + 1] * 4 for i in range(layers))
    return {
        "layers": layers,
        "dims": dims,
        "weight_bytes": weight_bytes,
        "nodes": len(nodes),
        "data_file_bytes": (folder / data_name).stat().st_size,
        "generate_s": round(gen_s, 1),
    }


# ---------------------------------------------------------------------------------------------
# Workers (fresh interpreters)


def measure(src: Path, dst: Path) -> dict[str, Any]:
    """load → optimize → save with per-phase peak RSS and wall time."""
    import graphopt

    meter = _bench.PeakMeter()
    marks: dict[str, Any] = {}
    parts: dict[str, dict[str, int]] = {}
    marks["load"] = time.time()
    with meter.phase("load"):
        model = graphopt.load(src)
    parts["load"] = _bench.rss_parts()
    marks["optimize"] = time.time()
    with meter.phase("optimize"):
        result = graphopt.optimize(model, target="ort-cpu")
    parts["optimize"] = _bench.rss_parts()
    marks["save"] = time.time()
    with meter.phase("save"):
        graphopt.save(result.model, dst, external_data=True)
    parts["save"] = _bench.rss_parts()
    marks["end"] = time.time()
    return {
        "memory_method": meter.method,
        "wall_s": meter.wall,
        "peak_bytes": meter.peaks,
        "start_bytes": meter.start,
        "rss_parts_at_end": parts,
        "phase_start_time": marks,
        "report": {
            "nodes": [result.report.before.nodes, result.report.after.nodes],
            "summary": result.report.summary(),
        },
    }


def attribute(src: Path, dst: Path) -> dict[str, Any]:
    """The default pipeline pass by pass, with each pass's peak RSS; then the clone and save steps."""
    import graphopt
    from graphopt.registry import default_registry

    meter = _bench.PeakMeter()
    rows: list[dict[str, Any]] = []

    class PerPass:
        def before_pass(self, name: str, model: Any) -> None:
            self.start = _bench.rss()
            self.t0 = time.perf_counter()
            _bench.reset_peak()

        def after_pass(self, name: str, model: Any, record: Any) -> None:
            peak = max(_bench.peak_rss(), _bench.rss())
            rows.append(
                {
                    "step": name,
                    "iteration": record.iteration,
                    "wall_s": time.perf_counter() - self.t0,
                    "start_mb": self.start / _bench.MB,
                    "peak_mb": peak / _bench.MB,
                    "end_mb": _bench.rss() / _bench.MB,
                    "extra_mb": (peak - self.start) / _bench.MB,
                    **{k + "_mb": v / _bench.MB for k, v in _bench.rss_parts().items()},
                }
            )

    def step(name: str, fn: Any) -> Any:
        with meter.phase(name):
            out = fn()
        rows.append(
            {
                "step": name,
                "iteration": None,
                "wall_s": meter.wall[name],
                "start_mb": meter.start[name] / _bench.MB,
                "peak_mb": meter.peaks[name] / _bench.MB,
                "end_mb": _bench.rss() / _bench.MB,
                "extra_mb": (meter.peaks[name] - meter.start[name]) / _bench.MB,
                **{k + "_mb": v / _bench.MB for k, v in _bench.rss_parts().items()},
            }
        )
        return out

    model = step("graphopt.load", lambda: graphopt.load(src))
    work = step("Model.clone (in optimize)", model.clone)
    reg = default_registry()
    text = reg.backend("ort-cpu").default_pipeline(2)
    pipe = graphopt.Pipeline.parse(text)
    pipe.run(work, instruments=[PerPass()])
    step("graphopt.save", lambda: graphopt.save(work, dst, external_data=True))
    return {"pipeline": text, "rows": rows}


def run_ort(path: Path, out: Path, dim: int) -> dict[str, Any]:
    """Run a model on ONNX Runtime (its rewrites off) on a seeded [2, dim] input; save the output."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    t0 = time.perf_counter()
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(SEED).standard_normal((2, dim)).astype(np.float32)
    (y,) = sess.run(None, {"x": x})
    np.save(out, y)
    return {
        "seconds": time.perf_counter() - t0,
        "shape": list(y.shape),
        "peak_mb": _bench.peak_rss() / _bench.MB,
    }


# ---------------------------------------------------------------------------------------------
# Driver


def _sampled_worker(args: list[str], result_file: Path, timeout: float) -> tuple[dict[str, Any], list[tuple]]:
    """Run a worker and sample its RssAnon/RssFile from outside every 20 ms (no GIL involved)."""
    result_file.unlink(missing_ok=True)
    cmd = [sys.executable, str(SCRIPT), *args, "--result-file", str(result_file)]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONHASHSEED="0"),
    )
    samples: list[tuple] = []
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout or []), daemon=True)
    reader.start()
    deadline = time.time() + timeout
    while proc.poll() is None:
        try:
            fields = {}
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    key = line.split(":", 1)[0]
                    if key in ("RssAnon", "RssFile", "VmRSS"):
                        fields[key] = int(line.split()[1]) * 1024
            if fields:
                samples.append(
                    (time.time(), fields.get("RssAnon", 0), fields.get("RssFile", 0), fields.get("VmRSS", 0))
                )
        except OSError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise SystemExit(f"worker {args[0]} timed out after {timeout:.0f}s")
        time.sleep(0.02)
    reader.join()
    if proc.returncode != 0 or not result_file.exists():
        raise SystemExit(
            f"worker {' '.join(args[:2])} failed (exit {proc.returncode}):\n" + "".join(output[-20:])
        )
    return json.loads(result_file.read_text()), samples


def _phase_sample_peaks(samples: list[tuple], marks: dict[str, float]) -> dict[str, dict[str, float]]:
    """Max sampled anonymous / file-backed RSS within each phase (MB)."""
    names = ["load", "optimize", "save"]
    out = {}
    for i, name in enumerate(names):
        t0, t1 = marks[name], marks[names[i + 1]] if i + 1 < len(names) else marks["end"]
        inside = [s for s in samples if t0 <= s[0] <= t1]
        if inside:
            out[name] = {
                "anon_mb": max(s[1] for s in inside) / _bench.MB,
                "file_mb": max(s[2] for s in inside) / _bench.MB,
                "rss_mb": max(s[3] for s in inside) / _bench.MB,
            }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=5, help="MatMul layers (default 5)")
    p.add_argument(
        "--weight-mb", type=float, default=512, help="MiB of float32 weights per layer (default 512)"
    )
    p.add_argument("--keep", action="store_true", help="keep the generated and optimized files")
    p.add_argument(
        "--reuse", action="store_true", help="reuse a kept model of the same size instead of generating"
    )
    p.add_argument(
        "--no-check", action="store_true", help="skip the ONNX Runtime output check (slow on big models)"
    )
    p.add_argument("--attribute", action="store_true", help="always run the per-pass memory attribution")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", type=Path, default=_bench.RESULTS / "large_model.json")
    p.add_argument("--worker", nargs=3, metavar=("KIND", "SRC", "DST"), help=argparse.SUPPRESS)
    p.add_argument("--dim", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        kind, src, dst = args.worker
        fn = {
            "measure": lambda: measure(Path(src), Path(dst)),
            "attribute": lambda: attribute(Path(src), Path(dst)),
            "ort": lambda: run_ort(Path(src), Path(dst), args.dim),
        }[kind]
        _bench.write_json(args.result_file, fn())
        return 0

    folder = _bench.TMP / "large_model"
    src_dir, out_dir = folder / "in", folder / "out"
    dims = layer_dims(args.layers, args.weight_mb)
    weight_bytes = sum(dims[i] * dims[i + 1] * 4 for i in range(args.layers))
    need = 2 * weight_bytes + 2 * max(dims[i] * dims[i + 1] * 4 for i in range(args.layers)) + 2**30
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < need:
        print(
            f"not enough disk in {folder}: {free / 2**30:.1f} GiB free, need {need / 2**30:.1f} GiB",
            file=sys.stderr,
        )
        return 2

    results: dict[str, Any] = {
        "benchmark": "large_model",
        "command": " ".join(
            ["python", "benchmarks/bench_large_model.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "environment": _bench.environment(),
        "goal_peak_over_weights": GOAL,
    }
    try:
        meta_file = src_dir / "meta.json"
        meta = json.loads(meta_file.read_text()) if args.reuse and meta_file.exists() else None
        if meta is None or meta.get("dims") != dims:
            shutil.rmtree(src_dir, ignore_errors=True)
            print(
                f"generating {args.layers} layers, {weight_bytes / 2**30:.2f} GiB of weights in {src_dir} ...",
                flush=True,
            )
            meta = generate(src_dir, args.layers, args.weight_mb)
            _bench.write_json(meta_file, meta)
        results["model"] = meta
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        src, dst = src_dir / "model.onnx", out_dir / "model.onnx"

        print("measuring graphopt.load → optimize → save in a fresh process ...", flush=True)
        data, samples = _sampled_worker(
            ["--worker", "measure", str(src), str(dst)], folder / "measure.json", args.timeout
        )
        peaks = data["peak_bytes"]
        overall = max(peaks.values())
        results["measure"] = {
            **data,
            "peak_mb": {k: round(v / _bench.MB, 1) for k, v in peaks.items()},
            "sampled_phase_peaks_mb": _phase_sample_peaks(samples, data["phase_start_time"]),
            "overall_peak_mb": round(overall / _bench.MB, 1),
            "weights_mb": round(weight_bytes / _bench.MB, 1),
            "peak_over_weights": round(overall / weight_bytes, 3),
            "output_files_mb": {f.name: round(f.stat().st_size / _bench.MB, 1) for f in out_dir.iterdir()},
        }
        ratio = overall / weight_bytes
        results["goal_met"] = ratio < GOAL
        print(
            f"peak RSS {overall / _bench.MB:.0f} MB for {weight_bytes / _bench.MB:.0f} MB of weights: "
            f"{ratio:.2f}× (goal < {GOAL}×)",
            flush=True,
        )
        split = results["measure"]["sampled_phase_peaks_mb"]
        for name in ("load", "optimize", "save"):
            parts = split.get(name)
            extra = (
                f"  (sampled: anonymous {parts['anon_mb']:.0f} MB, file-backed {parts['file_mb']:.0f} MB)"
                if parts
                else ""
            )
            print(
                f"  {name:9} {data['wall_s'][name]:7.1f} s   peak {peaks[name] / _bench.MB:8.0f} MB{extra}",
                flush=True,
            )

        if args.attribute or ratio >= GOAL:
            print("attributing memory pass by pass ...", flush=True)
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)
            att, _ = _sampled_worker(
                ["--worker", "attribute", str(src), str(dst)], folder / "attribute.json", args.timeout
            )
            results["attribution"] = att
            # Every step that raised the peak by more than 10 MB over its starting RSS, in order.
            print(f"  {'step':38} {'start MB':>9} {'peak MB':>9} {'+MB':>8} {'s':>7}")
            for r in (r for r in att["rows"] if r["extra_mb"] > 10):
                it = f"#{r['iteration']}" if r["iteration"] else ""
                print(
                    f"  {r['step'] + it:38} {r['start_mb']:9.0f} {r['peak_mb']:9.0f} {r['extra_mb']:8.0f} "
                    f"{r['wall_s']:7.1f}"
                )

        if not args.no_check:
            print("checking the saved model on ONNX Runtime ...", flush=True)
            outs = []
            for tag, path in (("original", src), ("optimized", dst)):
                npy = folder / f"{tag}.npy"
                r = _bench.run_worker(
                    SCRIPT,
                    ["--worker", "ort", str(path), str(npy), "--dim", str(dims[0])],
                    folder / f"ort-{tag}.json",
                    args.timeout,
                )
                if not r.ok:
                    results["check"] = {"passed": False, "error": f"{tag}: {r.error}"}
                    break
                outs.append((r.data, np.load(npy)))
            else:
                err = float(np.max(np.abs(outs[0][1] - outs[1][1])))
                results["check"] = {
                    "passed": err <= 1e-4,
                    "max_abs_err": err,
                    "ort_seconds": [o[0]["seconds"] for o in outs],
                    "ort_peak_mb": [o[0]["peak_mb"] for o in outs],
                }
            print(f"  {results['check']}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)

    _bench.write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
