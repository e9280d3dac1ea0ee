"""Quantization passes: dynamic int8, static int8 (QDQ), int4/int8 weight-only.

``quantize(mode=…)`` is the one name pipelines and ``optimize(quantize=…)`` use: it runs the mode's
pass (``quantize-dynamic``, ``quantize-static``, ``quantize-weight-only``) with the options that
apply to it, and adds accuracy control on top (``sensitivity=true`` measures every layer alone;
``min_cosine=X`` keeps the most sensitive layers in float until the outputs reach cosine X).
Its options are the union of the mode passes' options, so ``graphopt passes`` documents them all;
an option that does not apply to the chosen mode is an error, not ignored.
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from typing import Any, ClassVar

import onnx_ir as ir

from graphopt.errors import GraphoptError, PipelineError
from graphopt.pipeline import Pass
from graphopt.registry import coerce_options, default_registry

from .accuracy import Fidelity, fidelity, greedy_keep_float

__all__ = ["QuantizePass", "mode_pass", "modes"]

logger = logging.getLogger("graphopt.passes.quantize")


def modes() -> dict[str, tuple[str, dict[str, Any]]]:
    """mode → (mode pass name, the options the mode fixes), from the registry: every
    ``quantize-*`` pass declares the modes it implements (the weight-only pass serves two, by bit
    width), so a plugin adds a mode by registering its pass."""
    return default_registry().modes("quantize")


def mode_pass(mode: str) -> type[Pass]:
    """The pass class that implements ``mode``."""
    known = modes()
    if mode not in known:
        raise PipelineError(f"unknown quantization mode '{mode}'; use one of {list(known)}")
    return typing.cast(type[Pass], default_registry().pass_class(known[mode][0]))


def _mode_classes() -> dict[str, type]:
    return {mode: mode_pass(mode) for mode in modes()}


@dataclasses.dataclass
class _ControlOptions:
    mode: str = dataclasses.field(
        default="dynamic",
        metadata={
            "doc": "dynamic | static (needs calibration) | int4 | int8-weight | a "
            "plugin's (the quantize-* passes' modes)"
        },
    )
    min_cosine: float | None = dataclasses.field(
        default=None,
        metadata={
            "doc": "fidelity target: keep the most sensitive layers in float until the "
            "outputs' worst per-row cosine to the float model reaches it"
        },
    )
    sensitivity: bool = dataclasses.field(
        default=False, metadata={"doc": "measure every layer quantized alone (report details 'sensitivity')"}
    )
    max_float: int | None = dataclasses.field(
        default=None, metadata={"doc": "at most this many layers kept in float by min_cosine"}
    )
    eval_batches: int = dataclasses.field(
        default=4, metadata={"doc": "calibration batches used to measure fidelity (else generated inputs)"}
    )


def _union_options() -> type:
    """``_ControlOptions`` plus every mode pass's options, each defaulting to None (= the mode's default)."""
    fields: list[tuple[str, Any, Any]] = []
    seen: dict[str, Any] = {}
    for mode, cls in _mode_classes().items():
        fixed = modes()[mode][1]
        opts = cls.Options
        hints = typing.get_type_hints(opts)
        for f in dataclasses.fields(opts):
            if f.name in _CONTROL_FIELDS or f.name in fixed:
                continue
            t = hints[f.name]
            if f.name in seen:
                if seen[f.name] != t:  # same name, different types across modes: check in the mode pass
                    seen[f.name] = Any
                continue
            seen[f.name] = t
            fields.append((f.name, f.metadata))
    result = []
    for name, meta in fields:
        t = seen[name]
        result.append((name, t if t is Any else t | None, dataclasses.field(default=None, metadata=meta)))
    return dataclasses.make_dataclass("QuantizeOptions", result, bases=(_ControlOptions,))


_CONTROL_FIELDS = {f.name for f in dataclasses.fields(_ControlOptions)}


class QuantizePass(Pass):
    """Quantize with one mode (dynamic, static, int4, int8-weight), with optional accuracy control.

    Safe as the chosen mode pass is (each skips what it cannot prove and says why); the accuracy
    control only ever leaves more layers in float. Sensitivity and ``min_cosine`` run ONNX Runtime
    on copies of the model: with calibration data on its first ``eval_batches`` batches, else on
    generated inputs.
    """

    name = "quantize"
    Options: ClassVar[type] = _union_options()

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        mode_pass(self.options.mode)  # an unknown mode fails now
        self.mode_options()  # options that do not apply to the mode fail now, before any work

    # --- options -----------------------------------------------------------------------------
    def mode_options(self, **extra: Any) -> dict[str, Any]:
        """The options given for the mode pass (None = not given), checked against that pass."""
        mode = self.options.mode
        cls = mode_pass(mode)
        own = {f.name for f in dataclasses.fields(cls.Options)}
        given = {
            f.name: getattr(self.options, f.name)
            for f in dataclasses.fields(self.options)
            if f.name not in _CONTROL_FIELDS and getattr(self.options, f.name) is not None
        }
        fixed = modes()[mode][1]
        wrong = sorted(k for k in given if k not in own or k in fixed)
        if wrong:
            raise PipelineError(
                f"quantize: option(s) {wrong} do not apply to mode={mode} "
                f"(its options: {sorted(own - set(fixed))})"
            )
        given.update(fixed)
        for key, value in extra.items():
            if key == "exclude":  # accuracy control adds to the user's exclusions
                value = [*(given.get(key) or []), *value]
            given[key] = value  # include (one layer for sensitivity) replaces the user's
        return coerce_options(f"quantize-{mode}", cls.Options, given)

    def make_mode_pass(self, **extra: Any) -> Pass:
        p = mode_pass(self.options.mode)(**self.mode_options(**extra))
        p.context = self.context
        return p

    # --- running ---------------------------------------------------------------------------
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        if opts.min_cosine is not None and not (0.0 < opts.min_cosine <= 1.0):
            raise PipelineError(f"quantize: min_cosine must be in (0, 1], got {opts.min_cosine}")
        if opts.min_cosine is None and not opts.sensitivity:
            return self._run(model, self.make_mode_pass())
        return self._controlled(model)

    def _run(self, model: ir.Model, p: Pass) -> ir.passes.PassResult:
        result = p(model)
        for k, v in p.stats.items():
            self.count(k, v)
        self.details.update(p.details)
        return result

    def _controlled(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        feeds = self._eval_feeds(model)
        reference = _outputs(model, feeds)

        def quantized_copy(**extra: Any) -> tuple[ir.Model, Pass]:
            work = model.clone()
            p = self.make_mode_pass(**extra)
            p(work)
            return work, p

        def measure(candidate: ir.Model) -> Fidelity:
            return fidelity(reference, _outputs(candidate, feeds))

        full, probe = quantized_copy()
        layers = [d for d in probe.decisions if d.quantized and d.node]
        base = measure(full)
        self.details["fidelity_all_quantized"] = base.to_dict()
        logger.info("all %d layers quantized: min cosine %.6f", len(layers), base.min_cosine)
        need_control = opts.min_cosine is not None and base.min_cosine < opts.min_cosine
        ranking: list[tuple[str, str, Fidelity]] = []
        if opts.sensitivity or need_control:
            for d in layers:
                single, _ = quantized_copy(include=[d.node])
                ranking.append((d.node, d.op_type, measure(single)))
            ranking.sort(key=lambda r: (r[2].min_cosine, r[2].sqnr_db, r[0]))
            self.details["sensitivity"] = [{"node": n, "op_type": t, **f.to_dict()} for n, t, f in ranking]
        keep: list[str] = []
        if need_control:
            cache: dict[tuple[str, ...], Fidelity] = {}

            def evaluate(kept: list[str]) -> Fidelity:
                key = tuple(kept)
                if key not in cache:
                    cache[key] = measure(quantized_copy(exclude=kept)[0]) if kept else base
                return cache[key]

            keep, achieved, trials = greedy_keep_float(
                [r[0] for r in ranking], evaluate, float(opts.min_cosine), max_float=opts.max_float
            )
            self.details["kept_float_for_accuracy"] = keep
            self.details["fidelity"] = achieved.to_dict()
            self.details["accuracy_trials"] = trials
            if achieved.min_cosine < opts.min_cosine:
                logger.warning(
                    "quantize: min_cosine %.6f not reached (best %.6f keeping %d layers in float)",
                    opts.min_cosine,
                    achieved.min_cosine,
                    len(keep),
                )
                self.details["target_met"] = False
            else:
                self.details["target_met"] = True
        else:
            self.details["fidelity"] = base.to_dict()
        final = self.make_mode_pass(exclude=keep) if keep else self.make_mode_pass()
        result = self._run(model, final)
        if keep:
            kept = set(keep)
            for row in self.details.get("nodes", []):
                if row["node"] in kept and row["reason"] == "excluded":
                    row["reason"] = "kept float for min_cosine"
                    self.count("float:excluded", -1)
                    self.count("float:min_cosine")
            if self.stats.get("float:excluded") == 0:
                del self.stats["float:excluded"]
        return result

    def _eval_feeds(self, model: ir.Model) -> list[dict[str, Any]]:
        from graphopt.calibration import CalibrationData
        from graphopt.inputs import generate_inputs

        source = getattr(self.options, "calibration", None) or self.context.get("calibration")
        if source is not None:
            data = CalibrationData.from_any(source)
            if getattr(data, "_single_use", False):
                data = data.materialize()
                self.context["calibration"] = data
            batches = list(data.batches(self.options.eval_batches))
            if batches:
                return batches
        try:
            return [generate_inputs(model, seed=s) for s in range(min(2, self.options.eval_batches))]
        except GraphoptError as e:
            raise PipelineError(
                f"quantize: cannot generate inputs to measure fidelity ({e}); give calibration data"
            ) from None


def _outputs(model: ir.Model, feeds: list[dict[str, Any]]) -> list[list[Any]]:
    from graphopt.verify import run_model

    return [[v for _, v in run_model(model, f)] for f in feeds]
