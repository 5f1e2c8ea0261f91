"""The process-wide random number generators: python, numpy, torch CPU and CUDA."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def capture_global_rngs() -> dict[str, Any]:
    """Return the state of every global generator, as values the codec encodes."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(legacy=False),
        "torch": torch.get_rng_state(),
    }
    # is_initialized() is unannotated in torch.
    initialized = torch.cuda.is_initialized()  # type: ignore[no-untyped-call]
    if torch.cuda.is_available() and initialized:
        states["cuda"] = torch.cuda.get_rng_state_all()

    return states


def restore_global_rngs(states: dict[str, Any]) -> None:
    """Set every global generator to a state from ``capture_global_rngs``."""
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    cuda = states.get("cuda")
    if cuda is None:
        return
    if not torch.cuda.is_available():
        logger.warning(
            "cuda rng not restored: devices=0, saved=%d, cpu results stay exact",
            len(cuda),
        )
        return
    count = torch.cuda.device_count()
    if count != len(cuda):
        logger.warning(
            "cuda rng partly restored: devices=%d, saved=%d", count, len(cuda)
        )
    for device, state in enumerate(cuda[:count]):
        torch.cuda.set_rng_state(state, device)


def seed_global_rngs(seed: int) -> None:
    """Seed python, numpy and torch (every device) with one seed."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def find_generators(value: Any) -> list[Any]:
    """
    Return the RNG objects reachable from a state through attrs fields, dicts,
    lists and tuples, in a fixed order.
    """
    return reachable(
        value, lambda found: [found] if isinstance(found, RNG_TYPES) else None
    )


def reachable(value: Any, pick: Callable[[Any], list[Any] | None]) -> list[Any]:
    """
    Return what ``pick`` finds in a state, walking attrs fields, dicts, lists and
    tuples in a fixed order, each object once; where ``pick`` returns None, the
    walk goes into the value.
    """
    found: list[Any] = []
    _walk(value, pick, found, 0)

    return found


def _walk(
    value: Any, pick: Callable[[Any], list[Any] | None], found: list[Any], depth: int
) -> None:
    import attrs

    picked = pick(value)
    if picked is not None:
        found.extend(item for item in picked if not any(item is k for k in found))
        return
    if depth > 50:
        return
    children: list[Any] = []
    if attrs.has(type(value)):
        children = [
            getattr(value, field.name, None) for field in attrs.fields(type(value))
        ]
    elif type(value) in (list, tuple):
        children = list(value)
    elif isinstance(value, dict):
        children = list(value.values())
    for child in children:
        _walk(child, pick, found, depth + 1)


# Objects whose state find_generators() collects and the replay sets.
RNG_TYPES = (torch.Generator, np.random.Generator, np.random.RandomState, random.Random)


def capture_rngs(generators: list[Any]) -> dict[str, Any]:
    """Return the state of the global RNGs and of ``generators``."""
    return {
        "global": capture_global_rngs(),
        "objects": [_object_state(generator) for generator in generators],
    }


def restore_rngs(record: dict[str, Any], generators: list[Any]) -> None:
    """Set the global RNGs and ``generators`` to a record of ``capture_rngs``."""
    restore_global_rngs(record["global"])
    for generator, state in zip(generators, record["objects"], strict=True):
        if isinstance(generator, torch.Generator):
            generator.set_state(state)
        elif isinstance(generator, np.random.Generator):
            generator.bit_generator.state = state
        elif isinstance(generator, np.random.RandomState):
            generator.set_state(state)
        else:
            generator.setstate(state)


def _object_state(generator: Any) -> Any:
    if isinstance(generator, torch.Generator):
        return generator.get_state()
    if isinstance(generator, np.random.Generator):
        return generator.bit_generator.state
    if isinstance(generator, np.random.RandomState):
        return generator.get_state(legacy=False)
    return generator.getstate()
