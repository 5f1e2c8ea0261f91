"""
Bounded retries of remote storage calls: which errors pass, how long to wait.

A call that fails with an error that may pass (a reset, refused or closed
connection, a timeout, a 5xx or throttling answer) runs again after capped
exponential waits with jitter, ``RESUMABLE_RETRIES`` times at most; errors that
will not change are raised at once; then a StorageError says what to do. Local
file systems are never retried. On s3 this policy replaces botocore's retries,
turned off where the user chose none; s3fs's own loop and timeouts stay, so a
call gives up within 31 s of fast errors and 492 s of stalls (see
``client_options``). A stall in a preemption ends at the grace deadline.
"""

from __future__ import annotations

import errno
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Concatenate, ParamSpec, TypeVar

from resumable import _knobs
from resumable.errors import StorageError

logger = logging.getLogger(__name__)

T = TypeVar("T")
P = ParamSpec("P")

# Retries after the first attempt, and the waits' base and cap, in seconds.
_RETRIES = 5
_DELAY = 1.0
_MAX_DELAY = 30.0
# Errno values of errors that may pass: s3fs gives EREMOTEIO for HTTP 500 and
# EBUSY for 503 and SlowDown; the others come from sockets.
_TRANSIENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "EREMOTEIO",
        "EBUSY",
        "EAGAIN",
        "ETIMEDOUT",
        "ECONNRESET",
        "ECONNREFUSED",
        "ECONNABORTED",
        "EPIPE",
        "ENETDOWN",
        "ENETUNREACH",
        "EHOSTUNREACH",
    )
    if hasattr(errno, name)
)
# Classes of botocore, aiohttp, urllib3 and http.client that mean a connection
# failed or timed out; matched by name so that none of them is imported.
_TRANSIENT_CLASSES = frozenset(
    {
        "HTTPClientError",
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "ResponseStreamingError",
        "ResponseParserError",
        "ClientConnectionError",
        "ClientPayloadError",
        "ServerTimeoutError",
        "IncompleteRead",
        "ProtocolError",
    }
)
# Error codes of object stores that mean "slow down" or "try again".
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestTimeout",
        "InternalError",
        "ServiceUnavailable",
    }
)
# Answers that will not change, whatever their errno (s3fs often gives none).
_PERMANENT_TYPES = (
    PermissionError,
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
)
# HTTP statuses that may pass: too many requests and server errors but 501.
_TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


def is_transient(err: BaseException) -> bool:
    """Say whether ``err``, or what caused it, may pass if the call is repeated."""
    chain = list(_causes(err))
    for cause in chain:
        status, code = _answer(cause)
        if status is not None or code is not None:
            return status in _TRANSIENT_STATUSES or code in _TRANSIENT_CODES
    for cause in chain:
        # A StorageError only translates its cause; an OSError without an
        # errno says too little: what caused it decides.
        verdict = None if isinstance(cause, StorageError) else _verdict(cause)
        if verdict is not None:
            return verdict
    return False


