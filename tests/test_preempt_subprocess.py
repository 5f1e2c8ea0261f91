"""
Preemption of real processes: ``python -m resumable scripts/preempt_train.py`` gets
stop signals (SIGTERM, SIGINT, SIGUSR1, a named one) at random moments: during
start-up, between the items of a step, at a step's end, in the middle of a snapshot
write, inside a long native call. Each incarnation must exit with the preempted
code within the grace period, a second signal must end it at once, the grace budget
must hold when a write is too slow, and the same command run again must end
bit-identical to an uninterrupted run, with every item trained on exactly once.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import attrs
import pytest

from resumable._archive import Archive
from resumable._snapshot import parse_snapshot_name
from resumable._storage import Storage

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parent / "scripts" / "preempt_train.py"
PROGRAM = "preempt_train.py:train"
# Longest wait for anything a test waits on; far above what any event needs.
PATIENCE = 90.0
# Seconds between two looks at the events file.
POLL = 0.003
# The exit codes of the command line.
PREEMPTED, NO_PROGRESS = 1, 4
# The exit code of preempt_train.py's deliberate crash.
CRASHED = 9

_PREEMPTED_LINE = re.compile(r"preempted: cause=(\w+), step=\d+(, loop=\d+)?")
_RESUMED_FROM = re.compile(r"resumed: step=\d+.*?, snapshot=([\w-]+)")


class Run:
    """One training run: a storage folder, its environment, and its incarnations."""

    def __init__(self, folder: Path, settings: Mapping[str, object]) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.root = folder / "snapshots"
        self.events_path = folder / "events.txt"
        self.result_path = folder / "result.json"
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RESUMABLE_", "PREEMPT_"))
        }
        self.env.update(
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            PREEMPT_EVENTS=str(self.events_path),
            PREEMPT_RESULT=str(self.result_path),
        )
        self.env.update({key: str(value) for key, value in settings.items()})
        self.count = 0

    def start(
        self, *options: str, env: Mapping[str, object] | None = None
    ) -> Incarnation:
        """Start the run's command, with ``env`` over the run's environment."""
        self.count += 1
        log = self.folder / f"incarnation-{self.count}.log"
        command = [
            sys.executable,
            "-m",
            "resumable",
            str(SCRIPT),
            "--storage",
            str(self.root),
            *options,
        ]
        environment = {**self.env, **{k: str(v) for k, v in (env or {}).items()}}
        return Incarnation(self, command, environment, log)

    def run_to_end(
        self, *options: str, env: Mapping[str, object] | None = None
    ) -> Incarnation:
        with self.start(*options, env=env) as incarnation:
            incarnation.wait()
        return incarnation

    def result(self) -> dict[str, object]:
        loaded: dict[str, object] = json.loads(self.result_path.read_text())
        return loaded

    def archive(self) -> Archive:
        return Archive(Storage.open(str(self.root)), PROGRAM)

    def newest(self) -> str | None:
        """The name of the newest committed snapshot, by commit order."""
        listing = self.archive().listing()
        return listing[0].name if listing else None

    def committed_steps(self) -> list[int]:
        names = self.archive().storage.committed()
        return sorted(parse_snapshot_name(name) or 0 for name in names)

    def unverified(self) -> list[str]:
        """Each committed snapshot that does not read back and verify, with why."""
        problems = []
        store = self.archive()
        for entry in store.listing():
            if entry.manifest is None:
                problems.append(f"{entry.name}: {entry.problem}")
                continue
            try:
                store.read(entry.manifest)
            except Exception as err:
                problems.append(f"{entry.name}: {type(err).__name__}: {err}")
        return problems

    def checksums(self) -> dict[str, str]:
        """Checksums of the objects of the newest committed snapshot."""
        newest = self.archive().listing()[0].manifest
        assert newest is not None
        return {name: info.checksum for name, info in newest.objects.items()}


class Incarnation:
    """One process of a run; signalled by its PID, always reaped."""

    def __init__(
        self, run: Run, command: list[str], env: dict[str, str], log: Path
    ) -> None:
        self.run = run
        self.log_path = log
        # Bytes of the events file before this process, then the lines it wrote.
        self.events_read = _size(run.events_path)
        self.lines: list[str] = []
        self.signalled_at: list[float] = []
        self.ended_at: float | None = None
        with open(log, "wb") as output:
            self.process = subprocess.Popen(
                command,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=run.folder,
            )

    def __enter__(self) -> Incarnation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.reap()

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def alive(self) -> bool:
        return self.process.poll() is None

    def events(self) -> list[str]:
        """Event lines this incarnation's process wrote, read as they come."""
        if _size(self.run.events_path) > self.events_read:
            with open(self.run.events_path, "rb") as file:
                file.seek(self.events_read)
                text = file.read()
            complete = text[: text.rfind(b"\n") + 1]
            self.events_read += len(complete)
            self.lines.extend(complete.decode().splitlines())
        return self.lines

    def count(self, prefix: str) -> int:
        return sum(line.startswith(prefix) for line in self.events())

    def wait_for(self, condition: Callable[[], bool], delay: float = 0.0) -> bool:
        """
        Wait until ``condition()`` holds, then ``delay`` seconds more.

        Returns False where the process exited before.
        """
        deadline = time.monotonic() + PATIENCE
        while not condition():
            if not self.alive():
                return False
            if time.monotonic() > deadline:
                msg = f"Waited {PATIENCE} s for an event; see {self.log_path}."
                raise AssertionError(msg)
            time.sleep(POLL)
        time.sleep(delay)
        return self.alive()

    def send(self, signum: int) -> None:
        """Send ``signum`` to the process started here; it is not reaped yet."""
        assert self.alive(), self.log()
        self.signalled_at.append(time.monotonic())
        os.kill(self.process.pid, signum)

    def wait(self) -> int:
        try:
            code = self.process.wait(timeout=PATIENCE)
        finally:
            self.reap()
        self.ended_at = time.monotonic()
        return code

    def reap(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()

    def seconds_after(self, signal_number: int = 0) -> float:
        """Seconds from the signal sent at that ordinal to the process's exit."""
        assert self.ended_at is not None
        return self.ended_at - self.signalled_at[signal_number]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def preempted(self) -> tuple[str, str] | None:
        """The cause and place (inside a step or between steps) the log reports."""
        found = _PREEMPTED_LINE.search(self.log())
        if found is None:
            return None
        return found[1], "inside" if found[2] else "between"

    def resumed_from(self) -> str | None:
        found = _RESUMED_FROM.search(self.log())
        return found[1] if found else None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def nth(incarnation: Incarnation, prefix: str, count: int) -> Callable[[], bool]:
    """A condition: the incarnation wrote ``count`` events starting with ``prefix``."""
    return lambda: incarnation.count(prefix) >= count


def early_items(
    incarnation: Incarnation, count: int, after: int = 0
) -> Callable[[], bool]:
    """A condition: ``count`` items 1 or 2 of a step, after the ``after``-th event."""

    def condition() -> bool:
        items = [line.split() for line in incarnation.events()[after:]]
        return (
            sum(item[0] == "item" and item[2] in ("1", "2") for item in items) >= count
        )

    return condition


# Random interrupts: what makes the run, equal in the reference and the others.
RUN = {
    "PREEMPT_STEPS": 24,
    "PREEMPT_EVERY": 2,
    "PREEMPT_KEEP": 2,
    "PREEMPT_BALLAST_MB": 1,
}
# Pacing only: slow items, step ends, start-up and writes give signals room to land.
ITEM_SLEEP, END_SLEEP, INIT_SLEEP = 0.02, 0.06, 0.3
PACING = {
    "PREEMPT_ITEM_SLEEP": ITEM_SLEEP,
    "PREEMPT_END_SLEEP": END_SLEEP,
    "PREEMPT_INIT_SLEEP": INIT_SLEEP,
    "PREEMPT_CHUNK_BYTES": 64 * 1024,
    "PREEMPT_CHUNK_SLEEP": 0.01,
}
GRACE = 10.0
# Where each incarnation gets its SIGTERM; shuffled by the seed.
INTERRUPTS = ["startup", "item", "item", "end", "write", "random"]
# Where the runtime must stop for each kind: at the next safe point after it.
# A periodic snapshot is written in the background while the next step runs: a
# signal during its write lands wherever that step is, as a random one does.
STOPS_AT = {
    "startup": "between",
    "item": "inside",
    "end": "between",
}


@attrs.define
class Interrupted:
    """What a run interrupted by SIGTERMs saw, for the tests to judge."""

    kinds: list[str]
    landed: list[bool] = attrs.Factory(list)
    codes: list[int] = attrs.Factory(list)
    seconds: list[float] = attrs.Factory(list)
    stops: list[tuple[str, str] | None] = attrs.Factory(list)
    unverified: list[list[str]] = attrs.Factory(list)
    # (newest committed snapshot at an incarnation's start, the one it resumed from)
    resumes: list[tuple[str | None, str | None]] = attrs.Factory(list)
    final_code: int | None = None
    result: dict[str, object] = attrs.Factory(dict)
    checksums: dict[str, str] = attrs.Factory(dict)
    logs: list[str] = attrs.Factory(list)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The run that nobody interrupts, at full speed."""
    run = Run(tmp_path_factory.mktemp("reference"), RUN)
    finished = run.run_to_end("--grace", str(GRACE))
    assert finished.returncode == 0, finished.log()
    return run


def _interrupt_condition(
    kind: str, incarnation: Incarnation, rng: random.Random
) -> tuple[Callable[[], bool], float]:
    """Return when to send the SIGTERM for a kind: a condition and a delay."""
    if kind == "startup":
        # init() runs with the handlers installed and sleeps INIT_SLEEP.
        return nth(incarnation, "init", 1), rng.uniform(0, INIT_SLEEP * 0.7)
    if kind == "item":
        # During the sleep after the work of item 1 or 2 of a step (of 4): a late
        # signal still lands before the step's last safe point.
        count = rng.randint(1, 3)
        return early_items(incarnation, count), rng.uniform(0, ITEM_SLEEP * 0.6)
    if kind == "end":
        # After a step's loop, in the sleep before the step returns.
        count = rng.randint(1, 2)
        return nth(incarnation, "end", count), rng.uniform(0, END_SLEEP * 0.3)
    if kind == "write":
        # In the middle of a periodic snapshot's data.bin (16 chunks, 0.16 s).
        count = rng.randint(1, 2)
        return nth(incarnation, "write-start", count), rng.uniform(0.01, 0.1)
    assert kind == "random"
    return nth(incarnation, "step", 1), rng.uniform(0, 0.6)


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> Interrupted:
    """SIGTERM a run once for each entry of INTERRUPTS, then run it to the end."""
    rng = random.Random(303)
    kinds = list(INTERRUPTS)
    rng.shuffle(kinds)
    run = Run(tmp_path_factory.mktemp("interrupted"), {**RUN, **PACING})
    seen = Interrupted(kinds)
    for kind in kinds:
        newest = run.newest()
        with run.start("--grace", str(GRACE)) as incarnation:
            condition, delay = _interrupt_condition(kind, incarnation, rng)
            landed = incarnation.wait_for(condition, delay)
            if landed:
                incarnation.send(signal.SIGTERM)
            code = incarnation.wait()
        seen.landed.append(landed)
        seen.codes.append(code)
        seen.seconds.append(incarnation.seconds_after() if landed else -1.0)
        seen.stops.append(incarnation.preempted())
        seen.unverified.append(run.unverified())
        if newest is not None:
            seen.resumes.append((newest, incarnation.resumed_from()))
        seen.logs.append(incarnation.log())
    newest = run.newest()
    # Pacing is no part of the command: the last incarnation runs at full speed.
    unpaced = dict.fromkeys(PACING, 0)
    final = run.run_to_end("--grace", str(GRACE), env=unpaced)
    seen.resumes.append((newest, final.resumed_from()))
    seen.logs.append(final.log())
    seen.final_code = final.returncode
    if final.returncode == 0:
        seen.result = run.result()
        seen.checksums = run.checksums()
    return seen


def test_every_sigterm_lands_on_a_live_run(interrupted: Interrupted) -> None:
    """Each planned SIGTERM reaches a process that is still training."""
    expected = [True] * len(INTERRUPTS)

    actual = interrupted.landed

    assert expected == actual


def test_sigterm_exits_with_the_preempted_code(interrupted: Interrupted) -> None:
    """After a SIGTERM at any moment the command exits 1, preempted and resumable."""
    expected = [PREEMPTED] * len(INTERRUPTS)

    actual = interrupted.codes

    assert expected == actual, "\n\n".join(interrupted.logs)


def test_sigterm_exits_within_the_grace_period(interrupted: Interrupted) -> None:
    """From a SIGTERM to the process's exit takes less than the grace period."""
    expected = [True] * len(INTERRUPTS)

    actual = [0 <= seconds < GRACE for seconds in interrupted.seconds]

    assert expected == actual, interrupted.seconds


def test_sigterm_stops_at_the_next_safe_point(interrupted: Interrupted) -> None:
    """A stop requested between items snapshots inside the step, else between steps."""
    expected = [
        ("SIGTERM", STOPS_AT[kind]) if kind in STOPS_AT else stop
        for kind, stop in zip(interrupted.kinds, interrupted.stops, strict=True)
    ]

    actual = interrupted.stops

    assert expected == actual
    assert all(stop is not None for stop in actual)


def test_snapshots_verify_after_every_sigterm(interrupted: Interrupted) -> None:
    """After each preempted incarnation, every listed snapshot reads and verifies."""
    expected: list[list[str]] = [[]] * len(INTERRUPTS)

    actual = interrupted.unverified

    assert expected == actual


def test_each_rerun_resumes_from_the_newest_snapshot(interrupted: Interrupted) -> None:
    """Every rerun resumes from the newest snapshot committed before it started."""
    expected = [(newest, newest) for newest, _ in interrupted.resumes]

    actual = interrupted.resumes

    assert expected == actual
    # Only the incarnations that start before any snapshot has no resume.
    assert len(actual) >= len(INTERRUPTS) - 1


def test_rerun_after_sigterms_finishes(interrupted: Interrupted) -> None:
    """The same command, run again after any number of SIGTERMs, exits 0."""
    expected = 0

    actual = interrupted.final_code

    assert expected == actual, interrupted.logs[-1]


def test_every_item_is_trained_on_exactly_once(
    interrupted: Interrupted, reference: Run
) -> None:
    """The log of (step, batch ids) kept on the state equals the uninterrupted one."""
    expected = reference.result()["log"]

    actual = interrupted.result.get("log")

    assert expected == actual


def test_final_state_is_bit_identical(interrupted: Interrupted, reference: Run) -> None:
    """A run preempted many times ends with the uninterrupted run's exact state."""
    expected = reference.result()["digest"]

    actual = interrupted.result.get("digest")

    assert expected == actual


def test_final_snapshot_is_bit_identical(
    interrupted: Interrupted, reference: Run
) -> None:
    """The last snapshot (state, RNGs, history) equals the uninterrupted run's."""
    expected = reference.checksums()

    actual = interrupted.checksums

    assert expected == actual


def test_sigterm_while_the_script_is_imported_preempts(tmp_path: Path) -> None:
    """A SIGTERM during the script's import, before any step, exits 1, not -15."""
    # A slow import (big libraries, a network file system) is part of start-up.
    run = Run(tmp_path, {"PREEMPT_STEPS": 3, "PREEMPT_IMPORT_SLEEP": 1.0})
    with run.start("--grace", str(GRACE)) as incarnation:
        assert incarnation.wait_for(nth(incarnation, "import", 1), 0.1)
        incarnation.send(signal.SIGTERM)
        code = incarnation.wait()
    expected: tuple[object, ...] = (PREEMPTED, True, [])

    actual = (code, incarnation.seconds_after() < GRACE, run.committed_steps())

    assert expected == actual, incarnation.log()


def test_sigterm_after_the_last_step_ends_finished(tmp_path: Path) -> None:
    """A SIGTERM that comes once the last step's work is done ends with exit 0."""
    run = Run(tmp_path, {"PREEMPT_STEPS": 3, "PREEMPT_END_SLEEP": 0.3})
    with run.start("--grace", str(GRACE)) as incarnation:
        assert incarnation.wait_for(nth(incarnation, "end 2", 1), 0.05)
        incarnation.send(signal.SIGTERM)
        code = incarnation.wait()
    log = incarnation.log()
    expected: tuple[object, ...] = (0, True, True, [1, 2, 3], [])

    actual = (
        code,
        incarnation.seconds_after() < GRACE,
        "run finished" in log,
        run.committed_steps(),
        run.unverified(),
    )

    assert expected == actual, log


# Signal scenarios, run side by side: a long run that trains until it is stopped.
LONG = {"PREEMPT_STEPS": 1000, "PREEMPT_EVERY": 1000, "PREEMPT_ITEM_SLEEP": 0.05}


@attrs.define
class Signalled:
    """One process stopped by one signal: what it exited with, and how fast."""

    code: int
    seconds: float
    stop: tuple[str, str] | None
    committed: list[int]
    marker: str
    log: str


# name: (options, environment, signal sent)
SCENARIOS: dict[str, tuple[list[str], dict[str, object], signal.Signals]] = {
    "SIGINT": ([], {}, signal.SIGINT),
    "SIGUSR1": ([], {}, signal.SIGUSR1),
    "USR2 chosen": (["--signals", "USR2"], {}, signal.SIGUSR2),
    "TERM besides USR2": (["--signals", "USR2"], {}, signal.SIGTERM),
    "USR2 not chosen": ([], {}, signal.SIGUSR2),
    "code option": (["--preempted-exit-code", "143"], {}, signal.SIGTERM),
    "code variable": ([], {"RESUMABLE_PREEMPTED_EXIT_CODE": 143}, signal.SIGTERM),
    "user handler": ([], {"PREEMPT_USER_HANDLER": "handled.txt"}, signal.SIGTERM),
}


@pytest.fixture(scope="module")
def signalled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Signalled]:
    """Start every scenario at once, then stop each with its signal mid-step."""
    started: dict[str, tuple[Run, Incarnation]] = {}
    outcomes: dict[str, Signalled] = {}
    try:
        for index, (name, (options, env, _)) in enumerate(SCENARIOS.items()):
            run = Run(tmp_path_factory.mktemp(f"signal-{index}"), {**LONG, **env})
            started[name] = (run, run.start("--grace", str(GRACE), *options))
        for name, (run, incarnation) in started.items():
            # In the sleep after item 1 or 2 of a step: the next safe point is
            # inside the step.
            now = len(incarnation.events())
            if incarnation.wait_for(early_items(incarnation, 1, now), 0.01):
                incarnation.send(SCENARIOS[name][2])
            code = incarnation.wait()
            marker = run.folder / "handled.txt"
            outcomes[name] = Signalled(
                code,
                incarnation.seconds_after() if incarnation.signalled_at else -1.0,
                incarnation.preempted(),
                run.committed_steps(),
                marker.read_text() if marker.exists() else "",
                incarnation.log(),
            )
    finally:
        for _, incarnation in started.values():
            incarnation.reap()
    return outcomes


