"""
The examples run as they are on s3:// too, and ``ls`` lists what they wrote there.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from resumable import _cli

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


# main() runs in this process: undo what it changes.
pytestmark = pytest.mark.usefixtures("cli_undone")


def run_example(cwd: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESUMABLE_")}
    return subprocess.run(
        [sys.executable, "-m", "resumable", str(EXAMPLES / "digits.py"), *argv],
        cwd=cwd,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )


@pytest.mark.slow
def test_digits_example_runs_on_s3(s3_url: str, tmp_path: Path, capsys):
    """digits.py trains on an s3:// storage, and ls lists its snapshots there."""
    ran = run_example(tmp_path, "--storage", s3_url, "--steps", "2")
    listed = _cli.main(["ls", s3_url])
    out = capsys.readouterr().out

    assert (0, 0) == (ran.returncode, listed), ran.stderr
    assert "run finished: step=2" in ran.stderr
    assert 2 == out.count("digits.py:train / step-0000000")
