"""The Backend interface: a target profile (providers, default pipeline, lowering choices).

A backend chooses passes and their options; it never implements a rewrite itself.
Backends are built from phase functions, the same shape for every target (TVM's
``relax/backend/<target>/pipeline.py``): ``cleanup_passes``, ``fusion_passes``,
``quantize_passes``, ``finalize_passes``; ``default_pipeline`` strings them together.
"""

from __future__ import annotations

from typing import Any, ClassVar

import onnx_ir as ir

from graphopt.spec import PassSpec, format_text

__all__ = ["Backend"]


class Backend:
    """Base of every target. Subclasses set ``name`` and ``providers`` and override phases."""

    name: ClassVar[str] = ""
    providers: ClassVar[tuple[str, ...]] = ("CPUExecutionProvider",)
    #: True when the target can run com.microsoft contrib ops (ONNX Runtime CPU/CUDA).
    allows_contrib_ops: ClassVar[bool] = False

    def cleanup_passes(self, level: int) -> list[str]:
        return ["cleanup"] if level > 0 else []

    def prune_passes(self, level: int, options: dict[str, Any] | None) -> list[str]:
        """Pruning runs on the cleaned, unfused graph, where its units (channels, FFN neurons,
        heads) are plain Conv/MatMul/Gemm weights that the later fusions and quantization keep."""
        return [format_text([PassSpec("prune", dict(options))])] if options else []

    def fusion_domains(self, quantize: dict[str, Any] | None) -> list[str]:
        """Op domains the fusions may emit before quantization.

        Static (QDQ) quantization needs the standard ops it places Q/DQ around: contrib fusions
        such as FusedConv would hide Conv from ONNX Runtime's QDQ kernels, so they are left out.
        """
        if not self.allows_contrib_ops or (quantize and quantize.get("mode") == "static"):
            return ["standard"]
        return ["standard", "contrib"]

    def fusion_passes(self, level: int, quantize: dict[str, Any] | None = None) -> list[str]:
        """The fusion rule sets in dependency order (one list, shared with the ``fuse`` pass);
        com.microsoft contrib fusions only for targets that run them."""
        if level < 2:
            return []
        from graphopt.passes.fusion.composite import fusion_steps

        return fusion_steps(self.fusion_domains(quantize))

    def quantize_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """The target's lowering choices for a quantization request (user options win)."""
        return dict(options)

    def quantize_passes(self, level: int, options: dict[str, Any] | None) -> list[str]:
        return [format_text([PassSpec("quantize", self.quantize_options(options))])] if options else []

    def finalize_passes(self, level: int) -> list[str]:
        # Fusions leave dead shape arithmetic and duplicate constants behind.
        return ["cleanup"] if level >= 2 else []

    def default_pipeline(
        self, level: int = 2, *, quantize: dict[str, Any] | None = None, prune: dict[str, Any] | None = None
    ) -> str:
        """Pipeline text for an optimization level (0: nothing, 1: cleanup, 2+: everything), with
        pruning and quantization when asked (they run at any level: the user asked for them)."""
        steps = [
            *self.cleanup_passes(level),
            *self.prune_passes(level, prune),
            *self.fusion_passes(level, quantize),
            *self.quantize_passes(level, quantize),
        ]
        final = self.finalize_passes(level)
        if not final and (quantize or prune) and level > 0:
            final = ["cleanup"]
        return ",".join([*steps, *final])

    def provider_options(self) -> list[dict[str, Any]]:
        return [{} for _ in self.providers]

    def session_options(self) -> dict[str, Any]:
        return {}

    def session(self, model: ir.Model) -> Any:
        """An onnxruntime.InferenceSession configured for this target (CPU fallback if absent)."""
        import onnxruntime as ort

        from graphopt.ir import to_bytes

        so = ort.SessionOptions()
        for key, value in self.session_options().items():
            setattr(so, key, value)
        available = set(ort.get_available_providers())
        providers = [(p, o) for p, o in zip(self.providers, self.provider_options()) if p in available]
        if not providers:
            providers = [("CPUExecutionProvider", {})]
        return ort.InferenceSession(to_bytes(model), so, providers=providers)
