"""Model I/O over onnx_ir: load, save and serialise safely.

Why not just ``onnx_ir.load``/``onnx_ir.save``: they trust external-data ``location`` fields
(absolute paths, ``..``, links: the CVE-2022-25882 / CVE-2024-27318 / CVE-2026-27489 class of
hole), write the model file non-atomically and can overwrite the data file the input model
reads from. This module adds those checks and atomic, deterministic writes, and keeps onnx_ir's
lazy, memory-mapped external tensors so weights are never copied into Python objects on load.
The load-side checks live in :mod:`graphopt.files` (regular files, bounded reads),
:mod:`graphopt.external` (external data and sparse initializers) and :mod:`graphopt.validate`
(the model against the ONNX spec).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from typing import IO

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from graphopt.annotations import declared_annotations_only
from graphopt.errors import (
    ModelLoadError,
    OutputError,
    UnsafeExternalDataError,
)
from graphopt.external import check_external_protos, check_external_tensor, densify_sparse_initializers
from graphopt.external import expected_nbytes as _expected_nbytes
from graphopt.external import safe_relative as _safe_relative
from graphopt.files import _atomic_write, _fsync_dir, _write_temp, read_regular
from graphopt.sparse_storage import SPARSE_STORAGE_KEY, to_sparse_proto
from graphopt.validate import KNOWN_DOMAINS, check_supported, validate_model

__all__ = [
    "ModelSource",
    "load",
    "save",
    "settings_file_for",
    "to_bytes",
    "to_proto",
    "external_tensors",
    "detach_tensors",
    "KNOWN_DOMAINS",
    "PROTOBUF_LIMIT",
]

logger = logging.getLogger("graphopt.ir")

ModelSource = str | os.PathLike | bytes | onnx.ModelProto | ir.Model

#: Protobuf refuses to serialise messages of 2 GiB or more; stay clear of it.
PROTOBUF_LIMIT = 2**31 - 1
#: Above this many bytes of tensor data, ``save`` writes external data automatically.
AUTO_EXTERNAL_BYTES = 1_800_000_000
#: Tensors at least this large go to the external data file when one is written.
EXTERNAL_SIZE_THRESHOLD = 1024

#: Key under which a loaded model remembers the file it came from (never serialised).
SOURCE_KEY = "graphopt.source_path"


# ---------------------------------------------------------------------------------------------
# Loading


def load(
    src: ModelSource,
    *,
    base_dir: str | os.PathLike | None = None,
    allow_custom_domains: bool = False,
) -> ir.Model:
    """Load a model from a path, bytes, an ``onnx.ModelProto`` or an ``onnx_ir.Model``.

    External data stays on disk (memory-mapped when first read). Every external reference is
    checked before anything reads it. ``base_dir`` resolves external data for bytes/proto
    input; for a path it is the file's folder. An ``ir.Model`` is returned as is.
    """
    if isinstance(src, ir.Model):
        return src
    if isinstance(src, (bytes, bytearray, memoryview)):
        proto = _parse_bytes(bytes(src), "<bytes>")
        where = "<bytes>"
        folder = None if base_dir is None else os.fspath(base_dir)
        source_path = None
    elif isinstance(src, onnx.ModelProto):
        proto = src
        where = "<ModelProto>"
        folder = None if base_dir is None else os.fspath(base_dir)
        source_path = None
    elif isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        where = path
        # A regular file only (a FIFO would block, /dev/zero never end), and no more than one
        # protobuf message can hold: weights beyond 2 GB live in external data files.
        data = read_regular(
            path,
            "model",
            PROTOBUF_LIMIT,
            ModelLoadError,
            hint="larger models keep their weights in external data files",
        )
        proto = _parse_bytes(data, path)
        del data
        folder = os.path.dirname(os.path.abspath(path)) if base_dir is None else os.fspath(base_dir)
        source_path = os.path.realpath(path)
    else:
        raise ModelLoadError(
            f"cannot load a model from {type(src).__name__}; give a path, bytes, "
            "an onnx.ModelProto or an onnx_ir.Model"
        )

    check_supported(proto, where, allow_custom_domains=allow_custom_domains)
    # Every external reference (sparse initializers' too) against the model's folder, before
    # anything reads one; then the model against the ONNX spec, before any pass sees it.
    check_external_protos(proto, folder, where)
    proto = validate_model(proto, where, folder=folder, allow_custom_domains=allow_custom_domains)
    if proto.graph.sparse_initializer:
        proto = densify_sparse_initializers(proto, where, folder)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as e:  # onnx_ir raises plain exceptions on malformed protos
        raise ModelLoadError(f"{where}: malformed ONNX model ({_one_line(e)})") from None

    for tensor in external_tensors(model):
        assert folder is not None  # check_external_protos refused external data without a folder
        tensor.base_dir = folder
        check_external_tensor(tensor, folder, where)
    if source_path is not None:
        model.meta[SOURCE_KEY] = source_path
    return model


def _parse_bytes(data: bytes, where: str) -> onnx.ModelProto:
    if not data:
        raise ModelLoadError(f"{where}: file is empty; give an .onnx model file")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as e:
        raise ModelLoadError(
            f"{where}: not a valid ONNX model (truncated or not ONNX: {_one_line(e)}); "
            "check that the file is complete"
        ) from None
    # Protobuf happily parses some non-ONNX bytes into a mostly-empty message.
    if proto.ir_version <= 0 or not proto.HasField("graph"):
        raise ModelLoadError(
            f"{where}: not an ONNX model (no ir_version or graph); check that the file is an .onnx model"
        )
    return proto


def external_tensors(model: ir.Model) -> Iterator[ir.ExternalTensor]:
    """Every external tensor of the model: initializers and tensor attributes, subgraphs too."""
    seen: set[int] = set()
    for graph in model.graphs():
        for value in graph.initializers.values():
            t = value.const_value
            if isinstance(t, ir.ExternalTensor) and id(t) not in seen:
                seen.add(id(t))
                yield t
    roots: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for root in roots:
        for node in ir.traversal.RecursiveGraphIterator(root):
            for attr in node.attributes.values():
                if attr.is_ref():
                    continue
                values = []
                if attr.type == ir.AttributeType.TENSOR:
                    values = [attr.value]
                elif attr.type == ir.AttributeType.TENSORS:
                    values = list(attr.value)
                for t in values:
                    if isinstance(t, ir.ExternalTensor) and id(t) not in seen:
                        seen.add(id(t))
                        yield t


# ---------------------------------------------------------------------------------------------
# Saving


def _tensor_nbytes(tensor: ir.TensorProtocol) -> int:
    if isinstance(tensor, ir.ExternalTensor):
        return _expected_nbytes(tensor)
    try:
        return int(tensor.nbytes)
    except Exception:  # string tensors and the like
        return 0


def _initializer_values(model: ir.Model) -> list[ir.Value]:
    return [v for g in model.graphs() for v in g.initializers.values() if v.const_value is not None]


def total_tensor_bytes(model: ir.Model) -> int:
    """Bytes of initializer data, counting external data without reading it."""
    return sum(_tensor_nbytes(v.const_value) for v in _initializer_values(model) if v.const_value is not None)


def _serialize(model: ir.Model) -> onnx.ModelProto:
    with declared_annotations_only(model):
        return ir.serde.serialize_model(model)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialise to a ModelProto; external tensors keep their references (no data read)."""
    return _serialize(model)


