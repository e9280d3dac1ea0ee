"""The state of one ``quantize-dynamic`` call: created in ``call()``, handed to every step, gone
when the call returns (the pass object keeps nothing between calls)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_ir as ir

from ...ir_helpers import new_initializer, take_place, unique_name
from .._common.int8 import quantize_weight
from .options import DynamicOptions

if TYPE_CHECKING:
    from .emit_per_token import TokenLevels
    from .plan import Plan

__all__ = ["Run"]


@dataclasses.dataclass
class Run:
    """One call's model, options, report hooks, plans and probe results, and what the rewrites
    share: the names taken so far, shared constants, the per-token quantized inputs."""

    model: ir.Model
    options: DynamicOptions
    #: The pass's report hooks: ``count(key, n=1)`` and ``decide(node, quantized, reason)``.
    count: Callable[..., None]
    decide: Callable[[ir.Node, bool, str], None]
    details: dict[str, Any]
    #: Calibration data (None: the probe runs on generated inputs, weights get round-to-nearest).
    calibration: Any = None
    #: The model's default-domain opset.
    opset: int = 0
    #: The checked candidates, in graph order.
    plans: list[Plan] = dataclasses.field(default_factory=list)
    #: Probe results per input name: per-channel max |x|, per-channel (min, max), token ratio.
    stats: dict[str, np.ndarray] | None = None
    ranges: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)
    token_ratio: dict[str, float] = dataclasses.field(default_factory=dict)
    #: Names made so far (see :func:`unique_name`).
    taken: set[str] = dataclasses.field(default_factory=set)
    #: Per-token quantized inputs, shared by their consumers: id(value) → levels.
    per_token: dict[int, TokenLevels] = dataclasses.field(default_factory=dict)
    #: Constants shared by all rewrites (axes, per-token scales), by key.
    consts: dict[str, ir.Value] = dataclasses.field(default_factory=dict)
    #: Per-token inputs: id(value) → (zero-point columns appended to asymmetric levels, the split
    #: channels appended before them or None); see :func:`.emit_per_token.plan_zero_columns`.
    zero_columns: dict[int, tuple[int, np.ndarray | None]] = dataclasses.field(default_factory=dict)

    @property
    def graph(self) -> ir.Graph:
        return self.model.graph

    def name(self, base: str) -> str:
        """A fresh value/node name from ``base``."""
        return unique_name(self.graph, base, self.taken)

    def init(self, base: str, array: np.ndarray) -> ir.Value:
        """A new initializer holding ``array``."""
        return new_initializer(self.graph, base, array, self.taken)

    def shared_const(self, key: str, array: np.ndarray) -> ir.Value:
        """The initializer for ``key``, made from ``array`` on first use."""
        if key not in self.consts:
            self.consts[key] = self.init(key, array)
        return self.consts[key]

    def qweight(
        self, base: str, w: np.ndarray, quantized: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
    ) -> tuple[ir.Value, ir.Value, ir.Value]:
        """Initializers of the int8 weight, its scale and zero point (``quantized`` when already
        quantized, e.g. by GPTQ, else round-to-nearest with the options' settings)."""
        o = self.options
        q, scale, zp = (
            quantized
            if quantized is not None
            else quantize_weight(
                w, per_channel=o.per_channel, symmetric=o.symmetric, reduce_range=o.reduce_range
            )
        )
        return (
            self.init(f"{base}_quantized", q),
            self.init(f"{base}_scale", scale),
            self.init(f"{base}_zero_point", zp),
        )

    def replace_node(self, node: ir.Node, y: ir.Value, name: str, counter: str) -> None:
        """``y`` replaces ``node``'s output (its consumers, graph-output slot and name); ``node`` goes."""
        out = node.outputs[0]
        y.name, y.shape, y.type = self.name(name), out.shape, out.type
        take_place(out, y)
        self.graph.remove(node, safe=True)
        self.count(counter)