@pytest.mark.parametrize(
    ("name", "cause"),
    [
        ("SIGINT", "SIGINT"),
        ("SIGUSR1", "SIGUSR1"),
        ("USR2 chosen", "SIGUSR2"),
        ("TERM besides USR2", "SIGTERM"),
    ],
)
def test_stop_signals_preempt_like_sigterm(
    signalled: dict[str, Signalled], name: str, cause: str
) -> None:
    """SIGINT, SIGUSR1, a named signal and the defaults besides it preempt alike."""
    outcome = signalled[name]
    expected: tuple[object, ...] = (PREEMPTED, (cause, "inside"), 1, True)

    actual = (
        outcome.code,
        outcome.stop,
        len(outcome.committed),
        0 <= outcome.seconds < GRACE,
    )

    assert expected == actual, outcome.log


def test_signal_not_named_keeps_its_default_action(
    signalled: dict[str, Signalled],
) -> None:
    """SIGUSR2, unless named with --signals, kills the process as without resumable."""
    outcome = signalled["USR2 not chosen"]
    expected: tuple[object, ...] = (-signal.SIGUSR2, None, [])

    actual = (outcome.code, outcome.stop, outcome.committed)

    assert expected == actual, outcome.log


@pytest.mark.parametrize("name", ["code option", "code variable"])
def test_preempted_exit_code_is_configurable(
    signalled: dict[str, Signalled], name: str
) -> None:
    """--preempted-exit-code and RESUMABLE_PREEMPTED_EXIT_CODE set the exit code."""
    outcome = signalled[name]
    expected: tuple[object, ...] = (143, ("SIGTERM", "inside"), 1)

    actual = (outcome.code, outcome.stop, len(outcome.committed))

    assert expected == actual, outcome.log