def to_bytes(model: ir.Model) -> bytes:
    """Serialise with every weight inline. Refuses models that do not fit protobuf's 2 GB limit."""
    size = total_tensor_bytes(model)
    if size >= PROTOBUF_LIMIT:
        raise OutputError(
            f"model has {size / 2**30:.2f} GiB of weights, over protobuf's 2 GB limit for one "
            "message; save it to a file with external data instead (graphopt.save)"
        )
    with _all_inline(model):
        proto = _serialize(model)
    return proto.SerializeToString(deterministic=True)


def _in_memory(tensor: ir.TensorProtocol) -> ir.TensorProtocol:
    if isinstance(tensor, ir.ExternalTensor):
        return ir.Tensor(tensor.numpy(), dtype=tensor.dtype, name=tensor.name, doc_string=tensor.doc_string)
    return tensor


def _external_attributes(model: ir.Model) -> list[tuple[ir.Node, str, ir.Attr]]:
    """(node, name, attribute) of every tensor attribute holding external data."""
    found = []
    roots: list[ir.Graph | ir.Function] = [model.graph, *model.functions.values()]
    for root in roots:
        for node in ir.traversal.RecursiveGraphIterator(root):
            for name, attr in node.attributes.items():
                if attr.is_ref() or attr.type not in (ir.AttributeType.TENSOR, ir.AttributeType.TENSORS):
                    continue
                values = [attr.value] if attr.type == ir.AttributeType.TENSOR else list(attr.value)
                if any(isinstance(t, ir.ExternalTensor) for t in values):
                    found.append((node, name, attr))
    return found


