"""Fusion coverage and fp32 CPU latency: graphopt's ort-cpu pipeline vs ONNX Runtime's transformers
optimizer vs onnxscript's ``optimize_for_ort``.

Why: the fusions graphopt applies are only worth having if the file it writes runs at least as fast on
ONNX Runtime as what the tools people already use produce from the same export; and the fused-op counts
say why one file is faster than another (an attention block left unfused costs more than any cleanup).

Per model (BERT-base, GPT-2 small, an 8-layer Llama-style GQA decoder, ViT-base/16, ResNet-50; or the
4-layer "mini" sizes with ``--quick``), from one cached ``graphopt.export``:

1. four files: the export itself; ``graphopt.optimize(path, "ort-cpu")``;
   ``onnxruntime.transformers.optimizer.optimize_model`` at every model type that applies, heads/hidden
   from the config and auto-detected, ``opt_level`` 0/1/2/99 (the fastest variant is the anchor; every
   variant's numbers stay in the JSON); ``onnxscript.rewriter.ort_fusions.optimize_for_ort``. Each
   optimizer runs in a fresh interpreter (wall time and peak RSS are its own); a crash is a result.
2. op counts of each file, grouped into the fused ops that matter (attention, skip norms, norms,
   activations, rotary, convolution), next to the model's layer count.
3. latency on ONNX Runtime CPU as a user runs it (default ORT_ENABLE_ALL, 2 intra-op threads, 1
   inter-op; intra-op spin-waiting off, see ``_session``, or ``--spinning``): the ORT-optimizer variants are screened first (10 rounds), then the export, graphopt,
   the two fastest ORT variants, onnxscript and graphopt's file in a second session (a noise control)
   run interleaved (``--runs`` rounds, each round runs every file once in a rotated order) after 5
   warm-up runs each; median and p90, graphopt / fastest anchor, and the per-round paired ratio with a
   bootstrap 90% interval.
4. fidelity: max abs error and cosine of every file's outputs against the export's, on the latency
   feeds (batch 1) and on a padded batch-2 check input.

    python benchmarks/bench_fusion.py                      # base sizes, all five models
    python benchmarks/bench_fusion.py --quick              # mini sizes: a few minutes
    python benchmarks/bench_fusion.py --models bert,gpt2 --runs 50
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import _bench

SCRIPT = Path(__file__).resolve()
MODELS = ("bert", "gpt2", "llama", "vit", "resnet")
LABELS = {
    "bert": "BERT-base",
    "gpt2": "GPT-2 small",
    "llama": "Llama-8L (GQA)",
    "vit": "ViT-base/16",
    "resnet": "ResNet-50",
}
TOOLS = ("original", "graphopt", "ort", "onnxscript")
ANCHORS = ("ort", "onnxscript")
#: ONNX Runtime transformers optimizer model types tried per model. It has no "llama" type; its
#: decoder types are "gpt2" (Gpt2OnnxModel, with the rotary-attention fusion) and "qwen3" (the same
#: class with Llama-like options). There is no CNN type: "bert" runs the generic fusions.
ORT_MODEL_TYPES = {
    "bert": ("bert",),
    "gpt2": ("gpt2",),
    "llama": ("gpt2",),
    "vit": ("vit",),
    "resnet": ("bert",),
}
#: Tried too with ``--all-ort-types``; left out by default because they never win (onnxruntime 1.32):
#: "qwen3" writes byte-identical files to "gpt2" on the Llama export, and "unet" turns every Conv
#: into NhwcConv, which the CPU execution provider cannot run.
ORT_EXTRA_TYPES = {"llama": ("qwen3",), "resnet": ("unet",)}
ORT_OPT_LEVELS = (0, 1, 2, 99)
#: Latency inputs: batch 1, sequence 128 (text) or 224×224 (images). Check inputs: batch 2, padded.
TEXT_SEQ, IMAGE, CHECK_BATCH, CHECK_SEQ = 128, 224, 2, 32
WARMUP, SCREEN_RUNS, FINALISTS = 5, 10, 2
CONTROL = "graphopt#2"
#: The screen of the ORT-optimizer variants runs interleaved while their files total at most this
#: (ONNX Runtime holds about twice the weights per session); beyond it, one session at a time.
SCREEN_INTERLEAVE_BYTES = 3 << 30
#: Op types per fused-op group (matched by op type in any domain).
GROUPS: dict[str, tuple[str, ...]] = {
    "attention": (
        "Attention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "PackedAttention",
        "PackedMultiHeadAttention",
    ),
    # Sum: graphopt's ort-cpu output lowers each skip-norm to Sum + the plain norm (faster on CPU).
    "skip_norm": ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "Sum"),
    "norm": ("LayerNormalization", "SimplifiedLayerNormalization", "RMSNormalization"),
    "embed_norm": ("EmbedLayerNormalization",),
    "activation": ("Gelu", "FastGelu", "BiasGelu", "QuickGelu", "GemmFastGelu"),
    "rotary": ("RotaryEmbedding",),
    "fused_conv": ("FusedConv",),
    "conv": ("Conv",),
    "batchnorm": ("BatchNormalization",),
}
#: Groups where more is better (a fusion happened); graphopt below an anchor there is "behind".
MORE_IS_BETTER = ("attention", "skip_norm", "embed_norm", "activation", "rotary", "fused_conv")
SHORT = {
    "attention": "attn",
    "skip_norm": "skip norm",
    "norm": "norm",
    "embed_norm": "embed LN",
    "activation": "act",
    "rotary": "rotary",
    "fused_conv": "FusedConv",
    "conv": "Conv",
    "batchnorm": "BN",
}


# ---------------------------------------------------------------------------------------------
# Worker side (each runs in a fresh interpreter)


def op_histogram(path: Path) -> dict[str, int]:
    """Node count per op type (``domain::Op`` outside the default domain), subgraphs and functions
    included; weights are not read."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    hist: dict[str, int] = {}
    stack = [proto.graph, *proto.functions]
    while stack:
        g = stack.pop()
        for n in g.node:
            key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
            hist[key] = hist.get(key, 0) + 1
            for a in n.attribute:
                if a.HasField("g"):
                    stack.append(a.g)
                stack.extend(a.graphs)
    return dict(sorted(hist.items()))


