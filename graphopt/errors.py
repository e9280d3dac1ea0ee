"""The exceptions graphopt raises on bad input: every one says what is wrong and what to do.

The CLI turns any :class:`GraphoptError` into one line on stderr and exit code 2
(:class:`VerificationError`: exit code 1); anything else is a bug in graphopt.
"""

from __future__ import annotations

__all__ = [
    "GraphoptError",
    "ModelLoadError",
    "UnsafeExternalDataError",
    "UnsupportedModelError",
    "OutputError",
    "PipelineError",
    "PassFailedError",
    "VerificationError",
]


class GraphoptError(Exception):
    """Base of every error graphopt raises because of its input or settings."""

    exit_code = 2


class ModelLoadError(GraphoptError):
    """The model file cannot be read as ONNX (missing, truncated, not ONNX, missing weights)."""


class UnsafeExternalDataError(ModelLoadError):
    """An external-data reference points outside the model's folder, through a link, or past a file's end."""


class UnsupportedModelError(GraphoptError):
    """The model is valid ONNX but uses something graphopt cannot handle safely (opset, custom domain)."""


class OutputError(GraphoptError):
    """The output cannot be written where asked (it would overwrite the input, a link, ...)."""


class PipelineError(GraphoptError):
    """A pipeline spec or pass option is invalid (unknown pass, bad option, syntax error)."""


class PassFailedError(GraphoptError):
    """A pass produced an invalid model; the message names the pass and the ones before it."""

    exit_code = 1


class VerificationError(GraphoptError):
    """The optimized model's outputs differ from the original's beyond the tolerance."""

    exit_code = 1

    def __init__(self, message: str, result: object | None = None) -> None:
        super().__init__(message)
        self.result = result
