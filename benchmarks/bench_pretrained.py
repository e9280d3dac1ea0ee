"""Pretrained ONNX models from PyPI packages: graphopt vs ONNX Runtime's own tools, fp32 and int8.

Why: the suite's models are our own exports; users bring files other exporters wrote (paddle2onnx,
tf2onnx, spox, old torch), at old opsets, with ``If`` subgraphs and wrong declared shapes. On
those, graphopt must stay exact in fp32 and its int8 must not lose to ORT's quantizers.

Per model of ``tests/pretrained_onnx.py`` (realistic inputs: rendered text pages and lines, photos,
a voiced audio stream, real files' bytes), each variant built in this process and compared with
the original on 3 realistic inputs (min cosine over outputs and inputs, max abs error):

* fp32: graphopt ``optimize(target="ort-cpu")``; ORT's transformers optimizer
  (``optimize_model``, model_type bert, opt_level 1 and 99) and ORT's own graph optimizer saved
  offline (ORT_ENABLE_ALL) — the anchor is the fastest exact one (with ``--no-timing``: listed);
* dynamic int8: graphopt ``quantize="dynamic"``; ORT ``quantize_dynamic`` with per_channel and
  reduce_range each on and off, each from ``quant_pre_process`` output and from the raw file
  ("raw") (anchor: best cosine);
* static int8: graphopt ``quantize="static"`` (default calibrator) and, where the model's opset is
  below 13, graphopt after its ``upgrade-opset`` pass; ORT ``quantize_static`` (QDQ, QUInt8
  activations, QInt8 weights, MinMax) per-channel — at opset < 13 per-channel writes per-axis
  DequantizeLinear that ORT refuses, so there it is per-tensor on the original and per-channel
  after ``onnx.version_converter`` to 13 (anchor: best cosine). Both calibrate on the same 4
  realistic batches, never the evaluation inputs.

ORT's quantizers are run from ``quant_pre_process`` output (symbolic shape inference fails on
several of these models; then without it, then the original) and from the raw file: neither
always wins, so both are tried and the best is the anchor.
Latency: batch as the package feeds it, ORT CPU (ORT_ENABLE_ALL, ``--threads`` intra-op threads,
no spinning), all variants of a model interleaved and rotated each round after warm-up; medians.
Reported per variant: status (the error's first line when it failed), cosine, max abs, file size,
build time, median latency and ratio to the original.

    python benchmarks/bench_pretrained.py                 # all installed models, with timing
    python benchmarks/bench_pretrained.py --no-timing     # fidelity and size only (a shared machine)
    python benchmarks/bench_pretrained.py --models yolov8n-nudenet,magika --rounds 50
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _bench

_bench.tests_on_path()
import pretrained_onnx as P  # noqa: E402  (tests/ on the path first)

EVAL = (10, 11, 12)
CALIBRATION = 4


class _Reader:
    """ORT CalibrationDataReader over the same feed dicts graphopt calibrates with."""

    def __init__(self, feeds: list[dict[str, Any]]) -> None:
        self._it = iter(feeds)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._it, None)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    line = f"{type(exc).__name__}: {text[0] if text else ''}".replace(str(_bench.ROOT) + "/", "")
    return line[:200]


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _compare(ref_outs: list[list[Any]], path: Path, feeds: list[dict[str, Any]]) -> dict[str, Any]:
    import numpy as np

    sess = _bench.ort_session(path, threads=2)
    cos, mx = 1.0, 0.0
    for ref, f in zip(ref_outs, feeds):
        for r, g in zip(ref, sess.run(None, f)):
            if r.shape != g.shape:
                return {"cosine": None, "max_abs": None, "note": f"shape {g.shape}, original {r.shape}"}
            r64, g64 = r.astype(np.float64).ravel(), g.astype(np.float64).ravel()
            mx = max(mx, float(np.max(np.abs(r64 - g64))) if r64.size else 0.0)
            nr, ng = np.linalg.norm(r64), np.linalg.norm(g64)
            c = 1.0 if nr == 0 and ng == 0 else float(r64 @ g64 / (nr * ng)) if nr and ng else 0.0
            cos = min(cos, c)
    return {"cosine": round(cos, 6), "max_abs": float(f"{mx:.3g}")}


def _pre_process(src: Path, folder: Path) -> tuple[Path, str]:
    from onnxruntime.quantization.shape_inference import quant_pre_process

    for skip in (False, True):
        dst = folder / f"ort_pre{'_nosym' if skip else ''}.onnx"
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=skip)
            return dst, "quant_pre_process" + (" (no symbolic shapes)" if skip else "")
        except Exception:
            continue
    return src, "original (quant_pre_process failed)"


def _variants(
    name: str, src: Path, folder: Path, calib: list[dict[str, Any]]
) -> list[tuple[str, str, Callable]]:
    """(kind, label, build(dst) -> note) for every variant of one model."""
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    import graphopt

    def go(**kw: Any) -> Callable[[Path], str]:
        def build(dst: Path) -> str:
            graphopt.save(graphopt.optimize(str(src), target="ort-cpu", **kw).model, dst)
            return ""

        return build

    def go_upgraded(dst: Path) -> str:
        up = graphopt.optimize(str(src), pipeline="upgrade-opset").model
        graphopt.save(
            graphopt.optimize(up, target="ort-cpu", quantize="static", calibration=calib).model, dst
        )
        return "upgrade-opset pass, then static"

    def ort_transformers(level: int) -> Callable[[Path], str]:
        def build(dst: Path) -> str:
            from onnxruntime.transformers.optimizer import optimize_model

            optimize_model(str(src), model_type="bert", opt_level=level).save_model_to_file(str(dst))
            return ""

        return build

    def ort_offline(dst: Path) -> str:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = str(dst)
        so.log_severity_level = 3
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
        return ""

    def ort_dynamic(per_channel: bool, reduce_range: bool, pre_process: bool) -> Callable[[Path], str]:
        def build(dst: Path) -> str:
            pre, how = _pre_process(src, folder) if pre_process else (src, "original")
            quantize_dynamic(
                str(pre),
                str(dst),
                per_channel=per_channel,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
            )
            return how

        return build

    def ort_static(per_channel: bool, upgrade: bool, pre_process: bool) -> Callable[[Path], str]:
        def build(dst: Path) -> str:
            base = src
            if upgrade:
                base = folder / "onnx_opset13.onnx"
                onnx.save(onnx.version_converter.convert_version(onnx.load(str(src)), 13), str(base))
            pre, how = _pre_process(base, folder) if pre_process else (base, "no pre-processing")
            quantize_static(
                str(pre),
                str(dst),
                _Reader(calib),
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
            )
            return ("onnx version_converter to 13, " if upgrade else "") + how

        return build

    old = _opset(src) < 13
    out: list[tuple[str, str, Callable]] = [
        ("fp32", "graphopt", go()),
        ("fp32", "ort-transformers o1", ort_transformers(1)),
        ("fp32", "ort-transformers o99", ort_transformers(99)),
        ("fp32", "ort-offline", ort_offline),
        ("dynamic", "graphopt", go(quantize="dynamic")),
    ]
    pres = (("", True), (" raw", False))
    out += [
        ("dynamic", f"ort pc={int(pc)} rr={int(rr)}{tag}", ort_dynamic(pc, rr, pre))
        for tag, pre in pres
        for pc in (True, False)
        for rr in (False, True)
    ]
    out.append(("static", "graphopt", go(quantize="static", calibration=calib)))
    if old:
        out.append(("static", "graphopt (upgrade-opset)", go_upgraded))
    for tag, pre in pres:
        if old:
            out.append(("static", f"ort per-tensor{tag}", ort_static(False, False, pre)))
            out.append(("static", f"ort per-channel (opset 13){tag}", ort_static(True, True, pre)))
        else:
            out.append(("static", f"ort per-channel{tag}", ort_static(True, False, pre)))
    return out


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    spec = P.MODELS[name]
    try:
        src = P.model_path(name)
    except P.ModelMissing as exc:
        return {"name": name, "skipped": str(exc)}
    folder = _bench.TMP / "pretrained" / name
    folder.mkdir(parents=True, exist_ok=True)
    feeds = [P.sample(name, i) for i in EVAL]
    calib = P.samples(name, CALIBRATION)
    ref_sess = _bench.ort_session(src, threads=2)
    ref_outs = [ref_sess.run(None, f) for f in feeds]
    rows: list[dict[str, Any]] = [
        {
            "kind": "original",
            "label": "original",
            "status": "ok",
            "cosine": 1.0,
            "max_abs": 0.0,
            "path": str(src),
        }
    ]
    for kind, label, build in _variants(name, src, folder, calib):
        dst = (
            folder
            / f"{kind}_{label.replace(' ', '_').replace('=', '').replace('(', '').replace(')', '')}.onnx"
        )
        row: dict[str, Any] = {"kind": kind, "label": label}
        t0 = time.perf_counter()
        try:
            row["note"] = build(dst)
            row["build_s"] = round(time.perf_counter() - t0, 2)
            cmp = _compare(ref_outs, dst, feeds)
            row.update(cmp)
            row["status"] = "ok" if cmp["cosine"] is not None else f"wrong output: {cmp['note']}"
            row["path"] = str(dst)
        except Exception as exc:
            row["status"] = _first_line(exc)
            row["build_s"] = round(time.perf_counter() - t0, 2)
        print(
            f"  {name:16s} {kind:8s} {label:28s} {row.get('cosine')!s:10s} {row['status'][:90]}", flush=True
        )
        rows.append(row)
    for row in rows:
        if row.get("path") and row["status"] == "ok":
            row["size_mb"] = round(os.path.getsize(row["path"]) / 1e6, 2)
    if not args.no_timing:
        sessions = {
            f"{r['kind']}/{r['label']}": _bench.ort_session(r["path"], threads=args.threads)
            for r in rows
            if r["status"] == "ok" and r.get("cosine") is not None
        }
        times = _bench.interleaved_ms(sessions, feeds[0], rounds=args.rounds)
        base = _bench.median(times["original/original"])
        for r in rows:
            t = times.get(f"{r['kind']}/{r['label']}")
            if t:
                r["median_ms"] = round(_bench.median(t) or 0.0, 3)
                r["speedup"] = round(base / r["median_ms"], 3) if base and r["median_ms"] else None
    for r in rows:  # machine-specific; the files are in benchmarks/results/tmp/pretrained/NAME/
        r.pop("path", None)
    return {
        "name": name,
        "requirement": spec.requirement,
        "file": spec.path,
        "opset": _opset(src),
        "architecture": spec.architecture,
        "inputs": spec.inputs,
        "license": spec.license,
        "rows": rows,
    }


def _anchor(rows: list[dict[str, Any]], kind: str, timing: bool) -> dict[str, Any] | None:
    """ORT's best variant of one kind: fastest exact (fp32) or best cosine (int8)."""
    ok = [
        r for r in rows if r["kind"] == kind and not r["label"].startswith("graphopt") and r["status"] == "ok"
    ]
    ok = [r for r in ok if r.get("cosine") is not None]
    if not ok:
        return None
    if kind == "fp32":
        exact = [r for r in ok if r["max_abs"] is not None and r["max_abs"] <= 1e-3] or ok
        return min(exact, key=lambda r: r.get("median_ms") or 0.0) if timing else exact[0]
    return max(ok, key=lambda r: (r["cosine"], -(r.get("median_ms") or 0.0)))


