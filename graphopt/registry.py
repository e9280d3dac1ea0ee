"""Name → pass class and name → backend, from entry points.

Built-in passes and targets are found exactly like third-party plugins: through the
``graphopt.passes`` and ``graphopt.backends`` entry-point groups of installed packages. The core
never imports ``graphopt.passes`` or ``graphopt.backends`` directly (see DESIGN.md).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from importlib.metadata import entry_points
from typing import Any

import onnx_ir as ir

from graphopt.errors import PipelineError

__all__ = ["Registry", "PassInfo", "RuleInfo", "default_registry", "coerce_options"]

PASS_GROUP = "graphopt.passes"
BACKEND_GROUP = "graphopt.backends"


@dataclasses.dataclass(frozen=True)
class OptionInfo:
    name: str
    type: str
    default: Any
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class RuleInfo:
    """One rewrite rule of a rule-based pass (fusions): name, one line, the domain it emits."""

    name: str
    summary: str
    domain: str


@dataclasses.dataclass(frozen=True)
class PassInfo:
    """What `graphopt passes` shows for one pass."""

    name: str
    summary: str
    options: tuple[OptionInfo, ...]
    source: str
    rules: tuple[RuleInfo, ...] = ()


class Registry:
    """Pass and backend lookup. Instances are independent: tests and plugins may make their own."""

    def __init__(self, passes: dict[str, Any] | None = None, backends: dict[str, Any] | None = None):
        # Values are entry points (loaded lazily) or already-loaded classes/factories.
        self._passes: dict[str, Any] = dict(passes or {})
        self._backends: dict[str, Any] = dict(backends or {})

    @classmethod
    def from_entry_points(cls) -> Registry:
        passes = {ep.name: ep for ep in entry_points(group=PASS_GROUP)}
        backends = {ep.name: ep for ep in entry_points(group=BACKEND_GROUP)}
        return cls(passes, backends)

    def copy(self) -> Registry:
        return Registry(self._passes, self._backends)

    # --- passes ---------------------------------------------------------------------------
    def register_pass(self, name: str, cls: type[ir.passes.PassBase]) -> None:
        self._passes[name] = cls

    def pass_names(self) -> list[str]:
        return sorted(self._passes)

    def pass_class(self, name: str) -> type[ir.passes.PassBase]:
        try:
            obj = self._passes[name]
        except KeyError:
            import difflib

            close = difflib.get_close_matches(name, self._passes, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise PipelineError(
                f"unknown pass '{name}'{hint}; `graphopt passes` lists the available ones"
            ) from None
        if hasattr(obj, "load") and not isinstance(obj, type):
            try:
                obj = obj.load()
            except Exception as e:
                raise PipelineError(f"pass plugin '{name}' ({obj.value}) failed to load: {e}") from None
            self._passes[name] = obj
        if not (isinstance(obj, type) and issubclass(obj, ir.passes.PassBase)):
            raise PipelineError(f"pass plugin '{name}' is not an onnx_ir PassBase subclass")
        return obj

    def create_pass(self, name: str, options: dict[str, Any] | None = None) -> ir.passes.PassBase:
        cls = self.pass_class(name)
        options = dict(options or {})
        opts_cls = getattr(cls, "Options", None)
        if isinstance(opts_cls, type) and dataclasses.is_dataclass(opts_cls):
            return cls(**coerce_options(name, opts_cls, options))
        # A foreign onnx_ir pass: its constructor's keyword arguments are its options.
        params = inspect.signature(cls.__init__).parameters
        for key in options:
            if key not in params or key == "self":
                known = [p for p in params if p != "self"]
                raise PipelineError(f"pass '{name}' has no option '{key}' (options: {known})")
        try:
            return cls(**options)
        except TypeError as e:
            raise PipelineError(f"pass '{name}': {e}") from None

    def info(self, name: str) -> PassInfo:
        cls = self.pass_class(name)
        doc = inspect.getdoc(cls) or ""
        summary = _summary(doc)
        opts: list[OptionInfo] = []
        opts_cls = getattr(cls, "Options", None)
        if dataclasses.is_dataclass(opts_cls):
            hints = typing.get_type_hints(opts_cls)
            for f in dataclasses.fields(opts_cls):
                if f.default is not dataclasses.MISSING:
                    default = f.default
                elif f.default_factory is not dataclasses.MISSING:
                    default = f.default_factory()
                else:
                    default = None
                opts.append(
                    OptionInfo(f.name, _type_name(hints.get(f.name)), default, f.metadata.get("doc", ""))
                )
        else:
            for p in list(inspect.signature(cls.__init__).parameters.values())[1:]:
                if p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
                    continue
                default = None if p.default is inspect.Parameter.empty else p.default
                opts.append(OptionInfo(p.name, _type_name(p.annotation), default))
        # Rule-based passes (fusions) expose ``rule_list()``; duck-typed so the core never
        # imports the passes package.
        rules = tuple(
            RuleInfo(r.name, r.summary, getattr(r, "domain", ""))
            for r in (cls.rule_list() if hasattr(cls, "rule_list") else ())
        )
        return PassInfo(name, summary, tuple(opts), f"{cls.__module__}.{cls.__qualname__}", rules)

    def modes(self, family: str) -> dict[str, tuple[str, dict[str, Any]]]:
        """mode → (pass name, fixed options) for the passes named ``FAMILY-*`` that declare
        ``modes`` (a dict mode → the options that mode fixes, e.g. the weight-only pass's
        ``{"int4": {"bits": 4}, "int8-weight": {"bits": 8}}``), in pass-name order.

        The one place the list of, say, quantization modes comes from: a plugin that registers
        ``quantize-fp8`` with ``modes = {"fp8": {}}`` adds a mode without touching the core.
        """
        found: dict[str, tuple[str, dict[str, Any]]] = {}
        for name in self.pass_names():
            if not name.startswith(family + "-"):
                continue
            declared = getattr(self.pass_class(name), "modes", None)
            if not isinstance(declared, dict):
                continue
            for mode, fixed in declared.items():
                found.setdefault(mode, (name, dict(fixed)))
        return found

    # --- backends -------------------------------------------------------------------------
    def register_backend(self, name: str, factory: Any) -> None:
        self._backends[name] = factory

    def backend_names(self) -> list[str]:
        return sorted(self._backends)

    def backend(self, name: str) -> Any:
        try:
            obj = self._backends[name]
        except KeyError:
            known = ", ".join(self.backend_names()) or (
                "none installed (graphopt's own targets come from its entry points: install it with "
                "`pip install -e .`)"
            )
            raise PipelineError(f"unknown target '{name}'; available targets: {known}") from None
        if hasattr(obj, "load") and not isinstance(obj, type):
            obj = obj.load()
            self._backends[name] = obj
        return obj() if isinstance(obj, type) else obj


@functools.cache
def default_registry() -> Registry:
    """The registry of installed entry points (read once per process; never mutated)."""
    return Registry.from_entry_points()


def _summary(doc: str) -> str:
    """First sentence of a docstring's first paragraph (docstrings wrap mid-sentence)."""
    para = " ".join(doc.strip().split("\n\n")[0].split())
    if not para:
        return "(no description)"
    end = para.find(". ")
    return para[: end + 1] if end >= 0 else para


