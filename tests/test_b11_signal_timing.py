"""
B11: a stop signal at any moment leaves only consistent snapshots, taken between
steps, and never hangs; a second signal never damages what is committed.

The step does forward, backward, optimizer.step() (Adam), then state.step += 1;
periodic snapshots go to a throttled file:// writer. The invariants of every
committed snapshot: Adam's step count equals state.step, and the weights and Adam
state equal those of an uninterrupted run after exactly state.step steps.

In process, SIGTERM is sent to the test process itself: once from inside each phase
(a forward hook, a gradient hook during backward, right after optimizer.step()
updated the weights but before the counter moved, the middle of a periodic save),
then at 24 random moments from a threading.Timer (the case's 500 trials, scaled
down). In subprocesses (``python -m resumable case_b11_train.py``, 6 trials instead
of 500): SIGTERM at random moments inside a step and during a slow periodic save,
and a second SIGTERM 1 s after the first, landing in a slow final save, a slow
periodic save or a slow step; the exit it escalates to leaves the committed
snapshots as they were.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

import attrs
import pytest
import torch
from torch import nn

import resumable
from resumable._archive import Archive
from resumable._snapshot import DATA_OBJECT, parse_snapshot_name
from resumable._state import decode_snapshot
from resumable._storage import Storage

STEPS = 12
EVERY = 4
FEATURES, HIDDEN, BATCH = 16, 64, 32
# Bytes of ballast, written in chunks with a pause after each: a save takes a while.
BALLAST_BYTES = 256 * 1024
CHUNK_BYTES = 32 * 1024
CHUNK_SLEEP = 0.002
RANDOM_TRIALS = 24
# Every this many random trials, the run is also resumed to its end.
RESUME_EVERY = 4
# No trial may take longer; an uninterrupted run takes well under a second.
TRIAL_LIMIT = 20.0

# The phase the step is in, as the signal handler sees it.
PHASE: dict[str, Any] = {"phase": "idle", "step": -1}
# Where a trial sends itself SIGTERM: phase and step, once.
TRIGGER: dict[str, Any] = {}


@attrs.define
class State:
    model: nn.Module
    optimizer: torch.optim.Optimizer
    ballast: torch.Tensor
    step: int = 0


def init() -> State:
    PHASE.update(phase="init", step=-1)
    torch.manual_seed(11)
    model = nn.Sequential(
        nn.Linear(FEATURES, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, HIDDEN),
        nn.Tanh(),
        nn.Linear(HIDDEN, 1),
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model[2].register_forward_hook(_in_forward)
    optimizer.register_step_post_hook(lambda *args: _fire("optimizer"))
    return State(model, optimizer, torch.zeros(BALLAST_BYTES // 4))


@resumable.step(init=init, steps=STEPS, every=EVERY, keep=100)
def train(state: State, step: int) -> dict[str, float]:
    PHASE.update(phase="forward", step=step)
    generator = torch.Generator().manual_seed(step)
    inputs = torch.randn(BATCH, FEATURES, generator=generator)
    targets = torch.randn(BATCH, 1, generator=generator)
    loss = nn.functional.mse_loss(state.model(inputs), targets)
    PHASE["phase"] = "backward"
    state.optimizer.zero_grad()
    loss.backward()  # type: ignore[no-untyped-call]  # torch leaves it bare
    PHASE["phase"] = "optimizer"
    state.optimizer.step()
    PHASE["phase"] = "counter"
    state.step += 1
    PHASE["phase"] = "between steps"
    return {"loss": loss.item()}


def _fire(phase: str, step: int | None = None) -> None:
    """Send this process SIGTERM if the trial asks for it here and now."""
    step = PHASE["step"] if step is None else step
    if TRIGGER and (TRIGGER["phase"], TRIGGER["step"]) == (phase, step):
        TRIGGER.clear()
        os.kill(os.getpid(), signal.SIGTERM)


def _in_forward(module: nn.Module, args: Any, output: torch.Tensor) -> None:
    _fire("forward")
    if output.requires_grad:
        output.register_hook(_in_backward)  # type: ignore[no-untyped-call]  # bare


def _in_backward(grad: torch.Tensor) -> None:
    _fire("backward")


def _throttled(chunks: Any, step: int | None) -> Iterator[Any]:
    for number, chunk in enumerate(chunks):
        view = memoryview(chunk).cast("B")
        for start in range(0, view.nbytes, CHUNK_BYTES):
            yield view[start : start + CHUNK_BYTES]
            time.sleep(CHUNK_SLEEP)
            if number == 0 and start == 0:
                _fire("save", step)


@pytest.fixture
def throttled_storage(monkeypatch: pytest.MonkeyPatch) -> None:
    """Write data.bin in small chunks with a pause after each, phase "save"."""
    write_object = Storage.write_object

    def slow(self: Storage, snapshot: str, name: str, chunks: Any) -> int:
        if name != DATA_OBJECT:
            return write_object(self, snapshot, name, chunks)
        step = parse_snapshot_name(snapshot)
        if threading.current_thread() is not threading.main_thread():
            # A background write: PHASE is the step's, going on meanwhile.
            return write_object(self, snapshot, name, _throttled(chunks, step))
        before = dict(PHASE)
        PHASE.update(phase="save", step=step)
        size = write_object(self, snapshot, name, _throttled(chunks, step))
        PHASE.update(before)
        return size

    monkeypatch.setattr(Storage, "write_object", slow)


def _fingerprint(state: State) -> dict[str, Any]:
    """Every tensor of the weights and of Adam's state, as bytes, and the counter."""
    parts: dict[str, Any] = {"step": state.step}
    for name, tensor in state.model.state_dict().items():
        parts[f"model.{name}"] = tensor.numpy().tobytes()
    for index, entry in state.optimizer.state_dict()["state"].items():
        for name, tensor in entry.items():
            parts[f"adam.{index}.{name}"] = tensor.numpy().tobytes()
    return parts


