"""The benchmark suite: every graphopt mode against every anchor on every model, one command.

Why: each bench_*.py answers one question; a user choosing a tool wants one table per model that
says, side by side on the same machine and the same run, how fast, how small and how accurate each
file is, and where graphopt is behind.

Models (``--quick``: the 4-layer "mini" sizes of the first five): BERT-base, GPT-2 small, a Llama-style
decoder (8 layers, GQA), ViT-base/16, ResNet-50 (random weights, seeded, ``tests/models.py``); the real
pretrained all-MiniLM-L6-v2 on real sentences (``tests/pretrained.py``); a CNN and an MLP trained here
on scikit-learn's digits (``tests/digits.py``), with accuracy on the real test labels.

Files per model, each made in a fresh interpreter (optimizer wall time and peak RSS are its own; a
crash is a result):

* ``original``: the ``graphopt.export`` file;
* graphopt: ``optimize(m)`` fp32, ``quantize="dynamic"``, ``quantize="static"`` (calibration: a few
  feed batches, never the evaluation set for digits), ``quantize="int4"`` (decoders), and
  ``prune={"sparsity": 0.5, "mode": "structured"}`` (FFN neurons on transformers and MLPs, channels on
  CNNs);
* anchors: ONNX Runtime's transformers optimizer (fastest of its variants, screened as in
  bench_fusion.py), onnxscript's ``optimize_for_ort``, onnxsim; ONNX Runtime's ``quantize_dynamic``
  (per_channel=True), ``quantize_static`` (QDQ, per_channel=True, QUInt8 activations, QInt8
  weights, MinMax on the same calibration batches) and ``MatMulNBitsQuantizer`` (decoders; int4
  block 32 symmetric, accuracy_level 4) — each on the ORT optimizer's chosen file, as ORT documents
  (optimize, then quantize), falling back to the export if that crashes;
* for the Llama decoder, onnxruntime-genai's model builder from the same weights (int4 and fp32) with
  tokens/s for 128 generated tokens after a 64-token prompt (graphopt's export has no KV cache, so for
  graphopt only single-forward latency exists; the table says so).

Latency: ONNX Runtime CPU (ORT_ENABLE_ALL, 2 intra-op threads, spinning off), all sessions open and
timed in interleaved rounds (rotated order), batch 1 then a larger batch; median, p90, throughput;
paired ratio of graphopt to its anchor with a bootstrap 90% interval (bench_fusion.paired_ratio).
Fidelity against the export: max abs error, cosine, SQNR; accuracy on digits; MiniLM's worst
sentence-embedding cosine over all sentences. Also file size, the roofline fraction
(bench_roofline.py) and optimizer time vs depth (bench_scaling.py).

    python benchmarks/suite.py --quick                 # ~10 min on 2 cores -> results/suite_quick.*
    python benchmarks/suite.py                         # full sizes -> results/suite.*
    python benchmarks/suite.py --render results/suite.json   # rebuild Markdown and plots only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import _bench
import bench_fusion
import bench_roofline

SCRIPT = Path(__file__).resolve()
#: Model keys in table order.
MODELS = ("bert", "gpt2", "llama", "vit", "resnet", "minilm", "digits-cnn", "digits-mlp")
TRANSFORMERS = ("bert", "gpt2", "llama", "vit")
DECODERS = ("gpt2", "llama")
LABELS = {
    "bert": "BERT-base",
    "gpt2": "GPT-2 small",
    "llama": "Llama-8L (GQA)",
    "vit": "ViT-base/16",
    "resnet": "ResNet-50",
    "minilm": "all-MiniLM-L6-v2 (pretrained)",
    "digits-cnn": "digits CNN (trained)",
    "digits-mlp": "digits MLP (trained)",
}
#: Tool -> (family, compute type). Family groups a graphopt mode with the anchors it is compared to.
TOOLS: dict[str, tuple[str, str]] = {
    "original": ("original", "fp32"),
    "graphopt": ("fp32", "fp32"),
    "ort-opt": ("fp32", "fp32"),
    "onnxscript": ("fp32", "fp32"),
    "onnxsim": ("fp32", "fp32"),
    "graphopt-dynamic": ("dynamic", "int8"),
    "ort-dynamic": ("dynamic", "int8"),
    "graphopt-static": ("static", "int8"),
    "ort-static": ("static", "int8"),
    "graphopt-int4": ("int4", "int8"),
    "ort-int4": ("int4", "int8"),
    "graphopt-pruned": ("pruned", "fp32"),
}
#: Plot colours: each graphopt mode dark, its anchors light shades of the same family.
COLORS = {
    "graphopt": "#1f77b4",
    "ort-opt": "#aec7e8",
    "onnxscript": "#c7c7c7",
    "onnxsim": "#dbdb8d",
    "graphopt-dynamic": "#2ca02c",
    "ort-dynamic": "#98df8a",
    "graphopt-static": "#d62728",
    "ort-static": "#ff9896",
    "graphopt-int4": "#9467bd",
    "ort-int4": "#c5b0d5",
    "graphopt-pruned": "#8c564b",
}
GRAPHOPT = {
    "fp32": "graphopt",
    "dynamic": "graphopt-dynamic",
    "static": "graphopt-static",
    "int4": "graphopt-int4",
    "pruned": "graphopt-pruned",
}
TEXT_SEQ, IMAGE, BATCH, CALIB_BATCHES = 128, 224, 8, 4
DIGITS_BATCH = 256
WARMUP = 3
#: Sessions are opened together and interleaved while the files total at most this; beyond, one at a time.
INTERLEAVE_BYTES = 6 << 30
GENAI_PROMPT, GENAI_NEW = 64, 128
#: A file counts as larger than an anchor's beyond this ratio (headers and names differ by a few KB).
SIZE_SLACK = 1.05


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def _size_mb(folder: Path) -> float:
    return (
        sum(f.stat().st_size for f in folder.iterdir() if f.is_file() and f.name.startswith("model"))
        / _bench.MB
    )


# ---------------------------------------------------------------------------------------------
# Worker: prepare one model (export, feeds, calibration, FLOPs)


def _build(key: str, size: str) -> tuple[Any, dict[str, Any]]:
    """(Exportable-like object, extras) for a model key."""
    _bench.tests_on_path()
    if key == "minilm":
        from pretrained import build_minilm

        return build_minilm(), {}
    if key.startswith("digits"):
        from digits import train_digits_cnn, train_digits_mlp

        d = train_digits_cnn() if key == "digits-cnn" else train_digits_mlp()
        return d, {"torch_test_accuracy": d.test_accuracy}
    from models import build

    return build(key, size), {}


def prepare(key: str, size: str, folder: Path) -> dict[str, Any]:
    """model.onnx, feeds.npz (batch 1), batch.npz (larger batch), check.npz (fidelity), calib.npz,
    eval.npz (digits test set / MiniLM sentences), meta.json; for llama also an HF folder for genai."""
    import numpy as np
    import torch

    import graphopt

    torch.set_num_threads(2)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    built, extra = _build(key, size)
    model = built.export()
    export_s = time.perf_counter() - t0
    path = folder / "model.onnx"
    graphopt.save(model, path, external_data=True)
    calib: dict[str, Any] = {}
    if key.startswith("digits"):
        x = built.x_test
        np.savez(folder / "feeds.npz", x=x[:1])
        np.savez(folder / "batch.npz", x=x[:DIGITS_BATCH])
        np.savez(folder / "check.npz", x=x[:64])
        np.savez(folder / "eval.npz", x=x, labels=built.y_test)
        for i, feeds in enumerate(built.calibration(256, 32)):
            calib.update({f"{k}/{i}": v for k, v in feeds.items()})
        module, config = built.module, None
    else:
        image = key in ("vit", "resnet")
        seq = IMAGE if image else TEXT_SEQ
        np.savez(folder / "feeds.npz", **built.feeds(1, seq, seed=0))
        np.savez(folder / "batch.npz", **built.feeds(BATCH, seq, seed=2))
        np.savez(folder / "check.npz", **built.feeds(2, IMAGE if image else 32, seed=1))
        for i in range(CALIB_BATCHES):
            calib.update({f"{k}/{i}": v for k, v in built.feeds(2, seq, seed=10 + i).items()})
        if key == "minilm":
            from pretrained import SENTENCES, minilm_feeds

            np.savez(folder / "eval.npz", **minilm_feeds(SENTENCES))
        module, config = built.module, built.config
        if key == "llama":
            _save_hf_llama(module, folder / "hf")
    np.savez(folder / "calib.npz", **calib)
    feeds1 = dict(np.load(folder / "feeds.npz"))
    feedsn = dict(np.load(folder / "batch.npz"))
    hh = bench_fusion._heads_hidden(config) if config is not None else None
    meta = {
        "key": key,
        "size": size,
        "label": LABELS[key]
        if size == "base" or key in ("minilm",) or key.startswith("digits")
        else f"{key}-{size}",
        "parameters": int(sum(p.numel() for p in module.parameters())),
        "layers": bench_fusion._layers(config) if config is not None else None,
        "heads": hh[0] if hh else None,
        "hidden": hh[1] if hh else None,
        "nodes": sum(bench_fusion.op_histogram(path).values()),
        "weights_mb": round(_size_mb(folder), 1),
        "export_s": round(export_s, 2),
        "batch1_shape": {k: list(v.shape) for k, v in feeds1.items()},
        "batch_shape": {k: list(v.shape) for k, v in feedsn.items()},
        "flops": bench_roofline.model_flops(path, feeds1),
        "flops_batch": bench_roofline.model_flops(path, feedsn),
        **extra,
    }
    _bench.write_json(folder / "meta.json", meta)
    return meta


def _save_hf_llama(module: Any, hf: Path) -> None:
    """The test Llama's weights as a LlamaForCausalLM folder (seeded LM head) plus a word-level tokenizer
    of the same vocabulary, so onnxruntime-genai's builder can read it with no network."""
    import copy

    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = copy.deepcopy(module.config)
    cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id = 0, 1, 2
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(0)
    lm = LlamaForCausalLM(cfg).eval()
    lm.model.load_state_dict(module.state_dict())
    lm.save_pretrained(str(hf))
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{f"t{i}": i for i in range(4, cfg.vocab_size)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    ).save_pretrained(str(hf))


