"""Dynamic int8 quantization on ONNX Runtime CPU: graphopt's ``quantize-dynamic`` vs ONNX Runtime's
``quantize_dynamic`` at its settings (default, per_channel=True, each with and without reduce_range).

Why: dynamic int8 is only worth shipping if it keeps the model's answers (the embeddings of a real
sentence-embedding model, the hidden states of BERT/GPT-2) while running at least as fast as what
people already get from ORT's own tool on the same export.

Per model (the real all-MiniLM-L6-v2 on real sentences; BERT-base and GPT-2 small with random
weights, or their "mini" sizes with ``--quick``), from one ``graphopt.export``:

1. files: fp32 = graphopt's fp32 ort-cpu optimization (``optimize(m, "ort-cpu")``); graphopt dynamic =
   ``optimize(m, "ort-cpu", quantize="dynamic")`` (data-free), for MiniLM also ``graphopt_calibrated``
   (the same with ``calibration=`` the 120 sentences of ``tests/pretrained.CALIBRATION_SENTENCES``,
   none of them among the sentences measured: GPTQ weights, probe from real text), and
   ``graphopt_gather`` (embedding tables int8 too, opt-in);
   ORT ``quantize_dynamic`` (QInt8 weights) with
   per_channel in {False, True} x reduce_range in {False, True} on two sources: graphopt's
   cleaned export (folded constant weights, no contrib fusions; ORT's tool finds no constant weight
   in the raw dynamo export, whose Linear weights pass through Transpose nodes) and ONNX Runtime's
   transformers optimizer output (its fused Attention becomes QAttention, as ORT recommends).
2. accuracy against the float export: MiniLM: minimum over SENTENCES of the cosine between
   mean-pooled embeddings (one padded batch; also the 5th percentile and the median, and the minimum
   when each sentence runs alone); BERT/GPT-2: cosine of the last hidden state on a padded batch.
3. latency (ORT CPU, default graph optimizations, 2 intra-op threads, no spinning): batch 1, 128
   tokens, interleaved rounds, median; fp32, graphopt, ORT default and ORT's most accurate
   per-channel variant (the anchor); ratio graphopt / anchor.

    python benchmarks/bench_quantize_dynamic.py            # MiniLM, BERT-base, GPT-2 small
    python benchmarks/bench_quantize_dynamic.py --quick    # MiniLM, BERT-mini, GPT-2-mini
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path
from typing import Any

import _bench
import numpy as np

SIZES = {"minilm": None, "bert": "base", "gpt2": "base"}
QUICK = {"minilm": None, "bert": "mini", "gpt2": "mini"}


def _session(model: Any, threads: int = 2) -> Any:
    return _bench.ort_session(model, threads)


def _build(kind: str, size: str | None) -> Any:
    _bench.tests_on_path()
    if kind == "minilm":
        import pretrained

        return pretrained.build_minilm()
    from models import build

    return build(kind, size)


def _accuracy_feeds(kind: str, built: Any) -> dict[str, np.ndarray]:
    if kind == "minilm":
        import pretrained

        return pretrained.minilm_feeds(pretrained.SENTENCES)
    return built.feeds(4, 64, seed=1)


def _score(kind: str, out: np.ndarray, ref: np.ndarray, feeds: dict[str, np.ndarray]) -> float:
    """MiniLM: min cosine of mean-pooled embeddings; others: cosine of the whole output."""
    if kind == "minilm":
        import pretrained

        mask = feeds["attention_mask"]
        return pretrained.min_cosine(pretrained.mean_pool(ref, mask), pretrained.mean_pool(out, mask))
    a, b = ref.astype(np.float64).ravel(), out.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _ort_optimizer(raw: Path, kind: str, config: Any, dst: Path) -> str | None:
    """ONNX Runtime's transformers optimizer (BERT-style fusions) on the export; None on failure."""
    from onnxruntime.transformers.optimizer import optimize_model

    model_type = "gpt2" if kind == "gpt2" else "bert"
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 0)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    try:
        m = optimize_model(str(raw), model_type=model_type, num_heads=heads, hidden_size=hidden, opt_level=1)
        m.save_model_to_file(str(dst))
        return None
    except Exception as e:  # an anchor that fails is a result
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def run_model(kind: str, size: str | None, folder: Path, rounds: int) -> dict[str, Any]:
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    import graphopt

    torch.set_num_threads(2)
    folder.mkdir(parents=True, exist_ok=True)
    built = _build(kind, size)
    t0 = time.perf_counter()
    raw_model = built.export()
    raw = folder / "export.onnx"
    graphopt.save(raw_model, raw)
    result: dict[str, Any] = {"model": kind, "size": size, "export_s": round(time.perf_counter() - t0, 1)}

    files: dict[str, Path] = {}
    files["fp32"] = folder / "fp32.onnx"
    graphopt.save(graphopt.optimize(raw_model, "ort-cpu").model, files["fp32"])
    t0 = time.perf_counter()
    r = graphopt.optimize(raw_model, "ort-cpu", quantize="dynamic")
    result["graphopt_quantize_s"] = round(time.perf_counter() - t0, 2)
    q = next(p for p in r.report.passes if p.name == "quantize")
    result["graphopt_stats"] = q.stats
    result["graphopt_float_nodes"] = [d for d in q.details.get("nodes", []) if not d["quantized"]]
    files["graphopt"] = folder / "graphopt.onnx"
    graphopt.save(r.model, files["graphopt"])
    if kind == "minilm":
        import pretrained

        tok = pretrained.load_tokenizer()
        calibration = [pretrained.minilm_feeds([s], tok) for s in pretrained.CALIBRATION_SENTENCES]
        t0 = time.perf_counter()
        rc = graphopt.optimize(raw_model, "ort-cpu", quantize="dynamic", calibration=calibration)
        result["graphopt_calibrated_quantize_s"] = round(time.perf_counter() - t0, 2)
        files["graphopt_calibrated"] = folder / "graphopt_calibrated.onnx"
        graphopt.save(rc.model, files["graphopt_calibrated"])
    # Opt-in: embedding tables too (smaller file, as ORT's tool does by default).
    files["graphopt_gather"] = folder / "graphopt_gather.onnx"
    graphopt.save(
        graphopt.optimize(
            raw_model,
            "ort-cpu",
            quantize={"mode": "dynamic", "op_types": ["MatMul", "Gemm", "Attention", "Gather"]},
        ).model,
        files["graphopt_gather"],
    )

    sources = {"clean": folder / "clean.onnx", "ortopt": folder / "ortopt.onnx"}
    graphopt.save(graphopt.optimize(raw_model, pipeline="cleanup").model, sources["clean"])
    err = _ort_optimizer(raw, kind, built.config, sources["ortopt"])
    if err:
        result["ort_optimizer_error"] = err
        del sources["ortopt"]
    logging.disable(logging.WARNING)
    for src, path in sources.items():
        for pc in (False, True):
            for rr in (False, True):
                name = f"ort_{src}_{'pc' if pc else 'pt'}{'_rr' if rr else ''}"
                dst = folder / f"{name}.onnx"
                try:
                    quantize_dynamic(
                        str(path), str(dst), per_channel=pc, reduce_range=rr, weight_type=QuantType.QInt8
                    )
                    files[name] = dst
                except Exception as e:
                    result.setdefault("ort_errors", {})[name] = f"{type(e).__name__}: {e}"[:200]
    logging.disable(logging.NOTSET)

    # accuracy vs the float export
    feeds = _accuracy_feeds(kind, built)
    ref_sess = _session(raw)
    ref = ref_sess.run(
        None, {k: v for k, v in feeds.items() if k in {i.name for i in ref_sess.get_inputs()}}
    )[0]
    acc: dict[str, Any] = {}
    for name, path in files.items():
        s = _session(path)
        names = {i.name for i in s.get_inputs()}
        out = s.run(None, {k: v for k, v in feeds.items() if k in names})[0]
        acc[name] = {
            "score": round(_score(kind, out, ref, feeds), 6),
            "file_mb": round(path.stat().st_size / 2**20, 2),
            "quantized_ops": _quantized_ops(path),
        }
        if kind == "minilm":
            acc[name].update(_sentence_stats(s, out, ref, feeds))
    result["accuracy_metric"] = "min cosine of sentence embeddings" if kind == "minilm" else "output cosine"
    result["files"] = acc

    ort_default = "ort_clean_pt"
    per_channel = [n for n in files if n.startswith("ort_") and "_pc" in n]
    anchor = max(per_channel, key=lambda n: (acc[n]["score"], n)) if per_channel else ort_default
    result["anchor"] = anchor
    timed = [
        "fp32",
        "graphopt",
        *(["graphopt_calibrated"] if "graphopt_calibrated" in files else []),
        ort_default,
        anchor,
    ]
    if "ort_ortopt_pc" in files and "ort_ortopt_pc" not in timed:
        timed.append("ort_ortopt_pc")
    lat, times = latency({n: files[n] for n in dict.fromkeys(timed)}, built, kind, rounds)
    result["latency_ms"] = lat
    result["ratio_graphopt_to_anchor"] = round(lat["graphopt"] / lat[anchor], 3)
    # Per-round paired ratio: both ran in the same round, so load that shifts a whole round cancels.
    paired = np.asarray(times["graphopt"]) / np.asarray(times[anchor])
    result["paired_ratio_graphopt_to_anchor"] = {
        "median": round(float(np.median(paired)), 3),
        "p10": round(float(np.percentile(paired, 10)), 3),
        "p90": round(float(np.percentile(paired, 90)), 3),
    }
    result["ratio_graphopt_to_fp32"] = round(lat["graphopt"] / lat["fp32"], 3)
    if "graphopt_calibrated" in lat:
        result["ratio_calibrated_to_anchor"] = round(lat["graphopt_calibrated"] / lat[anchor], 3)
    return result


