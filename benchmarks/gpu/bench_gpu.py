"""GPU latency of graphopt's ort-cuda and tensorrt outputs vs the export and ONNX Runtime's own tools.

Why: the two GPU targets are only worth having if their files run faster on the CUDA / TensorRT
execution providers than the plain export, and at least as fast as what ONNX Runtime's own tools make
from the same export at their best settings:

* **ort-cuda** (fp16): ``graphopt.optimize(path, "ort-cuda")`` (contrib fusions + convert-float16, fp32
  I/O) vs ``onnxruntime.transformers.optimizer.optimize_model(..., use_gpu=True)`` followed by
  ``convert_float_to_float16(keep_io_types=True)`` (every model type that applies; the fastest is the
  anchor; CNNs get ORT's fp16 converter alone), vs the export in fp32.
* **tensorrt** (fp16 builder flag): graphopt's tensorrt file and settings vs the export with the same
  TensorRT options. With ``--int8``: graphopt ``quantize=static`` (placement tensorrt) vs ORT's
  ``quantize_static`` in QDQ format with symmetric int8 activations and per-channel int8 weights
  (TensorRT's explicit-quantization recipe), both calibrated on the same batches.

Every file runs through the settings graphopt writes (``graphopt.backends.base.load_session``) or
the same provider options for the anchors; engines are built once (build time reported) into a
temporary cache. Latency: warm-up, then ``--runs`` interleaved rounds (every variant once per round,
rotated order), median / p90 in ms, ratios to the export and to the best anchor. Fidelity: cosine and
max |error| of every file's outputs against the export run in fp32 on the CPU provider.

    python benchmarks/gpu/bench_gpu.py --quick            # "mini" models, a few minutes on one GPU
    python benchmarks/gpu/bench_gpu.py --models bert,resnet --int8 --runs 100
    python benchmarks/gpu/bench_gpu.py --cpu-check        # code-path check on a CPU-only machine
                                                          # (NOT a GPU measurement; writes results/tmp)

On a machine without the CUDA / TensorRT providers it stops with a message saying what to install.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import _bench  # noqa: E402

MODELS = ("bert", "gpt2", "llama", "vit", "resnet")
ORT_TYPES = {
    "bert": ["bert"],
    "gpt2": ["gpt2"],
    "llama": ["gpt2", "bert"],
    "vit": ["vit", "bert"],
    "resnet": [],
}
TEXT_SEQ = 128
IMAGE = 224


def _providers() -> set[str]:
    import onnxruntime as ort

    return set(ort.get_available_providers())


def _heads_hidden(config: Any) -> tuple[int, int]:
    for heads, hidden in (("num_attention_heads", "hidden_size"), ("n_head", "n_embd")):
        h, d = getattr(config, heads, None), getattr(config, hidden, None)
        if isinstance(h, int) and isinstance(d, int):
            return h, d
    return 0, 0


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


# ---------------------------------------------------------------------------------------------
# files


def graphopt_file(src: Path, out: Path, target: str, **kw: Any) -> dict[str, Any]:
    import graphopt

    t0 = time.perf_counter()
    result = graphopt.optimize(str(src), target=target, **kw)
    graphopt.save(result.model, out)
    return {"optimize_s": round(time.perf_counter() - t0, 2), "pipeline": result.report.pipeline}


def ort_fp16_file(
    src: Path, out: Path, model_type: str | None, heads: int, hidden: int, opt_level: int = 0
) -> dict[str, Any]:
    """ORT's transformers optimizer for the GPU, then its fp16 converter (fp32 I/O), as its docs show."""
    import onnx
    from onnxruntime.transformers import float16
    from onnxruntime.transformers.optimizer import optimize_model

    t0 = time.perf_counter()
    if model_type:
        opt = optimize_model(
            str(src),
            model_type=model_type,
            num_heads=heads,
            hidden_size=hidden,
            opt_level=opt_level,
            use_gpu=True,
        )
        opt.convert_float_to_float16(keep_io_types=True)
        opt.save_model_to_file(str(out), use_external_data_format=True)
    else:
        proto = onnx.load(str(src))
        proto = float16.convert_float_to_float16(proto, keep_io_types=True)
        onnx.save(proto, str(out), save_as_external_data=True)
    return {
        "optimize_s": round(time.perf_counter() - t0, 2),
        "model_type": model_type,
        "opt_level": opt_level,
    }