@pytest.fixture(scope="module")
def reference() -> list[dict[str, Any]]:
    """Fingerprints of an uninterrupted run after 0, 1, ..., STEPS steps."""
    state = init()
    prints = [_fingerprint(state)]
    for step in range(STEPS):
        train(state, step)
        prints.append(_fingerprint(state))
    return prints


def _adam_steps(state: State) -> set[int]:
    return {int(entry["step"]) for entry in state.optimizer.state.values()}


def _check_snapshots(url: str, reference: list[dict[str, Any]]) -> list[int]:
    """Assert the invariants of every committed snapshot; return their steps."""
    archive = Archive(Storage.open(url), train.program)
    steps = []
    for entry in archive.listing():
        assert entry.manifest is not None, entry.problem
        loaded = archive.read(entry.manifest)
        state = init()
        history = decode_snapshot(state, loaded.tree, loaded.buffers)
        invariants = (state.step, _adam_steps(state) or {0}, len(history))
        assert (entry.manifest.step, {state.step}, state.step) == invariants
        assert reference[state.step] == _fingerprint(state), entry.name
        steps.append(state.step)
    return sorted(steps)


def _expected_commits(stopped_at: int, every: int = EVERY) -> list[int]:
    """
    The periodic snapshots up to where the run stopped, and one there (none where
    it stopped before the first step: there is nothing to save).
    """
    periodic = set(range(every, stopped_at + 1, every))
    return sorted(periodic | ({stopped_at} if stopped_at else set()))


@attrs.define
class Trial:
    result: resumable.Result[State]
    seconds: float
    # The phase the step was in when each signal reached the handler.
    caught: list[str]
    # Signals the Timer sent (none where the run ended first).
    sent: int


def _run_trial(url: str, at: float | None = None, *, background: bool = True) -> Trial:
    """Run to the end or the stop, with SIGTERM ``at`` seconds in (Timer) if given."""
    caught: list[str] = []
    sent: list[float] = []

    def send() -> None:
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGTERM)

    def record(signum: int, frame: FrameType | None) -> None:
        caught.append(PHASE["phase"])

    previous = signal.signal(signal.SIGTERM, record)
    timer = None
    if at is not None:
        timer = threading.Timer(at, send)
    started = time.monotonic()
    try:
        if timer is not None:
            timer.start()
        result = resumable.run(train, storage=url, background=background)
        seconds = time.monotonic() - started
        PHASE.update(phase="after the run", step=-1)
    finally:
        if timer is not None:
            timer.cancel()
            timer.join()
        # A signal that came after the run is handled here, by record().
        time.sleep(0.01)
        signal.signal(signal.SIGTERM, previous)
        TRIGGER.clear()
    return Trial(result, seconds, caught, len(sent))


