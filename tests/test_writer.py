"""
Tests of the background writer (``resumable._writer``) and of the runtime's
snapshots written through it: at most one in flight, the loop waits for it, a
snapshot holds the state of its own step whatever the next step changes, and a
failure reaches the loop once, as the error that the write raised.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import Any

import attrs
import numpy as np
import pytest
import torch

import resumable
from resumable import testing
from resumable._archive import Archive
from resumable._preemption import Preemption
from resumable._settings import Settings
from resumable._snapshot import DATA_OBJECT, parse_snapshot_name
from resumable._staging import Stager
from resumable._state import decode_snapshot
from resumable._storage import Storage
from resumable._writer import BackgroundWriter

# -- The writer alone ---------------------------------------------------------------


def test_job_runs_in_another_thread_and_flush_waits_for_it() -> None:
    """A submitted job runs in the writer's thread; flush returns once it is done."""
    writer = BackgroundWriter()
    ran: list[str] = []

    def job() -> None:
        time.sleep(0.05)
        ran.append(threading.current_thread().name)

    writer.submit(job, "job")
    writer.flush()
    writer.close()

    assert ["resumable-writer"] == ran


def test_submit_waits_for_the_job_in_flight() -> None:
    """A second job starts only after the first ended: never two in flight."""
    writer = BackgroundWriter()
    events: list[str] = []

    def job(name: str) -> None:
        events.append(f"{name} starts")
        time.sleep(0.05)
        events.append(f"{name} ends")

    writer.submit(lambda: job("first"), "first")
    writer.submit(lambda: job("second"), "second")
    events.append("second submitted")
    writer.close()

    expected = ["first starts", "first ends", "second submitted", "second ends"]
    assert expected == [event for event in events if event != "second starts"]
    assert events.index("first ends") < events.index("second starts")


def test_failure_is_raised_once_as_the_original_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A job's exception is raised by the next flush, that very one, and logged once."""
    writer = BackgroundWriter()
    error = ValueError("broken write")

    def job() -> None:
        raise error

    writer.submit(job, "snapshot of step 3")
    with pytest.raises(ValueError, match="broken write") as caught:
        writer.flush()
    writer.flush()
    writer.close()

    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert error is caught.value
    assert 1 == len(errors)
    assert "what=snapshot of step 3" in errors[0]


def test_failure_is_raised_by_the_next_submit_which_runs_nothing() -> None:
    """Submitting after a failure raises it, and the new job does not run."""
    writer = BackgroundWriter()
    ran: list[str] = []

    def failing() -> None:
        raise OSError("disk gone")

    writer.submit(failing, "first")
    with pytest.raises(OSError, match="disk gone"):
        writer.submit(lambda: ran.append("second"), "second")
    writer.close()

    assert [] == ran


def test_close_raises_a_failure_not_yet_told() -> None:
    """Closing raises a failure that the loop has not seen, and ends the thread."""
    writer = BackgroundWriter()

    def failing() -> None:
        raise KeyError("lost")

    writer.submit(failing, "job")
    with pytest.raises(KeyError):
        writer.close()

    assert not any(t.name == "resumable-writer" for t in threading.enumerate())


def test_writer_thread_blocks_stop_signals() -> None:
    """Stop signals never go to the writer's thread, which may sit in a long write."""
    writer = BackgroundWriter([signal.SIGTERM, signal.SIGUSR1])
    masks: list[set[signal.Signals]] = []

    writer.submit(
        lambda: masks.append(signal.pthread_sigmask(signal.SIG_BLOCK, [])), ""
    )
    writer.close()

    assert {signal.SIGTERM, signal.SIGUSR1} <= masks[0]


# -- Snapshots written in the background ----------------------------------------------


@attrs.define
class Changing:
    """A tensor, an array, a list and a counter, all changed in place each step."""

    weights: torch.Tensor
    array: np.ndarray
    values: list[int]
    step: int = 0


def _init() -> Changing:
    return Changing(torch.zeros(2**16), np.zeros(1000), [])


