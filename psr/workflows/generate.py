"""`psr generate`: one prompt plus reference images → PNGs with JSON sidecars.

Every input is checked before any weights load, so bad input costs nothing and writes
nothing (an output folder this run created is removed again when it fails before writing
into it). Output numbers are reserved before generating, after the highest number already
in the folder or held by another run, so runs into one folder never overwrite each other;
each file is written atomically.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Sequence

from safetensors import SafetensorError, safe_open

from psr.core.adapters import LORA_FILE, MOE_FILE
from psr.core.components import resolve_device
from psr.core.images import load_image, sha256_of
from psr.core.io import output_dir, reserve_numbers, write_atomic, write_json_atomic, write_text_atomic
from psr.core.model import MultiRefFlux
from psr.core.presets import embedded_model_note
from psr.core.recipe import to_toml
from psr.core.schema import GenerateRecipe, ModelConfig, check_generation, resolve_generate
from psr.core.weights import weights_kind
from psr.errors import UserError


def check_model_inputs(model: ModelConfig) -> None:
    """What loading `model` would refuse, checked in a moment before any output is written:
    the device, and that `model.weights` names weights (a file's safetensors header is
    read, so a text file fails here and not after the base model has loaded)."""
    resolve_device(model.device)
    if not model.weights:
        return
    weights_kind(model.weights)
    path = Path(model.weights).expanduser()
    files = [path] if path.is_file() else [path / name for name in (LORA_FILE, MOE_FILE) if (path / name).is_file()]
    for file in files:
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError) as err:
            reason = " ".join(str(err).split())
            raise UserError(f"model.weights {file}: not a readable safetensors file ({reason})") from None


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
    check_generation(recipe.model, recipe.sample)
    references = [load_image(p) for p in reference_paths]
    check_model_inputs(recipe.model)
    with output_dir(out_dir) as out:
        return _generate_into(out, recipe, prompt, reference_paths, references, show_progress, sheet)


def _generate_into(out: Path, recipe: GenerateRecipe, prompt: str, reference_paths: Sequence[str],
                   references: list, show_progress: bool, sheet: bool) -> list[Path]:
    from tqdm import tqdm

    model = MultiRefFlux.from_config(recipe.model)
    sample = recipe.sample
    for note in model.notes:
        print(f"psr: note: {note}", file=sys.stderr)
    model.check_size(sample.height, sample.width)
    # The base folder's "untrained" note does not hold for trained weights loaded on top of it.
    if recipe.model.preset == "embedded" and not recipe.model.weights and (
            note := embedded_model_note(recipe.model.path)):
        print(f"psr: note: {note}", file=sys.stderr)
    refs_meta = [{"path": str(Path(p).resolve()), "sha256": sha256_of(p)} for p in reference_paths]

    seeds = [sample.seed + k for k in range(sample.num_images)]
    # The numbers are held before the images are made: chosen after, two runs into one
    # folder could both take the highest free number and one would replace the other's image.
    with reserve_numbers(out, sample.num_images) as reserved:
        with tqdm(total=sample.steps, desc="denoising", unit="step", disable=not show_progress,
                  file=sys.stderr) as bar:
            images = model.generate(prompt, references, height=sample.height, width=sample.width,
                                    steps=sample.steps, guidance=sample.guidance,
                                    image_guidance=sample.image_guidance, seeds=seeds, progress=bar.update)
        return _write_outputs(out, reserved.first, recipe, prompt, refs_meta, references, images, seeds, sheet)


def _write_outputs(out: Path, first: int, recipe: GenerateRecipe, prompt: str, refs_meta: list[dict],
                   references: list, images: list, seeds: list[int], sheet: bool) -> list[Path]:
    """Each image with its sidecar, all or nothing per image: a write that fails (a full
    disk) removes that image's PNG, and the run's recipe when no image was written."""
    sample = recipe.sample
    recipe_path = write_text_atomic(out / f"{first:04d}.recipe.toml",
                                    to_toml(recipe, header=f"resolved recipe of psr generate run {first:04d}"))
    written = []
    try:
        for k, (image, seed) in enumerate(zip(images, seeds)):
            png = out / f"{first + k:04d}.png"
            write_atomic(png, lambda tmp, image=image: image.save(tmp, format="PNG"))
            try:
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
            except BaseException:
                png.unlink(missing_ok=True)
                raise
            written.append(png)
    except BaseException:
        if not written:
            recipe_path.unlink(missing_ok=True)
        raise
    if sheet:
        path = out / f"{first:04d}.sheet.png"
        picture = contact_sheet(references, images)
        write_atomic(path, lambda tmp: picture.save(tmp, format="PNG"))
        written.append(path)
    return written