# ---------------------------------------------------------------------------------------------
# Worker: one optimizer / quantizer run


class _Reader:
    """ONNX Runtime CalibrationDataReader over the calib.npz batches (the ones graphopt gets)."""

    def __init__(self, path: Path, names: set[str]) -> None:
        from graphopt.calibration import CalibrationData

        self.batches = [
            {k: v for k, v in b.items() if k in names} for b in CalibrationData.from_any(str(path)).batches()
        ]
        self.i = 0

    def get_next(self) -> dict[str, Any] | None:
        if self.i >= len(self.batches):
            return None
        self.i += 1
        return self.batches[self.i - 1]

    def rewind(self) -> None:
        self.i = 0


def _ort_quantize(tool: str, src: Path, dst: Path, calib: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    if tool == "ort-dynamic":
        quantize_dynamic(
            str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8, use_external_data_format=True
        )
    elif tool == "ort-static":
        names = {i.name for i in onnx.load(str(src), load_external_data=False).graph.input}
        quantize_static(
            str(src),
            str(dst),
            _Reader(calib, names),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            use_external_data_format=True,
        )
    else:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

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
        onnx.save_model(q.model.model, str(dst), save_as_external_data=True, location="model.onnx.data")


def optimize_one(spec: dict[str, Any], model_dir: Path, out_dir: Path) -> dict[str, Any]:
    """One tool on one model: load + optimize (timed, peak RSS) + save; graphopt fp32, onnxscript and
    the ORT optimizer go through bench_fusion.optimize_one (same measurement)."""
    import logging

    logging.disable(logging.WARNING)
    tool = spec["tool"]
    if tool in ("graphopt", "onnxscript", "ort"):
        data = bench_fusion.optimize_one(spec, model_dir, out_dir)
    else:
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        dst = out_dir / "model.onnx"
        src = Path(spec.get("input") or model_dir / "model.onnx")
        calib = model_dir / "calib.npz"
        if tool.startswith("graphopt"):
            import graphopt
        elif tool == "onnxsim":
            import onnx
            import onnxsim
        else:
            import onnxruntime.quantization  # noqa: F401  (import time is not the tool's)
        meter = _bench.PeakMeter()
        data = {"variant": spec, "memory_method": meter.method}
        try:
            with meter.phase("optimize"):
                if tool.startswith("graphopt"):
                    kw = dict(spec.get("kwargs") or {})
                    if kw.pop("calibrate", False):
                        kw["calibration"] = str(calib)
                    result = graphopt.optimize(str(src), "ort-cpu", **kw)
                    out: Any = result.model
                    data["pipeline"] = result.report.pipeline
                    data["stats"] = {
                        p.name: {k: v for k, v in p.stats.items() if v}
                        for p in result.report.passes
                        if p.name.split("(")[0].startswith(("quantize", "prune"))
                    }
                elif tool == "onnxsim":
                    out, ok = onnxsim.simplify(onnx.load(str(src)))
                    data["check_ok"] = bool(ok)
                else:
                    if spec.get("preprocess"):
                        from onnxruntime.quantization.shape_inference import quant_pre_process

                        pre = out_dir / "pre.onnx"
                        # Symbolic shape inference fails on dynamo exports; ORT's basic optimizations
                        # (constant folding of the transposed weights) and ONNX shape inference still run.
                        quant_pre_process(
                            str(src),
                            str(pre),
                            skip_symbolic_shape=True,
                            save_as_external_data=True,
                            all_tensors_to_one_file=True,
                            external_data_location="pre.onnx.data",
                        )
                        src = pre
                    _ort_quantize(tool, src, dst, calib)
                    for f in ("pre.onnx", "pre.onnx.data"):
                        (out_dir / f).unlink(missing_ok=True)
            with meter.phase("save"):
                if tool.startswith("graphopt"):
                    graphopt.save(out, dst, external_data=True)
                elif tool == "onnxsim":
                    onnx.save_model(out, str(dst), save_as_external_data=True, location="model.onnx.data")
        except Exception as e:  # a crash is a result
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
        data["ops"] = bench_fusion.op_histogram(dst)
        data["counts"] = bench_fusion.group_counts(data["ops"])
        data["digest"] = bench_fusion._digest(out_dir)
    if "crash" not in data:
        data["size_mb"] = _size_mb(out_dir)
        if tool == "graphopt-pruned":
            # Fewer FLOPs than the export: the roofline counts the pruned model's own, on the same pruning
            # without fusion (level 1), since fused ops (Attention, FusedConv) hide their GEMMs from the count.
            import numpy as np

            import graphopt

            tmp = out_dir.parent / (out_dir.name + "-flops")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            try:
                graphopt.save(
                    graphopt.optimize(
                        str(model_dir / "model.onnx"), "ort-cpu", level=1, **(spec.get("kwargs") or {})
                    ).model,
                    tmp / "model.onnx",
                    external_data=True,
                )
                data["flops"] = bench_roofline.model_flops(
                    tmp / "model.onnx", dict(np.load(model_dir / "feeds.npz"))
                )
            except Exception as e:
                data["flops"] = {"error": _one_line(e)}
            shutil.rmtree(tmp, ignore_errors=True)
    return data


# ---------------------------------------------------------------------------------------------
# Worker: interleaved latency + fidelity of every file of one model


def _metrics(ref: Any, got: Any) -> dict[str, Any]:
    import numpy as np

    if ref.shape != got.shape:
        return {"error": f"shape {list(got.shape)} != {list(ref.shape)}"}
    a, b = ref.astype(np.float64).ravel(), got.astype(np.float64).ravel()
    err = a - b
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    noise = float(err @ err)
    return {
        "max_abs": float(np.max(np.abs(err))) if a.size else 0.0,
        "cosine": float(a @ b / denom) if denom else 1.0,
        "sqnr_db": float(10 * np.log10(float(a @ a) / noise)) if noise > 0 else None,
    }


def latency(model_dir: Path, files: dict[str, str], rounds: int, batch_rounds: int) -> dict[str, Any]:
    """Fidelity of each file against the first (the export), then interleaved timing at batch 1 and at
    the larger batch. Files that ONNX Runtime cannot load or run are recorded with the error."""
    import numpy as np

    _bench.tests_on_path()
    feeds = {
        "batch1": dict(np.load(model_dir / "feeds.npz")),
        "batch": dict(np.load(model_dir / "batch.npz")),
    }
    check = dict(np.load(model_dir / "check.npz"))
    evals = dict(np.load(model_dir / "eval.npz")) if (model_dir / "eval.npz").exists() else None
    meta = json.loads((model_dir / "meta.json").read_text())
    total = sum(f.stat().st_size for p in files.values() for f in Path(p).parent.iterdir())
    interleave = total <= INTERLEAVE_BYTES
    out: dict[str, Any] = {"_load_average_before": list(os.getloadavg()), "_interleaved": interleave}
    ref: dict[str, Any] = {}
    sessions: dict[str, Any] = {}

    def run(sess: Any, f: dict[str, Any]) -> list[Any]:
        names = {i.name for i in sess.get_inputs()}
        return sess.run(None, {k: v for k, v in f.items() if k in names})

    def evaluate(name: str, sess: Any) -> dict[str, Any]:
        fid: dict[str, Any] = {}
        outs = {"check": run(sess, check), "batch1": run(sess, feeds["batch1"])}
        if not ref:
            ref.update(outs)
        per = [_metrics(r, g) for k in outs for r, g in zip(ref[k], outs[k])]
        bad = [p["error"] for p in per if "error" in p]
        if bad:
            fid["error"] = bad[0]
        else:
            fid["max_abs"] = max(p["max_abs"] for p in per)
            fid["cosine"] = min(p["cosine"] for p in per)
            sq = [p["sqnr_db"] for p in per if p["sqnr_db"] is not None]
            fid["sqnr_db"] = min(sq) if sq else None
        if evals is not None and "labels" in evals:
            from digits import accuracy

            fid["accuracy"] = accuracy(run(sess, {"x": evals["x"]})[0], evals["labels"])
        elif evals is not None:
            from pretrained import mean_pool, min_cosine

            emb = mean_pool(run(sess, evals)[0], evals["attention_mask"])
            if "embeddings" not in ref:
                ref["embeddings"] = emb
            fid["embedding_min_cosine"] = min_cosine(ref["embeddings"], emb)
        return fid

    def timed(sess: Any, f: dict[str, Any]) -> float:
        t0 = time.perf_counter()
        sess.run(None, f)
        return (time.perf_counter() - t0) * 1000

    for name, path in files.items():
        try:
            t0 = time.perf_counter()
            sess = bench_fusion._session(Path(path), spinning=False)
            init = time.perf_counter() - t0
            fid = evaluate(name, sess)
        except Exception as e:
            if not ref:
                raise
            out[name] = {"error": _one_line(e)}
            continue
        out[name] = {"session_init_s": init, "fidelity": fid}
        if interleave:
            sessions[name] = sess
        else:
            for which, n in (("batch1", rounds), ("batch", batch_rounds)):
                names = {i.name for i in sess.get_inputs()}
                f = {k: v for k, v in feeds[which].items() if k in names}
                for _ in range(WARMUP):
                    timed(sess, f)
                out[name][which] = _stats([timed(sess, f) for _ in range(n)])
            del sess
    names = list(sessions)
    for which, n in (("batch1", rounds), ("batch", batch_rounds)):
        fs = {}
        for name in names:
            inputs = {i.name for i in sessions[name].get_inputs()}
            fs[name] = {k: v for k, v in feeds[which].items() if k in inputs}
            for _ in range(WARMUP if which == "batch1" else 1):
                timed(sessions[name], fs[name])
        times: dict[str, list[float]] = {x: [] for x in names}
        for i in range(n if names else 0):
            k = i % len(names)
            for name in names[k:] + names[:k]:
                times[name].append(timed(sessions[name], fs[name]))
        for name in names:
            out[name][which] = _stats(times[name])
    for name in files:
        for which in ("batch1", "batch"):
            st = (out.get(name) or {}).get(which)
            if st:
                rows = next(iter(feeds[which].values())).shape[0]
                st["throughput_per_s"] = rows / (st["median_ms"] / 1e3)
                st["rows"] = rows
    out["_load_average_after"] = list(os.getloadavg())
    out["_meta_key"] = meta["key"]
    return out


def _stats(times: list[float]) -> dict[str, Any]:
    import numpy as np

    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90)), "runs": times}


