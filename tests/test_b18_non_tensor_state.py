"""
B18: non-tensor state (RNG objects, Namespace, attrs, numpy values) round-trips.

The round trips run with torch.load forced to weights_only, so nothing may depend on
it (a tensor inside a pickled object reaches torch.load through its storage, which
weights_only accepts). Every component is checked one by one, in process and through
a real ``python -m resumable`` resume; a component that can no longer be restored
(its class renamed, its module gone, an RNG this numpy or Python cannot set) fails
the resume loudly with IncompatibleSnapshotError, exit code 4, never silently.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
import torch
import xxhash

import resumable
from resumable import testing
from resumable._snapshot import _record_checksum

STEPS = 5
SCRIPT = Path(__file__).parent / "scripts" / "case_b18_state.py"
# Each step moves the dtype field one along, so a lost restore shows.
DTYPES = [np.dtype(name) for name in ("float32", "int16", "uint8", "complex64", "?")]


@attrs.frozen
class OptimConfig:
    lr: float
    betas: tuple[float, float]


@attrs.frozen
class Config:
    name: str
    optim: OptimConfig


class Hyper:
    """A plain class, pickled by reference to this module."""

    def __init__(self, width: int) -> None:
        self.width = width


class HyperParams:
    """What Hyper is called after the refactoring of the class-renamed case."""

    def __init__(self, width: int) -> None:
        self.width = width


@attrs.define
class State:
    numpy_generator: np.random.Generator
    legacy: np.random.RandomState
    python_random: random.Random
    args: argparse.Namespace
    config: Config
    hyper: Any
    dtype: np.dtype[Any]
    scalars: list[Any]
    arrays: dict[str, np.ndarray]
    weights: torch.Tensor
    draws: list[float] = attrs.Factory(list)


def make_step(setup: dict[str, Any]) -> resumable.Step[State]:
    """Return a step over State; ``setup`` chooses the hyper class and records calls."""

    def init() -> State:
        return State(
            numpy_generator=np.random.Generator(setup.get("bits", np.random.PCG64)(4)),
            legacy=np.random.RandomState(5),
            python_random=random.Random(6),
            args=argparse.Namespace(lr=0.1, tags=["a"], mask=torch.ones(3)),
            config=Config("b18", OptimConfig(0.01, (0.9, 0.99))),
            hyper=(setup.get("hyper_class") or Hyper)(8),
            dtype=np.dtype("float32"),
            scalars=[np.float32(1.5), np.int64(7), np.bool_(True), np.float64(0.25)],
            arrays={
                "zero_dim": np.array(2.0),
                "dates": np.array(["2024-01-01"], dtype="datetime64[s]"),
                "records": np.zeros(2, dtype=[("x", "<i4"), ("y", "<f8")]),
            },
            weights=torch.zeros(4, dtype=torch.bfloat16),
        )

    @resumable.step(init=init, steps=STEPS)
    def train(state: State, step: int) -> dict[str, float]:
        setup.setdefault("calls", []).append(step)
        setup.setdefault("global_random", {})[step] = random.getstate()
        state.draws += [
            float(state.numpy_generator.normal()),
            float(state.legacy.standard_normal()),
            state.python_random.gauss(0, 1),
            random.random(),
            float(np.random.random()),
        ]
        state.args.lr *= 0.5
        state.args.mask = state.args.mask * 2
        optim = attrs.evolve(state.config.optim, lr=state.config.optim.lr / 2)
        name = f"{state.config.name}.{step}"
        state.config = attrs.evolve(state.config, name=name, optim=optim)
        state.hyper.width += 1
        state.dtype = DTYPES[(DTYPES.index(state.dtype) + 1) % len(DTYPES)]
        first, count, flag, fraction = state.scalars
        state.scalars = [np.float32(first * 1.5), count + 1, ~flag, fraction / 3]
        state.arrays["zero_dim"] *= 3
        state.arrays["dates"] += np.timedelta64(1, "D")
        state.arrays["records"]["x"] += step
        state.weights += torch.randn(4).to(torch.bfloat16)
        return {"draw": state.draws[-1]}

    return train


def describe(state: State) -> dict[str, Any]:
    """Return every component of ``state`` with its type, as comparable values."""
    legacy = state.legacy.get_state(legacy=False)
    return {
        "numpy_generator": [
            type(state.numpy_generator.bit_generator).__name__,
            plain(state.numpy_generator.bit_generator.state),
        ],
        "legacy": [
            type(state.legacy).__name__,
            legacy["state"]["key"].tolist(),
            legacy["state"]["pos"],
            legacy["has_gauss"],
            legacy["gauss"],
        ],
        "python_random": [
            type(state.python_random).__name__,
            state.python_random.getstate(),
        ],
        "args": [
            type(state.args).__name__,
            state.args.lr,
            state.args.tags,
            state.args.mask.tolist(),
        ],
        "config": [type(state.config).__name__, attrs.asdict(state.config)],
        "hyper": [type(state.hyper).__name__, state.hyper.width],
        "dtype": [type(state.dtype).__name__, str(state.dtype)],
        "scalars": [[type(value).__name__, repr(value)] for value in state.scalars],
        "arrays": {
            key: [str(value.dtype), value.shape, value.tolist()]
            for key, value in state.arrays.items()
        },
        "weights": [str(state.weights.dtype), state.weights.float().tolist()],
        "draws": state.draws,
    }


def plain(value: Any) -> Any:
    """Return ``value`` with numpy arrays turned into lists, for ``==``."""
    if isinstance(value, dict):
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return [str(value.dtype), value.tolist()]
    return value


@attrs.frozen
class Finished:
    pid: int
    returncode: int
    stderr: str


def start_script(
    storage: Path, reports: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start `python -m resumable` on the B18 script."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "resumable",
            str(SCRIPT),
            "--storage",
            str(storage),
            *args,
        ],
        env={**os.environ, "CASE_B18_REPORTS": str(reports), **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str]) -> Finished:
    """Wait for ``process`` and return its exit code and error output."""
    _, stderr = process.communicate(timeout=120)
    return Finished(process.pid, process.returncode, stderr)


def read_report(folder: Path, step: int) -> dict[str, Any]:
    return dict(json.loads((folder / f"step-{step}.json").read_text()))


def rewrite_trees(storage: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """Apply ``edit`` to the state tree of every snapshot, keeping manifests valid."""
    manifests = sorted(storage.glob("*.manifest.json"))
    assert manifests
    for manifest_path in manifests:
        manifest = json.loads(manifest_path.read_text())
        index_path = storage / manifest["name"] / "index.json"
        index = json.loads(index_path.read_bytes())
        edit(index["tree"]["state"])
        data = json.dumps(index).encode()
        index_path.write_bytes(data)
        manifest["objects"]["index.json"] = {
            "size": len(data),
            "checksum": xxhash.xxh3_64_hexdigest(data),
        }
        manifest["manifest_checksum"] = _record_checksum(manifest)
        manifest_path.write_text(json.dumps(manifest))


def rename_bit_generator(tree: dict[str, Any]) -> None:
    """Name a bit generator that this numpy lacks, as a snapshot of another would."""
    state = tree["numpy_generator"]["state"]["v"]
    assert "PCG64" == state["bit_generator"]
    state["bit_generator"] = "PCG64Removed"


def bump_random_version(tree: dict[str, Any]) -> None:
    """Record a random.Random state version that this Python cannot set."""
    version = tree["python_random"]["state"]["items"][0]
    assert {"k": "json", "v": 3} == version
    version["v"] = 4


@pytest.fixture
def weights_only_forced(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force weights_only on every torch.load, stricter than torch 2.6's default."""
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")