def test_users_own_sigterm_handler_is_still_called(
    signalled: dict[str, Signalled],
) -> None:
    """A SIGTERM handler the script installed at import runs once; the run preempts."""
    outcome = signalled["user handler"]
    expected: tuple[object, ...] = (
        f"{signal.SIGTERM.value}\n",
        PREEMPTED,
        ("SIGTERM", "inside"),
        1,
    )

    actual = (outcome.marker, outcome.code, outcome.stop, len(outcome.committed))

    assert expected == actual, outcome.log


# A write of about 2.5 s: 2 MiB of ballast in 64 KiB chunks, 0.08 s apart.
SLOW_WRITE = {
    "PREEMPT_BALLAST_MB": 2,
    "PREEMPT_CHUNK_BYTES": 64 * 1024,
    "PREEMPT_CHUNK_SLEEP": 0.08,
}


def test_second_signal_exits_at_once_mid_write(tmp_path: Path) -> None:
    """A second SIGTERM during a long snapshot write ends the process within 1 s."""
    # Snapshots 1 and 2 are fast; the write of snapshot 3 is slow.
    settings = {"PREEMPT_STEPS": 4, "PREEMPT_EVERY": 1, **SLOW_WRITE}
    run = Run(tmp_path, {**settings, "PREEMPT_SLOW_FROM": 3})
    with run.start("--grace", str(GRACE)) as incarnation:
        assert incarnation.wait_for(nth(incarnation, "write-start", 3), 0.2)
        incarnation.send(signal.SIGTERM)
        time.sleep(0.3)
        incarnation.send(signal.SIGTERM)
        code = incarnation.wait()
    committed, unverified, newest = (
        run.committed_steps(),
        run.unverified(),
        run.newest(),
    )
    rerun = run.run_to_end("--grace", str(GRACE), env={"PREEMPT_CHUNK_BYTES": 0})
    expected: tuple[object, ...] = (PREEMPTED, True, [1, 2], [], newest, 0)

    actual = (
        code,
        incarnation.seconds_after(1) < 1.0,
        committed,
        unverified,
        rerun.resumed_from(),
        rerun.returncode,
    )

    assert expected == actual, incarnation.log() + rerun.log()
    assert parse_snapshot_name(newest or "") == 2


