"""
Tests of ``resumable._signals``: a handler only sets the stop flag, handlers the
user installed are chained and restored, a second signal and the watchdog end the
process with every committed snapshot intact, and signal names are parsed.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import attrs
import pytest

import resumable
from resumable._archive import Archive
from resumable._loading import list_snapshots
from resumable._signals import SignalCatcher, StopRequest, Watchdog, parse_signals
from resumable._storage import Storage
from resumable.errors import ConfigurationError
from resumable.testing import memory_storage

SCRIPTS = Path(__file__).parent / "scripts"
# Every signal these tests install a handler for; the fixture puts them back.
TOUCHED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


@pytest.fixture(autouse=True)
def restore_handlers(monkeypatch):
    """Put back the process's handlers, whatever a test or the library left."""
    for name in ("STORAGE", "STEPS", "EVERY", "KEEP", "GRACE", "SIGNALS"):
        monkeypatch.delenv(f"RESUMABLE_{name}", raising=False)
    saved = {signum: signal.getsignal(signum) for signum in TOUCHED}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, signal.SIG_DFL if handler is None else handler)


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


class Recorder:
    """A user's signal handler that records what it was called with."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, signum: int, frame: Any) -> None:
        self.calls.append(signum)


# --- StopRequest and parse_signals -------------------------------------------------


def test_stop_request_starts_unrequested():
    """A fresh request is not requested, names no signal and has no elapsed time."""
    stop = StopRequest()

    assert (False, None, 0.0) == (stop.requested, stop.signal, stop.elapsed())


def test_first_request_is_kept_and_later_ones_counted():
    """The first request fixes the signal and the time; later ones only count."""
    stop = StopRequest()
    stop.request(signal.SIGTERM)
    since = stop.since
    stop.request(signal.SIGUSR1)

    assert (True, signal.SIGTERM, since, 2) == (
        stop.requested,
        stop.signal,
        stop.since,
        stop.count,
    )


def test_elapsed_counts_from_the_first_request():
    """elapsed() is the time since the first request, not since the last."""
    stop = StopRequest()
    stop.request(None)
    time.sleep(0.05)
    stop.request(None)

    assert 0.05 <= stop.elapsed() < 5


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["TERM"], [signal.SIGTERM]),
        (["SIGUSR2"], [signal.SIGUSR2]),
        ([" usr1 ", "sigint"], [signal.SIGUSR1, signal.SIGINT]),
        ([], []),
    ],
)
def test_parse_signals_takes_names_with_or_without_sig(names, expected):
    """Names parse with or without SIG, in any case, around spaces, in order."""
    assert expected == parse_signals(names)


@pytest.mark.parametrize("name", ["NOPE", "SIG", "USR9", "15"])
def test_parse_signals_refuses_unknown_names(name):
    """A name that is no signal here raises ValueError quoting it."""
    with pytest.raises(ValueError, match="is not a signal here"):
        parse_signals([name])


def test_bad_signal_name_is_a_configuration_error_at_run():
    """A run given an unknown signal name fails with ConfigurationError."""
    with pytest.raises(ConfigurationError, match="BOGUS"):
        resumable.run(ticks, storage=memory_storage(), signals=["TERM", "BOGUS"])


# --- SignalCatcher -------------------------------------------------------------------


def test_handler_only_sets_the_flag():
    """A caught signal records the request and the signal; the process goes on."""
    stop = StopRequest()
    catcher = SignalCatcher(stop, [signal.SIGUSR1], exit_code=3)
    catcher.install()
    try:
        signal.raise_signal(signal.SIGUSR1)
        caught = (stop.requested, stop.signal, stop.count)
    finally:
        catcher.restore()

    assert (True, signal.SIGUSR1, 1) == caught


def test_user_handler_is_chained_and_restored():
    """A handler installed before the catcher is called too, then restored."""
    user = Recorder()
    signal.signal(signal.SIGUSR1, user)
    stop = StopRequest()
    catcher = SignalCatcher(stop, [signal.SIGUSR1], exit_code=3)
    catcher.install()
    signal.raise_signal(signal.SIGUSR1)
    catcher.restore()

    assert ([signal.SIGUSR1], True) == (user.calls, stop.requested)
    assert user is signal.getsignal(signal.SIGUSR1)


@pytest.mark.parametrize("previous", [signal.SIG_DFL, signal.SIG_IGN])
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM])
def test_default_and_ignore_dispositions_are_restored(previous, signum):
    """SIG_DFL and SIG_IGN are put back as they were, and are not called."""
    signal.signal(signum, previous)
    stop = StopRequest()
    catcher = SignalCatcher(stop, [signum], exit_code=3)
    catcher.install()
    signal.raise_signal(signum)
    catcher.restore()

    assert (previous, True) == (signal.getsignal(signum), stop.requested)


def test_sigint_default_handler_is_not_chained():
    """Ctrl-C with Python's default handler sets the flag and raises nothing."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    stop = StopRequest()
    catcher = SignalCatcher(stop, [signal.SIGINT], exit_code=3)
    catcher.install()
    try:
        signal.raise_signal(signal.SIGINT)
    finally:
        catcher.restore()

    assert (True, signal.default_int_handler) == (
        stop.requested,
        signal.getsignal(signal.SIGINT),
    )


