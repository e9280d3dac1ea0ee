"""Pass glue, pipelines, fixpoint groups and per-pass instrumentation.

A pass is an ``onnx_ir.passes.PassBase`` subclass, so onnx_ir's and onnxscript's passes drop in
unchanged. graphopt's own passes subclass :class:`Pass` for typed options and statistics.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any, ClassVar, Protocol

import onnx
import onnx_ir as ir

from graphopt import schemas as _schemas
from graphopt import spec as _spec
from graphopt.annotations import declared_annotations_only, set_aside_declared_shapes
from graphopt.errors import GraphoptError, PassChangedOutputsError, PassCrashedError, PipelineError
from graphopt.registry import Registry, default_registry

__all__ = [
    "Pass",
    "CompositePass",
    "Pipeline",
    "PassRecord",
    "ModelStats",
    "Report",
    "Instrument",
    "model_stats",
]

logger = logging.getLogger("graphopt.pipeline")


@dataclasses.dataclass
class NoOptions:
    """A pass without options."""


class Pass(ir.passes.InPlacePass):
    """Base of graphopt's passes: typed options (``Options`` dataclass) and report statistics.

    Subclasses set ``name``, document what the pass does and when it is safe in the class
    docstring (its first line is what ``graphopt passes`` prints), and implement ``call``.
    ``self.stats`` collects counts (rewrites, skips and why) that land in the report row.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions

    def __init__(self, **options: Any) -> None:
        from graphopt.registry import coerce_options

        self.options = self.Options(**coerce_options(self.name or type(self).__name__, self.Options, options))
        self.stats: dict[str, int] = {}
        #: Structured per-run details for the report (e.g. which nodes were quantized and why not).
        self.details: dict[str, Any] = {}
        #: Run-time inputs that are not pipeline text (calibration data given as Python objects);
        #: set by the pipeline runner from ``Pipeline.run(context=...)``.
        self.context: dict[str, Any] = {}

    def count(self, key: str, n: int = 1) -> None:
        self.stats[key] = self.stats.get(key, 0) + n

    def __call__(self, model: ir.Model) -> ir.passes.PassResult:  # type: ignore[override]  # models only
        self.stats = {}
        self.details = {}
        return super().__call__(model)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"


class CompositePass(Pass):
    """A pass made of a sub-pipeline (e.g. ``cleanup``); the runner reports each inner pass."""

    def pipeline(self) -> Pipeline:
        raise NotImplementedError

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model, report = self.pipeline().run(model, context=self.context)
        return ir.passes.PassResult(model, any(r.modified for r in report.passes))


# ---------------------------------------------------------------------------------------------
# Statistics and report


@dataclasses.dataclass
class ModelStats:
    nodes: int
    initializers: int
    initializer_bytes: int

    @classmethod
    def of(cls, model: ir.Model) -> ModelStats:
        return model_stats(model)


def model_stats(model: ir.Model) -> ModelStats:
    """Node count (subgraphs and functions included), initializer count and bytes."""
    from graphopt.ir import total_tensor_bytes

    nodes = sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))
    for f in model.functions.values():
        nodes += sum(1 for _ in ir.traversal.RecursiveGraphIterator(f))
    inits = sum(len(g.initializers) for g in model.graphs())
    return ModelStats(nodes, inits, total_tensor_bytes(model))


@dataclasses.dataclass
class PassRecord:
    """One pass execution as the report shows it."""

    name: str
    wall_s: float
    modified: bool
    before: ModelStats
    after: ModelStats
    iteration: int | None = None
    stats: dict[str, int] = dataclasses.field(default_factory=dict)
    #: JSON-safe structured details a pass reports (lists of nodes, per-layer numbers).
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["wall_s"] = round(self.wall_s, 6)
        if not self.details:
            d.pop("details")
        return d