def _sentence_stats(
    sess: Any, out: np.ndarray, ref: np.ndarray, feeds: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Per-sentence cosines of the padded batch (5th percentile, median, worst sentence) and the
    minimum when every sentence runs alone (no padding, one activation range per sentence)."""
    import pretrained

    mask = feeds["attention_mask"]
    a, b = pretrained.mean_pool(ref, mask), pretrained.mean_pool(out, mask)
    cos = (a * b).sum(axis=1)
    alone = []
    for i in range(len(mask)):
        n = int(mask[i].sum())
        one = {k: v[i : i + 1, :n] for k, v in feeds.items()}
        alone.append(
            float((pretrained.mean_pool(sess.run(None, one)[0], one["attention_mask"]) * a[i]).sum())
        )
    return {
        "p5": round(float(np.percentile(cos, 5)), 6),
        "median": round(float(np.median(cos)), 6),
        "worst_sentence": pretrained.SENTENCES[int(np.argmin(cos))],
        "min_alone": round(min(alone), 6),
    }


def _quantized_ops(path: Path) -> dict[str, int]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    keep = (
        "DynamicQuantizeMatMul",
        "QAttention",
        "MatMulInteger",
        "DynamicQuantizeLinear",
        "MatMul",
        "Attention",
        "MatMulIntegerToFloat",
        "DequantizeLinear",
        "Gemm",
        "MultiHeadAttention",
        "SkipLayerNormalization",
        "LayerNormalization",
    )
    out: dict[str, int] = {}
    for n in m.graph.node:
        if n.op_type in keep:
            out[n.op_type] = out.get(n.op_type, 0) + 1
    return dict(sorted(out.items()))


def latency(
    files: dict[str, Path], built: Any, kind: str, rounds: int
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Median ms per file at batch 1, 128 tokens; all sessions open, interleaved rotated rounds."""
    feeds = built.feeds(1, 128)
    times_ms = _bench.interleaved_ms({name: _session(path) for name, path in files.items()}, feeds, rounds, 5)
    times = {n: [t / 1000 for t in v] for n, v in times_ms.items()}
    return {n: round(_bench.median(v) * 1000, 2) for n, v in times.items()}, times


def markdown(results: list[dict[str, Any]], env: dict[str, Any], quick: bool) -> str:
    lines = [
        f"# Dynamic int8 quantization ({'quick' if quick else 'full'})",
        "",
        f"CPU: {env['cpu']} ({env['cores']} cores, shared with other jobs while measured); "
        f"onnxruntime {env['versions'].get('onnxruntime')}. Latency: batch 1, 128 tokens, 2 threads, "
        "interleaved medians. Accuracy vs the float export (MiniLM: min cosine of mean-pooled "
        "embeddings over the real sentences in tests/pretrained.py; BERT/GPT-2 random weights: output "
        "cosine on a padded batch).",
        "",
    ]
    for res in results:
        label = res["model"] + (f"-{res['size']}" if res["size"] else "")
        lines += [
            f"## {label}",
            "",
            f"Anchor (most accurate ORT per-channel variant): `{res['anchor']}`; "
            f"graphopt / anchor latency **{res['ratio_graphopt_to_anchor']}x** (paired per round: "
            f"{res['paired_ratio_graphopt_to_anchor']['median']}x, p10-p90 "
            f"{res['paired_ratio_graphopt_to_anchor']['p10']}-{res['paired_ratio_graphopt_to_anchor']['p90']}), "
            "graphopt / fp32 "
            f"{res['ratio_graphopt_to_fp32']}x"
            + (
                f"; graphopt calibrated / anchor {res['ratio_calibrated_to_anchor']}x"
                if "ratio_calibrated_to_anchor" in res
                else ""
            )
            + ".",
            "",
        ]
        rows = []
        minilm = res["model"] == "minilm"
        for name, a in res["files"].items():
            extra = [a.get("p5"), a.get("median"), a.get("min_alone")] if minilm else []
            rows.append(
                [
                    name,
                    a["score"],
                    *extra,
                    res["latency_ms"].get(name),
                    a["file_mb"],
                    ", ".join(f"{k} {v}" for k, v in a["quantized_ops"].items()),
                ]
            )
        head = [
            "file",
            "accuracy",
            *(["p5", "median", "min alone"] if minilm else []),
            "latency ms",
            "MB",
            "ops",
        ]
        lines.append(_bench.markdown_table(head, rows))
        if minilm:
            worst = res["files"]["graphopt"].get("worst_sentence")
            lines += [
                "",
                f'Worst sentence for graphopt: "{worst}". accuracy = min over the 72 sentences '
                "(one padded batch); min alone = each sentence run on its own.",
            ]
        floats = res.get("graphopt_float_nodes") or []
        lines += ["", f"graphopt pass stats: `{res['graphopt_stats']}`; nodes left float: {len(floats)}", ""]
        if res.get("ort_optimizer_error"):
            lines += [f"ORT transformers optimizer failed: {res['ort_optimizer_error']}", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="MiniLM + mini BERT/GPT-2, fewer rounds")
    ap.add_argument("--models", default="minilm,bert,gpt2")
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--tag", default="", help="suffix of the result files (quantize_dynamic_<tag>.json/.md)")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sizes = QUICK if args.quick else SIZES
    rounds = args.rounds or (20 if args.quick else 50)
    env = _bench.environment()
    results = []
    for kind in args.models.split(","):
        folder = _bench.TMP / f"qdyn_{kind}_{sizes[kind] or 'real'}"
        print(f"== {kind} {sizes[kind] or ''}", flush=True)
        res = run_model(kind, sizes[kind], folder, rounds)
        print(
            {k: res[k] for k in ("anchor", "ratio_graphopt_to_anchor", "latency_ms")},
            {n: a["score"] for n, a in res["files"].items()},
            flush=True,
        )
        results.append(res)
    stem = "quantize_dynamic_quick" if args.quick else "quantize_dynamic"
    if args.tag:
        stem += f"_{args.tag}"
    _bench.write_json(_bench.RESULTS / f"{stem}.json", {"environment": env, "results": results})
    (_bench.RESULTS / f"{stem}.md").write_text(markdown(results, env, args.quick))
    print(f"wrote {_bench.RESULTS / stem}.json/.md")


if __name__ == "__main__":
    main()
