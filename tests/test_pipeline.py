"""Pass manager: registry lookups, fixpoints, instrumentation, verify_each, dumps, honest `modified`."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import graphopt
from graphopt.errors import GraphoptError, PassFailedError, PipelineError
from graphopt.pipeline import Pass, Pipeline
from graphopt.registry import Registry, default_registry

MLP = """
<ir_version: 8, opset_import: ["" : 17]>
mlp (float[N, 4] x) => (float[N, 2] y) {
    w1 = Constant <value = float[4, 3] {1., 0., 0., 0., 1., 0., 0., 0., 1., 1., 1., 1.}> ()
    b1 = Constant <value = float[3] {0.1, 0.2, 0.3}> ()
    two = Constant <value = float[1] {2.}> ()
    b1x2 = Mul (b1, two)
    h = MatMul (x, w1)
    hi = Identity (h)
    hb = Add (hi, b1x2)
    r = Relu (hb)
    d = Dropout (r)
    w2 = Constant <value = float[3, 2] {1., 2., 3., 4., 5., 6.}> ()
    y = MatMul (d, w2)
}
"""


def mlp() -> ir.Model:
    return ir.from_proto(onnx.parser.parse_model(MLP))


def test_builtin_passes_are_found_through_entry_points() -> None:
    names = default_registry().pass_names()
    for n in (
        "cleanup",
        "fold-constants",
        "remove-noops",
        "remove-unused",
        "cse",
        "dedup-initializers",
        "topological-sort",
        "shape-inference",
    ):
        assert n in names
    assert "ort-cpu" in default_registry().backend_names()


def test_list_passes_gives_summaries_and_options() -> None:
    infos = {i.name: i for i in graphopt.list_passes()}
    assert infos["fold-constants"].summary.startswith("Evaluate nodes")
    assert "max_fold_bytes" in [o.name for o in infos["fold-constants"].options]


def test_report_has_a_row_per_pass_execution_with_stats() -> None:
    model = mlp()
    before = sum(1 for _ in model.graph)
    _, report = Pipeline.parse("cleanup").run(model)
    names = [r.name for r in report.passes]
    assert names[0] == "cleanup/normalize-legacy-inputs"
    assert "cleanup/fold-constants" in names and "cleanup/topological-sort" in names
    fold = next(r for r in report.passes if r.name == "cleanup/fold-constants")
    assert fold.modified and fold.iteration == 1 and fold.stats.get("folded", 0) >= 1
    assert report.before.nodes == before
    assert report.after.nodes < before
    d = report.to_dict()
    assert d["passes"][0]["before"]["nodes"] == before
    assert "total" in report.table()


def test_fixpoint_repeats_until_nothing_changes() -> None:
    _, report = Pipeline.parse("fixpoint(max_iterations=5)[fold-constants,remove-noops,remove-unused]").run(
        mlp()
    )
    iterations = sorted({r.iteration for r in report.passes})
    assert iterations[-1] >= 2
    last = [r for r in report.passes if r.iteration == iterations[-1]]
    assert not any(r.modified for r in last)


def test_foreign_onnx_ir_pass_drops_in() -> None:
    reg = default_registry().copy()
    reg.register_pass("ir-identity-elim", ir.passes.common.IdentityEliminationPass)
    model, report = Pipeline.parse("ir-identity-elim", registry=reg).run(mlp(), registry=reg)
    assert report.passes[0].modified
    assert "Identity" not in [n.op_type for n in model.graph]


@dataclasses.dataclass
class _BreakOptions:
    mode: str = "invalid"


class _BreakingPass(Pass):
    """Breaks the model on purpose (test helper)."""

    name = "break"
    Options = _BreakOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        node = next(n for n in model.graph if n.op_type == "Relu")
        if self.options.mode == "invalid":
            node.op_type = "NoSuchOp"
        elif self.options.mode == "numeric":
            node.op_type = "Sigmoid"
        elif self.options.mode == "lie":
            node.op_type = "Sigmoid"
            return ir.passes.PassResult(model, False)
        else:
            raise RuntimeError("boom")
        return ir.passes.PassResult(model, True)


def _reg() -> Registry:
    reg = default_registry().copy()
    reg.register_pass("break", _BreakingPass)
    return reg


def test_verify_each_names_the_pass_that_broke_the_model() -> None:
    reg = _reg()
    with pytest.raises(PassFailedError) as e:
        Pipeline.parse("remove-noops,break", registry=reg).run(mlp(), registry=reg, verify_each=True)
    msg = str(e.value)
    assert "pass 'break' produced an invalid model" in msg
    assert "remove-noops" in msg


def test_numeric_each_names_the_pass_that_changed_outputs() -> None:
    reg = _reg()
    with pytest.raises(PassFailedError, match="pass 'break' changed the model's outputs"):
        Pipeline.parse("cleanup,break(mode=numeric)", registry=reg).run(
            mlp(), registry=reg, numeric_each=True
        )


def test_pass_exception_is_reported_with_its_name() -> None:
    reg = _reg()
    with pytest.raises(PassFailedError, match="pass 'break' failed: RuntimeError: boom"):
        Pipeline.parse("break(mode=crash)", registry=reg).run(mlp(), registry=reg)


def test_dishonest_modified_flag_is_caught_in_debug_mode() -> None:
    reg = _reg()
    with pytest.raises(PassFailedError, match="reported no change but changed the model"):
        Pipeline.parse("break(mode=lie)", registry=reg).run(mlp(), registry=reg, check_modified=True)


def test_builtin_passes_report_modified_honestly() -> None:
    # Every built-in pass on a model it changes and on the result (which it must leave alone).
    model = mlp()
    Pipeline.parse("cleanup").run(model, check_modified=True)
    for name in (
        "fold-constants",
        "remove-noops",
        "remove-unused",
        "cse",
        "dedup-initializers",
        "lift-constants",
    ):
        _, report = Pipeline.parse(name).run(model, check_modified=True)
        assert not report.passes[0].modified, name


def test_dump_dir_writes_a_model_per_pass(tmp_path) -> None:
    Pipeline.parse("fold-constants,remove-unused").run(mlp(), dump_dir=tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["001_fold-constants.onnx", "002_remove-unused.onnx"]
    for f in files:
        onnx.checker.check_model(onnx.load(str(tmp_path / f)))


def test_instruments_see_every_pass() -> None:
    seen = []

    class Recorder:
        def before_pass(self, name, model):
            seen.append(("before", name))

        def after_pass(self, name, model, record):
            seen.append(("after", name))

    Pipeline.parse("fold-constants,cse").run(mlp(), instruments=[Recorder()])
    assert seen == [
        ("before", "fold-constants"),
        ("after", "fold-constants"),
        ("before", "cse"),
        ("after", "cse"),
    ]


def test_optimize_does_not_modify_its_input_and_stamps_pipeline() -> None:
    # Weights are shared with the input, not copied; the input's nodes and values stay.
    model = mlp()
    ops_before = [(n.op_type, [v.name for v in n.inputs]) for n in model.graph]
    result = graphopt.optimize(model, target="ort-cpu", verify=True)
    graphopt.to_bytes(result.model)
    assert [(n.op_type, [v.name for v in n.inputs]) for n in model.graph] == ops_before
    assert graphopt.verify(mlp(), model).passed
    assert (
        result.model.metadata_props["graphopt.pipeline"]
        == default_registry().backend("ort-cpu").default_pipeline()
    )
    assert result.report.verification.passed
    assert result.report.after.nodes < result.report.before.nodes


@pytest.mark.parametrize("as_proto", [True, False])
def test_optimize_and_save_leave_the_input_bytes_unchanged(as_proto: bool) -> None:
    """onnx_ir's serializer renames tensors after their values; with tensors shared between the
    input and the working copy, saving a result whose passes renamed initializers (dedup, folding,
    lifting) once renamed the caller's tensors too."""
    import onnx

    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    text = """
        <ir_version: 8, opset_import: ["" : 17]>
        g (float[2, 3] x) => (float[2, 4] y) {
            a = MatMul(x, w1)
            b = MatMul(x, w2)
            c = Constant <value = float[1] {2.0}> ()
            s = Add(a, b)
            y = Mul(s, c)
        }
    """
    proto = onnx.parser.parse_model(text)
    for name in ("w1", "w2"):  # identical weights: dedup renames one of them
        proto.graph.initializer.append(onnx.numpy_helper.from_array(w, name))
    source = proto if as_proto else graphopt.load(proto)
    before = proto.SerializeToString() if as_proto else graphopt.to_bytes(source)
    result = graphopt.optimize(source, target="ort-cpu")
    graphopt.to_bytes(result.model)
    assert sorted(result.model.graph.initializers) != ["w1", "w2"]  # dedup and lifting did rename
    after = proto.SerializeToString() if as_proto else graphopt.to_bytes(source)
    assert after == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"quantize": "int3"}, "quantize mode 'int3' is unknown"),
        ({"quantize": {"block_size": 32}}, "quantize mode None is unknown"),
        ({"quantize": "static"}, "static quantization needs calibration data"),
        ({"calibration": [{"x": np.zeros((1, 4), np.float32)}]}, "nothing uses it"),
        ({"prune": 1.0}, r"prune sparsity must be a number in \[0, 1\)"),
        ({"prune": {"sparsity": 0.5, "mode": "diagonal"}}, "prune mode 'diagonal' is unknown"),
        ({"quantize": "dynamic", "pipeline": "cleanup"}, "either pipeline= or quantize="),
    ],
)
def test_bad_quantize_and_prune_requests_are_clear_errors(kwargs, message) -> None:
    with pytest.raises(GraphoptError, match=message):
        graphopt.optimize(mlp(), **kwargs)


