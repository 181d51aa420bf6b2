"""Every RNG state a run draws from, in a form a checkpoint can carry and give back.

CPU torch, numpy and Python states always; the CUDA generators too when CUDA is
available (one state per visible device, as `torch.cuda.get_rng_state_all` gives
them), so a GPU resume draws the same dropout masks and random crops as the
uninterrupted run. numpy's key array is stored as a tensor so the checkpoint loads
with `weights_only=True`.

Example:
    >>> checkpoint["qat"]["rng"] = collect_rng_states()
    >>> restore_rng_states(checkpoint["qat"]["rng"])
"""

from __future__ import annotations

import random
import warnings

import numpy as np
import torch


class RNGStateWarning(UserWarning):
    """A checkpoint's CUDA RNG states cannot be restored on this machine."""


def _numpy_state() -> list:
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]


def collect_rng_states() -> dict:
    """The current torch (CPU, and CUDA when available), numpy and Python RNG states."""
    states = {"torch": torch.get_rng_state(), "numpy": _numpy_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        states["cuda"] = list(torch.cuda.get_rng_state_all())
    return states


def restore_rng_states(states: dict) -> None:
    """Set every RNG from `states` (as `collect_rng_states` made them).

    CUDA states saved on a machine with another number of visible GPUs (or none here) are
    not restored, with a `RNGStateWarning`: the run resumes, but will not draw the same
    numbers on the GPUs as the uninterrupted one."""
    cuda = states.get("cuda")
    if cuda is not None:
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if available == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
        else:
            warnings.warn(
                f"the checkpoint holds CUDA RNG states for {len(cuda)} device(s) but {available} are visible "
                "here: they are not restored, so GPU random numbers (dropout, augmentation) will differ from "
                "the uninterrupted run; resume on the same number of GPUs to reproduce it", RNGStateWarning,
                stacklevel=2)
    torch.set_rng_state(states["torch"])
    name, keys, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(states["python"])
