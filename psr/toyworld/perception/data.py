"""Training and evaluation data for the ToyWorld perception models.

Everything here is a pure function of its seed, so a training run that resumes at step
s rebuilds exactly the data it had (see `render_window`), and evaluation sets are the
same on every machine.

* identity factors: the discrete parts an identity is made of (shape, colour, pattern,
  pattern colour, eyes, top), used as auxiliary labels, and `sibling` ids that differ
  from a given id in exactly one factor (hard negatives for contrastive training);
* scenes: reference-like views (the subject alone, no attributes), target-like views
  (1-4 subjects, added attributes) of chosen identities, `paired_views` (two views of each
  of 1-4 identities, the identity encoder's training item); multi-subject targets for the
  localizer (with repeated categories, so two instances of one category occur);
* `degrade`: batched photometric degradations that mimic generated images (colour
  shifts, blur, down/up-sampling, noise, JPEG), on float images in [0, 1].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from psr import toyworld as tw
from psr.toyworld.identity import (COLOUR_NAMES, EYE_STYLES, ID_MULTIPLIER, NUM_IDENTITIES, PATTERN_NAMES,
                                   RADICES, SHAPE_NAMES, TOP_PARTS)
from psr.toyworld.layout import place_centred, place_free
from psr.toyworld.sampling import REFERENCE_SIZE, SUBJECT_SIZES, sample_attributes, sample_pose

if TYPE_CHECKING:
    import torch

# Auxiliary identity labels (single-label): name -> number of classes. Colours are a
# separate multi-label target (`identity_colours`): which palette colours the body and its
# pattern show; "body colour" alone is ambiguous for half-and-half patterns (stripes, checks).
FACTORS: dict[str, int] = {
    "shape": len(SHAPE_NAMES),
    "pattern": len(PATTERN_NAMES),
    "eyes": len(EYE_STYLES),
    "top": len(TOP_PARTS),
}
NUM_COLOURS = len(COLOUR_NAMES)
CATEGORIES: tuple[str, ...] = SHAPE_NAMES
SCENE_NAMES: tuple[str, ...] = tuple(tw.SCENES)
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(tw.ATTRIBUTES)
_INVERSE = pow(ID_MULTIPLIER, -1, NUM_IDENTITIES)


# ---------------------------------------------------------------------------- identities
def identity_factors(identity: int) -> tuple[int, ...]:
    """Class index of each FACTORS entry for an identity id."""
    ident = tw.Identity.from_id(identity)
    return (SHAPE_NAMES.index(ident.shape), PATTERN_NAMES.index(ident.pattern), EYE_STYLES.index(ident.eyes),
            TOP_PARTS.index(ident.top))


def identity_colours(identity: int) -> tuple[float, ...]:
    """1.0 for each palette colour (COLOUR_NAMES order) the identity's body or pattern has."""
    ident = tw.Identity.from_id(identity)
    return tuple(float(c in (ident.colour, ident.pattern_colour)) for c in COLOUR_NAMES)


def _digits(identity: int) -> list[int]:
    rest, digits = (identity * ID_MULTIPLIER) % NUM_IDENTITIES, []
    for radix in RADICES:
        rest, digit = divmod(rest, radix)
        digits.append(digit)
    return digits


def _from_digits(digits: list[int]) -> int:
    j, scale = 0, 1
    for digit, radix in zip(digits, RADICES):
        j += digit * scale
        scale *= radix
    return (j * _INVERSE) % NUM_IDENTITIES


def sibling(rng: np.random.Generator, identity: int, id_range: tuple[int, int]) -> int | None:
    """An id in `id_range` whose appearance differs from `identity` in exactly one encoded
    digit (shape, colour, pattern style, eyes or top), or None when 20 tries found none."""
    lo, hi = id_range
    digits = _digits(identity % NUM_IDENTITIES)
    for _ in range(20):
        k = int(rng.integers(len(RADICES)))
        changed = list(digits)
        changed[k] = (digits[k] + 1 + int(rng.integers(RADICES[k] - 1))) % RADICES[k]
        candidate = _from_digits(changed)
        if lo <= candidate < hi:
            return candidate
    return None


# ---------------------------------------------------------------------------- scenes
def reference_view(rng: np.random.Generator, identity: int, avoid_scene: str | None = None) -> tw.SceneSpec:
    """The identity alone, centred, no added attributes (how references are drawn)."""
    scenes = [s for s in SCENE_NAMES if s != avoid_scene]
    lone = tw.SubjectSpec(identity=identity, size=round(float(rng.uniform(*REFERENCE_SIZE)), 4),
                          pose=sample_pose(rng))
    return tw.SceneSpec(scene=scenes[int(rng.integers(len(scenes)))], scene_seed=int(rng.integers(2**31)),
                        subjects=(place_centred(rng, lone),))


