"""Atomic, exactly resumable training checkpoints.

A checkpoint is a folder `out/checkpoints/step_XXXXXX/`:

    trainable.safetensors   every trainable weight (all transformer weights for a full
                            fine-tune, the LoRA / MoE-LoRA weights otherwise), float32
    ema.safetensors         their EMA (when train.ema_decay > 0)
    optimizer.pt            AdamW state          scheduler.pt   LR scheduler state
    rng_<rank>.pt           python, numpy, torch CPU and CUDA generator states per process
    accelerate/             accelerate's own state, only under FSDP / DeepSpeed
    recipe.toml             the resolved recipe (what `psr pretrain --export` rebuilds)
    state.json              step, micro-batches consumed, epoch, recipe hash; written last

Everything is written into `checkpoints/.tmp-step_XXXXXX/` and the folder is renamed into
place only when complete, so a kill at any moment leaves the previous checkpoints intact
and at worst a `.tmp-*` folder, which is ignored and removed by the next run. Older
checkpoints beyond `keep_last` are deleted only after the new one is in place.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors import safe_open

from psr.core.io import write_json_atomic, write_text_atomic
from psr.core.recipe import read_toml
from psr.core.weights import STATE, load_tensors  # noqa: F401 (the checkpoint layout)
from psr.errors import UserError

STEP_DIR = re.compile(r"^step_(\d+)$")


def step_name(step: int) -> str:
    return f"step_{step:06d}"


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every finished checkpoint under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match and path.is_dir() and (path / STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def check_planned_steps(latest: Path | None, schedule: str, steps: int) -> None:
    """Refuse resuming `latest` with another `train.steps` under a decaying schedule.

    train.steps is an operational key, left out of the hash so that a constant-rate run can
    be carried on; a cosine schedule reads it for every step's rate, so another value would
    change the learning rate of the steps still to come."""
    if latest is None or schedule == "constant":
        return
    planned = read_toml(latest / "recipe.toml").get("train", {}).get("steps")
    if planned != steps:
        raise UserError(f"--resume: {latest} decays its learning rate ({schedule}) over {planned} steps; "
                        f"train.steps {steps} would change that curve mid-run. Resume with train.steps={planned}, "
                        f"or start a new run from its weights (--set model.weights={str(latest)!r})")


def resumable_checkpoint(out: Path, digest: str, resume: bool,
                         changed_at: Callable[[Path], str]) -> tuple[Path | None, dict[str, Any]]:
    """The newest checkpoint of run folder `out` and its saved state (`{"step": 0}` when
    there is none), after the checks every resumable trainer makes: a folder that holds a
    run needs `--resume`, and a resume needs the recipe that wrote it (`digest`);
    `changed_at(checkpoint)` names the first recipe key that differs."""
    latest, state = None, None
    for _, folder in reversed(complete_checkpoints(out / "checkpoints")):
        damage = checkpoint_damage(folder)
        if damage is None:
            latest, state = folder, read_state(folder)
            break
        # A checkpoint cut short (a full disk, a killed copy) is skipped, not fatal: the one
        # before it is complete, and training redoes the steps in between exactly.
        print(f"psr: checkpoint {folder.name} is damaged ({damage}); using the one before it", file=sys.stderr)
    if latest is None:
        return None, {"step": 0}
    if not resume:
        raise UserError(f"out {out}: holds checkpoints up to {latest.name}; pass --resume to continue that run, "
                        "or choose another --out")
    if state.get("recipe_hash") != digest:
        raise UserError(f"--resume: the recipe differs from the one of {latest} at "
                        f"{changed_at(latest)}; resume with the same recipe or use another --out")
    return latest, state


def checkpoint_damage(folder: Path) -> str | None:
    """Why a finished-looking checkpoint folder cannot be read back, or None. Cheap checks
    only: state.json parses, the safetensors headers and the torch zip directories (at the
    end of each file, so a truncated file fails) are readable."""
    try:
        state = read_state(folder)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{STATE}: {err.__class__.__name__}"
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        return f"{STATE}: no step"
    for name in ("trainable.safetensors", "ema.safetensors"):
        path = folder / name
        if name == "trainable.safetensors" or path.exists():
            try:
                with safe_open(str(path), "pt") as f:
                    f.keys()
            except Exception as err:  # safetensors raises its own error types for a bad header
                return f"{name}: {str(err).splitlines()[0] if str(err) else err.__class__.__name__}"
    for path in [folder / "scheduler.pt", folder / "optimizer.pt", *folder.glob("rng_*.pt")]:
        if path.name == "scheduler.pt" or path.exists():
            try:
                zipfile.ZipFile(path).close()
            except (OSError, zipfile.BadZipFile) as err:
                return f"{path.name}: {err.__class__.__name__}"
    return None


def remove_stale(root: str | Path) -> int:
    """Delete `.tmp-*` folders left by a run killed while checkpointing; returns how many."""
    root = Path(root)
    stale = [p for p in root.glob(".tmp-*") if p.is_dir()] if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))


def save_checkpoint(root: str | Path, step: int, *, accelerator, trainable: dict[str, torch.Tensor],
                    ema: dict[str, torch.Tensor] | None, optimizer, scheduler, state: dict,
                    recipe_toml: str, keep_last: int) -> Path:
    """Write checkpoint `step` atomically (all processes call this); returns its folder."""
    root = Path(root)
    tmp, final = root / f".tmp-{step_name(step)}", root / step_name(step)
    sharded = accelerator.distributed_type.value in ("FSDP", "DEEPSPEED")
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng_{accelerator.process_index}.pt")
    if sharded:  # optimizer state lives in shards: accelerate writes them
        accelerator.save_state(str(tmp / "accelerate"))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _save_tensors(tmp / "trainable.safetensors", trainable)
        if ema is not None:
            _save_tensors(tmp / "ema.safetensors", ema)
        if not sharded:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        write_text_atomic(tmp / "recipe.toml", recipe_toml)
        write_json_atomic(tmp / STATE, {**state, "step": step, "world_size": accelerator.num_processes})
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        for _, old in complete_checkpoints(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_dir(path: Path) -> None:
    """Make the renames durable where the OS allows opening a folder."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_state(folder: str | Path) -> dict:
    return json.loads((Path(folder) / STATE).read_text())


def load_checkpoint(folder: str | Path, process_index: int = 0) -> dict[str, Any]:
    """Read a checkpoint folder back (tensors on the CPU)."""
    folder = Path(folder)
    out = {
        "state": read_state(folder),
        "trainable": load_tensors(folder / "trainable.safetensors"),
        "ema": load_tensors(folder / "ema.safetensors") if (folder / "ema.safetensors").is_file() else None,
        "optimizer": torch.load(folder / "optimizer.pt", weights_only=True) if (folder / "optimizer.pt").is_file()
        else None,
        "scheduler": torch.load(folder / "scheduler.pt", weights_only=True),
        "accelerate": folder / "accelerate" if (folder / "accelerate").is_dir() else None,
        "recipe_toml": (folder / "recipe.toml").read_text(),
    }
    rng = folder / f"rng_{process_index}.pt"
    # Our own file of generator states (numpy's is a tuple with an array): not weights-only.
    out["rng"] = torch.load(rng, weights_only=False) if rng.is_file() else None
    return out
