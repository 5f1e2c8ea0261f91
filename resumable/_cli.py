"""
The command line: ``python -m resumable SCRIPT[:STEP] [options] [-- ARGS]`` and
``python -m resumable ls URL``. Loads the script, configures logging, maps errors
to exit codes. The only module that prints.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from resumable._knobs import (
    PREEMPTED_EXIT_CODE,
    SIGNALS,
    STORAGE_OPTIONS,
    env_int,
    env_json_object,
    env_str,
    launched_rank,
)
from resumable._loading import list_snapshots
from resumable._progress import ProgressDisplay
from resumable._runtime import run_with
from resumable._settings import Settings
from resumable._signals import SignalCatcher, StopRequest, parse_signals
from resumable._step import SCRIPT_MODULE, Step, check_signals
from resumable.errors import (
    ConfigurationError,
    RankLostError,
    ResumableError,
    SnapshotError,
    StateDefinitionError,
    StorageError,
    SupersededError,
)

logger = logging.getLogger(__name__)

# Exit codes; the README's table documents them for schedulers.
EXIT_FINISHED = 0
EXIT_PREEMPTED = 1
EXIT_USAGE = 2
EXIT_USER_CODE = 3
EXIT_INCOMPATIBLE = 4
EXIT_STORAGE = 5
EXIT_RANK_LOST = 6

_USAGE = """\
python -m resumable SCRIPT[:STEP] [options] [-- SCRIPT-ARGS]
       python -m resumable ls URL"""

_EPILOG = """\
exit codes: 0 finished, 1 preempted or superseded by a newer start of the same
run (run the same command again), 2 usage error,
3 the script raised, 4 do not retry: incompatible snapshots or no progress,
5 storage failure, 6 another rank of a torchrun job died or hung (run the job
again)"""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, script_args = _split(argv)
    if ours[:1] == ["ls"]:
        return _main_ls(ours[1:])
    options = _parser().parse_args(ours)
    _configure_logging(options.verbose - options.quiet)
    try:
        stop = StopRequest()
        step = _load_catching_signals(options, script_args, stop)
        settings = Settings.resolve(
            step,
            storage=options.storage,
            steps=options.steps,
            every=options.every,
            keep=options.keep,
            fresh=options.fresh,
            grace=options.grace,
            signals=options.signals,
            preempted_exit_code=options.preempted_exit_code,
            max_attempts=options.max_attempts,
            arguments=tuple(script_args),
            storage_options=options.storage_option,
        )
        progress = None if _rank() else ProgressDisplay(sys.stderr)
        result = run_with(step, settings, progress=progress, stop=stop)
        # The outcome is decided: a signal while the interpreter exits changes
        # nothing, and must not turn it into a kill.
        for name in settings.signals:
            signal.signal(signal.Signals[name], signal.SIG_IGN)
    except SupersededError as err:
        # Like a preemption: the newer incarnation carries on, and a scheduler
        # must not fail the whole job because an old pod stopped.
        print(f"resumable: stopped: {err}", file=sys.stderr)
        return _preempted_code(options.preempted_exit_code)
    except ResumableError as err:
        return _report(err)
    except Exception:
        traceback.print_exc()
        _error("the script raised; its snapshots are intact.")
        return EXIT_USER_CODE

    if result.finished:
        return EXIT_FINISHED
    # A preempted run may resume: the scheduler should run the same command.
    return settings.preempted_exit_code


def _load_catching_signals(
    options: argparse.Namespace, script_args: Sequence[str], stop: StopRequest
) -> Step[Any]:
    """Load the script with stop signals already caught: imports can be slow."""
    names = options.signals or env_str(SIGNALS) or ()
    catcher = SignalCatcher(
        stop,
        parse_signals(check_signals(names)),
        _preempted_code(options.preempted_exit_code),
    )
    catcher.install()
    try:
        return find_step(options.script, script_args)
    finally:
        catcher.restore()


def _preempted_code(given: int | None) -> int:
    """The exit code before settings are resolved (the script is not loaded yet)."""
    if given is not None:
        return given
    from_environment = env_int(PREEMPTED_EXIT_CODE, 0)
    return EXIT_PREEMPTED if from_environment is None else from_environment


def find_step(target: str, script_args: Sequence[str] = ()) -> Step[Any]:
    """
    Load the script in ``target`` (``path`` or ``path:name``) and return its step.

    Raises:
        ConfigurationError: No script there, or not exactly one step fits.
    """
    path, name = target, ""
    if not os.path.isfile(target) and ":" in target:
        path, _, name = target.rpartition(":")
    module = load_script(path, script_args)
    steps = {
        value.name: value for value in vars(module).values() if isinstance(value, Step)
    }
    if name:
        if name in steps:
            return steps[name]
        found = ", ".join(sorted(steps)) or "none"
        msg = f"{path} has no @resumable.step named {name!r}; found: {found}."
        raise ConfigurationError(msg)
    if len(steps) == 1:
        return next(iter(steps.values()))
    if not steps:
        msg = (
            f"{path} defines no @resumable.step function. Decorate the body of one "
            "step with @resumable.step(init=..., steps=...)."
        )
        raise ConfigurationError(msg)
    msg = (
        f"{path} defines several steps ({', '.join(sorted(steps))}). Choose one "
        f"with {path}:NAME."
    )
    raise ConfigurationError(msg)


def load_script(path: str, script_args: Sequence[str] = ()) -> ModuleType:
    """Import the script at ``path`` with ``sys.argv`` set to its own arguments."""
    if not os.path.isfile(path):
        msg = f"No script at {path!r}. Give the path of a Python file."
        raise ConfigurationError(msg)
    path = os.path.abspath(path)
    spec = importlib.util.spec_from_file_location(SCRIPT_MODULE, path)
    if spec is None or spec.loader is None:
        msg = f"Cannot import {path!r} as a Python script."
        raise ConfigurationError(msg)
    module = importlib.util.module_from_spec(spec)
    sys.modules[SCRIPT_MODULE] = module
    sys.argv = [path, *script_args]
    sys.path.insert(0, os.path.dirname(path))
    try:
        spec.loader.exec_module(module)
    except SyntaxError as err:
        msg = f"{path} is not valid Python: {err}. Fix the script."
        raise ConfigurationError(msg) from err

    return module


def _split(argv: list[str]) -> tuple[list[str], list[str]]:
    if "--" in argv:
        at = argv.index("--")
        return argv[:at], argv[at + 1 :]
    return argv, []


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m resumable",
        usage=_USAGE,
        description="Run a @resumable.step script; the same command resumes it.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("script", help="the script, or SCRIPT:STEP to choose a step")
    parser.add_argument("--storage", metavar="URL", help="fsspec URL or path")
    _add_storage_option(parser)
    parser.add_argument("--steps", type=_count(0), help="steps in all (extends a run)")
    parser.add_argument("--every", type=_count(1), help="snapshot every N steps")
    parser.add_argument("--keep", type=_count(1), help="snapshots to keep")
    parser.add_argument(
        "--fresh", action="store_true", help="start over; retention removes old ones"
    )
    parser.add_argument(
        "--grace",
        type=float,
        metavar="SECONDS",
        help="time from a stop signal to the kill (default 30)",
    )
    parser.add_argument(
        "--signals",
        metavar="NAMES",
        help="comma-separated signals that stop the run (default TERM,INT,USR1)",
    )
    parser.add_argument(
        "--preempted-exit-code",
        type=_count(0),
        metavar="CODE",
        help="exit code after a stop with a good snapshot (default 1)",
    )
    parser.add_argument(
        "--max-attempts",
        type=_count(1),
        metavar="N",
        help="starts from one snapshot before giving up with code 4 (default 10)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.add_argument("-q", "--quiet", action="count", default=0)

    return parser


def _add_storage_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--storage-option",
        type=_storage_option,
        action=_MergeOptions,
        default={},
        metavar="KEY=VALUE",
        help="an fsspec storage option, repeatable; VALUE is read as JSON where "
        "it parses (-o endpoint_url=http://host:9000 -o anon=true)",
    )


class _MergeOptions(argparse.Action):
    """Collect KEY=VALUE options into one dict, a later key winning."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        merged = {**getattr(namespace, self.dest), **values}
        setattr(namespace, self.dest, merged)