# (what, step) as it happens: steps starting, writes of data.bin, commits.
EVENTS: list[tuple[str, int]] = []
# Whether a step changed the state while a data.bin write was in flight.
WRITING = threading.Event()
OVERLAPPED: list[bool] = []


@resumable.step(init=_init, steps=6, every=1, keep=10)
def change(state: Changing, step: int) -> None:
    EVENTS.append(("step", step))
    # Long enough for the write of the snapshot before to reach data.bin.
    time.sleep(0.02)
    state.weights.fill_(step + 1)
    state.array[...] = step + 1
    state.values.append(step + 1)
    state.step += 1
    OVERLAPPED.append(WRITING.is_set())


@pytest.fixture
def slow_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Write data.bin late (a pause before the bytes are read) and record it."""
    EVENTS.clear()
    OVERLAPPED.clear()
    write_object, commit = Storage.write_object, Storage.commit

    def slow(self: Storage, snapshot: str, name: str, chunks: Any) -> int:
        if name != DATA_OBJECT:
            return write_object(self, snapshot, name, chunks)
        step = parse_snapshot_name(snapshot) or 0
        EVENTS.append(("write starts", step))
        WRITING.set()
        try:
            time.sleep(0.06)
            return write_object(self, snapshot, name, chunks)
        finally:
            WRITING.clear()
            EVENTS.append(("write ends", step))

    def committing(self: Storage, snapshot: str, manifest: bytes) -> None:
        commit(self, snapshot, manifest)
        EVENTS.append(("commit", parse_snapshot_name(snapshot) or 0))

    monkeypatch.setattr(Storage, "write_object", slow)
    monkeypatch.setattr(Storage, "commit", committing)


def _snapshots(url: str) -> dict[int, Changing]:
    """The state in each committed snapshot, by its step."""
    archive = Archive(Storage.open(url), change.program)
    states = {}
    for entry in archive.listing():
        assert entry.manifest is not None, entry.problem
        loaded = archive.read(entry.manifest)
        state = _init()
        decode_snapshot(state, loaded.tree, loaded.buffers)
        states[entry.manifest.step] = state
    return states


def _summary(state: Changing) -> tuple[set[float], set[float], list[int], int]:
    return (
        set(state.weights.tolist()),
        set(state.array.tolist()),
        list(state.values),
        state.step,
    )


@pytest.mark.usefixtures("slow_writes")
def test_next_step_changes_never_reach_the_snapshot_in_flight() -> None:
    """Each snapshot holds its step's state, bit for bit, while the next step ran."""
    url = testing.memory_storage()

    resumable.run(change, storage=url)

    expected = {
        step: ({float(step)}, {float(step)}, list(range(1, step + 1)), step)
        for step in range(1, 7)
    }
    actual = {step: _summary(state) for step, state in _snapshots(url).items()}
    assert expected == actual
    assert any(OVERLAPPED)


@pytest.mark.usefixtures("slow_writes")
def test_loop_waits_for_the_write_in_flight_before_the_next() -> None:
    """The writes never overlap, and a step starts only after the write two back."""
    resumable.run(change, storage=testing.memory_storage())

    starts_and_ends = [what for what, _ in EVENTS if what.startswith("write")]
    assert ["write starts", "write ends"] * 6 == starts_and_ends
    for step in range(1, 5):
        assert EVENTS.index(("commit", step)) < EVENTS.index(("step", step + 1))


class Injected(RuntimeError):
    """The fault put into the storage."""


