"""Reading user images and bringing them to the model's grid.

Any image PIL reads is accepted, in any mode: EXIF orientation is applied; transparency
(RGBA, LA, palette with a transparent index) is flattened onto white; 16- and 32-bit
grayscale is scaled to 8 bits; everything ends as 8-bit RGB.

Two resize rules bring a reference to the model's grid (`model.reference_resize`), both
with Lanczos resampling:

- "longest" (`fit_to_grid`): scale so the longer side equals `longest` pixels, keeping the
  aspect ratio, then round each side to the nearest multiple of `multiple` (the token
  stride: the VAE factor times 2), never below one stride.
- "kontext" (`kontext_size`): the size diffusers' `FluxKontextPipeline` resizes its input
  image to by default: of the resolutions FLUX.1 Kontext was trained at (about 1 MP each),
  the one whose aspect ratio is nearest the image's, each side floored to a multiple of the
  stride.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from psr.errors import UserError


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        if image.mode == "F":
            top = max(float(array.max()), 1.0) if array.max() > 1.0 else 1.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, rgba)
    return image.convert("RGB")


MAX_IMAGE_BYTES = 256 * 1024 * 1024
"""Largest image file read (256 MiB): a reference is read whole into memory."""


def read_image_bytes(path: str | Path, what: str = "reference") -> bytes:
    """The bytes of the regular file `path`, or a one-line `UserError`: a device such as
    /dev/zero would be read without end and a FIFO would block the open, so only regular
    files of at most MAX_IMAGE_BYTES are read."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what} {path}: no such file")
    if path.is_dir():
        raise UserError(f"{what} {path}: is a directory, not an image")
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer; on a
        # regular file it changes nothing.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as err:
        raise UserError(f"{what} {path}: cannot read it ({err.strerror or err})") from None
    with os.fdopen(fd, "rb") as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{what} {path}: not a regular file (a device, FIFO or socket), not an image")
        if info.st_size > MAX_IMAGE_BYTES:
            raise UserError(f"{what} {path}: {info.st_size / 2**20:.0f} MiB, more than the "
                            f"{MAX_IMAGE_BYTES // 2**20} MiB an image may have")
        try:
            data = file.read(MAX_IMAGE_BYTES + 1)
        except OSError as err:
            raise UserError(f"{what} {path}: cannot read it ({err.strerror or err})") from None
    if len(data) > MAX_IMAGE_BYTES:  # grew while it was read
        raise UserError(f"{what} {path}: more than the {MAX_IMAGE_BYTES // 2**20} MiB an image may have")
    return data


def load_image(path: str | Path, what: str = "reference") -> Image.Image:
    """Read `path` as 8-bit RGB, or raise a one-line `UserError` that names the file."""
    path = Path(path)
    data = read_image_bytes(path, what)
    if not data:
        raise UserError(f"{what} {path}: the file is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            image.load()
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise UserError(f"{what} {path}: not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise UserError(f"{what} {path}: the image is damaged ({err})") from None
    if image.width == 0 or image.height == 0:
        raise UserError(f"{what} {path}: the image has zero size ({image.width}x{image.height})")
    image = ImageOps.exif_transpose(image)
    return _to_rgb(image)


def sha256_of(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fit_size(width: int, height: int, longest: int, multiple: int) -> tuple[int, int]:
    """The (width, height) that `fit_to_grid` resizes to; see the module docstring."""
    scale = longest / max(width, height)

    def snap(side: float) -> int:
        return max(multiple, int(round(side * scale / multiple)) * multiple)

    return snap(width), snap(height)


def fit_to_grid(image: Image.Image, longest: int, multiple: int) -> Image.Image:
    return resize_to(image, fit_size(image.width, image.height, longest, multiple))


RESIZE_RULES = ("kontext", "longest")
"""The values of `model.reference_resize` (see the module docstring)."""


def kontext_resolutions() -> list[tuple[int, int]]:
    """(width, height) of the resolutions `FluxKontextPipeline` picks from, read from
    diffusers itself so the rule follows the installed version."""
    from diffusers.pipelines.flux.pipeline_flux_kontext import PREFERRED_KONTEXT_RESOLUTIONS

    return [(int(w), int(h)) for w, h in PREFERRED_KONTEXT_RESOLUTIONS]


def kontext_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """The (width, height) `FluxKontextPipeline` resizes a width x height image to by default."""
    # The pipeline measures the aspect ratio after its image processor has floored both sides
    # to the stride, so a side's last few pixels do not count.
    w, h = (side - side % multiple for side in (width, height))
    # An image less than one stride tall would divide by zero there; its own ratio stands in.
    ratio = w / h if h else width / height
    # Ties go to the narrower resolution, as the pipeline's min over (error, w, h) decides.
    _, w, h = min((abs(ratio - rw / rh), rw, rh) for rw, rh in kontext_resolutions())
    return w // multiple * multiple, h // multiple * multiple


def reference_fit_size(width: int, height: int, rule: str, longest: int, multiple: int) -> tuple[int, int]:
    """The (width, height) a reference is resized to under `rule` (`RESIZE_RULES`);
    `longest` is `model.reference_size`, which only the "longest" rule reads."""
    if rule == "longest":
        return fit_size(width, height, longest, multiple)
    if rule == "kontext":
        return kontext_size(width, height, multiple)
    raise ValueError(f"unknown reference resize rule {rule!r}; choose one of {', '.join(RESIZE_RULES)}")


def fit_reference(image: Image.Image, rule: str, longest: int, multiple: int) -> Image.Image:
    """`image` resized under `rule` (`reference_fit_size`)."""
    return resize_to(image, reference_fit_size(image.width, image.height, rule, longest, multiple))


def resize_to(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Lanczos resize to (width, height): the call diffusers' `VaeImageProcessor.resize` makes
    with its default config (lanczos, no reducing gap), so both give the same pixels."""
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def to_tensor(image: Image.Image):
    """8-bit RGB PIL image → float tensor [1, 3, H, W] in [-1, 1] (what the VAE expects)."""
    import torch

    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0).contiguous()


OUTPUT_TYPES = ("pil", "np", "pt")
"""What `MultiRefFlux.generate` can return (diffusers' `output_type` values, less "latent")."""


def to_unit(images):
    """Float tensor [B, 3, H, W] in [-1, 1] → float32 tensor [B, 3, H, W] in [0, 1], on the
    same device: diffusers' `VaeImageProcessor.postprocess(output_type="pt")`, computed in
    float32 whatever the VAE's dtype."""
    return (images.float() / 2 + 0.5).clamp(0, 1)


def to_numpy(images) -> np.ndarray:
    """Float tensor [B, 3, H, W] in [-1, 1] → float32 array [B, H, W, 3] in [0, 1], as
    `VaeImageProcessor.postprocess(output_type="np")` returns."""
    return to_unit(images).permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images) -> list[Image.Image]:
    """Float tensor [B, 3, H, W] in [-1, 1] → list of 8-bit RGB PIL images.

    Rounds exactly as diffusers' `VaeImageProcessor` does (x/2 + 0.5, clamp, ·255, round).
    """
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in to_numpy(images)]


def check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise UserError(f"output_type {output_type!r}: must be one of {', '.join(map(repr, OUTPUT_TYPES))}")


def postprocess(images, output_type: str = "pil"):
    """Decoded pixels [B, 3, H, W] in [-1, 1] → `output_type`: "pil" (list of 8-bit RGB
    images), "np" (`to_numpy`) or "pt" (`to_unit`)."""
    check_output_type(output_type)
    if output_type == "pt":
        return to_unit(images)
    return to_numpy(images) if output_type == "np" else to_pil(images)
