"""
Tests of ``resumable._preemption`` and the runtime's answer to a stop request: the
grace budget and its estimates, the snapshot at a step boundary (and none twice),
the final snapshot skipped when it cannot finish in time, and max_attempts.
"""

from __future__ import annotations

import logging
import signal
import time
from typing import Any

import attrs
import pytest
import torch

import resumable
from resumable import _preemption
from resumable._archive import Archive
from resumable._preemption import Preemption
from resumable._settings import Settings
from resumable._storage import Storage
from resumable.errors import NoProgressError
from resumable.testing import (
    assert_resumes_identically,
    memory_storage,
    run_killed,
    run_preempted,
    run_steps,
)


@pytest.fixture(autouse=True)
def clean_process(monkeypatch):
    """No RESUMABLE_* variables, no plan for ``work``, handlers put back after."""
    for name in ("STORAGE", "STEPS", "EVERY", "KEEP", "GRACE", "SIGNALS"):
        monkeypatch.delenv(f"RESUMABLE_{name}", raising=False)
    monkeypatch.delenv("RESUMABLE_PREEMPTED_EXIT_CODE", raising=False)
    monkeypatch.delenv("RESUMABLE_MAX_ATTEMPTS", raising=False)
    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    saved = {signum: signal.getsignal(signum) for signum in stops}
    PLAN.clear()
    yield
    PLAN.clear()
    for signum, handler in saved.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


@pytest.fixture
def log(caplog):
    """Capture the package's log records, however its logger is configured."""
    package = logging.getLogger("resumable")
    level = package.level
    package.addHandler(caplog.handler)
    package.setLevel(logging.DEBUG)
    yield caplog
    package.removeHandler(caplog.handler)
    package.setLevel(level)


def preemption(grace: float = 30.0) -> Preemption:
    """A Preemption of a run with ``grace``, its handlers not installed."""
    settings = Settings(
        storage="memory://unused", steps=1, every=1, keep=1, grace=grace
    )
    return Preemption(settings)


# --- the grace budget ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("grace", "deadline"), [(30.0, 28.0), (100.0, 98.0), (10.0, 9.0), (1.0, 0.9)]
)
def test_deadline_keeps_a_tenth_of_the_grace_at_most_two_seconds(grace, deadline):
    """The deadline leaves min(2 s, grace / 10) of the grace period for exiting."""
    assert deadline == pytest.approx(preemption(grace).deadline)


def test_first_write_is_estimated_from_the_state_bytes():
    """Before any write is timed, the estimate is state bytes at 50 MB/s plus 0.5 s."""
    budget = preemption(30.0)
    budget.state_bytes = 100_000_000

    fits, reason = budget.write_fits()

    assert (True, "estimated 2.50s") == (fits, reason[:15])


def test_first_write_of_a_huge_state_does_not_fit():
    """A state whose bytes take longer than the deadline at 50 MB/s does not fit."""
    budget = preemption(30.0)
    budget.state_bytes = 1_400_000_000  # 28 s at 50 MB/s, plus the pad

    assert False is budget.write_fits()[0]


def test_timed_writes_replace_the_state_bytes_estimate():
    """Once a write is timed, its time counts, not the size of the state."""
    budget = preemption(30.0)
    budget.state_bytes = 10**12
    budget.record_write(0.1)

    fits, reason = budget.write_fits()

    assert (True, "estimated 0.40s") == (fits, reason[:15])


def test_the_slowest_recent_write_counts():
    """The estimate is the slowest of the recent writes times 1.5, plus 0.25 s."""
    budget = preemption(30.0)
    for seconds in (0.5, 2.0, 0.1):
        budget.record_write(seconds)

    assert "estimated 3.25s" == budget.write_fits()[1][:15]


@pytest.mark.parametrize(("spent", "fits"), [(7.0, True), (7.5, False)])
def test_time_since_the_signal_is_taken_off_the_budget(spent, fits):
    """What is left is the deadline less the time since the first request."""
    budget = preemption(10.0)  # deadline 9 s
    budget.record_write(1.0)  # estimate 1.75 s
    budget.stop.request(signal.SIGTERM)
    budget.stop.since = time.monotonic() - spent

    assert fits is budget.write_fits()[0]


def test_reason_names_estimate_time_left_and_grace():
    """The reason says the estimate, the seconds left and the grace period."""
    budget = preemption(10.0)
    budget.record_write(1.0)

    assert "estimated 1.75s, 9.00s left of grace 10s" == budget.write_fits()[1]


def test_cause_names_the_signal_or_a_simulation():
    """The cause is the first signal's name, or "simulated" for resumable.testing."""
    simulated, real = preemption(), preemption()
    simulated.stop.request(None)
    real.stop.request(signal.SIGTERM)
    real.stop.request(signal.SIGUSR1)

    assert ("simulated", "SIGTERM") == (simulated.cause(), real.cause())


