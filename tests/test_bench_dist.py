"""benchmarks/bench_dist.py launches its ranks and prints its tables, on tiny sizes."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench_dist


@pytest.mark.slow
def test_dist_bench_prints_each_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """bench_dist measures steps and snapshots in 1 process and in 2 ranks."""
    tiny = ["--steps", "20", "--mib", "1", "--repeat", "1"]
    bench_dist.main([*tiny, "--folder", str(tmp_path)])
    printed = capsys.readouterr().out
    rows = [line.split(" | ")[0] for line in printed.splitlines() if "| " in line]

    assert [
        "| loop",
        "| plain Python loop calling the step",
        "| resumable, 1 process, empty step",
        "| resumable, 2 ranks, empty step",
        "| resumable, 1 process, one iterate item",
        "| resumable, 2 ranks, one iterate item",
        "| step",
        "| empty step",
        "| one iterate item",
        "| processes",
        "| 1 process",
        "| 2 ranks, state replicated",
        "| 2 ranks, state per rank",
    ] == rows
    assert "bare gloo all-reduce of an int" in printed
