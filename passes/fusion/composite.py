"""``fuse``: every fusion rule set in the order that lets each consume what the previous made.

The order is the contract: normalization before the contrib pass (SkipLayerNormalization
consumes LayerNormalization), contrib before the standard activation rules (ONNX Runtime runs its
FastGelu/BiasGelu faster than a standard Gelu), shape chains last (attention fusion leaves
Transpose pairs behind). Backends list the same sets explicitly per target; a test keeps the two
in agreement.
"""

from __future__ import annotations

import dataclasses

from graphopt.errors import PipelineError
from graphopt.pipeline import CompositePass, Pipeline

from ._base import CONTRIB, STANDARD

__all__ = ["FusePass", "fusion_steps"]


def fusion_steps(domains: list[str]) -> list[str]:
    """The fusion passes, in order, for the op domains a target accepts."""
    unknown = sorted(set(domains) - {STANDARD, CONTRIB})
    if unknown or STANDARD not in domains:
        raise PipelineError(
            f"fuse: domains must include 'standard' and may add 'contrib', not {list(domains)}"
        )
    if CONTRIB in domains:
        # No fuse-gemm: ONNX Runtime fuses MatMul+Add itself and fuse-ort's attention patterns
        # expect MatMul projections. No standard RMSNormalization: fuse-ort's skip-rms-norm
        # consumes its own SimplifiedLayerNormalization instead.
        # fuse-attention (standard Attention, opset ≥ 23 models only) takes what fuse-ort left.
        early = [
            "fuse-batchnorm",
            "fuse-conv-bias",
            "fuse-normalization(exclude=[rms-norm])",
            "fuse-ort",
            "fuse-attention",
        ]
    else:
        early = ["fuse-batchnorm", "fuse-conv-bias", "fuse-gemm", "fuse-normalization", "fuse-attention"]
    return [*early, "fuse-activations", "fuse-constant-chains", "fuse-shape-chains"]


@dataclasses.dataclass
class FuseOptions:
    domains: list[str] = dataclasses.field(
        default_factory=lambda: [STANDARD, CONTRIB],
        metadata={"doc": "op domains the fusions may emit: standard, contrib (ONNX Runtime CPU/CUDA only)"},
    )


class FusePass(CompositePass):
    """All fusion rule sets in dependency order (``fuse(domains=[standard])`` for targets that
    cannot run com.microsoft ops). Each inner pass checks its own rewrites; see their docs."""

    name = "fuse"
    Options = FuseOptions

    def pipeline(self) -> Pipeline:
        return Pipeline.parse(",".join(fusion_steps(list(self.options.domains))))
