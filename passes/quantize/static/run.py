"""The state of one ``quantize-static`` call, handed to each step (planning, calibration,
SmoothQuant, rewriting); the pass object keeps nothing between calls."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_ir as ir

from .options import StaticOptions
from .placement import Placement

__all__ = ["QRANGE", "Run"]

#: Activation type → (qmin, qmax, numpy type, ONNX type).
QRANGE = {
    "uint8": (0, 255, np.uint8, ir.DataType.UINT8),
    "int8": (-128, 127, np.int8, ir.DataType.INT8),
    "uint16": (0, 65535, np.uint16, ir.DataType.UINT16),
    "int16": (-32768, 32767, np.int16, ir.DataType.INT16),
}


@dataclasses.dataclass
class Run:
    """One call's model, options, placement and calibration data, and the pass's hooks."""

    model: ir.Model
    options: StaticOptions
    placement: Placement
    data: Any
    #: The pipeline context (the calibration source and the range cache live there).
    context: dict[str, Any]
    details: dict[str, Any]
    #: The pass's ``count(key, n=1)`` and ``selected(node) -> (ok, why)``.
    count: Callable[..., None]
    selected: Callable[[ir.Node], tuple[bool, str]]
    #: Q/DQ may carry an ``axis`` (opset >= 13): per-channel weights and biases.
    per_axis: bool = True

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    def act(self, wide: bool) -> tuple[str, bool]:
        """(activation type name, symmetric) for an 8- or 16-bit tensor."""
        t = self.placement.activation_type or self.options.activation_type
        sym = (
            self.placement.symmetric
            if self.placement.symmetric is not None
            else bool(self.options.activation_symmetric)
        )
        if wide:
            t = "int16" if t == "int8" else "uint16"
        return t, sym

    def ops(self) -> set[str]:
        """The op types to quantize: the ``op_types`` option, else the placement's (embeddings
        only with ``embeddings``)."""
        if self.options.op_types:
            return set(self.options.op_types)
        ops = set(self.placement.op_types)
        return ops if self.options.embeddings else ops - self.placement.embedding

    def cache(self) -> dict[Any, Any]:
        """The statistics/range cache: ``context["_static_ranges"]``, else kept on the
        CalibrationData object itself, because ``Pipeline.run`` hands each run a shallow copy of
        the context dict (a key added here would be lost) while the data object is shared."""
        cache = self.context.get("_static_ranges")
        if cache is None:
            cache = getattr(self.data, "_static_ranges", None)
            if cache is None:
                cache = {}
                try:
                    self.data._static_ranges = cache
                except AttributeError:
                    pass
            self.context["_static_ranges"] = cache
        return cache

    def source_key(self) -> Any:
        """What identifies the calibration data in cache keys (its path, else the object)."""
        src = (
            self.options.calibration
            if self.options.calibration is not None
            else self.context.get("calibration")
        )
        return src if isinstance(src, str) else id(src)