def test_repeated_signal_restores_the_users_handler():
    """A signal listed twice still gets the handler from before the run back."""
    user = Recorder()
    signal.signal(signal.SIGUSR1, user)
    catcher = SignalCatcher(StopRequest(), [signal.SIGUSR1] * 2, exit_code=3)
    catcher.install()
    catcher.restore()

    assert user is signal.getsignal(signal.SIGUSR1)


def test_install_outside_the_main_thread_installs_nothing(log):
    """Off the main thread, install() says False, warns, and leaves handlers alone."""
    before = signal.getsignal(signal.SIGUSR1)
    catcher = SignalCatcher(StopRequest(), [signal.SIGUSR1], exit_code=3)
    returned: list[bool] = []
    thread = threading.Thread(target=lambda: returned.append(catcher.install()))
    thread.start()
    thread.join()

    assert [False] == returned
    assert before is signal.getsignal(signal.SIGUSR1)
    assert any("signals not caught" in message for message in log.messages)


def test_handler_does_nothing_in_a_forked_child():
    """A forked child (a data worker) neither records a request nor exits on one."""
    stop = StopRequest()
    catcher = SignalCatcher(stop, [signal.SIGUSR1], exit_code=3)
    catcher.install()
    try:
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports by its exit code
            signal.raise_signal(signal.SIGUSR1)
            signal.raise_signal(signal.SIGUSR1)
            os._exit(5 if stop.requested else 0)
        _, status = os.waitpid(pid, 0)
    finally:
        catcher.restore()

    assert (0, False) == (os.waitstatus_to_exitcode(status), stop.requested)


# --- Watchdog ------------------------------------------------------------------------


def test_watchdog_exits_with_the_code_at_the_deadline():
    """With a request, the watchdog ends the process with its code at the deadline."""
    code = (
        "import time\n"
        "from resumable._signals import StopRequest, Watchdog\n"
        "stop = StopRequest()\n"
        "Watchdog(stop, 0.3, 7).start()\n"
        "print(time.monotonic(), flush=True)\n"
        "stop.request(None)\n"
        "time.sleep(20)\n"
    )
    with subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as child:
        requested = float(child.stdout.readline())
        exit_code, stderr = wait_for(child)
    seconds = time.monotonic() - requested

    assert 7 == exit_code
    assert 0.3 <= seconds < 1.0
    assert "grace period spent" in stderr


def test_watchdog_without_a_request_only_watches_until_stopped():
    """Without a request a zero deadline never fires, and stop() ends the thread."""
    watchdog = Watchdog(StopRequest(), 0.0, exit_code=3)
    watchdog.start()
    time.sleep(0.15)
    watchdog.stop()

    names = [thread.name for thread in threading.enumerate()]
    assert "resumable-watchdog" not in names