def test_final_snapshot_skipped_when_the_last_write_was_too_slow(
    tmp_path: Path,
) -> None:
    """A write slower than the grace allows is not started: exit 1, older one kept."""
    # Snapshot 1 takes about 1.3 s: 1.3 s x 1.5 is more than the 1.8 s that a grace
    # of 2 s leaves, though the state's bytes alone would let a write start.
    # Written at once: the signal finds snapshot 1 committed and its time known,
    # not still in flight in the background (the wait for that would spend most
    # of the grace; test_writer.py checks that a stop waits for it).
    settings = {
        **SLOW_WRITE,
        "PREEMPT_CHUNK_SLEEP": 0.04,
        "PREEMPT_EVERY": 1,
        "RESUMABLE_BACKGROUND": 0,
    }
    run = Run(tmp_path, {**LONG, **settings})
    with run.start("--grace", "2") as incarnation:
        assert incarnation.wait_for(nth(incarnation, "item 1 1", 1), 0.01)
        incarnation.send(signal.SIGTERM)
        code = incarnation.wait()
    log = incarnation.log()
    expected: tuple[object, ...] = (
        PREEMPTED,
        True,
        True,
        [1],
        [],
        ("SIGTERM", "inside"),
    )

    actual = (
        code,
        incarnation.seconds_after() < 2.0,
        "final snapshot skipped" in log,
        run.committed_steps(),
        run.unverified(),
        incarnation.preempted(),
    )

    assert expected == actual, log