@contextlib.contextmanager
def _all_inline(model: ir.Model, values: list[ir.Value] | None = None) -> Iterator[None]:
    """Temporarily replace external tensors by in-memory copies: those of ``values`` (default:
    every initializer) and of every tensor attribute. The model is restored afterwards."""
    swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
    swapped_attrs: list[tuple[ir.Node, str, ir.Attr]] = []
    try:
        for v in _initializer_values(model) if values is None else values:
            t = v.const_value
            if isinstance(t, ir.ExternalTensor):
                swapped.append((v, t))
                v.const_value = _in_memory(t)
        for node, name, attr in _external_attributes(model):
            if attr.type == ir.AttributeType.TENSOR:
                value: object = _in_memory(attr.value)
            else:
                value = [_in_memory(t) for t in attr.value]
            swapped_attrs.append((node, name, attr))
            node.attributes[name] = ir.Attr(name, attr.type, value, doc_string=attr.doc_string)
        yield
    finally:
        for v, t in swapped:
            v.const_value = t
        for node, name, attr in swapped_attrs:
            node.attributes[name] = attr


def _referenced_files(model: ir.Model) -> set[str]:
    files = set()
    for t in external_tensors(model):
        with contextlib.suppress(OSError):
            files.add(os.path.realpath(t.path))
    return files


def _check_output_path(path: str, what: str) -> None:
    if os.path.islink(path):
        raise OutputError(f"{path}: {what} is a symbolic link; refusing to write through it")
    if os.path.isdir(path):
        raise OutputError(f"{path}: {what} is a folder; give a file path")
    if os.path.exists(path) and os.stat(path).st_nlink > 1:
        raise OutputError(
            f"{path}: {what} is a hard-linked file; refusing to replace it, choose another name"
        )