# --- signals during a run ------------------------------------------------------------


@attrs.define
class Ticks:
    done: list[int] = attrs.Factory(list)


# Where ``ticks`` sends itself a signal: {"step": index, "signal": signum}.
SEND: dict[str, Any] = {}
# What ``ticks`` saw installed for SIGUSR1 during a run.
SEEN: list[Any] = []


def make_ticks() -> Ticks:
    if SEND.get("step") == "init":
        signal.raise_signal(SEND["signal"])
    return Ticks()


@resumable.step(init=make_ticks, steps=5, every=3, keep=10)
def ticks(state: Ticks, step: int) -> None:
    SEEN.append(signal.getsignal(signal.SIGUSR1))
    if SEND.get("step") == step:
        signal.raise_signal(SEND["signal"])
    if SEND.get("raise") == step:
        raise RuntimeError("the step failed")
    state.done.append(step)


@pytest.fixture
def send():
    """Set where ``ticks`` signals itself; cleared after the test."""
    SEND.clear()
    SEEN.clear()
    yield SEND
    SEND.clear()
    SEEN.clear()


def committed_steps(storage: str) -> list[int]:
    archive = Archive(Storage.open(storage), ticks.program)

    return [entry.step for entry in archive.listing()]


def test_signal_in_a_step_stops_the_run_after_that_step(send, log):
    """A signal during step 1 finishes it, snapshots step 2, and ends preempted."""
    send.update(step=1, signal=signal.SIGUSR1)
    storage = memory_storage()

    result = resumable.run(ticks, storage=storage)

    assert (True, 2, [0, 1]) == (result.preempted, result.step, result.state.done)
    assert [2] == committed_steps(storage)
    assert any(
        message.startswith("preempted: cause=SIGUSR1, step=2, snapshot committed")
        for message in log.messages
    )


def test_run_stopped_by_a_signal_resumes_where_it_stopped(send):
    """The next run continues from the preemption snapshot, each step once."""
    send.update(step=1, signal=signal.SIGTERM)
    storage = memory_storage()
    resumable.run(ticks, storage=storage)
    send.clear()

    result = resumable.run(ticks, storage=storage)

    assert (False, 5, [0, 1, 2, 3, 4]) == (
        result.preempted,
        result.step,
        result.state.done,
    )


def test_users_handler_is_called_during_a_run_and_restored_after(send):
    """The user's SIGUSR1 handler sees the signal, and is installed again after."""
    user = Recorder()
    signal.signal(signal.SIGUSR1, user)
    send.update(step=0, signal=signal.SIGUSR1)

    result = resumable.run(ticks, storage=memory_storage())

    assert ([signal.SIGUSR1], True) == (user.calls, result.preempted)
    assert user is signal.getsignal(signal.SIGUSR1)


def test_ignored_signal_still_stops_the_run_and_stays_ignored(send):
    """A signal the process ignored stops a run, and is ignored again after it."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    send.update(step=0, signal=signal.SIGUSR1)

    result = resumable.run(ticks, storage=memory_storage())

    assert (True, signal.SIG_IGN) == (
        result.preempted,
        signal.getsignal(signal.SIGUSR1),
    )


def test_ctrl_c_stops_the_run_without_keyboard_interrupt(send):
    """SIGINT stops the run at the step's end; Python's handler is back after."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    send.update(step=3, signal=signal.SIGINT)

    result = resumable.run(ticks, storage=memory_storage())

    assert (True, 4) == (result.preempted, result.step)
    assert signal.default_int_handler is signal.getsignal(signal.SIGINT)


def test_signal_during_init_stops_before_the_first_step(send):
    """Handlers are in place before init(); a signal there runs no step."""
    send.update(step="init", signal=signal.SIGTERM)

    result = resumable.run(ticks, storage=memory_storage())

    assert (True, 0, []) == (result.preempted, result.step, result.state.done)