def scene_of(rng: np.random.Generator, ids: list[int], attribute_rate: float = 0.3) -> tw.SceneSpec:
    """A target-like scene of exactly these identities (drawn in this order, back to front),
    each in a random pose with added attributes at `attribute_rate`, on a random scene."""
    size_lo, size_hi = SUBJECT_SIZES[len(ids)]
    subjects = [tw.SubjectSpec(identity=i, size=round(float(rng.uniform(size_lo, size_hi)), 4),
                               pose=sample_pose(rng), attributes=sample_attributes(rng, attribute_rate))
                for i in ids]
    return tw.SceneSpec(scene=SCENE_NAMES[int(rng.integers(len(SCENE_NAMES)))],
                        scene_seed=int(rng.integers(2**31)), subjects=tuple(place_free(rng, subjects)))


def target_view(rng: np.random.Generator, identity: int, num_subjects: int, id_range: tuple[int, int],
                attribute_rate: float = 0.3) -> tw.SceneSpec:
    """`identity` among `num_subjects` subjects (it is drawn last, so never occluded);
    the others come from `id_range`."""
    lo, hi = id_range
    others = [lo + int(i) for i in rng.choice(hi - lo, size=num_subjects - 1, replace=False)]
    return scene_of(rng, others + [identity], attribute_rate)


def localizer_scene(rng: np.random.Generator, id_range: tuple[int, int], attribute_rate: float = 0.3,
                    empty_rate: float = 0.03) -> tw.SceneSpec:
    """A localizer training image: 1-4 subjects, half the time with categories allowed to
    repeat, sometimes none at all (so the model learns to find nothing)."""
    if rng.random() < empty_rate:
        return tw.SceneSpec(scene=SCENE_NAMES[int(rng.integers(len(SCENE_NAMES)))],
                            scene_seed=int(rng.integers(2**31)))
    k = int(rng.choice(4, p=(0.2, 0.3, 0.25, 0.25))) + 1
    return tw.sample_target(rng, k, id_range, attribute_rate=attribute_rate,
                            distinct_categories=bool(rng.random() < 0.5))


# ---------------------------------------------------------------------------- identity pairs
@dataclass(frozen=True)
class PairedViews:
    """Two views of each of k identities. images: uint8 [M, S, S, 3]; for view v in (0, 1):
    image[v] int [k] (index into images), box[v] float [k, 4] px, mask[v] bool [k, S, S];
    identity int [k]."""

    images: np.ndarray
    image: tuple[np.ndarray, np.ndarray]
    box: tuple[np.ndarray, np.ndarray]
    mask: tuple[np.ndarray, np.ndarray]
    identity: np.ndarray


def paired_views(seed: int, n: int, id_range: tuple[int, int], size: int = 64, sibling_rate: float = 0.5,
                 attribute_rate: float = 0.3) -> PairedViews:
    """Item n of an identity training stream: 1-4 identities (with probability
    `sibling_rate` one of them is a `sibling` of another: a hard negative), seen twice in
    different poses, scenes and layouts. Kinds, by chance: a multi-subject target and
    another target of the same identities (35%), a target and a reference of each
    identity (45%), or one identity in two references (20%). Every render gives crops of
    all its paired subjects, so a render teaches up to four identities."""
    lo, hi = id_range
    rng = np.random.default_rng([0x1D, seed, n])
    kind = rng.choice(3, p=(0.35, 0.45, 0.2))
    k = 1 if kind == 2 else int(rng.integers(2 if kind == 0 else 1, 5))
    ids = [lo + int(i) for i in rng.choice(hi - lo, size=k, replace=False)]
    if k >= 2 and rng.random() < sibling_rate:
        twin = sibling(rng, ids[0], id_range)
        if twin is not None and twin not in ids:
            ids[1] = twin
    if kind == 2:
        first = reference_view(rng, ids[0])
        specs = [first, reference_view(rng, ids[0], avoid_scene=first.scene)]
    else:
        first = scene_of(rng, ids, attribute_rate)
        if kind == 0:
            order = [int(i) for i in rng.permutation(k)]
            specs = [first, scene_of(rng, [ids[i] for i in order], attribute_rate)]
        else:
            specs = [first] + [reference_view(rng, i, avoid_scene=first.scene) for i in ids]
    renders = [tw.render(spec, size) for spec in specs]
    where = [{s.identity: (r_i, j) for j, s in enumerate(spec.subjects)} for r_i, spec in enumerate(specs)]
    # view 0 always in the first render; view 1 in the second (kinds 0, 2) or in the identity's own reference
    spots = ([where[0][i] for i in ids],
             [where[1][i] if kind != 1 else (1 + t, 0) for t, i in enumerate(ids)])
    image = tuple(np.array([r_i for r_i, _ in spot]) for spot in spots)
    box = tuple(np.array([renders[r_i].boxes[j] for r_i, j in spot], np.float32) for spot in spots)
    mask = tuple(np.stack([renders[r_i].masks[j] for r_i, j in spot]) for spot in spots)
    return PairedViews(np.stack([r.image for r in renders]), image, box, mask, np.array(ids))