def _type_name(t: Any) -> str:
    if t is None or t is inspect.Parameter.empty:
        return "any"
    if isinstance(t, str):
        return t
    if isinstance(t, type):
        return t.__name__
    return str(t).replace("typing.", "")


def coerce_options(pass_name: str, opts_cls: type, options: dict[str, Any]) -> dict[str, Any]:
    """Check option names and convert values to the dataclass field types, with clear errors."""
    hints = typing.get_type_hints(opts_cls)
    fields = {f.name for f in dataclasses.fields(opts_cls)}
    out: dict[str, Any] = {}
    for key, value in options.items():
        if key not in fields:
            raise PipelineError(
                f"pass '{pass_name}' has no option '{key}' (options: {sorted(fields) or 'none'})"
            )
        out[key] = _coerce(pass_name, key, hints[key], value)
    return out


def _coerce(pass_name: str, key: str, t: Any, value: Any) -> Any:
    origin = typing.get_origin(t)
    args = typing.get_args(t)

    def fail() -> PipelineError:
        return PipelineError(f"pass '{pass_name}' option '{key}' must be {_type_name(t)}, got {value!r}")

    if t is Any:
        return value
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(pass_name, key, a, value)
            except PipelineError:
                continue
        raise fail()
    if origin is typing.Literal:
        if value in args:
            return value
        raise PipelineError(f"pass '{pass_name}' option '{key}' must be one of {list(args)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        items = [_coerce(pass_name, key, inner, v) for v in value]
        return tuple(items) if origin is tuple else items
    if t is bool:
        if isinstance(value, bool):
            return value
        raise fail()
    if t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise fail()
    if t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise fail()
    if t is str:
        if isinstance(value, str):
            return value
        raise fail()
    return value