# A write of about 5 s: 2 MiB in 64 KiB chunks, 0.15 s apart.
OVERRUN = {**SLOW_WRITE, "PREEMPT_CHUNK_SLEEP": 0.15}


@pytest.mark.parametrize(
    ("every", "slow_from", "stop_in", "committed"),
    [(1000, 1, "item 0 2", []), (1, 3, "item 2 1", [1, 2])],
    ids=["first-snapshot", "after-fast-snapshots"],
)
def test_watchdog_ends_a_write_that_overruns_the_grace(
    tmp_path: Path, every: int, slow_from: int, stop_in: str, committed: list[int]
) -> None:
    """A final write that outlasts the grace is cut off in time; commits stay whole."""
    # The estimate (from the state's bytes, or from fast earlier writes) lets the
    # write start; it takes about 5 s against a grace of 2 s.
    settings = {"PREEMPT_EVERY": every, "PREEMPT_SLOW_FROM": slow_from}
    run = Run(tmp_path, {**LONG, **OVERRUN, **settings})
    with run.start("--grace", "2") as incarnation:
        assert incarnation.wait_for(nth(incarnation, stop_in, 1), 0.01)
        incarnation.send(signal.SIGTERM)
        code = incarnation.wait()
    log = incarnation.log()
    expected: tuple[object, ...] = (PREEMPTED, True, True, True, committed, [])

    actual = (
        code,
        incarnation.seconds_after() < 2.0,
        incarnation.count("write-start") == len(committed) + 1,
        "grace period spent" in log,
        run.committed_steps(),
        run.unverified(),
    )

    assert expected == actual, log