# ---------------------------------------------------------------------------------------------
# Worker: onnxruntime-genai builder and generation


def genai(
    model_dir: Path, out_root: Path, rounds: int, files: dict[str, str] | None = None
) -> dict[str, Any]:
    """Build int4 and fp32 from the HF folder with onnxruntime-genai's builder (no network), then time a
    greedy 64 + 128-token generation per build, interleaved over ``rounds``; and, for comparison, one
    forward of graphopt's files (``files``) on the same 64-token prompt (they have no KV cache)."""
    import subprocess

    import numpy as np

    res: dict[str, Any] = {}
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        return {"error": f"n/a: onnxruntime-genai not installed ({e})"}
    res["version"] = og.__version__
    hf = model_dir / "hf"
    if not (hf / "config.json").exists():
        return {"error": "n/a: no HF folder (re-export the model)"}
    models: dict[str, Any] = {}
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    for prec in ("int4", "fp32"):
        out = out_root / f"genai-{prec}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        p = subprocess.run(
            [
                sys.executable,
                "-m",
                "onnxruntime_genai.models.builder",
                "-i",
                str(hf),
                "-o",
                str(out),
                "-p",
                prec,
                "-e",
                "cpu",
                "-c",
                str(out_root / "genai-cache"),
            ],
            capture_output=True,
            text=True,
            env=env,
        )
        entry: dict[str, Any] = {"build_s": time.perf_counter() - t0}
        if p.returncode != 0:
            entry["error"] = (
                "builder failed: " + " | ".join((p.stderr or p.stdout).strip().splitlines()[-2:])[:300]
            )
            res[prec] = entry
            continue
        cfg_path = out / "genai_config.json"
        cfg = json.loads(cfg_path.read_text())
        so = cfg["model"]["decoder"].setdefault("session_options", {})
        so.update({"intra_op_num_threads": 2, "inter_op_num_threads": 1})
        cfg_path.write_text(json.dumps(cfg, indent=2))
        entry["size_mb"] = (
            sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model")) / _bench.MB
        )
        try:
            c = og.Config(str(out))
            c.clear_providers()
            models[prec] = og.Model(c)
        except Exception as e:
            entry["error"] = _one_line(e)
        res[prec] = entry
    prompt = np.random.default_rng(0).integers(4, 1000, GENAI_PROMPT).astype(np.int32)

    def generate(m: Any) -> tuple[float, float, int]:
        params = og.GeneratorParams(m)
        params.set_search_options(
            max_length=GENAI_PROMPT + GENAI_NEW,
            min_length=GENAI_PROMPT + GENAI_NEW,
            do_sample=False,
            batch_size=1,
        )
        g = og.Generator(m, params)
        t0 = time.perf_counter()
        g.append_tokens(prompt)
        t1 = time.perf_counter()
        n = 0
        while not g.is_done():
            g.generate_next_token()
            n += 1
        return (t1 - t0) * 1000, time.perf_counter() - t1, n

    for m in models.values():
        generate(m)
    runs: dict[str, list[tuple[float, float, int]]] = {p: [] for p in models}
    names = list(models)
    for i in range(rounds):
        k = i % max(1, len(names))
        for p in names[k:] + names[:k]:
            runs[p].append(generate(models[p]))
    forward: dict[str, Any] = {}
    for name, path in (files or {}).items():
        try:
            sess = bench_fusion._session(Path(path), spinning=False)
            feed = {
                "input_ids": prompt[None].astype(np.int64),
                "attention_mask": np.ones((1, GENAI_PROMPT), np.int64),
            }
            feed = {k: v for k, v in feed.items() if k in {i.name for i in sess.get_inputs()}}
            for _ in range(WARMUP):
                sess.run(None, feed)
            times = []
            for _ in range(10 * rounds):
                t0 = time.perf_counter()
                sess.run(None, feed)
                times.append((time.perf_counter() - t0) * 1000)
            forward[name] = {"prompt_forward_ms": float(np.median(times)), "runs": len(times)}
            del sess
        except Exception as e:
            forward[name] = {"error": _one_line(e)}
    res["graphopt_forward"] = forward
    for p, rs in runs.items():
        prefill = [r[0] for r in rs]
        decode = [r[2] / r[1] for r in rs]
        total = [GENAI_NEW / (r[0] / 1000 + r[1]) for r in rs]
        res[p].update(
            prefill_ms=float(np.median(prefill)),
            decode_tokens_per_s=float(np.median(decode)),
            tokens_per_s=float(np.median(total)),
            generated=rs[0][2],
            rounds=len(rs),
        )
    return res


