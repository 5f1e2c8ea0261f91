"""The benchmark scripts run, on tiny sizes, so that they do not rot between runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
import torch

from benchmarks import (
    _methods,
    bench_scale,
    bench_snapshot,
    bench_stall,
    bench_step_overhead,
)

# What bench_s3 sets to reach its own server (tests/s3server.py).
S3_VARIABLES = [
    "FSSPEC_S3",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_DEFAULT_REGION",
]


def test_snapshot_bench_prints_every_method(tmp_path, capsys):
    """bench_snapshot prints a row and ratios for each method, resumable's included."""
    bench_snapshot.main(["--mib", "1", "--repeat", "1", "--folder", str(tmp_path)])
    printed = capsys.readouterr().out

    expected = ["raw bytes", "torch.distributed", "torch.save", "cloudpickle"]
    expected += ["resumable: run", "resumable against its targets", "async_save"]
    assert [] == [name for name in expected if name not in printed]


def test_stall_bench_prints_each_method_and_state(tmp_path, capsys):
    """bench_stall measures each method's stall and memory on both states."""
    tiny = ["--mib", "1", "--width", "16", "--vocab", "32", "--steps", "3"]
    bench_stall.main(
        [*tiny, "--step-seconds", "0.02", "--in-process", "--folder", str(tmp_path)]
    )
    printed = capsys.readouterr().out
    rows = [line.split(" | ")[0] for line in printed.splitlines() if "| " in line]

    assert 2 * ["| method", "| copy", "| resumable", "| dcp"] == rows
    assert "352 tensors" in printed


def test_scale_bench_prints_sizes_and_small_tensors(tmp_path, capsys):
    """bench_scale prints a row per size and the per-tensor costs."""
    bench_scale.main(
        [
            "--sizes",
            "1,2",
            "--small",
            "50",
            "--small-kib",
            "1",
            "--folder",
            str(tmp_path),
        ]
    )
    printed = capsys.readouterr().out

    assert [2, 2] == [printed.count("\n| 1 |"), printed.count("\n| 2 |")]
    assert "50 tensors of 1 KiB" in printed


def test_step_overhead_bench_runs(monkeypatch, capsys):
    """bench_step_overhead, kept as it was, still runs."""
    monkeypatch.setattr(sys, "argv", ["bench_step_overhead.py", "--steps", "20"])
    bench_step_overhead.main()

    assert "resumable, empty step" in capsys.readouterr().out


def test_s3_bench_runs(monkeypatch, capsys):
    """bench_s3, kept as it was, still runs against its own moto server."""
    pytest.importorskip("s3fs")
    pytest.importorskip("moto")
    from benchmarks import bench_s3

    # The script points fsspec and the environment at its own server, stopped at
    # its end: the session's server must be found again after it.
    monkeypatch.setattr(fsspec.config, "conf", dict(fsspec.config.conf))
    for name in S3_VARIABLES:
        monkeypatch.setenv(name, "")
    monkeypatch.setattr(sys, "argv", ["bench_s3.py", "--mib", "1", "--repeat", "1"])
    bench_s3.main()

    assert "resumable Archive.write" in capsys.readouterr().out


@pytest.mark.parametrize("kind", _methods.KINDS, ids=lambda kind: kind.__name__)
def test_method_restores_the_saved_tensors_in_place(kind, tmp_path):
    """Each benchmarked method really restores the saved values into the tensors."""
    if kind is _methods.SafeTensors:
        pytest.importorskip("safetensors")
    tensors = [torch.randn(100), torch.randn(7)]
    saved = [tensor.clone() for tensor in tensors]
    method = kind(tensors)
    method.save(str(tmp_path))
    for tensor in tensors:
        tensor.zero_()
    method.restore(str(tmp_path))

    assert [True, True] == [
        torch.equal(a, b) for a, b in zip(saved, tensors, strict=True)
    ]


def test_methods_leave_out_a_missing_extra(monkeypatch, capsys):
    """Without safetensors the methods are the others, and the note names the extra."""
    monkeypatch.setitem(sys.modules, "safetensors", None)
    names = [type(method) for method in _methods.methods([torch.zeros(1)])]

    assert _methods.SafeTensors not in names
    assert "pip install -e '.[bench]'" in capsys.readouterr().out


# Run in a new interpreter: in the suite's own process, memory freed by earlier
# tests can be handed out again without a rise of the resident size.
PEAK_PROBE = """
import torch
from benchmarks._common import PeakMemory
with PeakMemory() as memory:
    block = torch.ones(16 * 2**20)
print(memory.extra)
"""


def test_peak_memory_counts_memory_touched_inside() -> None:
    """PeakMemory sees about 64 MiB more when 64 MiB are allocated and touched."""
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", PEAK_PROBE],
        capture_output=True,
        text=True,
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        check=True,
    )

    assert 60 <= int(done.stdout) / 2**20 < 80