def render(data: dict[str, Any]) -> str:
    env = data["environment"]
    timing = not data["settings"]["no_timing"]
    lines = [
        "# Pretrained ONNX models from PyPI packages: graphopt vs ONNX Runtime",
        "",
        f"`{data['settings']['command']}` — {env['cpu']}, {env['cores']} cores; onnxruntime "
        f"{env['versions'].get('onnxruntime')}, graphopt {env['versions'].get('graphopt')}; {env['date']}. "
        + (
            f"Latency: ORT CPU, {data['settings']['threads']} intra-op threads, {data['settings']['rounds']} "
            "interleaved rounds, medians."
            if timing
            else "**Timing not run** (`--no-timing`: the machine was shared); fidelity and sizes only."
        ),
        "",
        "Cosine: worst over outputs and 3 realistic inputs vs the original (ORT CPU). int8 anchors: ORT's best "
        "variant by cosine; fp32 anchor: ORT's fastest exact variant. Every variant is in `pretrained.json`.",
        "",
        "## Models",
        "",
        _bench.markdown_table(
            ["model", "package", "opset", "architecture", "inputs", "license"],
            [
                [m["name"], m["requirement"], m["opset"], m["architecture"], m["inputs"], m["license"]]
                for m in data["models"]
                if "rows" in m
            ],
        ),
        "",
        "## Summary",
        "",
    ]
    head = ["model", "mode", "graphopt", "cosine", "size MB"] + (["speedup"] if timing else [])
    head += ["ORT anchor", "cosine", "size MB"] + (["speedup"] if timing else [])
    body = []
    for m in data["models"]:
        if "rows" not in m:
            continue
        for kind in ("fp32", "dynamic", "static"):
            mine = [r for r in m["rows"] if r["kind"] == kind and r["label"].startswith("graphopt")]
            anchor = _anchor(m["rows"], kind, timing)
            for r in mine:
                row = [m["name"], kind, r["label"] if r["status"] == "ok" else f"{r['label']}: {r['status']}"]
                row += [r.get("cosine"), r.get("size_mb")] + ([r.get("speedup")] if timing else [])
                if anchor:
                    row += [anchor["label"], anchor.get("cosine"), anchor.get("size_mb")]
                    row += [anchor.get("speedup")] if timing else []
                else:
                    row += ["–", None, None] + ([None] if timing else [])
                body.append(row)
    lines += [_bench.markdown_table(head, body), "", "## Every variant", ""]
    head = ["model", "mode", "variant", "status", "cosine", "max abs", "size MB", "build s"]
    head += ["median ms", "speedup"] if timing else []
    body = []
    for m in data["models"]:
        if "rows" not in m:
            lines.append(f"- {m['name']}: skipped ({m['skipped']})")
            continue
        for r in m["rows"]:
            row = [
                m["name"],
                r["kind"],
                r["label"],
                r["status"] if not r.get("note") else f"ok ({r['note']})",
            ]
            if r["status"] != "ok":
                row[3] = r["status"]
            row += [r.get("cosine"), r.get("max_abs"), r.get("size_mb"), r.get("build_s")]
            row += [r.get("median_ms"), r.get("speedup")] if timing else []
            body.append(row)
    lines += ["", _bench.markdown_table(head, body), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", help=f"comma-separated subset of: {', '.join(P.MODELS)}")
    p.add_argument("--no-timing", action="store_true", help="fidelity and size only (no latency runs)")
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="pretrained", help="results file stem in benchmarks/results/")
    args = p.parse_args(argv)
    names = args.models.split(",") if args.models else list(P.MODELS)
    unknown = [n for n in names if n not in P.MODELS]
    if unknown:
        p.error(f"unknown models {unknown}; choose from {', '.join(P.MODELS)}")
    t0 = time.perf_counter()
    models = [run_model(n, args) for n in names]
    data = {
        "environment": _bench.environment(),
        "settings": {
            "command": "python benchmarks/bench_pretrained.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "no_timing": args.no_timing,
            "rounds": args.rounds,
            "threads": args.threads,
            "eval_inputs": list(EVAL),
            "calibration_batches": CALIBRATION,
            "wall_s": round(time.perf_counter() - t0, 1),
        },
        "models": models,
    }
    _bench.write_json(_bench.RESULTS / f"{args.out}.json", data)
    (_bench.RESULTS / f"{args.out}.md").write_text(render(data))
    print(f"wrote {_bench.RESULTS / (args.out + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
