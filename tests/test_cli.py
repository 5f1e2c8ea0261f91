"""
Tests of the command line, ``python -m resumable``: finding the step, options and
variables, exit codes, and ``ls``. Most run ``_cli.main`` in-process; a few run a
real subprocess.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from resumable import _cli

SCRIPTS = Path(__file__).parent / "scripts"


# main() runs in this process: undo what it changes.
pytestmark = pytest.mark.usefixtures("cli_undone")


@pytest.fixture
def cli(capsys):
    """Run main() in-process; return (exit code, stdout, stderr)."""

    def run(*argv: str) -> tuple[int, str, str]:
        code = _cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def script(tmp_path: Path, name: str, as_name: str | None = None) -> str:
    """Copy a test script into tmp_path, so that its default storage lands there."""
    target = tmp_path / (as_name or name)
    shutil.copy(SCRIPTS / name, target)

    return str(target)


def run_module(tmp_path: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m resumable`` in a subprocess, without RESUMABLE_* variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESUMABLE_")}

    return subprocess.run(
        [sys.executable, "-m", "resumable", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def ran_steps(out: str) -> list[int]:
    return [int(step) for step in re.findall(r"^ran step (\d+)$", out, re.MULTILINE)]


def test_runs_the_script_and_exits_0(tmp_path, cli):
    """A script with one step runs to the end and exits 0 (finished)."""
    storage = str(tmp_path / "store")

    code, out, err = cli(script(tmp_path, "cli_train.py"), "--storage", storage)

    assert (0, [0, 1, 2]) == (code, ran_steps(out))
    assert "run finished: step=3" in err


def test_default_storage_is_next_to_the_script(tmp_path, cli):
    """Without --storage the snapshots go to .resumable/<stem>.<step> by the script."""
    code, _, err = cli(script(tmp_path, "cli_train.py"))

    folder = tmp_path / ".resumable" / "cli_train.train"
    assert 0 == code
    assert 3 == len(list(folder.glob("*.manifest.json")))
    assert f"storage={folder} (default, next to the script)" in err


def test_script_without_a_step_exits_2_saying_to_decorate(tmp_path, cli):
    """A script with no @resumable.step is a usage error that says what to do."""
    code, _, err = cli(script(tmp_path, "cli_no_step.py"))

    assert 2 == code
    assert "defines no @resumable.step function" in err
    assert "Decorate" in err


def test_script_with_several_steps_exits_2_listing_them(tmp_path, cli):
    """With several steps the error lists them and says how to choose one."""
    path = script(tmp_path, "cli_two_steps.py")

    code, _, err = cli(path, "--storage", str(tmp_path / "store"))

    assert 2 == code
    assert "several steps (first, second)" in err
    assert f"{path}:NAME" in err


def test_script_colon_name_picks_that_step(tmp_path, cli):
    """SCRIPT:NAME runs the step of that name."""
    path = script(tmp_path, "cli_two_steps.py")

    code, out, _ = cli(f"{path}:second", "--storage", str(tmp_path / "store"))

    assert 0 == code
    assert ["ran second 0", "ran second 1"] == out.splitlines()


def test_unknown_step_name_exits_2_listing_the_found_ones(tmp_path, cli):
    """SCRIPT:NAME with no such step is a usage error naming the steps there are."""
    path = script(tmp_path, "cli_two_steps.py")

    code, _, err = cli(f"{path}:third", "--storage", str(tmp_path / "store"))

    assert 2 == code
    assert "no @resumable.step named 'third'; found: first, second." in err


def test_missing_script_exits_2(tmp_path, cli):
    """A script path that does not exist is a usage error naming it."""
    code, _, err = cli(str(tmp_path / "nowhere.py"))

    assert 2 == code
    assert "No script at" in err
    assert "nowhere.py" in err


def test_step_that_raises_exits_3_with_the_traceback(tmp_path):
    """A step that raises exits 3, shows the traceback and keeps its snapshots."""
    path = script(tmp_path, "cli_raises.py")
    storage = tmp_path / "store"

    process = run_module(tmp_path, path, "--storage", str(storage))

    assert 3 == process.returncode
    assert "Traceback (most recent call last)" in process.stderr
    assert "ValueError: boom at step 1" in process.stderr
    assert "the script raised; its snapshots are intact" in process.stderr
    assert 1 == len(list(storage.glob("step-000000001-*.manifest.json")))


def test_rerun_of_a_finished_job_says_so_and_exits_0(tmp_path):
    """Rerunning a finished job logs so, runs no step and exits 0."""
    path = script(tmp_path, "cli_train.py")
    first = run_module(tmp_path, path)

    again = run_module(tmp_path, path)

    assert (0, [0, 1, 2]) == (first.returncode, ran_steps(first.stdout))
    assert (0, []) == (again.returncode, ran_steps(again.stdout))
    assert "run already finished: step=3, steps=3" in again.stderr


def test_steps_option_extends_a_finished_run(tmp_path, cli):
    """--steps larger than the finished run's count runs only the new steps."""
    path = script(tmp_path, "cli_train.py")
    storage = str(tmp_path / "store")
    cli(path, "--storage", storage)

    code, out, err = cli(path, "--storage", storage, "--steps", "5")

    assert (0, [3, 4]) == (code, ran_steps(out))
    assert "resumed: step=3" in err


