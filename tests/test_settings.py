"""
Tests of ``resumable._settings``: the preemption options (grace, signals, the
preempted exit code, max attempts) resolve argument > RESUMABLE_* variable >
decorator > default, and invalid values raise ConfigurationError.
"""

from __future__ import annotations

import math

import attrs
import pytest

import resumable
from resumable import _runtime
from resumable._settings import Settings
from resumable.errors import ConfigurationError

OPTIONS = ("GRACE", "SIGNALS", "PREEMPTED_EXIT_CODE", "MAX_ATTEMPTS")
STORAGE = "memory://settings-tests/unused"


@pytest.fixture(autouse=True)
def no_resumable_variables(monkeypatch):
    """Keep RESUMABLE_* variables of the environment out of these tests."""
    for name in ("STORAGE", "STEPS", "EVERY", "KEEP", *OPTIONS):
        monkeypatch.delenv(f"RESUMABLE_{name}", raising=False)


@attrs.define
class Empty:
    pass


def noop(state: Empty, step: int) -> None:
    return None


plain = resumable.step(init=Empty, steps=2)(noop)
declared = resumable.step(init=Empty, steps=2, grace=12, signals=("USR2", "term"))(noop)


# The stop signals that every run catches; named ones are added to them.
DEFAULTS = ("SIGTERM", "SIGINT", "SIGUSR1")


def resolve(step: resumable.Step[Empty] = plain, **given: object) -> Settings:
    return Settings.resolve(step, storage=STORAGE, **given)


def test_defaults_are_thirty_seconds_three_signals_code_one_ten_attempts():
    """Without argument, variable or declaration the defaults of the issue apply."""
    settings = resolve()

    expected = (30.0, ("SIGTERM", "SIGINT", "SIGUSR1"), 1, 10)
    assert expected == (
        settings.grace,
        settings.signals,
        settings.preempted_exit_code,
        settings.max_attempts,
    )


def test_decorator_grace_and_signals_beat_the_defaults():
    """The decorator's grace wins; its signals join the defaults, once each."""
    settings = resolve(declared)

    expected = (12.0, ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"))
    assert expected == (settings.grace, settings.signals)


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("GRACE", "7.5", "grace", 7.5),
        ("SIGNALS", "TERM,SIGUSR1", "signals", ("SIGTERM", "SIGINT", "SIGUSR1")),
        (
            "SIGNALS",
            " usr2 , int ",
            "signals",
            ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"),
        ),
        ("PREEMPTED_EXIT_CODE", "42", "preempted_exit_code", 42),
        ("MAX_ATTEMPTS", "3", "max_attempts", 3),
    ],
)
def test_variable_beats_decorator_and_default(
    monkeypatch, variable, value, field, expected
):
    """A RESUMABLE_* variable overrides the decorator's value and the default."""
    monkeypatch.setenv(f"RESUMABLE_{variable}", value)

    assert expected == getattr(resolve(declared), field)


@pytest.mark.parametrize(
    ("variable", "value", "argument", "given", "expected"),
    [
        ("GRACE", "7.5", "grace", 3, 3.0),
        ("SIGNALS", "USR2", "signals", ["INT"], ("SIGTERM", "SIGINT", "SIGUSR1")),
        (
            "SIGNALS",
            "TERM",
            "signals",
            "USR1,USR2",
            ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"),
        ),
        ("PREEMPTED_EXIT_CODE", "42", "preempted_exit_code", 0, 0),
        ("MAX_ATTEMPTS", "3", "max_attempts", 1, 1),
    ],
)
def test_argument_beats_variable(
    monkeypatch, variable, value, argument, given, expected
):
    """An explicit argument overrides the variable, even a falsy one such as 0."""
    monkeypatch.setenv(f"RESUMABLE_{variable}", value)

    assert expected == getattr(resolve(declared, **{argument: given}), argument)


def test_empty_variables_are_ignored(monkeypatch):
    """A variable set to the empty string counts as unset."""
    for name in OPTIONS:
        monkeypatch.setenv(f"RESUMABLE_{name}", "")

    settings = resolve(declared)

    assert (12.0, ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"), 1, 10) == (
        settings.grace,
        settings.signals,
        settings.preempted_exit_code,
        settings.max_attempts,
    )


