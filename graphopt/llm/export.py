"""A transformers causal LM → an ONNX decoder with a KV cache, through ``torch.onnx.export(dynamo=True)``.

The exported graph follows onnxruntime-genai's decoder convention, so that the folder the LLM build
writes is loaded by ``onnxruntime_genai.Model`` as it is:

* inputs ``input_ids`` [batch, sequence_length], ``attention_mask`` [batch, total_sequence_length]
  (1 for every past and new token that is real), ``position_ids`` [batch, sequence_length], and
  ``past_key_values.{i}.key`` / ``.value`` [batch, kv_heads, past_sequence_length, head_size] per layer;
* outputs ``logits`` and ``present.{i}.key`` / ``.value`` [batch, kv_heads, total_sequence_length, head_size].

The export itself is plain transformers code run under torch.export: a small wrapper turns the flat
past tensors into the ``DynamicCache`` the model expects and flattens the returned cache again, so
no attention is written by hand and every architecture transformers implements exports the same way.
torch and transformers are imported only here, when an LLM is built.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import onnx_ir as ir

from graphopt.export import export

__all__ = ["DecoderShape", "decoder_shape", "export_decoder", "io_names"]

logger = logging.getLogger("graphopt.llm")


@dataclasses.dataclass(frozen=True)
class DecoderShape:
    """The sizes genai_config.json and the cache inputs need, read from a transformers config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    hidden_size: int
    vocab_size: int
    context_length: int


def decoder_shape(config: Any) -> DecoderShape:
    """Read the decoder's sizes from a transformers config (Llama-family and GPT-2 names alike)."""
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_size = int(getattr(config, "head_dim", None) or hidden // heads)
    context = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return DecoderShape(
        num_layers=int(config.num_hidden_layers),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_size=head_size,
        hidden_size=hidden,
        vocab_size=int(config.vocab_size),
        context_length=int(context or 2048),
    )


def io_names(num_layers: int) -> tuple[list[str], list[str]]:
    """Input and output names in onnxruntime-genai's convention (the builder's)."""
    cache = [f"{{}}.{i}.{kv}" for i in range(num_layers) for kv in ("key", "value")]
    inputs = ["input_ids", "attention_mask", "position_ids"] + [c.format("past_key_values") for c in cache]
    outputs = ["logits"] + [c.format("present") for c in cache]
    return inputs, outputs


def _wrapper(model: Any, num_layers: int, last_token_logits: bool) -> Any:
    import torch
    from transformers import DynamicCache

    class DecoderWithCache(torch.nn.Module):
        """Flat past tensors in, logits and flat present tensors out (what ONNX inputs can carry)."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: Any, attention_mask: Any, position_ids: Any, past: Any) -> Any:
            # Full-length layers even for a sliding-window model: genai keeps every past token in
            # its buffer and the window is in the mask (transformers would crop the cache).
            cache = DynamicCache()
            for i, (key, value) in enumerate(past):
                cache.update(key, value, i)
            extra = {"logits_to_keep": 1} if last_token_logits else {}
            out = self.model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                **extra,
            )
            present = []
            for layer in out.past_key_values.layers[:num_layers]:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return DecoderWithCache().eval()


def export_decoder(
    model: Any, *, last_token_logits: bool = False, opset_version: int | None = None
) -> ir.Model:
    """Export ``model`` (a transformers ``*ForCausalLM`` in float32) with past/present KV per layer.

    ``last_token_logits`` computes the vocabulary projection for the last position only (what
    generation reads); full logits for every position are what perplexity evaluation needs.
    Batch, sequence, past and total lengths are dynamic; the example traced has a non-empty past
    so that no length is specialised to 0 or 1.
    """
    import torch

    shape = decoder_shape(model.config)
    batch, seq, past_len = 2, 3, 4
    ids = torch.zeros((batch, seq), dtype=torch.int64)
    mask = torch.ones((batch, past_len + seq), dtype=torch.int64)
    positions = torch.arange(past_len, past_len + seq, dtype=torch.int64).expand(batch, seq)
    kv = (batch, shape.num_kv_heads, past_len, shape.head_size)
    dtype = next(model.parameters()).dtype
    past = [(torch.zeros(kv, dtype=dtype), torch.zeros(kv, dtype=dtype)) for _ in range(shape.num_layers)]
    dim = torch.export.Dim
    b = dim("batch", min=1, max=1024)
    s = dim("sequence_length", min=1, max=shape.context_length)
    p = dim("past_sequence_length", min=0, max=shape.context_length)
    total = dim("total_sequence_length", min=1, max=shape.context_length)
    dynamic = {
        "input_ids": {0: b, 1: s},
        "attention_mask": {0: b, 1: total},
        "position_ids": {0: b, 1: s},
        "past": [({0: b, 2: p}, {0: b, 2: p}) for _ in range(shape.num_layers)],
    }
    inputs, outputs = io_names(shape.num_layers)
    wrapper = _wrapper(model, shape.num_layers, last_token_logits)
    with torch.no_grad():
        return export(
            wrapper,
            (ids, mask, positions, past),
            dynamic_shapes=dynamic,
            input_names=inputs,
            output_names=outputs,
            opset_version=opset_version,
        )
