"""Where an LLM build starts: a Hugging Face folder, a ``.gguf`` file or a loaded transformers model.

Everything is read offline (``local_files_only``): a build never reaches a hub. Each way a source
can be wrong is refused here, before anything is exported or written, with one line that says what
to do: no config.json, no weights, an architecture graphopt cannot build, a GGUF file transformers
cannot dequantize.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from graphopt.errors import GraphoptError

__all__ = ["ARCHITECTURES", "LlmSource", "load_source"]

#: transformers ``model_type`` → onnxruntime-genai's model ``type``, for the architectures the
#: export and the decoder fusions are tested on. GPT-2 is built with the same I/O as the others
#: (separate past key/value per layer), which genai runs as a generic decoder ("llama"); its own
#: "gpt2" type means the older combined-past layout.
ARCHITECTURES: dict[str, str] = {
    "llama": "llama",
    "qwen2": "qwen2",
    "mistral": "mistral",
    "phi3": "phi3",
    "gpt2": "llama",
}

_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


@dataclasses.dataclass
class LlmSource:
    """A loaded causal LM in float32 with its tokenizer (None when the source has none)."""

    model: Any
    tokenizer: Any
    model_type: str
    name: str
    generation_config: Any = None


def _unsupported(model_type: str) -> GraphoptError:
    return GraphoptError(
        f"architecture {model_type!r} is not supported by graphopt llm build; "
        f"supported: {', '.join(sorted(ARCHITECTURES))}"
    )


def _transformers() -> Any:
    try:
        import torch  # noqa: F401
        import transformers
    except ImportError:
        raise GraphoptError(
            "graphopt llm needs torch and transformers; install them with `pip install 'graphopt[llm]'`"
        ) from None
    return transformers


def _from_folder(path: Path) -> LlmSource:
    tf = _transformers()
    if not (path / "config.json").is_file():
        raise GraphoptError(f"{path} has no config.json; give a Hugging Face model folder or a .gguf file")
    try:
        config = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    except Exception as e:
        raise GraphoptError(f"{path / 'config.json'} cannot be read: {str(e).splitlines()[0]}") from None
    model_type = getattr(config, "model_type", "")
    if model_type not in ARCHITECTURES:
        raise _unsupported(model_type)
    if not any(any(path.glob(p)) for p in _WEIGHT_PATTERNS):
        raise GraphoptError(f"{path} has no weights (*.safetensors or pytorch_model*.bin)")
    import torch

    try:
        model = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    except Exception as e:
        raise GraphoptError(f"the model in {path} cannot be loaded: {str(e).splitlines()[0]}") from None
    tokenizer = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        try:
            tokenizer = tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as e:
            raise GraphoptError(
                f"the tokenizer in {path} cannot be loaded: {str(e).splitlines()[0]}"
            ) from None
    return LlmSource(
        model.eval(), tokenizer, model_type, path.name, getattr(model, "generation_config", None)
    )


def _from_gguf(path: Path) -> LlmSource:
    tf = _transformers()
    try:
        import gguf
    except ImportError:
        raise GraphoptError(
            "reading .gguf files needs the gguf package: pip install 'graphopt[llm]'"
        ) from None
    try:
        reader = gguf.GGUFReader(str(path))
        arch_field = reader.fields.get("general.architecture")
        arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field is not None else ""
    except Exception as e:
        raise GraphoptError(f"{path} is not a readable GGUF file: {str(e).splitlines()[0]}") from None
    model_type = {
        "qwen2": "qwen2",
        "llama": "llama",
        "mistral": "mistral",
        "phi3": "phi3",
        "gpt2": "gpt2",
    }.get(arch, arch)
    if model_type not in ARCHITECTURES:
        raise _unsupported(arch or "unknown")
    import torch

    folder, name = str(path.parent), path.name
    try:
        model = tf.AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=name, local_files_only=True, dtype=torch.float32
        )
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    except Exception as e:
        raise GraphoptError(
            f"{path} cannot be dequantized by transformers: {str(e).splitlines()[0]} "
            "(supported tensor types are those transformers' GGUF loader lists)"
        ) from None
    # A model dequantized from GGUF is plain float32 from here on; transformers marks it as
    # quantized, which only stops save_pretrained.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    return LlmSource(
        model.eval(), tokenizer, model_type, path.stem, getattr(model, "generation_config", None)
    )


def load_source(src: Any, tokenizer: Any = None) -> LlmSource:
    """Load ``src`` (folder, .gguf path or transformers model) offline, in float32."""
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if path.is_dir():
            return _from_folder(path)
        if path.is_file() and path.suffix.lower() == ".gguf":
            return _from_gguf(path)
        if not path.exists():
            raise GraphoptError(f"{path} does not exist; give a Hugging Face model folder or a .gguf file")
        raise GraphoptError(f"{path} is neither a model folder nor a .gguf file")
    _transformers()
    config = getattr(src, "config", None)
    if config is None or not callable(getattr(src, "forward", None)):
        raise GraphoptError(
            f"expected a transformers causal LM, a folder or a .gguf path, got {type(src).__name__}"
        )
    model_type = getattr(config, "model_type", "")
    if model_type not in ARCHITECTURES:
        raise _unsupported(model_type)
    if not hasattr(src, "lm_head"):
        raise GraphoptError(f"{type(src).__name__} has no language-model head; give the *ForCausalLM model")
    import torch

    model = src.to(torch.float32).eval()
    return LlmSource(
        model, tokenizer, model_type, type(src).__name__, getattr(src, "generation_config", None)
    )
