"""Pipelines as data: text ⇄ objects ⇄ JSON/YAML, round-tripping exactly.

Text grammar (MLIR-style textual pipelines, simplified)::

    pipeline := step ("," step)*
    step     := NAME ["(" option ("," option)* ")"]
              | "fixpoint" ["(" "max_iterations" "=" INT ")"] "[" pipeline "]"
    option   := NAME "=" value
    value    := INT | FLOAT | true | false | none | NAME | "quoted string" | "[" [value ("," value)*] "]"

``parse(print(p)) == p`` holds for every pipeline: printing is canonical (options sorted).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

from graphopt.errors import PipelineError

__all__ = ["PassSpec", "FixpointSpec", "Step", "parse_text", "format_text", "from_data", "to_data"]

Value = int | float | bool | str | None | list


@dataclasses.dataclass(frozen=True)
class PassSpec:
    """One pass by registered name, with its options as plain data."""

    name: str
    options: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __hash__(self) -> int:
        return hash((self.name, json.dumps(self.options, sort_keys=True, default=str)))


@dataclasses.dataclass(frozen=True)
class FixpointSpec:
    """A group of steps repeated until none of them changes the model (or the limit is hit)."""

    steps: tuple[Step, ...]
    max_iterations: int = 8


Step = PassSpec | FixpointSpec

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-/:*]*")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*([eE][+-]?\d+)?|\.\d+([eE][+-]?\d+)?|inf|nan)")
_RATIO = re.compile(r"\d+:\d+(?![\w.:])")
_KEYWORDS = {"true": True, "false": False, "none": None}


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, what: str) -> PipelineError:
        snippet = self.text[: self.pos] + " ⟨here⟩ " + self.text[self.pos :]
        return PipelineError(f"pipeline syntax error: {what} at position {self.pos}: {snippet.strip()}")

    def skip(self) -> None:
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1

    def peek(self) -> str:
        self.skip()
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, ch: str) -> None:
        if self.peek() != ch:
            raise self.error(f"expected '{ch}'")
        self.pos += 1

    def name(self) -> str:
        self.skip()
        m = _NAME.match(self.text, self.pos)
        if not m:
            raise self.error("expected a pass or option name")
        self.pos = m.end()
        return m.group(0)

    def pipeline(self, closing: str = "") -> tuple[Step, ...]:
        steps: list[Step] = [self.step()]
        while self.peek() == ",":
            self.pos += 1
            steps.append(self.step())
        if self.peek() != closing:
            raise self.error("expected ',' or end of pipeline" if not closing else f"expected '{closing}'")
        return tuple(steps)

    def step(self) -> Step:
        name = self.name()
        options = self.options() if self.peek() == "(" else {}
        if name == "fixpoint":
            unknown = set(options) - {"max_iterations"}
            if unknown:
                raise self.error(f"fixpoint takes only max_iterations, not {sorted(unknown)}")
            self.expect("[")
            steps = self.pipeline("]")
            self.expect("]")
            max_it = options.get("max_iterations", 8)
            if not isinstance(max_it, int) or isinstance(max_it, bool) or max_it < 1:
                raise self.error("max_iterations must be a positive integer")
            return FixpointSpec(steps, max_it)
        return PassSpec(name, options)

    def options(self) -> dict[str, Any]:
        self.expect("(")
        opts: dict[str, Any] = {}
        if self.peek() == ")":
            self.pos += 1
            return opts
        while True:
            key = self.name()
            if key in opts:
                raise self.error(f"option '{key}' given twice")
            self.expect("=")
            opts[key] = self.value()
            if self.peek() == ",":
                self.pos += 1
                continue
            self.expect(")")
            return opts

    def value(self) -> Value:
        ch = self.peek()
        if ch == "[":
            self.pos += 1
            items: list = []
            if self.peek() == "]":
                self.pos += 1
                return items
            while True:
                items.append(self.value())
                if self.peek() == ",":
                    self.pos += 1
                    continue
                self.expect("]")
                return items
        if ch in "\"'":
            return self.quoted(ch)
        ratio = _RATIO.match(self.text, self.pos)
        if ratio:  # N:M sparsity patterns such as 2:4 are words, not numbers
            self.pos = ratio.end()
            return ratio.group(0)
        m = _NUMBER.match(self.text, self.pos)
        if m and (m.end() == len(self.text) or not _NAME.match(self.text, m.end())):
            self.pos = m.end()
            s = m.group(0)
            if re.fullmatch(r"[+-]?\d+", s):
                return int(s)
            return float(s)
        word = self.name()
        return _KEYWORDS.get(word, word) if word in _KEYWORDS else word

    def quoted(self, quote: str) -> str:
        # JSON-style escapes for double quotes; single quotes are taken literally.
        start = self.pos
        self.pos += 1
        while self.pos < len(self.text):
            c = self.text[self.pos]
            if c == "\\" and quote == '"':
                self.pos += 2
                continue
            if c == quote:
                self.pos += 1
                raw = self.text[start : self.pos]
                return json.loads(raw) if quote == '"' else raw[1:-1]
            self.pos += 1
        raise self.error("unterminated string")


def parse_text(text: str) -> tuple[Step, ...]:
    """Parse pipeline text into steps (syntax only; names are checked by the registry)."""
    if not text or not text.strip():
        raise PipelineError("empty pipeline; give at least one pass name (see `graphopt passes`)")
    p = _Parser(text)
    steps = p.pipeline()
    return steps


def _format_value(v: Any) -> str:
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "none"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_format_value(x) for x in v) + "]"
    s = str(v)
    if _NAME.fullmatch(s) and s not in _KEYWORDS and s != "fixpoint":
        return s
    return json.dumps(s)


def format_step(step: Step) -> str:
    if isinstance(step, FixpointSpec):
        head = "fixpoint" if step.max_iterations == 8 else f"fixpoint(max_iterations={step.max_iterations})"
        return head + "[" + format_text(step.steps) + "]"
    if not step.options:
        return step.name
    opts = ",".join(f"{k}={_format_value(step.options[k])}" for k in sorted(step.options))
    return f"{step.name}({opts})"


def format_text(steps: Iterable[Step]) -> str:
    """Canonical text of a pipeline (options sorted), which ``parse_text`` reads back equal."""
    return ",".join(format_step(s) for s in steps)


def to_data(steps: Sequence[Step]) -> list:
    """JSON/YAML-ready form: a list of names, {name: options} maps and {fixpoint: [...]} groups."""
    out: list = []
    for s in steps:
        if isinstance(s, FixpointSpec):
            out.append({"fixpoint": to_data(s.steps), "max_iterations": s.max_iterations})
        elif s.options:
            out.append({s.name: dict(sorted(s.options.items()))})
        else:
            out.append(s.name)
    return out


def from_data(data: Any) -> tuple[Step, ...]:
    """Read the form ``to_data`` writes (also accepts {"name": ..., "options": ...})."""
    if isinstance(data, dict) and "pipeline" in data:
        data = data["pipeline"]
    if isinstance(data, str):
        return parse_text(data)
    if not isinstance(data, list) or not data:
        raise PipelineError("a pipeline must be a non-empty list of steps")
    steps: list[Step] = []
    for item in data:
        if isinstance(item, str):
            steps.extend(parse_text(item))
        elif isinstance(item, dict) and "fixpoint" in item:
            extra = set(item) - {"fixpoint", "max_iterations"}
            if extra:
                raise PipelineError(f"unknown keys {sorted(extra)} in fixpoint group")
            steps.append(FixpointSpec(from_data(item["fixpoint"]), int(item.get("max_iterations", 8))))
        elif isinstance(item, dict) and "name" in item:
            opts = item.get("options") or {}
            if not isinstance(opts, dict):
                raise PipelineError(f"options of '{item['name']}' must be a mapping")
            steps.append(PassSpec(str(item["name"]), dict(opts)))
        elif isinstance(item, dict) and len(item) == 1:
            ((name, opts),) = item.items()
            if opts is None:
                opts = {}
            if not isinstance(opts, dict):
                raise PipelineError(f"options of '{name}' must be a mapping")
            steps.append(PassSpec(str(name), dict(opts)))
        else:
            raise PipelineError(f"cannot read pipeline step {item!r}")
    return tuple(steps)


def load_file(path: str | os.PathLike) -> tuple[Step, ...]:
    """Read a pipeline from a .json, .yaml/.yml or text file."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise PipelineError(f"{path}: cannot read pipeline file ({e.strerror})") from None
    if path.endswith(".json"):
        try:
            return from_data(json.loads(text))
        except json.JSONDecodeError as e:
            raise PipelineError(f"{path}: invalid JSON ({e})") from None
    if path.endswith((".yaml", ".yml")):
        import yaml

        try:
            return from_data(yaml.safe_load(text))
        except yaml.YAMLError as e:
            raise PipelineError(f"{path}: invalid YAML ({str(e).splitlines()[0]})") from None
    return parse_text(" ".join(line.split("#")[0] for line in text.splitlines()))