def group_counts(hist: dict[str, int]) -> dict[str, int]:
    """Fused-op group counts plus the total node count, from an :func:`op_histogram`."""
    out = {g: 0 for g in GROUPS}
    for key, n in hist.items():
        op = key.rsplit("::", 1)[-1]
        for g, ops in GROUPS.items():
            if op in ops:
                out[g] += n
    out["nodes"] = sum(hist.values())
    return out


def _layers(config: Any) -> int | None:
    for attr in ("num_hidden_layers", "n_layer"):
        if isinstance(getattr(config, attr, None), int):
            return int(getattr(config, attr))
    depths = getattr(config, "depths", None)
    return int(sum(depths)) if depths else None


def _heads_hidden(config: Any) -> tuple[int, int] | None:
    for heads, hidden in (("num_attention_heads", "hidden_size"), ("n_head", "n_embd")):
        h, d = getattr(config, heads, None), getattr(config, hidden, None)
        if isinstance(h, int) and isinstance(d, int):
            return h, d
    return None


def prepare(kind: str, size: str, folder: Path) -> dict[str, Any]:
    """Export once: model.onnx (+ .data), feeds.npz (latency input), check.npz (padded batch 2)."""
    import numpy as np

    built, path, export_s = _bench.export_model(kind, size, folder)
    image = kind in ("vit", "resnet")
    np.savez(folder / "feeds.npz", **built.feeds(1, IMAGE if image else TEXT_SEQ, seed=0))
    np.savez(folder / "check.npz", **built.feeds(CHECK_BATCH, IMAGE if image else CHECK_SEQ, seed=1))
    hh = _heads_hidden(built.config)
    meta = {
        "kind": kind,
        "size": size,
        "name": built.name,
        "parameters": int(sum(p.numel() for p in built.module.parameters())),
        "layers": _layers(built.config),
        "heads": hh[0] if hh else None,
        "hidden": hh[1] if hh else None,
        "nodes": sum(op_histogram(path).values()),
        "weights_mb": round((folder / "model.onnx.data").stat().st_size / _bench.MB, 1),
        "export_s": round(export_s, 2),
    }
    _bench.write_json(folder / "meta.json", meta)
    return meta