def test_named_signals_join_the_defaults(send):
    """With signals=["USR2"], SIGUSR2 stops the run and SIGUSR1 still does too."""
    user = Recorder()
    signal.signal(signal.SIGUSR1, user)
    signal.signal(signal.SIGUSR2, signal.SIG_DFL)
    send.update(step=1, signal=signal.SIGUSR2)

    result = resumable.run(ticks, storage=memory_storage(), signals=["USR2"])

    assert (True, 2) == (result.preempted, result.step)
    assert user is signal.getsignal(signal.SIGUSR1)
    assert signal.SIG_DFL == signal.getsignal(signal.SIGUSR2)


def test_handlers_are_restored_when_the_step_raises(send):
    """A run that fails in the user's step leaves the handlers as it found them."""
    user = Recorder()
    signal.signal(signal.SIGTERM, user)
    send.update({"raise": 1})

    with pytest.raises(RuntimeError, match="the step failed"):
        resumable.run(ticks, storage=memory_storage())

    assert user is signal.getsignal(signal.SIGTERM)


def test_handlers_are_restored_when_a_signal_cannot_be_caught():
    """Naming SIGKILL fails the run and leaves every handler as it was."""
    user = Recorder()
    signal.signal(signal.SIGTERM, user)

    with pytest.raises((ConfigurationError, OSError)):
        resumable.run(ticks, storage=memory_storage(), signals=["TERM", "KILL"])

    assert user is signal.getsignal(signal.SIGTERM)


def test_run_outside_the_main_thread_finishes_without_handlers(send, log):
    """A run on another thread warns that signals are not caught and finishes."""
    before = signal.getsignal(signal.SIGUSR1)
    results: list[Any] = []
    thread = threading.Thread(
        target=lambda: results.append(resumable.run(ticks, storage=memory_storage()))
    )
    thread.start()
    thread.join()

    assert (5, False) == (results[0].step, results[0].preempted)
    assert [before] * 5 == SEEN
    assert any("signals not caught" in message for message in log.messages)


# --- real signals to a training process ----------------------------------------------


def start_sleeper(tmp_path: Path, grace: float) -> tuple[subprocess.Popen[str], str]:
    """Start the sleeper script and wait until its step 2 sleeps."""
    storage = f"file://{tmp_path}/store"
    child = subprocess.Popen(
        [sys.executable, str(SCRIPTS / "preempt_sleeper.py"), storage, str(grace)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = child.stdout.readline()
    if line != "ready\n":
        child.kill()
        _, stderr = child.communicate()
        pytest.fail(f"the sleeper did not start: {line!r} {stderr}")
    return child, storage


def wait_for(child: subprocess.Popen[str]) -> tuple[int, str]:
    """Wait for a child this test started; kill it if it outlives the timeout."""
    try:
        _, stderr = child.communicate(timeout=20)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    return child.returncode, stderr


def snapshots(storage: str) -> list[tuple[int, str | None]]:
    return [(entry.step, problem) for entry, problem in list_snapshots(storage)]


def test_second_signal_exits_at_once_leaving_snapshots_intact(tmp_path):
    """A second SIGTERM ends a busy run at once; committed snapshots still verify."""
    child, storage = start_sleeper(tmp_path, grace=60)
    child.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    sent = time.monotonic()
    child.send_signal(signal.SIGTERM)
    code, stderr = wait_for(child)
    seconds = time.monotonic() - sent

    assert 1 == code
    assert seconds < 2.0
    assert "second signal" in stderr
    assert [(2, None), (1, None)] == snapshots(storage)


def test_grace_spent_exits_in_time_leaving_snapshots_intact(tmp_path):
    """A step that never reaches a safe point is ended before the grace runs out."""
    child, storage = start_sleeper(tmp_path, grace=3)
    sent = time.monotonic()
    child.send_signal(signal.SIGTERM)
    code, stderr = wait_for(child)
    seconds = time.monotonic() - sent

    assert 1 == code
    assert 2.6 <= seconds < 3.0
    assert "grace period spent" in stderr
    assert [(2, None), (1, None)] == snapshots(storage)