def test_b18_diff_states_compares_pickled_values_not_their_bytes() -> None:
    """Two states with equal pickled values, a tensor among them, do not differ."""
    left, right = make_step({}).init(), make_step({}).init()

    assert [] == testing.diff_states(left, right)


@pytest.mark.usefixtures("weights_only_forced")
def test_b18_non_tensor_state_resumes_identically() -> None:
    """Killed after steps 1 and 3 and resumed, the run ends bit-identical."""
    testing.assert_resumes_identically(make_step({}), kill_after=[1, 3])


@pytest.mark.usefixtures("weights_only_forced")
@pytest.mark.parametrize("bits", [np.random.PCG64, np.random.MT19937, np.random.Philox])
@pytest.mark.parametrize("kill_after", [1, 2])
def test_b18_every_component_is_restored(bits: Any, kill_after: int) -> None:
    """Each field, with its type, and the global random state come back as saved."""
    expected_setup: dict[str, Any] = {"bits": bits}
    expected = testing.run_steps(make_step(expected_setup), kill_after + 1)
    setup: dict[str, Any] = {"bits": bits}
    train = make_step(setup)
    storage = testing.memory_storage()
    saved = testing.run_killed(train, kill_after, storage=storage)
    random.seed(99)

    restored = resumable.load(train, storage=storage)
    resumed = testing.run_steps(train, kill_after + 1, storage=storage, seed=99)

    assert describe(saved.state) == describe(restored)
    assert list(range(kill_after + 1)) == setup["calls"]
    assert (
        expected_setup["global_random"][kill_after]
        == setup["global_random"][kill_after]
    )
    assert describe(expected.state) == describe(resumed.state)