# ---------------------------------------------------------------------------------------------
# Driver


def tool_specs(key: str, meta: dict[str, Any], quick: bool) -> list[dict[str, Any]]:
    """The first-stage runs for one model (everything that reads the export itself)."""
    cnn = key in ("resnet", "digits-cnn")
    targets = ["channels"] if cnn else ["ffn"]
    specs = [
        {"tool": "graphopt", "name": "graphopt"},
        {"tool": "graphopt-dynamic", "name": "graphopt-dynamic", "kwargs": {"quantize": "dynamic"}},
        {
            "tool": "graphopt-static",
            "name": "graphopt-static",
            "kwargs": {"quantize": "static", "calibrate": True},
        },
    ]
    if key in DECODERS:
        specs.append({"tool": "graphopt-int4", "name": "graphopt-int4", "kwargs": {"quantize": "int4"}})
    specs.append(
        {
            "tool": "graphopt-pruned",
            "name": "graphopt-pruned",
            "kwargs": {"prune": {"sparsity": 0.5, "mode": "structured", "targets": targets}},
        }
    )
    specs += [{"tool": "onnxscript", "name": "onnxscript"}, {"tool": "onnxsim", "name": "onnxsim"}]
    kind = key if key in bench_fusion.ORT_MODEL_TYPES else ("bert" if key == "minilm" else "resnet")
    variants = bench_fusion.ort_variants(kind, meta)
    if quick:  # config heads (or auto), the two extremes of opt_level
        first = variants[0]["num_heads"]
        variants = [v for v in variants if v["num_heads"] == first and v["opt_level"] in (0, 99)]
    specs += variants
    return specs


