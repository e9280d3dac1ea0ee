"""End-to-end demo: a real (small) BERT → ONNX → graphopt for ort-cpu (fp32, and dynamic int8) →
verified → before/after table.

Run with `make demo`. The model is transformers' BertModel built from a config with random
weights (no download), exported with graphopt.export (torch dynamo exporter).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

import graphopt
from graphopt.cli import inspect_model


def build_bert():
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        vocab_size=30522,
        max_position_embeddings=512,
    )
    model = BertModel(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, 128))
    mask = torch.ones_like(ids)
    batch, seq = torch.export.Dim("batch", max=64), torch.export.Dim("sequence", max=512)
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    return graphopt.export(model, (), kwargs={"input_ids": ids, "attention_mask": mask}, dynamic_shapes=dyn)


def latency_ms(path: str, feeds: dict, runs: int = 30) -> float:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    for _ in range(5):
        s.run(None, feeds)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        s.run(None, feeds)
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def main() -> int:
    out_dir = tempfile.mkdtemp(prefix="graphopt-demo-")
    src = os.path.join(out_dir, "bert.onnx")
    dst = os.path.join(out_dir, "bert.opt.onnx")
    q8 = os.path.join(out_dir, "bert.int8.onnx")
    report = os.path.join(out_dir, "report.json")
    print("exporting a 4-layer BERT (random weights) with graphopt.export ...")
    graphopt.save(build_bert(), src)
    cmd = [
        sys.executable,
        "-m",
        "graphopt.cli",
        "optimize",
        src,
        "-o",
        dst,
        "--target",
        "ort-cpu",
        "--verify",
        "--report",
        report,
        "--dim",
        "batch=1",
        "--dim",
        "sequence=128",
    ]
    print("$ graphopt " + " ".join(cmd[3:]))
    rc = subprocess.call(cmd)
    if rc != 0:
        print(f"graphopt optimize failed with exit code {rc}")
        return rc
    cmd = [
        sys.executable,
        "-m",
        "graphopt.cli",
        "optimize",
        src,
        "-o",
        q8,
        "--quantize",
        "dynamic",
        "--verify",
        "--dim",
        "batch=1",
        "--dim",
        "sequence=128",
    ]
    print("\n$ graphopt " + " ".join(cmd[3:]))
    rc = subprocess.call(cmd)
    if rc != 0:
        print(f"graphopt optimize --quantize dynamic failed with exit code {rc}")
        return rc
    before, after, int8 = (inspect_model(graphopt.load(p)) for p in (src, dst, q8))
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, 30522, (1, 128), dtype=np.int64),
        "attention_mask": np.ones((1, 128), dtype=np.int64),
    }
    # Interleaved rounds so that machine noise hits every file alike; medians.
    lat = [[latency_ms(p, feeds) for p in (src, dst, q8)] for _ in range(3)]
    ms = [round(float(np.median([r[i] for r in lat])), 2) for i in range(3)]
    shape_ops = ("Shape", "Gather", "Concat", "Unsqueeze")
    infos = (before, after, int8)
    rows = [
        ("nodes", *(i["nodes"] for i in infos)),
        ("distinct ops", *(len(i["ops"]) for i in infos)),
        ("parameters", *(i["parameters"] for i in infos)),
        ("weights MB", *(round(i["weight_bytes"] / 1e6, 2) for i in infos)),
        ("Shape/Gather/Concat/Unsqueeze nodes", *(sum(i["ops"].get(k, 0) for k in shape_ops) for i in infos)),
        ("ORT CPU latency ms (median, 2 threads)", *ms),
    ]
    print(f"\n| {'':40} | {'export':>10} | {'graphopt':>10} | {'int8':>10} |")
    print(f"|{'-' * 42}|{'-' * 12}|{'-' * 12}|{'-' * 12}|")
    for name, a, b, c in rows:
        print(f"| {name:40} | {a:>10} | {b:>10} | {c:>10} |")
    print(f"\nfiles in {out_dir}: bert.onnx, bert.opt.onnx, bert.int8.onnx (+ .settings.json), report.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
