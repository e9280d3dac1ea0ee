"""``graphopt llm generate``: greedy generation from a built folder, with onnxruntime-genai underneath."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from graphopt.errors import GraphoptError

__all__ = ["generate", "load_genai"]


def _genai() -> Any:
    try:
        import onnxruntime_genai as og
    except ImportError:
        raise GraphoptError(
            "graphopt llm generate needs onnxruntime-genai: pip install 'graphopt[llm]'"
        ) from None
    return og


def load_genai(folder: str | os.PathLike, with_tokenizer: bool = True) -> tuple[Any, Any, dict[str, Any]]:
    """(genai Model, Tokenizer or None, genai_config) for a build folder; a clear error if it is not one."""
    path = Path(folder)
    config_file = path / "genai_config.json"
    if not config_file.is_file():
        raise GraphoptError(f"{path} has no genai_config.json; give a folder made by `graphopt llm build`")
    og = _genai()
    try:
        model = og.Model(str(path))
        tokenizer = og.Tokenizer(model) if with_tokenizer else None
    except Exception as e:
        raise GraphoptError(f"onnxruntime-genai cannot load {path}: {str(e).splitlines()[0]}") from None
    return model, tokenizer, json.loads(config_file.read_text(encoding="utf-8"))


def generate(
    folder: str | os.PathLike,
    prompt: str | None = None,
    *,
    tokens: list[int] | None = None,
    max_new_tokens: int = 64,
) -> dict[str, Any]:
    """Greedy generation: ``{"tokens": new token ids, "text": decoded text, "prompt_tokens": n}``.

    A prompt that, with ``max_new_tokens``, does not fit the model's context is refused before
    anything runs.
    """
    og = _genai()
    model, tokenizer, config = load_genai(folder, with_tokenizer=tokens is None)
    if tokens is None:
        if prompt is None:
            raise GraphoptError("give a prompt or prompt tokens")
        tokens = [int(t) for t in tokenizer.encode(prompt)]
    if not tokens:
        raise GraphoptError("the prompt is empty")
    context = int(config["model"]["context_length"])
    if len(tokens) + max_new_tokens > context:
        raise GraphoptError(
            f"the prompt has {len(tokens)} tokens and {max_new_tokens} new ones were asked for, past the "
            f"model's context of {context}; shorten the prompt or lower --max-new-tokens"
        )
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(tokens) + max_new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(tokens)
    new: list[int] = []
    while not generator.is_done() and len(new) < max_new_tokens:
        generator.generate_next_token()
        new.append(int(generator.get_next_tokens()[0]))
    text = tokenizer.decode(new) if tokenizer is not None else None
    return {"tokens": new, "text": text, "prompt_tokens": len(tokens)}
