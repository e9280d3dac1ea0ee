"""graphopt: model in → IR → pipeline of passes → backend lowering → verified, optimized ONNX out.

This module is the public API (DESIGN.md) and nothing else: it finds passes and targets by name
through the registry, never by importing ``graphopt.passes`` or ``graphopt.backends``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable
from typing import Any

import onnx_ir as _onnx_ir

from graphopt.annotations import DECLARED_KEY, declared_annotations
from graphopt.errors import GraphoptError, InvalidModelError, PassCrashedError, VerificationError
from graphopt.export import export
from graphopt.ir import SOURCE_KEY, detach_tensors, load, save, to_bytes
from graphopt.pipeline import Pipeline, Report
from graphopt.registry import PassInfo, Registry, default_registry
from graphopt.verify import VerificationResult, ort_refusal, verify
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
    "quantize_modes",
    "save",
    "to_bytes",
    "verify",
]

#: Metadata keys stamped into every optimized model (so a file says how it was made).
PIPELINE_KEY = "graphopt.pipeline"
TARGET_KEY = "graphopt.target"
TARGET_OPTIONS_KEY = "graphopt.target_options"
VERSION_KEY = "graphopt.version"


@dataclasses.dataclass
class OptimizeResult:
    """The optimized model and the report of what each pass did."""

    model: _onnx_ir.Model
    report: Report


PRUNE_MODES = ("unstructured", "2:4", "structured")
#: The default fidelity criterion of ``verify=True`` for quantized/pruned models (cosine per output).
DEFAULT_MIN_COSINE = 0.99


def quantize_modes(registry: Registry | None = None) -> list[str]:
    """The quantization modes the installed passes implement (``quantize-*`` passes' ``modes``)."""
    return list((registry or default_registry()).modes("quantize"))


def _quantize_request(quantize: str | dict[str, Any] | None, registry: Registry) -> dict[str, Any] | None:
    if quantize is None:
        return None
    if isinstance(quantize, str):
        quantize = {"mode": quantize}
    if not isinstance(quantize, dict):
        raise GraphoptError(
            f"quantize= must be a mode name or a dict of options, got {type(quantize).__name__}"
        )
    opts = dict(quantize)
    mode = opts.get("mode")
    modes = quantize_modes(registry)
    if mode not in modes:
        raise GraphoptError(f"quantize mode {mode!r} is unknown; use one of {', '.join(modes)}")
    return opts


def _prune_request(prune: float | dict[str, Any] | None) -> dict[str, Any] | None:
    if prune is None:
        return None
    if isinstance(prune, bool) or not isinstance(prune, (int, float, dict)):
        raise GraphoptError(f"prune= must be a sparsity (0 to 1) or a dict of options, got {prune!r}")
    opts = (
        {"sparsity": float(prune), "mode": "unstructured"} if isinstance(prune, (int, float)) else dict(prune)
    )
    sparsity = opts.get("sparsity")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise GraphoptError(f"prune sparsity must be a number in [0, 1), got {sparsity!r}")
    opts["sparsity"] = float(sparsity)
    mode = str(opts.setdefault("mode", "unstructured"))
    if mode not in PRUNE_MODES and not _is_nm(mode):
        raise GraphoptError(f"prune mode {mode!r} is unknown; use one of {', '.join(PRUNE_MODES)} or N:M")
    return opts


def _is_nm(mode: str) -> bool:
    n, _, m = mode.partition(":")
    return n.isdigit() and m.isdigit() and 0 < int(n) < int(m)


def optimize(
    model: Any,
    target: str = "ort-cpu",
    *,
    quantize: str | dict[str, Any] | None = None,
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
    target_options: dict[str, Any] | None = None,
) -> OptimizeResult:
    """Optimize ``model`` (path, bytes, ModelProto or onnx_ir.Model) for ``target``.

    The input is never modified: passes run on a copy. ``pipeline`` overrides the target's
    default. ``quantize`` is a mode (``"dynamic"``, ``"static"``, ``"int4"``, ``"int8-weight"``) or
    a dict of the ``quantize`` pass's options with ``"mode"``; ``prune`` a sparsity (unstructured)
    or a dict of the ``prune`` pass's options; ``calibration`` an .npz file, a folder, or an
    iterable of feed dicts (static quantization needs it; data-aware int4 and activation-based
    pruning use it). ``verify=True`` compares outputs with the original on ONNX Runtime and raises
    :class:`VerificationError` on a mismatch (for quantized or pruned models: cosine per output
    ≥ ``verify_options["min_cosine"]``, default 0.99); ``verify_each`` runs the ONNX checker after
    every pass and ``numeric_each`` the numeric check too, naming the pass that broke the model.
    ``target_options`` are the target's own options (``graphopt passes`` does not list them; see
    the backend's ``Options``, e.g. TensorRT's optimization-profile ``dims``); they are recorded in
    the model so that ``save`` writes matching run settings. The result is checked against what
    the target can run (a TensorRT model with a contrib op is an error, not a file).
    """
    reg = registry or default_registry()
    qopts = _quantize_request(quantize, reg)
    popts = _prune_request(prune)
    if pipeline is not None and (qopts or popts):
        raise GraphoptError(
            "give either pipeline= or quantize=/prune=, not both: with a pipeline, add the "
            "quantize(...) / prune(...) steps to it"
        )
    if qopts and qopts["mode"] == "static" and calibration is None and not qopts.get("calibration"):
        raise GraphoptError(
            "static quantization needs calibration data: pass calibration= (.npz file, folder of "
            ".npy/.npz, or a list of feed dicts) or --calibration on the command line"
        )
    backend = reg.backend(target)
    if target_options:
        backend = type(backend)(**target_options)
    if pipeline is None:
        text = backend.default_pipeline(level, quantize=qopts, prune=popts)
        # convert-float16 (ort-cuda) keeps values that calibration shows out of fp16 range in fp32.
        if calibration is not None and not (qopts or popts) and "convert-float16" not in text:
            raise GraphoptError("calibration data was given but nothing uses it; add quantize= (or prune=)")
    original = load(model)
    declared = declared_annotations(original)
    work = original.clone()
    detach_tensors(work)
    if SOURCE_KEY in original.meta:
        work.meta[SOURCE_KEY] = original.meta[SOURCE_KEY]
    if pipeline is None:
        pipe = Pipeline.parse(text, registry=reg) if text else Pipeline([], registry=reg, validate=False)
    else:
        pipe = Pipeline.coerce(pipeline, registry=reg)
    vopts = dict(verify_options or {})
    if (qopts or popts) and "min_cosine" not in vopts:
        vopts["min_cosine"] = DEFAULT_MIN_COSINE
    context: dict[str, Any] = {}
    if calibration is not None:
        from graphopt.calibration import CalibrationData

        data = CalibrationData.from_any(calibration)
        data.check(original)  # names, dtypes, shapes (from headers) and finite values: before any pass
        context["calibration"] = data
    # The clone shares weight data with the input (no copies) through its own tensor objects;
    # passes never change tensor data in place, so the input model stays as it was.
    try:
        result_model, report = pipe.run(
            work,
            registry=reg,
            verify_each=verify_each,
            numeric_each=numeric_each,
            reference=original if numeric_each else None,
            verify_options=vopts,
            dump_dir=dump_dir,
            context=context,
        )
    except PassCrashedError as e:
        # A pass broke on a model that passed ONNX's checks. If ONNX Runtime cannot run the model
        # either, the input is what is wrong (ONNX's checker misses some rules, e.g. a Conv bias
        # of the wrong length): bad input, not a bug.
        why = ort_refusal(original, inputs=vopts.get("inputs"), dims=vopts.get("dims"))
        if why is not None:
            where = original.meta.get(SOURCE_KEY, "the model")
            raise InvalidModelError(
                f"{where}: not a valid model: ONNX Runtime cannot run it either ({why}); pass failure: {e}"
            ) from e
        raise
    report.target = target
    result_model.meta[DECLARED_KEY] = declared  # the file keeps only these (graphopt.annotations)
    result_model.metadata_props[PIPELINE_KEY] = str(pipe)
    result_model.metadata_props[TARGET_KEY] = target
    if target_options:
        result_model.metadata_props[TARGET_OPTIONS_KEY] = json.dumps(target_options, sort_keys=True)
    result_model.metadata_props[VERSION_KEY] = __version__
    if hasattr(backend, "check_model"):
        backend.check_model(result_model)
    if verify:
        vr = _verify_models(original, result_model, **vopts)
        report.verification = vr
        if not vr.passed:
            hint = ""
            if (qopts or popts) and "min_cosine" in vopts:
                hint = (
                    f"; quantization/pruning change outputs by design: the check asks cosine ≥ "
                    f"{vopts['min_cosine']:g} per output (verify_options min_cosine / --verify-min-cosine "
                    "set the loss you accept)"
                )
            raise VerificationError(
                f"optimized model differs from the original: {vr.failure_summary()}{hint}", vr
            )
    return OptimizeResult(result_model, report)


def list_passes(registry: Registry | None = None) -> list[PassInfo]:
    """Every registered pass with its one-line description and options."""
    reg = registry or default_registry()
    return [reg.info(n) for n in reg.pass_names()]