def test_run_passes_the_options_on(monkeypatch):
    """``resumable.run`` resolves its preemption arguments as Settings does."""
    seen: list[Settings] = []
    original = _runtime.Runtime.__init__

    def spy(self, step, settings, storage, progress=None, stop=None, group=None):
        seen.append(settings)
        original(self, step, settings, storage, progress, stop, group)

    monkeypatch.setattr(_runtime.Runtime, "__init__", spy)
    resumable.run(
        plain,
        storage=resumable.testing.memory_storage(),
        grace=4,
        signals=["USR2"],
        preempted_exit_code=9,
        max_attempts=2,
    )

    settings = seen[0]
    assert (4.0, ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2"), 9, 2) == (
        settings.grace,
        settings.signals,
        settings.preempted_exit_code,
        settings.max_attempts,
    )


@pytest.mark.parametrize("grace", [0, -1, math.nan, "5"])
def test_grace_must_be_a_positive_number(grace):
    """A grace that is no positive number of seconds is refused, naming grace."""
    with pytest.raises(ConfigurationError, match="grace"):
        resolve(grace=grace)


@pytest.mark.parametrize("value", ["abc", "0", "-2", "nan"])
def test_grace_variable_must_be_a_positive_number(monkeypatch, value):
    """RESUMABLE_GRACE that is no positive number of seconds is refused."""
    monkeypatch.setenv("RESUMABLE_GRACE", value)

    with pytest.raises(ConfigurationError, match=r"(?i)grace"):
        resolve()


@pytest.mark.parametrize(
    "names", [["NOPE"], ["TERM", "SIGBOGUS"], "TERM,,USR9", ["SIG"]]
)
def test_unknown_signal_names_are_refused(names):
    """A signal name this platform lacks raises ConfigurationError naming it."""
    with pytest.raises(ConfigurationError, match="is not a signal"):
        resolve(signals=names)


def test_unknown_signal_in_variable_is_refused(monkeypatch):
    """RESUMABLE_SIGNALS with an unknown name raises ConfigurationError."""
    monkeypatch.setenv("RESUMABLE_SIGNALS", "TERM,BOGUS")

    with pytest.raises(ConfigurationError, match="BOGUS"):
        resolve()


def test_unknown_signal_in_decorator_is_refused_at_declaration():
    """A declaration naming an unknown signal fails when the decorator applies."""
    with pytest.raises(ConfigurationError, match="NOPE"):
        resumable.step(init=Empty, steps=1, signals=("NOPE",))(noop)


@pytest.mark.parametrize("name", ["KILL", "SIGSTOP"])
def test_signals_that_cannot_be_caught_are_refused(name):
    """SIGKILL and SIGSTOP cannot be caught, so naming them is a configuration error."""
    with pytest.raises(ConfigurationError, match=name.removeprefix("SIG")):
        resolve(signals=["TERM", name])


def test_repeated_signal_names_count_once():
    """Names of one signal, spelt twice, resolve to that signal once."""
    settings = resolve(signals=["TERM", "SIGTERM", "term", "USR1"])

    assert ("SIGTERM", "SIGINT", "SIGUSR1") == settings.signals


@pytest.mark.parametrize("code", [-1, 256, 1.5, "1", True])
def test_preempted_exit_code_must_be_an_integer_from_0_to_255(code):
    """The preempted exit code must be an int an exit status can hold."""
    with pytest.raises(ConfigurationError, match="preempted_exit_code"):
        resolve(preempted_exit_code=code)


@pytest.mark.parametrize("value", ["-1", "x", "256"])
def test_preempted_exit_code_variable_is_checked(monkeypatch, value):
    """RESUMABLE_PREEMPTED_EXIT_CODE outside 0..255 or not an integer is refused."""
    monkeypatch.setenv("RESUMABLE_PREEMPTED_EXIT_CODE", value)

    with pytest.raises(ConfigurationError, match=r"(?i)preempted_exit_code"):
        resolve()


@pytest.mark.parametrize("attempts", [0, -3, 2.0, "2"])
def test_max_attempts_must_be_a_positive_integer(attempts):
    """max_attempts below 1 or not an int is refused, naming the option."""
    with pytest.raises(ConfigurationError, match="max_attempts"):
        resolve(max_attempts=attempts)


@pytest.mark.parametrize("value", ["0", "two"])
def test_max_attempts_variable_is_checked(monkeypatch, value):
    """RESUMABLE_MAX_ATTEMPTS below 1 or not an integer is refused."""
    monkeypatch.setenv("RESUMABLE_MAX_ATTEMPTS", value)

    with pytest.raises(ConfigurationError, match="MAX_ATTEMPTS"):
        resolve()


@pytest.mark.parametrize(
    "options", [{"grace": 0}, {"grace": -5.0}, {"signals": ("NOPE",)}]
)
def test_decorator_refuses_bad_preemption_options(options):
    """The decorator checks grace and signals as it checks its counts."""
    with pytest.raises(ConfigurationError):
        resumable.step(init=Empty, steps=1, **options)(noop)