@dataclasses.dataclass
class Report:
    """What the pipeline did: a row per pass execution plus before/after totals."""

    pipeline: str
    before: ModelStats
    after: ModelStats
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    target: str | None = None
    verification: Any = None
    wall_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "target": self.target,
            "wall_s": round(self.wall_s, 6),
            "before": dataclasses.asdict(self.before),
            "after": dataclasses.asdict(self.after),
            "passes": [p.to_dict() for p in self.passes],
            "verification": self.verification.to_dict() if self.verification is not None else None,
        }

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    def summary(self) -> str:
        b, a = self.before, self.after
        return (
            f"nodes {b.nodes} -> {a.nodes}, initializers {b.initializers} -> {a.initializers}, "
            f"weights {_mb(b.initializer_bytes)} -> {_mb(a.initializer_bytes)}, {self.wall_s:.2f}s"
        )

    def table(self) -> str:
        """A per-pass table for terminals (only rows that changed something, plus totals)."""
        rows = [("pass", "nodes", "inits", "weights", "time", "details")]
        for p in self.passes:
            if not p.modified:
                continue
            it = f"#{p.iteration}" if p.iteration is not None else ""
            details = ", ".join(f"{k}={v}" for k, v in sorted(p.stats.items()))
            rows.append(
                (
                    p.name + it,
                    f"{p.before.nodes}->{p.after.nodes}",
                    f"{p.before.initializers}->{p.after.initializers}",
                    f"{_mb(p.before.initializer_bytes)}->{_mb(p.after.initializer_bytes)}",
                    f"{p.wall_s * 1000:.0f}ms",
                    details,
                )
            )
        rows.append(
            (
                "total",
                f"{self.before.nodes}->{self.after.nodes}",
                f"{self.before.initializers}->{self.after.initializers}",
                f"{_mb(self.before.initializer_bytes)}->{_mb(self.after.initializer_bytes)}",
                f"{self.wall_s * 1000:.0f}ms",
                "",
            )
        )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

    def __str__(self) -> str:
        return self.table()


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}MB" if n >= 100_000 else f"{n / 1e3:.1f}kB"


# ---------------------------------------------------------------------------------------------
# Instruments


class Instrument(Protocol):
    """Hooks around each pass (MLIR PassInstrumentation style). All methods are optional."""

    def before_pass(self, name: str, model: ir.Model) -> None: ...

    def after_pass(self, name: str, model: ir.Model, record: PassRecord) -> None: ...

    def after_pass_failed(self, name: str, model: ir.Model, error: BaseException) -> None: ...


def _fingerprint(model: ir.Model) -> str:
    proto = ir.serde.serialize_model(model)
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


