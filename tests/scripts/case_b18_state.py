"""
B18 subprocess script: a state of RNG objects, hyperparameters and numpy values.

Each step draws from every generator and writes a JSON report of the whole state to
``$CASE_B18_REPORTS/step-N.json``. With ``CASE_B18_RENAMED`` set, the class of the
``hyper`` field has another name, as after a refactoring between two runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import torch

import resumable

torch.set_num_threads(1)

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


if os.environ.get("CASE_B18_RENAMED"):

    class HyperParams:
        def __init__(self, width: int) -> None:
            self.width = width

    hyper_class: type = HyperParams
else:

    class Hyper:
        def __init__(self, width: int) -> None:
            self.width = width

    hyper_class = Hyper


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
    weights: torch.Tensor
    draws: list[float] = attrs.Factory(list)


def init() -> State:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    return State(
        numpy_generator=np.random.default_rng(4),
        legacy=np.random.RandomState(5),
        python_random=random.Random(6),
        args=argparse.Namespace(lr=0.1, tags=["a"], mask=torch.ones(3)),
        config=Config("b18", OptimConfig(0.01, (0.9, 0.99))),
        hyper=hyper_class(8),
        dtype=np.dtype("float32"),
        scalars=[np.float32(1.5), np.int64(7), np.bool_(True)],
        weights=torch.zeros(4, dtype=torch.bfloat16),
    )


@resumable.step(init=init, steps=5)
def train(state: State, step: int) -> dict[str, float]:
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
    state.config = attrs.evolve(
        state.config, name=f"{state.config.name}.{step}", optim=optim
    )
    state.hyper.width += 1
    state.dtype = DTYPES[(DTYPES.index(state.dtype) + 1) % len(DTYPES)]
    state.scalars = [
        np.float32(state.scalars[0] * 1.5),
        state.scalars[1] + 1,
        ~state.scalars[2],
    ]
    state.weights += torch.randn(4).to(torch.bfloat16)
    write_report(state, step)
    return {"draw": state.draws[-1]}


def write_report(state: State, step: int) -> None:
    """Write every component of the state, and the global RNGs, as JSON."""
    legacy = state.legacy.get_state(legacy=False)
    report = {
        "pid": os.getpid(),
        "step": step,
        "numpy_generator": state.numpy_generator.bit_generator.state,
        "legacy": [
            legacy["state"]["key"].tolist(),
            legacy["state"]["pos"],
            legacy["has_gauss"],
            legacy["gauss"],
        ],
        "python_random": state.python_random.getstate(),
        "global_random": random.getstate(),
        "global_numpy": np.random.get_state()[1].tolist(),
        "global_torch": torch.get_rng_state().tolist(),
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
        "weights": [str(state.weights.dtype), state.weights.float().tolist()],
        "draws": state.draws,
    }
    folder = Path(os.environ["CASE_B18_REPORTS"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"step-{step}.json").write_text(json.dumps(report))