def test_simulated_stop_comes_only_at_its_step_and_item():
    """check_simulated requests a stop at the chosen (step, item) and nowhere else."""
    budget = preemption()
    budget.simulate = (2, None, 3)
    seen = []
    for index, item in [(1, 3), (2, None), (2, 2), (3, 3), (2, 3)]:
        budget.check_simulated(index, 0, item)
        seen.append(budget.requested)

    assert [False, False, False, False, True] == seen


def test_simulated_stop_in_a_chosen_loop_skips_other_loops():
    """With a loop chosen, the same item number in another loop requests nothing."""
    budget = preemption()
    budget.simulate = (2, 1, 3)
    seen = []
    for loop in (0, 1):
        budget.check_simulated(2, loop, 3)
        seen.append(budget.requested)

    assert [False, True] == seen


# --- the runtime at a stop request -------------------------------------------------


@attrs.define
class Work:
    weights: torch.Tensor = attrs.Factory(lambda: torch.zeros(1000))
    done: list[int] = attrs.Factory(list)


# {"signal_at": step}: ``work`` sends itself SIGUSR1 during that step.
PLAN: dict[str, Any] = {}


@resumable.step(init=Work, steps=5, every=1, keep=10)
def work(state: Work, step: int) -> dict[str, float]:
    if PLAN.get("signal_at") == step:
        signal.raise_signal(signal.SIGUSR1)
    for item in resumable.iterate(range(3)):
        state.weights += step * 10 + item
    state.done.append(step)

    return {"sum": float(state.weights.sum())}


def committed(storage: str) -> list[tuple[int, Any]]:
    """Return (step, inside_step) of each committed snapshot, newest first."""
    archive = Archive(Storage.open(storage), work.program)

    return [(entry.step, entry.manifest.inside_step) for entry in archive.listing()]


def test_stop_at_a_step_end_snapshots_there_and_returns_preempted():
    """A stop at the end of step 1 with every=3 snapshots step 2 and ends the run."""
    storage = memory_storage()

    result = run_preempted(work, 1, storage=storage, every=3)

    assert (True, 2, False) == (result.preempted, result.step, result.finished)
    assert [0, 1] == result.state.done
    assert [(2, None)] == committed(storage)


def test_run_stopped_at_a_step_end_resumes_identically():
    """Runs stopped at step ends, then resumed, end bit-identical to one run."""
    assert_resumes_identically(work, preempt_at=[(0, None), (2, None)], every=3)


def test_stop_right_after_a_cadence_snapshot_writes_no_second(log):
    """When the step's end already committed a snapshot, the stop writes none."""
    storage = memory_storage()

    result = run_preempted(work, 1, storage=storage, every=1)

    assert (True, 2) == (result.preempted, result.step)
    assert [(2, None), (1, None)] == committed(storage)


def test_stop_during_the_last_step_finishes_the_run():
    """A stop in the last step lets it finish: the run ends finished, not preempted."""
    storage = memory_storage()

    result = run_preempted(work, 4, storage=storage, every=3)

    assert (False, 5, True) == (result.preempted, result.step, result.finished)
    assert [5, 3] == [step for step, _ in committed(storage)]


def test_result_of_an_uninterrupted_run_is_not_preempted():
    """A run with no stop request ends with preempted False."""
    assert False is run_steps(work).preempted


def test_preempted_log_says_cause_step_and_outcome(log):
    """The INFO line names the cause, the step and that the snapshot was committed."""
    PLAN["signal_at"] = 1
    resumable.run(work, storage=memory_storage(), every=10)

    # The capture handler sees each record twice: count distinct lines.
    lines = sorted({line for line in log.messages if line.startswith("preempted:")})
    assert 1 == len(lines)
    assert lines[0].startswith("preempted: cause=SIGUSR1, step=1, loop=0, item=1, ")
    assert "snapshot committed (estimated" in lines[0]


# --- snapshots that cannot finish in time -------------------------------------------


@pytest.fixture
def slow_writes(monkeypatch):
    """Make every snapshot write take 1.3 s longer, as on a slow storage."""
    original = Archive.write

    def write(self, *arguments, **options):
        time.sleep(1.3)
        return original(self, *arguments, **options)

    monkeypatch.setattr(Archive, "write", write)


@pytest.fixture
def slow_throughput(monkeypatch):
    """Make the first-write estimate assume 1 byte a second: nothing fits."""
    monkeypatch.setattr(_preemption, "_ASSUMED_THROUGHPUT", 1.0)


@resumable.step(init=Work, steps=5, every=2, keep=10)
def plain_work(state: Work, step: int) -> None:
    """``work`` without safe points inside the step."""
    if PLAN.get("signal_at") == step:
        signal.raise_signal(signal.SIGUSR1)
    state.weights += step
    state.done.append(step)


def plain_committed(storage: str) -> list[int]:
    archive = Archive(Storage.open(storage), plain_work.program)

    return [entry.step for entry in archive.listing()]


