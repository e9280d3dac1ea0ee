"""Semantics on a corpus nobody here wrote: ONNX's node tests through graphopt, onnxscript, onnxsim.

Every case of ``onnx.backend.test.case.node.collect_testcases()`` that ONNX Runtime can run goes
through each tool; the result must run and give the original's outputs (floats within
rtol 1e-3 / atol 1e-4, everything else exact). Counts crashes (the tool raised), broken models
(the result does not load or run on ORT) and mismatches per tool.

    python benchmarks/bench_corpus.py [--tools graphopt,onnxscript,onnxsim] [--limit N]
"""

from __future__ import annotations

import argparse
import collections
import logging
import sys
import time
import warnings

import onnx
from _bench import RESULTS, environment, markdown_table, tests_on_path, write_json

tests_on_path()
from corpus import assert_same, run  # noqa: E402


def _graphopt(model: onnx.ModelProto) -> bytes:
    import graphopt

    return graphopt.to_bytes(graphopt.optimize(graphopt.load(model), target="ort-cpu").model)


def _onnxscript(model: onnx.ModelProto) -> bytes:
    import onnxscript

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    return onnxscript.optimizer.optimize(copy).SerializeToString()


def _onnxsim(model: onnx.ModelProto) -> bytes:
    import onnxsim

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    simplified, _ = onnxsim.simplify(copy, check_n=0)
    return simplified.SerializeToString()


TOOLS = {"graphopt": _graphopt, "onnxscript": _onnxscript, "onnxsim": _onnxsim}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument("--limit", type=int, default=0, help="only the first N cases (quick check)")
    args = ap.parse_args(argv)
    tools = [t.strip() for t in args.tools.split(",") if t.strip()]
    logging.disable(logging.WARNING)
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cases = [c for c in collect_testcases() if c.data_sets]
    if args.limit:
        cases = cases[: args.limit]
    counts: dict[str, collections.Counter[str]] = {t: collections.Counter() for t in tools}
    failures: dict[str, list[dict[str, str]]] = {t: [] for t in tools}
    seconds: dict[str, float] = dict.fromkeys(tools, 0.0)
    runnable = 0
    for case in cases:
        feeds = dict(zip([i.name for i in case.model.graph.input], case.data_sets[0][0]))
        try:
            expected = run(case.model.SerializeToString(), feeds)
        except Exception:
            continue  # ONNX Runtime cannot run the original: not part of the corpus
        runnable += 1
        for tool in tools:
            t0 = time.perf_counter()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    data = TOOLS[tool](case.model)
            except Exception as e:
                counts[tool]["crash"] += 1
                failures[tool].append({"case": case.name, "kind": "crash", "error": _line(e)})
                continue
            finally:
                seconds[tool] += time.perf_counter() - t0
            try:
                got = run(data, feeds)
            except Exception as e:
                counts[tool]["broken"] += 1
                failures[tool].append({"case": case.name, "kind": "broken model", "error": _line(e)})
                continue
            try:
                assert len(got) == len(expected), "output count differs"
                for i, (r, g) in enumerate(zip(expected, got)):
                    assert_same(r, g, rtol=1e-3, atol=1e-4, where=f"output {i}")
                counts[tool]["ok"] += 1
            except AssertionError as e:
                counts[tool]["mismatch"] += 1
                failures[tool].append({"case": case.name, "kind": "mismatch", "error": _line(e)})
    rows = []
    for tool in tools:
        c = counts[tool]
        rows.append(
            [tool, runnable, c["ok"], c["crash"], c["broken"], c["mismatch"], round(seconds[tool], 1)]
        )
    table = markdown_table(
        ["tool", "cases ORT runs", "same outputs", "crashed", "broken model", "wrong outputs", "tool time s"],
        rows,
    )
    lines = [table, ""]
    for tool in tools:
        for f in failures[tool]:
            lines.append(f"- {tool}: `{f['case']}` {f['kind']}: {f['error']}")
    text = "\n".join(lines)
    print(text)
    RESULTS.mkdir(parents=True, exist_ok=True)
    write_json(
        RESULTS / "corpus.json",
        {
            "benchmark": "corpus",
            "command": "python benchmarks/bench_corpus.py "
            + " ".join(argv if argv is not None else sys.argv[1:]),
            "environment": environment(),
            "cases_total": len(cases),
            "cases_ort_runs": runnable,
            "counts": {t: dict(counts[t]) for t in tools},
            "tool_seconds": seconds,
            "failures": failures,
        },
    )
    (RESULTS / "corpus.md").write_text(text + "\n")
    return 0


def _line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:200] + "…") if len(text) > 200 else (text or type(e).__name__)


if __name__ == "__main__":
    raise SystemExit(main())
