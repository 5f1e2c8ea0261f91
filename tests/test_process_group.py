"""The backend of a process group that resumable sets up under torchrun."""

from __future__ import annotations

import pytest
import torch

from resumable import _distributed


@pytest.mark.parametrize(
    ("devices", "local_rank", "expected"),
    [
        (0, 0, ("gloo", None)),
        (2, 1, ("cpu:gloo,cuda:nccl", 1)),
        (1, 2, ("gloo", None)),
    ],
    ids=["no-gpu", "a-gpu-each", "more-ranks-than-gpus"],
)
def test_backend_uses_nccl_only_where_the_rank_has_a_gpu(
    monkeypatch: pytest.MonkeyPatch,
    devices: int,
    local_rank: int,
    expected: tuple[str, int | None],
) -> None:
    """CPU tensors keep gloo beside nccl; a rank without a GPU of its own gets gloo."""
    chosen: list[int] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: devices > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: devices)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))

    backend = _distributed._backend()

    assert expected == (backend, chosen[0] if chosen else None)
