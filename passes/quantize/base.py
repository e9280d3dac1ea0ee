"""What every quantization pass shares: options for choosing nodes, decisions for the report,
calibration data from the pipeline context, and the node-level helpers.

A mode pass (``quantize-dynamic``, ``quantize-static``, ``quantize-weight-only``) subclasses
:class:`QuantizePassBase`, gives an ``Options`` dataclass that extends :class:`CommonOptions`,
and calls :meth:`QuantizePassBase.decide` once for every candidate node (quantized or not, with
the reason), so the report says which nodes were quantized and why the others stayed float.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, ClassVar

import onnx_ir as ir

from graphopt.calibration import CalibrationData
from graphopt.pipeline import Pass

__all__ = [
    "CommonOptions",
    "Decision",
    "QuantizePassBase",
    "matches_any",
]


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclasses.dataclass
class CommonOptions:
    """Options every quantization mode has."""

    exclude: list[str] = dataclasses.field(
        default_factory=list,
        metadata=_doc("node names, fnmatch patterns of names, or op types to leave in float"),
    )
    include: list[str] = dataclasses.field(
        default_factory=list,
        metadata=_doc("if given, quantize only nodes matching these names/patterns/op types"),
    )
    calibration: str | None = dataclasses.field(
        default=None, metadata=_doc(".npz file or folder of calibration data (or pass it to optimize())")
    )


@dataclasses.dataclass
class Decision:
    """One candidate node: quantized or left in float, and why."""

    node: str
    op_type: str
    quantized: bool
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def matches_any(node: ir.Node, patterns: list[str]) -> bool:
    """True when a pattern equals the node's op type or matches its name (fnmatch)."""
    name = node.name or ""
    return any(p == node.op_type or p == name or fnmatch.fnmatchcase(name, p) for p in patterns)


class QuantizePassBase(Pass):
    """Base of the quantization mode passes (see the module docstring for the contract)."""

    #: The ``optimize(quantize=...)`` modes this pass implements, each with the options it fixes
    #: (read through the registry: ``Registry.modes("quantize")``).
    modes: ClassVar[dict[str, dict[str, Any]]] = {}
    Options: ClassVar[type] = CommonOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.decisions: list[Decision] = []

    def __call__(self, model: ir.Model) -> ir.passes.PassResult:
        self.decisions = []
        result = super().__call__(model)
        self.details["nodes"] = [d.to_dict() for d in self.decisions]
        return result

    # --- choosing nodes ---------------------------------------------------------------------
    def selected(self, node: ir.Node) -> tuple[bool, str]:
        """Whether the user's include/exclude lists let ``node`` be quantized (and why not)."""
        opts = self.options
        if opts.include and not matches_any(node, list(opts.include)):
            return False, "not in include"
        if opts.exclude and matches_any(node, list(opts.exclude)):
            return False, "excluded"
        return True, ""

    def decide(self, node: ir.Node, quantized: bool, reason: str = "") -> None:
        """Record the decision for one candidate node (and count it in the report row)."""
        self.decisions.append(Decision(node.name or "", node.op_type, quantized, reason))
        if quantized:
            self.count("quantized")
        else:
            self.count(f"float:{reason or 'skipped'}")

    # --- calibration ------------------------------------------------------------------------
    def calibration_data(self) -> CalibrationData | None:
        """Calibration data from the ``calibration`` option or ``context['calibration']``."""
        source = (
            self.options.calibration
            if self.options.calibration is not None
            else self.context.get("calibration")
        )
        if source is None:
            return None
        data = CalibrationData.from_any(source)
        # Several steps (calibration, accuracy control) read the data: keep one re-iterable copy.
        if getattr(data, "_single_use", False):
            data = data.materialize()
            self.context["calibration"] = data
        return data