def _digest(folder: Path) -> str:
    """Hash of every file of a saved model, so identical outputs of two variants are timed once."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def optimize_one(variant: dict[str, Any], model_dir: Path, out_dir: Path) -> dict[str, Any]:
    """One optimizer run: load from the file + optimize (timed, peak RSS), save, count ops."""
    import logging

    logging.disable(logging.WARNING)  # ORT's optimizer logs every fusion it tries
    tool = variant["tool"]
    src = model_dir / "model.onnx"
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    dst = out_dir / "model.onnx"
    if tool == "graphopt":
        import graphopt
    elif tool == "onnxscript":
        import onnx_ir
        from onnxscript.rewriter.ort_fusions import optimize_for_ort
    elif tool == "ort":
        from onnxruntime.transformers.optimizer import optimize_model
    meter = _bench.PeakMeter()
    data: dict[str, Any] = {"variant": variant, "memory_method": meter.method}
    try:
        with meter.phase("optimize"):
            if tool == "graphopt":
                result = graphopt.optimize(str(src), "ort-cpu")
                out: Any = result.model
                data["fusion_stats"] = {
                    p.name: p.stats
                    for p in result.report.passes
                    if p.name.startswith("fuse") and any(p.stats.values())
                }
                data["pipeline"] = result.report.pipeline
            elif tool == "onnxscript":
                out, counts = optimize_for_ort(onnx_ir.load(str(src)))
                data["fusion_stats"] = {k: v for k, v in counts.items() if v}
            else:
                out = optimize_model(
                    str(src),
                    model_type=variant["model_type"],
                    num_heads=variant["num_heads"],
                    hidden_size=variant["hidden_size"],
                    opt_level=variant["opt_level"],
                )
                stats = out.get_fused_operator_statistics()
                data["fusion_stats"] = {k: v for k, v in stats.items() if v}
        with meter.phase("save"):
            if tool == "graphopt":
                graphopt.save(out, dst, external_data=True)
            elif tool == "onnxscript":
                onnx_ir.save(out, dst, external_data="model.onnx.data")
            else:
                out.save_model_to_file(str(dst), use_external_data_format=True, all_tensors_to_one_file=True)
    except Exception as e:  # an anchor that crashes is a result, not a benchmark failure
        data["crash"] = _one_line(e)
        return data
    data.update(
        {
            "optimize_s": meter.wall["optimize"],
            "save_s": meter.wall["save"],
            "peak_mb": meter.overall / _bench.MB,
            "optimize_extra_mb": (meter.peaks["optimize"] - meter.start["optimize"]) / _bench.MB,
        }
    )
    del out
    data["ops"] = op_histogram(dst)
    data["counts"] = group_counts(data["ops"])
    data["digest"] = _digest(out_dir)
    return data


def _session(path: Path, spinning: bool) -> Any:
    """A session as a user gets it: default graph optimizations (ORT_ENABLE_ALL), 2 + 1 threads.

    Without ``spinning`` the intra-op workers block instead of spin-waiting between runs. Spinning is
    ONNX Runtime's default and right for one session alone, but the idle pools of the other open
    sessions keep spinning on the 2 cores: measured on this machine, four interleaved BERT-mini
    sessions ran 3× slower (22 ms instead of 6.4 ms, p90 +40%) with spinning and 7.4 ms (p90 +12%)
    without; alone, one session runs 6.4 ms with it and 7.1 ms without.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


class _Runner:
    """One file's session and the feeds it accepts (an optimizer may drop an unused input)."""

    def __init__(self, path: Path, feeds: dict[str, Any], check: dict[str, Any], spinning: bool) -> None:
        t0 = time.perf_counter()
        self.sess = _session(path, spinning)
        self.init_s = time.perf_counter() - t0
        names = {i.name for i in self.sess.get_inputs()}
        self.feeds = {k: v for k, v in feeds.items() if k in names}
        self.check = {k: v for k, v in check.items() if k in names}
        self.outputs = [o.name for o in self.sess.get_outputs()]

    def run(self, feeds: dict[str, Any]) -> dict[str, Any]:
        return dict(zip(self.outputs, self.sess.run(None, feeds)))

    def timed(self) -> float:
        t0 = time.perf_counter()
        self.sess.run(None, self.feeds)
        return (time.perf_counter() - t0) * 1000


def _compare(ref: dict[str, Any], got: dict[str, Any]) -> dict[str, Any]:
    """Max abs error and cosine per output; by name, or the first outputs when no name matches."""
    import numpy as np

    pairs = [(k, ref[k], got[k]) for k in ref if k in got]
    if not pairs:
        first_r, first_g = next(iter(ref)), next(iter(got))
        pairs = [(f"{first_r} ~ {first_g}", ref[first_r], got[first_g])]
    per: dict[str, Any] = {}
    for name, r, g in pairs:
        if r.shape != g.shape:
            per[name] = {"error": f"shape {list(g.shape)} != {list(r.shape)}"}
            continue
        a, b = r.astype(np.float64).ravel(), g.astype(np.float64).ravel()
        denom = float(np.linalg.norm(a) * np.linalg.norm(b))
        per[name] = {
            "max_abs": float(np.max(np.abs(a - b))) if a.size else 0.0,
            "ref_max_abs": float(np.max(np.abs(a))) if a.size else 0.0,
            "cosine": float(a @ b / denom) if denom else (1.0 if not (a.any() or b.any()) else 0.0),
        }
    ok = [v for v in per.values() if "error" not in v]
    return {
        "compared": len(per),
        "of": len(ref),
        "max_abs": max((v["max_abs"] for v in ok), default=None) if len(ok) == len(per) else None,
        "min_cosine": min((v["cosine"] for v in ok), default=None) if len(ok) == len(per) else None,
        "per_output": per,
    }


