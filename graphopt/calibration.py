"""Calibration data: readers that stream feed dicts, never holding the whole set in memory.

Sources a user can give (``optimize(calibration=...)``, ``--calibration``):

* an ``.npz`` file: one array per model input; the first axis is split into batches of
  ``batch_size`` (default: the whole file is one batch per ``batch_size`` rows), or, when the keys
  look like ``NAME/INDEX`` (``input_ids/0``, ``input_ids/1``...), each index is one batch;
* a folder of ``.npz`` files (one batch each, sorted by name) or of ``.npy`` files named after
  the inputs (``input_ids.npy``) or ``INPUT.INDEX.npy`` / ``INDEX/INPUT.npy``;
* any Python iterable of ``{input_name: array}`` dicts (a list, a generator function's result
  is consumed once: pass a list or a callable returning a fresh iterator to calibrate twice).

Arrays are loaded lazily (``np.load(mmap_mode="r")`` for .npy), one batch at a time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from graphopt.errors import GraphoptError

__all__ = ["CalibrationData", "CalibrationError"]


class CalibrationError(GraphoptError):
    """Calibration data is missing, unreadable, or does not match the model's inputs."""


_INDEXED = re.compile(r"^(?P<name>.+)/(?P<index>\d+)$")


class CalibrationData:
    """A re-iterable source of feed dicts (``for feeds in data.batches(): ...``)."""

    def __init__(self, factory: Callable[[], Iterator[dict[str, Any]]], description: str,
                 *, single_use: bool = False) -> None:
        self._factory = factory
        self.description = description
        self._single_use = single_use
        self._used = False

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_any(cls, source: Any, *, batch_size: int | None = None) -> CalibrationData:
        """Wrap a path (.npz file or folder), an iterable of feed dicts, or a CalibrationData."""
        if isinstance(source, CalibrationData):
            return source
        if isinstance(source, (str, os.PathLike)):
            path = os.fspath(source)
            if os.path.isdir(path):
                return cls._from_folder(path)
            if not os.path.exists(path):
                raise CalibrationError(f"{path}: calibration data not found; give an .npz file or a folder of .npy/.npz")
            if path.endswith(".npy"):
                raise CalibrationError(
                    f"{path}: a single .npy has no input name; put it in a folder as INPUT.npy or use an .npz"
                )
            return cls._from_npz(path, batch_size)
        if isinstance(source, dict):
            return cls(lambda: iter([source]), "one feed dict")
        if callable(source):
            return cls(lambda: iter(source()), "a callable of feed dicts")
        if isinstance(source, (list, tuple)):
            items = list(source)
            return cls(lambda: iter(items), f"{len(items)} feed dicts")
        if isinstance(source, Iterable):
            it = iter(source)
            return cls(lambda: it, "an iterator of feed dicts", single_use=True)
        raise CalibrationError(
            f"cannot use {type(source).__name__} as calibration data; give an .npz path, a folder, "
            "or an iterable of {input_name: array} dicts"
        )

    @classmethod
    def _from_npz(cls, path: str, batch_size: int | None) -> CalibrationData:
        try:
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.files)
        except Exception as e:
            raise CalibrationError(f"{path}: not a readable .npz file ({type(e).__name__}: {e})") from None
        if not keys:
            raise CalibrationError(f"{path}: the .npz file holds no arrays")
        indexed = [(_INDEXED.match(k), k) for k in keys]
        if all(m for m, _ in indexed):
            order = sorted({int(m.group("index")) for m, _ in indexed})  # type: ignore[union-attr]

            def gen_indexed() -> Iterator[dict[str, Any]]:
                with np.load(path, allow_pickle=False) as z:
                    for i in order:
                        yield {m.group("name"): z[k] for m, k in indexed if int(m.group("index")) == i}  # type: ignore[union-attr]

            return cls(gen_indexed, f"{path} ({len(order)} batches)")

        with np.load(path, allow_pickle=False) as z:
            rows = {z[k].shape[0] if z[k].ndim else 1 for k in keys}
        n = rows.pop() if len(rows) == 1 else None

        def gen_rows() -> Iterator[dict[str, Any]]:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in keys}
            if n is None or batch_size is None or batch_size >= n:
                yield arrays
                return
            for start in range(0, n, batch_size):
                yield {k: a[start : start + batch_size] for k, a in arrays.items()}

        return cls(gen_rows, f"{path}")

    @classmethod
    def _from_folder(cls, path: str) -> CalibrationData:
        files = sorted(f for f in os.listdir(path) if f.endswith((".npz", ".npy")))
        if not files:
            raise CalibrationError(f"{path}: the folder holds no .npz or .npy files")
        npz = [f for f in files if f.endswith(".npz")]
        if npz:
            def gen_npz() -> Iterator[dict[str, Any]]:
                for f in npz:
                    yield from cls._from_npz(os.path.join(path, f), None).batches()

            return cls(gen_npz, f"{path} ({len(npz)} .npz files)")
        # INPUT.npy (one batch), INPUT.INDEX.npy (batch INDEX)
        groups: dict[int, dict[str, str]] = {}
        for f in files:
            stem = f[: -len(".npy")]
            m = re.match(r"^(?P<name>.+)\.(?P<index>\d+)$", stem)
            index, name = (int(m.group("index")), m.group("name")) if m else (0, stem)
            groups.setdefault(index, {})[name] = os.path.join(path, f)

        def gen_npy() -> Iterator[dict[str, Any]]:
            for i in sorted(groups):
                yield {name: np.load(p, mmap_mode="r", allow_pickle=False) for name, p in groups[i].items()}

        return cls(gen_npy, f"{path} ({len(groups)} batches of .npy)")

    # --- use --------------------------------------------------------------------------------
    def batches(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Yield feed dicts (at most ``limit``); a one-shot iterator can be walked only once."""
        if self._single_use and self._used:
            raise CalibrationError(
                "the calibration iterator was already consumed; pass a list or a callable that returns "
                "a fresh iterator when the data is needed more than once"
            )
        self._used = True
        for i, feeds in enumerate(self._factory()):
            if limit is not None and i >= limit:
                return
            if not isinstance(feeds, dict):
                raise CalibrationError(
                    f"calibration batch {i} is a {type(feeds).__name__}, not a dict of input name -> array"
                )
            yield feeds

    def materialize(self, limit: int | None = None) -> CalibrationData:
        """A re-iterable copy (for one-shot iterators used by several steps; holds the batches)."""
        items = list(self.batches(limit))
        return CalibrationData(lambda: iter(items), self.description)

    def __repr__(self) -> str:
        return f"CalibrationData({self.description})"


def check_feeds(feeds: dict[str, Any], input_names: list[str], index: int) -> dict[str, np.ndarray]:
    """Feeds restricted to the model's inputs, as arrays; a clear error for missing ones."""
    missing = [n for n in input_names if n not in feeds]
    if missing:
        raise CalibrationError(
            f"calibration batch {index} lacks model input(s) {missing} (it has {sorted(feeds)}); "
            "name the arrays after the model's inputs"
        )
    return {n: np.asarray(feeds[n]) for n in input_names}


def stream_tensors(
    model: Any,
    names: list[str],
    data: CalibrationData,
    *,
    limit: int | None = None,
    progress: bool | None = None,
    description: str = "calibrating",
) -> Iterator[dict[str, np.ndarray]]:
    """Run ``model`` on every calibration batch and yield ``{name: value}`` for the named values.

    The named intermediate values become extra graph outputs of a private copy of the model
    (the caller's model is untouched); one batch is in memory at a time, so callers that reduce
    each batch into mergeable statistics keep memory flat however long the data is. ORT's
    graph optimizations are off so that no fusion hides a requested value.
    """
    import onnx_ir as ir
    import onnxruntime as ort

    from graphopt.ir import load, to_bytes

    base = load(model)
    work = base.clone()
    by_name: dict[str, ir.Value] = {}
    for v in work.graph.inputs:
        by_name[v.name] = v  # type: ignore[index]
    for node in work.graph:
        for o in node.outputs:
            if o.name:
                by_name[o.name] = o
    for name, init in work.graph.initializers.items():
        by_name.setdefault(name, init)
    missing = [n for n in names if n not in by_name]
    if missing:
        raise CalibrationError(f"cannot observe values {missing[:5]}: not produced in the main graph")
    outputs = {v.name for v in work.graph.outputs}
    for n in names:
        if n not in outputs:
            work.graph.outputs.append(by_name[n])
            outputs.add(n)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(to_bytes(work), so, providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    batches = data.batches(limit)
    if progress is None:
        import sys

        progress = sys.stderr.isatty()
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=description, unit="batch", total=limit)
    for i, feeds in enumerate(batches):
        arrays = check_feeds(feeds, input_names, i)
        values = session.run(names, arrays)
        yield dict(zip(names, values))
