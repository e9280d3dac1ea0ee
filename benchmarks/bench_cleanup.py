"""graphopt's cleanup pipeline (ort-cpu target, no fusion) vs onnxscript.optimizer.optimize vs onnxsim.simplify.

Why: graphopt's cleanup reuses onnxscript's folder and onnx_ir's passes, so the question is what
it costs and buys against the tools people already use, on the models they use them on.

The models (transformers BERT-base and GPT-2 small with random weights, or smaller ones with
``--quick``) are exported once with ``graphopt.export`` and cached under
``benchmarks/results/tmp/cleanup/``. Then every tool runs ``--repeats`` times, interleaved in
rotation (so drift in machine load hits every tool alike), each run in a fresh interpreter so
that its peak memory is its own. A run is: load the model file the way the tool's users do
(graphopt.load / onnx.load), optimize (the timed part), save with external data. The first
run of each tool also checks the output against the export on ONNX Runtime (its graph rewrites
off), on token ids inside the vocabulary and a padded attention mask.

    python benchmarks/bench_cleanup.py                        # BERT-base and GPT-2 small, 3 repeats
    python benchmarks/bench_cleanup.py --quick --repeats 3    # 4-layer, 256-wide models: a fast check
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import _bench

SCRIPT = Path(__file__).resolve()
TOOLS = ("graphopt", "onnxscript", "onnxsim")
MODELS = ("bert", "gpt2")
LABELS = {"bert": "BERT-base", "gpt2": "GPT-2 small"}
#: Feeds for the accuracy check: batch 2, sequence 32 (second row padded).
CHECK_BATCH, CHECK_SEQ = 2, 32


# ---------------------------------------------------------------------------------------------
# Worker side (runs in a fresh interpreter)


def _count_nodes(path: Path) -> int:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    stack = [proto.graph]
    count = sum(len(f.node) for f in proto.functions)
    while stack:
        g = stack.pop()
        count += len(g.node)
        for n in g.node:
            for a in n.attribute:
                if a.HasField("g"):
                    stack.append(a.g)
                stack.extend(a.graphs)
    return count


def _run_ort(path: Path, feeds: dict[str, Any]) -> dict[str, Any]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(None, feeds)))


def prepare(kind: str, size: str, folder: Path) -> dict[str, Any]:
    """Export once: model.onnx (+ .data), feeds.npz, reference.npz (ORT outputs of the export)."""
    import numpy as np

    built, path, export_s = _bench.export_model(kind, size, folder)
    feeds = built.feeds(CHECK_BATCH, CHECK_SEQ, seed=0)
    np.savez(folder / "feeds.npz", **feeds)
    np.savez(folder / "reference.npz", **_run_ort(path, feeds))
    params = sum(p.numel() for p in built.module.parameters())
    meta = {
        "kind": kind,
        "size": size,
        "name": built.name,
        "parameters": int(params),
        "nodes": _count_nodes(path),
        "weights_mb": round((folder / "model.onnx.data").stat().st_size / _bench.MB, 1),
        "export_s": round(export_s, 2),
        "config": {k: v for k, v in built.config.to_dict().items() if isinstance(v, (int, float, str))},
    }
    _bench.write_json(folder / "meta.json", meta)
    return meta


def work(tool: str, model_dir: Path, out_dir: Path, check: bool) -> dict[str, Any]:
    """One measured run of one tool: load → optimize (timed) → save; optional ORT check."""
    import numpy as np
    import onnx

    if tool == "graphopt":
        import graphopt
    elif tool == "onnxscript":
        import onnxscript.optimizer
    elif tool == "onnxsim":
        import onnxsim
    else:
        raise SystemExit(f"unknown tool {tool!r}")
    src = model_dir / "model.onnx"
    # onnx.save_model appends to an existing external data file: start from an empty folder.
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    dst = out_dir / "model.onnx"
    meter = _bench.PeakMeter()
    extra: dict[str, Any] = {}
    with meter.phase("load"):
        model: Any = graphopt.load(src) if tool == "graphopt" else onnx.load(str(src))
    with meter.phase("optimize"):
        if tool == "graphopt":
            # Cleanup against cleanup: the ort-cpu default also fuses (bench_fusion.py measures that).
            result = graphopt.optimize(model, target="ort-cpu", pipeline="cleanup")
            out: Any = result.model
            extra["passes"] = len(result.report.passes)
        elif tool == "onnxscript":
            out = onnxscript.optimizer.optimize(model)
        else:
            out, check_ok = onnxsim.simplify(model)
            extra["onnxsim_check"] = bool(check_ok)
    with meter.phase("save"):
        if tool == "graphopt":
            graphopt.save(out, dst, external_data=True)
        else:
            onnx.save_model(
                out,
                str(dst),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location="model.onnx.data",
                size_threshold=1024,
            )
    data: dict[str, Any] = {
        "tool": tool,
        "memory_method": meter.method,
        "load_s": meter.wall["load"],
        "optimize_s": meter.wall["optimize"],
        "save_s": meter.wall["save"],
        "rss_before_optimize_mb": meter.start["optimize"] / _bench.MB,
        "peak_optimize_mb": meter.peaks["optimize"] / _bench.MB,
        "optimize_extra_mb": (meter.peaks["optimize"] - meter.start["optimize"]) / _bench.MB,
        "peak_mb": meter.overall / _bench.MB,
        "phase_peaks_mb": {k: v / _bench.MB for k, v in meter.peaks.items()},
        **extra,
    }
    del model, out
    data["nodes_after"] = _count_nodes(dst)
    if check:
        feeds = dict(np.load(model_dir / "feeds.npz"))
        ref = dict(np.load(model_dir / "reference.npz"))
        try:
            got = _run_ort(dst, feeds)
        except Exception as e:  # a tool that produced a model ORT cannot run
            data["check_error"] = str(e).strip().splitlines()[0][:300]
        else:
            errs = {}
            for name, r in ref.items():
                g = got.get(name)
                errs[name] = None if g is None or g.shape != r.shape else float(np.max(np.abs(g - r)))
            data["max_abs_err"] = None if None in errs.values() else max(errs.values())
            data["max_abs_err_per_output"] = errs
            if set(got) != set(ref):
                data["check_error"] = f"outputs {sorted(got)} != {sorted(ref)}"
    return data


# ---------------------------------------------------------------------------------------------
# Driver


def _ratio(value: float | None, base: float | None, digits: int = 2) -> str | None:
    if value is None or not base:
        return None
    return f"{value / base:.{digits}f}×"


def summarize(runs: list[dict[str, Any]], atol: float) -> dict[str, Any]:
    ok = [r for r in runs if "error" not in r]
    med = {
        k: _bench.median([r[k] for r in ok])
        for k in ("optimize_s", "load_s", "save_s", "peak_mb", "optimize_extra_mb", "peak_optimize_mb")
    }
    total = _bench.median([r["load_s"] + r["optimize_s"] + r["save_s"] for r in ok])
    spread = [min(r["optimize_s"] for r in ok), max(r["optimize_s"] for r in ok)] if ok else None
    checked = [r for r in ok if "max_abs_err" in r or "check_error" in r]
    err = checked[0].get("max_abs_err") if checked else None
    nodes = sorted({r["nodes_after"] for r in ok})
    return {
        "runs": len(ok),
        "failed_runs": [r["error"] for r in runs if "error" in r],
        **{f"median_{k}": v for k, v in med.items()},
        "optimize_s_min_max": spread,
        "median_load_optimize_save_s": total,
        "nodes_after": nodes[0] if len(nodes) == 1 else nodes,
        "max_abs_err": err,
        "check_error": checked[0].get("check_error") if checked else None,
        "matches": bool(checked) and err is not None and err <= atol and not checked[0].get("check_error"),
    }


def table(results: dict[str, Any]) -> str:
    header = [
        "model (export nodes)",
        "tool",
        "optimize s (min–max)",
        "time vs graphopt",
        "load+opt+save s",
        "nodes after",
        "nodes vs graphopt",
        "peak RSS MB",
        "peak vs graphopt",
        "optimize +MB",
        "max abs err",
        "matches export",
    ]
    rows = []
    for kind, entry in results["models"].items():
        base = entry["tools"].get("graphopt", {})
        for tool, s in entry["tools"].items():
            if not s.get("runs"):
                rows.append(
                    [
                        LABELS.get(kind, kind),
                        tool,
                        *([None] * 9),
                        "failed: " + "; ".join(s["failed_runs"])[:80],
                    ]
                )
                continue
            nodes = s["nodes_after"] if isinstance(s["nodes_after"], int) else None
            rows.append(
                [
                    f"{entry['label']} ({entry['export']['nodes']})",
                    tool,
                    f"{s['median_optimize_s']:.2f} ({s['optimize_s_min_max'][0]:.2f}–{s['optimize_s_min_max'][1]:.2f})",
                    _ratio(s["median_optimize_s"], base.get("median_optimize_s")),
                    f"{s['median_load_optimize_save_s']:.2f}",
                    s["nodes_after"],
                    _ratio(
                        nodes, base.get("nodes_after") if isinstance(base.get("nodes_after"), int) else None
                    ),
                    f"{s['median_peak_mb']:.0f}",
                    _ratio(s["median_peak_mb"], base.get("median_peak_mb")),
                    f"{s['median_optimize_extra_mb']:.0f}",
                    "–" if s["max_abs_err"] is None else f"{s['max_abs_err']:.2e}",
                    ("yes" if s["matches"] else "NO")
                    + (f" ({s['check_error']})" if s.get("check_error") else ""),
                ]
            )
    return _bench.markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bert,gpt2", help="comma-separated: bert, gpt2 (default: both)")
    p.add_argument(
        "--repeats", type=int, default=3, help="runs per tool, interleaved (default 3, median taken)"
    )
    p.add_argument("--quick", action="store_true", help="small 4-layer, 256-wide models for a fast check")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated subset of " + ",".join(TOOLS))
    p.add_argument("--atol", type=float, default=1e-4, help="max abs error that still counts as a match")
    p.add_argument("--re-export", action="store_true", help="export again even if the cache has the model")
    p.add_argument("--keep", action="store_true", help="keep the optimized models in results/tmp/cleanup/out")
    p.add_argument("--timeout", type=float, default=1200, help="seconds per worker run")
    p.add_argument(
        "--out",
        type=Path,
        default=_bench.RESULTS,
        help="folder for cleanup.json / cleanup.md (cleanup_quick.* with --quick)",
    )
    p.add_argument(
        "--render",
        type=Path,
        metavar="JSON",
        help="only rebuild the summary and Markdown table from an earlier results JSON",
    )
    # Internal: the per-run workers.
    p.add_argument("--prepare", nargs=3, metavar=("KIND", "SIZE", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--worker", nargs=3, metavar=("TOOL", "MODEL_DIR", "OUT_DIR"), help=argparse.SUPPRESS)
    p.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.render:
        results = json.loads(args.render.read_text())
        for entry in results["models"].values():
            entry["tools"] = {
                t: summarize(runs, results["settings"]["atol"]) for t, runs in entry["runs"].items()
            }
        return _report(
            results, args.render.parent, "cleanup_quick" if results["settings"]["quick"] else "cleanup"
        )
    if args.prepare:
        kind, size, folder = args.prepare
        _bench.write_json(args.result_file, prepare(kind, size, Path(folder)))
        return 0
    if args.worker:
        tool, model_dir, out_dir = args.worker
        _bench.write_json(args.result_file, work(tool, Path(model_dir), Path(out_dir), args.check))
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    bad = [m for m in models if m not in MODELS] + [t for t in tools if t not in TOOLS]
    if bad or args.repeats < 1:
        p.error(
            f"unknown models/tools {bad}; models: {','.join(MODELS)}; tools: {','.join(TOOLS)}; repeats >= 1"
        )
    size = "mini" if args.quick else "base"
    cache = _bench.TMP / "cleanup"
    scratch = cache / "out"
    results: dict[str, Any] = {
        "benchmark": "cleanup",
        "command": " ".join(
            [Path(sys.executable).name, "benchmarks/bench_cleanup.py", *(argv or sys.argv[1:])]
        ),
        "environment": _bench.environment(),
        "settings": {
            "repeats": args.repeats,
            "quick": args.quick,
            "atol": args.atol,
            "tools": tools,
            "check_inputs": {"batch": CHECK_BATCH, "sequence": CHECK_SEQ},
        },
        "models": {},
    }
    for kind in models:
        folder = cache / f"{kind}-{size}"
        meta_file = folder / "meta.json"
        if args.re_export or not meta_file.exists():
            print(f"exporting {kind} ({size}) with graphopt.export ...", flush=True)
            r = _bench.run_worker(
                SCRIPT, ["--prepare", kind, size, str(folder)], cache / "prepare.json", args.timeout
            )
            if not r.ok:
                print(f"export of {kind} failed: {r.error}", file=sys.stderr)
                return 1
        meta = json.loads(meta_file.read_text())
        label = LABELS[kind] if size == "base" else f"{kind}-{size}"
        results["models"][kind] = {"label": label, "export": meta, "tools": {t: [] for t in tools}}

    for rep in range(args.repeats):
        order = tools[rep % len(tools) :] + tools[: rep % len(tools)]
        for kind in models:
            for tool in order:
                folder = cache / f"{kind}-{size}"
                r = _bench.run_worker(
                    SCRIPT,
                    [
                        "--worker",
                        tool,
                        str(folder),
                        str(scratch / f"{kind}-{tool}"),
                        *(["--check"] if rep == 0 else []),
                    ],
                    scratch / "result.json",
                    args.timeout,
                )
                run = (
                    {**r.data, "rep": rep, "process_wall_s": r.wall_s}
                    if r.ok
                    else {"rep": rep, "error": r.error}
                )
                results["models"][kind]["tools"][tool].append(run)
                shown = (
                    (
                        f"optimize {run['optimize_s']:.2f}s, peak {run['peak_mb']:.0f} MB, "
                        f"{run['nodes_after']} nodes"
                    )
                    if r.ok
                    else run["error"]
                )
                print(f"[{rep + 1}/{args.repeats}] {kind:5} {tool:10} {shown}", flush=True)

    if not args.keep:
        shutil.rmtree(scratch, ignore_errors=True)
    for entry in results["models"].values():
        entry["runs"] = entry["tools"]
        entry["tools"] = {t: summarize(runs, args.atol) for t, runs in entry["runs"].items()}
    return _report(results, args.out, "cleanup_quick" if args.quick else "cleanup")


def _report(results: dict[str, Any], out: Path, stem: str) -> int:
    """Print the Markdown table and write ``<stem>.json`` / ``<stem>.md`` into ``out``."""
    md = table(results)
    env = results["environment"]
    header = (
        f"Cleanup benchmark: {env['cpu']}, {env['cores']} cores, {env['memory_gib']} GiB RAM, "
        f"Python {env['python']}; {results['settings']['repeats']} interleaved runs per tool, medians; "
        f"{env['date']}.\nCommand: `{results['command']}`\n"
    )
    print("\n" + header + "\n" + md)
    out.mkdir(parents=True, exist_ok=True)
    _bench.write_json(out / f"{stem}.json", results)
    (out / f"{stem}.md").write_text(header + "\n" + md + "\n")
    print(f"\nwrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