def _fidelity(ref: dict[str, dict[str, Any]], runner: _Runner) -> dict[str, Any]:
    latency = _compare(ref["latency"], runner.run(runner.feeds))
    check = _compare(ref["check"], runner.run(runner.check))
    vals = [latency["max_abs"], check["max_abs"]]
    cos = [latency["min_cosine"], check["min_cosine"]]
    return {
        "max_abs": None if None in vals else max(vals),
        "min_cosine": None if None in cos else min(cos),
        "latency_feeds": latency,
        "check_feeds": check,
    }


def latency(
    model_dir: Path, files: dict[str, str], rounds: int, interleave: bool = True, spinning: bool = False
) -> dict[str, Any]:
    """Time ``files`` ({name: path}); the first is the export, whose outputs are the reference.

    Interleaved: all sessions open together, ``WARMUP`` runs each, then ``rounds`` rounds that run
    every file once in an order rotated by the round number, so drift in machine load hits every
    file alike. Not interleaved (to rank many big variants in bounded memory, or with ``spinning``):
    one session at a time, ``WARMUP`` then ``rounds`` runs, closed before the next one opens.
    """
    import numpy as np

    feeds = dict(np.load(model_dir / "feeds.npz"))
    check = dict(np.load(model_dir / "check.npz"))
    out: dict[str, Any] = {"_load_average_before": list(os.getloadavg())}
    ref: dict[str, dict[str, Any]] | None = None

    def record(name: str, times: list[float]) -> None:
        out[name].update(
            median_ms=float(np.median(times)), p90_ms=float(np.percentile(times, 90)), runs=times
        )

    runners: dict[str, _Runner] = {}
    for name, path in files.items():
        try:
            r = _Runner(Path(path), feeds, check, spinning)
            if ref is None:
                ref = {"latency": r.run(r.feeds), "check": r.run(r.check)}
            fid = _fidelity(ref, r)
        except Exception as e:  # an optimizer wrote a file ONNX Runtime cannot load or run
            if ref is None:
                raise
            out[name] = {"error": _one_line(e)}
            continue
        out[name] = {"session_init_s": r.init_s, "fidelity": fid}
        if interleave:
            runners[name] = r
            continue
        for _ in range(WARMUP):
            r.timed()
        record(name, [r.timed() for _ in range(rounds)])
        del r
    names = list(runners)
    for name in names:
        for _ in range(WARMUP):
            runners[name].timed()
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(rounds if names else 0):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            times[name].append(runners[name].timed())
    for name in names:
        record(name, times[name])
    out["_load_average_after"] = list(os.getloadavg())
    return out


# ---------------------------------------------------------------------------------------------
# Driver


def ort_variants(kind: str, meta: dict[str, Any], all_types: bool = False) -> list[dict[str, Any]]:
    """Every ORT-optimizer setting tried for one model."""
    types = ORT_MODEL_TYPES[kind] + (ORT_EXTRA_TYPES.get(kind, ()) if all_types else ())
    heads = [("auto", 0, 0)]
    if meta.get("heads"):
        heads.insert(0, ("config", meta["heads"], meta["hidden"]))
    return [
        {
            "tool": "ort",
            "name": f"ort:{mt}/o{lvl}/{h}",
            "model_type": mt,
            "num_heads": nh,
            "hidden_size": hs,
            "opt_level": lvl,
        }
        for mt in types
        for h, nh, hs in heads
        for lvl in ORT_OPT_LEVELS
    ]


def _fmt(v: float | None, spec: str = ".2f") -> str | None:
    return None if v is None else format(v, spec)


def _ratio(a: float | None, b: float | None) -> str | None:
    return None if a is None or not b else f"{a / b:.2f}×"


