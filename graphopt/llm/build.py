"""``graphopt llm build``: a causal LM in, an onnxruntime-genai folder out, through graphopt's pipeline.

source (folder / .gguf / model) → export with KV cache → ``graphopt.optimize`` (the target's own
pipeline: cleanup, fusion, weight-only quantization, lowering; the same passes as any
``graphopt optimize``) → package (model.onnx, genai_config.json, tokenizer, build report).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError

from .export import decoder_shape, export_decoder
from .package import MARKER, check_destination, genai_config, write_folder, write_json
from .prefill import pipeline_config, write_prefill_model
from .source import ARCHITECTURES, load_source

__all__ = ["PRECISIONS", "TARGETS", "BuildResult", "build", "calibration_feeds"]

logger = logging.getLogger("graphopt.llm")

PRECISIONS = ("fp32", "fp16", "int8", "int4")
#: target → onnxruntime-genai provider name.
TARGETS = {"ort-cpu": "cpu", "ort-cuda": "cuda"}
#: Calibration text is cut into windows of this many tokens, at most this many windows.
CALIBRATION_WINDOW = 256
CALIBRATION_WINDOWS = 16
#: int4 mixed precision: this fraction of the all-int4 weight bytes may go to 8-bit weights,
#: the ones whose 4-bit round trip moves the last-token logits most per extra byte (after what
#: block offsets for weights already on a 4-bit grid take: those are exact and stay 4-bit).
INT8_BUDGET = 0.17
#: (sequences, tokens) of the batch that sensitivity is measured on.
SENSITIVITY_BATCH = (8, 32)


@dataclasses.dataclass
class BuildResult:
    """Where the build went and what it did (``report`` is also saved in the folder)."""

    out_dir: Path
    report: dict[str, Any]
    model: ir.Model


def _check_request(precision: str, target: str) -> None:
    if target not in TARGETS:
        raise GraphoptError(f"llm build target {target!r} is unknown; use one of {', '.join(TARGETS)}")
    if precision not in PRECISIONS:
        raise GraphoptError(f"precision {precision!r} is unknown; use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and target != "ort-cuda":
        raise GraphoptError(
            "fp16 is for --target ort-cuda (ONNX Runtime's CPU kernels are float32 or int4/int8)"
        )


def _read_text(path: Path) -> str:
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise GraphoptError(f"calibration folder {path} has no .txt files")
        return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    if not path.is_file():
        raise GraphoptError(f"calibration text {path} does not exist")
    return path.read_text(encoding="utf-8", errors="replace")


def calibration_feeds(
    text: str,
    tokenizer: Any,
    model: ir.Model,
    window: int = CALIBRATION_WINDOW,
    windows: int = CALIBRATION_WINDOWS,
    vocab_size: int | None = None,
) -> list[dict[str, np.ndarray]]:
    """Tokenized text as decoder feeds: windows of ``window`` tokens, an empty KV cache each."""
    return window_feeds(text_ids(text, tokenizer, vocab_size), model, window, windows)


def text_ids(text: str, tokenizer: Any, vocab_size: int | None = None) -> np.ndarray:
    """The calibration text's token ids (1-D), checked against the model's vocabulary."""
    if tokenizer is None:
        raise GraphoptError("calibration text needs a tokenizer, and this source has none")
    ids = np.asarray(tokenizer(text)["input_ids"], dtype=np.int64).reshape(-1)
    if vocab_size is not None and ids.size and int(ids.max()) >= vocab_size:
        raise GraphoptError(
            f"the tokenizer gives token ids up to {int(ids.max())} but the model's vocabulary has "
            f"{vocab_size}: tokenizer and model do not belong together"
        )
    if ids.size < 8:
        raise GraphoptError(f"the calibration text has {ids.size} tokens; give at least a paragraph of text")
    return ids


def window_feeds(
    ids: np.ndarray, model: ir.Model, window: int = CALIBRATION_WINDOW, windows: int = CALIBRATION_WINDOWS
) -> list[dict[str, np.ndarray]]:
    """Token ids cut into decoder feeds of ``window`` tokens (at most ``windows`` of them)."""
    feeds: list[dict[str, np.ndarray]] = []
    for start in range(0, min(ids.size, window * windows), window):
        chunk = ids[start : start + window][None, :]
        if chunk.shape[1] < 8:
            break
        feeds.append(token_feeds(chunk, model))
    return feeds


def token_feeds(ids: np.ndarray, model: ir.Model) -> dict[str, np.ndarray]:
    """Decoder feeds for token ids ``[batch, tokens]``: full attention mask, positions from 0 and
    an empty KV cache."""
    b, n = ids.shape
    feeds: dict[str, np.ndarray] = {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((b, n), dtype=np.int64),
        "position_ids": np.tile(np.arange(n, dtype=np.int64), (b, 1)),
    }
    for value in model.graph.inputs:
        name = value.name or ""
        if name.startswith("past_key_values.") and value.shape is not None:
            dims = [d if isinstance(d, int) else 0 for d in value.shape]
            dims[0] = b
            feeds[name] = np.zeros(dims, dtype=np.float32)
    return feeds


def sensitivity_feeds(
    model: ir.Model, vocab_size: int, ids: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """The batch mixed precision measures on: :data:`SENSITIVITY_BATCH` sequences, cut from the
    calibration text's token ids when given, else seeded random ids. The exported decoder computes
    the last position's logits only, so sequences, not tokens, are what the measurement needs;
    random ids measured as well as English text on SmolLM2 (the ranking is what counts)."""
    b, n = SENSITIVITY_BATCH
    if ids is not None and ids.size >= b * n:
        chunk = ids[: b * n].reshape(b, n)
    else:
        chunk = np.random.default_rng(0).integers(0, vocab_size, (b, n))
    return token_feeds(chunk, model)


#: What ``precision`` asks of the weight-only quantizer (its defaults otherwise: symmetric int4,
#: block size 32, the tied table stored once). Asymmetric int4 (``symmetric=false``) was tried as
#: the default and measured slightly worse on SmolLM2 for more bytes (benchmarks/README.md).
_PRECISION_QUANTIZE: dict[str, dict[str, Any]] = {
    "int4": {
        "mode": "int4",
        "int8_budget": INT8_BUDGET,
        "mixed_batches": 1,
        "mixed_outputs": ["logits"],
        "mixed_metric": "kl",
        # A GGUF Q4_1-style source keeps its own 4-bit grid exactly; other weights are unchanged.
        "block_offsets": "on-grid",
    },
    "int8": {"mode": "int8-weight"},
}


def _quantize_request(
    precision: str, group_size: int | None, options: dict[str, Any] | None
) -> dict[str, Any] | None:
    if precision not in _PRECISION_QUANTIZE:
        if options:
            raise GraphoptError(f"quantize options apply to int4 and int8, not to {precision}")
        return None
    request = dict(_PRECISION_QUANTIZE[precision])
    if group_size:
        request["block_size"] = group_size
    for key in options or {}:
        if key == "mode":
            raise GraphoptError(
                "the quantization mode follows --precision; do not set it as a quantize option"
            )
    request.update(options or {})
    return request


def build(
    src: Any,
    out_dir: str | os.PathLike,
    *,
    precision: str = "int4",
    target: str = "ort-cpu",
    calibration: str | os.PathLike | Iterable[dict[str, Any]] | None = None,
    full_logits: bool = False,
    group_size: int | None = None,
    quantize_options: dict[str, Any] | None = None,
    tokenizer: Any = None,
    report_path: str | os.PathLike | None = None,
    prefill: str = "same",
) -> BuildResult:
    """Build an onnxruntime-genai decoder folder from ``src`` (folder, .gguf path or model).

    ``precision``: fp32, fp16 (ort-cuda), int8 or int4 weight-only (MatMulNBits);
    ``quantize_options``: further options of the ``quantize`` pass (e.g. ``{"symmetric": True}``,
    ``{"method": "awq"}``, ``{"min_cosine": 0.999}``).
    ``calibration``: a text file or a folder of .txt files (tokenized into windows), or feed dicts;
    with it, int4 is data-aware. ``full_logits`` keeps logits for every position (perplexity
    evaluation needs them); by default only the last position's are computed, which is all that
    generation reads. ``prefill="int8"`` (int4 on ort-cpu, experimental) adds a prompt model whose
    projections run as int8 GEMMs on the int4 model's own bytes, in onnxruntime-genai's decoder
    pipeline (:mod:`.prefill`); ``"same"`` runs the prompt on the int4 model. Nothing is written
    until the build succeeded.
    """
    started = time.perf_counter()
    _check_request(precision, target)
    if prefill not in ("same", "int8"):
        raise GraphoptError(f"prefill must be 'same' or 'int8', not {prefill!r}")
    if prefill == "int8" and (precision != "int4" or target != "ort-cpu"):
        raise GraphoptError(
            "prefill int8 is for int4 builds on ort-cpu; drop --prefill or use --precision int4"
        )
    quantize = _quantize_request(precision, group_size, quantize_options)
    if calibration is not None and quantize is None:
        raise GraphoptError(
            f"calibration data is for int4/int8 builds; precision {precision} does not use it"
        )
    method = (quantize or {}).get("method", "auto")
    if calibration is None and method not in ("auto", "rtn"):
        raise GraphoptError(f"quantize method {method} needs calibration text: give --calibration")
    check_destination(out_dir)
    text = _read_text(Path(calibration)) if isinstance(calibration, (str, os.PathLike)) else None
    source = load_source(src, tokenizer)
    config = source.model.config
    shape = decoder_shape(config)
    t0 = time.perf_counter()
    exported = export_decoder(source.model, last_token_logits=not full_logits)
    export_s = time.perf_counter() - t0

    feeds: Any = calibration
    ids = None
    if text is not None:
        ids = text_ids(text, source.tokenizer, shape.vocab_size)
        feeds = window_feeds(ids, exported)
    if quantize is not None and quantize.get("int8_budget", 0) > 0:
        # Mixed precision measures on one wide batch first; GPTQ reads it as calibration rows too.
        wide = sensitivity_feeds(exported, shape.vocab_size, ids)
        if feeds is None:
            feeds = [wide]
            quantize["method"] = "rtn"  # the batch is for the measurement, not for GPTQ
        else:
            feeds = [wide, *feeds]
    # onnxruntime-genai feeds attention_mask in GroupQueryAttention's convention: declaring it lets
    # the decoder attention (with the KV cache) fuse to GroupQueryAttention.
    target_options: dict[str, Any] = {"padding_mask": ["attention_mask"]}
    if target == "ort-cuda":
        target_options["precision"] = "float16" if precision == "fp16" else "float32"

    import graphopt

    result = graphopt.optimize(
        exported,
        target=target,
        quantize=quantize,
        calibration=feeds if quantize else None,
        target_options=target_options,
    )
    model = result.model
    genai = genai_config(
        model,
        shape,
        ARCHITECTURES[source.model_type],
        config,
        source.generation_config,
        provider=TARGETS[target],
    )
    report: dict[str, Any] = {
        "source": source.name,
        "architecture": source.model_type,
        "precision": precision,
        "target": target,
        "full_logits": full_logits,
        "prefill": prefill,
        "calibration": None if calibration is None else (len(feeds) if isinstance(feeds, list) else "feeds"),
        "export_s": round(export_s, 3),
        "pipeline": result.report.to_dict(),
    }

    def write(tmp: Path) -> None:
        graphopt.save(model, tmp / "model.onnx", external_data="model.onnx.data")
        config_out = genai
        if prefill == "int8":
            report["prefill_int8_projections"] = write_prefill_model(tmp, shape.vocab_size)
            if report["prefill_int8_projections"]:
                config_out = pipeline_config(genai, tmp)
        write_json(tmp / "genai_config.json", config_out)
        if source.tokenizer is not None:
            source.tokenizer.save_pretrained(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        report["files"] = files
        report["build_s"] = round(time.perf_counter() - started, 3)
        write_json(tmp / MARKER, report)

    out = write_folder(out_dir, write)
    if report_path is not None:
        write_json(Path(report_path), report)
    return BuildResult(out, report, model)
