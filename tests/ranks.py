"""
Launches a job of several ``python -m resumable`` processes as torchrun would,
each with its own PID, so that a test can signal or stop one rank.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tests" / "scripts" / "dist_train.py"


def free_port() -> int:
    """Return a TCP port that is free on 127.0.0.1 now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Job:
    """The processes of one start of the job, one per rank."""

    def __init__(
        self,
        folder: Path,
        world_size: int,
        environment: Mapping[str, object],
        *arguments: str,
    ) -> None:
        self.folder = folder
        self.logs = [
            folder / f"log-{len(list(folder.glob('log-*')))}-{rank}"
            for rank in range(world_size)
        ]
        port = free_port()
        self.processes = []
        for rank, log in enumerate(self.logs):
            env = {
                **os.environ,
                **{key: str(value) for key, value in environment.items()},
                "PYTHONPATH": str(ROOT),
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
            }
            command = [
                sys.executable,
                "-m",
                "resumable",
                str(SCRIPT),
                "--storage",
                str(folder / "store"),
                *arguments,
            ]
            with open(log, "w") as output:
                self.processes.append(
                    subprocess.Popen(
                        command, env=env, stdout=output, stderr=subprocess.STDOUT
                    )
                )

    def wait(self, timeout: float = 90) -> list[int]:
        """Return each rank's exit code once all have exited."""
        deadline = time.monotonic() + timeout
        codes = []
        for process in self.processes:
            left = max(deadline - time.monotonic(), 0.1)
            try:
                codes.append(process.wait(left))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes  # type: ignore[return-value]  # None where one hangs

    def signal(self, rank: int, number: int) -> None:
        os.kill(self.processes[rank].pid, number)

    def kill_all(self) -> None:
        """SIGKILL every rank still running (a stopped one included)."""
        for process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.wait()

    def log(self) -> str:
        return "\n".join(
            f"--- rank {rank}\n{log.read_text()}" for rank, log in enumerate(self.logs)
        )


@contextlib.contextmanager
def started(
    folder: Path, world_size: int, environment: Mapping[str, object], *args: str
) -> Iterator[Job]:
    job = Job(folder, world_size, environment, *args)
    try:
        yield job
    finally:
        job.kill_all()


def wait_for_step(progress: Path, rank: int, step: int, timeout: float = 60) -> None:
    """Wait until rank ``rank`` has started step ``step``."""
    path = progress / f"rank-{rank}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and str(step) in path.read_text().split():
            return
        time.sleep(0.01)
    raise TimeoutError(path)
