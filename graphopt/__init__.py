"""graphopt: model in → IR → pipeline of passes → backend lowering → verified, optimized ONNX out.

This module is the public API (DESIGN.md) and nothing else: it finds passes and targets by name
through the registry, never by importing ``graphopt.passes`` or ``graphopt.backends``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from typing import Any

import onnx_ir as _onnx_ir

from graphopt.errors import GraphoptError, VerificationError
from graphopt.export import export
from graphopt.ir import SOURCE_KEY, detach_tensors, load, save, to_bytes
from graphopt.pipeline import Pipeline, Report
from graphopt.registry import PassInfo, Registry, default_registry
from graphopt.verify import VerificationResult, verify
from graphopt.verify import verify as _verify_models

__version__ = "0.1.0"

__all__ = [
    "GraphoptError",
    "OptimizeResult",
    "Pipeline",
    "Report",
    "VerificationError",
    "VerificationResult",
    "export",
    "list_passes",
    "load",
    "optimize",
    "save",
    "to_bytes",
    "verify",
]

#: Metadata keys stamped into every optimized model (so a file says how it was made).
PIPELINE_KEY = "graphopt.pipeline"
TARGET_KEY = "graphopt.target"
VERSION_KEY = "graphopt.version"


@dataclasses.dataclass
class OptimizeResult:
    """The optimized model and the report of what each pass did."""

    model: _onnx_ir.Model
    report: Report


def optimize(
    model: Any,
    target: str = "ort-cpu",
    *,
    quantize: str | None = None,
    prune: float | dict[str, Any] | None = None,
    calibration: str | os.PathLike | Iterable[dict[str, Any]] | None = None,
    pipeline: str | Pipeline | list[Any] | None = None,
    verify: bool = False,
    verify_each: bool = False,
    numeric_each: bool = False,
    verify_options: dict[str, Any] | None = None,
    dump_dir: str | os.PathLike | None = None,
    level: int = 2,
    registry: Registry | None = None,
) -> OptimizeResult:
    """Optimize ``model`` (path, bytes, ModelProto or onnx_ir.Model) for ``target``.

    The input is never modified: passes run on a copy. ``pipeline`` overrides the target's
    default. ``verify=True`` compares outputs with the original on ONNX Runtime and raises
    :class:`VerificationError` on a mismatch; ``verify_each`` runs the ONNX checker after every
    pass and ``numeric_each`` the numeric check too, naming the pass that broke the model.
    """
    for name, value in (("quantize", quantize), ("prune", prune), ("calibration", calibration)):
        if value is not None:
            raise GraphoptError(
                f"{name}= is not available yet in this version of graphopt; "
                f"remove it (only the cleanup pipeline is implemented so far)"
            )
    reg = registry or default_registry()
    backend = reg.backend(target)
    original = load(model)
    work = original.clone()
    detach_tensors(work)
    if SOURCE_KEY in original.meta:
        work.meta[SOURCE_KEY] = original.meta[SOURCE_KEY]
    if pipeline is None:
        text = backend.default_pipeline(level)
        pipe = Pipeline.parse(text, registry=reg) if text else Pipeline([], registry=reg, validate=False)
    else:
        pipe = Pipeline.coerce(pipeline, registry=reg)
    vopts = dict(verify_options or {})
    # The clone shares weight data with the input (no copies) through its own tensor objects;
    # passes never change tensor data in place, so the input model stays as it was.
    result_model, report = pipe.run(
        work,
        registry=reg,
        verify_each=verify_each,
        numeric_each=numeric_each,
        reference=original if numeric_each else None,
        verify_options=vopts,
        dump_dir=dump_dir,
    )
    report.target = target
    result_model.metadata_props[PIPELINE_KEY] = str(pipe)
    result_model.metadata_props[TARGET_KEY] = target
    result_model.metadata_props[VERSION_KEY] = __version__
    if verify:
        vr = _verify_models(original, result_model, **vopts)
        report.verification = vr
        if not vr.passed:
            raise VerificationError(f"optimized model differs from the original: {vr.failure_summary()}", vr)
    return OptimizeResult(result_model, report)


def list_passes(registry: Registry | None = None) -> list[PassInfo]:
    """Every registered pass with its one-line description and options."""
    reg = registry or default_registry()
    return [reg.info(n) for n in reg.pass_names()]
