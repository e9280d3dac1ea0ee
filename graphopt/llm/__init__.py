"""The LLM decoder path: a causal LM in, a folder onnxruntime-genai loads and generates with, out.

A front end (read the source, export with a KV cache) and a packaging step around the same
pipeline as ``graphopt optimize`` (DESIGN.md, "LLM decoders"). torch, transformers, gguf and
onnxruntime-genai are imported only when a build or a generation runs.
"""

from __future__ import annotations

from .build import PRECISIONS, TARGETS, BuildResult, build
from .generate import generate
from .source import ARCHITECTURES

__all__ = ["ARCHITECTURES", "PRECISIONS", "TARGETS", "BuildResult", "build", "generate"]
