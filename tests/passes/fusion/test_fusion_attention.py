"""Standard ``Attention`` (opset 23) fusion and the ``upgrade-opset`` pass that makes it possible.

``fuse-attention`` must turn every layer's scaled dot-product attention of the real exports into
one standard ``Attention`` (no contrib or private op, no Softmax left, outputs within 1e-4 on padded
inputs) and stay away from look-alikes it cannot express exactly.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from corpus import assert_same, run

import graphopt
from graphopt.errors import PassFailedError

ATOL = 1e-4
RNG = np.random.default_rng(0)
PIPELINE = "cleanup,upgrade-opset(version=23),fuse-attention,cleanup"

B, H, S, D = 2, 4, 5, 8


def parse(text: str) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(text)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def counts(model: ir.Model) -> collections.Counter[tuple[str, str]]:
    return collections.Counter(
        (n.domain if n.domain != "ai.onnx" else "", n.op_type)
        for n in ir.traversal.RecursiveGraphIterator(model.graph)
    )


def optimize(proto: onnx.ModelProto, pipeline: str, feeds: dict[str, Any]) -> graphopt.OptimizeResult:
    """Run ``pipeline`` with the checker after each pass; outputs must match the original's."""
    result = graphopt.optimize(graphopt.load(proto), pipeline=pipeline, verify_each=True)
    assert_same(
        run(proto.SerializeToString(), feeds),
        run(graphopt.to_bytes(result.model), feeds),
        1e-5,
        ATOL,
        where=pipeline,
    )
    return result


def sdpa_text(
    *,
    opset: int = 23,
    scale: str = "c = Constant <value = float {0.35}> ()",
    scores: str = "Mul (s, c)",
    axis: int = -1,
    key: str = f"float[{B},{H},{S},{D}] k",
    key_t: str = "Transpose <perm = [0, 1, 3, 2]> (k)",
    mask: str = f"float[{B},1,{S},{S}] m",
    masked: str = "Add (ss, m)",
    extra_in: str = "",
    extra_out: str = "",
) -> str:
    """MatMul(Q, Kᵀ) · c + mask → Softmax → MatMul(·, V), with the piece under test swapped in."""
    inputs = ", ".join(
        x for x in (f"float[{B},{H},{S},{D}] q", key, f"float[{B},{H},{S},{D}] v", mask, extra_in) if x
    )
    outputs = ", ".join(x for x in (f"float[{B},{H},{S},{D}] y", extra_out) if x)
    return f"""
        <ir_version: 10, opset_import: ["" : {opset}]>
        g ({inputs}) => ({outputs}) {{
            kt = {key_t}
            s = MatMul (q, kt)
            {scale}
            ss = {scores}
            {f"sm = {masked}" if masked else ""}
            p = Softmax <axis = {axis}> ({"sm" if masked else "ss"})
            y = MatMul (p, v)
        }}
    """


