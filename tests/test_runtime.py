"""
Tests of ``resumable._runtime``: the loop, metrics and history, resume, extending
and rerunning a finished run, snapshot cadence, retention and ``load``.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import textwrap
from typing import Any

import attrs
import numpy as np
import pytest
import torch
from torch import nn

import resumable
from resumable._archive import Archive
from resumable._storage import Storage
from resumable.errors import (
    ConfigurationError,
    IncompatibleSnapshotError,
    NoSnapshotError,
)
from resumable.testing import diff_states, memory_storage, run_killed


@pytest.fixture(autouse=True)
def no_resumable_variables(monkeypatch):
    """Keep RESUMABLE_* variables of the environment out of these runs."""
    for name in ("STORAGE", "STEPS", "EVERY", "KEEP"):
        monkeypatch.delenv(f"RESUMABLE_{name}", raising=False)


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


@attrs.define
class Counter:
    total: int = 0
    seen: list[int] = attrs.Factory(list)
    # transient() returns an attrs field definition, which RUF009 does not know.
    scratch: Any = resumable.transient(factory=lambda: {"built": "by init"})


CALLS: list[int] = []


def make_counter() -> Counter:
    return Counter()


@resumable.step(init=make_counter, steps=10)
def count(state: Counter, step: int) -> dict[str, float] | None:
    """Add the step to a total; no metrics on odd steps."""
    CALLS.append(step)
    state.total += step
    state.seen.append(step)
    state.scratch["touched"] = step
    return {"total": state.total} if step % 2 == 0 else None


@pytest.fixture
def calls():
    """The step indices that ``count`` runs, from the start of the test."""
    CALLS.clear()
    return CALLS


def committed_steps(storage: str, program: str = count.program) -> list[int]:
    """Return the steps of the committed snapshots of ``program``, newest first."""
    archive = Archive(Storage.open(storage), program)

    return [entry.step for entry in archive.listing()]


def test_run_runs_every_step_once_in_order(calls):
    """A fresh run calls the step for 0 .. steps-1, once each, and finishes."""
    result = resumable.run(count, storage=memory_storage())

    assert list(range(10)) == calls
    assert (10, 10, True) == (result.step, result.steps, result.finished)
    assert 45 == result.state.total


def test_history_has_one_entry_per_step_including_none():
    """The history holds each step's metrics, None where a step returned none."""
    result = resumable.run(count, storage=memory_storage(), steps=4)

    assert [{"total": 0.0}, None, {"total": 3.0}, None] == result.history


def test_history_and_state_survive_a_resume(calls, storage_url):
    """A killed and resumed run has the same state and history as an unkilled one."""
    expected = resumable.run(count, storage=memory_storage())
    storage = storage_url
    run_killed(count, 4, storage=storage)
    calls.clear()

    actual = resumable.run(count, storage=storage)

    assert [4, 5, 6, 7, 8, 9] == calls
    assert expected.history == actual.history
    assert [] == diff_states(expected.state, actual.state)
    assert list(range(10)) == actual.state.seen


def test_resume_through_a_local_folder_is_bit_identical(tmp_path):
    """Resuming from file storage gives the same torch state as an unkilled run."""
    expected = resumable.run(fit, storage=str(tmp_path / "a"))
    run_killed(fit, 2, storage=str(tmp_path / "b"))

    actual = resumable.run(fit, storage=f"file://{tmp_path / 'b'}")

    assert expected.history == actual.history
    assert [] == diff_states(expected.state, actual.state)


def test_transient_field_keeps_inits_value_after_resume():
    """On resume a transient field is init()'s, not the killed run's."""
    storage = memory_storage()
    run_killed(count, 3, storage=storage)

    state = resumable.load(count, storage=storage)

    assert {"built": "by init"} == state.scratch
    assert [0, 1, 2] == state.seen


def test_extending_a_finished_run_continues_from_its_end(calls, storage_url):
    """A finished run of N steps run again with steps=N+k runs only N .. N+k-1."""
    storage = storage_url
    resumable.run(count, storage=storage, steps=5)
    calls.clear()

    result = resumable.run(count, storage=storage, steps=8)

    assert [5, 6, 7] == calls
    assert (8, 8) == (result.step, len(result.history))
    assert list(range(8)) == result.state.seen


def test_rerunning_a_finished_run_does_not_call_the_step(calls, log):
    """A rerun of a finished run only loads it, logs so, and returns its result."""
    storage = memory_storage()
    first = resumable.run(count, storage=storage)
    calls.clear()

    again = resumable.run(count, storage=storage)

    assert [] == calls
    assert (10, True, first.history) == (again.step, again.finished, again.history)
    assert [] == diff_states(first.state, again.state)
    assert "run already finished: step=10, steps=10" in log.messages