@pytest.mark.parametrize("where", ["write_object", "commit"])
def test_background_failure_is_raised_once_and_the_snapshot_before_stays(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """A failed background write stops the loop with its error; step 2 stays newest."""
    url = testing.memory_storage()
    fault = Injected(f"{where} failed")
    original = getattr(Storage, where)

    def failing(self: Storage, snapshot: str, *args: Any) -> Any:
        if parse_snapshot_name(snapshot) == 3:
            raise fault
        return original(self, snapshot, *args)

    caplog.set_level(logging.INFO, logger="resumable")
    monkeypatch.setattr(Storage, where, failing)
    with pytest.raises(Injected) as caught:
        resumable.run(change, storage=url)
    monkeypatch.setattr(Storage, where, original)
    failed = [r for r in caplog.records if r.levelno >= logging.ERROR]
    newest = max(_snapshots(url))
    resumed = testing.run_steps(change, storage=url)

    assert fault is caught.value
    assert (1, 2) == (len(failed), newest)
    assert "resumed: step=2," in caplog.text
    assert [] == testing.diff_states(testing.run_steps(change).state, resumed.state)


@pytest.mark.usefixtures("slow_writes")
def test_step_error_waits_for_the_write_in_flight() -> None:
    """A step that raises lets the background write before it commit, then raises."""
    url = testing.memory_storage()

    def broken(state: Changing, step: int) -> None:
        if step == 2:
            raise Injected("step failed")
        change(state, step)

    with pytest.raises(Injected):
        resumable.run(resumable.step(init=_init, steps=6, every=1)(broken), storage=url)

    assert [1, 2] == sorted(_snapshots(url))


@pytest.mark.usefixtures("slow_writes")
def test_stop_waits_for_the_write_in_flight_then_budgets_what_is_left(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stop request waits for the background write; the grace it took is spent."""
    seen: list[tuple[float, bool]] = []
    write_fits = Preemption.write_fits

    def spy(self: Preemption) -> tuple[bool, str]:
        seen.append((self.stop.elapsed(), ("commit", 2) in EVENTS))
        return write_fits(self)

    monkeypatch.setattr(Preemption, "write_fits", spy)
    url = testing.memory_storage()

    # Stopped after step 3, which takes no snapshot of the cadence.
    result = testing.run_preempted(change, 2, storage=url, every=2)

    assert (3, True) == (result.step, result.preempted)
    assert [2, 3] == sorted(_snapshots(url))
    [(elapsed, committed)] = seen
    assert committed
    assert elapsed >= 0.03


@pytest.mark.usefixtures("slow_writes")
def test_simulated_kill_lands_after_the_background_write_commits() -> None:
    """run_killed after step k leaves snapshot k committed, as a kill right after."""
    url = testing.memory_storage()

    testing.run_killed(change, 3, storage=url)

    assert [1, 2, 3] == sorted(_snapshots(url))
    testing.assert_resumes_identically(change, kill_after=[2, 4])


def test_background_off_writes_every_snapshot_in_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RESUMABLE_BACKGROUND=0 starts no writer thread; an argument overrides it."""
    threads: list[set[str]] = []

    def spy(state: Changing, step: int) -> None:
        threads.append({thread.name for thread in threading.enumerate()})

    step = resumable.step(init=_init, steps=3, every=1)(spy)
    monkeypatch.setenv("RESUMABLE_BACKGROUND", "0")
    resumable.run(step, storage=testing.memory_storage())
    off = threads[:]
    threads.clear()
    resumable.run(step, storage=testing.memory_storage(), background=True)

    assert not any("resumable-writer" in names for names in off)
    assert "resumable-writer" in threads[-1]
    assert not Settings.resolve(step).background


@pytest.mark.parametrize("where", ["reserve", "stage"])
def test_staging_memory_that_cannot_be_had_falls_back_to_writes_in_the_loop(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    """An allocation that fails warns once and the run ends as one without staging."""
    url = testing.memory_storage()

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: 268435456")

    monkeypatch.setattr(Stager, where, refuse)
    caplog.set_level(logging.WARNING, logger="resumable")
    result = resumable.run(change, storage=url)
    warnings = [r.getMessage() for r in caplog.records if "staging" in r.getMessage()]
    blocking = resumable.run(change, storage=testing.memory_storage(), background=False)

    assert (True, 1) == (result.finished, len(warnings))
    assert "RESUMABLE_BACKGROUND=0" in warnings[0]
    assert [1, 2, 3, 4, 5, 6] == sorted(_snapshots(url))
    assert [] == testing.diff_states(blocking.state, result.state)