def feeds_for(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {}
    for i in proto.graph.input:
        shape = [d.dim_value for d in i.type.tensor_type.shape.dim]
        out[i.name] = RNG.standard_normal(shape).astype(np.float32)
    return out


# =============================================================================================
# Real exports: one Attention per layer


@pytest.mark.parametrize("kind", ["bert", "gpt2", "llama", "vit"])
def test_every_layer_becomes_standard_attention(kind: str) -> None:
    pytest.importorskip("transformers")
    from models import build
    from test_fusion_coverage import _check_outputs, _feeds, _layers

    built = build(kind, "tiny")
    model = built.export()
    result = graphopt.optimize(model, "ort-cpu", pipeline=PIPELINE)
    c = counts(result.model)
    L = _layers(kind, built.config)
    assert result.model.opset_imports[""] == 23
    assert c[("", "Attention")] == L, c
    assert c[("", "Softmax")] == 0, c
    assert not [k for k in c if k[0] != ""], c  # no com.microsoft, no ai.onnxruntime._fusion
    assert all(
        n.metadata_props.get("graphopt.rule") == "fuse-attention/sdpa-attention"
        for n in result.model.graph
        if n.op_type == "Attention"
    )
    rows = {r.name: r for r in result.report.passes}
    assert rows["fuse-attention"].stats == {"sdpa-attention": L}
    _check_outputs(model, result.model, _feeds(kind, built))  # padded attention masks


# =============================================================================================
# Hand-built: what fires and what must not


@pytest.mark.parametrize(
    "case",
    [
        dict(),
        dict(mask="", masked=""),
        dict(scale="c = Constant <value = float {2.0}> ()", scores="Div (s, c)"),
        dict(mask=f"float[{S},{S}] m"),
        dict(mask=f"float[1,{H},{S},{S}] m"),
        dict(key=f"float[{B},{S},{H},{D}] k", key_t="Transpose <perm = [0, 2, 3, 1]> (k)"),  # BSHd key
    ],
    ids=["mask", "no-mask", "div-scale", "mask-2d", "mask-per-head", "key-bshd"],
)
def test_sdpa_fuses(case: dict[str, str]) -> None:
    proto = parse(sdpa_text(**case))
    result = optimize(proto, "fuse-attention", feeds_for(proto))
    c = counts(result.model)
    assert c[("", "Attention")] == 1 and c[("", "Softmax")] == 0, c
    attn = next(n for n in result.model.graph if n.op_type == "Attention")
    expected = 1 / 2.0 if "Div" in case.get("scores", "") else 0.35
    assert attn.attributes.get_float("scale") == pytest.approx(expected)


@pytest.mark.parametrize(
    "case",
    [
        # the score scale is a graph input, not a constant
        dict(scale="", extra_in="float c"),
        # Softmax over the query axis, or a positive axis that is not the last
        dict(axis=2),
        dict(axis=1),
        # the attention weights are also a graph output
        dict(extra_out=f"float[{B},{H},{S},{S}] p"),
        # Attention scales Q and K by sqrt(scale): a negative scale cannot be expressed
        dict(scale="c = Constant <value = float {-0.35}> ()"),
        # a mask that broadcasts over the query axis (ONNX Runtime's kernel rejects it) or that
        # broadcasts the scores to a larger shape
        dict(mask=f"float[{B},1,1,{S}] m"),
        dict(mask=f"float[3,{B},{H},{S},{S}] m"),
    ],
    ids=[
        "non-constant-scale",
        "softmax-axis-2",
        "softmax-axis-1",
        "weights-used",
        "negative-scale",
        "mask-broadcast-query",
        "mask-rank-5",
    ],
)
def test_lookalikes_stay(case: dict[str, str]) -> None:
    text = sdpa_text(**case)
    if case.get("mask", "").startswith("float[3,"):  # Add broadcasts the scores, so y, to rank 5
        text = sdpa_text(**case).replace(f"float[{B},{H},{S},{D}] y", f"float[3,{B},{H},{S},{D}] y")
    proto = parse(text)
    result = optimize(proto, "fuse-attention", feeds_for(proto))
    c = counts(result.model)
    assert c[("", "Attention")] == 0 and c[("", "Softmax")] == 1, c
    assert "sdpa-attention" not in result.report.passes[-1].stats


def test_below_opset_23_is_left_alone() -> None:
    proto = parse(sdpa_text(opset=18))
    result = optimize(proto, "fuse-attention", feeds_for(proto))
    assert not result.report.passes[-1].modified
    assert counts(result.model)[("", "Attention")] == 0
    assert result.model.opset_imports[""] == 18


# =============================================================================================
# upgrade-opset


def test_upgrade_then_fuse() -> None:
    proto = parse(sdpa_text(opset=18))
    feeds = feeds_for(proto)
    result = optimize(proto, "upgrade-opset(version=23)", feeds)
    assert result.model.opset_imports[""] == 23
    assert result.report.passes[-1].modified
    result = optimize(proto, "upgrade-opset(version=23),fuse-attention", feeds)
    assert counts(result.model)[("", "Attention")] == 1


@pytest.mark.parametrize("version", [23, 20])
def test_upgrade_never_downgrades(version: int) -> None:
    proto = parse(sdpa_text(opset=23))
    result = optimize(proto, f"upgrade-opset(version={version})", feeds_for(proto))
    assert not result.report.passes[-1].modified
    assert result.model.opset_imports[""] == 23


def test_upgrade_from_an_old_opset() -> None:
    """Opset 13 is below onnxscript's adapters; the ONNX C API converter takes it."""
    proto = parse(sdpa_text(opset=13))
    result = optimize(proto, "upgrade-opset(version=23)", feeds_for(proto))
    assert result.model.opset_imports[""] == 23


def test_upgrade_to_an_unknown_opset_fails_clearly() -> None:
    proto = parse(sdpa_text(opset=18))
    with pytest.raises(PassFailedError, match="upgrade-opset: version 99 is newer"):
        graphopt.optimize(graphopt.load(proto), pipeline="upgrade-opset(version=99)")


def test_upgrade_refuses_adapted_ops_in_subgraphs() -> None:
    """DFT's axis becomes an input at opset 20; the converter would not adapt it inside a branch."""
    proto = parse("""
        <ir_version: 10, opset_import: ["" : 19]>
        g (bool cond, float[1,8,1] x) => (float[1,8,2] y) {
            y = If (cond) <
                then_branch = t () => (float[1,8,2] yt) { yt = DFT <axis = 1> (x) },
                else_branch = e () => (float[1,8,2] ye) { ye = DFT <axis = 1, inverse = 1> (x) }
            >
        }
    """)
    with pytest.raises(PassFailedError, match="inside If/Loop/Scan bodies"):
        graphopt.optimize(graphopt.load(proto), pipeline="upgrade-opset(version=23)")