def run_model(kind: str, size: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Optimize with every tool/variant, screen the ORT variants, time the finalists; one model."""
    meta = json.loads((folder / "meta.json").read_text())
    out_root = folder / "out"
    scratch = _bench.TMP / "fusion"
    variants = [
        {"tool": "graphopt", "name": "graphopt"},
        {"tool": "onnxscript", "name": "onnxscript"},
        *ort_variants(kind, meta, args.all_ort_types),
    ]
    optimized: dict[str, Any] = {}
    for v in variants:
        r = _bench.run_worker(
            SCRIPT,
            ["--optimize", json.dumps(v), str(folder), str(out_root / _slug(v["name"]))],
            scratch / "result.json",
            args.timeout,
        )
        res = {**r.data, "process_wall_s": r.wall_s} if r.ok else {"variant": v, "crash": r.error}
        optimized[v["name"]] = res
        shown = res.get("crash") or (
            f"{res['optimize_s']:.2f}s, peak {res['peak_mb']:.0f} MB, "
            f"{res['counts']['nodes']} nodes, {res.get('fusion_stats')}"
        )
        print(f"  {kind:6} {v['name']:22} {shown}", flush=True)

    # Identical files are timed once (e.g. heads from the config and auto-detected often agree).
    seen: dict[str, str] = {}
    for name, res in optimized.items():
        if "digest" in res:
            if res["digest"] in seen:
                res["same_file_as"] = seen[res["digest"]]
            else:
                seen[res["digest"]] = name
    path = {n: str(out_root / _slug(n) / "model.onnx") for n in optimized}
    path["original"] = str(folder / "model.onnx")
    ort_names = [
        n
        for n, r in optimized.items()
        if r["variant"]["tool"] == "ort" and "digest" in r and "same_file_as" not in r
    ]

    screened: dict[str, Any] = {}
    screen_mode = None
    if ort_names:
        total = sum(
            f.stat().st_size for n in ["original", *ort_names] for f in Path(path[n]).parent.iterdir()
        )
        screen_mode = (
            "interleaved" if total <= SCREEN_INTERLEAVE_BYTES and not args.spinning else "sequential"
        )
        flags = [
            "--rounds",
            str(SCREEN_RUNS),
            *(["--sequential"] if screen_mode == "sequential" else []),
            *(["--spinning"] if args.spinning else []),
        ]
        r = _bench.run_worker(
            SCRIPT,
            [
                "--latency",
                str(folder),
                json.dumps({"original": path["original"], **{n: path[n] for n in ort_names}}),
                *flags,
            ],
            scratch / "result.json",
            args.timeout,
        )
        screened = r.data if r.ok else {n: {"error": r.error} for n in ort_names}
    for n in ort_names:
        if n in screened:
            optimized[n]["screen"] = screened[n]
    ranked = sorted(
        (n for n in ort_names if "median_ms" in screened.get(n, {})), key=lambda n: screened[n]["median_ms"]
    )
    finalists = ranked[:FINALISTS]
    for n in ort_names:
        if n not in ranked:
            optimized[n].setdefault(
                "crash", "ONNX Runtime could not run it: " + screened.get(n, {}).get("error", "?")
            )
    timed = {"original": path["original"]}
    timed.update({n: path[n] for n in ("graphopt", "onnxscript") if "digest" in optimized[n]})
    if "graphopt" in timed and not args.spinning:
        # Noise control: graphopt's file in a second session. Two sessions of one file differ only by
        # chance (memory placement, machine load), which is the floor for calling a file "behind".
        timed[CONTROL] = timed["graphopt"]
    timed.update({n: path[n] for n in finalists})
    flags = ["--sequential", "--spinning"] if args.spinning else []
    r = _bench.run_worker(
        SCRIPT,
        ["--latency", str(folder), json.dumps(timed), "--rounds", str(args.runs), *flags],
        scratch / "result.json",
        args.timeout,
    )
    final = r.data if r.ok else {"error": r.error}
    if not r.ok:
        print(f"  {kind}: latency run failed: {r.error}", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(out_root, ignore_errors=True)

    # The ORT anchor is the finalist with the lowest interleaved median.
    done = [n for n in finalists if "median_ms" in final.get(n, {})]
    chosen = min(done, key=lambda n: final[n]["median_ms"]) if done else None
    tools: dict[str, Any] = {}
    orig_hist = op_histogram(Path(path["original"]))
    tools["original"] = {
        "counts": group_counts(orig_hist),
        "ops": orig_hist,
        "latency": final.get("original"),
    }
    for name in ("graphopt", "onnxscript"):
        tools[name] = {**optimized[name], "latency": final.get(name)}
    tools["graphopt"]["control_latency"] = final.get(CONTROL)
    if chosen:
        tools["ort"] = {**optimized[chosen], "latency": final[chosen], "chosen": chosen}
    else:
        errors = sorted({optimized[n].get("crash", "") for n in optimized if n.startswith("ort:")})
        tools["ort"] = {"crash": "; ".join(e for e in errors if e)[:300] or "no variant ran"}
    return {
        "label": LABELS[kind] if size == "base" else f"{kind}-{size}",
        "export": meta,
        "tools": tools,
        "ort_variants": {n: r for n, r in optimized.items() if n.startswith("ort:")},
        "ort_screen": {"mode": screen_mode, "runs": SCREEN_RUNS, "original": screened.get("original")},
        "ort_finalists": {n: final.get(n) for n in finalists},
        "ort_chosen": chosen,
        "latency_error": final.get("error"),
        "load_average": {
            f"{stage}_{when}": d.get(f"_load_average_{when}")
            for stage, d in (("screen", screened), ("final", final))
            for when in ("before", "after")
        },
    }


def _slug(name: str) -> str:
    return name.replace(":", "_").replace("/", "_")


def _runs_ok(tool: dict[str, Any]) -> bool:
    """Whether ONNX Runtime loaded and ran the tool's file (a count of a broken file is no bar)."""
    return "counts" in tool and "median_ms" in (tool.get("latency") or {})


def paired_ratio(a: list[float], b: list[float], resamples: int = 2000) -> tuple[float, float, float]:
    """Median over rounds of ``a[i] / b[i]`` and a bootstrap 90% interval of that median.

    Both lists come from the same interleaved rounds, so the per-round ratio cancels most of the
    machine's drift; the interval says whether a few percent either way is more than noise.
    """
    import random
    import statistics

    ratios = [x / y for x, y in zip(a, b) if y > 0]
    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(ratios, k=len(ratios))) for _ in range(resamples))
    return statistics.median(ratios), meds[int(0.05 * resamples)], meds[int(0.95 * resamples) - 1]