class _Runner:
    def __init__(
        self,
        registry: Registry,
        *,
        verify_each: bool,
        numeric_each: bool,
        reference: ir.Model | None,
        verify_options: dict[str, Any],
        dump_dir: str | None,
        instruments: Sequence[Any],
        check_modified: bool,
        context: dict[str, Any] | None = None,
    ) -> None:
        self.registry = registry
        # The caller's dict itself: what a pass caches there (calibration ranges) outlives the run.
        self.context = context if context is not None else {}
        self.verify_each = verify_each
        self.numeric_each = numeric_each
        self.reference = reference
        self.verify_options = verify_options
        self.dump_dir = dump_dir
        self.instruments = list(instruments)
        self.check_modified = check_modified
        self.records: list[PassRecord] = []
        self.history: list[str] = []
        self._inputs: Any = None
        #: Schema problems the input already had (by node signature): not blamed on a pass.
        self.tolerated: set[_schemas.Signature] = set()
        #: How many passes had run at the last schema check.
        self.checked = 0

    def run_steps(self, model: ir.Model, steps: Sequence[Any], prefix: str, iteration: int | None) -> bool:
        modified = False
        for step in steps:
            if isinstance(step, _spec.FixpointSpec):
                for i in range(1, step.max_iterations + 1):
                    changed = self.run_steps(model, step.steps, prefix, i)
                    modified |= changed
                    if not changed:
                        break
                else:
                    logger.info("fixpoint group reached max_iterations=%d", step.max_iterations)
            else:
                p = (
                    step
                    if isinstance(step, ir.passes.PassBase)
                    else self.registry.create_pass(step.name, step.options)
                )
                if isinstance(p, Pass):
                    p.context = self.context
                name = prefix + (
                    step.name if isinstance(step, _spec.PassSpec) else getattr(p, "name", type(p).__name__)
                )
                modified |= self.run_pass(model, p, name, iteration)
        return modified

    def run_pass(self, model: ir.Model, p: ir.passes.PassBase, name: str, iteration: int | None) -> bool:
        if isinstance(p, CompositePass):
            sub = p.pipeline()
            return self.run_steps(model, sub.steps, name + "/", iteration)
        for inst in self.instruments:
            if hasattr(inst, "before_pass"):
                inst.before_pass(name, model)
        before = model_stats(model)
        fp = _fingerprint(model) if self.check_modified else None
        t0 = time.perf_counter()
        try:
            result = p(model)
        except GraphoptError:
            raise
        except Exception as e:
            for inst in self.instruments:
                if hasattr(inst, "after_pass_failed"):
                    inst.after_pass_failed(name, model, e)
            raise PassCrashedError(
                f"pass '{name}' failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
                f"{self._after()}"
            ) from e
        wall = time.perf_counter() - t0
        if result.model is not model:
            # Functional passes return a new model: adopt its content in place so callers keep
            # one object (a pipeline as a whole is in-place).
            _adopt(model, result.model)
        if fp is not None and not result.modified and _fingerprint(model) != fp:
            raise PassCrashedError(f"pass '{name}' reported no change but changed the model{self._after()}")
        record = PassRecord(
            name,
            wall,
            bool(result.modified),
            before,
            model_stats(model),
            iteration,
            dict(getattr(p, "stats", {}) or {}),
            dict(getattr(p, "details", {}) or {}),
        )
        self.records.append(record)
        self.history.append(name)
        if result.modified:
            self.check(model, name)
        if self.dump_dir:
            self.dump(model, name, iteration)
        for inst in self.instruments:
            if hasattr(inst, "after_pass"):
                inst.after_pass(name, model, record)
        return bool(result.modified)

    def _after(self) -> str:
        return f" (after: {', '.join(self.history[-5:])})" if self.history else " (first pass)"

    def check(self, model: ir.Model, name: str) -> None:
        self.check_schemas(model, name)
        if self.verify_each:
            with declared_annotations_only(model):  # graph outputs as declared, where inference has less
                proto = ir.serde.serialize_model(model)
            try:
                if proto.ByteSize() < 2**31 - 1:
                    onnx.checker.check_model(proto)
            except onnx.checker.ValidationError as e:
                msg = str(e).strip().splitlines()[0]
                raise PassCrashedError(
                    f"pass '{name}' produced an invalid model: {msg}{self._after_prev()}"
                ) from None
        if self.numeric_each and self.reference is not None:
            from graphopt.verify import runnable_inputs, verify

            if self._inputs is None:
                self._inputs = self.verify_options.get("inputs") or runnable_inputs(
                    self.reference,
                    dims=self.verify_options.get("dims"),
                    seed=self.verify_options.get("seed", 0),
                )
            opts = {k: v for k, v in self.verify_options.items() if k not in ("inputs",)}
            result = verify(self.reference, model, inputs=self._inputs, **opts)
            if not result.passed:
                raise PassChangedOutputsError(
                    f"pass '{name}' changed the model's outputs: {result.failure_summary()}{self._after_prev()}"
                )

    def check_schemas(self, model: ir.Model, name: str | None) -> None:
        """Every node against its op's schema at the model's opsets (no serialization, no ONNX
        Runtime session): a pass that emits an op or attribute the opset lacks is a bug, named here
        rather than by ONNX Runtime refusing the written file. ``name`` None: the final check, for
        what passes that reported no change since the last check did."""
        for node, problem in _schemas.model_problems(model, self.tolerated):
            what = f"node '{node.name}' ({node.op_type})" if node.name else f"a {node.op_type} node"
            rule = node.metadata_props.get("graphopt.rule")
            made = f", made by rule '{rule}'" if rule else ""
            if name is None:
                unchecked = ", ".join(self.history[self.checked :][-5:])
                who = f"one of the passes that reported no change ({unchecked})"
                after = ""
            else:
                who, after = f"pass '{name}'", self._after_prev()
            raise PassCrashedError(
                f"{who} produced an invalid model: {what}{made}: {problem} (ONNX Runtime would "
                f"refuse to load it){after}"
            )
        self.checked = len(self.history)

    def _after_prev(self) -> str:
        prev = self.history[:-1][-5:]
        return f" (passes before it: {', '.join(prev)})" if prev else ""

    def dump(self, model: ir.Model, name: str, iteration: int | None) -> None:
        from graphopt.ir import save

        os.makedirs(self.dump_dir, exist_ok=True)  # type: ignore[arg-type]
        safe = name.replace("/", ".")
        suffix = f"-{iteration}" if iteration is not None else ""
        path = os.path.join(self.dump_dir, f"{len(self.records):03d}_{safe}{suffix}.onnx")  # type: ignore[arg-type]
        save(model, path)


