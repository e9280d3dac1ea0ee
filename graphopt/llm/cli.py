"""``graphopt llm build`` and ``graphopt llm generate``: the command-line face of :mod:`graphopt.llm`.

Kept beside the LLM path rather than in ``graphopt/cli.py``: the main CLI only adds this parser
and dispatches to :func:`run`, so its exit-code contract applies unchanged.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(sub: Any) -> None:
    """Add ``llm build`` / ``llm generate`` to the main parser's subcommands."""
    llm = sub.add_parser("llm", help="build a decoder LLM for onnxruntime-genai, or generate with one")
    cmds = llm.add_subparsers(dest="llm_command", metavar="LLM_COMMAND", parser_class=type(llm))
    cmds.required = True
    from .build import PRECISIONS, TARGETS

    b = cmds.add_parser("build", help="HF folder or .gguf in, onnxruntime-genai folder out")
    b.add_argument("source", help="a Hugging Face model folder (config.json + weights) or a .gguf file")
    b.add_argument(
        "-o", "--output", required=True, help="the folder to write (new, empty or an earlier build)"
    )
    b.add_argument("--precision", choices=PRECISIONS, default="int4")
    b.add_argument("--target", choices=list(TARGETS), default="ort-cpu")
    b.add_argument("--calibration", help="a text file or a folder of .txt files (data-aware int4/int8)")
    b.add_argument("--group-size", type=int, help="weight-only quantization block size (default: the pass's)")
    b.add_argument(
        "--quantize-option",
        action="append",
        metavar="KEY=VALUE",
        help="an option of the quantize pass (value as JSON, else a string), e.g. symmetric=true",
    )
    b.add_argument(
        "--full-logits", action="store_true", help="logits for every position (perplexity), not only the last"
    )
    b.add_argument(
        "--prefill",
        choices=("same", "int8"),
        default="same",
        help="int8: run the prompt on int8 GEMMs (a second graph over the int4 bytes; experimental)",
    )
    b.add_argument("--report", help="also write the build report (JSON) here")

    g = cmds.add_parser("generate", help="greedy generation from a built folder (onnxruntime-genai)")
    g.add_argument("folder")
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--json", action="store_true", help="print tokens and text as JSON")


def _options(items: list[str] | None) -> dict[str, Any]:
    from graphopt.errors import GraphoptError

    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise GraphoptError(f"--quantize-option expects KEY=VALUE, got '{item}'")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def run(args: argparse.Namespace) -> int:
    if args.llm_command == "build":
        from .build import build

        result = build(
            args.source,
            args.output,
            precision=args.precision,
            target=args.target,
            calibration=args.calibration,
            full_logits=args.full_logits,
            group_size=args.group_size,
            quantize_options=_options(args.quantize_option),
            report_path=args.report,
            prefill=args.prefill,
        )
        files = result.report.get("files", {})
        size = sum(files.values()) / 2**20
        print(f"wrote {result.out_dir} ({size:.1f} MiB: {', '.join(sorted(files))})")
        return 0
    from .generate import generate

    out = generate(args.folder, args.prompt, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(out))
    else:
        sys.stdout.write((out["text"] or "") + "\n")
    return 0