def test_signal_during_the_last_step_finishes_the_run():
    """A signal in a last step without safe points lets the run end finished."""
    PLAN["signal_at"] = 4
    storage = memory_storage()

    result = resumable.run(plain_work, storage=storage)

    assert (False, True, 5) == (result.preempted, result.finished, result.step)
    assert [5, 4, 2] == plain_committed(storage)


def test_final_snapshot_skipped_when_timed_writes_say_it_cannot_finish(
    slow_writes, log
):
    """After a 1.3 s write, a 2 s grace has no room: the last good snapshot stays."""
    PLAN["signal_at"] = 2
    storage = memory_storage()

    result = resumable.run(plain_work, storage=storage, grace=2.0)

    assert (True, [2]) == (result.preempted, plain_committed(storage))
    warnings = {r.getMessage() for r in log.records if r.levelno == logging.WARNING}
    assert ["final snapshot skipped: estimated"] == [
        message[:33] for message in warnings
    ]
    assert any(
        line.startswith("preempted: cause=SIGUSR1, step=3, snapshot skipped")
        for line in log.messages
    )


def test_final_snapshot_skipped_when_the_state_is_too_big(slow_throughput, log):
    """With no write timed yet, the state's size decides; the skip is logged."""
    PLAN["signal_at"] = 0
    storage = memory_storage()

    result = resumable.run(plain_work, storage=storage, every=10)

    assert (True, 1, []) == (result.preempted, result.step, plain_committed(storage))
    assert any("final snapshot skipped" in line for line in log.messages)


def test_snapshot_inside_a_step_is_skipped_when_it_cannot_finish(slow_throughput):
    """A stop at a safe point inside a step also skips a write that cannot finish."""
    storage = memory_storage()

    result = run_preempted(work, 1, 2, storage=storage, every=10)

    assert (True, 1, []) == (result.preempted, result.step, committed(storage))


def test_cadence_snapshot_after_a_stop_respects_the_grace(slow_throughput, log):
    """A snapshot due by cadence after a stop is not started if it cannot end."""
    PLAN["signal_at"] = 1
    storage = memory_storage()

    result = resumable.run(plain_work, storage=storage, every=2)

    assert (True, []) == (result.preempted, plain_committed(storage))
    assert any("final snapshot skipped" in line for line in log.messages)


# --- max_attempts -------------------------------------------------------------------


def test_resuming_too_often_from_one_snapshot_raises_no_progress():
    """With max_attempts 2, a third start from one snapshot raises NoProgressError."""
    storage = memory_storage()
    run_killed(work, 3, storage=storage, every=3, max_attempts=2)
    run_killed(work, 4, storage=storage, every=3, max_attempts=2)
    run_killed(work, 4, storage=storage, every=3, max_attempts=2)

    with pytest.raises(NoProgressError, match=r"started 2 times from snapshot step-"):
        run_killed(work, 4, storage=storage, every=3, max_attempts=2)
    assert [0, 1, 2] == resumable.load(work, storage=storage).done


def test_max_attempts_argument_of_run_is_used():
    """resumable.run(max_attempts=1) refuses a second start from one snapshot."""
    storage = memory_storage()
    run_killed(work, 3, storage=storage, every=3)
    run_killed(work, 4, storage=storage, every=3)

    with pytest.raises(NoProgressError):
        resumable.run(work, storage=storage, every=3, max_attempts=1)


def test_a_newer_snapshot_starts_the_count_again():
    """Starts are counted per snapshot: progress to a new one allows new starts."""
    storage = memory_storage()
    run_killed(work, 3, storage=storage, steps=9, every=3, max_attempts=2)
    run_killed(work, 4, storage=storage, steps=9, every=3, max_attempts=2)
    run_killed(work, 6, storage=storage, steps=9, every=3, max_attempts=2)
    run_killed(work, 7, storage=storage, steps=9, every=3, max_attempts=2)
    run_killed(work, 7, storage=storage, steps=9, every=3, max_attempts=2)

    with pytest.raises(NoProgressError, match="step-000000006"):
        run_killed(work, 7, storage=storage, steps=9, every=3, max_attempts=2)


def test_starts_from_a_snapshot_inside_a_step_are_counted():
    """A snapshot taken inside a step counts its starts like any other."""
    storage = memory_storage()
    run_preempted(work, 1, 2, storage=storage, every=10, max_attempts=1)
    run_killed(work, 2, storage=storage, every=10, max_attempts=1)

    with pytest.raises(NoProgressError):
        run_killed(work, 2, storage=storage, every=10, max_attempts=1)


def test_rerunning_a_finished_run_is_no_attempt():
    """A finished run can be started again and again without NoProgressError."""
    storage = memory_storage()
    run_steps(work, storage=storage, max_attempts=1)

    results = [run_steps(work, storage=storage, max_attempts=1).step for _ in range(3)]

    assert [5, 5, 5] == results
