"""Fixed sample grids during training: the same prompts, references and noise every time.

Row k of a grid shows its references, then the image generated from its prompt with noise
seed `samples.seed + k`. Rows come from ToyWorld's held-out (eval) identities, example
seed 2·10⁹ + samples.seed + k (disjoint from `psr synth` training and bench seeds), or
from the first rows of `samples.dataset`.
"""

from __future__ import annotations

import contextlib

import torch
from PIL import Image

from psr import toyworld as tw
from psr.core import images as imgs
from psr.core.attention import TokenLayout
from psr.core.lora import lora_token_mask
from psr.core.model import Guidance, MultiRefFlux, ReferenceCache
from psr.core.sampler import euler_sample, flux_schedule
from psr.train.data import open_dataset

TOYWORLD_SEED = 2_000_000_000


def sample_inputs(cfg, reference_size: int) -> list[tuple[str, list[Image.Image]]]:
    """(prompt, reference images) per grid row."""
    if cfg.dataset:
        dataset = open_dataset(cfg.dataset)
        rows = []
        for k in range(min(cfg.count, len(dataset))):
            item = dataset[k]
            rows.append((item["prompt"], [Image.fromarray(a) for a in item["references"]]))
        return rows

    ratio = tw.sampling.LEVELS[cfg.level].reference_ratio
    ref_px = (64 if reference_size <= 64 else 128) // ratio  # a level renders references at 1/ratio
    rows = []
    for k in range(cfg.count):
        subjects = cfg.subjects[k % len(cfg.subjects)]
        example = tw.sample_example(TOYWORLD_SEED + cfg.seed + k, subjects, tw.DEFAULT_ID_RANGES["eval"],
                                    level=cfg.level)
        rows.append((example.prompt, [Image.fromarray(tw.render(r, ref_px).image) for r in example.references]))
    return rows


@torch.no_grad()
def generate_one(model: MultiRefFlux, prompt: str, references: list[Image.Image], *, size: int, steps: int,
                 guidance: float, seed: int, image_guidance: float = 1.0) -> Image.Image:
    """One image, with the model's transformer as it is now (LoRA token mask handled per
    guidance branch); `guidance` as in `MultiRefFlux.generate`."""
    grid = (size // model.token_stride, size // model.token_stride)
    text = model.encode_prompt([prompt])
    refs = model.encode_references(references, grid, prompt)
    latents = model.noise([seed], size, size)
    schedule = flux_schedule(model.components.scheduler.config, steps, grid[0] * grid[1])
    how = Guidance.for_model(model.transformer, guidance, image_guidance)
    null = model.null_prompt(1) if how.needs_null_prompt else None

    def branch(branch_refs):
        mask = TokenLayout.for_velocity(text.embeds.shape[1], grid, branch_refs.grids).reference_mask()
        return lora_token_mask(model.transformer, mask.to(model.device))

    cache = ReferenceCache(model)  # cached reference mode: the references' keys and values once per branch
    latents = euler_sample(lambda x, t: model.guided_velocity(x, t, text, refs, grid, how, null, branch, cache),
                           latents, schedule)
    return imgs.to_pil(model.decode(latents, size, size))[0]


def _fit(image: Image.Image, size: int) -> Image.Image:
    """`image` scaled to fit a size x size cell, centred on white."""
    cell = Image.new("RGB", (size, size), (255, 255, 255))
    thumb = image.copy()
    thumb.thumbnail((size, size), Image.Resampling.LANCZOS)
    cell.paste(thumb, ((size - thumb.width) // 2, (size - thumb.height) // 2))
    return cell


def sample_grid(model: MultiRefFlux, rows: list[tuple[str, list[Image.Image]]], *, size: int, steps: int,
                guidance: float, seed: int, autocast=contextlib.nullcontext) -> Image.Image:
    """A grid image: one row per input, its references (left) then the generated image."""
    transformer = model.transformer
    was_training = transformer.training
    transformer.eval()
    try:
        with autocast():
            generated = [generate_one(model, p, refs, size=size, steps=steps, guidance=guidance, seed=seed + k)
                         for k, (p, refs) in enumerate(rows)]
    finally:
        transformer.train(was_training)
    cols = max(len(refs) for _, refs in rows) + 1
    grid = Image.new("RGB", (cols * size, len(rows) * size), (255, 255, 255))
    for r, ((_, refs), image) in enumerate(zip(rows, generated)):
        for c, ref in enumerate(refs):
            grid.paste(_fit(ref, size), (c * size, r * size))
        grid.paste(image, ((cols - 1) * size, r * size))
    return grid