def save(
    model: ir.Model,
    path: str | os.PathLike,
    *,
    external_data: bool | str | None = None,
    size_threshold: int = EXTERNAL_SIZE_THRESHOLD,
    settings: bool | None = None,
    sparse: bool | None = None,
) -> None:
    """Write the model atomically; weights go to external data when asked or when needed.

    ``sparse``: store mostly-zero float weights as ONNX sparse initializers where that is
    smaller (pruned models); ``None`` = when the model's metadata asks for it
    (``graphopt.sparse_storage`` = "1", set by ``prune(sparse_storage=true)``). Inline files only:
    with external data the weights are written dense.

    ``settings``: ``None`` = when the model's metadata names a target (``graphopt.target``, set by
    ``optimize``), also write that target's run settings (providers, their options, session
    options, shapes) beside the model as ``NAME.settings.json``; ``False`` = never; ``True`` =
    always (an error when no target is named). The settings are computed before anything is
    written, so a model its target cannot run (e.g. contrib ops for TensorRT) is not saved.

    ``external_data``: ``None`` = automatic (external when the weights approach protobuf's 2 GB
    limit), ``True`` = external into ``<name>.data``, a string = external into that relative file
    name, ``False`` = inline (fails over 2 GB). Files appear complete or not at all (temporary
    file in the same folder, fsync, rename). The input model's files are never overwritten.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"{path}: folder '{folder}' does not exist; create it first")
    _check_output_path(path, "output model")
    inputs = _referenced_files(model)
    source = model.meta.get(SOURCE_KEY)
    if source:
        inputs.add(source)
    if os.path.realpath(path) in inputs:
        raise OutputError(f"{path}: this is the input model (or its data); write the output to another file")

    settings_doc = None if settings is False else _target_settings(model, path, required=bool(settings))
    if settings_doc is not None:
        settings_file = settings_file_for(path)
        _check_output_path(settings_file, "settings file")
        if os.path.realpath(settings_file) in inputs:
            raise OutputError(
                f"{settings_file}: this is a file of the input model; write the output to another name"
            )

    size = total_tensor_bytes(model)
    if external_data is None:
        external_data = size >= AUTO_EXTERNAL_BYTES or bool(inputs - ({source} if source else set()))
    if external_data is False and size >= PROTOBUF_LIMIT:
        raise OutputError(
            f"{path}: {size / 2**30:.2f} GiB of weights do not fit in one protobuf file; "
            "save with external data"
        )

    if external_data:
        location = os.path.basename(path) + ".data" if external_data is True else os.fspath(external_data)
        _check_output_path(os.path.join(folder, location), "external data file")
        try:
            data_path = _safe_relative(location, folder, path, "output external data")
        except UnsafeExternalDataError as e:
            raise OutputError(str(e)) from None
        _check_output_path(data_path, "external data file")
        if os.path.realpath(data_path) in inputs:
            raise OutputError(
                f"{path}: external data file '{location}' is read by the input model; "
                "choose another output name so the input's weights are not overwritten"
            )
    try:
        if external_data:
            _save_external(model, path, folder, location, data_path, size_threshold)
        else:
            with _all_inline(model):
                proto = _serialize(model)
            if sparse or (sparse is None and model.metadata_props.get(SPARSE_STORAGE_KEY) == "1"):
                to_sparse_proto(proto)
            data = proto.SerializeToString(deterministic=True)
            _atomic_write(path, lambda f: f.write(data))
        if settings_doc is not None:
            text = json.dumps(settings_doc, indent=2) + "\n"
            _atomic_write(settings_file, lambda f: f.write(text.encode("utf-8")))
    except OSError as e:
        where = f": {e.filename}" if e.filename else ""
        raise OutputError(
            f"{path}: writing failed ({e.strerror or e}{where}); "
            "check free space and permissions of the output folder"
        ) from e


#: Model metadata key naming the target a model was optimized for (written by ``optimize``).
TARGET_KEY = "graphopt.target"


def settings_file_for(path: str | os.PathLike) -> str:
    """``model.onnx`` → ``model.settings.json``: where ``save`` writes the target's run settings."""
    root, _ = os.path.splitext(os.fspath(path))
    return root + ".settings.json"


def _target_settings(model: ir.Model, path: str, *, required: bool) -> dict | None:
    """The settings document of the model's target (None when no target is named or known).

    The core never imports backends: the target is looked up by name through the registry.
    """
    target = model.metadata_props.get(TARGET_KEY)
    if not target:
        if required:
            raise OutputError(
                f"{path}: settings=True but the model names no target (metadata '{TARGET_KEY}'); "
                "optimize it with graphopt.optimize(target=...) first"
            )
        return None
    from graphopt.errors import PipelineError
    from graphopt.registry import default_registry

    try:
        backend_cls = type(default_registry().backend(target))
    except PipelineError:
        if required:
            raise
        logger.warning("%s: target '%s' is not installed; no settings file written", path, target)
        return None
    from_model = getattr(backend_cls, "from_model", None)
    backend = from_model(model) if from_model is not None else backend_cls()
    if not hasattr(backend, "settings"):
        return None
    return backend.settings(model, model_path=path)


