"""
Many processes: the process group of a ``torchrun`` job, and resumable's own
control traffic on it.

Under ``torchrun`` (RANK, WORLD_SIZE and MASTER_ADDR in the environment) the
default process group is set up here where the user has not (gloo on CPU, nccl
where CUDA is there), bounded by RESUMABLE_DIST_TIMEOUT, and destroyed at the end
only if it was made here. Beside it,
resumable keeps two gloo groups of its own, so that its messages never interleave
with the user's: one for the agreement at safe points, bounded by
RESUMABLE_DIST_TIMEOUT, one for waits on storage (a write, a resume), bounded by
RESUMABLE_DIST_IO_TIMEOUT. A rank that died turns into a ``RankLostError`` at
once (its connections close), one that hangs within that bound. Knows nothing
of snapshots.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from resumable._knobs import (
    DIST_IO_TIMEOUT,
    DIST_TIMEOUT,
    env_float,
    launched_rank,
    local_rank,
)
from resumable.errors import RankLostError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Seconds a rank waits for the others at a safe point. Only a rank that hangs
# needs it: a dead one's connections close, and the others learn of it at once.
# Long, so that a rank merely slower than the others (an evaluation on rank 0
# alone) is not taken for hung: NCCL's default, which the script's own
# collectives already wait.
_TIMEOUT = 600.0
# Seconds a rank waits for the others around storage: the slowest rank's write.
_IO_TIMEOUT = 600.0


class Group:
    """This process's place in a job of many processes, and resumable's groups."""

    def __init__(self, *, made_default: bool) -> None:
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.made_default = made_default
        self.timeout = _timeout()
        io_timeout = env_float(DIST_IO_TIMEOUT, 0.1) or _IO_TIMEOUT
        self._control = _gloo_group(self.timeout)
        self._io = _gloo_group(io_timeout)

    @property
    def leads(self) -> bool:
        """Whether this is rank 0, which claims, commits and cleans up."""
        return self.rank == 0

    def agree_stop(self, requested: bool) -> int | None:
        """
        Return the highest rank that asks to stop, or None: one all-reduce.

        Raises:
            RankLostError: Another rank died or did not arrive in time.
        """
        flag = torch.tensor([self.rank + 1 if requested else 0], dtype=torch.int64)
        with self._translated("the stop agreement", self.timeout):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._control)
        highest = int(flag.item())

        return highest - 1 if highest else None

    def all_agree(self, value: bool, what: str) -> bool:
        """Return whether ``value`` holds on every rank."""
        flag = torch.tensor([int(value)], dtype=torch.int64)
        with self._translated(what, self.timeout):
            dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=self._control)
        return bool(flag.item())

    def gather(self, value: Any, what: str) -> list[Any]:
        """Return every rank's ``value``, in rank order, on every rank."""
        values: list[Any] = [None] * self.world_size
        with self._translated(what, None):
            dist.all_gather_object(values, value, group=self._io)
        return values

    def lead(self, action: Callable[[], T], what: str) -> T:
        """
        Run ``action`` on rank 0 and hand its result, or its error, to every rank.

        Raises:
            BaseException: What ``action`` raised on rank 0 (on every rank).
        """
        box: list[Any] = [None]
        if self.leads:
            try:
                box[0] = ("result", action())
            except Exception as err:
                box[0] = ("error", err)
                self._broadcast(box, what)
                raise
        self._broadcast(box, what)
        kind, value = box[0]
        if kind == "error":
            raise value

        return value  # type: ignore[no-any-return]  # what action returned

    def close(self) -> None:
        """Let go of resumable's groups, and of the default one if made here."""
        with contextlib.suppress(Exception):
            dist.destroy_process_group(self._control)
            dist.destroy_process_group(self._io)
        if self.made_default:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()

    def _broadcast(self, box: list[Any], what: str) -> None:
        with self._translated(what, None):
            dist.broadcast_object_list(box, src=0, group=self._io)

    @contextlib.contextmanager
    def _translated(self, what: str, bound: float | None) -> Iterator[None]:
        try:
            yield
        except RuntimeError as err:
            waited = f"{bound:g} s" if bound is not None else "the I/O bound"
            msg = (
                f"Rank {self.rank} of {self.world_size} lost the other ranks during "
                f"{what}: one died, hung or failed (waited at most {waited}): "
                f"{err}. Nothing was committed by this step; run the job again to "
                "resume from the newest snapshot."
            )
            raise RankLostError(msg) from None


def join() -> Group | None:
    """
    Return the job's group where this process is one of several, else None.

    Sets up the default process group from torchrun's variables where the user
    has not.
    """
    if not dist.is_available():
        return None
    made = False
    if not dist.is_initialized():
        launched = launched_rank()
        if launched is None or launched[1] < 2:
            return None
        backend = _backend()
        # The script's own collectives get the same bound: a hung rank does not
        # hold the others in a gradient's all-reduce either.
        bound = datetime.timedelta(seconds=_timeout())
        dist.init_process_group(backend, timeout=bound)
        made = True
        logger.debug("process group initialised: backend=%s", backend)
    if dist.get_world_size() < 2:
        return None

    return Group(made_default=made)


@contextlib.contextmanager
def joined() -> Iterator[Group | None]:
    """The job's group (or None) for a block; closed at its end."""
    group = join()
    try:
        yield group
    finally:
        if group is not None:
            group.close()


def _timeout() -> float:
    return env_float(DIST_TIMEOUT, 0.1) or _TIMEOUT


def _backend() -> str:
    """
    Return the backend for a group set up here: gloo for CPU tensors, and nccl
    for CUDA ones where this rank has a GPU of its own (then made current).
    """
    rank = local_rank()
    if not torch.cuda.is_available() or rank >= torch.cuda.device_count():
        return "gloo"
    torch.cuda.set_device(rank)

    return "cpu:gloo,cuda:nccl"


def _gloo_group(seconds: float) -> Any:
    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=seconds))
