"""
Helpers for the crash tests: start ``crash_train.py`` under ``python -m resumable``,
kill it with SIGKILL when something happens on its storage, and inspect what is left.

The tests import this file by its path, since ``tests`` is no package.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from resumable._archive import Archive
from resumable._snapshot import DATA_OBJECT, MANIFEST_SUFFIX, parse_snapshot_name
from resumable._storage import Storage

SCRIPTS = Path(__file__).resolve().parent
SCRIPT = SCRIPTS / "crash_train.py"
PROGRAM = "crash_train.py:train"
# Longest wait for anything a test waits on; far above what any event needs.
PATIENCE = 120.0
# Seconds between two looks at the storage while waiting for an event.
POLL = 0.002

_RESUMED = re.compile(r"resumed: step=(\d+)")
_COMMITTED = re.compile(r"snapshot committed: step=(\d+)")


class Run:
    """One training run: a storage folder, its settings, and its incarnations."""

    def __init__(self, folder: Path, settings: Mapping[str, object]) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.root = folder / "snapshots"
        self.progress = folder / "progress.txt"
        self.digest_path = folder / "digest.json"
        self.markers = folder / "markers"
        self.markers.mkdir(exist_ok=True)
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RESUMABLE_", "CRASH_"))
        }
        self.env.update(
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            CRASH_PROGRESS=str(self.progress),
            CRASH_DIGEST=str(self.digest_path),
            CRASH_MARKERS=str(self.markers),
        )
        self.env.update({key: str(value) for key, value in settings.items()})
        self.logs: list[Path] = []

    @property
    def storage(self) -> str:
        return str(self.root)

    def command(self) -> list[str]:
        """The one command that every incarnation runs."""
        return [
            sys.executable,
            "-m",
            "resumable",
            str(SCRIPT),
            "--storage",
            self.storage,
        ]

    def start(self) -> Incarnation:
        log = self.folder / f"incarnation-{len(self.logs)}.log"
        self.logs.append(log)
        return Incarnation(self, log)

    def run_to_end(self) -> Incarnation:
        """Run one incarnation that nobody kills, to its exit."""
        incarnation = self.start()
        incarnation.wait()
        return incarnation

    def digest(self) -> dict[str, str]:
        result: dict[str, str] = json.loads(self.digest_path.read_text())
        return result

    def steps_started(self) -> int:
        try:
            return len(self.progress.read_text().split())
        except FileNotFoundError:
            return 0

    def names(self) -> set[str]:
        try:
            return set(os.listdir(self.root))
        except FileNotFoundError:
            return set()


class Incarnation:
    """One process of a run; always reaped, killed with SIGKILL when asked."""

    def __init__(self, run: Run, log: Path) -> None:
        self.run = run
        self.log_path = log
        self.names_at_start = run.names()
        self.steps_at_start = run.steps_started()
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                run.command(),
                stdout=output,
                stderr=subprocess.STDOUT,
                env=run.env,
                cwd=run.folder,
            )
        self.killed = False

    def __enter__(self) -> Incarnation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.reap()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def kill(self) -> None:
        """Send SIGKILL to the process started here, and reap it."""
        if self.process.poll() is None:
            self.process.kill()
            self.killed = True
        self.process.wait()

    def reap(self) -> None:
        if self.process.poll() is None:
            self.kill()

    def wait(self) -> int:
        try:
            return self.process.wait(timeout=PATIENCE)
        finally:
            self.reap()

    def kill_when(self, event: Callable[[], bool]) -> bool:
        """
        Kill the process as soon as ``event()`` holds; return whether it was killed.

        Returns False where the process exited on its own first.
        """
        deadline = time.monotonic() + PATIENCE
        while time.monotonic() < deadline:
            if event():
                self.kill()
                return self.killed
            if self.process.poll() is not None:
                return False
            time.sleep(POLL)
        self.reap()
        msg = f"Waited {PATIENCE} s for an event that never came; see {self.log_path}."
        raise AssertionError(msg)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def resumed_from(self) -> int | None:
        """The step this incarnation logged that it resumed from, if any."""
        found = _RESUMED.findall(self.log())
        return int(found[0]) if found else None

    def committed_steps(self) -> list[int]:
        """The steps this incarnation logged as committed."""
        return [int(step) for step in _COMMITTED.findall(self.log())]

    def steps_started(self) -> int:
        return self.run.steps_started() - self.steps_at_start

    def new_folders(self) -> list[str]:
        """Snapshot and attempt folders made since this incarnation started."""
        return sorted(
            name
            for name in self.run.names() - self.names_at_start
            if parse_snapshot_name(name) is not None
        )

    def new_commits(self) -> set[str]:
        names = self.run.names()
        return {
            name.removesuffix(MANIFEST_SUFFIX)
            for name in names - self.names_at_start
            if name.endswith(MANIFEST_SUFFIX)
        }


def data_size(run: Run, attempt: str) -> int:
    """Bytes of ``data.bin`` written so far in an attempt folder (-1: none yet)."""
    try:
        return os.stat(run.root / attempt / DATA_OBJECT).st_size
    except OSError:  # no such file yet, or no folder at all
        return -1


def archive(run: Run) -> Archive:
    return Archive(Storage.open(run.storage), PROGRAM)


def unverified(run: Run) -> list[str]:
    """Each committed snapshot that does not read back and verify, with why."""
    problems = []
    store = archive(run)
    for entry in store.listing():
        if entry.manifest is None:
            problems.append(f"{entry.name}: {entry.problem}")
            continue
        try:
            store.read(entry.manifest)
        except Exception as err:
            problems.append(f"{entry.name}: {type(err).__name__}: {err}")
    return problems


def committed_steps(run: Run) -> list[int]:
    """Steps of the committed snapshots, ascending."""
    steps = (parse_snapshot_name(name) for name in archive(run).storage.committed())
    return sorted(step for step in steps if step is not None)


def newest_step(run: Run) -> int | None:
    return max(committed_steps(run), default=None)


def final_checksums(run: Run) -> dict[str, str]:
    """Checksums of the objects of the newest committed snapshot."""
    newest = archive(run).listing()[0].manifest
    assert newest is not None
    return {name: info.checksum for name, info in newest.objects.items()}


def full_data_size(run: Run) -> int:
    """Size of ``data.bin`` in the newest committed snapshot of a run."""
    newest = archive(run).listing()[0].manifest
    assert newest is not None
    return newest.objects[DATA_OBJECT].size