def test_script_arguments_after_double_dash_reach_sys_argv(tmp_path, cli):
    """Arguments after -- are the script's sys.argv[1:], not options of ours."""
    path = script(tmp_path, "cli_train.py")

    code, out, _ = cli(
        path, "--storage", str(tmp_path / "store"), "--", "--steps", "99", "x"
    )

    assert 0 == code
    assert "script argv: ['--steps', '99', 'x']" in out.splitlines()
    assert [0, 1, 2] == ran_steps(out)


def test_steps_variable_is_honoured(tmp_path, cli, monkeypatch):
    """RESUMABLE_STEPS sets the number of steps where --steps is not given."""
    monkeypatch.setenv("RESUMABLE_STEPS", "2")

    code, out, _ = cli(script(tmp_path, "cli_train.py"), "--storage", "memory://v1")

    assert (0, [0, 1]) == (code, ran_steps(out))


def test_steps_option_overrides_the_variable(tmp_path, cli, monkeypatch):
    """--steps beats RESUMABLE_STEPS."""
    monkeypatch.setenv("RESUMABLE_STEPS", "2")
    path = script(tmp_path, "cli_train.py")

    code, out, _ = cli(path, "--storage", str(tmp_path / "s"), "--steps", "4")

    assert (0, [0, 1, 2, 3]) == (code, ran_steps(out))


def test_storage_variable_is_honoured(tmp_path, cli, monkeypatch):
    """RESUMABLE_STORAGE names the storage where --storage is not given."""
    storage = tmp_path / "from-env"
    monkeypatch.setenv("RESUMABLE_STORAGE", str(storage))

    code, _, _ = cli(script(tmp_path, "cli_train.py"))

    assert 0 == code
    assert 3 == len(list(storage.glob("*.manifest.json")))
    assert not (tmp_path / ".resumable").exists()


def test_bad_variable_exits_2_naming_it(tmp_path, cli, monkeypatch):
    """A bad RESUMABLE_* value is a usage error that names the variable."""
    monkeypatch.setenv("RESUMABLE_EVERY", "often")

    code, out, err = cli(script(tmp_path, "cli_train.py"), "--storage", "memory://v2")

    assert (2, []) == (code, ran_steps(out))
    assert "RESUMABLE_EVERY='often' is not an integer" in err


@pytest.mark.parametrize(
    "option", [["--steps", "-1"], ["--every", "0"], ["--keep", "x"], ["--bogus"]]
)
def test_bad_option_exits_2(tmp_path, capsys, option):
    """A bad command-line option is a usage error, exit status 2."""
    path = script(tmp_path, "cli_train.py")

    with pytest.raises(SystemExit) as caught:
        _cli.main([path, *option])

    assert 2 == caught.value.code
    assert "python -m resumable" in capsys.readouterr().err


def test_other_programs_storage_exits_4(tmp_path, cli):
    """Storage holding another program's snapshots is refused with exit 4."""
    storage = str(tmp_path / "store")
    cli(script(tmp_path, "cli_train.py"), "--storage", storage)
    other = script(tmp_path, "cli_train.py", as_name="other_job.py")

    code, out, err = cli(other, "--storage", storage)

    assert (4, []) == (code, ran_steps(out))
    assert "'cli_train.py:train', not of 'other_job.py:train'" in err


def test_unknown_storage_scheme_exits_2(tmp_path, cli):
    """A URL of an unknown scheme is a usage error, exit 2: retrying cannot help."""
    code, out, err = cli(
        script(tmp_path, "cli_train.py"), "--storage", "nosuchscheme://bucket/x"
    )

    assert (2, []) == (code, ran_steps(out))
    assert "Cannot open storage 'nosuchscheme://bucket/x'" in err