def test_b18_subprocess_resume_restores_every_component(tmp_path: Path) -> None:
    """A real `python -m resumable` resume, weights_only forced, restores it all."""
    reports = {run: tmp_path / f"reports-{run}" for run in ("whole", "split")}
    whole = start_script(tmp_path / "whole", reports["whole"])
    first = start_script(tmp_path / "split", reports["split"], "--steps", "3")
    assert (0, 0) == (finish(whole).returncode, finish(first).returncode)

    second = finish(
        start_script(
            tmp_path / "split",
            reports["split"],
            env={"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"},
        )
    )

    assert 0 == second.returncode, second.stderr
    assert "resumed: step=3" in second.stderr
    pids = [read_report(reports["split"], step)["pid"] for step in range(STEPS)]
    assert [first.pid] * 3 + [second.pid] * 2 == pids
    expected = read_report(reports["whole"], STEPS - 1) | {"pid": None}
    actual = read_report(reports["split"], STEPS - 1) | {"pid": None}
    assert expected == actual


def test_b18_subprocess_resume_with_renamed_class_exits_4(tmp_path: Path) -> None:
    """A pickled object whose class was renamed since fails the resume, exit code 4."""
    reports = tmp_path / "reports"
    assert 0 == finish(start_script(tmp_path / "s", reports, "--steps", "2")).returncode

    renamed = finish(
        start_script(tmp_path / "s", reports, env={"CASE_B18_RENAMED": "1"})
    )

    assert 4 == renamed.returncode
    assert "state.hyper" in renamed.stderr
    assert "Hyper" in renamed.stderr
    assert (reports / "step-1.json").exists()
    assert not (reports / "step-2.json").exists()


@pytest.mark.parametrize(
    ("breakage", "path"),
    [
        ("class-renamed", "state.hyper"),
        ("module-removed", "state.hyper"),
        ("unknown-bit-generator", "state.numpy_generator"),
        ("random-state-version", "state.python_random"),
    ],
)
def test_b18_component_that_cannot_be_restored_fails_the_resume(
    breakage: str, path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A component that no longer restores stops the resume before any step runs."""
    setup: dict[str, Any] = {}
    train = make_step(setup)
    storage = tmp_path / "snapshots"
    if breakage == "module-removed":
        plugin = tmp_path / "plugins" / "b18_plugin.py"
        plugin.parent.mkdir()
        plugin.write_text(
            "class Augment:\n"
            "    def __init__(self, width):\n"
            "        self.width = width\n"
        )
        monkeypatch.syspath_prepend(plugin.parent)
        setup["hyper_class"] = importlib.import_module("b18_plugin").Augment
    testing.run_killed(train, 2, storage=str(storage))
    if breakage == "class-renamed":
        monkeypatch.delattr(sys.modules[__name__], "Hyper")
        setup["hyper_class"] = HyperParams
    elif breakage == "module-removed":
        plugin.unlink()
        monkeypatch.delitem(sys.modules, "b18_plugin")
        importlib.invalidate_caches()
        setup["hyper_class"] = HyperParams
    elif breakage == "unknown-bit-generator":
        rewrite_trees(storage, rename_bit_generator)
    else:
        rewrite_trees(storage, bump_random_version)
    setup["calls"] = []

    with pytest.raises(resumable.IncompatibleSnapshotError) as raised:
        testing.run_steps(train, storage=str(storage))

    assert path in str(raised.value)
    assert [] == setup["calls"]


@attrs.frozen
class Summary:
    step: int
    loss: float


@attrs.define
class Records:
    summaries: list[Summary] = attrs.Factory(list)
    by_name: dict[str, Summary] = attrs.Factory(dict)
    best: Summary | None = None


def test_b18_attrs_values_that_init_did_not_build_are_restored() -> None:
    """attrs records appended or assigned during training come back as saved."""

    @resumable.step(init=Records, steps=4)
    def train(state: Records, step: int) -> None:
        summary = Summary(step, 1 / (step + 1))
        state.summaries.append(summary)
        state.by_name[f"step-{step}"] = summary
        state.best = summary

    storage = testing.memory_storage()
    testing.run_killed(train, 2, storage=storage)

    restored = resumable.load(train, storage=storage)

    assert [Summary(0, 1.0), Summary(1, 0.5)] == restored.summaries
    assert {"step-0": Summary(0, 1.0), "step-1": Summary(1, 0.5)} == restored.by_name
    assert Summary(1, 0.5) == restored.best
    testing.assert_resumes_identically(train, kill_after=[2])
