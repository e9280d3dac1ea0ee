"""torch → onnx_ir via ``torch.onnx.export(dynamo=True)``; torch is imported only when called."""

from __future__ import annotations

import logging
from typing import Any

import onnx_ir as ir

from graphopt.errors import GraphoptError

__all__ = ["export"]

logger = logging.getLogger("graphopt.export")


def export(
    module: Any,
    args: tuple[Any, ...] | Any,
    *,
    kwargs: dict[str, Any] | None = None,
    dynamic_shapes: Any = None,
    input_names: list[str] | None = None,
    output_names: list[str] | None = None,
    opset_version: int | None = None,
    optimize: bool = False,
) -> ir.Model:
    """Export a ``torch.nn.Module`` with the dynamo exporter and return its ``onnx_ir.Model``.

    ``optimize`` is False by default so that graphopt's own pipeline sees the plain export
    (the exporter's optimizer is onnxscript's, which graphopt's cleanup subsumes).
    """
    try:
        import torch
    except ImportError:
        raise GraphoptError(
            "graphopt.export needs PyTorch; install it with `pip install 'graphopt[torch]'` "
            "(or pip install torch==2.13.0)"
        ) from None
    if not isinstance(module, torch.nn.Module):
        raise GraphoptError(f"export needs a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(args, tuple):
        args = (args,)
    was_training = module.training
    module.eval()
    try:
        program = torch.onnx.export(
            module,
            args,
            kwargs=kwargs,
            dynamic_shapes=dynamic_shapes,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset_version,
            dynamo=True,
            optimize=optimize,
            verbose=False,
        )
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise GraphoptError(f"torch.onnx.export failed: {first}") from e
    finally:
        module.train(was_training)
    if program is None or getattr(program, "model", None) is None:
        raise GraphoptError("torch.onnx.export returned no model")
    return program.model
