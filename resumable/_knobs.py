"""Every environment variable that resumable reads, in one place."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

from resumable.errors import ConfigurationError

# Prefix of every variable; the rest of the name is the option's, in upper case.
ENV_PREFIX = "RESUMABLE_"
# Variables that override the decorator and are overridden by the command line.
STORAGE = ENV_PREFIX + "STORAGE"
STEPS = ENV_PREFIX + "STEPS"
EVERY = ENV_PREFIX + "EVERY"
KEEP = ENV_PREFIX + "KEEP"
# Retries of a failed remote storage call, and the seconds of their waits'
# base and cap (see _retry.py).
RETRIES = ENV_PREFIX + "RETRIES"
RETRY_DELAY = ENV_PREFIX + "RETRY_DELAY"
RETRY_MAX_DELAY = ENV_PREFIX + "RETRY_MAX_DELAY"
# botocore's own variables that choose its retries: set, they are the user's choice.
AWS_RETRY_VARIABLES = ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE")


# False while settings are resolved without the environment.
_enabled = True


@contextlib.contextmanager
def environment(*, enabled: bool) -> Iterator[None]:
    """Read the variables, or act as if none were set, within the block."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def env_str(name: str) -> str | None:
    """Return a variable's value, or None where it is unset or empty."""
    return (os.environ.get(name) or None) if _enabled else None


def env_int(name: str, minimum: int, maximum: int | None = None) -> int | None:
    """
    Return a variable's integer value, or None where it is unset or empty.

    Raises:
        ConfigurationError: The value is no integer from ``minimum`` to
            ``maximum``.
    """
    text = env_str(name)
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        msg = (
            f"{name}={text!r} is not an integer. Set it to a whole number or unset it."
        )
        raise ConfigurationError(msg) from None
    if value < minimum:
        msg = f"{name}={value} is below {minimum}. Set it to {minimum} or more."
        raise ConfigurationError(msg)
    if maximum is not None and value > maximum:
        msg = f"{name}={value} is above {maximum}. Set it to {maximum} or less."
        raise ConfigurationError(msg)

    return value


GRACE = ENV_PREFIX + "GRACE"
SIGNALS = ENV_PREFIX + "SIGNALS"
PREEMPTED_EXIT_CODE = ENV_PREFIX + "PREEMPTED_EXIT_CODE"
MAX_ATTEMPTS = ENV_PREFIX + "MAX_ATTEMPTS"
# A JSON object of fsspec storage options, added to the decorator's key by key.
STORAGE_OPTIONS = ENV_PREFIX + "STORAGE_OPTIONS"


def env_float(name: str, minimum: float) -> float | None:
    """
    Return a variable's number, or None where it is unset or empty.

    Raises:
        ConfigurationError: The value is no number of at least ``minimum``.
    """
    text = env_str(name)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        msg = f"{name}={text!r} is not a number. Set it to seconds, e.g. 30."
        raise ConfigurationError(msg) from None
    if not value >= minimum:
        msg = f"{name}={value} is below {minimum}. Set it to {minimum} or more."
        raise ConfigurationError(msg)

    return value


# Uploads to S3: the size of each part of a multipart upload in MiB, and how many
# parts are in flight at once (memory held is about their product).
UPLOAD_PART_MIB = ENV_PREFIX + "UPLOAD_PART_MIB"
UPLOAD_CONCURRENCY = ENV_PREFIX + "UPLOAD_CONCURRENCY"
# 0 writes every snapshot in the training loop's time; 1 (the default) writes those
# of the cadence in the background.
BACKGROUND = ENV_PREFIX + "BACKGROUND"
# Under torchrun: seconds a rank waits for the others at a safe point, and around
# storage (a snapshot's write, a resume), before it reports them lost.
DIST_TIMEOUT = ENV_PREFIX + "DIST_TIMEOUT"
DIST_IO_TIMEOUT = ENV_PREFIX + "DIST_IO_TIMEOUT"
# Under torchrun: 1 (the default) lays DDP's gradient buckets out in parameter
# order before the first step, so that a resume reduces bit-identically; 0 keeps
# DDP's own layout (bit-identical resumes with 2 ranks only).
DIST_PIN_BUCKETS = ENV_PREFIX + "DIST_PIN_BUCKETS"
# What torchrun sets for each process it starts.
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched_rank() -> tuple[int, int] | None:
    """Return (rank, world size) as torchrun set them, or None where it did not."""
    if not all(os.environ.get(name) for name in LAUNCH_VARIABLES):
        return None
    try:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except ValueError:
        return None


def local_rank() -> int:
    """Return torchrun's LOCAL_RANK, the GPU of this process; 0 where unset."""
    return int(os.environ.get("LOCAL_RANK") or 0)


def env_json_object(name: str) -> dict[str, Any] | None:
    """
    Return a variable's JSON object, or None where it is unset or empty.

    Raises:
        ConfigurationError: The value is not a JSON object.
    """
    text = env_str(name)
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as err:
        msg = (
            f"{name} is not valid JSON ({err}). Set it to an object such as "
            '\'{"endpoint_url": "http://host:9000"}\' or unset it.'
        )
        raise ConfigurationError(msg) from None
    if not isinstance(value, dict):
        msg = f"{name} must hold a JSON object, not {text!r}."
        raise ConfigurationError(msg)

    return value
