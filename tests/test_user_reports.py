"""
Failures found by trying the product as a new user would; each test fails without
its fix.
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import attrs
import pytest
import torch

import resumable
from resumable import testing
from resumable._storage import Storage
from resumable.errors import (
    ConfigurationError,
    IncompatibleSnapshotError,
    StorageError,
)
from tests.conftest import tiny_train


def _manifests(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.manifest.json"))


def test_snapshot_of_another_run_copied_in_is_refused(tmp_path: Path) -> None:
    """A newer snapshot copied in from another run is neither adopted nor deleted."""
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    resumable.run(tiny_train, storage=str(ours), steps=2)
    resumable.run(tiny_train, storage=str(theirs), steps=4)
    newest = _manifests(theirs)[-1]
    shutil.copytree(
        theirs / newest.name.removesuffix(".manifest.json"),
        ours / newest.name.removesuffix(".manifest.json"),
    )
    shutil.copy(newest, ours / newest.name)
    before = sorted(path.name for path in ours.iterdir())

    with pytest.raises(IncompatibleSnapshotError, match="two runs"):
        resumable.run(tiny_train, storage=str(ours), steps=6)

    assert before == sorted(path.name for path in ours.iterdir())


def test_fresh_start_supersedes_older_snapshots(tmp_path: Path) -> None:
    """After --fresh, the old run's snapshots are older and do not block a resume."""
    storage = str(tmp_path / "store")
    resumable.run(tiny_train, storage=storage, steps=3)
    resumable.run(tiny_train, storage=storage, steps=1, fresh=True)

    result = resumable.run(tiny_train, storage=storage, steps=2)

    assert [0, 1] == result.state.seen


def test_damaged_manifest_field_is_skipped_not_trusted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A manifest whose bytes were changed fails its checksum and is skipped."""
    storage = tmp_path / "store"
    resumable.run(tiny_train, storage=str(storage), steps=3)
    newest = _manifests(storage)[-1]
    newest.write_text(newest.read_text().replace('"generation": 3', '"generation": 9'))

    with caplog.at_level("WARNING", logger="resumable"):
        state = resumable.load(tiny_train, storage=str(storage))

    assert [0, 1] == state.seen
    assert any("fails its own checksum" in record.message for record in caplog.records)


def test_load_leaves_the_callers_random_streams_alone(tmp_path: Path) -> None:
    """resumable.load does not move the global random generators of its caller."""
    storage = str(tmp_path / "store")
    resumable.run(tiny_train, storage=storage, steps=2)
    random.seed(5)
    torch.manual_seed(5)
    expected = (random.random(), float(torch.rand(())))
    random.seed(5)
    torch.manual_seed(5)

    resumable.load(tiny_train, storage=storage)

    assert expected == (random.random(), float(torch.rand(())))


def test_testing_refuses_a_kill_with_nothing_to_resume() -> None:
    """assert_resumes_identically fails where no snapshot existed at a kill point."""
    with pytest.raises(AssertionError, match="nothing of resume is tested"):
        testing.assert_resumes_identically(tiny_train, kill_after=[1], every=3)


def test_testing_ignores_resumable_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """RESUMABLE_* variables do not change what a test helper runs."""
    monkeypatch.setenv("RESUMABLE_STEPS", "50")

    result = testing.run_steps(tiny_train)

    assert 4 == result.step


def test_read_only_storage_fails_before_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage that cannot be written fails at start, before any step runs."""
    calls: list[int] = []

    def refuse(self: object, path: str, value: bytes, **kwargs: object) -> None:
        raise PermissionError(13, "Read-only file system", path)

    monkeypatch.setattr(
        "fsspec.implementations.local.LocalFileSystem.pipe_file", refuse
    )
    step = resumable.step(init=tiny_train.init, steps=2)(
        lambda state, index: calls.append(index)
    )

    with pytest.raises(StorageError, match="cannot be written"):
        resumable.run(step, storage=str(tmp_path / "store"))

    assert [] == calls


@attrs.define
class Frozen:
    model: torch.nn.Module


def freeze_init() -> Frozen:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    model[0].requires_grad_(False)
    return Frozen(model)


@resumable.step(init=freeze_init, steps=3)
def unfreeze(state: Frozen, step: int) -> None:
    if step == 0:
        state.model[0].requires_grad_(True)


def test_requires_grad_flags_are_restored() -> None:
    """A layer unfrozen during training is still unfrozen after a resume."""
    storage = testing.memory_storage()
    testing.run_killed(unfreeze, 1, storage=storage)

    state = testing.run_steps(unfreeze, storage=storage).state

    assert [True, True, True, True] == [
        p.requires_grad for p in state.model.parameters()
    ]


@attrs.define
class Views:
    value: torch.Tensor


