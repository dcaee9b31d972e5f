"""`psr generate`: one prompt plus reference images → PNGs with JSON sidecars.

Every input is checked before any weights load, so bad input costs nothing and writes
nothing. Outputs are numbered after the highest number already in the folder, so runs
never overwrite each other; each file is written atomically.
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path
from typing import Sequence

from psr.core.images import load_image, sha256_of
from psr.core.io import prepare_output_dir, write_atomic, write_json_atomic, write_text_atomic
from psr.core.model import MultiRefFlux
from psr.core.presets import PRESETS, embedded_model_note
from psr.core.recipe import to_toml
from psr.core.schema import GenerateRecipe, resolve_generate
from psr.errors import UserError


def _next_index(folder: Path) -> int:
    used = [int(m.group(1)) for p in folder.iterdir() if (m := re.fullmatch(r"(\d+)\.png", p.name))]
    return max(used, default=-1) + 1


def contact_sheet(references: Sequence, images: Sequence, cell: int = 128, gap: int = 8):
    """One row: each reference, a gap, then each generated image, every picture scaled to a
    `cell`-pixel square (nearest neighbour, so small renders stay crisp), on white."""
    from PIL import Image

    width = cell * (len(references) + len(images)) + (gap if references else 0)
    sheet = Image.new("RGB", (width, cell), (255, 255, 255))
    x = 0
    for k, picture in enumerate([*references, *images]):
        if k == len(references) and references:
            x += gap
        thumb = picture.convert("RGB")
        scale = cell / max(thumb.size)
        thumb = thumb.resize((max(1, round(thumb.width * scale)), max(1, round(thumb.height * scale))),
                             Image.Resampling.NEAREST)
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, (cell - thumb.height) // 2))
        x += cell
    return sheet


def run_generate(recipe: GenerateRecipe, prompt: str, reference_paths: Sequence[str], out_dir: str,
                 show_progress: bool = True, sheet: bool = False) -> list[Path]:
    """Generate `recipe.sample.num_images` images; return the PNG paths written (and, with
    `sheet`, last the run's contact sheet `NNNN.sheet.png`: references | images)."""
    recipe = resolve_generate(recipe)
    if not prompt or not prompt.strip():
        raise UserError("prompt: must not be empty")
    limit = recipe.model.max_references
    if len(reference_paths) > limit:
        raise UserError(f"--ref: {len(reference_paths)} references given, but this recipe allows at most "
                        f"{limit} (model.max_references)")
    stride = PRESETS[recipe.model.preset].token_stride
    for name, value in (("height", recipe.sample.height), ("width", recipe.sample.width)):
        if value % stride:
            raise UserError(f"sample.{name} {value}: must be a multiple of {stride} (pixels per token "
                            f"of preset {recipe.model.preset!r})")
    references = [load_image(p) for p in reference_paths]
    out = prepare_output_dir(out_dir)

    from tqdm import tqdm

    model = MultiRefFlux.from_config(recipe.model)
    sample = recipe.sample
    for note in model.notes:
        print(f"psr: note: {note}", file=sys.stderr)
    model.check_size(sample.height, sample.width)
    if recipe.model.preset == "embedded" and (note := embedded_model_note(recipe.model.path)):
        print(f"psr: note: {note}", file=sys.stderr)

    seeds = [sample.seed + k for k in range(sample.num_images)]
    with tqdm(total=sample.steps, desc="denoising", unit="step", disable=not show_progress,
              file=sys.stderr) as bar:
        images = model.generate(prompt, references, height=sample.height, width=sample.width,
                                steps=sample.steps, guidance=sample.guidance, image_guidance=sample.image_guidance,
                                seeds=seeds,
                                progress=bar.update)

    first = _next_index(out)
    recipe_path = write_text_atomic(out / f"{first:04d}.recipe.toml",
                                    to_toml(recipe, header=f"resolved recipe of psr generate run {first:04d}"))
    refs_meta = [{"path": str(Path(p).resolve()), "sha256": sha256_of(p)} for p in reference_paths]
    written = []
    for k, (image, seed) in enumerate(zip(images, seeds)):
        png = out / f"{first + k:04d}.png"
        write_atomic(png, lambda tmp, image=image: image.save(tmp, format="PNG"))
        write_json_atomic(png.with_suffix(".json"), {
            "prompt": prompt,
            "references": refs_meta,
            "seed": seed,
            "steps": sample.steps,
            "guidance": sample.guidance,
            "image_guidance": sample.image_guidance,
            "height": sample.height,
            "width": sample.width,
            "image": png.name,
            "recipe_file": recipe_path.name,
            "recipe": dataclasses.asdict(recipe),
        })
        written.append(png)
    if sheet:
        path = out / f"{first:04d}.sheet.png"
        picture = contact_sheet(references, images)
        write_atomic(path, lambda tmp: picture.save(tmp, format="PNG"))
        written.append(path)
    return written
