"""
examples/digits_ddp.py runs under torchrun as its docstring says: it finishes, a
SIGTERM to one rank stops every rank with the preempted code, and it resumes.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from resumable import _cli
from tests.ranks import ROOT, free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("cli_undone")]

SCRIPT = ROOT / "examples" / "digits_ddp.py"
# How torchrun's summary names each failed rank and its exit code.
FAILURE = re.compile(r"rank\s*: (\d+) \(local_rank: \d+\)\s+exitcode\s*: (-?\d+)")


class Launch:
    """One torchrun of the example on 2 ranks, its output in a file."""

    def __init__(self, folder: Path, steps: int) -> None:
        self.output = folder / f"torchrun-{len(list(folder.glob('torchrun-*')))}"
        command = [
            *("-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"),
            *("--master-addr", "127.0.0.1", "--master-port", str(free_port())),
            *("-m", "resumable", str(SCRIPT), "--storage", str(folder / "store")),
            *("--steps", str(steps)),
        ]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
        with open(self.output, "w") as output:
            self.process = subprocess.Popen(
                [sys.executable, *command], env=env, stdout=output, stderr=output
            )

    def wait(self, timeout: float = 120) -> int:
        return self.process.wait(timeout)

    def text(self) -> str:
        return self.output.read_text()

    def wait_for(self, line: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.text():
            assert self.process.poll() is None, self.text()
            assert time.monotonic() < deadline, self.text()
            time.sleep(0.02)

    def ranks(self) -> dict[int, int]:
        """Each rank's PID: the children of torchrun, told apart by RANK."""
        found = {}
        for entry in Path("/proc").iterdir():
            with contextlib.suppress(OSError, ValueError):
                stat = (entry / "stat").read_text()
                if int(stat.rpartition(")")[2].split()[1]) != self.process.pid:
                    continue
                for variable in (entry / "environ").read_bytes().split(b"\0"):
                    if variable.startswith(b"RANK="):
                        found[int(variable[5:])] = int(entry.name)
        return found

    def exit_codes(self) -> dict[int, int]:
        """Each failed rank's exit code, from torchrun's summary."""
        return {int(rank): int(code) for rank, code in FAILURE.findall(self.text())}

    def kill(self) -> None:
        """SIGKILL the ranks, then torchrun, where still running."""
        if self.process.poll() is None:
            for pid in self.ranks().values():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.process.kill()
            self.process.wait()


@contextlib.contextmanager
def launched(folder: Path, steps: int) -> Iterator[Launch]:
    launch = Launch(folder, steps)
    try:
        yield launch
    finally:
        launch.kill()


def listed(storage: Path, capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The status and name of each snapshot that ``ls`` lists."""
    capsys.readouterr()
    assert 0 == _cli.main(["ls", str(storage)])
    rows = [row.split() for row in capsys.readouterr().out.splitlines()[1:]]

    return [f"{row[5]} {row[-1][:14]}" for row in rows if "/" in row]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")
def test_ddp_example_stops_on_sigterm_to_one_rank_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM to one rank of digits_ddp.py stops both with 1; a rerun finishes."""
    with launched(tmp_path, steps=2) as first:
        first.wait_for("snapshot committed: step=1,")
        os.kill(first.ranks()[1], signal.SIGTERM)
        preempted = first.wait()
    after_first = listed(tmp_path / "store", capsys)
    with launched(tmp_path, steps=2) as second:
        finished = second.wait()

    assert (1, 0) == (preempted, finished), second.text()
    assert {0: 1, 1: 1} == first.exit_codes(), first.text()
    assert "preempted: cause=rank 1, step=1, loop=0" in first.text()
    assert ["inside step-000000001", "ok step-000000001"] == after_first
    assert "run finished: step=2" in second.text()
    assert ["ok step-000000002", "inside step-000000001", "ok step-000000001"] == (
        listed(tmp_path / "store", capsys)
    )
