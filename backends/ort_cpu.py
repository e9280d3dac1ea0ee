"""ONNX Runtime CPU execution provider target."""

from __future__ import annotations

from typing import Any

from graphopt.backends.base import Backend

__all__ = ["OrtCpuBackend"]


class OrtCpuBackend(Backend):
    """ONNX Runtime on the CPU: cleanup, standard fusions, then com.microsoft contrib fusions."""

    name = "ort-cpu"
    providers = ("CPUExecutionProvider",)
    allows_contrib_ops = True

    def session_options(self) -> dict[str, Any]:
        # The graph arrives optimized; ORT's own level-ALL rewrites still add layout work.
        return {}
