"""The prune pass's options, mode parsing, and the state of one run.

:class:`PruneRun` is made afresh by each ``PrunePass.call``: it carries the options, the parsed
mode, the run-time context (calibration data) and where statistics and report details go, so
the modules doing the work never read or set attributes on the pass itself.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import re
from collections.abc import Callable, Iterable
from typing import Any, Literal

import onnx_ir as ir

from graphopt.errors import PipelineError

__all__ = ["MODES", "TARGETS", "FLOAT_TYPES", "PruneOptions", "PruneRun", "parse_mode"]

MODES = ("unstructured", "2:4", "structured")
TARGETS = ("channels", "ffn", "heads")
#: Weight dtypes the pass prunes.
FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16})


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclasses.dataclass
class PruneOptions:
    sparsity: float = dataclasses.field(
        default=0.5,
        metadata=_doc(
            "fraction of weights (unstructured) or units (structured) to remove, 0..1; "
            "N:M modes ignore it (their sparsity is 1 - N/M)"
        ),
    )
    mode: str = dataclasses.field(
        default="unstructured", metadata=_doc("unstructured | 2:4 | N:M (e.g. 1:4) | structured")
    )
    scope: Literal["layer", "global"] = dataclasses.field(
        default="layer",
        metadata=_doc(
            "layer: each layer (unit group) loses `sparsity`; global: one threshold "
            "over all targets (structured: over mean-normalized unit scores)"
        ),
    )
    targets: list[str] = dataclasses.field(
        default_factory=lambda: list(TARGETS),
        metadata=_doc("structured unit kinds: channels (Conv), ffn (MatMul/Gemm neurons), heads (attention)"),
    )
    importance: Literal["l1", "l2", "activation"] = dataclasses.field(
        default="l1",
        metadata=_doc("unit score: weight L1/L2 norm, or activation statistics (needs calibration)"),
    )
    min_size: int = dataclasses.field(
        default=1024, metadata=_doc("weights with fewer elements are left dense (unstructured and N:M)")
    )
    exclude: list[str] = dataclasses.field(
        default_factory=list,
        metadata=_doc("node names, weight names, fnmatch patterns or op types to leave alone"),
    )
    include: list[str] = dataclasses.field(
        default_factory=list, metadata=_doc("if given, prune only nodes/weights matching these")
    )
    round_to: int = dataclasses.field(
        default=1, metadata=_doc("structured: keep a multiple of this many units per group when possible")
    )
    sparse_storage: bool = dataclasses.field(
        default=False,
        metadata=_doc("graphopt.save then stores mostly-zero weights as ONNX sparse initializers"),
    )
    calibration: str | None = dataclasses.field(
        default=None,
        metadata=_doc(".npz file or folder for importance=activation (or optimize(calibration=))"),
    )
    calibration_batches: int = dataclasses.field(
        default=16, metadata=_doc("at most this many calibration batches for activation statistics")
    )


def parse_mode(mode: str) -> tuple[str, int, int]:
    """``("unstructured"|"nm"|"structured", n, m)``; a PipelineError for anything else."""
    text = str(mode).strip().lower()
    if text in ("unstructured", "structured"):
        return text, 0, 0
    m = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if 0 < n < mm <= 64:
            return "nm", n, mm
    raise PipelineError(
        f"prune mode {mode!r} is not valid; use unstructured, structured, or N:M with 0 < N < M (e.g. 2:4)"
    )


def _matches(patterns: Iterable[str], node: ir.Node, weight_name: str | None) -> bool:
    names = [node.name or "", weight_name or ""]
    for p in patterns:
        if p == node.op_type or any(p == n or fnmatch.fnmatchcase(n, p) for n in names if n):
            return True
    return False


@dataclasses.dataclass
class PruneRun:
    """One run of the pass: options, parsed mode, context, and the report sinks."""

    options: PruneOptions
    kind: str  # "unstructured" | "nm" | "structured"
    n: int
    m: int
    #: Run-time inputs (calibration data); a single-use source is replaced by its materialized copy.
    context: dict[str, Any]
    #: ``count(key, n=1)``: the pass's statistics.
    count: Callable[..., None]
    #: The report details of this run.
    details: dict[str, Any]

    def selected(self, node: ir.Node, weight_name: str | None) -> str | None:
        """None when include/exclude let ``node`` (or its weight) be pruned, else the reason."""
        o = self.options
        if o.include and not _matches(o.include, node, weight_name):
            return "not in include"
        if o.exclude and _matches(o.exclude, node, weight_name):
            return "excluded"
        return None

    def calibration(self) -> Any:
        """The calibration data for importance=activation (option, else the run's context)."""
        from graphopt.calibration import CalibrationData

        o = self.options
        source = o.calibration if o.calibration is not None else self.context.get("calibration")
        if source is None:
            raise PipelineError(
                "prune importance=activation needs calibration data: pass calibration= to "
                "optimize() or the prune option calibration=PATH"
            )
        data = CalibrationData.from_any(source)
        if getattr(data, "_single_use", False):
            data = data.materialize()
            self.context["calibration"] = data
        return data
