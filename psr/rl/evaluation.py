"""Held-out evaluation during RL: ODE samples of a bench slice, scored by the reward mix.

Item k of the slice (the first `eval.limit` items of each chosen subset) is generated with
noise seed `eval.seed + k`, `eval.steps` Euler steps and the EMA weights when EMA is on,
so every evaluation of a run sees the same prompts, references and noise. The result is
the mean of every reward term over the items (NaN entries, where a term is undefined for
an item, are left out of its mean), logged as `eval/<term>`, plus a strip of the images.
Held-out metrics (`eval.metrics`: rewards the policy is not trained on) score the same
images, each as `eval/metric:<label>`, so a gamed reward shows as a gap between the two.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from PIL import Image

from psr.core.io import write_atomic
from psr.rewards import RewardBatch
from psr.train.samples import generate_one


def generate(model, items, cfg, autocast=contextlib.nullcontext) -> tuple[list[Image.Image], list[list[Image.Image]]]:
    """(generated image, its references) per item, with the transformer in eval mode."""
    transformer = model.transformer
    was_training = transformer.training
    transformer.eval()
    images, references = [], []
    try:
        with autocast():
            for k, item in enumerate(items):
                refs = item.references()
                images.append(generate_one(model, item.prompt, refs, size=cfg.size, steps=cfg.steps,
                                           guidance=cfg.guidance, seed=cfg.seed + k))
                references.append(refs)
    finally:
        transformer.train(was_training)
    return images, references


def strip(images: list[Image.Image], columns: int = 8) -> Image.Image:
    """The images in rows of `columns`, on white."""
    size = images[0].width
    rows = (len(images) + columns - 1) // columns
    sheet = Image.new("RGB", (min(columns, len(images)) * size, rows * size), (255, 255, 255))
    for k, image in enumerate(images):
        sheet.paste(image, ((k % columns) * size, (k // columns) * size))
    return sheet


def evaluate(model, items, reward, cfg, autocast=contextlib.nullcontext, folder: Path | None = None,
             step: int = 0, metrics: dict | None = None) -> dict[str, float]:
    """Mean reward terms of the slice as {"eval/reward": …, "eval/<term>": …}, and each
    held-out metric's mean total as "eval/metric:<label>"; with `folder`, also writes
    folder/step_XXXXXX.png."""
    import torch

    images, references = generate(model, items, cfg, autocast)
    batch = RewardBatch(images, [i.prompt for i in items], references, [list(i.categories) for i in items])
    result = reward(batch)
    out = {"eval/reward": result.total.double().mean().item()}
    for label, metric in (metrics or {}).items():
        out[f"eval/metric:{label}"] = metric(batch).total.double().mean().item()
    for name, values in sorted(result.terms.items()):
        defined = values[~torch.isnan(values)].double()
        out[f"eval/{name}"] = defined.mean().item() if defined.numel() else float("nan")
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        sheet = strip(images)
        write_atomic(folder / f"step_{step:06d}.png", lambda tmp: sheet.save(tmp, format="PNG"))
    return out