def summarize(entry: dict[str, Any]) -> None:
    """Add graphopt-vs-anchor verdicts (counts and latency) to one model's entry.

    An anchor whose file ONNX Runtime cannot run is left out of both comparisons.
    """
    tools = entry["tools"]
    g = tools.get("graphopt", {})
    anchors = {a: tools[a] for a in ANCHORS if _runs_ok(tools.get(a, {}))}
    behind_counts = []
    if "counts" in g:
        for anchor, a in anchors.items():
            for grp in MORE_IS_BETTER:
                if g["counts"][grp] < a["counts"][grp]:
                    behind_counts.append(f"{SHORT[grp]} vs {anchor}")
            if g["counts"]["nodes"] > a["counts"]["nodes"]:
                behind_counts.append(f"nodes vs {anchor}")
    best = min(anchors, key=lambda a: anchors[a]["latency"]["median_ms"]) if anchors else None
    verdict: dict[str, Any] = {
        "counts_behind": behind_counts,
        "best_anchor": best,
        "graphopt_over_best_anchor": None,
        "latency_behind": None,
    }
    if best and _runs_ok(g):
        g_lat, a_lat = g["latency"], anchors[best]["latency"]
        ratio = g_lat["median_ms"] / a_lat["median_ms"]
        paired, lo, hi = paired_ratio(g_lat["runs"], a_lat["runs"])
        verdict.update(
            graphopt_over_best_anchor=ratio,
            latency_behind=ratio > 1.0,
            paired_ratio=paired,
            paired_ratio_90ci=[lo, hi],
            within_noise=lo <= 1.0 <= hi,
        )
        control = g.get("control_latency") or {}
        if "median_ms" in control:
            verdict["same_file_second_session"] = control["median_ms"] / g_lat["median_ms"]
    entry["verdict"] = verdict


def _tool_label(entry: dict[str, Any], tool: str) -> str:
    if tool == "ort" and entry.get("ort_chosen"):
        v = entry["tools"]["ort"]["variant"]
        heads = "auto" if not v["num_heads"] else f"{v['num_heads']}h"
        return f"ort ({v['model_type']}, o{v['opt_level']}, {heads})"
    return tool


def counts_table(results: dict[str, Any]) -> str:
    groups = list(GROUPS)
    header = [
        "model",
        "layers",
        "tool",
        *[SHORT[g] for g in groups],
        "nodes",
        "optimize s",
        "peak MB",
        "graphopt behind on",
    ]
    rows = []
    for entry in results["models"].values():
        for tool in TOOLS:
            t = entry["tools"].get(tool, {})
            if "counts" not in t:
                rows.append(
                    [
                        entry["label"],
                        entry["export"]["layers"],
                        tool,
                        *[None] * (len(groups) + 3),
                        "crash: " + t.get("crash", "?")[:100],
                    ]
                )
                continue
            note = ""
            if tool == "graphopt":
                note = ", ".join(entry["verdict"]["counts_behind"]) or "–"
            elif tool != "original" and not _runs_ok(t):
                note = "(file fails in ONNX Runtime, not compared)"
            rows.append(
                [
                    entry["label"],
                    entry["export"]["layers"],
                    _tool_label(entry, tool),
                    *[t["counts"][g] for g in groups],
                    t["counts"]["nodes"],
                    _fmt(t.get("optimize_s")),
                    _fmt(t.get("peak_mb"), ".0f"),
                    note,
                ]
            )
    return _bench.markdown_table(header, rows)


