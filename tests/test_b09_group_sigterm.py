"""
B09: SIGTERM to the whole process group, DataLoader workers included, during a step.

``python -m resumable case_b09_train.py`` runs in its own process group
(start_new_session) with a DataLoader of num_workers=2 and persistent workers
drawn through resumable.iterate. During step 1, after its fourth batch, SIGTERM
goes to the whole group (os.killpg, as SLURM and Ctrl-C do) or, in the variant,
to the main process only (as a plain container stop does). The main process must
snapshot inside the step within the grace and exit 1 with no worker crash; the
restart must resume at the next batch and end as an uninterrupted run does. A
script whose module keeps its DataLoader alive must exit just the same. Scaled down
from the case (4 workers, a stop at step 37 in epoch 2): 2 workers, 3 epochs of 12
batches, the stop in the second epoch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import pytest

from resumable._archive import Archive
from resumable._storage import Storage

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "scripts" / "case_b09_train.py"
PROGRAM = "case_b09_train.py:train"
# The signal comes once step 1 has trained on this many batches.
SIGNAL_AFTER = (1, 4)
GRACE = 30.0
# The grace of the runs whose module keeps the loader: a hang costs this long.
SHORT_GRACE = 8.0
# Longest wait for anything else; far above what any of it needs.
PATIENCE = 120.0
EXIT_PREEMPTED = 1
_PREEMPTED = re.compile(
    r"preempted: cause=SIGTERM, step=(\d+), loop=(\d+), item=(\d+), "
    r"snapshot committed"
)
_RESUMED = re.compile(r"resumed: step=(\d+) \(inside: loop=(\d+), item=(\d+)\)")


@attrs.define
class Incarnation:
    """What one process of a run did: its exit code, log and progress lines."""

    returncode: int | None
    log: str
    progress: list[tuple[int, int, list[int]]]
    # Seconds from the signal (or the "run finished" line) to the exit.
    exit_seconds: float


class Run:
    """One storage folder and the incarnations of the script on it."""

    def __init__(self, folder: Path, *options: str, **env: str) -> None:
        self.options = list(options)
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.storage = folder / "snapshots"
        self.progress = folder / "progress.txt"
        self.digest = folder / "digest.json"
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RESUMABLE_", "B09_"))
        }
        self.env.update(
            OMP_NUM_THREADS="1",
            B09_PROGRESS=str(self.progress),
            B09_DIGEST=str(self.digest),
            B09_ITEM_SLEEP="0.03",
            **env,
        )
        self.count = 0

    def lines(self) -> list[tuple[int, int, list[int]]]:
        try:
            text = self.progress.read_text()
        except FileNotFoundError:
            return []
        found = []
        for line in text.splitlines():
            step, item, *indices = map(int, line.split())
            found.append((step, item, indices))
        return found

    def start(self, log: Path) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "resumable", str(SCRIPT)]
        with open(log, "wb") as output:
            return subprocess.Popen(
                [*command, "--storage", str(self.storage), *self.options],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.folder,
                start_new_session=True,
            )

    def incarnation(self, target: str | None = None, exit_within: float = GRACE) -> Any:
        """
        Run the script once and wait for its exit.

        With a target ("group" or "main"), SIGTERM goes there once step 1 has
        trained on its fourth batch, and the process has ``exit_within`` seconds
        from then to exit; without one, that long from its "run finished" line.
        """
        log = self.folder / f"incarnation-{self.count}.log"
        self.count += 1
        before = len(self.lines())
        process = self.start(log)
        try:
            if target is None:
                _wait_for(lambda: "run finished" in log.read_text(), process)
            else:
                _wait_for(lambda: _reached(self.lines()[before:]), process)
                if target == "group":
                    os.killpg(process.pid, signal.SIGTERM)
                else:
                    process.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=exit_within)
            seconds = time.monotonic() - sent
            returncode = process.poll()
        finally:
            # The group is this test's own: end whatever of it is left, workers too.
            _kill_group(process)
        return Incarnation(
            returncode, log.read_text(errors="replace"), self.lines()[before:], seconds
        )

    def unverified(self) -> list[str]:
        """Each committed snapshot that does not read back and verify."""
        archive = Archive(Storage.open(str(self.storage)), PROGRAM)
        problems = []
        for entry in archive.listing():
            try:
                assert entry.manifest is not None, entry.problem
                archive.read(entry.manifest)
            except Exception as err:
                problems.append(f"{entry.name}: {type(err).__name__}: {err}")
        return problems


def _reached(lines: list[tuple[int, int, list[int]]]) -> bool:
    return any((step, item) >= SIGNAL_AFTER for step, item, _ in lines)


def _wait_for(event: Any, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + PATIENCE
    while not event():
        if process.poll() is not None:
            return
        if time.monotonic() > deadline:
            msg = f"waited {PATIENCE} s for the run to get somewhere"
            raise AssertionError(msg)
        time.sleep(0.002)


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    # Workers outlive a main process that exited; they are in its group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The uninterrupted run's progress lines and final digest."""
    run = Run(tmp_path_factory.mktemp("reference"))
    finished = run.incarnation()
    assert 0 == finished.returncode, finished.log
    return {"progress": finished.progress, "digest": json.loads(run.digest.read_text())}


