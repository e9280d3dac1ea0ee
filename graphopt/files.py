"""Files in and out: untrusted input read safely, output written atomically.

Reading untrusted input files: regular files only, bounded reads, array headers before data.

A FIFO given as a model or data path blocks ``open()`` until some writer appears, and a device
such as ``/dev/zero`` never ends; a ``.npz`` member can declare any shape and inflate to any size.
So every input file is opened without blocking and refused unless it is a regular file, reads are
bounded by what the file can legitimately hold, and ``.npy``/``.npz`` headers are read and checked
(no object arrays, no negative dimensions, the declared size equal to the stored size, a size that
fits in memory) before any array data is read or decompressed.

Writing: every output file appears complete or not at all (a temporary file in the same folder,
fsync, rename). A writer holds a lock on its temporary file until the rename, so one killed
mid-write leaves a temporary file nobody holds, and the next save of the same output removes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import stat
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from typing import IO

try:
    import fcntl
except ImportError:  # Windows: stale temporary files are recognised by age instead
    fcntl = None  # type: ignore[assignment]  # the module is optional

import numpy as np

from graphopt.errors import GraphoptError

__all__ = [
    "ArrayInfo",
    "open_regular",
    "read_regular",
    "npy_info",
    "load_npy",
    "npz_infos",
    "open_npz",
    "read_npz_array",
    "count_non_finite",
    "memory_limit",
]

#: Headers longer than this are refused (numpy's own default limit).
MAX_HEADER = 10_000


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "folder"
    if stat.S_ISFIFO(mode):
        return "named pipe (FIFO)"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    if stat.S_ISSOCK(mode):
        return "socket"
    return "special file"


def open_regular(path: str | os.PathLike, what: str, error: type[GraphoptError] = GraphoptError) -> IO[bytes]:
    """Open ``path`` for binary reading, refusing anything but a regular file (symlinks to one are
    fine). Never blocks: the file is opened non-blocking and checked on the open descriptor, so it
    cannot be swapped for a FIFO between a check and the open."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise error(f"{path}: no such file; check the path of the {what}") from None
    except OSError as e:
        raise error(f"{path}: the {what} cannot be read ({e.strerror})") from None
    if not stat.S_ISREG(st.st_mode):
        hint = "give the path of a file" if stat.S_ISDIR(st.st_mode) else "give a regular file"
        raise error(f"{path}: the {what} is a {_kind(st.st_mode)}, not a regular file; {hint}")
    flags = (
        os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0)
    )
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise error(f"{path}: the {what} cannot be read ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise error(
                f"{path}: the {what} is a {_kind(st.st_mode)}, not a regular file; give a regular file"
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(
    path: str | os.PathLike, what: str, limit: int, error: type[GraphoptError] = GraphoptError, hint: str = ""
) -> bytes:
    """The whole content of a regular file of at most ``limit`` bytes (read no further than that)."""
    with open_regular(path, what, error) as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise error(
                f"{os.fspath(path)}: the {what} has {size:,} bytes, more than the {limit:,} it can hold"
                f"{'; ' + hint if hint else ''}"
            )
        data = f.read(limit + 1)
    if len(data) > limit:  # the file grew while being read
        raise error(f"{os.fspath(path)}: the {what} grew past {limit:,} bytes while being read")
    return data


def memory_limit() -> int:
    """The most bytes one array (one calibration batch) may take: a quarter of physical memory."""
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    return 4 << 30


@dataclasses.dataclass(frozen=True)
class ArrayInfo:
    """What an .npy header declares, checked against the stored size; no data read."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    fortran: bool
    offset: int  # where the data starts (in the .npy file or the uncompressed zip member)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _read_header(
    f: IO[bytes], where: str, error: type[GraphoptError]
) -> tuple[tuple[int, ...], bool, np.dtype]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = fmt.read_array_header_1_0(f, max_header_size=MAX_HEADER)
        elif version == (2, 0):
            shape, fortran, dtype = fmt.read_array_header_2_0(f, max_header_size=MAX_HEADER)
        else:
            raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
    except Exception as e:  # numpy's header parser raises whatever its tokenizer/literal_eval meet
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise error(f"{where}: not a readable .npy array ({first}); save it with numpy.save/savez") from None
    return tuple(shape), bool(fortran), dtype


def _check_info(info: ArrayInfo, stored: int, where: str, error: type[GraphoptError]) -> ArrayInfo:
    if info.dtype.hasobject:
        raise error(
            f"{where}: array '{info.name}' holds Python objects, and object arrays are not allowed "
            "(loading them would need unpickling); save plain numeric, bool or fixed-width string arrays"
        )
    if any(d < 0 for d in info.shape):
        raise error(
            f"{where}: array '{info.name}' declares a negative dimension {list(info.shape)}; "
            "the file is corrupt"
        )
    if info.nbytes != stored:
        raise error(
            f"{where}: array '{info.name}' declares shape {list(info.shape)} of {info.dtype} "
            f"({info.nbytes:,} bytes) but the file holds {stored:,} bytes of data; the file is corrupt"
        )
    if info.nbytes > memory_limit():
        raise error(
            f"{where}: array '{info.name}' ({info.nbytes:,} bytes) would not fit in memory; "
            "split it into smaller batches"
        )
    return info


def npy_info(path: str | os.PathLike, name: str, error: type[GraphoptError] = GraphoptError) -> ArrayInfo:
    """The checked header of an .npy file."""
    where = os.fspath(path)
    with open_regular(path, ".npy file", error) as f:
        shape, fortran, dtype = _read_header(f, where, error)
        offset = f.tell()
        size = os.fstat(f.fileno()).st_size
    return _check_info(ArrayInfo(name, shape, dtype, fortran, offset), size - offset, where, error)


def load_npy(
    path: str | os.PathLike, info: ArrayInfo, error: type[GraphoptError] = GraphoptError
) -> np.ndarray:
    """The array of an .npy file whose header ``info`` was checked, memory-mapped (read-only)."""
    if info.nbytes == 0:
        return np.empty(info.shape, info.dtype)
    with open_regular(path, ".npy file", error) as f:
        if os.fstat(f.fileno()).st_size - info.offset != info.nbytes:
            raise error(f"{os.fspath(path)}: the file changed since it was checked; rerun")
        return np.memmap(
            f,
            dtype=info.dtype,
            mode="r",
            offset=info.offset,
            shape=info.shape,
            order="F" if info.fortran else "C",
        )


@contextlib.contextmanager
def open_npz(
    path: str | os.PathLike, error: type[GraphoptError] = GraphoptError
) -> Iterator[zipfile.ZipFile]:
    """The .npz archive at ``path`` (a regular file), for :func:`read_npz_array`."""
    where = os.fspath(path)
    with open_regular(path, ".npz file", error) as f:
        try:
            zf = zipfile.ZipFile(f)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise error(
                f"{where}: not a readable .npz file ({first}); save the arrays with numpy.savez"
            ) from None
        with zf:
            yield zf


def npz_infos(path: str | os.PathLike, error: type[GraphoptError] = GraphoptError) -> list[ArrayInfo]:
    """The checked headers of every array in an .npz (decompressing only the headers)."""
    where = os.fspath(path)
    infos = []
    with open_npz(path, error) as zf:
        for zi in zf.infolist():
            if zi.is_dir():
                continue
            if not zi.filename.endswith(".npy"):
                raise error(
                    f"{where}: member '{zi.filename}' is not an .npy array; save the arrays with numpy.savez"
                )
            name = zi.filename[: -len(".npy")]
            try:
                with zf.open(zi) as m:
                    shape, fortran, dtype = _read_header(m, where, error)
                    offset = m.tell()
            except (
                zipfile.BadZipFile,
                OSError,
                EOFError,
                ValueError,
                NotImplementedError,
                RuntimeError,
            ) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise error(
                    f"{where}: array '{name}' cannot be read ({first}); the file is corrupt"
                ) from None
            infos.append(
                _check_info(
                    ArrayInfo(name, shape, dtype, fortran, offset), zi.file_size - offset, where, error
                )
            )
    return infos


def read_npz_array(
    zf: zipfile.ZipFile, info: ArrayInfo, where: str, error: type[GraphoptError] = GraphoptError
) -> np.ndarray:
    """One array of an open .npz whose header ``info`` was checked (decompression stops at the
    declared size)."""
    try:
        with zf.open(info.name + ".npy") as m:
            arr = np.lib.format.read_array(m, allow_pickle=False, max_header_size=MAX_HEADER)
    except (
        KeyError,
        zipfile.BadZipFile,
        OSError,
        EOFError,
        ValueError,
        NotImplementedError,
        RuntimeError,
    ) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise error(f"{where}: array '{info.name}' cannot be read ({first}); the file is corrupt") from None
    if arr.shape != info.shape or arr.dtype != info.dtype:
        raise error(f"{where}: array '{info.name}' changed since it was checked; rerun")
    return arr


def count_non_finite(arr: np.ndarray, chunk: int = 1 << 22) -> int:
    """How many NaN/Inf values a float or complex array holds (0 for other dtypes); in chunks, so
    a large memory-mapped array is never copied whole."""
    if arr.dtype.kind not in "fc":
        return 0
    flat = arr.reshape(-1)
    bad = 0
    for start in range(0, flat.size, chunk):
        part = flat[start : start + chunk]
        bad += int(part.size - np.count_nonzero(np.isfinite(part)))
    return bad


# ---------------------------------------------------------------------------------------------
# Writing

#: A temporary file of no writer (no lock) this old is always stale; younger and empty, it may
#: be one a writer has just created and not locked yet.
_FRESH_S = 5.0
#: Without file locks (Windows), only temporary files older than this are taken as stale.
_STALE_WITHOUT_LOCKS_S = 24 * 3600.0


class _Temp:
    """A complete, fsynced temporary file, still open and locked until it is renamed or removed."""

    def __init__(self, path: str, file: IO[bytes]) -> None:
        self.path = path
        self._file: IO[bytes] | None = file

    def commit(self, dest: str) -> None:
        os.replace(self.path, dest)
        self.close()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()  # releases the lock
            self._file = None


def _temp_name_pattern(path: str) -> re.Pattern[str]:
    # mkstemp's names: prefix + 8 characters of "a-z0-9_" + suffix
    return re.compile(r"\." + re.escape(os.path.basename(path)) + r"\.[a-z0-9_]{8}\.tmp\Z")


def clean_stale_temps(path: str) -> list[str]:
    """Remove the temporary files that interrupted saves of ``path`` left behind; returns their
    names. A file some live writer still holds (locked) is left alone."""
    folder = os.path.dirname(os.path.abspath(path))
    pattern = _temp_name_pattern(path)
    removed: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    for name in names:
        if not pattern.match(name):
            continue
        full = os.path.join(folder, name)
        try:
            st = os.lstat(full)
            if not stat.S_ISREG(st.st_mode) or (hasattr(os, "geteuid") and st.st_uid != os.geteuid()):
                continue
            fd = os.open(full, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            age = time.time() - st.st_mtime
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:  # a live writer holds it
                    continue
                if st.st_size == 0 and age < _FRESH_S:
                    continue
            elif age < _STALE_WITHOUT_LOCKS_S:
                continue
            os.unlink(full)
            removed.append(name)
        except OSError:
            continue
        finally:
            os.close(fd)
    return removed


def _write_temp(path: str, write: Callable[[IO[bytes]], object]) -> _Temp:
    """Write a complete, fsynced temporary file next to ``path`` (removing stale ones of earlier,
    interrupted saves first); it stays locked until committed or discarded."""
    folder = os.path.dirname(os.path.abspath(path))
    clean_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    f = os.fdopen(fd, "wb")
    try:
        if fcntl is not None:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        write(f)
        f.flush()
        os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        f.close()
        raise
    return _Temp(tmp, f)


def _fsync_dir(folder: str) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _atomic_write(path: str, write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` so that it appears complete or not at all (temp file, fsync, rename)."""
    tmp = _write_temp(path, write)
    try:
        tmp.commit(path)
    except BaseException:
        tmp.discard()
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))
