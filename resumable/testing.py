"""
Helpers for testing steps and resume, with pytest or without.

    result = run_steps(train, 5)                  # 5 steps on in-memory storage
    assert_resumes_identically(train, kill_after=[3, 7], steps=10)
    assert_resumes_identically(train, preempt_at=[(2, 5)])   # item 5 of step 2
    assert_states_equal(expected_state, actual_state)
"""

from __future__ import annotations

import types
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import cloudpickle
import numpy as np
import torch

from resumable._codec import Encoder, Node, snapshot_fields, tensor_bytes
from resumable._rng import seed_global_rngs
from resumable._runtime import Result, Runtime
from resumable._settings import Settings
from resumable._step import Step
from resumable._storage import Storage
from resumable.errors import ConfigurationError

__all__ = [
    "assert_resumes_identically",
    "assert_states_equal",
    "diff_states",
    "memory_storage",
    "run_killed",
    "run_preempted",
    "run_steps",
]

StateT = TypeVar("StateT")


def memory_storage() -> str:
    """Return a new, empty in-memory storage URL."""
    return f"memory://resumable-testing/{uuid.uuid4().hex}"


def run_steps(
    step: Step[StateT],
    steps: int | None = None,
    *,
    storage: str | None = None,
    every: int | None = None,
    seed: int = 0,
    **options: Any,
) -> Result[StateT]:
    """
    Run ``step`` for ``steps`` steps (the decorator's count by default).

    The global RNGs are seeded with ``seed`` first, and storage is a fresh
    in-memory one unless given. ``options`` are further options of
    ``resumable.run`` (keep, grace, max_attempts, ...); RESUMABLE_* variables
    are not read.
    """
    return run_killed(
        step, None, steps=steps, storage=storage, every=every, seed=seed, **options
    )


def run_killed(
    step: Step[StateT],
    kill_after: int | None,
    *,
    steps: int | None = None,
    storage: str | None = None,
    every: int | None = None,
    seed: int = 0,
    **options: Any,
) -> Result[StateT]:
    """
    Run ``step`` and stop after step ``kill_after`` as if the process died there.

    What was committed by then stays on the storage; the rest is lost, as in a
    SIGKILL. The kill lands once the snapshot of step ``kill_after``, where the
    cadence takes one, is committed: a snapshot written in the background is
    waited for, so that the outcome does not depend on timing (kills in the
    middle of a write are for tests with real processes). With ``kill_after``
    None the run goes to the end.
    """
    runtime = _runtime(step, steps=steps, storage=storage, every=every, **options)
    runtime.stop_after = kill_after
    seed_global_rngs(seed)

    return runtime.run()


def run_preempted(
    step: Step[StateT],
    at_step: int,
    at_item: int | None = None,
    *,
    at_loop: int | None = None,
    steps: int | None = None,
    storage: str | None = None,
    every: int | None = None,
    seed: int = 0,
    **options: Any,
) -> Result[StateT]:
    """
    Run ``step`` with a stop request as a scheduler's signal would make one.

    The request comes during step ``at_step`` (0-based): after its item
    ``at_item`` of a ``resumable.iterate`` loop (items counted from 1; the
    first loop to reach it, or loop ``at_loop`` counted from 0), or at the end
    of the step where ``at_item`` is None. The run snapshots there and returns
    with ``result.preempted`` true, as the CLI would exit.
    """
    if at_step < 0 or (at_item is not None and at_item < 1):
        msg = (
            f"Steps count from 0 and items from 1, not step {at_step}, item {at_item}."
        )
        raise ConfigurationError(msg)
    runtime = _runtime(step, steps=steps, storage=storage, every=every, **options)
    runtime.preemption.simulate = (at_step, at_loop, at_item)
    seed_global_rngs(seed)
    result = runtime.run()
    if not runtime.preemption.requested:
        msg = (
            f"The run never reached step {at_step}"
            + ("" if at_item is None else f", item {at_item}")
            + f" before it ended at step {result.step} (steps count from 0, items "
            "from 1): nothing was preempted."
        )
        raise AssertionError(msg)

    return result


def _runtime(
    step: Step[StateT],
    *,
    steps: int | None,
    storage: str | None,
    every: int | None,
    **options: Any,
) -> Runtime[StateT]:
    # Tests mean what they say: RESUMABLE_* variables do not change them.
    settings = Settings.resolve(
        step,
        use_environment=False,
        storage=storage or memory_storage(),
        steps=steps,
        every=every,
        **options,
    )
    return Runtime(step, settings, Storage.open(settings.storage))


