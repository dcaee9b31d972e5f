"""Making the bench outputs: one image per (item, seed), written atomically, never twice.

Image k of item i of subset S is `OUT/images/S/<i:04d>.png` (with several seeds per item
`<i:04d>_<k>.png`), made from the item's references and instruction with seed
`sample.seed + k`. An image already on disk is kept, so a rerun (or a resumed, killed run)
makes only what is missing and loads no model when nothing is.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from psr.core import images as imgs
from psr.core.io import write_atomic
from psr.core.model import MultiRefFlux
from psr.core.packing import pack
from psr.core.presets import embedded_model_note
from psr.eval.bench import Item
from psr.eval.perception import UnreadableImage, open_picture
from psr.eval.scoring import failure_reason  # re-raises out-of-memory errors

if TYPE_CHECKING:
    from psr.eval.bench import Bench
    from psr.eval.config import EvalRecipe

# What generating one item may raise without the run being wrong as a whole (an odd
# reference the model cannot take, out of memory): listed as that item's failure.
GENERATION_ERRORS = (RuntimeError, ValueError, OSError)


@dataclass
class Job:
    item: Item
    seeds: list[int]
    """Seed indices k of this item still to make."""
    paths: list[Path]


def image_name(index: int, k: int, seeds_per_item: int) -> str:
    return f"{index:04d}.png" if seeds_per_item == 1 else f"{index:04d}_{k}.png"


def output_path(out: Path, item: Item, k: int, seeds_per_item: int) -> Path:
    return out / "images" / item.subset / image_name(item.index, k, seeds_per_item)


def generate_missing(recipe: "EvalRecipe", out: Path, items: Sequence[Item], show_progress: bool = True
                     ) -> tuple[int, dict[tuple[str, int, int], str]]:
    """Make every missing output image; returns (images written, {(subset, index, k): reason})
    for the samples that could not be made."""
    from tqdm import tqdm

    n = recipe.seeds_per_item
    jobs = []
    for item in items:
        todo = [k for k in range(n) if not output_path(out, item, k, n).is_file()]
        if todo:
            jobs.append(Job(item, todo, [output_path(out, item, k, n) for k in todo]))
    failures: dict[tuple[str, int, int], str] = {}
    if not jobs:
        return 0, failures

    model = MultiRefFlux.from_config(recipe.model)
    sample = recipe.sample
    model.check_size(sample.height, sample.width)
    if recipe.model.preset == "embedded" and not recipe.model.weights:  # trained weights on top: not "untrained"
        if note := embedded_model_note(recipe.model.path):
            print(f"psr: note: {note}", file=sys.stderr)
    written = 0
    total = sum(len(job.seeds) for job in jobs)
    with tqdm(total=total, desc="generate", unit="image", disable=not show_progress, file=sys.stderr) as bar:
        for job in jobs:
            item = job.item
            try:
                references = [open_picture(p, "reference").image for p in item.references]
                images = model.generate(item.instruction, references, height=sample.height, width=sample.width,
                                        steps=sample.steps, guidance=sample.guidance,
                                        image_guidance=sample.image_guidance,
                                        seeds=[sample.seed + k for k in job.seeds])
            except UnreadableImage as err:
                failures.update({(item.subset, item.index, k): err.reason for k in job.seeds})
            except GENERATION_ERRORS as err:
                reason = f"generation failed: {failure_reason(err)}"
                failures.update({(item.subset, item.index, k): reason for k in job.seeds})
            else:
                for image, path in zip(images, job.paths):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    write_atomic(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
                    written += 1
            bar.update(len(job.seeds))
    return written, failures


def reconstruct_missing(recipe: "EvalRecipe", out: Path, bench: "Bench", items: Sequence[Item],
                        show_progress: bool = True) -> tuple[int, dict[tuple[str, int, int], str]]:
    """Write the model VAE's reconstruction (encode, then decode) of every item's ground-truth
    target where it is missing, at the recipe's sample size; returns what `generate_missing`
    returns. Scored like model outputs, these are the ceiling of any generator that draws in
    this VAE's latent space: details the VAE cannot keep, no transformer can put back."""
    from PIL import Image
    from tqdm import tqdm

    todo = [item for item in items if not output_path(out, item, 0, 1).is_file()]
    failures: dict[tuple[str, int, int], str] = {}
    if not todo:
        return 0, failures
    model = MultiRefFlux.from_config(recipe.model)
    height, width = recipe.sample.height, recipe.sample.width
    model.check_size(height, width)
    written = 0
    with tqdm(total=len(todo), desc="reconstruct", unit="image", disable=not show_progress, file=sys.stderr) as bar:
        for item in todo:
            path = output_path(out, item, 0, 1)
            try:
                if "gt_target_path" not in item.data:
                    raise UnreadableImage(path, "item has no gt_target_path")
                target = open_picture(bench.resolve(item.data["gt_target_path"]), "ground-truth target").image
                if target.size != (width, height):  # the size the model would have drawn
                    target = target.resize((width, height), resample=Image.LANCZOS)
                latents = pack(model.encode_images(imgs.to_tensor(target)))
                [image] = imgs.to_pil(model.decode(latents, height, width))
            except UnreadableImage as err:
                failures[(item.subset, item.index, 0)] = err.reason
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomic(path, lambda tmp, image=image: image.save(tmp, format="PNG"))
                written += 1
            bar.update(1)
    return written, failures
