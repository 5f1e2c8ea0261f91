"""
Where a snapshot's buffers can be read to: the live memory that restoring them fills.

It follows the decoder (``_codec``) through the tree and the state that ``init()``
built, and names a destination only where the decoder restores that very buffer
into that very memory: a dense, contiguous CPU tensor or numpy array of the
snapshot's dtype and shape, owned by no other destination. The decoder then finds
the bytes in place and copies nothing. Everything else (new or changed shapes,
CUDA tensors, tied weights) is left to the decoder, which copies as before.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from resumable._codec import (
    Node,
    _is_attrs_instance,
    _is_stateful,
    unwrap_module,
)
from resumable.errors import StateDefinitionError


def find_places(
    state: Any, fields: dict[str, Node], table: Sequence[Sequence[int]]
) -> list[memoryview | None]:
    """
    Return, for each buffer of ``table``, a writable view of the live memory it
    restores, or None where the decoder has to copy.
    """
    found: dict[int, Any] = {}
    _Walk(found).fields(state, fields)
    memory = {index: _writable_bytes(value) for index, value in found.items()}
    places: list[memoryview | None] = [None] * len(table)
    for index in _apart(memory):
        view = memory[index][1]
        if 0 <= index < len(table) and view.nbytes == table[index][1] > 0:
            places[index] = view

    return places


class _Walk:
    """Collects, by buffer index, the live tensor or array a buffer restores."""

    def __init__(self, found: dict[int, Any]) -> None:
        self.found = found

    def fields(self, target: Any, fields: dict[str, Node]) -> None:
        for name, node in fields.items():
            self.node(node, getattr(target, name, None))

    def node(self, node: Any, current: Any) -> None:
        visit = getattr(self, f"_{node.get('k')}", None) if type(node) is dict else None
        if visit is not None and current is not None:
            visit(node, current)

    def _tensor(self, node: Node, current: Any) -> None:
        if isinstance(current, torch.Tensor):
            check_writable(current)
        if (
            type(current) in (torch.Tensor, torch.nn.Parameter)
            and current.device.type == "cpu"
            and current.layout == torch.strided
            and str(current.dtype).removeprefix("torch.") == node["dtype"]
            and list(current.shape) == node["shape"]
            and current.is_contiguous()
            and not (current.is_conj() or current.is_neg() or current.is_inference())
        ):
            self.found[node["b"]] = current

    def _ndarray(self, node: Node, current: Any) -> None:
        if (
            type(current) is np.ndarray
            and current.dtype == np.dtype(node["dtype"])
            and list(current.shape) == node["shape"]
            and current.flags.c_contiguous
            and current.flags.writeable
        ):
            self.found[node["b"]] = current

    def _module(self, node: Node, current: Any) -> None:
        if isinstance(current, torch.nn.Module):
            self.node(node["state"], unwrap_module(current).state_dict())

    def _stateful(self, node: Node, current: Any) -> None:
        if _is_stateful(current):
            self.node(node["state"], current.state_dict())

    def _attrs(self, node: Node, current: Any) -> None:
        if _is_attrs_instance(current) and type(current).__qualname__ == node["class"]:
            self.fields(current, node["fields"])

    def _dict(self, node: Node, current: Any) -> None:
        if not isinstance(current, dict):
            return
        for key_node, value_node in node["items"]:
            key = key_node.get("v") if key_node.get("k") == "json" else None
            if type(key) in (str, int, float, bool):
                self.node(value_node, current.get(key))

    def _list(self, node: Node, current: Any) -> None:
        if "items" in node and isinstance(current, list | tuple):
            for item, target in zip(node["items"], current, strict=False):
                self.node(item, target)

    _tuple = _list


def check_writable(tensor: torch.Tensor) -> None:
    """
    Refuse a CPU tensor over read-only memory (a numpy memory map opened with
    mode "r"): restoring writes into it, which would crash the process.

    Raises:
        StateDefinitionError: The tensor's memory cannot be written.
    """
    if tensor.device.type != "cpu" or not tensor.numel() or tensor.is_meta:
        return
    if tensor.untyped_storage().resizable():
        return  # torch's own allocation: always writable
    view = _first_byte(tensor)
    if view is None:
        return
    read_end, write_end = os.pipe()
    try:
        os.write(write_end, view)
        try:
            # The kernel writes the byte back where it was, or says EFAULT.
            os.readv(read_end, [view])
        except OSError as err:
            if err.errno != errno.EFAULT:
                raise
            msg = (
                f"A tensor of the state ({tuple(tensor.shape)}, "
                f"{str(tensor.dtype).removeprefix('torch.')}) lies in read-only "
                "memory, such as a numpy memory map opened with mode 'r': a "
                "restore cannot write into it. Copy it in init() "
                "(torch.from_numpy(array.copy())) or declare its field "
                "resumable.transient()."
            )
            raise StateDefinitionError(msg) from None
    finally:
        os.close(read_end)
        os.close(write_end)


def _first_byte(tensor: torch.Tensor) -> memoryview | None:
    """The first byte of a tensor's memory, or None where numpy cannot view it."""
    try:
        first = torch.as_strided(tensor.detach(), (1,), (1,))
        return first.view(torch.uint8)[:1].numpy().data.cast("B")
    except (TypeError, RuntimeError):
        return None


def _writable_bytes(value: Any) -> tuple[int, memoryview]:
    """Return the address and writable bytes of a contiguous tensor or array."""
    if isinstance(value, torch.Tensor):
        try:
            array = value.detach().numpy()
        except TypeError:  # A dtype numpy lacks, such as bfloat16.
            array = value.detach().reshape(-1).view(torch.uint8).numpy()
        return value.data_ptr(), array.data.cast("B")
    return value.__array_interface__["data"][0], memoryview(value).cast("B")


def _apart(memory: dict[int, tuple[int, memoryview]]) -> list[int]:
    """Return the buffers whose memory no other buffer's overlaps (tied weights)."""
    spans = sorted(
        (address, view.nbytes, index)
        for index, (address, view) in memory.items()
        if view.nbytes
    )
    shared: set[int] = set()
    reach, holder = -1, -1
    for start, size, index in spans:
        if start < reach:
            shared.update((index, holder))
        if start + size > reach:
            reach, holder = start + size, index

    return [index for _, _, index in spans if index not in shared]