def test_storage_under_a_regular_file_exits_2(tmp_path, cli):
    """A storage path that cannot be a folder is a usage error, exit 2."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")

    code, _, err = cli(
        script(tmp_path, "cli_train.py"), "--storage", str(blocker / "store")
    )

    assert 2 == code
    assert str(blocker / "store") in err


def ls_rows(out: str) -> list[tuple[str, str, str]]:
    """Return (step, size, status) of each snapshot row of ls's output, in order."""
    row = re.compile(r"^ +(\d+)  .{19}  +(\S+ \S+|\?)  (ok|BAD) ", re.MULTILINE)

    return row.findall(out)


def test_ls_lists_step_size_and_status(tmp_path, cli):
    """ls prints a header and a row per snapshot, newest first, each ok."""
    storage = str(tmp_path / "store")
    cli(script(tmp_path, "cli_train.py"), "--storage", storage)

    code, out, _ = cli("ls", storage)

    header = out.splitlines()[0].split()
    rows = ls_rows(out)
    assert 0 == code
    assert ["step", "created", "(UTC)", "size", "status", "program", "/", "name"] == (
        header
    )
    assert [("3", "ok"), ("2", "ok"), ("1", "ok")] == [(r[0], r[2]) for r in rows]
    assert all(re.fullmatch(r"\d+\.\d KiB", row[1]) for row in rows)
    assert 3 == out.count("cli_train.py:train / step-0000000")


def test_ls_marks_damaged_snapshots_bad_with_the_reason(tmp_path, cli):
    """ls flags a snapshot with damaged bytes, and one that is torn, as BAD."""
    storage = tmp_path / "store"
    cli(script(tmp_path, "cli_train.py"), "--storage", str(storage))
    (damaged,) = storage.glob("step-000000002-*/data.bin")
    data = bytearray(damaged.read_bytes())
    data[10] ^= 0xFF
    damaged.write_bytes(bytes(data))
    (torn,) = storage.glob("step-000000001-*/index.json")
    torn.write_bytes(torn.read_bytes()[:-5])

    code, out, _ = cli("ls", str(storage))

    assert 0 == code
    assert [("3", "ok"), ("2", "BAD"), ("1", "BAD")] == [
        (row[0], row[2]) for row in ls_rows(out)
    ]
    assert "why: object data.bin has checksum" in out
    assert "(damaged bytes)" in out
    assert "why: object index.json is" in out
    assert "(torn or incomplete write)" in out


def test_ls_marks_an_unreadable_manifest_bad(tmp_path, cli):
    """A manifest that is not JSON is listed as BAD, saying so."""
    storage = tmp_path / "store"
    cli(script(tmp_path, "cli_train.py"), "--storage", str(storage))
    (manifest,) = storage.glob("step-000000003-*.manifest.json")
    manifest.write_text("{ not json")

    code, out, _ = cli("ls", str(storage))

    assert 0 == code
    assert [("1", "ok"), ("2", "ok"), ("3", "BAD")] == sorted(
        (row[0], row[2]) for row in ls_rows(out)
    )
    assert "is not readable JSON of resumable" in out


def test_ls_of_an_empty_storage_says_so(tmp_path, cli):
    """ls of a storage without snapshots says there are none and exits 0."""
    (tmp_path / "empty").mkdir()

    code, out, _ = cli("ls", str(tmp_path / "empty"))

    assert 0 == code
    assert f"no snapshots at {tmp_path / 'empty'}" == out.splitlines()[-1]


def test_ls_of_a_missing_folder_creates_nothing(tmp_path, cli):
    """ls only reads: listing a mistyped path does not create that folder."""
    code, out, _ = cli("ls", str(tmp_path / "typo"))

    assert (0, False) == (code, (tmp_path / "typo").exists())
    assert "no snapshots at" in out


def test_ls_of_an_unusable_url_exits_2(cli):
    """ls of a URL that names no usable storage is a usage error."""
    code, _, err = cli("ls", "nosuchscheme://x")

    assert 2 == code
    assert "Cannot open storage" in err


def test_find_step_returns_the_scripts_step(tmp_path):
    """find_step loads the script and returns its one Step."""
    step = _cli.find_step(script(tmp_path, "cli_train.py"))

    assert ("cli_train.py:train", 3) == (step.program, step.steps)
