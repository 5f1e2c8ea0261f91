"""
Bounded retries of remote storage calls: which errors pass, how long to wait.

A call that fails with an error that may pass (a reset, refused or closed
connection, a timeout, an HTTP 5xx or throttling answer) runs again after a
capped exponential wait with jitter, at most ``RESUMABLE_RETRIES`` times more.
Errors that will not change (denied, missing, full, a failed precondition) are
raised at once. When the retries run out, a StorageError says what failed, for
how long, and what to do. Local file systems are never retried.

How the layers stack on s3fs (measured against the tests' faulty proxy): botocore
retries 5xx, throttling and connection errors up to 5 times (its legacy default),
and s3fs's own loop retries timeouts, closed connections and SlowDown up to 5
times around botocore, so one call could take 25 requests: 27 to 40 s for a
server that answers 503, and 375 s for one that stalls past s3fs's 15 s read
timeout. So where the user configured none, resumable turns botocore's retries
off (``config_kwargs={"retries": {"total_max_attempts": 1}}``) and owns the
policy. What remains inside one attempt is s3fs's loop: at most 5 requests and
1.9 s of sleep, for timeouts and SlowDown only; a stalled server costs 5 read
timeouts of 15 s (s3fs's defaults, kept: 4 times tighter than botocore's 60 s).
With the defaults (6 attempts, waits of 1, 2, 4, 8 and 16 s at most) a call
gives up within 31 s on errors that come fast, and within about 8 minutes on a
server that stalls every request. During a preemption the grace watchdog ends
the process at its deadline whatever the call is doing; commits stay atomic.
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
        if isinstance(cause, StorageError):
            continue
        names = {kind.__name__ for kind in type(cause).__mro__}
        if "SSLError" in names:
            return False
        if isinstance(cause, (ConnectionError, TimeoutError)):
            return True
        if names & _TRANSIENT_CLASSES:
            return True
        if isinstance(cause, OSError) and cause.errno is not None:
            return cause.errno in _TRANSIENT_ERRNOS
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
    """Yield ``err`` and what caused it, nearest first, each once."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


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
        text += f" (HTTP {status}{f' {code}' if code else ''})"

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
