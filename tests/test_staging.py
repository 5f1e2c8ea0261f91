"""
Tests of ``resumable._staging``: a staged copy is the data object, byte for byte, as
the blocking path writes it; it does not move when the state changes; and its arena
is reused, grown when the state grows.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import attrs
import numpy as np
import pytest
import torch

from resumable._snapshot import Payload, buffer_views
from resumable._staging import Stager
from resumable._state import decode_snapshot, encode_snapshot
from resumable.testing import diff_states

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"
)


@attrs.define
class Mixed:
    """Tensors and arrays of each kind a stager copies apart, JSON and a pickle."""

    weights: torch.Tensor
    strided: torch.Tensor
    large: torch.Tensor
    odd_dtypes: list[torch.Tensor]
    array: np.ndarray
    large_array: np.ndarray
    read_only: np.ndarray
    values: list[float]
    odd: object


def _mixed(scale: float = 1.0, size: int = 1000) -> Mixed:
    generator = torch.Generator().manual_seed(0)
    read_only = np.arange(5, dtype=np.int32) * int(scale)
    read_only.flags.writeable = False
    return Mixed(
        weights=torch.randn(size, generator=generator) * scale,
        strided=torch.randn(7, 5, generator=generator).t() * scale,
        # Copied by torch: above the size that memcpy takes.
        large=torch.randn(2**17, generator=generator) * scale,
        odd_dtypes=[
            torch.randn(9, generator=generator).bfloat16() * scale,
            torch.randn(3, dtype=torch.complex64, generator=generator).conj(),
            torch.tensor(scale),
            torch.tensor([True, False, True]),
            torch.zeros(0),
        ],
        array=np.arange(13, dtype=np.float64) * scale,
        large_array=np.arange(2**16, dtype=np.float64) * scale,
        read_only=read_only,
        values=[scale, 2.0],
        odd={1, 2, 3},
    )


def _joined(payload: Payload) -> bytes:
    return b"".join(bytes(part) for part in payload.data)


def _decoded(payload: Payload, into: Any) -> Any:
    index = json.loads(payload.index)
    decode_snapshot(
        into,
        index["tree"],
        buffer_views(memoryview(bytearray(_joined(payload))), index["buffers"]),
    )
    return into


def test_staged_payload_equals_the_blocking_path_byte_for_byte() -> None:
    """A staged snapshot holds exactly the index and data the blocking path writes."""
    state = _mixed()
    expected = Payload.of(*encode_snapshot(state, [{"loss": 1.0}]))

    staged = Stager().stage(*encode_snapshot(state, [{"loss": 1.0}], staged=True))
    actual = staged.wait()

    assert (expected.index, _joined(expected)) == (actual.index, _joined(actual))


def test_state_changed_after_staging_does_not_reach_the_copy() -> None:
    """Changing tensors, arrays and lists in place after staging leaves the copy."""
    state = _mixed()
    before = Payload.of(*encode_snapshot(state, []))
    # Bytes, not views: the blocking path's payload sees the live memory.
    expected = (before.index, _joined(before))
    staged = Stager().stage(*encode_snapshot(state, [], staged=True))

    state.weights.add_(1.0)
    state.strided.mul_(2.0)
    state.large.sub_(1.0)
    state.array += 1.0
    state.large_array += 1.0
    state.values.append(3.0)
    actual = staged.wait()

    assert expected == (actual.index, _joined(actual))


def test_arena_is_reused_while_the_state_fits() -> None:
    """Snapshots of a state of one size share one arena: the same memory."""
    stager = Stager()
    stager.stage(*encode_snapshot(_mixed(1.0), [], staged=True))
    first = stager.arena

    payload = stager.stage(*encode_snapshot(_mixed(2.0), [], staged=True)).wait()

    assert first is stager.arena
    assert _joined(Payload.of(*encode_snapshot(_mixed(2.0), []))) == _joined(payload)


def test_arena_grows_when_the_state_grows() -> None:
    """A larger state gets a larger arena, and its copy is whole."""
    stager = Stager()
    stager.stage(*encode_snapshot(_mixed(size=1000), [], staged=True))
    small = stager.capacity
    larger = _mixed(size=2**19)

    payload = stager.stage(*encode_snapshot(larger, [], staged=True)).wait()

    assert small < stager.capacity
    assert _joined(Payload.of(*encode_snapshot(larger, []))) == _joined(payload)


def test_padding_is_zero_after_the_layout_changes() -> None:
    """Bytes that padded nothing before are zeros once a new layout pads there."""
    stager = Stager()
    stager.stage(*encode_snapshot(_mixed(size=1000), [], staged=True))
    # Each tensor one byte short of the last: its old bytes lie where padding goes.
    shifted = _mixed(size=999)

    payload = stager.stage(*encode_snapshot(shifted, [], staged=True)).wait()

    assert _joined(Payload.of(*encode_snapshot(shifted, []))) == _joined(payload)


def test_reservation_cancelled_holds_no_arena() -> None:
    """A stop drops an arena still being prepared; the next snapshot makes one."""
    stager = Stager()
    cancel = threading.Event()
    cancel.set()

    stager.reserve(2**20, cancel=cancel)
    dropped = stager.arena
    payload = stager.stage(*encode_snapshot(_mixed(), [], staged=True)).wait()

    assert dropped is None
    assert _joined(Payload.of(*encode_snapshot(_mixed(), []))) == _joined(payload)


@attrs.define
class Many:
    """Ten thousand small tensors."""

    tensors: list[torch.Tensor]


def test_ten_thousand_small_tensors_round_trip() -> None:
    """A state of 10 000 small tensors of mixed sizes restores from its staged copy."""
    generator = torch.Generator().manual_seed(0)
    state = Many([torch.randn(1 + i % 37, generator=generator) for i in range(10_000)])
    payload = Stager().stage(*encode_snapshot(state, [], staged=True)).wait()
    target = Many([torch.zeros(1 + i % 37) for i in range(10_000)])

    restored = _decoded(payload, target)

    assert [] == diff_states(state, restored)


@pytest.mark.gpu
@requires_cuda
def test_cuda_tensors_stage_through_pinned_memory_as_they_were() -> None:
    """CUDA tensors go to a pinned arena; kernels queued after staging miss the copy."""
    state = _mixed()
    before = Payload.of(*encode_snapshot(state, []))
    expected = (before.index, _joined(before))
    on_device = Mixed(
        state.weights.cuda(),
        state.strided.cuda(),
        state.large.cuda(),
        [tensor.cuda() for tensor in state.odd_dtypes],
        state.array.copy(),
        state.large_array.copy(),
        state.read_only,
        list(state.values),
        state.odd,
    )
    stager = Stager()
    staged = stager.stage(*encode_snapshot(on_device, [], staged=True))

    # Queued on the current stream right after staging, as the next step would.
    on_device.weights.mul_(3.0).add_(1.0)
    on_device.strided.zero_()
    on_device.large.zero_()
    actual = staged.wait()

    assert stager.arena is not None
    assert stager.arena.is_pinned()
    assert 1 == len(staged.events)
    # The index says where each tensor lived: "cuda" here, "cpu" in expected.
    assert expected[1] == _joined(actual)
    assert json.loads(expected[0])["buffers"] == json.loads(actual.index)["buffers"]