def test_pipeline_context_reaches_passes_and_details_reach_the_report() -> None:
    seen = {}

    class Probe(Pass):
        """Test pass: records the context it was given."""

        name = "probe"

        def call(self, model):
            seen.update(self.context)
            self.details["nodes"] = [{"node": "n", "quantized": False}]
            return ir.passes.PassResult(model, False)

    reg = default_registry().copy()
    reg.register_pass("probe", Probe)
    _, report = Pipeline.parse("probe", registry=reg).run(
        mlp(), registry=reg, context={"calibration": "data"}
    )
    assert seen == {"calibration": "data"}
    assert report.passes[0].details == {"nodes": [{"node": "n", "quantized": False}]}
    assert report.to_dict()["passes"][0]["details"]["nodes"][0]["node"] == "n"


def test_default_pipeline_places_prune_and_quantize() -> None:
    backend = default_registry().backend("ort-cpu")
    dyn = backend.default_pipeline(2, quantize={"mode": "dynamic"}, prune={"sparsity": 0.5, "mode": "2:4"})
    assert dyn.startswith('cleanup,prune(mode="2:4",sparsity=0.5),fuse-batchnorm')
    assert "fuse-ort" in dyn and dyn.endswith("quantize(mode=dynamic),lower-ort-cpu,cleanup")
    static = backend.default_pipeline(2, quantize={"mode": "static"})
    assert "fuse-ort" not in static and "fuse-gemm" in static  # QDQ needs the standard ops
    assert backend.default_pipeline(0, quantize={"mode": "int4"}) == "quantize(mode=int4)"


def test_unknown_target_is_a_clear_error() -> None:
    with pytest.raises(PipelineError, match="unknown target 'tpu'.*ort-cpu"):
        graphopt.optimize(mlp(), target="tpu")


def test_target_options_reach_the_backend_and_the_model_metadata() -> None:
    r = graphopt.optimize(mlp(), target="ort-cuda", target_options={"precision": "bfloat16"})
    assert json.loads(r.model.metadata_props["graphopt.target_options"]) == {"precision": "bfloat16"}
    assert "convert-float16(dtype=bfloat16" in r.report.pipeline or "bfloat16" in r.report.pipeline
    with pytest.raises(GraphoptError, match="precision"):
        graphopt.optimize(mlp(), target="ort-cuda", target_options={"precision": "int3"})


def test_optimize_checks_the_result_against_the_target() -> None:
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Gelu", ["x"], ["y"], domain="com.microsoft")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
    )
    proto = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    assert graphopt.optimize(proto, target="ort-cpu").model is not None
    with pytest.raises(GraphoptError, match="cannot run on tensorrt"):
        graphopt.optimize(proto, target="tensorrt", pipeline="cleanup")