# ---------------------------------------------------------------------------- degradations
@dataclass(frozen=True)
class Degrade:
    """Probabilities and ranges of the generated-image degradations (see `degrade`)."""

    colour: float = 0.8        # chance of a brightness/contrast/saturation/channel-gain change
    brightness: float = 0.15
    contrast: float = 0.15
    saturation: float = 0.2
    gain: float = 0.04
    blur: float = 0.4          # chance of a gaussian blur with sigma in blur_sigma px
    blur_sigma: tuple[float, float] = (0.3, 1.1)
    resample: float = 0.25     # chance of bilinear down-sampling by resample_scale then back up
    resample_scale: tuple[float, float] = (0.5, 0.85)
    noise: float = 0.5         # chance of gaussian noise with std in noise_std (of the 0-1 range)
    noise_std: tuple[float, float] = (0.0, 0.07)
    jpeg: float = 0.3          # chance of JPEG at a quality in jpeg_quality
    jpeg_quality: tuple[int, int] = (30, 90)


def gaussian_blur(images: "torch.Tensor", sigma: "torch.Tensor") -> "torch.Tensor":
    """Per-image gaussian blur: images [B, C, H, W], sigma [B] px (separable, reflect pad)."""
    import torch
    import torch.nn.functional as F

    b, c, h, w = images.shape
    radius = int(np.ceil(3 * float(sigma.max()))) if len(sigma) else 0
    if radius == 0:
        return images
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)
    kernel = torch.exp(-0.5 * (x[None] / sigma[:, None].clamp(min=1e-3)) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # [B*C, K]
    flat = images.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=b * c)
    return flat.reshape(b, c, h, w)


def degrade(images: "torch.Tensor", gen: "torch.Generator", d: Degrade = Degrade()) -> "torch.Tensor":
    """Randomly degraded copies of images [B, 3, H, W] float in [0, 1] (same shape)."""
    import torch
    import torch.nn.functional as F

    b = images.shape[0]

    def chance(p):
        return torch.rand(b, generator=gen) < p

    def uniform(lo, hi, shape=(b,)):
        return lo + (hi - lo) * torch.rand(shape, generator=gen)

    x = images.clone()
    on = chance(d.colour)[:, None, None, None]
    grey = x.mean(1, keepdim=True)
    sat = uniform(1 - d.saturation, 1 + d.saturation)[:, None, None, None]
    y = grey + (x - grey) * sat
    mean = y.mean((1, 2, 3), keepdim=True)
    y = mean + (y - mean) * uniform(1 - d.contrast, 1 + d.contrast)[:, None, None, None]
    y = y * uniform(1 - d.brightness, 1 + d.brightness)[:, None, None, None]
    y = y * uniform(1 - d.gain, 1 + d.gain, (b, 3))[:, :, None, None]
    x = torch.where(on, y, x).clamp(0, 1)

    blur = chance(d.blur)
    if blur.any():
        sigma = uniform(*d.blur_sigma)[blur]
        x[blur] = gaussian_blur(x[blur], sigma)
    resample = chance(d.resample)
    for i in torch.nonzero(resample).flatten().tolist():
        h, w = x.shape[-2:]
        s = float(uniform(*d.resample_scale, (1,)))
        small = F.interpolate(x[i:i + 1], size=(max(4, round(h * s)), max(4, round(w * s))), mode="bilinear",
                              antialias=True, align_corners=False)
        x[i:i + 1] = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    noise = chance(d.noise)[:, None, None, None]
    std = uniform(*d.noise_std)[:, None, None, None]
    x = (x + noise * std * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    jpeg = chance(d.jpeg)
    if jpeg.any():
        import warnings

        with warnings.catch_warnings():  # torchvision 0.29 flags its image codecs as deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            from torchvision.io import decode_jpeg, encode_jpeg

            idx = torch.nonzero(jpeg).flatten().tolist()
            quality = int(torch.randint(d.jpeg_quality[0], d.jpeg_quality[1] + 1, (1,), generator=gen))
            encoded = encode_jpeg([(x[i] * 255).round().to(torch.uint8) for i in idx], quality=quality)
            for i, data in zip(idx, encoded):
                x[i] = decode_jpeg(data).float() / 255
    return x


def to_float(images: np.ndarray) -> "torch.Tensor":
    """uint8 [B, H, W, 3] → float [B, 3, H, W] in [0, 1]."""
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


# Fixed degradations of the evaluation tables (on the full 64 px image).
EVAL_CONDITIONS: dict[str, dict] = {
    "clean": {},
    "noise": {"noise_std": 0.06},
    "blur": {"blur_sigma": 1.0},
}


def apply_condition(images: "torch.Tensor", condition: str, seed: int = 0) -> "torch.Tensor":
    """images [B, 3, H, W] in [0, 1] under one EVAL_CONDITIONS entry (deterministic)."""
    import torch

    spec = EVAL_CONDITIONS[condition]
    x = images
    if "blur_sigma" in spec:
        x = gaussian_blur(x, torch.full((x.shape[0],), spec["blur_sigma"]))
    if "noise_std" in spec:
        gen = torch.Generator().manual_seed(seed)
        x = (x + spec["noise_std"] * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    return x