def _err_cell(fid: dict[str, Any]) -> str:
    """Max abs error, and relative to the largest |reference| value of the same output."""
    if fid.get("max_abs") is None:
        return "mismatch"
    rel = max(
        (
            v["max_abs"] / v["ref_max_abs"]
            for f in ("latency_feeds", "check_feeds")
            for v in fid[f]["per_output"].values()
            if v.get("ref_max_abs")
        ),
        default=None,
    )
    return f"{fid['max_abs']:.2e}" + (f" ({rel:.0e} rel)" if rel is not None else "")


def latency_table(results: dict[str, Any]) -> str:
    header = [
        "model",
        "tool",
        "median ms",
        "p90 ms",
        "vs original",
        "graphopt / best anchor",
        "max abs err",
        "min cosine",
    ]
    rows = []
    for entry in results["models"].values():
        orig = ((entry["tools"].get("original") or {}).get("latency") or {}).get("median_ms")
        v = entry["verdict"]
        for tool in TOOLS:
            t = entry["tools"].get(tool, {})
            lat = t.get("latency") or {}
            if "median_ms" not in lat:
                why = t.get("crash") or lat.get("error") or entry.get("latency_error") or "not timed"
                rows.append([entry["label"], tool, None, None, None, None, None, "crash: " + why[:100]])
                continue
            cell = None
            if tool == "graphopt" and v["graphopt_over_best_anchor"] is not None:
                lo, hi = v["paired_ratio_90ci"]
                cell = (
                    f"{v['graphopt_over_best_anchor']:.2f}× vs {v['best_anchor']}"
                    + (" **behind**" if v["latency_behind"] else "")
                    + f" (paired {v['paired_ratio']:.2f}, 90% {lo:.2f}–{hi:.2f}"
                    + (", within noise" if v["within_noise"] else "")
                    + (
                        f"; same file, 2nd session: {v['same_file_second_session']:.2f}×)"
                        if v.get("same_file_second_session")
                        else ")"
                    )
                )
            fid = lat.get("fidelity") or {}
            rows.append(
                [
                    entry["label"],
                    _tool_label(entry, tool),
                    _fmt(lat["median_ms"]),
                    _fmt(lat["p90_ms"]),
                    _ratio(lat["median_ms"], orig),
                    cell,
                    "–" if tool == "original" else _err_cell(fid),
                    "–" if tool == "original" else _fmt(fid.get("min_cosine"), ".6f"),
                ]
            )
    return _bench.markdown_table(header, rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--quick", action="store_true", help="4-layer 'mini' models (writes fusion_quick.*)")
    p.add_argument(
        "--runs", type=int, default=30, help="interleaved latency rounds (default 30, at least 20)"
    )
    p.add_argument(
        "--all-ort-types",
        action="store_true",
        help="also try the ORT-optimizer model types that never win (qwen3 for llama, unet for resnet)",
    )
    p.add_argument("--re-export", action="store_true", help="export again even if the cache has the model")
    p.add_argument("--keep", action="store_true", help="keep the optimized files in results/tmp/fusion/*/out")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker run")
    p.add_argument("--out", type=Path, default=_bench.RESULTS, help="folder for fusion.json / fusion.md")
    p.add_argument(
        "--render", type=Path, metavar="JSON", help="only rebuild the Markdown from an earlier JSON"
    )
    # Internal: the workers.
    p.add_argument("--prepare", nargs=3, metavar=("KIND", "SIZE", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--optimize", nargs=3, metavar=("VARIANT", "MODEL_DIR", "OUT_DIR"), help=argparse.SUPPRESS)
    p.add_argument("--latency", nargs=2, metavar=("MODEL_DIR", "FILES"), help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=30, help=argparse.SUPPRESS)
    p.add_argument("--sequential", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--spinning",
        action="store_true",
        help="keep ONNX Runtime's default spin-waiting intra-op threads (what one session alone gets); "
        "files are then timed one session at a time, not interleaved",
    )
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.prepare:
        kind, size, folder = args.prepare
        _bench.write_json(args.result_file, prepare(kind, size, Path(folder)))
        return 0
    if args.optimize:
        variant, model_dir, out_dir = args.optimize
        _bench.write_json(args.result_file, optimize_one(json.loads(variant), Path(model_dir), Path(out_dir)))
        return 0
    if args.latency:
        model_dir, files = args.latency
        _bench.write_json(
            args.result_file,
            latency(Path(model_dir), json.loads(files), args.rounds, not args.sequential, args.spinning),
        )
        return 0
    if args.render:
        results = json.loads(args.render.read_text())
        for entry in results["models"].values():
            if "tools" in entry:
                summarize(entry)
        return _report(
            results, args.render.parent, "fusion_quick" if results["settings"]["quick"] else "fusion"
        )

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad or args.runs < 1:
        p.error(f"unknown models {bad}; use {','.join(MODELS)}; --runs >= 1")
    size = "mini" if args.quick else "base"
    cache = _bench.TMP / "fusion"
    t_start = time.perf_counter()
    results: dict[str, Any] = {
        "benchmark": "fusion",
        "command": " ".join(
            [Path(sys.executable).name, "benchmarks/bench_fusion.py", *(argv or sys.argv[1:])]
        ),
        "environment": _bench.environment(),
        "settings": {
            "quick": args.quick,
            "size": size,
            "rounds": args.runs,
            "warmup": WARMUP,
            "screen_runs": SCREEN_RUNS,
            "finalists": FINALISTS,
            "intra_op_threads": 2,
            "inter_op_threads": 1,
            "graph_optimization_level": "ORT_ENABLE_ALL (default)",
            "intra_op_spinning": args.spinning,
            "interleaved": not args.spinning,
            "latency_inputs": {"batch": 1, "sequence": TEXT_SEQ, "image": IMAGE},
            "check_inputs": {"batch": CHECK_BATCH, "sequence": CHECK_SEQ, "image": IMAGE},
            "ort_model_types": {
                k: ORT_MODEL_TYPES[k] + (ORT_EXTRA_TYPES.get(k, ()) if args.all_ort_types else ())
                for k in MODELS
            },
            "ort_opt_levels": ORT_OPT_LEVELS,
        },
        "models": {},
    }
    for kind in models:
        folder = cache / f"{kind}-{size}"
        if args.re_export or not (folder / "meta.json").exists():
            print(f"exporting {kind} ({size}) with graphopt.export ...", flush=True)
            r = _bench.run_worker(
                SCRIPT, ["--prepare", kind, size, str(folder)], cache / "prepare.json", args.timeout
            )
            if not r.ok:
                print(f"export of {kind} failed: {r.error}", file=sys.stderr)
                results["models"][kind] = {"label": kind, "export_error": r.error}
                continue
        t0 = time.perf_counter()
        print(f"{kind} ({size}): optimizing and timing ...", flush=True)
        entry = run_model(kind, size, folder, args)
        entry["wall_s"] = round(time.perf_counter() - t0, 1)
        summarize(entry)
        results["models"][kind] = entry
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    return _report(results, args.out, "fusion_quick" if args.quick else "fusion")


def _report(results: dict[str, Any], out: Path, stem: str) -> int:
    """Print both tables and write ``<stem>.json`` / ``<stem>.md`` into ``out``."""
    env, s = results["environment"], results["settings"]
    ok = {k: v for k, v in results["models"].items() if "export_error" not in v}
    shown = {**results, "models": ok}
    failed = [
        f"- {k}: export failed: {v['export_error']}" for k, v in results["models"].items() if k not in ok
    ]
    loads = [
        v[0]
        for e in ok.values()
        for k, v in (e.get("load_average") or {}).items()
        if k.startswith("final") and v
    ]
    load = f" 1-min load average around the timed rounds: {min(loads):.1f}–{max(loads):.1f}." if loads else ""
    how = (
        f"Fusion benchmark ({s['size']} models): {env['cpu']}, {env['cores']} cores, onnxruntime "
        f"{env['versions'].get('onnxruntime')}, onnxscript {env['versions'].get('onnxscript')}; {env['date']}. "
        f"Latency: ONNX Runtime CPU, default graph optimizations (ORT_ENABLE_ALL), {s['intra_op_threads']} intra-op "
        f"/ {s['inter_op_threads']} inter-op threads, batch 1, sequence {s['latency_inputs']['sequence']} or "
        f"{s['latency_inputs']['image']}×{s['latency_inputs']['image']} images, {s['warmup']} warm-up runs, then "
        + (
            f"{s['rounds']} interleaved rounds (rotated order; intra-op spinning off, else the idle sessions' "
            "spinning threads take the cores)"
            if s.get("interleaved", True)
            else f"{s['rounds']} runs per file, one session at a time (default intra-op spinning)"
        )
        + "; median and p90; the ORT-optimizer anchor is the fastest "
        f"of its variants (model type × heads config/auto × opt_level 0/1/2/99; all in the JSON); errors are "
        f"against the unoptimized export on the latency input and on a padded batch-{s['check_inputs']['batch']} "
        f"input.{load} Whole run: {results.get('wall_s', 0):.0f} s.\nCommand: `{results['command']}`\n"
    )
    md = (
        "## Fused ops\n\n"
        + counts_table(shown)
        + "\n\n## Latency (fp32)\n\n"
        + latency_table(shown)
        + "\n"
        + ("\n" + "\n".join(failed) + "\n" if failed else "")
    )
    print("\n" + how + "\n" + md)
    out.mkdir(parents=True, exist_ok=True)
    _bench.write_json(out / f"{stem}.json", results)
    (out / f"{stem}.md").write_text(how + "\n" + md)
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