def run_model(key: str, folder: Path, args: argparse.Namespace) -> dict[str, Any]:
    meta = json.loads((folder / "meta.json").read_text())
    if not (meta.get("flops") or {}).get("flops"):  # a cache from before the FLOP count ran on ONNX Runtime
        import numpy as np

        for k, f in (("flops", "feeds.npz"), ("flops_batch", "batch.npz")):
            meta[k] = bench_roofline.model_flops(folder / "model.onnx", dict(np.load(folder / f)))
        _bench.write_json(folder / "meta.json", meta)
    out_root = folder / "out"
    scratch = _bench.TMP / "suite"
    results: dict[str, Any] = {}

    def optimize(spec: dict[str, Any]) -> dict[str, Any]:
        r = _bench.run_worker(
            SCRIPT,
            ["--optimize", json.dumps(spec), str(folder), str(out_root / _slug(spec["name"]))],
            scratch / "result.json",
            args.timeout,
        )
        res = {**r.data, "process_wall_s": r.wall_s} if r.ok else {"variant": spec, "crash": r.error}
        shown = (
            res.get("crash")
            or f"{res['optimize_s']:.2f}s, peak {res['peak_mb']:.0f} MB, {res['size_mb']:.1f} MB"
        )
        print(f"  {key:10} {spec['name']:24} {shown}", flush=True)
        return res

    for spec in tool_specs(key, meta, args.quick):
        results[spec["name"]] = optimize(spec)
    path = {n: str(out_root / _slug(n) / "model.onnx") for n in results}
    path["original"] = str(folder / "model.onnx")

    # The ORT optimizer anchor: the fastest distinct variant (screened like bench_fusion when > 1).
    seen: dict[str, str] = {}
    ort_names = []
    for n, r in results.items():
        if n.startswith("ort:") and "digest" in r:
            if r["digest"] in seen:
                r["same_file_as"] = seen[r["digest"]]
            else:
                seen[r["digest"]] = n
                ort_names.append(n)
    chosen, screen = (ort_names[0] if ort_names else None), None
    if len(ort_names) > 1:
        r = _bench.run_worker(
            bench_fusion.SCRIPT,
            [
                "--latency",
                str(folder),
                json.dumps({"original": path["original"], **{n: path[n] for n in ort_names}}),
                "--rounds",
                "10",
            ],
            scratch / "result.json",
            args.timeout,
        )
        screen = (
            {n: (r.data.get(n) or {}).get("median_ms") for n in ort_names} if r.ok else {"error": r.error}
        )
        ranked = sorted((n for n in ort_names if isinstance(screen.get(n), float)), key=lambda n: screen[n])
        chosen = ranked[0] if ranked else None
    tools: dict[str, Any] = {}
    if chosen:
        tools["ort-opt"] = {**results[chosen], "chosen": chosen}
        path["ort-opt"] = path[chosen]
    else:
        errs = sorted({r.get("crash", "") for n, r in results.items() if n.startswith("ort:")})
        tools["ort-opt"] = {"crash": "; ".join(e for e in errs if e)[:300] or "no variant ran"}
    for n, r in results.items():
        if not n.startswith("ort:"):
            tools[n] = r
    # ORT's quantizers on ORT's optimized file (its documented flow for transformers). If that crashes or
    # quantizes nothing (the file stays > 80% of the export), on the export after ORT's quant_pre_process.
    export_mb = _size_mb(folder)
    quant = ["ort-dynamic", "ort-static"] + (["ort-int4"] if key in DECODERS else [])
    for name in quant:
        attempts = []
        if path.get("ort-opt"):
            attempts.append(("ORT optimizer's file", {"input": path["ort-opt"]}))
        attempts.append(("export after quant_pre_process", {"input": path["original"], "preprocess": True}))
        res: dict[str, Any] = {}
        failed = []
        for label, extra in attempts:
            res = optimize({"tool": name, "name": name, **extra})
            res["input"] = label
            if "crash" not in res and res["size_mb"] <= 0.8 * export_mb:
                break
            failed.append(f"{label}: " + (res.get("crash") or f"quantized nothing ({res['size_mb']:.1f} MB)"))
        if failed:
            res["failed_attempts"] = failed
        tools[name] = res
        path[name] = str(out_root / name / "model.onnx")
    timed = {"original": path["original"]}
    timed.update({t: path[t] for t in TOOLS if t != "original" and "digest" in tools.get(t, {})})
    rounds, brounds = (20, 10) if args.quick else (30, 15)
    r = _bench.run_worker(
        SCRIPT,
        [
            "--latency",
            str(folder),
            json.dumps(timed),
            "--rounds",
            str(rounds),
            "--batch-rounds",
            str(brounds),
        ],
        scratch / "result.json",
        args.timeout,
    )
    final = r.data if r.ok else {"error": r.error}
    if not r.ok:
        print(f"  {key}: latency run failed: {r.error}", file=sys.stderr)
    tools["original"] = {
        "size_mb": _size_mb(folder),
        "counts": bench_fusion.group_counts(bench_fusion.op_histogram(Path(path["original"]))),
    }
    for t in TOOLS:
        if t not in tools:
            continue
        tools[t]["family"], tools[t]["compute"] = TOOLS[t]
        if t in final:
            tools[t]["latency"] = final[t]
        tools[t].pop("ops", None)
    entry: dict[str, Any] = {
        "label": meta["label"],
        "meta": meta,
        "tools": tools,
        "ort_screen": screen,
        "latency_error": final.get("error"),
        "interleaved": final.get("_interleaved"),
        "load_average": [final.get("_load_average_before"), final.get("_load_average_after")],
    }
    if key == "llama":
        files = {t: path[t] for t in ("graphopt", "graphopt-int4") if "digest" in tools.get(t, {})}
        r = _bench.run_worker(
            SCRIPT,
            [
                "--genai",
                str(folder),
                str(out_root),
                json.dumps(files),
                "--rounds",
                str(3 if args.quick else 5),
            ],
            scratch / "result.json",
            args.timeout,
        )
        entry["genai"] = r.data if r.ok else {"error": "n/a: " + r.error}
        print(f"  {key:10} genai: {entry['genai']}", flush=True)
    if not args.keep:
        shutil.rmtree(out_root, ignore_errors=True)
    return entry


def _slug(name: str) -> str:
    return name.replace(":", "_").replace("/", "_")


def summarize(entry: dict[str, Any]) -> None:
    """Per graphopt mode: ratio to each anchor of its family (latency paired, size, fidelity) and a
    plain list of where graphopt is behind."""
    tools = entry.get("tools") or {}
    verdicts: dict[str, Any] = {}
    for family, g in GRAPHOPT.items():
        gt = tools.get(g)
        if gt is None:
            continue
        v: dict[str, Any] = {"anchors": {}, "behind": []}
        if "crash" in gt or "median_ms" not in ((gt.get("latency") or {}).get("batch1") or {}):
            v["behind"].append("crashed" if "crash" in gt else "file does not run")
            verdicts[family] = v
            continue
        for a, (fam, _) in TOOLS.items():
            at = tools.get(a) or {}
            if fam != family or a == g or "median_ms" not in ((at.get("latency") or {}).get("batch1") or {}):
                continue
            c: dict[str, Any] = {}
            for which in ("batch1", "batch"):
                gl, al = gt["latency"].get(which), at["latency"].get(which)
                if gl and al:
                    paired, lo, hi = bench_fusion.paired_ratio(gl["runs"], al["runs"])
                    c[which] = {
                        "ratio": gl["median_ms"] / al["median_ms"],
                        "paired": paired,
                        "ci90": [lo, hi],
                    }
            if c.get("batch1", {}).get("ratio", 0) > 1.0:
                lo = c["batch1"]["ci90"][0]
                v["behind"].append(
                    f"latency vs {a} ({c['batch1']['ratio']:.2f}×" + (", within noise)" if lo <= 1.0 else ")")
                )
            c["size_ratio"] = gt["size_mb"] / at["size_mb"] if at.get("size_mb") else None
            if c["size_ratio"] and c["size_ratio"] > SIZE_SLACK:
                v["behind"].append(f"size vs {a} ({c['size_ratio']:.2f}×)")
            gf, af = gt["latency"].get("fidelity") or {}, at["latency"].get("fidelity") or {}
            for m in ("cosine", "accuracy", "embedding_min_cosine"):
                if gf.get(m) is not None and af.get(m) is not None:
                    worse = gf[m] < af[m] - (1e-4 if m != "accuracy" else 0)
                    if worse:
                        v["behind"].append(f"{m} vs {a} ({gf[m]:.4f} < {af[m]:.4f})")
            verdicts[family] = v
            v["anchors"][a] = c
        verdicts[family] = v
    entry["verdicts"] = verdicts


# ---------------------------------------------------------------------------------------------
# Report


def _f(v: Any, spec: str = ".2f") -> str | None:
    return None if v is None else format(v, spec)


