"""The ``@resumable.step`` decorator: one epoch's body and how it is to be run."""

from __future__ import annotations

import functools
import inspect
import math
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from resumable._signals import parse_signals
from resumable.errors import ConfigurationError

if TYPE_CHECKING:
    from resumable._runtime import Result

StateT = TypeVar("StateT")
StepFunction = Callable[[StateT, int], Mapping[str, Any] | None]

# Signals that ask a run to stop, by default: schedulers, Ctrl-C, SLURM's warning.
DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
# Module name under which the CLI loads the user's script, the same in every run,
# so that pickles of the script's classes find them again.
SCRIPT_MODULE = "__resumable_script__"
# Folder, next to the script, that holds runs given no storage URL.
DEFAULT_FOLDER = ".resumable"


class Step(Generic[StateT]):
    """
    A step function with the settings of its run.

    Calling it runs the body once, as a plain function; ``run()`` runs the loop.
    """

    def __init__(
        self,
        function: StepFunction[StateT],
        *,
        init: Callable[[], StateT],
        steps: int,
        every: int = 1,
        keep: int = 3,
        storage: str | None = None,
        storage_options: Mapping[str, Any] | None = None,
        grace: float = 30.0,
        signals: Sequence[str] = (),
    ) -> None:
        if not callable(init):
            msg = f"init must be a function that builds the state, not {init!r}."
            raise ConfigurationError(msg)
        check_count("steps", steps, 0)
        check_count("every", every, 1)
        check_count("keep", keep, 1)
        check_grace(grace)
        check_signals(signals)
        self.storage_options = check_storage_options(storage_options or {})
        self.function = function
        self.init = init
        self.steps = steps
        self.every = every
        self.keep = keep
        self.storage = storage
        self.grace = grace
        self.signals = tuple(signals)  # added to DEFAULT_SIGNALS
        functools.update_wrapper(self, function)

    def __call__(self, state: StateT, step: int) -> Mapping[str, Any] | None:
        return self.function(state, step)

    def __repr__(self) -> str:
        return f"<resumable.step {self.program} steps={self.steps}>"

    @property
    def name(self) -> str:
        return str(self.function.__qualname__)

    @property
    def program(self) -> str:
        """What identifies this step's snapshots: the script's file name and step."""
        return f"{os.path.basename(self.source_file)}:{self.name}"

    @property
    def source_file(self) -> str:
        return inspect.getfile(self.function)

    def default_storage(self) -> str:
        """Return the storage used where none is given: a folder by the script."""
        script = os.path.abspath(self.source_file)
        stem = os.path.splitext(os.path.basename(script))[0]
        folder = os.path.join(os.path.dirname(script), DEFAULT_FOLDER)
        return os.path.join(folder, f"{stem}.{self.name}")

    def expose_script(self) -> None:
        """
        Let pickles made under the CLI find the script's classes here too, where
        the script was imported under another name (``python train.py``, an
        evaluation script that imports it).
        """
        module = sys.modules.get(self.function.__module__)
        if module is not None:
            sys.modules.setdefault(SCRIPT_MODULE, module)

    def run(self, **options: Any) -> Result[StateT]:
        """Run the loop; takes the options of ``resumable.run``."""
        from resumable._runtime import run

        return run(self, **options)


def step(
    *,
    init: Callable[[], StateT],
    steps: int,
    every: int = 1,
    keep: int = 3,
    storage: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    grace: float = 30.0,
    signals: Sequence[str] = (),
) -> Callable[[StepFunction[StateT]], Step[StateT]]:
    """
    Declare the body of one step (one epoch, say) of a resumable run.

    Args:
        init: Builds a fresh state, an instance of an attrs class.
        steps: How many steps the run has; the body runs for 0 .. steps - 1.
        every: Snapshot after every this many steps (and after the last).
        keep: How many of the newest snapshots to keep.
        storage: An fsspec URL or path for snapshots; by default a folder next to
            the script.
        storage_options: Passed to fsspec with the URL (an S3 endpoint or
            profile, say); the command line and RESUMABLE_STORAGE_OPTIONS add to
            them, key by key.
        grace: Seconds between a stop signal and the kill that follows it; the
            runtime exits within them.
        signals: Names of further signals that ask the run to stop, besides
            SIGTERM, SIGINT and SIGUSR1 (SLURM's ``--signal=USR2``, say).

    Returns:
        A decorator that turns the function into a ``Step``.

    Raises:
        ConfigurationError: An argument is out of range.
    """

    def decorate(function: StepFunction[StateT]) -> Step[StateT]:
        return Step(
            function,
            init=init,
            steps=steps,
            every=every,
            keep=keep,
            storage=storage,
            storage_options=storage_options,
            grace=grace,
            signals=signals,
        )

    return decorate


def check_count(name: str, value: object, minimum: int) -> None:
    """Raise ConfigurationError unless ``value`` is an int of at least ``minimum``."""
    if type(value) is not int or value < minimum:
        msg = f"{name} must be an integer of at least {minimum}, not {value!r}."
        raise ConfigurationError(msg)


def check_storage_options(options: object) -> dict[str, Any]:
    """Return the options as a dict with string keys, or raise ConfigurationError."""
    if not isinstance(options, Mapping) or not all(
        isinstance(key, str) for key in options
    ):
        msg = (
            "storage_options must be a mapping of option names to values, "
            f"not {options!r}."
        )
        raise ConfigurationError(msg)
    return dict(options)


def check_grace(grace: object) -> float:
    """Return ``grace`` as seconds, or raise ConfigurationError."""
    if (
        isinstance(grace, bool)
        or not isinstance(grace, int | float)
        or not 0 < grace < math.inf
    ):
        msg = f"grace must be a positive, finite number of seconds, not {grace!r}."
        raise ConfigurationError(msg)
    return float(grace)


def check_signals(names: Any) -> tuple[str, ...]:
    """
    Return the stop signals: the defaults and ``names``, once each, in order.

    Raises:
        ConfigurationError: A name is no signal, or one that cannot be caught.
    """
    if isinstance(names, str):
        names = names.split(",")
    try:
        parsed = parse_signals(
            [*DEFAULT_SIGNALS, *(str(name) for name in names if str(name).strip())]
        )
    except ValueError as err:
        raise ConfigurationError(str(err)) from None
    uncatchable = {signal.SIGKILL, signal.SIGSTOP} & set(parsed)
    if uncatchable:
        msg = (
            f"{', '.join(sorted(s.name for s in uncatchable))} cannot be caught; "
            "name signals such as SIGTERM, SIGUSR1 or SIGUSR2."
        )
        raise ConfigurationError(msg)
    return tuple(dict.fromkeys(signal.name for signal in parsed))
