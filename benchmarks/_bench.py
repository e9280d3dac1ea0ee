"""Helpers shared by the benchmark scripts: memory probes, environment, subprocess workers, tables.

Peak memory is measured per phase with the kernel's own high-water mark: writing "5" to
``/proc/self/clear_refs`` resets ``VmHWM`` to the current RSS, so the peak of one phase (load,
optimize, save) is read exactly, without a sampling thread that could miss a short spike (a
sampling thread also needs the GIL, which C++ code may hold). Where that is unavailable
(non-Linux, restricted /proc) a psutil sampling thread is the fallback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
TMP = RESULTS / "tmp"
MB = 1024 * 1024


def tests_on_path() -> None:
    """Make ``tests/models.py`` (the model builders shared with the tests) importable."""
    path = str(ROOT / "tests")
    if path not in sys.path:
        sys.path.insert(0, path)


def export_model(kind: str, size: str, folder: Path) -> tuple[Any, Path, float]:
    """Build a test model (random weights, seeded), export it with graphopt and save it to
    ``folder/model.onnx`` with external data; returns (built model, path, export seconds)."""
    import torch

    import graphopt

    tests_on_path()
    from models import build

    torch.set_num_threads(2)
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    built = build(kind, size)
    model = built.export()
    export_s = time.perf_counter() - t0
    path = folder / "model.onnx"
    graphopt.save(model, path, external_data=True)
    return built, path, export_s


# ---------------------------------------------------------------------------------------------
# Memory


def _proc_status(key: str) -> int | None:
    """A ``kB`` field of /proc/self/status, in bytes (None where there is no /proc)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss() -> int:
    """Current resident set size in bytes (anonymous + file-backed pages such as mmapped weights)."""
    value = _proc_status("VmRSS")
    if value is not None:
        return value
    import psutil

    return int(psutil.Process().memory_info().rss)


def rss_parts() -> dict[str, int]:
    """RSS split into anonymous (heap, copies) and file-backed (mmapped files) bytes."""
    return {k: _proc_status(k) or 0 for k in ("RssAnon", "RssFile", "RssShmem")}


def peak_rss() -> int:
    """Peak RSS of this process so far (since the last high-water-mark reset), in bytes."""
    value = _proc_status("VmHWM")
    if value is not None:
        return value
    import resource

    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux); False where not possible."""
    return _reset_hwm()


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PeakMeter:
    """Peak RSS of the code inside ``with meter.phase(name):``, per phase, plus the overall peak.

    >>> meter = PeakMeter()
    >>> with meter.phase("work"):
    ...     data = bytearray(10 * MB)
    >>> meter.peaks["work"] >= 10 * MB
    True
    """

    def __init__(self) -> None:
        self.peaks: dict[str, int] = {}
        self.start: dict[str, int] = {}
        self.wall: dict[str, float] = {}
        # Peak of everything before the first phase (interpreter, imports).
        self.peaks["startup"] = peak_rss()
        self.method = "VmHWM" if _reset_hwm() else "psutil-sampling"

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.start[name] = rss()
        sampler = None
        if self.method == "VmHWM":
            _reset_hwm()
        else:
            sampler = _Sampler()
            sampler.begin()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.wall[name] = time.perf_counter() - t0
            if sampler is not None:
                self.peaks[name] = max(sampler.end(), rss())
            else:
                self.peaks[name] = max(peak_rss(), rss())

    @property
    def overall(self) -> int:
        return max(self.peaks.values())


class _Sampler:
    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            time.sleep(self.interval)

    def begin(self) -> None:
        self.peak = rss()
        self._thread.start()

    def end(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


# ---------------------------------------------------------------------------------------------
# Environment and workers


def environment() -> dict[str, Any]:
    """Machine and package versions, so a table says where its numbers come from."""
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    mem = None
    with contextlib.suppress(OSError):
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    mem = round(int(line.split()[1]) / 1024 / 1024, 1)
    versions = {}
    for pkg in (
        "graphopt",
        "onnx",
        "onnx-ir",
        "onnxscript",
        "onnxruntime",
        "onnxsim",
        "torch",
        "transformers",
        "numpy",
    ):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


@dataclasses.dataclass
class WorkerResult:
    ok: bool
    data: dict[str, Any]
    wall_s: float
    error: str = ""


def run_worker(script: Path, args: Sequence[str], result_file: Path, timeout: float) -> WorkerResult:
    """Run ``script args`` in a fresh interpreter; it writes its JSON result to ``result_file``."""
    with contextlib.suppress(FileNotFoundError):
        result_file.unlink()
    env = dict(os.environ, PYTHONHASHSEED="0")
    cmd = [sys.executable, str(script), *args, "--result-file", str(result_file)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return WorkerResult(False, {}, time.perf_counter() - t0, f"timed out after {timeout:.0f}s")
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or not result_file.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return WorkerResult(False, {}, wall, f"exit code {proc.returncode}: " + " | ".join(tail))
    return WorkerResult(True, json.loads(result_file.read_text()), wall)


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub Markdown table; numbers right-aligned."""

    def cell(v: Any) -> str:
        return "–" if v is None else str(v)

    body = [[cell(v) for v in r] for r in rows]
    align = ["---:" if any(_is_number(r[i]) for r in rows) else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def _is_number(v: Any) -> bool:
    if isinstance(v, (int, float)):
        return True
    try:
        float(str(v).rstrip("×x"))
        return True
    except ValueError:
        return False


def ort_session(model: Any, threads: int = 2, spinning: bool = False) -> Any:
    """An ONNX Runtime CPU session as the benchmarks time it: ORT_ENABLE_ALL, ``threads`` intra-op
    threads, one inter-op thread, and (by default) no spin-waiting, so that the idle pools of the
    other sessions of an interleaved run do not steal the cores (see bench_fusion._session).
    ``model``: a path, serialized bytes, or an onnx.ModelProto."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if hasattr(model, "SerializeToString"):
        model = model.SerializeToString()
    elif not isinstance(model, (bytes, bytearray)):
        model = str(model)
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def interleaved_ms(
    sessions: dict[str, Any], feeds: dict[str, Any], rounds: int, warmup: int = 3
) -> dict[str, list[float]]:
    """Milliseconds per run of each ``{name: session}``, every round running each session once in
    a rotated order (so machine noise hits all alike); feeds restricted to each session's inputs."""
    own = {
        n: {k: v for k, v in feeds.items() if k in {i.name for i in s.get_inputs()}}
        for n, s in sessions.items()
    }
    for n, s in sessions.items():
        for _ in range(warmup):
            s.run(None, own[n])
    times: dict[str, list[float]] = {n: [] for n in sessions}
    order = list(sessions)
    for i in range(rounds):
        k = i % len(order)
        for name in order[k:] + order[:k]:
            t0 = time.perf_counter()
            sessions[name].run(None, own[name])
            times[name].append((time.perf_counter() - t0) * 1000)
    return times