@pytest.fixture(scope="module", params=["group", "main"])
def preempted(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """A run stopped by SIGTERM to its group (or main process), then restarted."""
    run = Run(tmp_path_factory.mktemp(f"sigterm-{request.param}"))
    first = run.incarnation(request.param)
    unverified = run.unverified()
    second = run.incarnation()
    digest = json.loads(run.digest.read_text()) if run.digest.exists() else None
    return {
        "first": first,
        "second": second,
        "unverified": unverified,
        "digest": digest,
    }


def test_b09_sigterm_snapshots_inside_the_step_and_exits_1(
    preempted: dict[str, Any],
) -> None:
    """The stopped process commits a snapshot inside step 1 and exits 1 in the grace."""
    first = preempted["first"]
    found = _PREEMPTED.findall(first.log)

    assert EXIT_PREEMPTED == first.returncode, first.log
    assert 1 == len(found), first.log
    assert "1" == found[0][0]
    assert first.exit_seconds < GRACE
    assert [] == preempted["unverified"]


def test_b09_workers_do_not_crash_the_main_process(
    preempted: dict[str, Any],
) -> None:
    """No worker dies of the signal, so no 'worker exited unexpectedly' error shows."""
    log = preempted["first"].log

    assert ("exited unexpectedly" in log, "Traceback" in log) == (False, False), log


def test_b09_restart_resumes_at_the_next_batch(preempted: dict[str, Any]) -> None:
    """The restart resumes inside step 1 and trains on the batch after the last done."""
    first, second = preempted["first"], preempted["second"]
    found = _PREEMPTED.findall(first.log)
    assert 1 == len(found), first.log
    step, _, item = found[0]
    last = first.progress[-1][:2]

    assert 0 == second.returncode, second.log
    assert [(step, "0", item)] == _RESUMED.findall(second.log)
    assert (int(step), int(item)) == last
    assert (last[0], last[1] + 1) == second.progress[0][:2]


def test_b09_restart_ends_as_the_uninterrupted_run(
    preempted: dict[str, Any], reference: dict[str, Any]
) -> None:
    """Both incarnations' batches, joined, and the final state match a clean run."""
    joined = preempted["first"].progress + preempted["second"].progress

    assert reference["progress"] == joined
    assert reference["digest"] == preempted["digest"]


def test_b09_process_that_keeps_its_loader_exits_after_sigterm(
    tmp_path: Path,
) -> None:
    """A script whose module keeps the DataLoader alive still exits 1 in the grace."""
    run = Run(tmp_path, "--grace", str(SHORT_GRACE), B09_MODULE_LOADER="1")
    first = run.incarnation("group", exit_within=SHORT_GRACE)
    committed = len(_PREEMPTED.findall(first.log))

    assert (EXIT_PREEMPTED, 1) == (first.returncode, committed), first.log


def test_b09_process_that_keeps_its_loader_exits_when_finished(
    tmp_path: Path,
) -> None:
    """A script whose module keeps the DataLoader alive exits 0 when the run ends."""
    run = Run(tmp_path, "--grace", str(SHORT_GRACE), B09_MODULE_LOADER="1")
    finished = run.incarnation(exit_within=SHORT_GRACE)

    assert 0 == finished.returncode, finished.log