def test_sigterm_during_a_long_native_call_exits_within_the_grace(
    tmp_path: Path,
) -> None:
    """The grace counts from the signal even while the main thread is in C code."""
    # One C call of about 3.5 s holds the main thread; the grace is 2 s.
    run = Run(tmp_path, {**LONG, "PREEMPT_NATIVE_SECONDS": 3.5})
    with run.start("--grace", "2") as incarnation:
        assert incarnation.wait_for(nth(incarnation, "native", 1), 0.2)
        incarnation.send(signal.SIGTERM)
        code = incarnation.wait()
    expected: tuple[object, ...] = (PREEMPTED, True)

    actual = (code, incarnation.seconds_after() < 2.0)

    assert expected == actual, (
        f"{incarnation.seconds_after():.2f} s\n{incarnation.log()}"
    )


def test_no_progress_across_restarts_exits_4(tmp_path: Path) -> None:
    """A run that crashes after each resume from one snapshot stops with code 4."""
    # Step index 2 always crashes: the first run commits snapshots 1 and 2, each
    # rerun resumes from snapshot 2 and crashes again. Written at once: the crash,
    # an os._exit, would lose a background write of snapshot 2, as any kill does.
    settings = {"PREEMPT_EVERY": 1, "PREEMPT_CRASH_AT": 2, "RESUMABLE_BACKGROUND": 0}
    run = Run(tmp_path, {"PREEMPT_STEPS": 6, **settings})
    incarnations = [run.run_to_end("--max-attempts", "3") for _ in range(5)]
    last = incarnations[-1]
    expected: tuple[object, ...] = ([CRASHED] * 4 + [NO_PROGRESS], True, 0, [], 2)

    actual = (
        [incarnation.returncode for incarnation in incarnations],
        "no progress" in last.log(),
        last.count("step"),
        run.unverified(),
        parse_snapshot_name(run.newest() or ""),
    )

    assert expected == actual, last.log()
