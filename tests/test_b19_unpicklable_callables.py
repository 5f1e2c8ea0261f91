"""
B19: lambdas, closures and local classes in the state snapshot and come back.

A module holding an activation lambda, a LambdaLR whose lambda closes over a local
variable, an instance of a class defined inside init() and a plain lambda field
survive a kill (in process with run_killed, and a SIGKILL of a real
``python -m resumable``) and behave as in an uninterrupted run. A state holding
something that cannot be serialised at all fails at start-up, before step 0, with
the attribute path in the message; the command line exits with code 2.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import torch
from torch import nn

import resumable
from resumable import testing

STEPS = 5
KILL_AFTER = 2
SCRIPT = Path(__file__).parent / "scripts" / "case_b19_callables.py"


class Net(nn.Module):
    """A small MLP whose activation is whatever callable it is given."""

    def __init__(self, activation: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 8)
        self.out = nn.Linear(8, 1)
        self.activation = activation

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(self.activation(self.hidden(inputs)))


@attrs.define
class State:
    model: Net
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    tracker: Any
    settings: Any
    scale: Callable[[float], float]


def make_step(calls: list[int]) -> resumable.Step[State]:
    """Return a step over State that appends each step index to ``calls``."""

    def init() -> State:
        warmup = 8

        class Tracker:
            def __init__(self, name: str) -> None:
                self.name = name
                self.seen: list[int] = []

        @attrs.define
        class Settings:
            label: str
            history: list[float] = attrs.Factory(list)

        torch.manual_seed(0)
        model = Net(lambda x: torch.clamp(x, min=0))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda epoch: min(1.0, (epoch + 1) / warmup)
        )
        return State(
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            generator=torch.Generator().manual_seed(1),
            tracker=Tracker("b19"),
            settings=Settings("local attrs"),
            scale=lambda x: 2 * x + warmup,
        )

    @resumable.step(init=init, steps=STEPS)
    def train(state: State, step: int) -> dict[str, float]:
        calls.append(step)
        inputs = torch.randn(16, 4, generator=state.generator)
        targets = inputs.sum(dim=1, keepdim=True).sin()
        loss = (state.model(inputs) - targets).pow(2).mean()
        state.optimizer.zero_grad()
        loss.backward()
        state.optimizer.step()
        state.scheduler.step()
        state.tracker.seen.append(step)
        state.settings.history.append(state.scheduler.get_last_lr()[0])
        factor = step + 2
        state.scale = lambda x: x * factor
        return {"loss": loss.item(), "lr": state.scheduler.get_last_lr()[0]}

    return train


def behaviour(state: State) -> dict[str, Any]:
    """Return what the callables and the local-class objects of ``state`` do."""
    return {
        "activation(-1)": state.model.activation(torch.tensor(-1.0)).item(),
        "activation(2)": state.model.activation(torch.tensor(2.0)).item(),
        "last_lr": state.scheduler.get_last_lr(),
        "optimizer_lr": [group["lr"] for group in state.optimizer.param_groups],
        "lr_lambda(1)": state.scheduler.lr_lambdas[0](1),
        # The name, not the qualified name: cloudpickle rebuilds a class defined in
        # a function without its qualified name whenever the original was
        # collected, which depends on the collector's timing.
        "tracker": [type(state.tracker).__name__, vars(state.tracker)],
        "settings": [type(state.settings).__name__, attrs.asdict(state.settings)],
        "scale(3)": state.scale(3),
        "parameters": [p.detach().clone() for p in state.model.parameters()],
    }


def test_b19_callables_and_local_classes_survive_kill_and_resume() -> None:
    """Killed after 2 steps and resumed to 5, the callables act as uninterrupted."""
    expected = testing.run_steps(make_step([]))
    calls: list[int] = []
    train = make_step(calls)
    storage = testing.memory_storage()
    testing.run_killed(train, KILL_AFTER, storage=storage)

    restored = resumable.load(train, storage=storage)
    actual = testing.run_steps(train, storage=storage)

    assert 0.0 == restored.model.activation(torch.tensor(-1.0)).item()
    assert ["b19", [0, 1]] == [restored.tracker.name, restored.tracker.seen]
    assert 9 == restored.scale(3)
    assert [0, 1, 2, 3, 4] == calls
    assert expected.history == actual.history
    want, got = behaviour(expected.state), behaviour(actual.state)
    assert [True] * len(want["parameters"]) == [
        torch.equal(one, two)
        for one, two in zip(want.pop("parameters"), got.pop("parameters"), strict=True)
    ]
    assert want == got


def test_b19_assert_resumes_identically_accepts_callables_and_local_classes() -> None:
    """The testing helper finds a kill and resume of such a state identical."""
    testing.assert_resumes_identically(make_step([]), kill_after=[KILL_AFTER])


@attrs.define
class Holder:
    inner: Any


@attrs.define
class Unserialisable:
    model: nn.Module
    extra: Any
    holder: Holder


def numbers() -> Iterator[int]:
    yield from range(3)


class Cursor:
    """An object with state_dict() whose state holds a live generator."""

    def __init__(self) -> None:
        self.position = numbers()

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.position = state["position"]


@pytest.mark.parametrize(
    ("extra", "inner", "path"),
    [
        (threading.Lock(), None, "state.extra"),
        (None, numbers(), "state.holder.inner"),
        ({"lock": threading.RLock()}, None, "state.extra['lock']"),
        ([1, threading.Lock()], None, "state.extra[1]"),
        (None, (numbers(), 2), "state.holder.inner[0]"),
        (Cursor(), None, "state.extra.state_dict()['position']"),
    ],
    ids=["field", "nested", "dict", "list", "tuple", "state-dict"],
)
def test_b19_unserialisable_state_fails_before_step_0(
    extra: Any, inner: Any, path: str
) -> None:
    """Something that cannot be serialised fails at start-up, naming its path."""
    calls: list[int] = []

    def init() -> Unserialisable:
        return Unserialisable(nn.Linear(2, 2), extra, Holder(inner))

    @resumable.step(init=init, steps=3)
    def train(state: Unserialisable, step: int) -> None:
        calls.append(step)

    storage = testing.memory_storage()

    with pytest.raises(resumable.StateDefinitionError) as raised:
        testing.run_steps(train, storage=storage)

    assert [] == calls
    assert f"Cannot snapshot {path}:" in str(raised.value)
    with pytest.raises(resumable.NoSnapshotError):
        resumable.load(train, storage=storage)


def start_script(
    storage: Path, reports: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start `python -m resumable` on the B19 script."""
    return subprocess.Popen(
        [sys.executable, "-m", "resumable", str(SCRIPT), "--storage", str(storage)],
        env={**os.environ, "CASE_B19_REPORTS": str(reports), **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(path: Path, process: subprocess.Popen[str]) -> None:
    """Wait until ``path`` exists, failing if ``process`` ends first."""
    deadline = time.monotonic() + 60
    while not path.exists():
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def wait_for_commit(storage: Path, step: int, process: subprocess.Popen[str]) -> None:
    """Wait until the snapshot of ``step`` is committed, failing if ``process`` ends."""
    deadline = time.monotonic() + 60
    while not list(storage.glob(f"step-{step:09d}-*.manifest.json")):
        assert process.poll() is None, process.communicate()[1]
        assert time.monotonic() < deadline, f"no snapshot of step {step} in {storage}"
        time.sleep(0.05)


def read_report(folder: Path, step: int) -> dict[str, Any]:
    return dict(json.loads((folder / f"step-{step}.json").read_text()))


def test_b19_sigkilled_cli_run_resumes_callables_and_local_classes(
    tmp_path: Path,
) -> None:
    """A real run SIGKILLed in step 2 resumes; callables act as uninterrupted."""
    reports = {run: tmp_path / f"reports-{run}" for run in ("whole", "split")}
    whole = start_script(tmp_path / "whole", reports["whole"])
    killed = start_script(
        tmp_path / "split", reports["split"], {"CASE_B19_PAUSE_AT": str(KILL_AFTER)}
    )
    try:
        wait_for(reports["split"] / "paused", killed)
        # Written in the background while step 2 runs: killed once it is committed.
        wait_for_commit(tmp_path / "split", KILL_AFTER, killed)
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.communicate(timeout=60)
    whole_stderr = whole.communicate(timeout=120)[1]
    assert 0 == whole.returncode, whole_stderr

    resumed = start_script(tmp_path / "split", reports["split"])
    _, stderr = resumed.communicate(timeout=120)

    assert 0 == resumed.returncode, stderr
    assert f"resumed: step={KILL_AFTER}" in stderr
    pids = [read_report(reports["split"], step)["pid"] for step in range(STEPS)]
    assert [killed.pid] * KILL_AFTER + [resumed.pid] * (STEPS - KILL_AFTER) == pids
    expected = read_report(reports["whole"], STEPS - 1) | {"pid": None}
    actual = read_report(reports["split"], STEPS - 1) | {"pid": None}
    assert expected == actual
    assert 0.0 == actual["activation(-1)"]
    assert ["Tracker", "b19"] == actual["tracker"]
    assert list(range(STEPS)) == actual["seen"]


def test_b19_cli_exits_2_before_step_0_for_unserialisable_state(
    tmp_path: Path,
) -> None:
    """The command line refuses a state holding a lock: exit 2, path named."""
    reports = tmp_path / "reports"
    storage = tmp_path / "snapshots"
    process = start_script(storage, reports, {"CASE_B19_UNSERIALISABLE": "1"})

    _, stderr = process.communicate(timeout=120)

    assert 2 == process.returncode
    assert "state.extras['lock']" in stderr
    assert not reports.exists()
    assert [] == list(storage.glob("*.manifest.json"))
