"""Calibration data: readers that stream feed dicts, never holding the whole set in memory.

Sources a user can give (``optimize(calibration=...)``, ``--calibration``):

* an ``.npz`` file: one array per model input; the first axis is split into batches of
  ``batch_size`` (default: the whole file is one batch per ``batch_size`` rows), or, when the keys
  look like ``NAME/INDEX`` (``input_ids/0``, ``input_ids/1``...), each index is one batch;
* a folder of ``.npz`` files (one batch each, sorted by name) or of ``.npy`` files named after
  the inputs (``input_ids.npy``) or ``INPUT.INDEX.npy`` / ``INDEX/INPUT.npy``;
* any Python iterable of ``{input_name: array}`` dicts (a list, a generator function's result
  is consumed once: pass a list or a callable returning a fresh iterator to calibrate twice).

A batch that stacks N samples for a model with a static batch (N images for an input declared
``[1, 3, 224, 224]``) is split into the batches the model takes once :meth:`CalibrationData.check`
has seen the model (and by :func:`stream_tensors` for the model it runs); with a symbolic batch
the batch is fed whole.

Arrays are loaded lazily (memory-mapped for .npy), one batch at a time. Files are hostile until
checked: only regular files are opened (a FIFO would block), and every array header is read and
checked (no object arrays, no negative or oversized shapes, the declared size equal to the stored
one) before any data is read or decompressed; floating-point data must be finite.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import onnx_ir as ir

from graphopt.errors import GraphoptError
from graphopt.files import (
    ArrayInfo,
    count_non_finite,
    load_npy,
    npy_info,
    npz_infos,
    open_npz,
    read_npz_array,
)
from graphopt.inputs import real_inputs, split_batches, stacked_count, static_batches

__all__ = ["CalibrationData", "CalibrationError"]


class CalibrationError(GraphoptError):
    """Calibration data is missing, unreadable, or does not match the model's inputs."""


_INDEXED = re.compile(r"^(?P<name>.+)/(?P<index>\d+)$")


#: What a file source declares for one batch, read from the array headers: input name ->
#: (shape, with None for the axis that is split into batches; dtype).
BatchSpec = dict[str, tuple[tuple[int | None, ...], np.dtype]]