def test_rerun_with_fewer_steps_than_done_runs_nothing(calls):
    """Asking for fewer steps than a run has done does not train or truncate."""
    storage = memory_storage()
    resumable.run(count, storage=storage, steps=6)
    calls.clear()

    result = resumable.run(count, storage=storage, steps=4)

    assert [] == calls
    assert (6, 6) == (result.step, len(result.history))


def test_snapshots_after_every_nth_step_and_after_the_last(storage_url):
    """every=3 with 10 steps commits snapshots after steps 3, 6, 9 and 10."""
    resumable.run(count, storage=storage_url, every=3, keep=10)

    assert [10, 9, 6, 3] == committed_steps(storage_url)


def test_retention_keeps_the_newest_snapshots_only(tmp_path):
    """keep=2 leaves the two newest snapshots and no other entries."""
    storage = str(tmp_path)

    resumable.run(count, storage=storage, keep=2)

    claims = [name for name in os.listdir(tmp_path) if name.startswith("incarn")]
    assert [10, 9] == committed_steps(storage)
    assert ["incarnation-000000001.json"] == claims
    assert 5 == len(os.listdir(tmp_path))
    assert [] == Storage.open(storage).uncommitted()


def test_progress_is_called_after_each_step():
    """The progress callback gets (done, total, metrics) after every step."""
    seen = []

    resumable.run(
        count,
        storage=memory_storage(),
        steps=3,
        progress=lambda *arguments: seen.append(arguments),
    )

    assert [(1, 3, {"total": 0.0}), (2, 3, None), (3, 3, {"total": 3.0})] == seen


def test_load_returns_the_newest_snapshots_state():
    """load() gives the state of the newest snapshot, without running steps."""
    storage = memory_storage()
    run_killed(count, 6, storage=storage)

    state = resumable.load(count, storage=storage)

    assert (15, list(range(6))) == (state.total, state.seen)


def test_load_from_empty_storage_raises_no_snapshot_error():
    """load() on a storage without snapshots raises NoSnapshotError."""
    with pytest.raises(NoSnapshotError, match=r"No snapshot of test_runtime\.py:count"):
        resumable.load(count, storage=memory_storage())


@pytest.mark.parametrize(
    "not_a_step", [count.function, None, "count"], ids=["function", "None", "name"]
)
def test_run_refuses_what_is_not_a_step(not_a_step):
    """run() takes only a @resumable.step function."""
    with pytest.raises(ConfigurationError, match=r"takes a @resumable\.step"):
        resumable.run(not_a_step, storage=memory_storage())


def returning(value: Any) -> resumable.Step[Counter]:
    """Return a step that returns ``value`` as its metrics."""

    def body(state: Counter, step: int) -> Any:
        return value

    return resumable.Step(body, init=make_counter, steps=2)


@pytest.mark.parametrize("metrics", [[1.0], 0.5, "loss", ("loss", 1.0)], ids=repr)
def test_step_returning_no_dict_is_a_configuration_error(metrics):
    """A step's result must be None or a dict; anything else stops the run."""
    with pytest.raises(ConfigurationError, match="Step 0 returned a"):
        resumable.run(returning(metrics), storage=memory_storage())


@pytest.mark.parametrize(
    "value",
    [
        "high",
        "0.5",
        None,
        [1.0],
        1 + 2j,
        torch.tensor([1.0, 2.0]),
        np.array([1.0, 2.0]),
    ],
    ids=repr,
)
def test_step_returning_a_non_numeric_metric_is_a_configuration_error(value):
    """A metric value that is not a number stops the run, naming the metric."""
    with pytest.raises(ConfigurationError, match="metric 'loss'"):
        resumable.run(returning({"loss": value}), storage=memory_storage())


@pytest.mark.parametrize(
    ("value", "number"),
    [
        (3, 3.0),
        (True, 1.0),
        (float("inf"), float("inf")),
        (np.float32(0.25), 0.25),
        (np.int64(7), 7.0),
        (torch.tensor(1.5), 1.5),
        (torch.tensor([2.5]), 2.5),
        (torch.tensor(4, dtype=torch.int32), 4.0),
        (torch.tensor(0.5, requires_grad=True) * 2, 1.0),
    ],
    ids=repr,
)
def test_numbers_and_one_element_tensors_are_metric_values(value, number):
    """Ints, floats, numpy scalars and one-element tensors, a loss too, are floats."""
    result = resumable.run(returning({"loss": value}), storage=memory_storage())

    assert [{"loss": number}, {"loss": number}] == result.history
    assert float is type(result.history[0]["loss"])


