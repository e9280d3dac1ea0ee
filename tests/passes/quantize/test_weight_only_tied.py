"""quantize-weight-only on LM heads: FusedMatMul and MatMul(Transpose(W)) sites, and a table tied
between the embedding Gather and the LM head stored once (both ops read the same bytes)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from graphopt.passes.quantize.weight_only import unpack_blocks
from graphopt.pipeline import Pipeline
from graphopt.verify import run_model

MS = "com.microsoft"
FLOAT = ir.DataType.FLOAT


# --- helpers ---------------------------------------------------------------------------------
def quantize(model: ir.Model, spec: str = "quantize-weight-only", **context) -> tuple[ir.Model, object]:
    model, report = Pipeline.parse(spec).run(model, context=context)
    return model, [p for p in report.passes if p.name == "quantize-weight-only"][-1]


def decisions(row) -> dict[str, tuple[bool, str]]:
    return {d["node"]: (d["quantized"], d["reason"]) for d in row.details.get("nodes", [])}


def ops(model: ir.Model, op: str, domain: str = MS) -> list[ir.Node]:
    return [n for n in model.graph if n.domain == domain and n.op_type == op]


def const(name: str, array: np.ndarray) -> ir.Value:
    return ir.Value(
        name=name,
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        shape=ir.Shape(array.shape),
        const_value=ir.tensor(array, name=name),
    )


def make_model(inputs: list[ir.Value], nodes: list[ir.Node], outputs: list[ir.Value], inits) -> ir.Model:
    from graphopt.passes.cleanup import ShapeInferencePass

    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=inits, opset_imports={"": 21, MS: 1})
    model = ir.Model(graph, ir_version=10)
    ShapeInferencePass()(model)
    return model


def dequantize_matmulnbits(node: ir.Node) -> np.ndarray:
    """``W [N, K]`` from a MatMulNBits node's packed initializers, as its schema defines them."""
    k, n = node.attributes.get_int("K"), node.attributes.get_int("N")
    bits, bs = node.attributes.get_int("bits"), node.attributes.get_int("block_size")
    packed = node.inputs[1].const_value.numpy()
    nb = -(-k // bs)
    assert packed.shape == (n, nb, bs * bits // 8)
    q = unpack_blocks(packed, bits).reshape(n, nb, bs).astype(np.float32)
    scales = node.inputs[2].const_value.numpy().reshape(n, nb)
    if len(node.inputs) > 3 and node.inputs[3] is not None:
        zp = unpack_blocks(node.inputs[3].const_value.numpy(), bits, nb).astype(np.float32)
    else:
        zp = np.full((n, nb), 2 ** (bits - 1), np.float32)
    return ((q - zp[..., None]) * scales[..., None]).reshape(n, nb * bs)[:, :k]


def head_model(w: np.ndarray, op: str, **attrs) -> ir.Model:
    """``y = op(x [B, S, K], weight)``: FusedMatMul(x, w, **attrs) or MatMul(x, Transpose(w))."""
    k = w.shape[1] if attrs.get("transB") or op == "Transpose" else w.shape[0]
    x = ir.Value(name="x", type=ir.TensorType(FLOAT), shape=ir.Shape(["B", "S", k]))
    wv = const("w", w)
    if op == "Transpose":
        t = ir.node("Transpose", [wv], attributes={"perm": [1, 0]}, name="t")
        nodes = [t, ir.node("MatMul", [x, t.outputs[0]], name="head")]
    else:
        nodes = [ir.node("FusedMatMul", [x, wv], attributes=attrs, domain=MS, name="head")]
    y = nodes[-1].outputs[0]
    y.name, y.dtype = "y", FLOAT
    return make_model([x], nodes, [y], [wv])


def tied_model(table: np.ndarray, head: str) -> ir.Model:
    """``emb = Gather(table, ids)`` and ``logits = h @ table^T``, the head as ``head``: ``fused``
    (FusedMatMul transB=1 on the table, what fuse-ort makes), ``transpose`` (MatMul of
    Transpose(table)) or ``copy`` (MatMul on a separate constant equal to table^T, what constant
    folding makes of the Transpose)."""
    v, k = table.shape
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["B", "S"]))
    h = ir.Value(name="h", type=ir.TensorType(FLOAT), shape=ir.Shape(["B", "S", k]))
    tv = const("table", table)
    inits = [tv]
    gather = ir.node("Gather", [tv, ids], attributes={"axis": 0}, name="embed")
    nodes = [gather]
    if head == "fused":
        nodes.append(ir.node("FusedMatMul", [h, tv], attributes={"transB": 1}, domain=MS, name="lm_head"))
    elif head == "transpose":
        t = ir.node("Transpose", [tv], attributes={"perm": [1, 0]}, name="t")
        nodes += [t, ir.node("MatMul", [h, t.outputs[0]], name="lm_head")]
    else:
        inits.append(const("table_t", np.ascontiguousarray(table.T)))
        nodes.append(ir.node("MatMul", [h, inits[-1]], name="lm_head"))
    emb, logits = gather.outputs[0], nodes[-1].outputs[0]
    emb.name, emb.dtype = "emb", FLOAT
    logits.name, logits.dtype = "logits", FLOAT
    return make_model([ids, h], nodes, [emb, logits], inits)