def _infer_shapes(registry: Registry, model: ir.Model) -> None:
    """Run the registered ``shape-inference`` pass (found by name: the core knows no pass) outside
    the report; nothing when none is registered."""
    if "shape-inference" in registry.pass_names():
        registry.create_pass("shape-inference")(model)


def _adopt(dst: ir.Model, src: ir.Model) -> None:
    dst.graph = src.graph
    dst.functions.clear()
    dst.functions.update(src.functions)
    dst.metadata_props.clear()
    dst.metadata_props.update(src.metadata_props)
    dst.ir_version = src.ir_version


# ---------------------------------------------------------------------------------------------
# Pipeline


class Pipeline:
    """An ordered list of pass steps and fixpoint groups; text/JSON/YAML round-trip.

    >>> p = Pipeline.parse("fixpoint[fold-constants,remove-unused],cse")
    >>> Pipeline.parse(str(p)) == p
    True
    """

    def __init__(
        self, steps: Iterable[_spec.Step | str], *, registry: Registry | None = None, validate: bool = True
    ) -> None:
        norm: list[_spec.Step] = []
        for s in steps:
            if isinstance(s, str):
                norm.extend(_spec.parse_text(s))
            elif isinstance(s, (_spec.PassSpec, _spec.FixpointSpec)):
                norm.append(s)
            else:
                raise PipelineError(f"cannot use {s!r} as a pipeline step; give a pass name or spec")
        self.steps: tuple[_spec.Step, ...] = tuple(norm)
        if validate:
            self.validate(registry)

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def parse(cls, text: str, *, registry: Registry | None = None) -> Pipeline:
        """Parse pipeline text (``cleanup,fuse,quantize(mode=static)``); names are checked."""
        return cls(_spec.parse_text(text), registry=registry)

    @classmethod
    def from_data(cls, data: Any, *, registry: Registry | None = None) -> Pipeline:
        return cls(_spec.from_data(data), registry=registry)

    @classmethod
    def load(cls, path: str | os.PathLike, *, registry: Registry | None = None) -> Pipeline:
        """Read a pipeline from a .json, .yaml/.yml or text file."""
        return cls(_spec.load_file(path), registry=registry)

    @classmethod
    def coerce(cls, value: Pipeline | str | Sequence[Any], *, registry: Registry | None = None) -> Pipeline:
        """Accept a Pipeline, spec text, a file path, or a list of steps."""
        if isinstance(value, Pipeline):
            return value
        if isinstance(value, (str, os.PathLike)):
            text = os.fspath(value)
            if os.path.isfile(text):
                return cls.load(text, registry=registry)
            return cls.parse(text, registry=registry)
        return cls.from_data(list(value), registry=registry)

    def validate(self, registry: Registry | None = None) -> None:
        """Check every pass name and option now, so errors come before any work."""
        reg = registry or default_registry()

        def walk(steps: Sequence[_spec.Step]) -> None:
            for s in steps:
                if isinstance(s, _spec.FixpointSpec):
                    walk(s.steps)
                else:
                    reg.create_pass(s.name, s.options)

        walk(self.steps)

    # --- printing -----------------------------------------------------------------------------
    def __str__(self) -> str:
        return _spec.format_text(self.steps)

    def __repr__(self) -> str:
        return f"Pipeline.parse({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Pipeline) and self.steps == other.steps

    def __hash__(self) -> int:
        return hash(str(self))

    def to_data(self) -> list:
        return _spec.to_data(self.steps)

    def to_json(self) -> str:
        return json.dumps({"pipeline": self.to_data()}, indent=2)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump({"pipeline": self.to_data()}, sort_keys=False)

    # --- running ------------------------------------------------------------------------------
    def run(
        self,
        model: ir.Model,
        *,
        registry: Registry | None = None,
        verify_each: bool = False,
        numeric_each: bool = False,
        reference: ir.Model | None = None,
        verify_options: dict[str, Any] | None = None,
        dump_dir: str | os.PathLike | None = None,
        instruments: Sequence[Any] = (),
        check_modified: bool | None = None,
        context: dict[str, Any] | None = None,
    ) -> tuple[ir.Model, Report]:
        """Run in place on ``model`` and return it with the report.

        ``verify_each`` runs the ONNX checker after each pass that changed the model;
        ``numeric_each`` also compares outputs with ``reference`` (default: a copy of the input)
        on ONNX Runtime, so a broken model names the pass that broke it. ``check_modified``
        (default: ``GRAPHOPT_DEBUG`` set) fails a pass that says "unchanged" but changed the model.
        ``context`` hands passes run-time inputs that pipeline text cannot hold (e.g.
        ``{"calibration": iterable_of_feeds}``); passes read it as ``self.context``.

        Before the first pass, the shapes the model declares for computed values are set aside
        (:func:`graphopt.annotations.set_aside_declared_shapes`): they are claims, and the passes
        see only inferred shapes (the registered ``shape-inference`` pass runs then, outside the
        report, so that passes which read shapes without inferring them find some). After every pass that changed the model (and once more at the end
        if passes ran after the last check), each node is checked against its op's schema at the
        model's opsets (:mod:`graphopt.schemas`); a node that does not fit (an op or attribute the
        opset lacks) raises :class:`PassCrashedError` naming the pass.
        """
        if check_modified is None:
            check_modified = bool(os.environ.get("GRAPHOPT_DEBUG"))
        if numeric_each and reference is None:
            reference = model.clone()
        runner = _Runner(
            registry or default_registry(),
            verify_each=verify_each or numeric_each,
            numeric_each=numeric_each,
            reference=reference,
            verify_options=dict(verify_options or {}),
            dump_dir=os.fspath(dump_dir) if dump_dir is not None else None,
            instruments=instruments,
            check_modified=check_modified,
            context=context,
        )
        before = model_stats(model)
        t0 = time.perf_counter()
        # Rewrites rely only on shapes inferred from the inputs and constants, never on declared ones.
        if set_aside_declared_shapes(model):
            # Passes that read shapes without inferring them found the declared ones; inferred ones
            # stand in (the first inference also takes what it confirms of the declarations).
            _infer_shapes(runner.registry, model)
        runner.tolerated = _schemas.problem_signatures(model)
        runner.run_steps(model, self.steps, "", None)
        if runner.checked < len(runner.history):  # passes ran since the last check: one more
            runner.check_schemas(model, None)
        report = Report(
            str(self), before, model_stats(model), runner.records, wall_s=time.perf_counter() - t0
        )
        return model, report