@attrs.define
class ModelState:
    model: nn.Module
    optimizer: torch.optim.Optimizer


def make_model_state(width: int = 3) -> ModelState:
    torch.manual_seed(0)
    model = nn.Linear(2, width)
    return ModelState(model, torch.optim.Adam(model.parameters(), lr=0.1))


def fit_body(state: ModelState, step: int) -> dict[str, float]:
    loss = state.model(torch.rand(4, 2)).pow(2).mean()
    state.optimizer.zero_grad()
    loss.backward()
    state.optimizer.step()
    return {"loss": loss.item()}


fit = resumable.Step(fit_body, init=make_model_state, steps=4)


def test_model_that_no_longer_fits_the_snapshot_stops_before_training():
    """Resuming into a model of other shape fails, naming the parameter, unrun."""
    storage = memory_storage()
    resumable.run(fit, storage=storage, steps=2)
    calls = []

    def body(state: ModelState, step: int) -> None:
        calls.append(step)

    body.__qualname__ = fit_body.__qualname__
    wider = resumable.Step(body, init=lambda: make_model_state(5), steps=4)

    with pytest.raises(IncompatibleSnapshotError) as caught:
        resumable.run(wider, storage=storage)

    assert [] == calls
    assert "state.model" in str(caught.value)
    assert "size mismatch for weight" in str(caught.value)


@attrs.define
class OtherState:
    total: int = 0
    extra: int = 0


def same_program_other_schema() -> resumable.Step[OtherState]:
    """Return a step with count's program name but another state class."""

    def body(state: OtherState, step: int) -> None:
        CALLS.append(step)

    body.__qualname__ = count.name
    return resumable.Step(body, init=OtherState, steps=10)


def test_schema_change_is_refused_before_training(calls):
    """Snapshots of another state schema stop the run before any step."""
    storage = memory_storage()
    resumable.run(count, storage=storage, steps=2)
    changed = same_program_other_schema()
    assert count.program == changed.program
    calls.clear()

    with pytest.raises(IncompatibleSnapshotError, match="another schema") as caught:
        resumable.run(changed, storage=storage)

    assert [] == calls
    assert "OtherState" in str(caught.value)
    assert [2, 1] == committed_steps(storage)


def test_fresh_start_ignores_a_changed_schemas_snapshots(calls):
    """fresh=True starts over; retention then removes the old snapshots."""
    storage = memory_storage()
    resumable.run(count, storage=storage, steps=2)
    calls.clear()

    result = resumable.run(
        same_program_other_schema(), storage=storage, steps=3, keep=3, fresh=True
    )

    assert [0, 1, 2] == calls
    assert 3 == result.step
    assert [3, 2, 1] == committed_steps(storage)


@resumable.step(init=make_counter, steps=3)
def other_program(state: Counter, step: int) -> None:
    CALLS.append(step)


def test_another_programs_snapshots_are_refused_and_left_alone(calls):
    """Storage holding another program's snapshots is refused before training."""
    storage = memory_storage()
    resumable.run(count, storage=storage, steps=2)
    calls.clear()

    with pytest.raises(IncompatibleSnapshotError) as caught:
        resumable.run(other_program, storage=storage)

    assert [] == calls
    assert "test_runtime.py:count" in str(caught.value)
    assert [2, 1] == committed_steps(storage)


DEFAULT_SCRIPT = """
    import attrs
    import resumable

    @attrs.define
    class State:
        total: int = 0

    @resumable.step(init=State, steps=2)
    def train(state, step):
        state.total += 1
"""


def test_default_storage_is_a_folder_next_to_the_script(tmp_path, monkeypatch, log):
    """With no storage given, snapshots go to <script dir>/.resumable/<stem>.<step>."""
    monkeypatch.chdir(tmp_path)
    script_dir = tmp_path / "project"
    script_dir.mkdir()
    script = script_dir / "my_job.py"
    script.write_text(textwrap.dedent(DEFAULT_SCRIPT))
    spec = importlib.util.spec_from_file_location("resumable_test_my_job", script)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "resumable_test_my_job", module)
    spec.loader.exec_module(module)
    expected = str(script_dir / ".resumable" / "my_job.train")

    result = module.train.run()

    assert expected == result.storage
    assert [2, 1] == committed_steps(expected, "my_job.py:train")
    assert [".resumable", "my_job.py"] == sorted(os.listdir(script_dir))
    assert ["project"] == os.listdir(tmp_path)
    assert any("(default, next to the script)" in line for line in log.messages)
