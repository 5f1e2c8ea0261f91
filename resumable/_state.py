"""
The user's state object: declaration checks, schema, and the whole snapshot tree.

The tree of a snapshot holds the state's fields, the global RNGs and the metric
history; ``_codec`` does the encoding of each value.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from resumable._codec import (
    TRANSIENT_KEY,
    Decoder,
    Encoder,
    restore_fields,
    snapshot_fields,
)
from resumable._placement import find_places
from resumable._rng import capture_global_rngs, restore_global_rngs
from resumable.errors import (
    ConfigurationError,
    IncompatibleSnapshotError,
    StateDefinitionError,
)

Metrics = dict[str, float]


def transient(default: Any = None, *, factory: Callable[[], Any] | None = None) -> Any:
    """
    Declare an attrs field that ``init()`` rebuilds and snapshots never hold.

    Use it for data loaders, file handles, loggers and anything else that is made
    anew, not restored.

    Args:
        default: The field's default value.
        factory: A callable that makes the default instead, as in attrs.Factory.

    Returns:
        An attrs field definition.
    """
    metadata = {TRANSIENT_KEY: True}
    if factory is not None:
        return attrs.field(factory=factory, metadata=metadata)
    return attrs.field(default=default, metadata=metadata)


def check_state(state: Any, origin: str) -> None:
    """
    Check that ``state`` is an instance of an attrs class.

    Raises:
        StateDefinitionError: It is not.
    """
    if not attrs.has(type(state)):
        msg = (
            f"{origin} returned a {type(state).__name__}, not an instance of an attrs "
            "class. Declare the state with @attrs.define and return an instance."
        )
        raise StateDefinitionError(msg)


def schema(state: Any) -> dict[str, Any]:
    """Return what identifies the shape of a state: its class and snapshot fields."""
    fields = [field.name for field in snapshot_fields(type(state))]
    return {"class": type(state).__qualname__, "fields": fields}


def encode_snapshot(
    state: Any,
    history: Sequence[Metrics | None],
    *,
    resume: dict[str, Any] | None = None,
    dry_run: bool = False,
    staged: bool = False,
) -> tuple[dict[str, Any], list[Any]]:
    """
    Return the JSON tree and raw buffers of a snapshot of ``state``.

    ``resume`` is where inside a step the snapshot is taken, with the RNG states
    a replay of that step needs. With ``dry_run`` the buffers are not
    materialised; the call only proves that every field can be captured. With
    ``staged``, tensors come as tensors, for ``_staging`` to copy (those buffers
    are then no bytes-like objects).

    Raises:
        StateDefinitionError: A field holds something that cannot be captured.
    """
    encoder = Encoder(dry_run=dry_run, grads=resume is not None, staged=staged)
    fields = {
        field.name: encoder.encode(getattr(state, field.name), f"state.{field.name}")
        for field in snapshot_fields(type(state))
    }
    tree = {
        "state": fields,
        "rng": encoder.encode(capture_global_rngs(), "global random generators"),
        "history": list(history),
    }
    if resume is not None:
        tree["resume"] = encoder.encode(resume, "resume point")

    return tree, encoder.buffers


def decode_snapshot(
    state: Any, tree: dict[str, Any], buffers: Sequence[memoryview]
) -> list[Metrics | None]:
    """
    Restore ``state`` and the global RNGs from a snapshot; return its history.

    Raises:
        IncompatibleSnapshotError: The snapshot does not fit this state.
    """
    try:
        fields, rng, history = tree["state"], tree["rng"], tree["history"]
    except (KeyError, TypeError):
        msg = "The snapshot's index lacks the state, the RNGs or the history."
        raise IncompatibleSnapshotError(msg) from None
    decoder = Decoder(buffers)
    restore_fields(decoder, state, fields, "state")
    restore_global_rngs(decoder.decode(rng, None, "global random generators"))

    return list(history)


def place_snapshot(
    state: Any, tree: dict[str, Any], table: Sequence[Sequence[int]]
) -> list[memoryview | None]:
    """
    Return, for each buffer of a snapshot, the live memory of ``state`` that
    restoring it fills, or None; ``decode_snapshot`` then copies nothing for
    the buffers read there.
    """
    fields = tree.get("state")
    if type(fields) is not dict:
        return [None] * len(table)
    try:
        places = find_places(state, fields, table)
    except StateDefinitionError:
        raise  # memory that decoding could not write either
    except (AttributeError, IndexError, KeyError, TypeError, ValueError):
        # Placing only saves copies; decoding says what is wrong with the tree.
        return [None] * len(table)
    if "resume" in tree:
        # A replay decodes the snapshot again once the step's start has changed
        # the live tensors: its bytes must stay apart from them.
        return [None] * len(table)

    return places


def decode_resume(tree: dict[str, Any], buffers: Sequence[memoryview]) -> Any:
    """Return the resume point of a snapshot taken inside a step, or None."""
    node = tree.get("resume")
    return None if node is None else Decoder(buffers).decode(node, None, "resume")


def check_capturable(state: Any) -> int:
    """
    Prove before any training that every field of ``state`` can be captured.

    Returns:
        The bytes of its tensors and arrays.
    """
    try:
        _, buffers = encode_snapshot(state, [], dry_run=True)
    except StateDefinitionError:
        raise
    except Exception as err:
        msg = f"Capturing the state failed: {type(err).__name__}: {err}"
        raise StateDefinitionError(msg) from err
    return sum(size for size in buffers if isinstance(size, int))


def check_metrics(metrics: object, index: int) -> Metrics | None:
    """Check what a step returned: None, or a dict of metric names to numbers."""
    if metrics is None:
        return None
    if not isinstance(metrics, Mapping):
        msg = (
            f"Step {index} returned a {type(metrics).__name__}; a step returns None "
            "or a dict of metric names to numbers."
        )
        raise ConfigurationError(msg)
    checked = {}
    for key, value in metrics.items():
        # A loss tensor still attached to its graph warns when turned into a float.
        detach = getattr(value, "detach", None)
        try:
            if isinstance(value, str | bytes):
                raise TypeError
            number = float(detach() if callable(detach) else value)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            msg = (
                f"Step {index} returned metric {key!r} = {value!r}; metric values "
                "must be numbers (a float, an int or a one-element tensor)."
            )
            raise ConfigurationError(msg) from None
        checked[str(key)] = number

    return checked