def model_table(entry: dict[str, Any]) -> str:
    tools = entry["tools"]
    orig = ((tools.get("original") or {}).get("latency") or {}).get("batch1", {}).get("median_ms")
    orig_n = ((tools.get("original") or {}).get("latency") or {}).get("batch", {}).get("median_ms")
    rows_shape = entry["meta"].get("batch_shape") or {}
    extra_name = _fid_name(entry)
    header = [
        "tool",
        "b1 ms (p90)",
        "speedup b1",
        f"b{_rows(rows_shape)} ms (p90)",
        "rows/s",
        "speedup bN",
        "max abs",
        "cosine",
        "SQNR dB",
        extra_name,
        "MB",
        "opt s",
        "peak MB",
        "vs anchor / behind",
    ]
    rows = []
    for t in TOOLS:
        tt = tools.get(t)
        if tt is None:
            continue
        name = (
            t
            + (f" [{tt['chosen'].split(':', 1)[1]}]" if tt.get("chosen") else "")
            + (" (pre-processed export)" if str(tt.get("input", "")).startswith("export") else "")
        )
        lat = tt.get("latency") or {}
        b1, bn = lat.get("batch1") or {}, lat.get("batch") or {}
        if "crash" in tt or "median_ms" not in b1:
            why = tt.get("crash") or lat.get("error") or entry.get("latency_error") or "not timed"
            rows.append([name, *[None] * 12, "**crash**: " + str(why)[:140]])
            continue
        fid = lat.get("fidelity") or {}
        note = ""
        fam = TOOLS[t][0]
        if t == GRAPHOPT.get(fam):
            v = (entry.get("verdicts") or {}).get(fam) or {}
            cmp = [
                f"{c['batch1']['ratio']:.2f}× {a} (paired {c['batch1']['paired']:.2f}, "
                f"{c['batch1']['ci90'][0]:.2f}–{c['batch1']['ci90'][1]:.2f})"
                for a, c in v.get("anchors", {}).items()
                if "batch1" in c
            ]
            note = "; ".join(cmp)
            if v.get("behind"):
                note += " — **behind**: " + ", ".join(v["behind"])
            elif cmp:
                note += " — not behind"
            if fam == "pruned":
                note = "no anchor (structured FFN/channel pruning); fidelity is the cost"
        extra = fid.get("accuracy", fid.get("embedding_min_cosine"))
        rows.append(
            [
                name,
                f"{b1['median_ms']:.2f} ({b1['p90_ms']:.2f})",
                _ratio(orig, b1["median_ms"]),
                f"{bn['median_ms']:.1f} ({bn['p90_ms']:.1f})" if bn else None,
                _f(bn.get("throughput_per_s"), ".1f"),
                _ratio(orig_n, bn.get("median_ms")),
                "–" if t == "original" else _f(fid.get("max_abs"), ".1e"),
                "–" if t == "original" else _f(fid.get("cosine"), ".5f"),
                "–"
                if t == "original"
                else ("∞" if fid.get("max_abs") == 0 else _f(fid.get("sqnr_db"), ".1f")),
                _f(extra, ".4f"),
                _f(tt.get("size_mb"), ".1f"),
                _f(tt.get("optimize_s")),
                _f(tt.get("peak_mb"), ".0f"),
                note or None,
            ]
        )
    if extra_name is None:  # no labels or sentence metric for this model: drop the empty column
        header.pop(9)
        rows = [r[:9] + r[10:] for r in rows]
    return _bench.markdown_table(header, rows)


def _rows(shape: dict[str, Any]) -> str:
    return str(next(iter(shape.values()))[0]) if shape else "N"


def _fid_name(entry: dict[str, Any]) -> str | None:
    key = entry["meta"]["key"]
    return "accuracy" if key.startswith("digits") else ("sentence min cos" if key == "minilm" else None)


def _ratio(orig: float | None, v: float | None) -> str | None:
    return None if not orig or not v else f"{orig / v:.2f}×"


def genai_table(entry: dict[str, Any]) -> str:
    g = entry.get("genai") or {}
    tools = entry["tools"]
    rows = []
    if "error" in g:
        rows.append(["onnxruntime-genai", None, None, None, None, g["error"]])
    for prec in ("int4", "fp32"):
        e = g.get(prec)
        if not e:
            continue
        rows.append(
            [
                f"onnxruntime-genai {prec} (builder)",
                _f(e.get("tokens_per_s"), ".1f"),
                _f(e.get("decode_tokens_per_s"), ".1f"),
                _f(e.get("prefill_ms")),
                _f(e.get("size_mb"), ".1f"),
                e.get("error") or f"built in {e['build_s']:.0f} s; KV cache, GQA kernel",
            ]
        )
    fwd = g.get("graphopt_forward") or {}
    for t in ("graphopt", "graphopt-int4"):
        f = fwd.get(t) or {}
        rows.append(
            [
                t,
                "n/a",
                "n/a",
                _f(f.get("prompt_forward_ms")),
                _f((tools.get(t) or {}).get("size_mb"), ".1f"),
                f.get("error")
                or "no generation loop: the export has no past-KV inputs (use_cache=False), so "
                f"only one forward of the {GENAI_PROMPT}-token prompt is timed (prefill column; no LM head)",
            ]
        )
    return _bench.markdown_table(
        ["file", "tokens/s (64+128)", "decode tokens/s", "prefill ms", "MB", "note"], rows
    )


