"""
What the benchmark scripts share: the machine line, states, timing, page cache, tables.

Not part of the library: imported by the scripts in this folder and by their smoke
test, never by ``resumable``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import re
import shutil
import statistics
import subprocess
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

MIB = 2**20
GIB = 2**30
ROOT = Path(__file__).resolve().parent.parent
# How to install what the benchmarks need beyond the library's own dependencies.
EXTRA_HINT = "pip install -e '.[bench]'"


def optional(module: str) -> ModuleType | None:
    """Import ``module`` of the bench extra; where it is missing, say so, give None."""
    try:
        return importlib.import_module(module)
    except ImportError:
        print(f"note: {module} is missing (the bench extra: {EXTRA_HINT}); skipped")
        return None


def machine(folder: str) -> list[str]:
    """Describe the machine, the disk under ``folder`` and the versions measured."""
    import resumable

    memory = _meminfo_kib("MemTotal") * 1024
    free = shutil.disk_usage(folder).free
    return [
        f"cpu: {_cpu_model()}, {os.cpu_count()} cores, {memory / GIB:.1f} GiB memory",
        f"disk: {_disk(folder)}, {free / GIB:.0f} GiB free, under {folder}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"resumable {resumable.__version__} from {_source(resumable.__file__)}",
        "load average at the start: "
        + ", ".join(f"{load:.1f}" for load in os.getloadavg())
        + " (1, 5, 15 min; the machine is shared)",
    ]


def print_machine(folder: str) -> None:
    if not os.path.isdir(folder):
        raise SystemExit(f"--folder {folder}: no such folder; make it or name another.")
    for line in machine(folder):
        print(line)


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _meminfo_kib(key: str) -> int:
    with contextlib.suppress(OSError):
        found = re.search(rf"^{key}:\s+(\d+)", Path("/proc/meminfo").read_text(), re.M)
        if found is not None:
            return int(found.group(1))
    return 0


def _disk(folder: str) -> str:
    """Return the device and file system that hold ``folder``, from /proc/mounts."""
    best = ("", "?", "?")
    with contextlib.suppress(OSError):
        real = os.path.realpath(folder)
        for line in Path("/proc/mounts").read_text().splitlines():
            device, point, kind = line.split()[:3]
            inside = real == point or real.startswith(point.rstrip("/") + "/")
            if inside and len(point) > len(best[0]):
                best = (point, device, kind)
    rotational = "?"
    name = os.path.basename(best[1])
    with contextlib.suppress(OSError):
        flag = Path(f"/sys/class/block/{name}/queue/rotational").read_text().strip()
        rotational = "rotational" if flag == "1" else "not rotational"
    return f"{best[1]} ({best[2]}, {rotational})"


def _source(path: str) -> str:
    """Return the folder of ``path`` and its git commit, marked where it has edits."""
    folder = str(Path(path).resolve().parent.parent)
    try:
        commit = subprocess.run(
            ["git", "-C", folder, "log", "-1", "--format=%h %cs"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", folder, "status", "--porcelain", "--", "resumable"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return folder
    return f"{folder} at {commit}{' with uncommitted edits' if dirty else ''}"


def flat_tensors(mib: float, count: int, seed: int = 0) -> list[torch.Tensor]:
    """Return ``count`` float32 tensors of ``mib`` MiB in all, filled at random."""
    generator = torch.Generator().manual_seed(seed)
    numel = max(1, int(mib * MIB) // 4 // count)
    return [torch.randn(numel, generator=generator) for _ in range(count)]


def nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in tensors)


def timed(action: Callable[[], Any]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def drop_cache(folder: str) -> None:
    """
    Evict the files under ``folder`` from the page cache, so that reads go to disk.

    POSIX_FADV_DONTNEED drops clean pages without root; the files were fsynced.
    The host of a virtual machine may still hold them in its own cache.
    """
    for path in _files(folder):
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def _files(folder: str) -> Iterator[str]:
    for parent, _, names in os.walk(folder):
        for name in names:
            yield os.path.join(parent, name)


def fsync_path(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fresh_folder(parent: str, name: str) -> str:
    """Return an empty folder ``name`` under ``parent``, removing what was there."""
    path = os.path.join(parent, name)
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    return path


def best_median(values: Sequence[float]) -> tuple[float, float]:
    return min(values), statistics.median(values)


def ratio(value: float | None, floor: float | None) -> str:
    if value is None or not floor:
        return "-"
    return f"{value / floor:.2f}"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """Print a Markdown table, the form benchmarks/README.md records."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "---|" * len(headers))
    for row in rows:
        print("| " + " | ".join(row) + " |")


class PeakMemory:
    """
    The peak resident memory of this process above where a stretch of code began.

    On Linux the kernel's high-water mark (VmHWM) is reset through
    /proc/self/clear_refs; elsewhere psutil samples the resident size every
    millisecond, which can miss a short peak.
    """

    def __init__(self) -> None:
        self.start = 0
        self.peak = 0
        self._sampler: threading.Thread | None = None
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.start = _status_kib("VmRSS") * 1024
        except OSError:
            self._sample_with_psutil()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sampler is None:
            self.peak = _status_kib("VmHWM") * 1024
            return
        self._stop.set()
        self._sampler.join()

    @property
    def extra(self) -> int | None:
        # Memory freed inside can leave the resident size below where it began.
        return max(0, self.peak - self.start) if self.peak else None

    def _sample_with_psutil(self) -> None:
        psutil = optional("psutil")
        if psutil is None:
            return
        process = psutil.Process()
        self.start = self.peak = process.memory_info().rss

        def sample() -> None:
            while not self._stop.wait(0.001):
                self.peak = max(self.peak, process.memory_info().rss)

        self._sampler = threading.Thread(target=sample, daemon=True)
        self._sampler.start()


def _status_kib(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    found = re.search(rf"^{key}:\s+(\d+)", text, re.MULTILINE)
    if found is None:
        msg = f"/proc/self/status has no {key}"
        raise OSError(msg)
    return int(found.group(1))


@contextlib.contextmanager
def quiet_dcp() -> Iterator[None]:
    """Silence DCP's warning that it runs in one process, which is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
