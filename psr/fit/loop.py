"""The `psr fit` workflow: setup / train / checkpoint / save / evaluate for any fitter.

Resume rule. Every `checkpoint_every` steps (and at the last step) the fitter's state, the
step, the elapsed training time and the recipe's hash go to `<out>/.fit-checkpoint.pt`,
written atomically. A rerun of the same recipe (the default, `--resume`) continues from
it; a checkpoint of another recipe is an error unless `--fresh` discards it. After the
final weights and `metrics.json` are written the checkpoint is deleted, so the output
folder holds only what ships; rerunning a finished recipe then reports its metrics and
trains nothing, and another recipe refuses to overwrite them (`--fresh` retrains).

The recipe hash covers what decides the weights (not `out`, `device`, `threads` or
`checkpoint_every`), so a run may resume on another device or thread count.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

from psr.core.features import _resolve_device
from psr.core.io import prepare_output_dir, write_atomic, write_json_atomic
from psr.core.recipe import to_toml
from psr.errors import UserError
from psr.fit.fitters import FITTERS
from psr.fit.recipe import FitRecipe

CHECKPOINT = ".fit-checkpoint.pt"
METRICS = "metrics.json"


def recipe_hash(recipe: FitRecipe) -> str:
    same = dataclasses.replace(recipe, out=None, device="cpu", threads=1, checkpoint_every=1)
    return hashlib.sha256(to_toml(same).encode()).hexdigest()[:16]


def lr_at(step: int, recipe: FitRecipe) -> float:
    """Linear warm-up to `lr` over `warmup` steps, then cosine decay to 0 at `steps`."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    span = max(1, recipe.steps - recipe.warmup)
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - recipe.warmup) / span)))


def output_folder(recipe: FitRecipe) -> Path:
    return Path(recipe.out).expanduser() if recipe.out else FITTERS[recipe.model].asset


def run_fit(recipe: FitRecipe, *, resume: bool = True, show_progress: bool = True) -> dict:
    """Train `recipe.model`, write its weights and metrics.json into the output folder and
    return the metrics.json content."""
    import torch
    from tqdm import tqdm

    out = prepare_output_dir(output_folder(recipe))
    digest = recipe_hash(recipe)
    checkpoint = out / CHECKPOINT
    metrics_path = out / METRICS
    if not resume:
        checkpoint.unlink(missing_ok=True)
    state = None
    if checkpoint.is_file():
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state.get("recipe_hash") != digest:
            raise UserError(f"output {out}: holds a checkpoint of another recipe (hash {state.get('recipe_hash')}, "
                            f"this one {digest}); rerun with --fresh to discard it, or choose another out")
    elif resume and metrics_path.is_file():
        previous = json.loads(metrics_path.read_text(encoding="utf-8"))
        if previous.get("recipe_hash") == digest:
            print(f"psr fit: {out} already holds this recipe's weights; --fresh retrains", flush=True)
            return previous
        # Never overwrite finished weights (the shipped ones, by default) by accident.
        raise UserError(f"output {out}: holds weights trained by another recipe (hash {previous.get('recipe_hash')}, "
                        f"this one {digest}); choose another out, or --fresh to replace them")

    torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    device = _resolve_device(recipe.device)
    fitter_cls = FITTERS[recipe.model]
    fitter = fitter_cls(recipe, recipe.fitter_options(), device)
    start, elapsed = 0, 0.0
    if state is not None:
        fitter.load_state_dict(state["fitter"])
        start, elapsed = int(state["step"]), float(state["elapsed"])
        if show_progress:
            print(f"psr fit: resuming {recipe.model} at step {start}/{recipe.steps}", flush=True)

    def save_checkpoint(step: int, seconds: float) -> None:
        payload = {"recipe_hash": digest, "step": step, "elapsed": seconds, "fitter": fitter.state_dict()}
        write_atomic(checkpoint, lambda tmp: torch.save(payload, tmp))

    if start < recipe.steps:
        fitter.prepare(start, show_progress)
    began = time.perf_counter()
    bar = tqdm(range(start, recipe.steps), desc=f"fit {recipe.model}", disable=not show_progress,
               initial=start, total=recipe.steps)
    losses: dict[str, float] = {}
    for step in bar:
        losses = fitter.train_step(step)
        bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
        done = step + 1
        if done % recipe.checkpoint_every == 0 or done == recipe.steps:
            save_checkpoint(done, elapsed + time.perf_counter() - began)
    bar.close()
    elapsed += time.perf_counter() - began

    fitter.save(out)
    metrics = fitter.evaluate(show_progress)
    record = {"model": recipe.model, "recipe_hash": digest, "steps": recipe.steps,
              "train_seconds": round(elapsed, 1), "final_losses": {k: round(v, 4) for k, v in losses.items()},
              "recipe": dataclasses.asdict(recipe), "metrics": metrics}
    write_json_atomic(metrics_path, record)
    checkpoint.unlink(missing_ok=True)
    return record


def format_metrics(record: dict) -> str:
    """The metrics of a run as indented `key: value` lines (nested tables flattened)."""
    lines = [f"{record['model']}: {record['steps']} steps, {record['train_seconds']} s training"]

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            lines.append(f"  {prefix}: {value}")

    walk("", record["metrics"])
    return "\n".join(lines)