def _storage_option(text: str) -> dict[str, Any]:
    key, equals, value = text.partition("=")
    if not equals or not key.strip():
        msg = f"{text!r} is not KEY=VALUE"
        raise argparse.ArgumentTypeError(msg)
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value

    return {key.strip(): parsed}


def _count(minimum: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            msg = f"{text!r} is not an integer"
            raise argparse.ArgumentTypeError(msg) from None
        if value < minimum:
            msg = f"{value} is below {minimum}"
            raise argparse.ArgumentTypeError(msg)
        return value

    return parse


def _main_ls(argv: list[str]) -> int:
    try:
        return _list(argv)
    except BrokenPipeError:
        # The reader (head, say) closed the pipe: not an error of ours. Point
        # stdout at /dev/null so that the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FINISHED


def _list(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m resumable ls",
        description="List the snapshots at URL and check that each verifies.",
    )
    parser.add_argument("url", help="fsspec URL or path of the snapshots")
    _add_storage_option(parser)
    options = parser.parse_args(argv)
    _configure_logging(-1)
    try:
        from_environment = env_json_object(STORAGE_OPTIONS) or {}
        rows = list_snapshots(
            options.url, {**from_environment, **options.storage_option}
        )
    except ResumableError as err:
        return _report(err)
    except Exception as err:
        # The backend's own errors (rejected options, no credentials) end here.
        _error(f"cannot list {options.url}: {type(err).__name__}: {err}")
        return EXIT_STORAGE
    print(f"{'step':>9}  {'created (UTC)':19}  {'size':>9}  status  program / name")
    for entry, problem in rows:
        manifest = entry.manifest
        created = _time(manifest.created) if manifest else "?"
        size = _size(manifest.size) if manifest else "?"
        status = "ok" if problem is None else "BAD"
        if manifest and manifest.inside_step and problem is None:
            status = "inside"
        program = manifest.program if manifest else "?"
        columns = f"{entry.step:>9}  {created:19}  {size:>9}  {status:6}"
        print(f"{columns}  {program} / {entry.name}")
        if problem is not None:
            print(f"{'':>9}  why: {problem}")
        elif manifest and manifest.inside_step:
            where = manifest.inside_step
            print(
                f"{'':>9}  taken inside step {entry.step}: loop {where['loop']}, "
                f"after item {where['item']}"
            )
    if not rows:
        print(f"no snapshots at {options.url}")

    return EXIT_FINISHED


def _report(err: ResumableError) -> int:
    _error(str(err))
    if isinstance(err, ConfigurationError | StateDefinitionError):
        return EXIT_USAGE
    if isinstance(err, StorageError):
        return EXIT_STORAGE
    if isinstance(err, RankLostError):
        return EXIT_RANK_LOST
    if isinstance(err, SnapshotError):
        return EXIT_INCOMPATIBLE
    return EXIT_INCOMPATIBLE


def _error(message: str) -> None:
    print(f"resumable: error: {message}", file=sys.stderr)


def _configure_logging(verbosity: int) -> None:
    level = {-1: logging.WARNING, 0: logging.INFO}.get(verbosity, logging.DEBUG)
    if verbosity < -1:
        level = logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    rank = _rank()
    name = "resumable" if rank is None else f"resumable[rank {rank}]"
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {name} %(levelname)s %(message)s", "%H:%M:%S")
    )
    if rank:
        # Rank 0 tells the job's story; the others only what went wrong there.
        level = max(level, logging.WARNING)
    package = logging.getLogger("resumable")
    package.handlers[:] = [handler]
    package.setLevel(level)
    package.propagate = False


def _rank() -> int | None:
    """This process's rank under torchrun, or None where it runs alone."""
    launched = launched_rank()
    if launched is None:
        return None
    return launched[0] if launched[1] > 1 else None


def _time(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, tz=datetime.timezone.utc)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def _size(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]  # int becomes float for display
    return str(size)
