"""The normalization ops quantization folds per-channel factors into (SmoothQuant, AWQ, centering)
and that mark a transformer's residual stream: one table of where each op keeps its per-channel
scale (gamma) and shift (beta) (and, for the fused skip-norms, the bias added before
normalizing), so supporting another norm op is one line here."""

from __future__ import annotations

import dataclasses

import onnx_ir as ir

from ...ir_helpers import MS_DOMAIN

__all__ = ["NORMS", "NORM_OPS", "Norm", "norm_of"]


@dataclasses.dataclass(frozen=True)
class Norm:
    """Where a normalization op keeps its per-channel parameters (its output is
    ``normalized(x) * scale (+ shift)`` over the last axis)."""

    #: Input index of the per-channel scale.
    scale: int
    #: Input index of the per-channel shift; None when the op has none (RMS norms).
    shift: int | None
    #: The domains that define the op ("" is the default domain).
    domains: tuple[str, ...]
    #: Fused residual add first (a second data input before the parameters, the sum as an output).
    skip: bool = False
    #: Input index of the bias added before normalizing (fused skip-norms), None when it has none.
    bias: int | None = None

    @property
    def params(self) -> tuple[int, ...]:
        """The parameter inputs, scale first."""
        return (self.scale,) if self.shift is None else (self.scale, self.shift)


NORMS: dict[str, Norm] = {
    "LayerNormalization": Norm(1, 2, ("", MS_DOMAIN)),
    "RMSNormalization": Norm(1, None, ("",)),
    "SimplifiedLayerNormalization": Norm(1, None, ("", MS_DOMAIN)),
    "SkipLayerNormalization": Norm(2, 3, (MS_DOMAIN,), skip=True, bias=4),
    "SkipSimplifiedLayerNormalization": Norm(2, None, (MS_DOMAIN,), skip=True, bias=3),
}

#: The op types of :data:`NORMS` (for checks that look at the op type alone).
NORM_OPS: frozenset[str] = frozenset(NORMS)


def norm_of(node: ir.Node | None) -> Norm | None:
    """The table row of ``node`` when it is one of :data:`NORMS` in a domain that defines it."""
    if node is None:
        return None
    norm = NORMS.get(node.op_type)
    return norm if norm is not None and node.domain in norm.domains else None