class CalibrationData:
    """A re-iterable source of feed dicts (``for feeds in data.batches(): ...``).

    Every batch is checked as it is read: floating-point arrays must be finite (a NaN or Inf in
    calibration data would silently skew or void the ranges). File sources also carry ``specs``,
    what their array headers declare, so :meth:`check` can compare them with a model's inputs
    before any array data is read or decompressed.
    """

    def __init__(
        self,
        factory: Callable[[], Iterator[dict[str, Any]]],
        description: str,
        *,
        single_use: bool = False,
        specs: list[BatchSpec] | None = None,
    ) -> None:
        self._factory = factory
        self.description = description
        self._single_use = single_use
        self._used = False
        self.specs = specs
        #: The model's static batch per input (set by :meth:`check`): batches are split to it.
        self.static_batches: dict[str, tuple[int, int]] = {}

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
            if not os.path.lexists(path):
                raise CalibrationError(
                    f"{path}: calibration data not found; give an .npz file or a folder of .npy/.npz"
                )
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
        # Headers only (each checked against the archive's directory): nothing is decompressed yet.
        infos = npz_infos(path, CalibrationError)
        if not infos:
            raise CalibrationError(f"{path}: the .npz file holds no arrays")
        indexed = [(_INDEXED.match(i.name), i) for i in infos]
        if all(m for m, _ in indexed):
            groups: dict[int, dict[str, ArrayInfo]] = {}
            for m, info in indexed:
                groups.setdefault(int(m.group("index")), {})[m.group("name")] = info  # type: ignore[union-attr]  # all() above
            order = sorted(groups)

            def gen_indexed() -> Iterator[dict[str, Any]]:
                with open_npz(path, CalibrationError) as zf:
                    for i in order:
                        yield {
                            name: read_npz_array(zf, info, path, CalibrationError)
                            for name, info in groups[i].items()
                        }

            specs: list[BatchSpec] = [
                {name: (info.shape, info.dtype) for name, info in groups[i].items()} for i in order
            ]
            return cls(gen_indexed, f"{path} ({len(order)} batches)", specs=specs)

        rows = {i.shape[0] if i.shape else 1 for i in infos}
        n = rows.pop() if len(rows) == 1 else None
        split = n is not None and batch_size is not None and batch_size < n

        def gen_rows() -> Iterator[dict[str, Any]]:
            with open_npz(path, CalibrationError) as zf:
                arrays = {i.name: read_npz_array(zf, i, path, CalibrationError) for i in infos}
            if not split:
                yield arrays
                return
            assert n is not None and batch_size is not None
            for start in range(0, n, batch_size):
                yield {k: a[start : start + batch_size] for k, a in arrays.items()}

        spec: BatchSpec = {
            i.name: ((None, *i.shape[1:]) if split and i.shape else i.shape, i.dtype) for i in infos
        }
        return cls(gen_rows, f"{path}", specs=[spec])

    @classmethod
    def _from_folder(cls, path: str) -> CalibrationData:
        files = sorted(f for f in os.listdir(path) if f.endswith((".npz", ".npy")))
        if not files:
            raise CalibrationError(f"{path}: the folder holds no .npz or .npy files")
        npz = [f for f in files if f.endswith(".npz")]
        if npz:
            parts = [cls._from_npz(os.path.join(path, f), None) for f in npz]

            def gen_npz() -> Iterator[dict[str, Any]]:
                for part in parts:
                    yield from part.batches()

            return cls(
                gen_npz,
                f"{path} ({len(npz)} .npz files)",
                specs=[spec for part in parts for spec in part.specs or []],
            )
        # INPUT.npy (one batch), INPUT.INDEX.npy (batch INDEX)
        groups: dict[int, dict[str, tuple[str, ArrayInfo]]] = {}
        for f in files:
            stem = f[: -len(".npy")]
            m = re.match(r"^(?P<name>.+)\.(?P<index>\d+)$", stem)
            index, name = (int(m.group("index")), m.group("name")) if m else (0, stem)
            file = os.path.join(path, f)
            groups.setdefault(index, {})[name] = (file, npy_info(file, name, CalibrationError))

        def gen_npy() -> Iterator[dict[str, Any]]:
            for i in sorted(groups):
                yield {
                    name: load_npy(file, info, CalibrationError) for name, (file, info) in groups[i].items()
                }

        specs: list[BatchSpec] = [
            {name: (info.shape, info.dtype) for name, (_, info) in groups[i].items()} for i in sorted(groups)
        ]
        return cls(gen_npy, f"{path} ({len(groups)} batches of .npy)", specs=specs)

    # --- use --------------------------------------------------------------------------------
    def batches(self, limit: int | None = None) -> Iterator[dict[str, Any]]:
        """Yield feed dicts (at most ``limit``); a one-shot iterator can be walked only once."""
        if self._single_use and self._used:
            raise CalibrationError(
                "the calibration iterator was already consumed; pass a list or a callable that returns "
                "a fresh iterator when the data is needed more than once"
            )
        self._used = True
        n = 0
        for i, feeds in enumerate(self._factory()):
            if limit is not None and n >= limit:
                return
            if not isinstance(feeds, dict):
                raise CalibrationError(
                    f"calibration batch {i} is a {type(feeds).__name__}, not a dict of input name -> array"
                )
            for name, value in feeds.items():
                _check_finite(name, value, i, self.description)
            for part in split_batches(feeds, self.static_batches) if self.static_batches else [feeds]:
                if limit is not None and n >= limit:
                    return
                n += 1
                yield part

    def check(self, model: Any) -> None:
        """Refuse data that cannot calibrate ``model`` before any pass runs (so no pass can swallow
        the error): for file sources, the declared names, dtypes and shapes of every batch against
        the model's inputs, from the headers, before any data is read; then, unless the source is a
        one-shot iterator, every batch's values (finite). From then on, batches that stack several
        of the model's static batches are split into those."""
        from graphopt.ir import load

        model = load(model)
        batches = static_batches(model)
        inputs = [v for v in real_inputs(model) if isinstance(v.type, ir.TensorType)]
        for i, spec in enumerate(self.specs or []):
            missing = [v.name for v in inputs if v.name not in spec]
            if missing:
                raise CalibrationError(
                    f"calibration batch {i} ({self.description}) lacks model input(s) {missing} (it has "
                    f"{sorted(spec)}); name the arrays after the model's inputs"
                )
            counts = stacked_count({name: shape for name, (shape, _) in spec.items()}, batches)
            if len(set(counts.values())) > 1:
                raise CalibrationError(
                    f"calibration batch {i} ({self.description}) stacks different numbers of samples "
                    f"per input ({', '.join(f'{k}: {n}' for k, n in sorted(counts.items()))}) for a model "
                    "of static batch; give every input the same number of samples"
                )
            for v in inputs:
                stacked = v.name in counts
                _check_declared(v, *spec[v.name], i, self.description, stacked)  # type: ignore[index]  # names checked above
        self.static_batches = batches
        if not self._single_use:
            for _ in self.batches():
                pass

    def materialize(self, limit: int | None = None) -> CalibrationData:
        """A re-iterable copy (for one-shot iterators used by several steps; holds the batches)."""
        items = list(self.batches(limit))
        data = CalibrationData(lambda: iter(items), self.description, specs=self.specs)
        data.static_batches = self.static_batches
        return data

    def __repr__(self) -> str:
        return f"CalibrationData({self.description})"