# --- FusedMatMul and transposed weights as sites ---------------------------------------------
@pytest.mark.parametrize(
    ("op", "attrs"), [("FusedMatMul", {"transB": 1}), ("FusedMatMul", {}), ("Transpose", {})]
)
def test_fused_matmul_and_transposed_weight_become_matmulnbits(op, attrs):
    rng = np.random.default_rng(0)
    w_nk = rng.standard_normal((40, 64)).astype(np.float32)  # [N, K]
    w = w_nk if attrs.get("transB") or op == "Transpose" else np.ascontiguousarray(w_nk.T)
    q, row = quantize(head_model(w, op, **attrs), "quantize-weight-only(min_size=0,accuracy_level=0)")
    (node,) = ops(q, "MatMulNBits")
    assert (node.attributes.get_int("K"), node.attributes.get_int("N")) == (64, 40)
    assert decisions(row)["head"] == (True, "rtn 4-bit")
    key = "sites:FusedMatMul" if op == "FusedMatMul" else "sites:MatMul(Transpose(weight))"
    assert row.stats[key] == 1
    # The float weight (and the Transpose it was read through) are gone.
    assert [n.op_type for n in q.graph] == ["MatMulNBits"]
    assert "w" not in q.graph.initializers
    wq = dequantize_matmulnbits(node)
    assert np.abs(wq - w_nk).max() < 0.2 * np.abs(w_nk).max()
    x = rng.standard_normal((2, 3, 64)).astype(np.float32)
    np.testing.assert_allclose(run_model(q, {"x": x})[0][1], x @ wq.T, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({"transB": 1, "alpha": 0.5}, "FusedMatMul alpha != 1"),
        ({"transA": 1}, "FusedMatMul transA=1"),
        ({"transBatchB": 1}, "FusedMatMul transBatchA/B=1"),
    ],
)
def test_fused_matmul_that_is_not_a_plain_product_stays_float(attrs, reason):
    w = np.random.default_rng(1).standard_normal((64, 64)).astype(np.float32)
    q, row = quantize(head_model(w, "FusedMatMul", **attrs), "quantize-weight-only(min_size=0)")
    assert decisions(row) == {"head": (False, reason)}
    assert not ops(q, "MatMulNBits")


def test_transpose_with_another_permutation_is_not_a_site():
    w = np.random.default_rng(2).standard_normal((64, 64)).astype(np.float32)
    model = head_model(w, "Transpose")
    model.graph.node(0).attributes["perm"] = ir.AttrInt64s("perm", [0, 1])
    q, row = quantize(model, "quantize-weight-only(min_size=0)")
    assert not ops(q, "MatMulNBits") and not decisions(row)