def render(results: dict[str, Any], out: Path, stem: str) -> None:
    """suite[_quick].md (summary and plots first, per-model tables after) and the PNGs, from the JSON."""
    env, s = results["environment"], results["settings"]
    ok = {k: v for k, v in results["models"].items() if "tools" in v}
    for e in ok.values():
        summarize(e)
    roof = results.get("roofline") or {}
    if roof.get("peaks"):
        results["roofline"]["fractions"] = bench_roofline.fractions(results, roof["peaks"])
    out.mkdir(parents=True, exist_ok=True)
    plots = _plots(results, out, stem)
    parts = [
        f"# graphopt benchmark suite ({'quick' if s['quick'] else 'full'})\n",
        f"{env['cpu']}, {env['cores']} cores, {env.get('memory_gib')} GiB; onnxruntime "
        f"{env['versions'].get('onnxruntime')}, onnxscript {env['versions'].get('onnxscript')}, onnxsim "
        f"{env['versions'].get('onnxsim')}, onnxruntime-genai {s.get('genai_version')}; {env['date']}. "
        f"Whole run {results.get('wall_s', 0):.0f} s. Command: `{results['command']}`"
        + (f". {s['note']}" if s.get("note") else "")
        + "\n",
        _summary_section(ok),
        "\n".join(f"![{p.stem}]({p.name})" for p in plots) + "\n",
        "<details><summary>How it is measured</summary>\n\n"
        "Latency: ONNX Runtime CPU, ORT_ENABLE_ALL, 2 intra-op threads, spinning off; all files of a model "
        f"open together and timed in interleaved rounds (rotated order): {s['rounds']} rounds at batch 1 "
        f"(sequence {TEXT_SEQ} / {IMAGE}×{IMAGE} images / one digit), {s['batch_rounds']} at the larger batch "
        f"(bN: {BATCH} sequences or images, {DIGITS_BATCH} digits), {WARMUP} warm-ups; median (p90). Speedup is "
        "the export's median / the file's. Fidelity against the export (max abs, worst cosine, worst SQNR over "
        "outputs, on batch 1 and a padded batch 2); accuracy on the digits test split (real labels); MiniLM: worst "
        "cosine of the mean-pooled sentence embeddings over all test sentences. `vs anchor`: graphopt's batch-1 "
        "median / the anchor's in the same family (fp32: ORT optimizer, onnxscript, onnxsim; dynamic / static / "
        "int4: ONNX Runtime's quantizer), with the paired per-round ratio and its bootstrap 90% interval. "
        "**behind** lists every anchor graphopt loses to on latency, size (> 5%) or fidelity — plainly, "
        "including losses inside the noise interval. ORT's quantizers run on the ORT optimizer's file (its "
        "documented flow), or on the export after `quant_pre_process` where that crashes or quantizes nothing "
        "(the notes under each table say so). Calibration (both static quantizers): "
        f"{CALIB_BATCHES} batches of 2 inputs (digits: 8 batches of 32 training images). opt s / peak MB: the "
        "optimize call's wall time and the process peak RSS, each tool in a fresh interpreter. A crash is a "
        "result.\n\n</details>\n",
    ]
    for key, e in results["models"].items():
        if "tools" not in e:
            parts.append(f"## {key}\n\nexport failed: {e.get('export_error')}\n")
            continue
        m = e["meta"]
        desc = (
            f"{m.get('parameters', 0) / 1e6:.1f}M parameters, {m.get('nodes')} export nodes"
            + (f", {m['layers']} layers" if m.get("layers") else "")
            + (
                f", {(m.get('flops') or {}).get('flops', 0) / 1e9:.3g} GFLOP per batch-1 forward"
                if (m.get("flops") or {}).get("flops")
                else ""
            )
            + (
                f"; torch test accuracy {m['torch_test_accuracy']:.4f}"
                if m.get("torch_test_accuracy")
                else ""
            )
            + ("" if e.get("interleaved", True) else "; timed one session at a time (files too large)")
        )
        parts.append(f"## {e['label']}\n\n{desc}.\n\n{model_table(e)}\n")
        notes = [
            f"- {t}: tried first on the " + "; then on the ".join(tt["failed_attempts"])
            for t, tt in e["tools"].items()
            if tt.get("failed_attempts")
        ]
        notes += [f"- {t} crashed: {tt['crash']}" for t, tt in e["tools"].items() if tt.get("crash")]
        if notes:
            parts.append("\n".join(notes) + "\n")
        if e.get("genai"):
            parts.append(
                f"Generation ({GENAI_PROMPT}-token prompt, {GENAI_NEW} new tokens, greedy, batch 1):\n\n"
                + genai_table(e)
                + "\n"
            )
    if roof.get("peaks"):
        parts.append(_roofline_section(roof))
    elif roof.get("error"):
        parts.append(f"## Roofline\n\nn/a: {roof['error']}\n")
    if results.get("scaling"):
        import bench_scaling

        parts.append("## Optimizer time vs depth\n\n" + bench_scaling.table(results["scaling"]) + "\n")
    md = "\n".join(parts)
    _bench.write_json(out / f"{stem}.json", results)
    (out / f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {out / (stem + '.json')}, {out / (stem + '.md')} and {len(plots)} plots")


def _summary_cell(e: dict[str, Any], fam: str) -> str:
    v = (e.get("verdicts") or {}).get(fam)
    t = e["tools"].get(GRAPHOPT[fam]) or {}
    if v is None:
        return "–"
    if "crash" in t:
        return "**crashed** (see notes)"
    lat = t.get("latency") or {}
    o = ((e["tools"].get("original") or {}).get("latency") or {}).get("batch1", {}).get("median_ms")
    b1 = (lat.get("batch1") or {}).get("median_ms")
    fid = lat.get("fidelity") or {}
    bits = []
    if o and b1:
        bits.append(f"{o / b1:.2f}× export")
    q = fid.get("accuracy", fid.get("embedding_min_cosine", fid.get("cosine")))
    if q is not None and fam != "fp32":
        name = "acc" if "accuracy" in fid else ("sent cos" if "embedding_min_cosine" in fid else "cos")
        bits.append(f"{name} {q:.4f}")
    status = (
        ("**behind**: " + ", ".join(v["behind"]))
        if v["behind"]
        else ("no anchor" if fam == "pruned" else "not behind any anchor")
    )
    return " · ".join(bits + [status])


def _summary_section(models: dict[str, Any]) -> str:
    """One row per model, one cell per graphopt mode: speedup over the export, fidelity, and where it is behind."""
    header = ["model", *[f"graphopt {f}" for f in GRAPHOPT]]
    rows = [[e["label"], *[_summary_cell(e, fam) for fam in GRAPHOPT]] for e in models.values()]
    return (
        "## Where graphopt stands\n\nBatch-1 speedup over the export, fidelity (quantized / pruned: worst "
        "cosine, digits accuracy, MiniLM worst sentence cosine) and every anchor graphopt is behind.\n\n"
        + _bench.markdown_table(header, rows)
        + "\n"
    )


def _roofline_section(roof: dict[str, Any]) -> str:
    p = roof["peaks"]
    lines = [
        f"## Roofline\n\nMeasured peaks through ONNX Runtime (2 threads): fp32 MatMul "
        f"{p.get('fp32_peak_gflops') or 0:.1f} GFLOP/s ({p.get('fp32_peak_from')}), int8 "
        f"{p.get('int8_peak_gops') or 0:.1f} GOP/s ({p.get('int8_peak_from')}). Achieved = the export's "
        "MatMul/Gemm/Conv FLOPs per batch-1 forward / the file's median latency, as a fraction of the peak of "
        "its compute type (int8 for quantized files; the pruned file's own, smaller FLOP count).\n"
    ]
    fr = roof.get("fractions") or {}
    tools = [t for t in TOOLS if any(t in f["tools"] for f in fr.values())]
    rows = [
        [k, f"{f['flops'] / 1e9:.3g}", *[_f((f["tools"].get(t) or {}).get("fraction"), ".1%") for t in tools]]
        for k, f in fr.items()
    ]
    lines.append(_bench.markdown_table(["model", "GFLOP", *tools], rows))
    return "\n".join(lines) + "\n"


def _plots(results: dict[str, Any], out: Path, stem: str) -> list[Path]:
    """Speedup per tool per model, speed vs fidelity, size; the scaling plot comes from bench_scaling."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    import math

    models = {k: e for k, e in results["models"].items() if "tools" in e}
    tools = [t for t in TOOLS if t != "original"]
    colors = COLORS
    paths = []

    def speedup(e: dict[str, Any], t: str, which: str = "batch1") -> float | None:
        o = ((e["tools"].get("original") or {}).get("latency") or {}).get(which, {}).get("median_ms")
        v = (((e["tools"].get(t) or {}).get("latency") or {}).get(which) or {}).get("median_ms")
        return o / v if o and v else None

    fig, axes = plt.subplots(2, 1, figsize=(14, 9), sharex=True)
    width = 0.8 / len(tools)
    for ax, which in zip(axes, ("batch1", "batch")):
        for i, t in enumerate(tools):
            xs, ys = [], []
            for j, e in enumerate(models.values()):
                s = speedup(e, t, which)
                if s is not None:
                    xs.append(j + (i - len(tools) / 2) * width)
                    ys.append(s)
            if xs:
                ax.bar(
                    xs,
                    ys,
                    width,
                    label=t,
                    color=colors[t],
                    edgecolor="black" if t.startswith("graphopt") else None,
                    linewidth=1.2,
                )
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_ylabel(f"speedup vs export ({'batch 1' if which == 'batch1' else 'larger batch'})")
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_xticks(range(len(models)), [e["label"] for e in models.values()], rotation=20, ha="right")
    axes[0].legend(ncol=6, fontsize=8, loc="upper left")
    axes[0].set_title(
        "ONNX Runtime CPU latency: speedup over the export (higher is better; graphopt outlined)"
    )
    fig.tight_layout()
    paths.append(out / f"{stem}_speedup.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(12, 6.5))
    markers = "osD^v<>pPX*h"
    for j, e in enumerate(models.values()):
        for t in tools:
            fid = ((e["tools"].get(t) or {}).get("latency") or {}).get("fidelity") or {}
            s = speedup(e, t)
            sq = fid.get("sqnr_db")
            if s is None or fid.get("cosine") is None:
                continue
            y = min(sq, 100.0) if sq is not None else 100.0
            ax.scatter(
                s,
                y,
                color=colors[t],
                marker=markers[j % len(markers)],
                s=60,
                edgecolors="black" if t.startswith("graphopt") else "none",
            )
    shown = {
        t
        for e in models.values()
        for t in tools
        if (((e["tools"].get(t) or {}).get("latency") or {}).get("fidelity") or {}).get("cosine") is not None
    }
    for t in tools:
        if t in shown:
            ax.scatter([], [], color=colors[t], label=t)
    for j, e in enumerate(models.values()):
        ax.scatter([], [], color="grey", marker=markers[j % len(markers)], label=e["label"])
    ax.set_xlabel("speedup over the export, batch 1 (right is faster)")
    ax.set_ylabel("worst SQNR vs the export, dB (up is more faithful; capped at 100)")
    ax.set_title("Speed vs fidelity, every file of every model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=1, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    paths.append(out / f"{stem}_speed_fidelity.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(14, 5))
    for i, t in enumerate(tools):
        xs, ys = [], []
        for j, e in enumerate(models.values()):
            o, v = (e["tools"].get("original") or {}).get("size_mb"), (e["tools"].get(t) or {}).get("size_mb")
            if o and v and "crash" not in e["tools"][t]:
                xs.append(j + (i - len(tools) / 2) * width)
                ys.append(v / o)
        if xs:
            ax.bar(
                xs,
                ys,
                width,
                label=t,
                color=colors[t],
                edgecolor="black" if t.startswith("graphopt") else None,
            )
    ax.set_xticks(range(len(models)), [e["label"] for e in models.values()], rotation=20, ha="right")
    ax.set_ylabel("file size / export's")
    ax.set_ylim(0, max(1.2, ax.get_ylim()[1]) if not math.isnan(ax.get_ylim()[1]) else 1.2)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.legend(ncol=6, fontsize=8)
    ax.set_title("File size relative to the export (lower is smaller)")
    fig.tight_layout()
    paths.append(out / f"{stem}_size.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fr = (results.get("roofline") or {}).get("fractions") or {}
    if fr:
        fig, ax = plt.subplots(figsize=(14, 5))
        for i, t in enumerate(tools):
            xs, ys = [], []
            for j, f in enumerate(fr.values()):
                v = (f["tools"].get(t) or {}).get("fraction")
                if v is not None:
                    xs.append(j + (i - len(tools) / 2) * width)
                    ys.append(v * 100)
            if xs:
                ax.bar(xs, ys, width, label=t, color=colors[t])
        ax.set_xticks(range(len(fr)), [results["models"][k]["label"] for k in fr], rotation=20, ha="right")
        ax.set_ylabel("% of measured GEMM peak (fp32 or int8)")
        ax.set_title("Roofline: achieved fraction of this machine's ONNX Runtime GEMM peak, batch 1")
        ax.legend(ncol=6, fontsize=8)
        fig.tight_layout()
        paths.append(out / f"{stem}_roofline.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    if results.get("scaling"):
        import bench_scaling

        p = bench_scaling.plot(results["scaling"], out / f"{stem}_scaling.png")
        if p:
            paths.append(p)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--quick", action="store_true", help="mini sizes + MiniLM + digits (~10 min; suite_quick.*)"
    )
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--no-scaling", action="store_true", help="skip bench_scaling (optimizer time vs depth)")
    p.add_argument("--no-roofline", action="store_true", help="skip bench_roofline (GEMM peaks)")
    p.add_argument("--re-export", action="store_true", help="export again even if the cache has the model")
    p.add_argument("--keep", action="store_true", help="keep the optimized files in results/tmp/suite/*/out")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker run")
    p.add_argument("--out", type=Path, default=_bench.RESULTS, help="folder for suite[_quick].json/.md/.png")
    p.add_argument(
        "--render", type=Path, metavar="JSON", help="only rebuild Markdown and plots from an earlier JSON"
    )
    p.add_argument("--prepare", nargs=3, metavar=("KEY", "SIZE", "DIR"), help=argparse.SUPPRESS)
    p.add_argument("--optimize", nargs=3, metavar=("SPEC", "MODEL_DIR", "OUT_DIR"), help=argparse.SUPPRESS)
    p.add_argument("--latency", nargs=2, metavar=("MODEL_DIR", "FILES"), help=argparse.SUPPRESS)
    p.add_argument("--genai", nargs=3, metavar=("MODEL_DIR", "OUT", "FILES"), help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=20, help=argparse.SUPPRESS)
    p.add_argument("--batch-rounds", type=int, default=10, help=argparse.SUPPRESS)
    p.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.prepare:
        key, size, folder = args.prepare
        _bench.write_json(args.result_file, prepare(key, size, Path(folder)))
        return 0
    if args.optimize:
        spec, model_dir, out_dir = args.optimize
        _bench.write_json(args.result_file, optimize_one(json.loads(spec), Path(model_dir), Path(out_dir)))
        return 0
    if args.latency:
        model_dir, files = args.latency
        _bench.write_json(
            args.result_file, latency(Path(model_dir), json.loads(files), args.rounds, args.batch_rounds)
        )
        return 0
    if args.genai:
        model_dir, out, files = args.genai
        _bench.write_json(args.result_file, genai(Path(model_dir), Path(out), args.rounds, json.loads(files)))
        return 0
    if args.render:
        results = json.loads(args.render.read_text())
        render(results, args.render.parent, "suite_quick" if results["settings"]["quick"] else "suite")
        return 0

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        p.error(f"unknown models {bad}; use {','.join(MODELS)}")
    size = "mini" if args.quick else "base"
    cache = _bench.TMP / "suite"
    t_start = time.perf_counter()
    genai_version = None
    try:
        from importlib import metadata

        genai_version = metadata.version("onnxruntime-genai")
    except Exception:
        pass
    results: dict[str, Any] = {
        "benchmark": "suite",
        "command": " ".join([Path(sys.executable).name, "benchmarks/suite.py", *(argv or sys.argv[1:])]),
        "environment": _bench.environment(),
        "settings": {
            "quick": args.quick,
            "size": size,
            "rounds": 20 if args.quick else 30,
            "batch_rounds": 10 if args.quick else 15,
            "warmup": WARMUP,
            "batch": BATCH,
            "digits_batch": DIGITS_BATCH,
            "sequence": TEXT_SEQ,
            "image": IMAGE,
            "calibration_batches": CALIB_BATCHES,
            "genai_version": genai_version,
            "intra_op_threads": 2,
            "spinning": False,
        },
        "models": {},
    }
    if not args.no_roofline:
        print("roofline: measuring GEMM peaks ...", flush=True)
        r = _bench.run_worker(
            Path(bench_roofline.__file__),
            ["--quick"] if args.quick else [],
            cache / "roofline.json",
            args.timeout,
        )
        results["roofline"] = {"peaks": r.data.get("peaks")} if r.ok else {"error": r.error}
    for key in models:
        folder = cache / f"{key}-{size}"
        if args.re_export or not (folder / "meta.json").exists():
            print(f"preparing {key} ({size}) ...", flush=True)
            r = _bench.run_worker(
                SCRIPT, ["--prepare", key, size, str(folder)], cache / "prepare.json", args.timeout
            )
            if not r.ok:
                print(f"export of {key} failed: {r.error}", file=sys.stderr)
                results["models"][key] = {"label": key, "export_error": r.error}
                continue
        t0 = time.perf_counter()
        print(f"{key}: optimizing and timing ...", flush=True)
        entry = run_model(key, folder, args)
        entry["wall_s"] = round(time.perf_counter() - t0, 1)
        results["models"][key] = entry
        results["wall_s"] = round(time.perf_counter() - t_start, 1)
        _bench.write_json(
            args.out / ("suite_quick.partial.json" if args.quick else "suite.partial.json"), results
        )
    if not args.no_scaling:
        import bench_scaling

        print("scaling: optimizer time vs depth ...", flush=True)
        results["scaling"] = bench_scaling.run(quick=args.quick, timeout=args.timeout)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    render(results, args.out, "suite_quick" if args.quick else "suite")
    for f in ("suite_quick.partial.json", "suite.partial.json"):
        (args.out / f).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