def _check_finite(name: str, value: Any, index: int, description: str) -> None:
    arr = value if isinstance(value, np.ndarray) else None
    if arr is None:
        try:
            arr = np.asarray(value)
        except Exception:  # ONNX Runtime says what is wrong with it when the batch is run
            return
    try:
        bad = count_non_finite(arr)
    except TypeError:  # dtypes numpy cannot test (e.g. ml_dtypes' 8-bit floats)
        return
    if bad:
        raise CalibrationError(
            f"calibration array '{name}' of batch {index} ({description}) holds {bad:,} NaN/Inf values of "
            f"{arr.size:,}; calibration needs finite data: drop or fix those samples"
        )


def _check_declared(
    value: ir.Value,
    shape: tuple[int | None, ...],
    dtype: np.dtype,
    index: int,
    description: str,
    stacked: bool = False,
) -> None:
    """``stacked``: the array stacks several of the model's static batches on axis 0 (it is split)."""
    assert isinstance(value.type, ir.TensorType)
    where = f"calibration array '{value.name}' of batch {index} ({description})"
    try:
        want = np.dtype(value.type.dtype.numpy())
    except Exception:  # a dtype numpy does not name: ONNX Runtime checks it when the batch runs
        want = None
    if want is not None and dtype != want:
        raise CalibrationError(f"{where} is {dtype}, but the model input is {want}; save it as {want}")
    if value.shape is None:
        return
    if len(shape) != len(value.shape):
        raise CalibrationError(
            f"{where} has shape {list(shape)}, but the model input has rank {len(value.shape)} "
            f"({[str(d) for d in value.shape]}); reshape the data"
        )
    for axis, (got, need) in enumerate(zip(shape, value.shape)):
        if axis == 0 and stacked:
            continue
        if isinstance(need, int) and need >= 0 and got is not None and got != need:
            raise CalibrationError(
                f"{where} has shape {list(shape)}, but the model input needs {need} on axis {axis} "
                f"({[str(d) for d in value.shape]}); reshape the data"
            )


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
    so.log_severity_level = 4  # failures come back as exceptions, reported by the caller
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(to_bytes(work), so, providers=["CPUExecutionProvider"])
    input_names = [i.name for i in session.get_inputs()]
    static = static_batches(base)
    batches = data.batches(limit)
    if progress is None:
        import sys

        progress = sys.stderr.isatty()
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=description, unit="batch", total=limit)
    for i, feeds in enumerate(batches):
        arrays = check_feeds(feeds, input_names, i)
        for part in split_batches(arrays, static):  # data not checked against this model
            values = session.run(names, part)
            yield dict(zip(names, values))