def _save_external(
    model: ir.Model,
    path: str,
    folder: str,
    location: str,
    data_path: str,
    size_threshold: int,
) -> None:
    """Write the data file (one tensor at a time, so memory stays flat) and the model file.

    Both are written to temporary files first and renamed only when both are complete, so a
    failure leaves an earlier output (model and data) as it was. Tensors below the threshold and
    tensor attributes are stored inline, so the output never points at the input's data files.
    """
    values = _initializer_values(model)
    large = [
        v
        for v in values
        if _tensor_nbytes(v.const_value) >= size_threshold  # type: ignore[arg-type]
        and v.const_value.dtype != ir.DataType.STRING  # type: ignore[union-attr]
    ]
    large_ids = {id(v) for v in large}
    small = [v for v in values if id(v) not in large_ids]
    new_refs: list[tuple[ir.Value, ir.ExternalTensor]] = []

    def write_data(f: IO[bytes]) -> None:
        offset = 0
        for v in large:
            t = v.const_value
            assert t is not None
            # Align large tensors to 64 KiB so they can be memory-mapped efficiently.
            if _tensor_nbytes(t) > 1 << 20:
                pad = (-offset) % 65536
                f.write(b"\0" * pad)
                offset += pad
            if isinstance(t, ir.ExternalTensor):
                # Stream from the source file (copy_file_range on Linux): no copy in memory.
                f.flush()
                t.tofile(f)
                f.seek(0, os.SEEK_END)
                length = f.tell() - offset
            else:
                data = t.tobytes()
                f.write(data)
                length = len(data)
                del data
            new_refs.append(
                (
                    v,
                    ir.ExternalTensor(
                        location,
                        offset,
                        length,
                        t.dtype,
                        shape=ir.Shape(list(t.shape)),  # type: ignore[arg-type]  # dims of a tensor are ints
                        name=t.name or v.name or "",
                        doc_string=t.doc_string,
                        base_dir=folder,
                    ),
                )
            )
            offset += length

    data_tmp = _write_temp(data_path, write_data)
    model_tmp = None
    try:
        swapped: list[tuple[ir.Value, ir.TensorProtocol]] = []
        with _all_inline(model, small):
            try:
                for v, ext in new_refs:
                    swapped.append((v, v.const_value))  # type: ignore[arg-type]
                    v.const_value = ext
                proto = _serialize(model)
            finally:
                for v, t in swapped:
                    v.const_value = t
        blob = proto.SerializeToString(deterministic=True)
        del proto
        model_tmp = _write_temp(path, lambda f: f.write(blob))
        data_tmp.commit(data_path)
        model_tmp.commit(path)
    except BaseException:
        for tmp in (data_tmp, model_tmp):
            if tmp is not None:
                tmp.discard()
        raise
    _fsync_dir(folder)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def detach_tensors(model: ir.Model) -> int:
    """Give every initializer of ``model`` its own tensor object, sharing the data where possible.

    ``Model.clone()`` shares tensor objects with the original, and onnx_ir's serializer writes the
    value's name into its tensor (``value.const_value.name = value.name``), and for a tensor read
    from a ``ModelProto`` that name lands in the caller's proto. After a pass renames an
    initializer, saving the optimized clone would rename the user's input model. Fresh wrappers
    (same array, same file region) keep the input untouched without copying weights, except for
    protobuf-backed tensors, whose wrapper owns the proto and so needs a copy of it.
    """
    count = 0
    for graph in model.graphs():
        for value in graph.initializers.values():
            fresh = _fresh_tensor(value.const_value)
            if fresh is not None:
                value.const_value = fresh
                count += 1
    # Constant nodes' tensors too: lifting a Constant makes its attribute tensor an initializer.
    nodes = list(ir.traversal.RecursiveGraphIterator(model.graph))
    for f in model.functions.values():
        nodes.extend(ir.traversal.RecursiveGraphIterator(f))
    for node in nodes:
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR:
                fresh = _fresh_tensor(attr.value)
                if fresh is not None:
                    node.attributes[attr.name] = ir.AttrTensor(attr.name, fresh, doc_string=attr.doc_string)
                    count += 1
    return count


def _fresh_tensor(t: ir.TensorProtocol | None) -> ir.TensorProtocol | None:
    """A new tensor object over the same data as ``t`` (None when ``t`` needs none)."""
    if t is None:
        return None
    fresh: ir.TensorProtocol
    if isinstance(t, ir.ExternalTensor):
        fresh = ir.ExternalTensor(
            t.location,
            t.offset,
            t.length,
            t.dtype,
            shape=t.shape,
            name=t.name,
            doc_string=t.doc_string,
            base_dir=t.base_dir,
        )
    elif isinstance(t, ir.serde.TensorProtoTensor):
        proto = onnx.TensorProto()
        proto.CopyFrom(t.raw)
        fresh = ir.serde.TensorProtoTensor(proto)
    elif type(t) is ir.Tensor:
        fresh = ir.Tensor(t.raw, dtype=t.dtype, shape=t.shape, name=t.name, doc_string=t.doc_string)
    else:
        return None  # other tensor kinds (strings, lazy): the serializer sets their own name only
    fresh.metadata_props.update(t.metadata_props)
    return fresh
