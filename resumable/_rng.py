"""The process-wide random number generators: python, numpy, torch CPU and CUDA."""

from __future__ import annotations

import logging
import random
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