def _resume_to_end(url: str, reference: list[dict[str, Any]]) -> None:
    """Run again without a signal; the end state is the uninterrupted one."""
    trial = _run_trial(url)

    assert (STEPS, False) == (trial.result.step, trial.result.preempted)
    assert reference[STEPS] == _fingerprint(trial.result.state)


@pytest.mark.usefixtures("throttled_storage")
@pytest.mark.parametrize(
    ("phase", "step", "stops_at", "background"),
    [
        ("forward", 5, 6, True),
        ("backward", 5, 6, True),
        ("backward", 0, 1, True),
        ("optimizer", 5, 6, True),
        ("optimizer", 7, 8, True),
        # Periodic saves in the loop's time: the phase "save" is one of the loop.
        ("save", 4, 4, False),
        ("save", 8, 8, False),
    ],
)
def test_b11_signal_inside_a_phase_snapshots_at_the_next_step_boundary(
    tmp_path: Path,
    reference: list[dict[str, Any]],
    phase: str,
    step: int,
    stops_at: int,
    background: bool,
) -> None:
    """A signal inside any phase only sets a flag; the snapshot follows the step."""
    url = f"file://{tmp_path}/store"
    TRIGGER.update(phase=phase, step=step)
    trial = _run_trial(url, background=background)

    assert [phase] == trial.caught
    assert (stops_at, True) == (trial.result.step, trial.result.preempted)
    assert _expected_commits(stops_at) == _check_snapshots(url, reference)
    _resume_to_end(url, reference)
    after = set(_expected_commits(stops_at)) | set(_expected_commits(STEPS))
    assert sorted(after) == _check_snapshots(url, reference)


@pytest.mark.usefixtures("throttled_storage")
@pytest.mark.parametrize("step", [4, 8])
def test_b11_signal_during_a_background_save_stops_at_a_later_boundary(
    tmp_path: Path, reference: list[dict[str, Any]], step: int
) -> None:
    """
    A signal while a periodic snapshot is written in the background lets it
    commit, then stops at the loop's next step boundary with a snapshot there
    (a run that reached its last step by then finishes).
    """
    url = f"file://{tmp_path}/store"
    TRIGGER.update(phase="save", step=step)
    trial = _run_trial(url)
    stopped = trial.result.step

    assert (1, stopped < STEPS) == (len(trial.caught), trial.result.preempted)
    assert step < stopped <= STEPS
    assert _expected_commits(stopped) == _check_snapshots(url, reference)
    _resume_to_end(url, reference)


@pytest.mark.usefixtures("throttled_storage")
def test_b11_signal_at_random_moments_leaves_consistent_snapshots(
    tmp_path: Path, reference: list[dict[str, Any]]
) -> None:
    """SIGTERM at random moments: snapshots hold, no trial hangs, resume is exact."""
    timings = [_run_trial(f"file://{tmp_path}/timing-{number}") for number in range(2)]
    assert [(STEPS, [])] * 2 == [(run.result.step, run.caught) for run in timings]
    rng = random.Random(11)
    landed = 0
    for number in range(RANDOM_TRIALS):
        url = f"file://{tmp_path}/trial-{number}"
        trial = _run_trial(url, at=rng.uniform(0, timings[-1].seconds))
        result = trial.result
        stopped = result.step if result.preempted else STEPS
        landed += trial.sent

        assert trial.seconds < TRIAL_LIMIT
        assert trial.sent == len(trial.caught)
        assert _expected_commits(stopped) == _check_snapshots(url, reference)
        if number % RESUME_EVERY == 0:
            _resume_to_end(url, reference)
    assert landed >= RANDOM_TRIALS // 2


# Subprocess trials: a real process, a real SIGTERM, and a second one 1 s later.

SCRIPT = Path(__file__).parent / "scripts" / "case_b11_train.py"
SUB_STEPS = 12
SUB_EVERY = 4
PHASE_SLEEP = 0.01
SLOW_SAVE_SECONDS = 1.6
SECOND_SIGNAL_AFTER = 1.0
# Longest wait for a process or an event; far above what any of them needs.
PATIENCE = 60.0


