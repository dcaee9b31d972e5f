"""The accelerator of a training run: which device, and whether processes share the work.

Under a distributed launcher (`torchrun`, `accelerate launch`; WORLD_SIZE > 1) accelerate
builds a process group only for CUDA, or for the CPU when it is told to use the CPU (gloo):
asked for anything else, every process silently runs its own single-process copy of the
run into the same folder. So `model.device` is resolved here first: "auto" under a launcher
on a machine without CUDA means the CPU (MPS has no collective backend), a CUDA device
without CUDA is a one-line error, and MPS under a launcher is refused.
"""

from __future__ import annotations

import os

from psr.core.components import resolve_device
from psr.errors import UserError


def launched_processes() -> int:
    """The number of processes the launcher started (1 without a launcher)."""
    try:
        return max(int(os.environ.get("WORLD_SIZE", "1")), 1)
    except ValueError:
        return 1


def training_device(name: str, key: str = "model.device"):
    """The torch device type a run trains on, for the recipe's device string `name`."""
    import torch

    try:
        device = resolve_device(name)
    except UserError as err:
        raise UserError(f"{key} {str(err).removeprefix('device ')}") from None
    several = launched_processes() > 1
    if several and device.type == "mps":
        if name != "auto":
            raise UserError(f"{key} {name!r}: MPS has no collective backend for {launched_processes()} processes; "
                            "use model.device = \"cpu\" or launch one process")
        device = torch.device("cpu")
    return device


def make_accelerator(device: str, mixed_precision: str):
    """An `Accelerator` on the recipe's device (module docstring). A previous run in this
    process may have fixed another precision; the process group (PartialState) is kept."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    resolved = training_device(device)
    AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=resolved.type == "cpu", mixed_precision=mixed_precision)
    if accelerator.device.type != resolved.type:
        # e.g. a process group this Python process set up earlier on another device
        raise UserError(f"model.device {device!r}: this process's accelerator runs on {accelerator.device.type}")
    return accelerator
