"""Shared helpers of the prune tests: run the pass on a copy, read initializers, and
mirror a pruning decision in the PyTorch module the model was exported from.

The test modules' fixtures come from :func:`built` (no conftest.py here: it would shadow
tests/conftest.py, which other tests import as ``conftest``).

Structured pruning is checked export-free: the same units are masked to zero in the torch module
(the consumers' input slices, which makes the removed units contribute nothing, exactly as
removing them does) and the torch output must equal ONNX Runtime's on the pruned graph.
"""

from __future__ import annotations

import functools

import numpy as np
import onnx
import onnx_ir as ir

from graphopt.passes.prune import PrunePass
from graphopt.pipeline import Pipeline


def _export_clean(exportable_or_model):
    m = exportable_or_model.export()
    m, _ = Pipeline.parse("cleanup").run(m)
    return m


def _prune(model: ir.Model, context: dict | None = None, **options):
    p = PrunePass(**options)
    p.context = dict(context or {})
    work = model.clone()
    result = p(work)
    return result.model, p


def _inits(model: ir.Model) -> dict[str, np.ndarray]:
    return {
        n: v.const_value.numpy() for n, v in model.graph.initializers.items() if v.const_value is not None
    }


def _check(model: ir.Model) -> None:
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)


def _torch_param(module, array: np.ndarray):
    """(parameter, transposed) whose value is ``array`` (a Linear weight appears transposed in MatMul)."""
    for _, p in module.named_parameters():
        t = p.detach().numpy()
        if t.shape == array.shape and np.array_equal(t, array):
            return p, False
        if t.ndim == 2 and t.T.shape == array.shape and np.array_equal(t.T, array):
            return p, True
    raise AssertionError(f"no torch parameter matches an ONNX weight of shape {array.shape}")


def _mask_torch(module, original: ir.Model, details: dict) -> int:
    """Zero, in ``module``, the consumer input slices of every removed unit; returns how many slices."""
    import torch

    inits = _inits(original)
    n = 0
    with torch.no_grad():
        for g in details["groups"]:
            removed = np.asarray(g["removed"], dtype=np.int64)
            if removed.size == 0:
                continue
            for s in g["slices"]:
                if s["role"] != "in":
                    continue
                p, transposed = _torch_param(module, inits[s["weight"]])
                axis = s["axis"] if not transposed else 1 - s["axis"]
                idx = (removed[:, None] * s["block"] + np.arange(s["block"])[None, :]).ravel()
                index = [slice(None)] * p.ndim
                index[axis] = torch.from_numpy(idx)
                p[tuple(index)] = 0
                n += 1
    return n


def _torch_out(module, feeds: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    import torch

    with torch.no_grad():
        kwargs = {k: torch.from_numpy(v) for k, v in feeds.items() if k in names}
        out = module(**kwargs)
    if hasattr(out, "last_hidden_state"):
        out = out.last_hidden_state
    return out.numpy()


# --- the models behind the fixtures (one build per session) -------------------------------------


@functools.cache
def built(kind: str):
    """``bert`` / ``llama``: (exportable, cleaned model); ``digits_cnn``: (trained digits CNN, model).
    Built once per session: the tests never change them (the pass runs on copies)."""
    if kind == "bert":
        from models import build_bert

        ex = build_bert("tiny")
        return ex, _export_clean(ex)
    if kind == "llama":
        from models import build_llama

        ex = build_llama("tiny")
        return ex, _export_clean(ex)
    from digits import train_digits_cnn

    d = train_digits_cnn(epochs=2)
    m, _ = Pipeline.parse("cleanup").run(d.export())
    return d, m
