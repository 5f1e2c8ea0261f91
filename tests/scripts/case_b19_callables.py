"""
B19 subprocess script: a state full of lambdas, closures and a local class.

Each step writes a JSON report to ``$CASE_B19_REPORTS/step-N.json``. With
``CASE_B19_PAUSE_AT=N`` step N first writes ``paused`` there and sleeps, to be
killed; with ``CASE_B19_UNSERIALISABLE`` set, init() puts a lock in the state.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs
import torch
from torch import nn

import resumable

torch.set_num_threads(1)


class Net(nn.Module):
    """A small MLP whose activation is whatever callable it is given."""

    def __init__(self, activation: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.hidden = nn.Linear(4, 8)
        self.out = nn.Linear(8, 1)
        self.activation = activation

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.out(self.activation(self.hidden(inputs)))


@attrs.define
class State:
    model: Net
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    generator: torch.Generator
    tracker: Any
    scale: Callable[[float], float]
    extras: dict[str, Any] = attrs.Factory(dict)


def init() -> State:
    warmup = 8

    class Tracker:
        def __init__(self, name: str) -> None:
            self.name = name
            self.seen: list[int] = []

    torch.manual_seed(0)
    model = Net(lambda x: torch.clamp(x, min=0))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda epoch: min(1.0, (epoch + 1) / warmup)
    )
    extras = {}
    if os.environ.get("CASE_B19_UNSERIALISABLE"):
        extras["lock"] = threading.Lock()
    return State(
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        generator=torch.Generator().manual_seed(1),
        tracker=Tracker("b19"),
        scale=lambda x: 2 * x + warmup,
        extras=extras,
    )


@resumable.step(init=init, steps=5)
def train(state: State, step: int) -> dict[str, float]:
    reports = Path(os.environ["CASE_B19_REPORTS"])
    reports.mkdir(parents=True, exist_ok=True)
    if os.environ.get("CASE_B19_PAUSE_AT") == str(step):
        (reports / "paused").write_text(str(os.getpid()))
        time.sleep(120)
    inputs = torch.randn(16, 4, generator=state.generator)
    targets = inputs.sum(dim=1, keepdim=True).sin()
    loss = (state.model(inputs) - targets).pow(2).mean()
    state.optimizer.zero_grad()
    loss.backward()
    state.optimizer.step()
    state.scheduler.step()
    state.tracker.seen.append(step)
    factor = step + 2
    state.scale = lambda x: x * factor
    report = {
        "pid": os.getpid(),
        "step": step,
        "activation(-1)": state.model.activation(torch.tensor(-1.0)).item(),
        "last_lr": state.scheduler.get_last_lr(),
        "optimizer_lr": [group["lr"] for group in state.optimizer.param_groups],
        "lr_lambda(1)": state.scheduler.lr_lambdas[0](1),
        # cloudpickle rebuilds a local class without its __qualname__, so the name.
        "tracker": [type(state.tracker).__name__, state.tracker.name],
        "seen": state.tracker.seen,
        "scale(3)": state.scale(3),
        "parameters": [
            p.detach().numpy().tobytes().hex() for p in state.model.parameters()
        ],
    }
    (reports / f"step-{step}.json").write_text(json.dumps(report))
    return {"loss": loss.item(), "lr": state.scheduler.get_last_lr()[0]}
