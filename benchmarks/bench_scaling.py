"""Optimizer time vs model size: graphopt's ort-cpu pipeline on one architecture at 2, 4, 8, 16, 32 layers.

Why: a pass that rescans the graph per rewrite is quadratic and only shows on deep models; the
time per export node should stay flat as the layer count grows. The architecture is BERT at the
"mini" width (hidden 256, 4 heads, FFN 1024, random weights, seeded), only ``num_hidden_layers``
changes. Each depth is exported once (cached), then optimized in a fresh interpreter per repeat
(``bench_fusion.optimize_one``: load + optimize timed, peak RSS, save); medians.

    python benchmarks/bench_scaling.py            # 2..32 layers, 2 repeats -> results/scaling.json/.md/.png
    python benchmarks/bench_scaling.py --quick    # 2, 4, 8 layers, 1 repeat -> results/scaling_quick.*
    python benchmarks/bench_scaling.py --chain    # Add/Relu chains of 1k..200k nodes -> results/scaling_chain.*

``--chain`` is the stress case from a hostile-input run: one long Add/Relu chain (nothing fuses),
where every per-node cost of the passes shows, and where the output file must stay the size of
the input (no annotations the input did not have).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _bench
import bench_fusion

SCRIPT = Path(__file__).resolve()
LAYERS = (2, 4, 8, 16, 32)
QUICK_LAYERS = (2, 4, 8)


def prepare(layers: int, folder: Path) -> dict[str, Any]:
    """Export BERT-mini-width with ``layers`` layers to ``folder/model.onnx`` (worker)."""
    import torch

    import graphopt

    _bench.tests_on_path()
    import models

    torch.set_num_threads(2)
    name = f"scaling-{layers}"
    models._BERT[name] = {
        **models._BERT["mini"],
        "num_hidden_layers": layers,
    }  # same width, only depth varies
    t0 = time.perf_counter()
    model = models.build_bert(name).export()
    export_s = time.perf_counter() - t0
    folder.mkdir(parents=True, exist_ok=True)
    graphopt.save(model, folder / "model.onnx", external_data=True)
    meta = {
        "layers": layers,
        "nodes": sum(bench_fusion.op_histogram(folder / "model.onnx").values()),
        "export_s": export_s,
    }
    _bench.write_json(folder / "meta.json", meta)
    return meta


def run(quick: bool = False, repeats: int | None = None, timeout: float = 1800) -> dict[str, Any]:
    """Export (cached) and optimize every depth; returns the result dict (also used by suite.py)."""
    layers = QUICK_LAYERS if quick else LAYERS
    repeats = repeats or (1 if quick else 2)
    cache = _bench.TMP / "scaling"
    rows = []
    for n in layers:
        folder = cache / f"bert-{n}"
        if not (folder / "meta.json").exists():
            r = _bench.run_worker(SCRIPT, ["--prepare", str(n), str(folder)], cache / "prepare.json", timeout)
            if not r.ok:
                rows.append({"layers": n, "error": "export: " + r.error})
                continue
        meta = json.loads((folder / "meta.json").read_text())
        runs = []
        for _ in range(repeats):
            r = _bench.run_worker(
                bench_fusion.SCRIPT,
                [
                    "--optimize",
                    json.dumps({"tool": "graphopt", "name": "graphopt"}),
                    str(folder),
                    str(folder / "out"),
                ],
                cache / "result.json",
                timeout,
            )
            if not r.ok or "crash" in r.data:
                rows.append({"layers": n, "nodes": meta["nodes"], "error": r.error or r.data.get("crash")})
                break
            runs.append(r.data)
        else:
            opt = statistics.median(x["optimize_s"] for x in runs)
            rows.append(
                {
                    "layers": n,
                    "nodes": meta["nodes"],
                    "nodes_after": runs[0]["counts"]["nodes"],
                    "optimize_s": opt,
                    "optimize_runs": [x["optimize_s"] for x in runs],
                    "ms_per_node": opt * 1000 / meta["nodes"],
                    "peak_mb": statistics.median(x["peak_mb"] for x in runs),
                    "optimize_extra_mb": statistics.median(x["optimize_extra_mb"] for x in runs),
                }
            )
        shutil.rmtree(folder / "out", ignore_errors=True)
        print(f"  scaling {n:2} layers: {rows[-1]}", flush=True)
    ok = [r for r in rows if "ms_per_node" in r]
    flat = None
    if len(ok) >= 2:
        flat = ok[-1]["ms_per_node"] / ok[0]["ms_per_node"]
    return {
        "architecture": "BERT, hidden 256, 4 heads, FFN 1024 (tests/models.py 'mini' width)",
        "repeats": repeats,
        "rows": rows,
        "ms_per_node_deepest_over_shallowest": flat,
    }


CHAIN_NODES = (1_000, 10_000, 100_000, 200_000)


def chain_worker(nodes: int, folder: Path) -> dict[str, Any]:
    """Optimize one chain in this (fresh) interpreter: load + optimize timed, peak RSS, sizes."""
    import resource

    import onnx

    import graphopt

    _bench.tests_on_path()
    from models import chain_model

    folder.mkdir(parents=True, exist_ok=True)
    src, dst = folder / "chain.onnx", folder / "chain.opt.onnx"
    onnx.save(chain_model(nodes), src)
    t0, c0 = time.perf_counter(), time.process_time()
    result = graphopt.optimize(graphopt.load(src))
    optimize_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
    graphopt.save(result.model, dst)
    slowest = sorted(result.report.passes, key=lambda r: -r.wall_s)[:3]
    return {
        "nodes": nodes,
        "optimize_s": optimize_s,
        "cpu_s": cpu_s,
        "ms_per_node": optimize_s * 1000 / nodes,
        "cpu_ms_per_node": cpu_s * 1000 / nodes,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "input_bytes": src.stat().st_size,
        "output_bytes": dst.stat().st_size,
        "size_ratio": dst.stat().st_size / src.stat().st_size,
        "slowest_passes": [[r.name, round(r.wall_s, 2)] for r in slowest],
    }


def run_chain(timeout: float = 1800) -> dict[str, Any]:
    cache = _bench.TMP / "scaling-chain"
    rows = []
    for n in CHAIN_NODES:
        r = _bench.run_worker(
            SCRIPT, ["--chain-worker", str(n), str(cache / str(n))], cache / "result.json", timeout
        )
        rows.append(r.data if r.ok else {"nodes": n, "error": r.error})
        shutil.rmtree(cache / str(n), ignore_errors=True)
        print(f"  chain {n}: {rows[-1]}", flush=True)
    return {"architecture": "Add/Relu chain on [1, 16] float", "rows": rows}


def chain_table(res: dict[str, Any]) -> str:
    rows = [
        [
            r["nodes"],
            _f(r.get("optimize_s")),
            _f(r.get("ms_per_node"), ".3f"),
            _f(r.get("cpu_ms_per_node"), ".3f"),
            _f(r.get("peak_mb"), ".0f"),
            _f(r.get("size_ratio"), ".3f"),
            ", ".join(f"{n} {s}" for n, s in r.get("slowest_passes", [])),
            r.get("error"),
        ]
        for r in res["rows"]
    ]
    return _bench.markdown_table(
        [
            "nodes",
            "optimize s",
            "ms per node",
            "CPU ms per node",
            "peak MB",
            "output / input size",
            "slowest passes (s)",
            "error",
        ],
        rows,
    )


def table(res: dict[str, Any]) -> str:
    rows = [
        [
            r["layers"],
            r.get("nodes"),
            r.get("nodes_after"),
            _f(r.get("optimize_s")),
            _f(r.get("ms_per_node"), ".3f"),
            _f(r.get("peak_mb"), ".0f"),
            r.get("error"),
        ]
        for r in res["rows"]
    ]
    md = _bench.markdown_table(
        ["layers", "export nodes", "nodes after", "optimize s", "ms per node", "peak MB", "error"], rows
    )
    flat = res.get("ms_per_node_deepest_over_shallowest")
    note = (
        f"\n\n{res['architecture']}; median of {res['repeats']} fresh-interpreter run(s) per depth. Time per node, "
        f"deepest / shallowest: {flat:.2f}× (1.0 = linear in graph size; the shallow end carries the fixed "
        "per-model cost, so values below 1 are expected)."
        if flat
        else ""
    )
    return md + note


def _f(v: float | None, spec: str = ".2f") -> str | None:
    return None if v is None else format(v, spec)


def plot(res: dict[str, Any], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ok = [r for r in res["rows"] if "ms_per_node" in r]
    if not ok:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    a1.plot([r["nodes"] for r in ok], [r["optimize_s"] for r in ok], "o-")
    for r in ok:
        a1.annotate(
            f"{r['layers']}L", (r["nodes"], r["optimize_s"]), textcoords="offset points", xytext=(4, -10)
        )
    a1.set_xlabel("export nodes")
    a1.set_ylabel("graphopt optimize s")
    a1.set_title("Optimizer time vs model size")
    a1.grid(alpha=0.3)
    a2.plot([r["layers"] for r in ok], [r["ms_per_node"] for r in ok], "o-", color="tab:orange")
    a2.set_xscale("log", base=2)
    a2.set_xlabel("layers")
    a2.set_ylabel("ms per export node")
    a2.set_ylim(0, max(r["ms_per_node"] for r in ok) * 1.3)
    a2.set_title("Time per node (flat = linear)")
    a2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2, 4, 8 layers, one repeat")
    p.add_argument("--repeats", type=int, help="fresh-interpreter runs per depth (default 2, quick 1)")
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", type=Path, default=_bench.RESULTS)
    p.add_argument(
        "--render", type=Path, metavar="JSON", help="rebuild Markdown and plot from an earlier JSON"
    )
    p.add_argument(
        "--chain", action="store_true", help="Add/Relu chains of 1k..200k nodes (results/scaling_chain.*)"
    )
    p.add_argument("--prepare", nargs=2, metavar=("LAYERS", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--chain-worker", nargs=2, metavar=("NODES", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.prepare:
        _bench.write_json(args.result_file, prepare(int(args.prepare[0]), Path(args.prepare[1])))
        return 0
    if args.chain_worker:
        _bench.write_json(
            args.result_file, chain_worker(int(args.chain_worker[0]), Path(args.chain_worker[1]))
        )
        return 0
    if args.chain:
        res = {
            "benchmark": "scaling-chain",
            "command": "python benchmarks/bench_scaling.py --chain",
            "environment": _bench.environment(),
            **run_chain(args.timeout),
        }
        _bench.write_json(args.out / "scaling_chain.json", res)
        md = "# Optimizer time and output size vs graph size (Add/Relu chain)\n\n" + chain_table(res) + "\n"
        (args.out / "scaling_chain.md").write_text(md)
        print(md)
        return 0
    if args.render:
        res = json.loads(args.render.read_text())
        stem, out = args.render.stem, args.render.parent
    else:
        res = {
            "benchmark": "scaling",
            "command": " ".join(["python", "benchmarks/bench_scaling.py", *(argv or sys.argv[1:])]),
            "environment": _bench.environment(),
            **run(args.quick, args.repeats, args.timeout),
        }
        stem, out = ("scaling_quick" if args.quick else "scaling"), args.out
    _bench.write_json(out / f"{stem}.json", res)
    md = "# Optimizer time vs depth\n\n" + table(res) + f"\n\n![scaling]({stem}.png)\n"
    (out / f"{stem}.md").write_text(md)
    plot(res, out / f"{stem}.png")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
