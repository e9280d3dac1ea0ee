"""Tiny random causal LMs of every architecture graphopt llm builds (no download: configs only)."""

from __future__ import annotations

from typing import Any

import numpy as np

ARCHS = ("llama", "qwen2", "mistral", "phi3", "gpt2")


def tiny_causal_lm(arch: str, seed: int = 0, tied: bool = False, layers: int = 2, vocab: int = 128) -> Any:
    """A 2-layer, 64-wide model; ``initializer_range`` large enough that greedy tokens vary."""
    import torch
    import transformers as tf

    common: dict[str, Any] = dict(
        vocab_size=vocab, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.3
    )
    if arch == "gpt2":
        config: Any = tf.GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_positions=128, **common)
        cls: Any = tf.GPT2LMHeadModel
    else:
        config_cls, cls = {
            "llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
            "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM),
            "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
            "phi3": (tf.Phi3Config, tf.Phi3ForCausalLM),
        }[arch]
        config = config_cls(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=tied,
            **common,
        )
    torch.manual_seed(seed)
    return cls(config).eval()


def greedy(model: Any, ids: list[int], new: int) -> list[int]:
    """transformers' own greedy continuation (exactly ``new`` tokens)."""
    import torch

    with torch.no_grad():
        out = model.generate(
            torch.tensor([ids]), max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
        )
    return [int(t) for t in out[0, len(ids) :]]


TEXT = (
    "the quick brown fox jumps over the lazy dog while graphopt builds decoders for onnxruntime genai "
    "and every layer of the model keeps its cache of keys and values for the next token"
)


def tiny_tokenizer() -> Any:
    """A byte-level BPE tokenizer trained here on one sentence (what genai's tokenizer reads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT] * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def as_q4_1(w: np.ndarray) -> np.ndarray:
    """``w [out, in]`` rounded as llama.cpp's Q4_1 does (blocks of 32 along ``in``, levels from
    the block's minimum, fp16 scale and minimum), then dequantized: a GGUF Q4_1 source."""
    blocks = w.reshape(w.shape[0], -1, 32).astype(np.float32)
    lo, hi = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    d = (hi - lo) / 15
    q = np.clip(np.round((blocks - lo) / d), 0, 15)
    d16, lo16 = d.astype(np.float16).astype(np.float32), lo.astype(np.float16).astype(np.float32)
    return (d16 * q + lo16).reshape(w.shape)


def last_logits(model_path: Any, ids: list[int]) -> np.ndarray:
    """The last position's logits of a built decoder file run by ONNX Runtime on ``ids`` (empty
    KV cache)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    feeds = {}
    for value in session.get_inputs():
        if value.name.startswith("past_key_values."):
            feeds[value.name] = np.zeros((1, value.shape[1], 0, value.shape[3]), np.float32)
    n = len(ids)
    feeds |= {
        "input_ids": np.array([ids], np.int64),
        "attention_mask": np.ones((1, n), np.int64),
        "position_ids": np.arange(n, dtype=np.int64)[None],
    }
    return session.run(["logits"], feeds)[0][0, -1]