# --- tied tables -----------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["fused", "transpose", "copy"])
@pytest.mark.parametrize(
    ("k", "block", "symmetric"),
    [(64, 32, True), (64, 32, False), (96, 32, False), (96, 64, True), (96, 64, False)],
)
def test_tied_table_is_stored_once_and_gather_rows_equal_matmulnbits_weights(head, k, block, symmetric):
    """One levels, one scales (and one zero-points) initializer serve both ops, and on ONNX Runtime
    the gathered rows equal the MatMulNBits weights exactly (K=96: an odd block count, whose zero
    points end in half a byte; block 64: rows padded to 128 and sliced back)."""
    rng = np.random.default_rng(k + block)
    v = 200
    table = rng.standard_normal((v, k)).astype(np.float32)
    model = tied_model(table, head)
    spec = f"quantize-weight-only(block_size={block},symmetric={str(symmetric).lower()},accuracy_level=0)"
    q, row = quantize(model, spec)
    (mm,) = ops(q, "MatMulNBits")
    (gather,) = ops(q, "GatherBlockQuantized")
    assert row.stats["tied_embeddings"] == 1
    assert decisions(row)["embed"] == (True, "rtn 4-bit embedding, stored once with lm_head")
    # Stored once: the Gather reads the MatMulNBits levels through a Reshape, and the same scales
    # and zero points; no float table is left.
    reshape = gather.inputs[0].producer()
    assert reshape is not None and reshape.op_type == "Reshape"
    assert reshape.inputs[0] is mm.inputs[1]
    assert gather.inputs[2] is mm.inputs[2]
    assert (len(gather.inputs) > 3) == (not symmetric) == (len(mm.inputs) > 3)
    if not symmetric:
        assert gather.inputs[3] is mm.inputs[3]
    float_inits = [n for n, val in q.graph.initializers.items() if val.dtype == FLOAT]
    assert float_inits == [mm.inputs[2].name]
    assert not ops(q, "Transpose", "")
    # Numerics on ONNX Runtime: all rows gathered; the head applied to the identity gives W^T.
    ids = np.arange(v, dtype=np.int64)[None, :]
    eye = np.eye(k, dtype=np.float32)[None]
    emb, logits = (out for _, out in run_model(q, {"ids": ids, "h": eye}))
    assert emb.shape == (1, v, k)
    np.testing.assert_array_equal(emb[0], logits[0].T)
    np.testing.assert_array_equal(emb[0], dequantize_matmulnbits(mm))
    assert np.abs(emb[0] - table).max() < 0.2 * np.abs(table).max()


def test_untied_tables_padded_rows_and_a_table_two_gathers_read_stored_once():
    """An embedding whose hidden size is not a multiple of the block size is gathered padded and
    sliced back (it used to stay float); two Gathers of one table share one quantized copy."""
    rng = np.random.default_rng(3)
    v, k = 100, 80  # block 32: 3 blocks, rows padded to 96
    table = rng.standard_normal((v, k)).astype(np.float32)
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["B", "S"]))
    tv = const("table", table)
    nodes = [ir.node("Gather", [tv, ids], name=f"embed{i}") for i in range(2)]
    for i, n in enumerate(nodes):
        n.outputs[0].name, n.outputs[0].dtype = f"emb{i}", FLOAT
    q, row = quantize(make_model([ids], nodes, [n.outputs[0] for n in nodes], [tv]))
    a, b = ops(q, "GatherBlockQuantized")
    assert all(a.inputs[i] is b.inputs[i] for i in (0, 2))
    assert a.inputs[0].shape == ir.Shape([v, 48]) and len(ops(q, "Slice", "")) == 2
    assert "table" not in q.graph.initializers
    got = run_model(q, {"ids": np.arange(v, dtype=np.int64)[None]})
    assert got[0][1].shape == (1, v, k)
    np.testing.assert_array_equal(got[0][1], got[1][1])
    assert np.abs(got[0][1][0] - table).max() < 0.2 * np.abs(table).max()


# --- a tied decoder through the ort-cpu pipeline ---------------------------------------------
@pytest.fixture(scope="module")
def tied_decoder():
    """A tiny tied-embedding Llama exported with its KV cache (vocab 512: its packed table is
    larger than what cleanup's constant folder folds, as any real vocabulary's is)."""
    pytest.importorskip("transformers")
    import importlib.util

    from graphopt.llm.export import export_decoder

    # tests/llm/llm_models.py (a module, not a package: "llm" is also a PyPI package's name).
    spec = importlib.util.spec_from_file_location(
        "llm_models", Path(__file__).parents[2] / "llm" / "llm_models.py"
    )
    assert spec is not None and spec.loader is not None
    llm_models = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(llm_models)
    model = llm_models.tiny_causal_lm("llama", tied=True)
    model.resize_token_embeddings(512)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return export_decoder(model)


