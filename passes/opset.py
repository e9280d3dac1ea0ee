"""``upgrade-opset``: raise the model's default-domain (ONNX) opset, e.g. to 23 so that the
standard ``Attention`` and ``RMSNormalization`` fusions can fire.

Wraps ``onnxscript.version_converter``, which falls short in ways that would silently change a
model, so we guard (each place says why):

* a node whose adapter fails is only logged ("Skipping version conversion") and left as it was,
  while the model's opset is raised anyway: we watch its logger and fail instead;
* it walks the top-level graph and functions only, so a node inside an ``If``/``Loop``/``Scan``
  body is relabelled without its adapter: we refuse when such a node is of an op that has one;
* its own adapters start at opset 18 and it does not check the source version: from an older
  opset we use its fallback to the ONNX C API converter (which has the older adapters), and that
  fallback only logs when it fails, so we check the opset was actually raised.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx
import onnx_ir as ir

from graphopt.annotations import declared_annotations_only
from graphopt.errors import PassFailedError
from graphopt.pipeline import Pass

from .ir_helpers import all_nodes, is_standard, model_opset

__all__ = ["UpgradeOpsetPass"]

logger = logging.getLogger("graphopt.passes.opset")


@dataclasses.dataclass
class UpgradeOpsetOptions:
    version: int = dataclasses.field(
        default=23, metadata={"doc": "target default-domain opset (never lowered)"}
    )


class _Collect(logging.Handler):
    """Collects the version converter's per-node "Skipping version conversion" warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "Skipping version conversion" in msg or "not modified" in msg or "Failed to convert" in msg:
            self.messages.append(msg.splitlines()[0])


def _nested_nodes_with_adapters(model: ir.Model) -> list[str]:
    """Op types inside subgraphs that the converter would relabel without their adapter."""
    from onnxscript.version_converter import _version_converter as vc

    adapted = {op for (domain, op, _, up) in vc.registry.op_adapters if domain == "" and up}
    top = {id(n) for n in model.graph}
    for f in model.functions.values():
        top.update(id(n) for n in f)
    found = {n.op_type for n in all_nodes(model) if id(n) not in top and is_standard(n, *adapted)}
    return sorted(found)


class UpgradeOpsetPass(Pass):
    """Raise the default-domain opset to ``version`` (never lowers; no-op when already there).

    Safe because every node goes through the converter's adapter for each version step, a node
    it could not convert fails the pass instead of keeping old semantics under a new opset, and
    the result must pass the ONNX checker.
    """

    name = "upgrade-opset"
    Options = UpgradeOpsetOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        from onnxscript.version_converter import _version_converter as vc
        from onnxscript.version_converter import convert_version

        target = int(self.options.version)
        current = model_opset(model)
        if current >= target:
            return ir.passes.PassResult(model, False)
        newest = min(onnx.defs.onnx_opset_version(), vc.SUPPORTED_MAX_ONNX_OPSET)
        if target > newest:
            raise PassFailedError(
                f"upgrade-opset: version {target} is newer than this onnx/onnxscript support ({newest})"
            )
        if nested := _nested_nodes_with_adapters(model):
            raise PassFailedError(
                f"upgrade-opset: {nested} inside If/Loop/Scan bodies need an adapter the converter does not "
                "apply there; keep the model's opset"
            )
        # onnxscript's adapters cover opset 18 onwards; older models go through the ONNX C API.
        fallback = current < vc.SUPPORTED_MIN_ONNX_OPSET
        collect = _Collect()
        loggers = [
            logging.getLogger("onnxscript.version_converter"),
            logging.getLogger("onnxscript.version_converter._version_converter"),
        ]
        for lg in loggers:
            lg.addHandler(collect)
        try:
            convert_version(model, target, fallback=fallback)
        except Exception as e:  # the converter raises ValueError/VersionConverterError/onnx errors
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise PassFailedError(
                f"upgrade-opset: cannot convert opset {current} → {target}: {msg}"
            ) from None
        finally:
            for lg in loggers:
                lg.removeHandler(collect)
        if collect.messages:
            raise PassFailedError(f"upgrade-opset: opset {current} → {target} failed: {collect.messages[0]}")
        if model_opset(model) != target:
            raise PassFailedError(
                f"upgrade-opset: the converter left the model at opset {model_opset(model)}, not {target}"
            )
        with declared_annotations_only(model):  # graph outputs as declared where inference has less
            proto = ir.serde.serialize_model(model)
        if proto.ByteSize() < 2**31 - 1:  # the checker cannot take larger protos in memory
            try:
                onnx.checker.check_model(proto)
            except onnx.checker.ValidationError as e:
                msg = str(e).strip().splitlines()[0]
                raise PassFailedError(
                    f"upgrade-opset: the model at opset {target} is invalid: {msg}"
                ) from None
        self.count("from_opset", current)
        return ir.passes.PassResult(model, True)
