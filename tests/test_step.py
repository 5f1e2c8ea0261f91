"""
Tests of ``resumable._step``: the decorator checks its arguments, and calling a
step is a plain function call that runs the body once and does nothing else.
"""

from __future__ import annotations

import logging
import os
import random
import signal
from typing import Any

import attrs
import numpy as np
import pytest
import torch

import resumable
from resumable.errors import ConfigurationError
from resumable.testing import memory_storage

HERE = os.path.dirname(os.path.abspath(__file__))
WATCHED_SIGNALS = [
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGALRM,
]


@attrs.define
class State:
    count: int = 0
    seen: list[int] = attrs.Factory(list)


CALLS: list[tuple[Any, int]] = []


def init() -> State:
    return State()


@resumable.step(init=init, steps=4, every=2, keep=5)
def train(state: State, step: int) -> dict[str, float]:
    """Count the steps."""
    CALLS.append((state, step))
    state.count += 1
    state.seen.append(step)
    return {"count": state.count}


def observe() -> dict[str, Any]:
    """Return what a plain call of a step must leave alone."""
    return {
        "cwd": sorted(os.listdir(".")),
        "tests": sorted(os.listdir(HERE)),
        "default storage": os.path.exists(train.default_storage()),
        "signals": [signal.getsignal(number) for number in WATCHED_SIGNALS],
        "logging": list(logging.getLogger("resumable").handlers),
        "python rng": random.getstate(),
        "numpy rng": np.random.get_state(legacy=False)["state"]["pos"],
        "torch rng": torch.get_rng_state().tolist(),
    }


def test_calling_a_step_runs_the_body_once_and_nothing_else(tmp_path, monkeypatch):
    """train(state, 3) runs the body once: no files, handlers, RNG or log changes."""
    monkeypatch.chdir(tmp_path)
    state = State()
    before = observe()
    CALLS.clear()

    metrics = train(state, 3)

    assert [(state, 3)] == CALLS
    assert {"count": 1} == metrics
    assert State(count=1, seen=[3]) == state
    assert before == observe()


def test_calling_a_step_passes_on_what_the_body_returns_unchecked():
    """A plain call returns the body's value as it is; only run() checks metrics."""

    @resumable.step(init=init, steps=1)
    def odd(state: State, step: int) -> Any:
        return ["not", "a", "dict"]

    assert ["not", "a", "dict"] == odd(State(), 0)


def test_calling_a_step_lets_its_exception_through():
    """An exception of the body reaches the caller of a plain call unchanged."""

    @resumable.step(init=init, steps=1)
    def broken(state: State, step: int) -> None:
        raise KeyError(step)

    with pytest.raises(KeyError, match="7"):
        broken(State(), 7)


def test_step_keeps_the_functions_name_and_docstring():
    """The Step looks like the function it wraps, and knows its program name."""
    assert "train" == train.__name__
    assert "Count the steps." == train.__doc__
    assert "train" == train.name
    assert "test_step.py:train" == train.program
    assert os.path.join(HERE, "test_step.py") == train.source_file
    assert "<resumable.step test_step.py:train steps=4>" == repr(train)


def test_step_keeps_the_decorators_settings():
    """The decorator's arguments are the step's settings."""
    assert (init, 4, 2, 5, None) == (
        train.init,
        train.steps,
        train.every,
        train.keep,
        train.storage,
    )


def test_decorator_defaults_are_every_step_and_keep_three():
    """Without every and keep a step snapshots every step and keeps three."""

    @resumable.step(init=init, steps=2)
    def plain(state: State, step: int) -> None:
        pass

    assert (1, 3, None) == (plain.every, plain.keep, plain.storage)


def test_default_storage_is_a_folder_next_to_the_script():
    """With no URL a step's snapshots go to <script dir>/.resumable/<stem>.<name>."""
    expected = os.path.join(HERE, ".resumable", "test_step.train")

    assert expected == train.default_storage()


@pytest.mark.parametrize(
    ("arguments", "name"),
    [
        ({"steps": -1}, "steps"),
        ({"steps": 2.0}, "steps"),
        ({"steps": "3"}, "steps"),
        ({"steps": True}, "steps"),
        ({"steps": None}, "steps"),
        ({"steps": 3, "every": 0}, "every"),
        ({"steps": 3, "every": 1.5}, "every"),
        ({"steps": 3, "keep": 0}, "keep"),
        ({"steps": 3, "keep": -2}, "keep"),
    ],
    ids=repr,
)
def test_decorator_refuses_counts_out_of_range(arguments, name):
    """steps < 0, every < 1, keep < 1 or a non-int count is a ConfigurationError."""
    with pytest.raises(ConfigurationError) as caught:
        resumable.step(init=init, **arguments)(train.function)

    assert str(caught.value).startswith(f"{name} must be an integer of at least")


@pytest.mark.parametrize("bad_init", [None, "init", State()], ids=repr)
def test_decorator_refuses_an_init_that_is_not_callable(bad_init):
    """init must be a function; anything else is a ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match="init must be a function"):
        resumable.step(init=bad_init, steps=1)(train.function)


def test_zero_steps_is_allowed_and_runs_nothing():
    """A step declared with steps=0 is valid; its run runs no step."""
    CALLS.clear()

    @resumable.step(init=init, steps=0)
    def nothing(state: State, step: int) -> None:
        CALLS.append((state, step))

    result = nothing.run(storage=memory_storage())

    assert (0, [], []) == (result.step, result.history, CALLS)


def test_step_run_runs_the_loop_with_the_given_options():
    """Step.run() takes the options of resumable.run and returns its Result."""
    result = train.run(storage=memory_storage(), steps=3)

    assert (3, [0, 1, 2]) == (result.step, result.state.seen)
    assert [{"count": 1.0}, {"count": 2.0}, {"count": 3.0}] == result.history
