"""
Staging: a snapshot's buffers copied into one reusable host arena, laid out as the
data object, so that training can go on changing the state while the copy is written.

The arena is allocated once and kept while the state fits in it: it grows, never
shrinks, until ``release``. Large host buffers are copied by torch (on several
threads where torch has them), small ones by one memcpy each, the cheapest call per
buffer; tensors on a CUDA device go into pinned memory by non-blocking copies on a
side stream, and the device's current stream waits for those copies, so that the
next step's kernels cannot change a tensor before it is copied. The caller hands
the arena to one write at a time (``BackgroundWriter``): staging the next snapshot
overwrites it. Knows neither the storage nor the writer's thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import torch

from resumable._snapshot import (
    ALIGNMENT,
    Payload,
    data_size,
    encode_index,
    layout,
    pieces,
)

logger = logging.getLogger(__name__)

# Room an arena gets beyond the size asked for, as a share of it plus a constant:
# pickles that grow by a little at each snapshot then do not reallocate it (and
# touch fresh memory, 2-3 s a GiB on some machines) every time.
_SPARE_SHARE = 1 / 64
_SPARE_BYTES = 2**20
# Zeros to copy into padding.
_ZEROS = bytes(ALIGNMENT)
# Buffers from this size up are copied by torch, which splits a copy among its
# threads (from 32768 elements); smaller ones by memcpy, a fraction of a
# microsecond a call, against a few for torch's.
_THREADED_BYTES = 256 * 1024
# A new arena is touched this much at a time, so that a reservation can be dropped
# between two parts.
_TOUCH_BYTES = 64 * 2**20


@attrs.frozen
class Staged:
    """A staged snapshot: its payload, and the device copies it waits for."""

    payload: Payload
    events: tuple[Any, ...] = ()

    def wait(self) -> Payload:
        """Return the payload once every copy from a device has landed."""
        for event in self.events:
            event.synchronize()
        return self.payload


class Stager:
    """One arena of host memory that snapshots are copied into, in turn."""

    def __init__(self) -> None:
        self.arena: torch.Tensor | None = None
        self._pinned = False
        # The arena as bytes, for memcpy from host buffers.
        self._bytes: memoryview | None = None
        # The layout whose padding holds zeros; None where the whole arena does.
        self._zeroed: list[list[int]] | None = None
        self._streams: dict[torch.device, Any] = {}

    @property
    def capacity(self) -> int:
        return 0 if self.arena is None else self.arena.numel()

    def reserve(
        self,
        size: int,
        *,
        pinned: bool = False,
        cancel: threading.Event | None = None,
    ) -> None:
        """
        Make the arena hold at least ``size`` bytes, pinned where asked.

        Once ``cancel`` is set, a new arena is dropped before it is complete.
        """
        if size <= self.capacity and (self._pinned or not pinned):
            return
        # The old arena goes first: at most one is held at any time.
        self.release()
        capacity = size + int(size * _SPARE_SHARE) + _SPARE_BYTES
        capacity += -capacity % ALIGNMENT
        arena = torch.empty(capacity, dtype=torch.uint8, pin_memory=pinned)
        # Touched here, once: the copies into it then run at memory speed.
        for start in range(0, capacity, _TOUCH_BYTES):
            if cancel is not None and cancel.is_set():
                logger.debug("staging arena dropped: bytes=%d", capacity)
                return
            arena[start : start + _TOUCH_BYTES].zero_()
        self.arena, self._pinned = arena, pinned
        self._bytes = arena.numpy().data
        self._zeroed = None
        logger.debug("staging arena allocated: bytes=%d, pinned=%s", capacity, pinned)

    def release(self) -> None:
        """Let go of the arena; the next snapshot allocates a new one."""
        self.arena = self._bytes = self._zeroed = None
        self._pinned = False

    def stage(self, tree: dict[str, Any], buffers: Sequence[Any]) -> Staged:
        """
        Copy a snapshot's buffers into the arena and encode its index.

        ``buffers`` are bytes-like objects or tensors (``encode_snapshot(...,
        staged=True)``). What comes back holds no reference to the state: the
        index is encoded here, from the tree as it is now.
        """
        table = layout([_size(buffer) for buffer in buffers])
        devices = [
            index
            for index, buffer in enumerate(buffers)
            if isinstance(buffer, torch.Tensor) and buffer.device.type == "cuda"
        ]
        self.reserve(data_size(table), pinned=bool(devices))
        self._zero_padding(table)
        self._copy_from_host(buffers, table)
        events = self._copy_from_devices(buffers, table, devices) if devices else ()
        data = pieces(self._arena_bytes()[: data_size(table)])

        return Staged(Payload(encode_index(tree, table), data), events)

    def _arena_bytes(self) -> memoryview:
        assert self._bytes is not None  # reserve() made it
        return self._bytes

    def _zero_padding(self, table: list[list[int]]) -> None:
        """Zero the padding of a new layout; the buffers overwrite the rest."""
        if self._zeroed is not None and self._zeroed != table:
            target = self._arena_bytes()
            for offset, size in table:
                padding = -size % ALIGNMENT
                if padding:
                    target[offset + size : offset + size + padding] = _ZEROS[:padding]
        self._zeroed = table

    def _copy_from_host(self, buffers: Sequence[Any], table: list[list[int]]) -> None:
        target = self._arena_bytes()
        for buffer, (offset, size) in zip(buffers, table, strict=True):
            if not size:
                continue
            if isinstance(buffer, torch.Tensor):
                if buffer.device.type == "cuda":
                    continue  # _copy_from_devices
                if size < _THREADED_BYTES:
                    small = _small_bytes(buffer)
                    if small is not None:
                        target[offset : offset + size] = small
                        continue
                self._view(offset, buffer).copy_(buffer)
            elif size >= _THREADED_BYTES and _is_writable_array(buffer):
                self._arena_slice(offset, size).copy_(torch.from_numpy(buffer))
            else:
                target[offset : offset + size] = memoryview(buffer).cast("B")

    def _copy_from_devices(
        self, buffers: Sequence[Any], table: list[list[int]], devices: list[int]
    ) -> tuple[Any, ...]:
        """Start the copies from CUDA devices; return an event for each device."""
        groups: dict[torch.device, list[int]] = {}
        for index in devices:
            groups.setdefault(buffers[index].device, []).append(index)
        events = []
        for device, indices in groups.items():
            current = torch.cuda.current_stream(device)
            if device not in self._streams:
                stream = torch.cuda.Stream(device)  # type: ignore[no-untyped-call]
                self._streams[device] = stream
            side = self._streams[device]
            # The copies read what the kernels queued so far wrote.
            side.wait_stream(current)
            with torch.cuda.stream(side):
                for index in indices:
                    target = self._view(table[index][0], buffers[index])
                    target.copy_(buffers[index], non_blocking=True)
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(side)
            # Invariant: kernels queued from now on run after the copies, so a
            # tensor that the next step changes in place is copied as it was.
            current.wait_event(event)
            events.append(event)

        return tuple(events)

    def _arena_slice(self, offset: int, size: int) -> torch.Tensor:
        assert self.arena is not None  # reserve() made it
        return self.arena[offset : offset + size]

    def _view(self, offset: int, tensor: torch.Tensor) -> torch.Tensor:
        """The arena's bytes at ``offset``, seen as a tensor like ``tensor``."""
        size = tensor.numel() * tensor.element_size()
        view = self._arena_slice(offset, size).view(tensor.dtype)
        return view.view(tensor.shape)


def staged_size(buffers: Sequence[Any]) -> int:
    """Return the bytes that staging ``buffers`` takes in the arena."""
    return data_size(layout([_size(buffer) for buffer in buffers]))


def _size(buffer: Any) -> int:
    if isinstance(buffer, torch.Tensor):
        return buffer.numel() * buffer.element_size()
    return memoryview(buffer).nbytes


def _small_bytes(tensor: torch.Tensor) -> memoryview | None:
    """The bytes of a small CPU tensor as a view, or None where numpy has none."""
    if tensor.is_conj() or tensor.is_neg() or not tensor.is_contiguous():
        return None
    try:
        return tensor.numpy().data.cast("B")
    except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16, float8)
        return None


def _is_writable_array(buffer: Any) -> bool:
    return isinstance(buffer, np.ndarray) and bool(buffer.flags.writeable)
