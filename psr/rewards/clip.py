"""Rewards on CLIP embeddings of the whole generated image: `clip_t` and `aesthetic`.

clip_t — cos(CLIP image embedding of the image, CLIP text embedding of its prompt), in
[-1, 1] (papers print it ×100). Default model: open_clip ViT-B/32 with OpenAI weights,
as DreamBench uses.

aesthetic — a linear head on the L2-normalised CLIP image embedding e [D]:
raw = weight · e + bias, total = sigmoid(raw) in (0, 1) (`squash = "sigmoid"`), or raw
itself (`squash = "none"`, for heads trained to a scale of their own, e.g. 1–10). The head
is a file (`head = PATH`): .safetensors, or .pt/.pth saved by torch.save, holding
`weight` [D] and `bias` (one number). HPSv2, PickScore or HPSv3 are full models, not
linear heads; their weights cannot be had here, and any of them plugs in as one more
entry of psr.rewards.REWARDS whose factory builds the model and returns a `Reward`.
Without a head the factory raises a `UserError`, unless `allow_random_head = true` (a
seeded random head, for tests only).

A failing image or text embedding is recorded in the sample's details and the sample
scores `failure_value` (default 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from psr.errors import RecipeError, UserError
from psr.rewards.base import (ComponentCache, RewardBatch, RewardResult, as_tensor, embed_images, json_float,
                              parse_options, run_component)

if TYPE_CHECKING:
    import torch


def _default_clip() -> dict[str, Any]:
    return {"name": "clip", "path": "openai"}


def _embed_texts(extractor, texts: list[str]):
    """Like base.embed_images, for texts: ([N, D], per-row failure reason)."""
    import torch

    out, reason = run_component(extractor.embed_texts, texts)
    if reason is None:
        return out.float(), [None] * len(texts)
    rows = [run_component(extractor.embed_texts, [t]) for t in texts]
    dim = next((r[0].shape[1] for r in rows if r[1] is None), 1)
    return (torch.stack([r[0][0].float() if r[1] is None else torch.zeros(dim) for r in rows]),
            [r[1] for r in rows])


@dataclass(frozen=True)
class ClipTOptions:
    extractor: dict[str, Any] = field(default_factory=_default_clip)
    """A FEATURE_EXTRACTORS entry with a text tower (`clip`)."""
    failure_value: float = 0.0
    """Score of a sample whose image or prompt cannot be embedded."""


class ClipTReward:
    """CLIP-T (module docstring). No sub-terms."""

    Options = ClipTOptions
    name = "clip_t"

    def __init__(self, device="cpu", *, cache: ComponentCache | None = None, **options):
        self.options = parse_options(self.Options, options)
        cache = cache if cache is not None else ComponentCache()
        self.extractor = cache.get_extractor(self.options.extractor, device)

    def __call__(self, batch: RewardBatch) -> RewardResult:
        import torch.nn.functional as F

        images, image_fail = embed_images(self.extractor, batch.images)
        try:
            texts, text_fail = _embed_texts(self.extractor, list(batch.prompts))
        except NotImplementedError as err:
            raise UserError(f"clip_t: the extractor cannot embed text ({err}); use a 'clip' extractor") from None
        if images.shape[-1] != texts.shape[-1] and not (all(image_fail) or all(text_fail)):
            raise UserError(f"clip_t: image embeddings have {images.shape[-1]} dims and text embeddings "
                            f"{texts.shape[-1]}; the extractor needs a shared image-text space (clip)")
        totals, details = [], []
        for b in range(len(batch)):
            reason = (f"image: {image_fail[b]}" if image_fail[b] else
                      f"prompt: {text_fail[b]}" if text_fail[b] else None)
            if reason:
                totals.append(self.options.failure_value)
                details.append({"score": json_float(self.options.failure_value), "failure": reason})
                continue
            value = float(F.cosine_similarity(images[b], texts[b], dim=0))
            totals.append(value)
            details.append({"score": json_float(value)})
        return RewardResult(as_tensor(totals), {}, details)


@dataclass(frozen=True)
class AestheticOptions:
    extractor: dict[str, Any] = field(default_factory=_default_clip)
    """The image embedder the head was trained on."""
    head: str | None = None
    """A .safetensors / .pt / .pth file with `weight` [D] and `bias` (module docstring)."""
    allow_random_head: bool = False
    """With no head, use a seeded random one instead of failing (tests only)."""
    seed: int = 0
    """Seed of the random head."""
    squash: Literal["sigmoid", "none"] = "sigmoid"
    """'sigmoid': total = sigmoid(raw) in (0, 1); 'none': total = raw."""
    failure_value: float = 0.0
    """Score of a sample whose image cannot be embedded."""

    def __post_init__(self):
        if self.head is not None and Path(self.head).suffix not in (".safetensors", ".pt", ".pth"):
            raise RecipeError("head", f"{self.head}: expected a .safetensors, .pt or .pth file")


def load_linear_head(path: str | Path) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(weight [D] float32, bias [] float32) from a head file; `UserError` when unusable."""
    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"aesthetic.head {path}: no such file")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, ValueError, EOFError) as err:
        raise UserError(f"aesthetic.head {path}: cannot read it ({err.__class__.__name__})") from None
    if not isinstance(state, dict) or "weight" not in state or "bias" not in state:
        keys = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise UserError(f"aesthetic.head {path}: needs tensors 'weight' [D] and 'bias', found {keys}")
    weight = torch.as_tensor(state["weight"]).float()
    if weight.dim() == 2 and weight.shape[0] == 1:  # an nn.Linear(D, 1) state dict
        weight = weight[0]
    bias = torch.as_tensor(state["bias"]).float()
    if weight.dim() != 1 or bias.numel() != 1:
        raise UserError(f"aesthetic.head {path}: weight must be [D] (or [1, D]) and bias one number, "
                        f"got {tuple(weight.shape)} and {tuple(bias.shape)}")
    return weight, bias.reshape(())