def assert_resumes_identically(
    step: Step[Any],
    *,
    kill_after: Iterable[int] = (),
    preempt_at: Iterable[tuple[int, int | None]] = (),
    steps: int | None = None,
    every: int | None = None,
    seed: int = 0,
) -> None:
    """
    Assert that a run killed or preempted, then resumed, ends equal.

    The run is killed after each step of ``kill_after`` in turn, then preempted
    at each ``(step, item)`` of ``preempt_at`` (item None: at the step's end),
    resuming each time.

    Equal means the same state, tensor by tensor and bit by bit, and the same
    metric history, as an uninterrupted run. Every incarnation starts with the
    global RNGs seeded with ``seed``; a resume that failed to restore them would
    continue from that seed, not from where the killed run was.

    Raises:
        AssertionError: With a readable list of what differs.
    """
    expected = run_steps(step, steps, every=every, seed=seed)
    storage = memory_storage()
    for kill in kill_after:
        run_killed(step, kill, steps=steps, storage=storage, every=every, seed=seed)
        _check_resumable(storage, f"a kill after step {kill}")
    for at_step, at_item in preempt_at:
        run_preempted(
            step, at_step, at_item, steps=steps, storage=storage, every=every, seed=seed
        )
        _check_resumable(storage, f"a preemption at step {at_step}, item {at_item}")
    actual = run_steps(step, steps, storage=storage, every=every, seed=seed)
    problems = diff_states(expected.state, actual.state)
    if expected.history != actual.history:
        problems.append(
            f"history: expected {expected.history!r}, got {actual.history!r}"
        )
    if problems:
        report = "\n  ".join(problems)
        msg = f"Resumed run differs from the uninterrupted one:\n  {report}"
        raise AssertionError(msg)


def _check_resumable(storage: str, when: str) -> None:
    """Fail where an interruption left nothing to resume: that would test nothing."""
    if not Storage.open(storage).committed():
        msg = (
            f"No snapshot was committed before {when}, so the next run starts over "
            "and nothing of resume is tested. Choose a later point or a smaller "
            "every."
        )
        raise AssertionError(msg)


def assert_states_equal(expected: Any, actual: Any) -> None:
    """
    Assert that two states are equal in every snapshotted field, bit by bit.

    Raises:
        AssertionError: With a readable list of what differs.
    """
    problems = diff_states(expected, actual)
    if problems:
        msg = "States differ:\n  " + "\n  ".join(problems)
        raise AssertionError(msg)


def diff_states(expected: Any, actual: Any) -> list[str]:
    """Return a line for each difference between two states; empty when equal."""
    if type(expected) is not type(actual):
        return [f"state: {type(expected).__name__} vs {type(actual).__name__}"]
    left, right = Encoder(), Encoder()
    problems: list[str] = []
    for field in snapshot_fields(type(expected)):
        path = f"state.{field.name}"
        nodes = (
            left.encode(getattr(expected, field.name), path),
            right.encode(getattr(actual, field.name), path),
        )
        _diff(nodes, (left.buffers, right.buffers), path, problems)

    return problems


def _diff(
    nodes: tuple[Node, Node],
    buffers: tuple[Sequence[Any], Sequence[Any]],
    path: str,
    problems: list[str],
) -> None:
    left, right = nodes
    if left.get("k") != right.get("k"):
        problems.append(f"{path}: {left.get('k')} vs {right.get('k')}")
        return
    if "b" in left:
        _diff_buffer(left, right, buffers, path, problems)
    for key in sorted((set(left) | set(right)) - {"b"}):
        one, two = left.get(key), right.get(key)
        if isinstance(one, dict) and isinstance(two, dict) and "k" in one:
            _diff((one, two), buffers, _child(path, key), problems)
        elif key == "fields" and isinstance(one, dict) and isinstance(two, dict):
            for name in sorted(set(one) | set(two)):
                if name not in one or name not in two:
                    problems.append(f"{path}.{name}: missing on one side")
                else:
                    _diff((one[name], two[name]), buffers, f"{path}.{name}", problems)
        elif key == "items" and isinstance(one, list) and isinstance(two, list):
            _diff_items(one, two, buffers, path, problems)
        elif _json(one) != _json(two):
            problems.append(f"{path}{_child('', key)}: {one!r} != {two!r}")


