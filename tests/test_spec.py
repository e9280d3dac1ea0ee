"""Pipelines as text/JSON/YAML: parsing, canonical printing, round trips, clear errors."""

from __future__ import annotations

import json

import pytest

from graphopt import Pipeline
from graphopt.errors import PipelineError
from graphopt.spec import FixpointSpec, PassSpec, format_text, parse_text

TEXTS = [
    "cleanup",
    "cleanup(max_iterations=3,fold=false)",
    "fixpoint[fold-constants,remove-unused],cse",
    "fixpoint(max_iterations=2)[fold-constants(max_fold_bytes=1024,output_size_limit=10),remove-noops(cast=false)]",
    "remove-noops(identity=true,transpose=false),topological-sort",
]


@pytest.mark.parametrize("text", TEXTS)
def test_text_round_trips(text: str) -> None:
    p = Pipeline.parse(text)
    assert Pipeline.parse(str(p)) == p
    assert str(Pipeline.parse(str(p))) == str(p)


@pytest.mark.parametrize("text", TEXTS)
def test_json_and_yaml_round_trip(text: str, tmp_path) -> None:
    p = Pipeline.parse(text)
    assert Pipeline.from_data(json.loads(p.to_json())) == p
    f = tmp_path / "p.yaml"
    f.write_text(p.to_yaml())
    assert Pipeline.load(f) == p
    j = tmp_path / "p.json"
    j.write_text(p.to_json())
    assert Pipeline.coerce(str(j)) == p


def test_printing_is_canonical() -> None:
    a = Pipeline.parse("cleanup( fold = false , max_iterations = 3 )")
    b = Pipeline.parse("cleanup(max_iterations=3,fold=false)")
    assert a == b
    assert str(a) == "cleanup(fold=false,max_iterations=3)"


def test_structure_of_parsed_pipeline() -> None:
    p = Pipeline.parse("fixpoint(max_iterations=3)[fold-constants,cse(size_limit=4)],topological-sort")
    assert p.steps == (
        FixpointSpec((PassSpec("fold-constants"), PassSpec("cse", {"size_limit": 4})), 3),
        PassSpec("topological-sort"),
    )


def test_values_strings_lists_and_quotes_round_trip() -> None:
    from graphopt.spec import format_text, parse_text

    steps = parse_text('x(a="hello, world",b=[1,2.5,true,none],c=name-with.dots,d=-3,e=1e-05)')
    (s,) = steps
    assert s.options == {
        "a": "hello, world",
        "b": [1, 2.5, True, None],
        "c": "name-with.dots",
        "d": -3,
        "e": 1e-05,
    }
    assert parse_text(format_text(steps)) == steps


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "empty pipeline"),
        ("cleanup,", "expected a pass"),
        ("cleanup(fold=)", "position"),
        ("no-such-pass", "unknown pass 'no-such-pass'"),
        ("cleanup(nope=1)", "has no option 'nope'"),
        ("cleanup(fold=3)", "must be bool"),
        ("fixpoint(foo=1)[cse]", "fixpoint takes only max_iterations"),
        ("fixpoint(max_iterations=0)[cse]", "positive integer"),
        ("cleanp", "did you mean cleanup"),
    ],
)
def test_bad_pipelines_give_clear_errors(text: str, fragment: str) -> None:
    with pytest.raises(PipelineError) as e:
        Pipeline.parse(text)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_n_to_m_ratios_parse_bare_and_round_trip() -> None:
    (step,) = parse_text("prune(mode=2:4,sparsity=0.5)")
    assert step.options == {"mode": "2:4", "sparsity": 0.5}
    assert parse_text(format_text([step])) == (step,)