def decoder_feeds(model: ir.Model, ids: np.ndarray) -> dict[str, np.ndarray]:
    b, n = ids.shape
    feeds = {
        "input_ids": ids,
        "attention_mask": np.ones((b, n), np.int64),
        "position_ids": np.tile(np.arange(n, dtype=np.int64), (b, 1)),
    }
    for v in model.graph.inputs:
        if v.name.startswith("past_key_values."):
            feeds[v.name] = np.zeros((b, v.shape[1], 0, v.shape[3]), np.float32)
    return feeds


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def tied_head(model: ir.Model) -> tuple[ir.Node, ir.Node]:
    """The GatherBlockQuantized and the MatMulNBits it shares levels with."""
    (gather,) = ops(model, "GatherBlockQuantized")
    reshape = gather.inputs[0].producer()
    assert reshape is not None and reshape.op_type == "Reshape", "the embedding has its own copy"
    (head,) = [n for n in ops(model, "MatMulNBits") if n.inputs[1] is reshape.inputs[0]]
    assert gather.inputs[2] is head.inputs[2]
    return gather, head


@pytest.mark.parametrize("symmetric", [True, False])
def test_tied_decoder_stores_the_table_once_and_runs_on_ort(tied_decoder, symmetric):
    import graphopt

    quantize_request = {"mode": "int4", "symmetric": symmetric}
    result = graphopt.optimize(tied_decoder.clone(), target="ort-cpu", quantize=quantize_request)
    q = result.model
    gather, head = tied_head(q)
    if not symmetric:
        assert gather.inputs[3] is head.inputs[3]
    row = [p for p in result.report.passes if p.name == "quantize"][-1]
    assert row.stats["tied_embeddings"] == 1
    # Nothing vocab-sized stays float, and the levels are stored once.
    vocab_sized = [n for n, v in q.graph.initializers.items() if v.shape is not None and 512 in v.shape]
    assert sorted(vocab_sized) == sorted(
        [head.inputs[1].name, head.inputs[2].name] + ([head.inputs[3].name] if not symmetric else [])
    )
    # ONNX Runtime loads it with its own optimizations on (as onnxruntime-genai runs it).
    feeds = decoder_feeds(tied_decoder, np.random.default_rng(0).integers(0, 512, (2, 24)))
    ref = run_model(tied_decoder, feeds)[0][1]
    got = run_model(q, feeds, optimize=True)[0][1]
    assert got.shape == ref.shape
    # A random 2-layer model amplifies int4 error (0.88/0.90 here, 0.88 with a float LM head).
    assert cosine(got, ref) > 0.85


def test_tied_table_is_rounded_to_nearest_under_gptq_unless_asked(tied_decoder):
    import graphopt

    rng = np.random.default_rng(1)
    calib = [decoder_feeds(tied_decoder, rng.integers(0, 512, (1, 64))) for _ in range(4)]
    levels = {}
    for name, request in [
        ("rtn", {"mode": "int4", "method": "rtn"}),
        ("gptq", {"mode": "int4", "method": "gptq"}),
        ("tied_gptq", {"mode": "int4", "method": "gptq", "tied_gptq": True}),
    ]:
        result = graphopt.optimize(
            tied_decoder.clone(), target="ort-cpu", quantize=request, calibration=calib
        )
        gather, head = tied_head(result.model)
        levels[name] = head.inputs[1].const_value.numpy()
        row = [p for p in result.report.passes if p.name == "quantize"][-1]
        reasons = {d["node"]: d["reason"] for d in row.details["nodes"] if d["quantized"]}
        if name == "gptq":
            assert reasons[head.name] == "rtn (tied to an embedding) 4-bit"
            assert reasons[gather.name].startswith("rtn (tied to an embedding) 4-bit embedding, stored once")
    np.testing.assert_array_equal(levels["gptq"], levels["rtn"])
    assert not np.array_equal(levels["tied_gptq"], levels["rtn"])
