"""The README's promises: its example runs and CI runs its test command."""

from __future__ import annotations

import re
from pathlib import Path

import resumable
from resumable import testing

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_readme_example_runs_and_resumes(tmp_path: Path) -> None:
    """The README's example trains, and a killed and resumed run ends identical."""
    code = re.search(r"```python\n(.*?)```", README, re.DOTALL)
    assert code is not None
    script = tmp_path / "train.py"
    script.write_text(code.group(1))
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(script.read_text(), str(script), "exec"), namespace)
    train = namespace["train"]
    assert isinstance(train, resumable.Step)

    result = testing.run_steps(train, 4)
    testing.assert_resumes_identically(train, kill_after=[1, 3], steps=5)

    assert 4 == len(result.state.losses)


def test_ci_runs_the_readme_test_command() -> None:
    """.ci/run runs exactly the command that the README gives for the tests."""
    commands = re.findall(r"```sh\n(.*?)\n```", README, re.DOTALL)
    test_command = next(line for line in commands if "pytest" in line)

    ci = (ROOT / ".ci" / "run").read_text()

    assert test_command in ci.splitlines()