def _diff_items(
    left: list[Any],
    right: list[Any],
    buffers: tuple[Sequence[Any], Sequence[Any]],
    path: str,
    problems: list[str],
) -> None:
    if len(left) != len(right):
        problems.append(f"{path}: {len(left)} items vs {len(right)}")
        return
    for index, (one, two) in enumerate(zip(left, right, strict=True)):
        if isinstance(one, list):  # a dict's [key, value] pair
            label = _json(one[0].get("v", index))
            _diff((one[0], two[0]), buffers, f"{path} key {label}", problems)
            _diff((one[1], two[1]), buffers, f"{path}[{label}]", problems)
        else:
            _diff((one, two), buffers, f"{path}[{index}]", problems)


def _diff_buffer(
    left: Node,
    right: Node,
    buffers: tuple[Sequence[Any], Sequence[Any]],
    path: str,
    problems: list[str],
) -> None:
    one = bytes(memoryview(buffers[0][left["b"]]).cast("B"))
    two = bytes(memoryview(buffers[1][right["b"]]).cast("B"))
    if one == two or left.get("dtype") != right.get("dtype"):
        return
    if left["k"] in ("pickle", "attrs"):
        # Equal objects can pickle to other bytes (addresses, class ids): compare
        # what the bytes hold.
        if not _same_value(cloudpickle.loads(one), cloudpickle.loads(two)):
            problems.append(f"{path}: pickled values differ")
        return
    count, largest = _numeric_difference(one, two, left)
    problems.append(
        f"{path}: {count} of {left.get('shape')} elements differ"
        + (f", largest difference {largest:.6g}" if largest is not None else "")
    )


def _same_value(left: Any, right: Any, depth: int = 0) -> bool:
    """Compare two unpickled values by content, as far as 20 levels down."""
    if type(left).__qualname__ != type(right).__qualname__ or depth > 20:
        return False
    if isinstance(left, torch.Tensor):
        return bool(
            left.dtype == right.dtype
            and left.shape == right.shape
            and bytes(tensor_bytes(left)) == bytes(tensor_bytes(right))
        )
    if isinstance(left, np.ndarray):
        return bool(left.dtype == right.dtype and left.tobytes() == right.tobytes())
    if isinstance(left, dict):
        return left.keys() == right.keys() and all(
            _same_value(left[key], right[key], depth + 1) for key in left
        )
    if isinstance(left, list | tuple):
        return len(left) == len(right) and all(
            _same_value(a, b, depth + 1) for a, b in zip(left, right, strict=True)
        )
    if isinstance(left, types.FunctionType):
        same_code = bool(left.__code__ == right.__code__)
        return same_code and _same_value(_closure(left), _closure(right), depth + 1)
    if isinstance(left, type):
        return bool(left.__qualname__ == right.__qualname__)
    # Objects with equal fields are equal, whatever their __eq__ makes of tensors.
    if hasattr(left, "__dict__") and _same_value(vars(left), vars(right), depth + 1):
        return True
    try:
        return bool(left == right)
    except Exception:
        return False


def _closure(function: types.FunctionType) -> list[Any]:
    return [cell.cell_contents for cell in function.__closure__ or ()]


def _numeric_difference(one: bytes, two: bytes, node: Node) -> tuple[int, float | None]:
    if len(one) != len(two):
        return -1, None
    if node["k"] == "tensor":
        dtype = getattr(torch, node["dtype"])
        a = torch.frombuffer(bytearray(one), dtype=torch.uint8).view(dtype)
        b = torch.frombuffer(bytearray(two), dtype=torch.uint8).view(dtype)
        differs = a != b
        largest = None
        if dtype.is_floating_point:
            largest = float((a.double() - b.double()).abs().nan_to_num().max())
        return int(differs.sum()), largest
    array_one = np.frombuffer(one, dtype=np.dtype(node["dtype"]))
    array_two = np.frombuffer(two, dtype=np.dtype(node["dtype"]))
    return int((array_one != array_two).sum()), None


def _child(path: str, key: str) -> str:
    return (
        path if key in ("v", "state", "fields", "items", "plain") else f"{path}.{key}"
    )


def _json(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=repr)