class AestheticReward:
    """Linear aesthetic head on CLIP image features (module docstring). Term: `raw`."""

    Options = AestheticOptions
    name = "aesthetic"

    def __init__(self, device="cpu", *, cache: ComponentCache | None = None, **options):
        self.options = parse_options(self.Options, options)
        if self.options.head is None and not self.options.allow_random_head:
            raise UserError("aesthetic: give head = PATH (a .safetensors or .pt file with 'weight' [D] and "
                            "'bias' for the extractor's image embedding), or allow_random_head = true (tests only)")
        self.head = load_linear_head(self.options.head) if self.options.head else None
        cache = cache if cache is not None else ComponentCache()
        self.extractor = cache.get_extractor(self.options.extractor, device)

    def _head(self, dim: int):
        import torch

        if self.head is None:  # allow_random_head: drawn once the embedding size is known
            generator = torch.Generator().manual_seed(self.options.seed)
            self.head = (torch.randn(dim, generator=generator) / dim ** 0.5, torch.zeros(()))
        weight, bias = self.head
        if weight.shape[0] != dim:
            raise UserError(f"aesthetic.head: weight has {weight.shape[0]} entries but the extractor's "
                            f"embeddings have {dim}; the head belongs to another model")
        return weight, bias

    def __call__(self, batch: RewardBatch) -> RewardResult:
        import torch
        import torch.nn.functional as F

        images, failures = embed_images(self.extractor, batch.images)
        images = F.normalize(images, dim=-1)
        totals, raws, details = [], [], []
        weight, bias = self._head(images.shape[-1]) if not all(failures) else (None, None)
        for b in range(len(batch)):
            if failures[b]:
                totals.append(self.options.failure_value)
                raws.append(float("nan"))
                details.append({"score": json_float(self.options.failure_value), "failure": f"image: {failures[b]}"})
                continue
            raw = float(images[b] @ weight + bias)
            value = float(torch.sigmoid(torch.tensor(raw))) if self.options.squash == "sigmoid" else raw
            totals.append(value)
            raws.append(raw)
            details.append({"score": json_float(value), "raw": json_float(raw)})
        return RewardResult(as_tensor(totals), {"raw": as_tensor(raws)}, details)