def _import_script() -> ModuleType:
    """Import the script for its State, init() and digest(), torch threads kept."""
    threads = torch.get_num_threads()
    spec = importlib.util.spec_from_file_location("case_b11_train", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.set_num_threads(threads)
    return module


class SubRun:
    """One storage folder, and the processes of the script that ran on it."""

    def __init__(self, folder: Path, **env: object) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.storage = folder / "snapshots"
        self.progress = folder / "progress.txt"
        self.env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RESUMABLE_", "B11_"))
        }
        self.env.update(
            OMP_NUM_THREADS="1",
            B11_STEPS=str(SUB_STEPS),
            B11_EVERY=str(SUB_EVERY),
            B11_PROGRESS=str(self.progress),
        )
        self.env.update({key: str(value) for key, value in env.items()})
        self.logs: list[Path] = []

    def start(self) -> subprocess.Popen[bytes]:
        log = self.folder / f"incarnation-{len(self.logs)}.log"
        self.logs.append(log)
        command = [sys.executable, "-m", "resumable", str(SCRIPT)]
        with open(log, "wb") as output:
            return subprocess.Popen(
                [*command, "--storage", str(self.storage)],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.folder,
            )

    def lines(self) -> list[str]:
        try:
            return self.progress.read_text().splitlines()
        except FileNotFoundError:
            return []

    def wait_for_commit(self, step: int, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + PATIENCE
        storage = Storage.open(str(self.storage), create=False)
        while step not in {parse_snapshot_name(name) for name in storage.committed()}:
            assert process.poll() is None, f"exited before {step}: {self.log()}"
            assert time.monotonic() < deadline, f"no snapshot {step} in {PATIENCE} s"
            time.sleep(0.002)

    def wait_for(self, line: str, process: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + PATIENCE
        while line not in self.lines():
            assert process.poll() is None, f"exited before {line!r}: {self.log()}"
            assert time.monotonic() < deadline, f"no {line!r} in {PATIENCE} s"
            time.sleep(0.002)

    def log(self) -> str:
        return self.logs[-1].read_text(errors="replace")

    def commits(self) -> dict[str, bytes]:
        """Each committed snapshot's name and manifest bytes."""
        storage = Storage.open(str(self.storage))
        return {name: storage.read_manifest(name) for name in storage.committed()}

    def uncommitted(self) -> list[str]:
        return Storage.open(str(self.storage)).uncommitted()


def _wait(process: subprocess.Popen[bytes], limit: float = PATIENCE) -> int | None:
    """Wait for the exit; end the process (ours) if it hangs, and say so."""
    try:
        return process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return None


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return _import_script()


@pytest.fixture(scope="module")
def trace(
    tmp_path_factory: pytest.TempPathFactory, script: ModuleType
) -> list[dict[str, Any]]:
    """The digest after 0, 1, ..., SUB_STEPS steps of an uninterrupted process."""
    folder = tmp_path_factory.mktemp("b11-reference")
    path = folder / "trace.jsonl"
    run = SubRun(folder, B11_TRACE=path)
    assert 0 == _wait(run.start()), run.log()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert list(range(SUB_STEPS + 1)) == [line["step"] for line in lines]
    return lines


def _check_sub_snapshots(
    run: SubRun, script: ModuleType, trace: list[dict[str, Any]]
) -> list[int]:
    """Assert the invariants of every committed snapshot; return their steps."""
    archive = Archive(Storage.open(str(run.storage)), "case_b11_train.py:train")
    steps = []
    for entry in archive.listing():
        assert entry.manifest is not None, entry.problem
        loaded = archive.read(entry.manifest)
        state = script.init()
        decode_snapshot(state, loaded.tree, loaded.buffers)
        found = script.digest(state)
        expected = trace[state.step]

        assert entry.manifest.step == state.step
        assert [state.step] * len(found["adam_steps"]) == found["adam_steps"]
        assert expected == found, entry.name
        steps.append(state.step)
    return sorted(steps)


def _resume_sub(run: SubRun, script: ModuleType, trace: list[dict[str, Any]]) -> None:
    """Run the same command again: it finishes, and every snapshot holds."""
    process = run.start()

    assert 0 == _wait(process), run.log()
    assert SUB_STEPS == max(_check_sub_snapshots(run, script, trace))


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(2))
def test_b11_sigterm_inside_a_step_of_a_process(
    tmp_path: Path, script: ModuleType, trace: list[dict[str, Any]], trial: int
) -> None:
    """A real SIGTERM at a random moment of a step: exit 1, snapshot at its end."""
    rng = random.Random(trial)
    step = rng.choice([2, 5, 6, 9])
    run = SubRun(tmp_path, B11_PHASE_SLEEP=PHASE_SLEEP)
    process = run.start()
    try:
        run.wait_for(f"step {step}", process)
        time.sleep(rng.uniform(0, 3 * PHASE_SLEEP))
        process.send_signal(signal.SIGTERM)
    finally:
        returncode = _wait(process)
    assert 1 == returncode, run.log()
    commits = _check_sub_snapshots(run, script, trace)

    assert max(commits) in (step + 1, step + 2)
    assert _expected_commits(max(commits), SUB_EVERY) == commits
    if trial == 0:
        _resume_sub(run, script, trace)


@pytest.mark.slow
def test_b11_sigterm_during_a_periodic_save_of_a_process(
    tmp_path: Path, script: ModuleType, trace: list[dict[str, Any]]
) -> None:
    """A SIGTERM during a slow periodic save: it completes, no other save follows."""
    # A periodic save in the loop's time; test_crash_resume.py has the background
    # one of a process.
    run = SubRun(
        tmp_path,
        B11_SLOW_SAVES=8,
        B11_SAVE_SECONDS=SLOW_SAVE_SECONDS,
        RESUMABLE_BACKGROUND=0,
    )
    process = run.start()
    try:
        run.wait_for("save 8", process)
        time.sleep(SLOW_SAVE_SECONDS / 3)
        process.send_signal(signal.SIGTERM)
    finally:
        returncode = _wait(process)

    assert 1 == returncode, run.log()
    assert [4, 8] == _check_sub_snapshots(run, script, trace)
    _resume_sub(run, script, trace)


# Where the second signal lands: the settings that make that moment slow, and the
# progress line after which the first signal goes.
SECOND_SIGNAL: dict[str, tuple[dict[str, object], str]] = {
    # Paced steps: the first signal lands in step 5 or 6, whose final save is slow.
    "final save": (
        {
            "B11_PHASE_SLEEP": PHASE_SLEEP,
            "B11_SLOW_SAVES": "6,7,8",
            "B11_SAVE_SECONDS": SLOW_SAVE_SECONDS,
        },
        "step 5",
    ),
    "periodic save": (
        {"B11_SLOW_SAVES": 8, "B11_SAVE_SECONDS": SLOW_SAVE_SECONDS},
        "save 8",
    ),
    # Step 5 sleeps after optimizer.step(), before its counter moves.
    "step": (
        {"B11_SLOW_STEP": 5, "B11_SLOW_STEP_SLEEP": 3 * SECOND_SIGNAL_AFTER},
        "step 5",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("where", list(SECOND_SIGNAL))
def test_b11_second_sigterm_exits_and_leaves_commits_untouched(
    tmp_path: Path, script: ModuleType, trace: list[dict[str, Any]], where: str
) -> None:
    """A second SIGTERM 1 s later exits 1 at once; the commits stay as they were."""
    settings, wait_line = SECOND_SIGNAL[where]
    run = SubRun(tmp_path, **settings)
    process = run.start()
    try:
        run.wait_for(wait_line, process)
        # Snapshot 4 may still be written in the background as step 5 starts.
        run.wait_for_commit(4, process)
        before = run.commits()
        process.send_signal(signal.SIGTERM)
        time.sleep(SECOND_SIGNAL_AFTER)
        running = process.poll() is None
        if running:
            process.send_signal(signal.SIGTERM)
        escalated = time.monotonic()
        returncode = _wait(process)
        exit_seconds = time.monotonic() - escalated
    finally:
        _wait(process)

    assert (True, 1) == (running, returncode), run.log()
    assert exit_seconds < SECOND_SIGNAL_AFTER
    assert "second signal, exiting now" in run.log()
    assert before == run.commits()
    assert (where != "step") == bool(run.uncommitted())
    assert [4] == _check_sub_snapshots(run, script, trace)
    _resume_sub(run, script, trace)
