"""
Tests of ``resumable._knobs`` and of how a run's settings are resolved: argument,
then RESUMABLE_* variable, then the decorator, then the default.
"""

from __future__ import annotations

import os

import attrs
import pytest

import resumable
from resumable import _knobs
from resumable._runtime import Settings
from resumable.errors import ConfigurationError
from resumable.testing import memory_storage

VARIABLES = [
    "RESUMABLE_STORAGE",
    "RESUMABLE_STEPS",
    "RESUMABLE_EVERY",
    "RESUMABLE_KEEP",
]


@pytest.fixture(autouse=True)
def no_resumable_variables(monkeypatch):
    """Start each test with no RESUMABLE_* variable set."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)


@attrs.define
class State:
    count: int = 0


@resumable.step(init=State, steps=10, every=2, keep=4, storage="memory://decorator")
def train(state: State, step: int) -> None:
    state.count += 1


@resumable.step(init=State, steps=3)
def bare(state: State, step: int) -> None:
    state.count += 1


def test_variable_names_are_the_options_with_the_prefix():
    """The variables are RESUMABLE_ followed by the option in upper case."""
    assert VARIABLES == [_knobs.STORAGE, _knobs.STEPS, _knobs.EVERY, _knobs.KEEP]


def test_env_str_treats_unset_and_empty_as_absent(monkeypatch):
    """An unset or empty variable reads as None; a set one as its text."""
    assert _knobs.env_str("RESUMABLE_STORAGE") is None
    monkeypatch.setenv("RESUMABLE_STORAGE", "")
    assert _knobs.env_str("RESUMABLE_STORAGE") is None
    monkeypatch.setenv("RESUMABLE_STORAGE", "memory://x")
    assert "memory://x" == _knobs.env_str("RESUMABLE_STORAGE")


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("7", 7), (" 12 ", 12)])
def test_env_int_reads_whole_numbers(monkeypatch, text, value):
    """An integer variable at or above its minimum reads as that integer."""
    monkeypatch.setenv("RESUMABLE_STEPS", text)

    assert value == _knobs.env_int("RESUMABLE_STEPS", 0)


@pytest.mark.parametrize("text", ["ten", "1.5", "3e2", "0x10"])
def test_env_int_refuses_non_integers_naming_the_variable(monkeypatch, text):
    """A variable that is no integer is a ConfigurationError naming it and its value."""
    monkeypatch.setenv("RESUMABLE_EVERY", text)

    with pytest.raises(ConfigurationError) as caught:
        _knobs.env_int("RESUMABLE_EVERY", 1)

    assert f"RESUMABLE_EVERY={text!r} is not an integer" in str(caught.value)


def test_env_int_refuses_values_below_the_minimum(monkeypatch):
    """A variable below its minimum is a ConfigurationError saying the minimum."""
    monkeypatch.setenv("RESUMABLE_KEEP", "0")

    with pytest.raises(ConfigurationError) as caught:
        _knobs.env_int("RESUMABLE_KEEP", 1)

    assert "RESUMABLE_KEEP=0 is below 1. Set it to 1 or more." == str(caught.value)


def test_decorator_settings_apply_without_arguments_or_variables():
    """With neither arguments nor variables, the decorator's values are used."""
    expected = Settings(storage="memory://decorator", steps=10, every=2, keep=4)

    assert expected == Settings.resolve(train)


def test_default_storage_is_used_when_nothing_names_one():
    """With no URL anywhere, the folder next to the script is used and flagged."""
    settings = Settings.resolve(bare)

    assert bare.default_storage() == settings.storage
    assert settings.storage_is_default
    assert (3, 1, 3, False) == (
        settings.steps,
        settings.every,
        settings.keep,
        settings.fresh,
    )


@pytest.mark.parametrize(
    ("option", "variable", "text", "value"),
    [
        ("storage", "RESUMABLE_STORAGE", "memory://from-env", "memory://from-env"),
        ("steps", "RESUMABLE_STEPS", "7", 7),
        ("every", "RESUMABLE_EVERY", "3", 3),
        ("keep", "RESUMABLE_KEEP", "9", 9),
    ],
)
def test_variable_overrides_the_decorator(monkeypatch, option, variable, text, value):
    """A RESUMABLE_* variable beats the decorator's value."""
    monkeypatch.setenv(variable, text)

    settings = Settings.resolve(train)

    assert value == getattr(settings, option)


@pytest.mark.parametrize(
    ("option", "variable", "text", "value"),
    [
        ("storage", "RESUMABLE_STORAGE", "memory://from-env", "memory://argument"),
        ("steps", "RESUMABLE_STEPS", "7", 5),
        ("steps", "RESUMABLE_STEPS", "7", 0),
        ("every", "RESUMABLE_EVERY", "3", 5),
        ("keep", "RESUMABLE_KEEP", "9", 5),
    ],
)
def test_argument_overrides_the_variable(monkeypatch, option, variable, text, value):
    """An explicit argument (the command line) beats the variable and decorator."""
    monkeypatch.setenv(variable, text)

    settings = Settings.resolve(train, **{option: value})

    assert value == getattr(settings, option)


def test_storage_variable_is_not_flagged_as_default(monkeypatch):
    """Storage named by RESUMABLE_STORAGE is not reported as the default."""
    monkeypatch.setenv("RESUMABLE_STORAGE", "memory://from-env")

    settings = Settings.resolve(bare)

    assert ("memory://from-env", False) == (
        settings.storage,
        settings.storage_is_default,
    )


@pytest.mark.parametrize(
    ("variable", "text"),
    [
        ("RESUMABLE_STEPS", "many"),
        ("RESUMABLE_STEPS", "-1"),
        ("RESUMABLE_EVERY", "0"),
        ("RESUMABLE_EVERY", "2.5"),
        ("RESUMABLE_KEEP", "0"),
        ("RESUMABLE_KEEP", "all"),
    ],
)
def test_run_refuses_a_bad_variable_naming_it(monkeypatch, variable, text):
    """A run with a bad RESUMABLE_* value fails with an error that names it."""
    monkeypatch.setenv(variable, text)

    with pytest.raises(ConfigurationError, match=variable):
        resumable.run(bare, storage=memory_storage())


@pytest.mark.parametrize(
    ("option", "value"),
    [("steps", -1), ("every", 0), ("keep", 0), ("steps", "4"), ("every", 1.0)],
)
def test_run_refuses_a_bad_argument_naming_it(option, value):
    """A run with an out-of-range argument fails with an error that names it."""
    with pytest.raises(ConfigurationError, match=f"^{option} must be"):
        resumable.run(bare, storage=memory_storage(), **{option: value})


def test_run_uses_the_variables(monkeypatch):
    """RESUMABLE_STEPS and RESUMABLE_STORAGE decide a real run's length and place."""
    storage = memory_storage()
    monkeypatch.setenv("RESUMABLE_STEPS", "5")
    monkeypatch.setenv("RESUMABLE_STORAGE", storage)

    result = resumable.run(bare)

    assert (5, 5, storage) == (result.step, result.state.count, result.storage)


def test_knobs_is_the_only_module_that_reads_the_environment():
    """No other module of the package reads os.environ or os.getenv."""
    package = os.path.dirname(resumable.__file__)
    readers = []
    for name in sorted(os.listdir(package)):
        if not name.endswith(".py") or name == "_knobs.py":
            continue
        with open(os.path.join(package, name)) as source:
            text = source.read()
        if "os.environ" in text or "getenv" in text:
            readers.append(name)

    assert [] == readers
