"""Fixtures shared by the test files: a storage URL on each backend and a tiny step."""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import attrs
import fsspec
import pytest
import torch

import resumable
from resumable._step import SCRIPT_MODULE
from tests.s3server import S3Server


@attrs.define
class TinyState:
    """A model, its optimizer and the steps seen: the smallest realistic state."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    seen: list[int] = attrs.Factory(list)


def tiny_init() -> TinyState:
    generator = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))

    return TinyState(model, torch.optim.Adam(model.parameters(), lr=0.01))


@resumable.step(init=tiny_init, steps=4, every=1, keep=3)
def tiny_train(state: TinyState, step: int) -> dict[str, float]:
    inputs = torch.full((4, 3), float(step)) + torch.rand(4, 3)
    loss = state.model(inputs).square().mean()
    state.optimizer.zero_grad()
    loss.backward()
    state.optimizer.step()
    state.seen.append(step)

    return {"loss": loss.item()}


def import_script(name: str) -> ModuleType:
    """Import a helper of tests/scripts by its path, as the subprocesses do."""
    if name not in sys.modules:
        path = Path(__file__).parent / "scripts" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None
        assert spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


@pytest.fixture
def cli_undone(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """
    Undo what an in-process ``_cli.main`` changes: RESUMABLE_* variables are
    unset, and argv, sys.path, the script's module and logging are restored.
    """
    for name in list(os.environ):
        if name.startswith("RESUMABLE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.setattr(sys, "path", list(sys.path))
    package = logging.getLogger("resumable")
    saved = (list(package.handlers), package.level, package.propagate)
    yield
    sys.modules.pop(SCRIPT_MODULE, None)
    package.handlers[:] = saved[0]
    package.setLevel(saved[1])
    package.propagate = saved[2]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """
    A moto S3 server on 127.0.0.1 for the whole session.

    s3fs in this process and in child processes reaches it through fsspec's
    configuration, as a user would point it at their own endpoint.
    """
    server = S3Server()
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(fsspec.config.conf, "s3", server.options)
        for name, value in server.environment().items():
            patch.setenv(name, value)
        yield server
    server.stop()


@pytest.fixture
def s3_url(s3_server: S3Server) -> Iterator[str]:
    """An empty storage URL in a bucket of its own on the test S3 server."""
    bucket = f"resumable-{uuid.uuid4().hex[:16]}"
    fs = fsspec.filesystem("s3")
    fs.mkdir(bucket)
    yield f"s3://{bucket}/store"
    fs.rm(bucket, recursive=True)


@pytest.fixture(params=["file", "memory", "s3"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty storage URL on the local file system, in memory, or on S3."""
    if request.param == "file":
        yield f"file://{tmp_path}/store"
        return
    if request.param == "s3":
        yield request.getfixturevalue("s3_url")
        return
    url = f"memory://resumable-tests/{uuid.uuid4().hex}"
    yield url
    fs, root = fsspec.core.url_to_fs(url)
    if fs.exists(root):
        fs.rm(root, recursive=True)


@pytest.fixture
def tiny_step() -> resumable.Step[TinyState]:
    """A Linear model + Adam + a list; program ``conftest.py:tiny_train``, 4 steps."""
    return tiny_train
