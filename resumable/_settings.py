"""The options of a run, each resolved: argument, RESUMABLE_* variable, decorator."""

from __future__ import annotations

from typing import Any

import attrs

from resumable import _knobs
from resumable._step import (
    DEFAULT_SIGNALS,
    Step,
    check_count,
    check_grace,
    check_signals,
    check_storage_options,
)
from resumable.errors import ConfigurationError

# Exit code of a run stopped by a signal after a good snapshot: Run:AI's advice.
DEFAULT_PREEMPTED_EXIT_CODE = 1
# Starts from one snapshot after which a run is declared stuck.
DEFAULT_MAX_ATTEMPTS = 10


@attrs.frozen
class Settings:
    """The options of one run."""

    storage: str
    steps: int
    every: int
    keep: int
    fresh: bool = False
    storage_is_default: bool = False
    grace: float = 30.0
    signals: tuple[str, ...] = DEFAULT_SIGNALS
    preempted_exit_code: int = DEFAULT_PREEMPTED_EXIT_CODE
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    # The script's own arguments, where the CLI runs it; None from Python.
    arguments: tuple[str, ...] | None = None
    storage_options: dict[str, Any] = attrs.field(factory=dict)
    # Whether snapshots of the cadence are written in the background.
    background: bool = True

    @classmethod
    def resolve(
        cls, step: Step[Any], *, use_environment: bool = True, **given: Any
    ) -> Settings:
        """
        Resolve each option: argument, then RESUMABLE_* variable, then decorator.

        ``use_environment=False`` skips the variables (resumable.testing).
        """
        with _knobs.environment(enabled=use_environment):
            return cls._resolve(step, given)

    @classmethod
    def _resolve(cls, step: Step[Any], given: dict[str, Any]) -> Settings:
        storage = given.get("storage") or _knobs.env_str(_knobs.STORAGE)
        storage = storage or step.storage
        settings = cls(
            storage=str(storage or step.default_storage()),
            steps=_first(given.get("steps"), _knobs.STEPS, 0, step.steps),
            every=_first(given.get("every"), _knobs.EVERY, 1, step.every),
            keep=_first(given.get("keep"), _knobs.KEEP, 1, step.keep),
            fresh=bool(given.get("fresh", False)),
            storage_is_default=storage is None,
            grace=_grace(given.get("grace"), step.grace),
            signals=_signals(given.get("signals"), step.signals),
            preempted_exit_code=_first(
                given.get("preempted_exit_code"),
                _knobs.PREEMPTED_EXIT_CODE,
                0,
                DEFAULT_PREEMPTED_EXIT_CODE,
            ),
            arguments=given.get("arguments"),
            storage_options=_storage_options(
                given.get("storage_options"), step.storage_options
            ),
            max_attempts=_first(
                given.get("max_attempts"), _knobs.MAX_ATTEMPTS, 1, DEFAULT_MAX_ATTEMPTS
            ),
            background=_background(given.get("background")),
        )
        check_count("steps", settings.steps, 0)
        check_count("every", settings.every, 1)
        check_count("keep", settings.keep, 1)
        check_count("max_attempts", settings.max_attempts, 1)
        check_count("preempted_exit_code", settings.preempted_exit_code, 0)
        if not 0 <= settings.preempted_exit_code <= 255:
            msg = (
                f"preempted_exit_code must be 0 to 255, not "
                f"{settings.preempted_exit_code}."
            )
            raise ConfigurationError(msg)

        return settings


def _first(given: int | None, variable: str, minimum: int, declared: int) -> int:
    """Return the argument, else the environment variable, else the declaration."""
    if given is not None:
        return given
    from_environment = _knobs.env_int(variable, minimum)
    return declared if from_environment is None else from_environment


def _storage_options(
    given: dict[str, Any] | None, declared: dict[str, Any]
) -> dict[str, Any]:
    """Merge the options key by key: argument over variable over decorator."""
    from_environment = _knobs.env_json_object(_knobs.STORAGE_OPTIONS) or {}
    return {**declared, **from_environment, **check_storage_options(given or {})}


def _background(given: bool | None) -> bool:
    if given is not None:
        return bool(given)
    return bool(_knobs.env_int(_knobs.BACKGROUND, 0, maximum=1) != 0)


def _grace(given: float | None, declared: float) -> float:
    grace = given
    if grace is None:
        grace = _knobs.env_float(_knobs.GRACE, 0.0)
    if grace is None:
        grace = declared
    return check_grace(grace)


def _signals(given: Any, declared: tuple[str, ...]) -> tuple[str, ...]:
    names = given
    if names is None and _knobs.env_str(_knobs.SIGNALS) is not None:
        names = str(_knobs.env_str(_knobs.SIGNALS)).split(",")
    if names is None:
        names = declared
    return check_signals(names)