def test_conjugate_views_are_captured() -> None:
    """A conjugate view of a complex tensor is stored with its values resolved."""
    base = torch.tensor([1 + 2j, 3 - 4j])
    step = resumable.step(init=lambda: Views(base.conj()), steps=1)(lambda s, i: None)

    state = testing.run_steps(step).state

    assert torch.equal(base.conj().resolve_conj(), state.value)


def test_folder_of_an_empty_attempt_record_is_cleaned(tmp_path: Path) -> None:
    """A folder left by a kill while its attempt record was still empty is removed."""
    storage = tmp_path / "store"
    resumable.run(tiny_train, storage=str(storage), steps=1)
    leftover = storage / "step-000000002-0123456789ab"
    leftover.mkdir()
    (leftover / "attempt.json").write_bytes(b"")

    resumable.run(tiny_train, storage=str(storage), steps=3)

    assert [] == Storage.open(str(storage)).uncommitted()


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "resumable", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


SCRIPT = textwrap.dedent(
    """
    import sys
    import attrs
    import resumable

    class Plain:
        def __init__(self):
            self.value = 1

    @attrs.define
    class State:
        plain: object = attrs.Factory(Plain)
        seen: list = attrs.Factory(list)
        argv: list = attrs.Factory(lambda: list(sys.argv[1:]))

    @resumable.step(init=State, steps=2)
    def train(state, step):
        state.seen.append(step)
    """
)


def test_changed_script_arguments_are_refused(tmp_path: Path) -> None:
    """A rerun with other script arguments refuses to resume, exit 4, saying why."""
    (tmp_path / "train.py").write_text(SCRIPT)
    first = _cli("train.py", "--storage", "store", "--", "--lr", "0.1", cwd=tmp_path)

    second = _cli(
        "train.py",
        "--storage",
        "store",
        "--steps",
        "3",
        "--",
        "--lr",
        "0.2",
        cwd=tmp_path,
    )

    assert (0, 4) == (first.returncode, second.returncode)
    assert "script arguments" in second.stderr


def test_syntax_error_in_the_script_is_a_usage_error(tmp_path: Path) -> None:
    """A script that is not valid Python exits 2 with the file named."""
    (tmp_path / "broken.py").write_text("def train(:\n")

    completed = _cli("broken.py", cwd=tmp_path)

    assert 2 == completed.returncode
    assert "not valid Python" in completed.stderr


def test_snapshot_made_by_the_cli_loads_where_the_script_is_imported(
    tmp_path: Path,
) -> None:
    """An evaluation script that imports the training script can load its state."""
    (tmp_path / "train.py").write_text(SCRIPT)
    assert 0 == _cli("train.py", "--storage", "store", cwd=tmp_path).returncode
    evaluate = "import resumable, train\n"
    evaluate += "state = resumable.load(train.train, storage='store')\n"
    evaluate += "print(type(state.plain).__name__, state.plain.value, state.seen)\n"

    completed = subprocess.run(
        [sys.executable, "-c", evaluate],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert "Plain 1 [0, 1]" == completed.stdout.strip(), completed.stderr


def test_ls_output_cut_short_by_a_pipe_is_no_error(tmp_path: Path) -> None:
    """ls piped into a reader that stops early ends quietly."""
    resumable.run(tiny_train, storage=str(tmp_path / "store"), steps=4, keep=4)
    command = f"{sys.executable} -m resumable ls {tmp_path / 'store'} | head -1"

    completed = subprocess.run(
        command, shell=True, capture_output=True, text=True, timeout=120, check=False
    )

    assert "" == completed.stderr


def test_run_preempted_refuses_a_point_never_reached() -> None:
    """A preemption point the run never reaches fails instead of testing nothing."""
    with pytest.raises(AssertionError, match="never reached step 99"):
        testing.run_preempted(tiny_train, 99)
    with pytest.raises(ConfigurationError, match="items from 1"):
        testing.run_preempted(tiny_train, 1, 0)


BIG_WRITE = textwrap.dedent(
    """
    import time
    import attrs
    import torch
    import resumable

    @attrs.define
    class State:
        big: torch.Tensor
        count: int = 0

    def init():
        return State(torch.zeros(300 * 2**20))

    @resumable.step(init=init, steps=4)
    def train(state, step):
        state.count += 1
        print("step", step, flush=True)
    """
)


@pytest.mark.slow
def test_signal_during_a_large_write_exits_within_the_grace(tmp_path: Path) -> None:
    """A SIGTERM that lands while a large snapshot is written still ends in time."""
    (tmp_path / "train.py").write_text(BIG_WRITE)
    command = [sys.executable, "-m", "resumable", "train.py", "--storage", "s"]
    with subprocess.Popen(
        [*command, "--grace", "1"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            while "step 1" not in process.stdout.readline():
                pass
            time.sleep(0.2)  # inside the write of the 1.2 GB snapshot after step 1
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            code = process.wait(timeout=60)
            seconds = time.monotonic() - sent
        finally:
            process.kill()

    assert 1 == code
    assert seconds < 1.0 + 0.5, seconds
