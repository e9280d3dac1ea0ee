"""The exceptions graphopt raises on bad input: every one says what is wrong and what to do.

The CLI turns any :class:`GraphoptError` into one line on stderr and exit code 2, except
:class:`VerificationError` (exit code 1: the only failure that means "the optimized model's outputs
differ") and :class:`PassCrashedError` (exit code 3: a pass crashed or broke a valid model, a bug);
any other exception is a bug in graphopt too (exit code 3).
"""

from __future__ import annotations

__all__ = [
    "GraphoptError",
    "ModelLoadError",
    "InvalidModelError",
    "UnsafeExternalDataError",
    "UnsupportedModelError",
    "OutputError",
    "PipelineError",
    "PassFailedError",
    "PassCrashedError",
    "PassChangedOutputsError",
    "VerificationError",
]


class GraphoptError(Exception):
    """Base of every error graphopt raises because of its input or settings."""

    exit_code = 2


class ModelLoadError(GraphoptError):
    """The model file cannot be read as ONNX (missing, truncated, not ONNX, missing weights)."""


class InvalidModelError(ModelLoadError):
    """The model is not valid ONNX (ONNX's checker or strict shape inference, or graphopt's own graph
    checks, refuse it); the message says what is wrong and where (node, value or tensor)."""


class UnsafeExternalDataError(ModelLoadError):
    """An external-data reference points outside the model's folder, through a link, or past a file's end."""


class UnsupportedModelError(GraphoptError):
    """The model is valid ONNX but uses something graphopt cannot handle safely (opset, custom domain)."""


class OutputError(GraphoptError):
    """The output cannot be written where asked (it would overwrite the input, a link, ...)."""


class PipelineError(GraphoptError):
    """A pipeline spec or pass option is invalid (unknown pass, bad option, syntax error)."""


class PassFailedError(GraphoptError):
    """A pass cannot handle this model or these options (it says why); the message names the pass.

    Raised by passes themselves for what they refuse (e.g. an opset they cannot convert to). The
    runner raises the subclasses: :class:`PassCrashedError` when a pass breaks, and
    :class:`PassChangedOutputsError` when the numeric check after a pass fails.
    """


class PassCrashedError(PassFailedError):
    """A pass raised an unexpected exception, produced an invalid model or misreported a change.

    Input models are validated before any pass runs, so this is a bug in graphopt (or in a plugin
    pass), not in the input: exit code 3.
    """

    exit_code = 3


class VerificationError(GraphoptError):
    """The optimized model's outputs differ from the original's beyond the tolerance."""

    exit_code = 1

    def __init__(self, message: str, result: object | None = None) -> None:
        super().__init__(message)
        self.result = result


class PassChangedOutputsError(PassFailedError, VerificationError):
    """The numeric check after a pass (``numeric_each``) found changed outputs: a verification failure."""

    exit_code = 1
