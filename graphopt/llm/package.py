"""The folder onnxruntime-genai loads: ``model.onnx`` (+ external data), ``genai_config.json``, tokenizer.

The folder is written whole or not at all: everything goes into a temporary folder beside the
destination, which replaces the destination only when complete. A destination that exists must be
an earlier graphopt build (it carries :data:`MARKER`); any other folder is refused, never
overwritten, because it may hold a user's files.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx_ir as ir

from graphopt.errors import GraphoptError

from .export import DecoderShape

__all__ = ["MARKER", "check_destination", "genai_config", "write_folder"]

#: The file that marks a folder as graphopt's own build output (it also holds the build report).
MARKER = "graphopt_build.json"

#: ONNX Runtime contrib ops that keep the KV cache in one buffer of the context's length, so that
#: genai may share the past and present buffers (``past_present_share_buffer``).
_SHARED_BUFFER_OPS = frozenset({"GroupQueryAttention"})


def check_destination(out_dir: str | os.PathLike) -> Path:
    """Refuse an output folder that exists and is not an earlier build (nothing is written)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise GraphoptError(f"{out} exists and is not a folder; choose a new output folder")
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise GraphoptError(
            f"{out} exists and is not a graphopt llm build; choose a new or empty folder (nothing was written)"
        )
    if not out.resolve().parent.is_dir():
        raise GraphoptError(f"the folder {out.resolve().parent} does not exist; create it first")
    return out


def _token_id(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value] if len(value) != 1 else int(value[0])
    return None if value is None else int(value)


def genai_config(
    model: ir.Model,
    shape: DecoderShape,
    model_type: str,
    config: Any,
    generation_config: Any,
    *,
    provider: str,
    filename: str = "model.onnx",
) -> dict[str, Any]:
    """genai_config.json for ``model``: its I/O names, sizes, special tokens and search defaults."""
    gen = generation_config
    bos = _token_id(getattr(gen, "bos_token_id", None) or getattr(config, "bos_token_id", None))
    eos = _token_id(getattr(gen, "eos_token_id", None) or getattr(config, "eos_token_id", None))
    pad = getattr(gen, "pad_token_id", None)
    pad = _token_id(pad if pad is not None else getattr(config, "pad_token_id", None))
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    ops = {node.op_type for node in model.graph.all_nodes()}
    input_names = {v.name for v in model.graph.inputs}
    inputs = {"input_ids": "input_ids", "attention_mask": "attention_mask"}
    if "position_ids" in input_names:
        inputs["position_ids"] = "position_ids"
    inputs |= {"past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"}
    provider_options: list[dict[str, Any]] = [{"cuda": {}}] if provider == "cuda" else []
    return {
        "model": {
            "bos_token_id": bos,
            "context_length": shape.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": provider_options},
                "filename": filename,
                "head_size": shape.head_size,
                "hidden_size": shape.hidden_size,
                "inputs": inputs,
                "outputs": {
                    "logits": "logits",
                    "present_key_names": "present.%d.key",
                    "present_value_names": "present.%d.value",
                },
                "num_attention_heads": shape.num_heads,
                "num_hidden_layers": shape.num_layers,
                "num_key_value_heads": shape.num_kv_heads,
            },
            "eos_token_id": eos,
            "pad_token_id": pad,
            "type": model_type,
            "vocab_size": shape.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": shape.context_length,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": bool(ops & _SHARED_BUFFER_OPS),
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def write_folder(
    out_dir: str | os.PathLike,
    write: Callable[[Path], None],
) -> Path:
    """Run ``write(tmp)`` into a temporary folder beside ``out_dir``, then put it in place.

    A previous build at ``out_dir`` is replaced only once the new one is complete; if anything
    fails, the temporary folder is removed and ``out_dir`` is as it was.
    """
    out = check_destination(out_dir)
    parent = out.resolve().parent
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
    try:
        write(tmp)
        if not (tmp / MARKER).is_file():
            raise AssertionError("the build wrote no marker file")
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_json(path: Path, data: Any) -> None:
    """JSON with sorted keys and a final newline (deterministic bytes)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
