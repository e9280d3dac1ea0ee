"""The ``graphopt`` command: optimize, inspect, verify, passes.

Exit codes: 0 done; 1 verification failed, nothing else; 2 bad input or usage (one line on stderr,
no traceback, nothing written); 3 internal error, only for a genuine bug (rerun with
GRAPHOPT_DEBUG=1 for the traceback). Input models are validated before any pass runs, so a pass
that fails on a model that got that far is a bug (3), never "verification failed" (1).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError, OutputError, VerificationError
from graphopt.sensitivity_view import nothing_quantized, plot_sensitivity, pyplot, sensitivity_table

__all__ = ["main", "inspect_model"]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"graphopt: error: {message} (see `{self.prog} --help`)\n")
        raise SystemExit(2)


def _dims(values: Sequence[str] | None) -> dict[str, int] | None:
    if not values:
        return None
    out = {}
    for item in values:
        name, sep, val = item.partition("=")
        if not sep or not val.strip().isdigit():
            raise GraphoptError(
                f"--dim expects NAME=SIZE (a size >= 0; INPUT:AXIS=SIZE for an unnamed dim), got '{item}'"
            )
        out[name.strip()] = int(val)
    return out


def _build_parser() -> _Parser:
    p = _Parser(prog="graphopt", description="Optimize ONNX models for ONNX Runtime targets, verified.")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    sub.required = True

    o = sub.add_parser("optimize", help="optimize a model and write the result")
    o.add_argument("input", help="input .onnx file")
    o.add_argument("-o", "--output", required=True, help="output .onnx file (written atomically)")
    o.add_argument("--target", default="ort-cpu", help="ort-cpu (default) | ort-cuda | tensorrt")
    o.add_argument(
        "--target-option",
        action="append",
        metavar="KEY=VALUE",
        help="an option of the target, e.g. precision=bfloat16 (ort-cuda), fp16=true (tensorrt)",
    )
    o.add_argument("--pipeline", help="pipeline spec text, or a .json/.yaml/.txt file with one")
    o.add_argument("--level", type=int, default=2, help="optimization level of the target's default pipeline")
    o.add_argument("--report", help="write the JSON report here")
    o.add_argument(
        "--verify", action="store_true", help="compare outputs with the original (exit 1 on mismatch)"
    )
    o.add_argument("--verify-each", action="store_true", help="ONNX checker after every pass")
    o.add_argument("--numeric-each", action="store_true", help="numeric check after every pass (slow)")
    o.add_argument("--inputs", help=".npz of inputs for verification (default: generated)")
    o.add_argument(
        "--dim",
        action="append",
        help="size of a symbolic dimension for generated inputs, NAME=SIZE (INPUT:AXIS=SIZE for an unnamed one)",
    )
    o.add_argument("--rtol", type=float, default=1e-3)
    o.add_argument("--atol", type=float, default=1e-4)
    o.add_argument("--dump-dir", help="save the model after every pass into this folder")
    o.add_argument("--external-data", action="store_true", help="store weights in OUTPUT.data")
    o.add_argument(
        "--allow-custom-domains",
        action="store_true",
        help="accept ops of unknown custom domains (left untouched; verification impossible)",
    )
    q = o.add_argument_group("quantization")
    # No argparse choices: the modes are the installed quantize-* passes' (checked by optimize).
    q.add_argument(
        "--quantize",
        metavar="MODE",
        help="quantization mode: dynamic, static, int4, int8-weight, or a plugin's (`graphopt passes`)",
    )
    q.add_argument(
        "--calibration", help="calibration data: .npz file or folder of .npy/.npz (static needs it)"
    )
    q.add_argument(
        "--calibrator",
        choices=["minmax", "percentile", "entropy", "mse"],
        help="activation range calibrator (static)",
    )
    q.add_argument(
        "--min-cosine",
        type=float,
        help="fidelity target: keep the most sensitive layers in float until outputs reach it",
    )
    q.add_argument(
        "--exclude",
        action="append",
        metavar="PATTERN",
        help="node name, fnmatch pattern or op type to leave in float (repeatable)",
    )
    q.add_argument(
        "--quantize-option",
        action="append",
        metavar="KEY=VALUE",
        help="any other option of the quantize pass (`graphopt passes`), e.g. block_size=64",
    )
    q.add_argument("--sensitivity", action="store_true", help="measure and print per-layer sensitivity")
    q.add_argument("--sensitivity-plot", metavar="PNG", help="also plot per-layer sensitivity to this PNG")
    pr = o.add_argument_group("pruning")
    pr.add_argument(
        "--prune", type=float, metavar="SPARSITY", help="fraction of weights/units to remove (0-1)"
    )
    pr.add_argument("--prune-mode", help="unstructured (default) | 2:4 (or N:M) | structured")
    pr.add_argument(
        "--prune-option",
        action="append",
        metavar="KEY=VALUE",
        help="any other option of the prune pass, e.g. scope=global",
    )
    o.add_argument(
        "--verify-min-cosine",
        type=float,
        help="with --verify on a quantized/pruned model: cosine each output must reach (default 0.99)",
    )

    i = sub.add_parser("inspect", help="summarise a model: ops, parameters, sparsity, I/O")
    i.add_argument("input")
    i.add_argument("--json", action="store_true", help="print JSON instead of text")
    i.add_argument("--allow-custom-domains", action="store_true")

    v = sub.add_parser("verify", help="compare two models' outputs on ONNX Runtime CPU")
    v.add_argument("reference")
    v.add_argument("candidate")
    v.add_argument("--inputs", help=".npz of inputs (default: generated from the reference)")
    v.add_argument(
        "--dim",
        action="append",
        help="size of a symbolic dimension, NAME=SIZE (INPUT:AXIS=SIZE for an unnamed one)",
    )
    v.add_argument("--rtol", type=float, default=1e-3)
    v.add_argument("--atol", type=float, default=1e-4)
    v.add_argument("--json", action="store_true")

    ps = sub.add_parser("passes", help="list every registered pass with its options")
    ps.add_argument("--json", action="store_true")

    from graphopt.llm.cli import add_parser as add_llm_parser

    add_llm_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # usage error (one line already printed) or --help: return, not raise
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # Python warnings (numpy's overflow/invalid-value RuntimeWarnings inside a pass) go through
    # logging: shown with -v, never as extra lines next to an error's one line.
    logging.captureWarnings(True)
    if args.verbose == 0:
        logging.getLogger("onnxscript").setLevel(logging.ERROR)
        logging.getLogger("onnx_ir").setLevel(logging.ERROR)
        logging.getLogger("py.warnings").setLevel(logging.ERROR)
    try:
        return _run(args)
    finally:
        logging.captureWarnings(False)


def _run(args: argparse.Namespace) -> int:
    """The command, with every exception mapped to the exit-code contract."""
    try:
        from graphopt.llm.cli import run as _llm

        commands = {
            "optimize": _optimize,
            "inspect": _inspect,
            "verify": _verify,
            "passes": _passes,
            "llm": _llm,
        }
        return commands[args.command](args)
    except VerificationError as e:  # exit code 1 means this and nothing else
        sys.stderr.write(f"graphopt: verification failed: {' '.join(str(e).split())}\n")
        return 1
    except GraphoptError as e:
        msg = " ".join(str(e).split())
        if e.exit_code == 3:  # a pass crashed or broke a validated model: a bug, not bad input
            if os.environ.get("GRAPHOPT_DEBUG"):
                raise
            sys.stderr.write(
                f"graphopt: internal error: {msg} (this is a bug; rerun with GRAPHOPT_DEBUG=1 "
                "for the traceback)\n"
            )
            return 3
        sys.stderr.write(f"graphopt: error: {msg}\n")
        return 2
    except BrokenPipeError:
        # `graphopt passes | head`: the reader went away; that is not an error.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        sys.stderr.write("graphopt: interrupted\n")
        return 130
    except Exception as e:  # a bug in graphopt, not bad input
        if os.environ.get("GRAPHOPT_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        sys.stderr.write(
            f"graphopt: internal error: {type(e).__name__}: {first} "
            "(this is a bug; rerun with GRAPHOPT_DEBUG=1 for the traceback)\n"
        )
        return 3


def _verify_options(args: argparse.Namespace) -> dict[str, Any]:
    opts: dict[str, Any] = {"rtol": args.rtol, "atol": args.atol}
    dims = _dims(args.dim)
    if dims:
        opts["dims"] = dims
    if args.inputs:
        from graphopt.inputs import load_inputs

        opts["inputs"] = load_inputs(args.inputs)
    return opts


def _check_output_dir(path: str, what: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"{path}: folder for the {what} does not exist; create it first")


def _optimize(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.ir import _atomic_write, _check_output_path, _referenced_files, load, settings_file_for

    quantize, prune = _quantize_and_prune(args)
    _check_output_dir(args.output, "output model")
    _check_output_path(args.output, "output model")
    if args.report:
        _check_output_dir(args.report, "report")
        _check_output_path(args.report, "report")
    if (
        os.path.exists(args.output)
        and os.path.exists(args.input)
        and os.path.samefile(args.output, args.input)
    ):
        raise OutputError(f"{args.output}: output is the input file; write to another file")
    if args.sensitivity_plot:
        _check_output_dir(args.sensitivity_plot, "sensitivity plot")
        _check_output_path(args.sensitivity_plot, "sensitivity plot")
        pyplot()  # missing matplotlib is an error now, before any work
    vopts = _verify_options(args)
    if args.verify_min_cosine is not None:
        vopts["min_cosine"] = args.verify_min_cosine
    if args.calibration:
        from graphopt.calibration import CalibrationData

        CalibrationData.from_any(args.calibration)  # a clear error now, before any work
    model = load(args.input, allow_custom_domains=args.allow_custom_domains)
    if args.report:
        # The report must not replace the input model, its weights, or the output model.
        taken = {
            os.path.realpath(p)
            for p in (args.input, args.output, args.output + ".data", settings_file_for(args.output))
        }
        taken |= _referenced_files(model)
        if os.path.realpath(args.report) in taken:
            raise OutputError(
                f"{args.report}: the report would overwrite a model file; give the report another name"
            )
    try:
        result = graphopt.optimize(
            model,
            target=args.target,
            pipeline=args.pipeline,
            quantize=quantize,
            prune=prune,
            calibration=args.calibration,
            target_options=_options(args.target_option, "--target-option") or None,
            level=args.level,
            verify=args.verify,
            verify_each=args.verify_each,
            numeric_each=args.numeric_each,
            verify_options=vopts,
            dump_dir=args.dump_dir,
        )
    except VerificationError as e:
        if args.report and e.result is not None:
            payload = json.dumps({"verification": e.result.to_dict()}, indent=2)  # type: ignore[attr-defined]
            _atomic_write(args.report, lambda f: f.write(payload.encode()))
        raise
    rows = next((p.details["sensitivity"] for p in result.report.passes if "sensitivity" in p.details), None)
    # Asked for sensitivity but no layer was measured (none quantized): say so, never stay silent.
    none_measured = None if rows else nothing_quantized(result.report)
    # The plot is drawn before anything is written, so a failure leaves no files behind.
    plot = plot_sensitivity(rows or [], none_measured) if args.sensitivity_plot else None
    graphopt.save(result.model, args.output, external_data=True if args.external_data else None)
    if args.report:
        payload = result.report.to_json()
        _atomic_write(args.report, lambda f: f.write(payload.encode()))
    if plot is not None:
        _atomic_write(args.sensitivity_plot, lambda f: f.write(plot))
    print(result.report.table())
    if rows and (args.sensitivity or args.min_cosine is not None):
        print("\nper-layer sensitivity (each layer quantized alone; worst first):")
        print(sensitivity_table(rows[:30]))
        if len(rows) > 30:
            print(f"... and {len(rows) - 30} more layers (all in the JSON report)")
    elif not rows and (args.sensitivity or args.sensitivity_plot):
        print(f"\nper-layer sensitivity: nothing to measure, {none_measured}")
    if plot is not None:
        print(f"wrote {args.sensitivity_plot} (per-layer sensitivity)")
    if result.report.verification is not None:
        print()
        print(result.report.verification.table())
    print(f"\nwrote {args.output} (target {args.target}; pipeline {result.report.pipeline})")
    if os.path.exists(settings_file_for(args.output)):
        print(f"wrote {settings_file_for(args.output)} (run settings for {args.target})")
    # A pass that could not help (e.g. dynamic int8 on a CNN) says so: one line, not an error.
    for p in result.report.passes:
        if p.details.get("notice"):
            sys.stderr.write(f"graphopt: notice: {' '.join(str(p.details['notice']).split())}\n")
    return 0


def _options(items: Sequence[str] | None, flag: str) -> dict[str, Any]:
    """KEY=VALUE items parsed with the pipeline grammar (numbers, true/false, [lists], strings)."""
    from graphopt.spec import parse_text

    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise GraphoptError(f"{flag} expects KEY=VALUE, got '{item}'")
        (step,) = parse_text(f"x({item})")
        out.update(step.options)  # type: ignore[union-attr]
    return out


def _quantize_and_prune(args: argparse.Namespace) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    quantize: dict[str, Any] | None = None
    if args.quantize:
        quantize = {"mode": args.quantize, **_options(args.quantize_option, "--quantize-option")}
        if args.calibrator:
            quantize["calibrator"] = args.calibrator
        if args.min_cosine is not None:
            quantize["min_cosine"] = args.min_cosine
        if args.exclude:
            quantize["exclude"] = list(args.exclude)
        if args.sensitivity or args.sensitivity_plot:
            quantize["sensitivity"] = True
    else:
        given = [
            f
            for f, v in (
                ("--calibrator", args.calibrator),
                ("--min-cosine", args.min_cosine),
                ("--exclude", args.exclude),
                ("--quantize-option", args.quantize_option),
                ("--sensitivity", args.sensitivity or args.sensitivity_plot),
            )
            if v
        ]
        if given:
            raise GraphoptError(f"{', '.join(given)} only apply with --quantize MODE; add it or remove them")
    prune: dict[str, Any] | None = None
    if args.prune is not None:
        prune = {
            "sparsity": args.prune,
            "mode": args.prune_mode or "unstructured",
            **_options(args.prune_option, "--prune-option"),
        }
    elif args.prune_mode or args.prune_option:
        raise GraphoptError(
            "--prune-mode/--prune-option only apply with --prune SPARSITY; add it or remove them"
        )
    if args.pipeline and (quantize or prune):
        raise GraphoptError(
            "give either --pipeline or --quantize/--prune: add quantize(...)/prune(...) to the pipeline"
        )
    return quantize, prune


def inspect_model(model: ir.Model) -> dict[str, Any]:
    """Ops histogram, parameters and bytes by dtype, sparsity, quantized fraction, opsets, I/O."""
    from graphopt.ir import _tensor_nbytes

    ops: collections.Counter[str] = collections.Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        ops[f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    for f in model.functions.values():
        for node in ir.traversal.RecursiveGraphIterator(f):
            ops[f"{node.domain}::{node.op_type}" if node.domain else node.op_type] += 1
    by_dtype: dict[str, dict[str, int]] = {}
    zeros = 0
    float_params = 0
    quantized = 0
    total = 0
    quant_types = {
        "INT8",
        "UINT8",
        "INT4",
        "UINT4",
        "INT16",
        "UINT16",
        "FLOAT8E4M3FN",
        "FLOAT8E5M2",
        "INT2",
        "UINT2",
    }
    for g in model.graphs():
        for v in g.initializers.values():
            t = v.const_value
            if t is None:
                continue
            n = int(np.prod(t.shape.numpy())) if t.shape is not None else 0
            d = by_dtype.setdefault(t.dtype.name, {"tensors": 0, "parameters": 0, "bytes": 0})
            d["tensors"] += 1
            d["parameters"] += n
            d["bytes"] += _tensor_nbytes(t)
            total += n
            if t.dtype.name in quant_types:
                quantized += n
            if t.dtype.is_floating_point() and n >= 16:
                arr = t.numpy()
                zeros += int(n - np.count_nonzero(arr))
                float_params += n
    quant_nodes = sum(
        c
        for k, c in ops.items()
        if k.split("::")[-1]
        in (
            "QuantizeLinear",
            "DequantizeLinear",
            "DynamicQuantizeLinear",
            "MatMulInteger",
            "QLinearMatMul",
            "QLinearConv",
            "ConvInteger",
            "MatMulNBits",
            "DynamicQuantizeMatMul",
            "QGemm",
            "MatMulIntegerToFloat",
            "QAttention",
        )
    )

    def io(values: Sequence[ir.Value]) -> list[dict[str, Any]]:
        out = []
        for v in values:
            shape = None if v.shape is None else [d if isinstance(d, int) else str(d) for d in v.shape]
            out.append({"name": v.name, "type": str(v.type) if v.type is not None else None, "shape": shape})
        return out

    init_names = {v.name for v in model.graph.initializers.values()}
    return {
        "ir_version": model.ir_version,
        "producer": f"{model.producer_name or ''} {model.producer_version or ''}".strip(),
        "opsets": dict(sorted(model.opset_imports.items())),
        "nodes": sum(ops.values()),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "parameters": total,
        "parameters_by_dtype": dict(sorted(by_dtype.items())),
        "weight_bytes": sum(d["bytes"] for d in by_dtype.values()),
        "sparsity": (zeros / float_params) if float_params else 0.0,
        "quantized_fraction": (quantized / total) if total else 0.0,
        "quantization_nodes": quant_nodes,
        "inputs": io([v for v in model.graph.inputs if v.name not in init_names]),
        "outputs": io(list(model.graph.outputs)),
        "functions": len(model.functions),
        "metadata": dict(sorted(model.metadata_props.items())),
    }


def _inspect(args: argparse.Namespace) -> int:
    from graphopt.ir import load

    info = inspect_model(load(args.input, allow_custom_domains=args.allow_custom_domains))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print(
        f"{args.input}: ir_version {info['ir_version']}, opsets "
        + ", ".join(f"{k or 'ai.onnx'}={v}" for k, v in info["opsets"].items())
        + (f", producer {info['producer']}" if info["producer"] else "")
    )
    print(
        f"nodes {info['nodes']}, parameters {info['parameters']:,} ({info['weight_bytes'] / 1e6:.2f} MB), "
        f"sparsity {info['sparsity']:.1%}, quantized {info['quantized_fraction']:.1%}"
    )
    for name, d in info["parameters_by_dtype"].items():
        print(
            f"  {name:<10} {d['tensors']:>6} tensors {d['parameters']:>14,} params {d['bytes'] / 1e6:>10.2f} MB"
        )
    print("ops:")
    for op, c in info["ops"].items():
        print(f"  {op:<32} {c}")
    for kind in ("inputs", "outputs"):
        print(f"{kind}:")
        for v in info[kind]:
            print(f"  {v['name']}: {v['type']} {v['shape']}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from graphopt.verify import verify

    opts = _verify_options(args)
    result = verify(args.reference, args.candidate, **opts)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(result.table())
    if not result.passed:
        sys.stderr.write(f"graphopt: verification failed: {result.failure_summary()}\n")
        return 1
    return 0


def _passes(args: argparse.Namespace) -> int:
    from graphopt import list_passes

    infos = list_passes()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "name": i.name,
                        "summary": i.summary,
                        "source": i.source,
                        "options": [
                            {"name": o.name, "type": o.type, "default": o.default} for o in i.options
                        ],
                        "rules": [
                            {"name": r.name, "summary": r.summary, "domain": r.domain} for r in i.rules
                        ],
                    }
                    for i in infos
                ],
                indent=2,
                default=str,
            )
        )
        return 0
    width = max(len(i.name) for i in infos)
    for i in infos:
        print(f"{i.name:<{width}}  {i.summary}")
        if i.options:
            opts = ", ".join(f"{o.name}: {o.type} = {o.default!r}" for o in i.options)
            print(f"{'':<{width}}  options: {opts}")
        if i.rules:
            rw = max(len(r.name) for r in i.rules)
            for r in i.rules:
                print(f"{'':<{width}}    {r.name:<{rw}}  [{r.domain}] {r.summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