def ort_qdq_file(src: Path, out: Path, calib: list[dict[str, Any]]) -> dict[str, Any]:
    """ORT quantize_static, QDQ, symmetric int8 activations and per-channel int8 weights (TensorRT's recipe)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(calib)

        def get_next(self) -> dict[str, Any] | None:
            return next(self.it, None)

    pre = out.with_name("pre.onnx")
    t0 = time.perf_counter()
    quant_pre_process(
        str(src), str(pre), skip_symbolic_shape=True, save_as_external_data=True, all_tensors_to_one_file=True
    )
    quantize_static(
        str(pre),
        str(out),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        use_external_data_format=True,
        extra_options={
            "ActivationSymmetric": True,
            "WeightSymmetric": True,
            "QuantizeBias": False,
            "DedicatedQDQPair": False,
        },
    )
    return {"optimize_s": round(time.perf_counter() - t0, 2)}


# ---------------------------------------------------------------------------------------------
# sessions and timing


def has_qdq(path: Path) -> bool:
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in proto.graph.node)


def make_session(path: Path, target: str, settings_from: Path | None, cache: Path, cpu_check: bool) -> Any:
    """A session for ``path`` configured by graphopt's settings file of the same model (the anchors
    run with the same provider options, so only the file differs); int8 on where the file has Q/DQ."""
    from graphopt.backends.base import load_settings, session_from_settings, settings_path

    if settings_from is None or not Path(settings_path(settings_from)).exists():
        raise RuntimeError(f"no graphopt settings for {target} to run {path.name} with")
    doc = json.loads(json.dumps(load_settings(settings_path(settings_from))))
    for name, opts in doc["providers"]:
        for key in ("trt_engine_cache_path", "trt_timing_cache_path"):
            if key in opts:
                opts[key] = str(cache / target / path.parent.name)
        if name == "TensorrtExecutionProvider":
            opts["trt_int8_enable"] = has_qdq(path)
    if cpu_check:
        doc["providers"] = [["CPUExecutionProvider", {}]]
    logging.getLogger("graphopt.backends").setLevel(logging.ERROR if cpu_check else logging.WARNING)
    t0 = time.perf_counter()
    session = session_from_settings(str(path), doc, base_dir=path.parent)
    build_s = time.perf_counter() - t0
    want = doc["providers"][0][0]
    if session.get_providers()[0] != want:
        raise RuntimeError(f"{path.name}: session runs on {session.get_providers()} instead of {want}")
    return session, round(build_s, 2)


def fidelity(ref: list[Any], got: list[Any]) -> dict[str, Any]:
    import numpy as np

    cos, err = 1.0, 0.0
    for r, g in zip(ref, got):
        r64, g64 = np.asarray(r, np.float64).ravel(), np.asarray(g, np.float64).ravel()
        if r64.size == 0:
            continue
        err = max(err, float(np.abs(r64 - g64).max()))
        denom = float(np.linalg.norm(r64) * np.linalg.norm(g64)) or 1.0
        cos = min(cos, float(np.dot(r64, g64) / denom))
    return {"cosine": round(cos, 6), "max_abs": float(f"{err:.3g}")}


def runner(session: Any, feeds: dict[str, Any], io_binding: bool, device: str) -> Any:
    """A no-argument callable that runs ``session`` once: plain ``run`` (host arrays in and out, as
    most callers use it) or IO binding with inputs and outputs resident on ``device``."""
    if not io_binding:
        return lambda: session.run(None, feeds)
    import onnxruntime as ort

    binding = session.io_binding()
    for name, arr in feeds.items():
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(arr, device, 0))
    for out in session.get_outputs():
        binding.bind_output(out.name, device, 0)
    return lambda: session.run_with_iobinding(binding)


def interleaved(runners: dict[str, Any], runs: int, warmup: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in runners}
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    for i in range(runs):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            t0 = time.perf_counter()
            runners[name]()
            times[name].append((time.perf_counter() - t0) * 1000)
    return times


def stats(ms: list[float]) -> dict[str, float]:
    import numpy as np

    return {"median_ms": round(float(np.median(ms)), 3), "p90_ms": round(float(np.percentile(ms, 90)), 3)}


# ---------------------------------------------------------------------------------------------
# one model


def run_model(kind: str, size: str, work: Path, args: argparse.Namespace, have: set[str]) -> dict[str, Any]:
    import numpy as np

    from graphopt.verify import run_model as run_cpu

    built, src, export_s = _bench.export_model(kind, size, work / "export")
    image = kind in ("vit", "resnet")
    seq = args.image if image else args.seq
    if image:  # an export with a fixed image size (ResNet) takes that size
        import graphopt

        dim = graphopt.load(str(src)).graph.inputs[0].shape[2]
        seq = dim if isinstance(dim, int) else seq
    feeds = built.feeds(args.batch, seq, seed=0)
    calib = [built.feeds(args.batch, seq, seed=s) for s in range(1, 1 + args.calibration_batches)]
    reference = [v for _, v in run_cpu(str(src), feeds)]
    heads, hidden = _heads_hidden(built.config) if built.config is not None else (0, 0)
    entry: dict[str, Any] = {
        "kind": kind,
        "size": size,
        "batch": args.batch,
        "seq_or_image": seq,
        "io_binding": args.io_binding,
        "export_s": round(export_s, 2),
        "targets": {},
    }
    cache = work / "trt_cache"
    targets = []
    if "CUDAExecutionProvider" in have or args.cpu_check:
        targets.append("ort-cuda")
    if "TensorrtExecutionProvider" in have or args.cpu_check:
        targets.append("tensorrt")
    for target in targets:
        files: dict[str, dict[str, Any]] = {"export (fp32)": {"path": src}}
        out = work / target
        shutil.rmtree(out, ignore_errors=True)
        (out / "graphopt").mkdir(parents=True)
        gpath = out / "graphopt" / "model.onnx"
        try:
            files["graphopt"] = {"path": gpath, **graphopt_file(src, gpath, target)}
        except Exception as e:
            files["graphopt"] = {"error": _one_line(e)}
        if target == "ort-cuda":
            levels = [int(x) for x in args.ort_opt_levels.split(",")]
            for mt, level in [(mt, lv) for mt in ORT_TYPES[kind] for lv in levels] or [(None, 0)]:
                name = f"ort optimizer {mt} O{level} + fp16" if mt else "ort fp16 converter"
                (out / _slug(name)).mkdir()
                p = out / _slug(name) / "anchor.onnx"
                try:
                    files[name] = {
                        "path": p,
                        "anchor": True,
                        **ort_fp16_file(src, p, mt, heads, hidden, level),
                    }
                except Exception as e:
                    files[name] = {"anchor": True, "error": _one_line(e)}
        elif args.int8:
            (out / "graphopt_int8").mkdir()
            p = out / "graphopt_int8" / "model.onnx"
            try:
                files["graphopt int8"] = {
                    "path": p,
                    **graphopt_file(src, p, target, quantize="static", calibration=calib),
                }
            except Exception as e:
                files["graphopt int8"] = {"error": _one_line(e)}
            (out / "ort_qdq_int8").mkdir()
            p = out / "ort_qdq_int8" / "anchor.onnx"
            try:
                files["ort quantize_static int8"] = {"path": p, "anchor": True, **ort_qdq_file(src, p, calib)}
            except Exception as e:
                files["ort quantize_static int8"] = {"anchor": True, "error": _one_line(e)}
        sessions = {}
        for name, info in files.items():
            if "path" not in info or "error" in info:
                continue
            own = gpath if gpath.exists() else None
            try:
                sessions[name], info["session_build_s"] = make_session(
                    info["path"], target, own, cache, args.cpu_check
                )
                info["fidelity"] = fidelity(reference, sessions[name].run(None, feeds))
            except Exception as e:
                info["error"] = _one_line(e)
        device = "cpu" if args.cpu_check else "cuda"
        times = interleaved(
            {n: runner(sess, feeds, args.io_binding, device) for n, sess in sessions.items()},
            args.runs,
            args.warmup,
        )
        base = stats(times["export (fp32)"])["median_ms"] if "export (fp32)" in times else None
        anchors = [n for n in times if files[n].get("anchor")]
        best_anchor = min(anchors, key=lambda n: np.median(times[n])) if anchors else None
        for name, ms in times.items():
            files[name].update(stats(ms))
            med = files[name]["median_ms"]
            files[name]["vs_export"] = round(base / med, 3) if base else None
            if best_anchor:
                files[name]["vs_best_anchor"] = round(float(np.median(times[best_anchor])) / med, 3)
        for info in files.values():
            info.pop("path", None)
        entry["targets"][target] = {"variants": files, "best_anchor": best_anchor}
    return entry


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# GPU latency: graphopt ort-cuda / tensorrt vs ONNX Runtime's tools\n",
        f"{results['note']}\n",
        f"Environment: `{json.dumps(results['environment'].get('gpu'))}`, "
        f"onnxruntime {results['environment']['versions'].get('onnxruntime')}\n",
    ]
    for entry in results["models"]:
        if entry.get("error"):
            lines.append(f"\n## {entry['kind']} ({entry['size']}): failed: {entry['error']}\n")
        for target, t in entry["targets"].items():
            lines.append(
                f"\n## {entry['kind']} ({entry['size']}), {target}, batch {entry['batch']}, "
                f"{'image' if entry['kind'] in ('vit', 'resnet') else 'seq'} {entry['seq_or_image']}\n"
            )
            rows = []
            for name, v in t["variants"].items():
                f = v.get("fidelity") or {}
                rows.append(
                    [
                        name,
                        v.get("median_ms"),
                        v.get("p90_ms"),
                        v.get("vs_export"),
                        v.get("vs_best_anchor"),
                        f.get("cosine"),
                        f.get("max_abs"),
                        v.get("session_build_s"),
                        v.get("error"),
                    ]
                )
            lines.append(
                _bench.markdown_table(
                    [
                        "file",
                        "median ms",
                        "p90 ms",
                        "speed-up vs export",
                        "vs best anchor",
                        "cosine",
                        "max |err|",
                        "session/engine build s",
                        "error",
                    ],
                    rows,
                )
            )
    return "\n".join(lines) + "\n"


def gpu_name() -> str | None:
    import subprocess

    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--quick", action="store_true", help="'mini' models, 20 rounds (writes gpu_quick.*)")
    p.add_argument(
        "--size", default=None, help="model size: tiny | mini | base (default base; mini with --quick)"
    )
    p.add_argument(
        "--runs", type=int, default=None, help="interleaved latency rounds (default 50; 20 with --quick)"
    )
    p.add_argument("--warmup", type=int, default=10, help="untimed runs per file before timing")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seq", type=int, default=TEXT_SEQ, help="token sequence length of text models")
    p.add_argument("--image", type=int, default=IMAGE, help="image side of vision models")
    p.add_argument(
        "--int8", action="store_true", help="also TensorRT int8: graphopt quantize=static vs ORT QDQ"
    )
    p.add_argument(
        "--io-binding",
        action="store_true",
        help="inputs/outputs bound on the GPU (no host copies in the timing)",
    )
    p.add_argument("--calibration-batches", type=int, default=8)
    p.add_argument(
        "--ort-opt-levels", default="0,2", help="opt_level values of ORT's optimizer to try (anchor: fastest)"
    )
    p.add_argument("--out", type=Path, default=_bench.RESULTS, help="folder for gpu.json / gpu.md")
    p.add_argument(
        "--cpu-check",
        action="store_true",
        help="run every step on the CPU provider with tiny models to check the script (no GPU numbers)",
    )
    args = p.parse_args(argv)
    have = _providers()
    if not args.cpu_check and not ({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & have):
        print(
            "bench_gpu: this onnxruntime build has no CUDAExecutionProvider or TensorrtExecutionProvider "
            f"(available: {', '.join(sorted(have))}). Run on a machine with an NVIDIA GPU after "
            "`pip install onnxruntime-gpu==<the onnxruntime version in pyproject.toml>` (replacing onnxruntime; "
            "TensorRT also needs the TensorRT libraries on LD_LIBRARY_PATH). Nothing was measured.",
            file=sys.stderr,
        )
        return 2
    size = args.size or ("tiny" if args.cpu_check else "mini" if args.quick else "base")
    runs = args.runs or (3 if args.cpu_check else 20 if args.quick else 50)
    args.runs = runs
    if args.cpu_check:
        args.warmup = 1
        args.seq, args.image = 16, 32
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        p.error(f"unknown models {unknown}; choose from {','.join(MODELS)}")
    work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    env = _bench.environment()
    env["gpu"] = gpu_name()
    env["providers"] = sorted(have)
    results: dict[str, Any] = {
        "note": (
            "CPU code-path check only: every file ran on the CPU provider; these are NOT GPU numbers."
            if args.cpu_check
            else "Interleaved medians; ratios > 1 mean faster than the export / the best ONNX Runtime anchor."
        ),
        "environment": env,
        "size": size,
        "runs": runs,
        "io_binding": args.io_binding,
        "models": [],
    }
    try:
        for kind in models:
            print(f"[bench_gpu] {kind} ({size})", flush=True)
            try:
                results["models"].append(run_model(kind, size, work / kind, args, have))
            except Exception as e:  # a crash is a result
                results["models"].append({"kind": kind, "size": size, "error": _one_line(e), "targets": {}})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = args.out / "tmp" if args.cpu_check else args.out
    stem = "gpu_cpu_check" if args.cpu_check else "gpu_quick" if args.quick else "gpu"
    _bench.write_json(out / f"{stem}.json", results)
    (out / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out / (stem + '.json')} and {out / (stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