class RetryPolicy:
    """
    How often and how long to retry a failed remote call.

    ``sleep``, ``clock`` and ``jitter`` (a number in [0, 1)) are injectable, so
    that tests neither wait nor guess.
    """

    def __init__(
        self,
        retries: int = _RETRIES,
        delay: float = _DELAY,
        max_delay: float = _MAX_DELAY,
        *,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.attempts = retries + 1
        self.delay = delay
        self.max_delay = max_delay
        self._sleep = sleep
        self._clock = clock
        self._jitter = jitter
        # Calls in progress on this thread: only the outermost one retries.
        self._active = threading.local()

    @classmethod
    def from_environment(cls) -> RetryPolicy:
        """
        Return the policy that the RESUMABLE_RETRY* variables set.

        Raises:
            ConfigurationError: A variable holds no valid value.
        """
        retries = _knobs.env_int(_knobs.RETRIES, 0)
        delay = _knobs.env_float(_knobs.RETRY_DELAY, 0.0)
        max_delay = _knobs.env_float(_knobs.RETRY_MAX_DELAY, 0.0)
        return cls(
            _RETRIES if retries is None else retries,
            _DELAY if delay is None else delay,
            _MAX_DELAY if max_delay is None else max_delay,
        )

    def wait(self, attempt: int) -> float:
        """Return the seconds to wait after failed attempt ``attempt`` (from 1)."""
        ceiling = min(self.max_delay, self.delay * 2.0 ** (attempt - 1))
        # Between half the ceiling and all of it: processes that failed together
        # spread out, and the total wait stays known.
        return ceiling * (0.5 + 0.5 * self._jitter())

    def call(
        self,
        action: str,
        where: str,
        function: Callable[[], T],
        *,
        resend: bool = True,
        storage: str | None = None,
    ) -> T:
        """
        Call ``function``, again after transient failures, up to the attempts.

        ``action``, ``where`` and ``storage`` name the call in messages, such as
        "read", "bucket/store/file" and its storage's URL; ``resend`` False allows
        one attempt only (its input cannot be replayed).

        Raises:
            StorageError: Every attempt failed with a transient error.
        """
        if getattr(self._active, "depth", 0):
            return function()
        what = f"{action} {where}" + (f" on storage {storage!r}" if storage else "")
        self._active.depth = 1
        try:
            return self._attempt((action, where, what), function, resend)
        finally:
            self._active.depth = 0

    def _attempt(
        self, names: tuple[str, str, str], function: Callable[[], T], resend: bool
    ) -> T:
        action, where, what = names
        attempts = self.attempts if resend else 1
        started = self._clock()
        attempt = 1
        while True:
            try:
                return function()
            except Exception as err:
                if not is_transient(err):
                    raise
                if attempt >= attempts:
                    elapsed = self._clock() - started
                    msg = _exhausted(what, attempt, elapsed, err)
                    raise StorageError(msg) from err
                wait = self.wait(attempt)
                logger.warning(
                    "storage retry: action=%s, path=%s, attempt=%d/%d, error=%s, "
                    "wait=%.2fs",
                    *(action, where, attempt, attempts, _describe(err), wait),
                )
                self._sleep(wait)
                attempt += 1


def retried(
    action: str,
) -> Callable[[Callable[Concatenate[Any, P], T]], Callable[Concatenate[Any, P], T]]:
    """
    Retry a method of a storage with the storage's ``retry`` policy, if any.

    The path in messages joins the method's string arguments under the root;
    a call given an iterator is not repeated, since it cannot be replayed.
    """

    def decorate(
        method: Callable[Concatenate[Any, P], T],
    ) -> Callable[Concatenate[Any, P], T]:
        @functools.wraps(method)
        def wrapper(storage: Any, /, *args: P.args, **kwargs: P.kwargs) -> T:
            policy: RetryPolicy | None = storage.retry
            if policy is None:
                return method(storage, *args, **kwargs)
            given = [*args, *kwargs.values()]
            path = storage.path(*(part for part in given if isinstance(part, str)))
            return policy.call(
                action,
                path,
                lambda: method(storage, *args, **kwargs),
                resend=not any(isinstance(part, Iterator) for part in given),
                storage=storage.url,
            )

        return wrapper

    return decorate


# Why botocore's retries go (measured through the tests' faulty proxy): botocore
# retries 5xx, throttling and connection errors (5 attempts, its legacy default)
# and s3fs's own loop retries timeouts, closed connections and SlowDown 5 times
# around it. One call then made 25 requests: 27 to 41 s against a server that
# answers 503, 25 read timeouts (90 s at 2 s each, about 415 s at s3fs's 15 s)
# against one that stalls; this policy on top would multiply that by 6. s3fs's
# loop cannot be configured and stays: at most 5 requests and 1.9 s of sleep per
# attempt. Its timeouts (connect 5 s, read 15 s; botocore's are 60 s) stay too:
# tighter ones would fail slow but healthy servers. With the defaults a call
# gives up after 16 to 31 s of errors that come at once (25 s measured against a
# refused connection), and within 6 x (5 x 15 + 1.9) + 31 = 492 s against a
# server that stalls every request (67 s measured at a 1 s read timeout).
def client_options(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """
    Return ``options`` with botocore's retries off for an s3 URL that sets none.

    Options come from the user and fsspec's configuration; the environment's
    AWS_MAX_ATTEMPTS and AWS_RETRY_MODE count as the user's choice too.
    """
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in ("s3", "s3a"):
        return options
    import fsspec.config

    configured = {**fsspec.config.conf.get("s3", {}), **options}
    config = dict(configured.get("config_kwargs") or {})
    chosen = any(_knobs.env_str(name) for name in _knobs.AWS_RETRY_VARIABLES)
    if "retries" in config or chosen:
        return options
    config["retries"] = {"total_max_attempts": 1}

    return {**options, "config_kwargs": config}


def _causes(err: BaseException) -> Iterator[BaseException]:
    """Yield ``err`` and what caused it, nearest first, as a traceback shows them."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        context = None if current.__suppress_context__ else current.__context__
        current = current.__cause__ or context


def _verdict(err: BaseException) -> bool | None:
    """Say whether ``err`` itself may pass; None where only its cause can tell."""
    names = {kind.__name__ for kind in type(err).__mro__}
    if "SSLError" in names or isinstance(err, _PERMANENT_TYPES):
        return False
    if isinstance(err, (ConnectionError, TimeoutError)) or names & _TRANSIENT_CLASSES:
        return True
    if isinstance(err, OSError):
        return None if err.errno is None else err.errno in _TRANSIENT_ERRNOS
    return False


def _answer(err: BaseException) -> tuple[int | None, str | None]:
    """Return the HTTP status and error code that a server's answer carried."""
    response = getattr(err, "response", None)
    if isinstance(response, dict):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = response.get("Error", {}).get("Code")
        return (status if isinstance(status, int) else None), code
    status = getattr(err, "code", None)
    if isinstance(status, int) and 100 <= status < 600:
        return status, None
    return None, None


def _describe(err: BaseException) -> str:
    """Name the error underneath a StorageError, and the server's answer, briefly."""
    if isinstance(err, StorageError) and err.__cause__ is not None:
        err = err.__cause__
    text = " ".join(str(err).split())[:200]
    answers = [_answer(cause) for cause in _causes(err)]
    status, code = next(
        (found for found in answers if found != (None, None)), (None, None)
    )
    if status is not None:
        # A HEAD answer has no body: its code is the status again.
        named = f" {code}" if code and code != str(status) else ""
        text += f" (HTTP {status}{named})"

    return f"{type(err).__name__}: {text}"


def _exhausted(what: str, attempts: int, elapsed: float, err: BaseException) -> str:
    tries = "1 attempt" if attempts == 1 else f"{attempts} attempts"
    return (
        f"Cannot {what}: gave up after {tries} over {elapsed:.1f} s; the last "
        f"error was {_describe(err)}. "
        "Check that the endpoint answers and that the network reaches it (set "
        f"{_knobs.RETRIES} to retry longer), then run the same command again: it "
        "resumes from the newest committed snapshot."
    )
