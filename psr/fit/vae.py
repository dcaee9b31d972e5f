"""Fitter `toy-vae`: the embedded model's VAE (diffusers `AutoencoderKL`) on ToyWorld renders.

Architecture: `psr.core.embedded.build_embedded_vae` with the options' widths — FLUX's VAE
layout (no quant convs, a scalar shift and scale) at 4x downsampling and 8 latent channels.

Data. Image j of step s is a pure function of (seed, s, j), so a resumed run sees the same
stream: a training-range target scene of 1-4 subjects (added attributes at
`attribute_rate`, any scene) with probability `target_rate`, else a reference-like render
of one of its subjects (alone, other scene, other pose), rendered at `size` px, then a
random `crop` x `crop` window of it. The VAE is convolutional (no attention), so crops
train the same weights at a quarter of the cost of whole 64 px renders.

Loss (per image, then averaged over the batch), images in [-1, 1]:
    mean |x̂ - x|  +  edge_weight · (mean |∂x x̂ - ∂x x| + mean |∂y x̂ - ∂y x|)
                  +  kl_weight · KL(q(z|x) || N(0, I)) / (3·H·W)
The KL is summed over latent elements and divided by the pixel-element count, so
`kl_weight` means what it means for a reconstruction loss summed over pixels (1e-6 as in
the Stable Diffusion / FLUX VAE recipes). The edge term is a cheap stand-in for a
perceptual loss: it keeps the pattern edges sharp that plain L1 blurs early in training.

After training, `save` measures the latents (distribution mode) of `stats_images` further
training-range renders and stores shift_factor = their mean and scaling_factor = 1 / their
std in the VAE config, so `(z - shift) · scale` has zero mean and unit std as FLUX's
normalised latents do. The weights ship in float16; every metric is measured on the
float16-rounded weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from psr import toyworld as tw
from psr.core.detect import crop_box
from psr.core.embedded import TOY_VAE_DIR as ASSET
from psr.core.embedded import build_embedded_vae
from psr.errors import RecipeError, UserError
from psr.fit.loop import lr_at
from psr.toyworld.perception.identity import toyworld_extractor
from psr.toyworld.perception.metrics import retrieval_sets, topk

_TRAIN_SALT, _STATS_SALT, _EVAL_SALT, _NOISE_SALT = 0x7AE0, 0x7AE1, 0x7AE2, 0x7AE3


@dataclass(frozen=True)
class ToyVaeOptions:
    block_out_channels: tuple[int, ...] = (16, 32, 64)
    """Channels per resolution level; the downsampling is 2 ** (levels - 1)."""
    layers_per_block: int = 1
    latent_channels: int = 8
    crop: int = 32
    """Side of the random training window, px (= size trains on whole renders)."""
    target_rate: float = 0.5
    """Share of training images that are multi-subject targets (the rest: references)."""
    attribute_rate: float = 0.3
    """Chance of each added attribute (hat, scarf, glow, ...) per target subject."""
    edge_weight: float = 0.5
    kl_weight: float = 1e-6
    grad_clip: float = 1.0
    """Gradient-norm clip (0 = off)."""
    stats_images: int = 512
    """Training-range renders that set shift_factor / scaling_factor."""
    eval_images: int = 256
    """Held-out (evaluation id range) renders of the PSNR measurement, half of them targets."""
    eval_identities: int = 300
    """Gallery size of the identity check with the ToyWorld identity encoder (0 = skip)."""


def render_batch(seed: int, salt: int, index: int, count: int, *, size: int, id_range: tuple[int, int],
                 target_rate: float, attribute_rate: float, crop: int | None = None):
    """`count` renders, a pure function of (seed, salt, index): uint8 [count, S, S, 3] with
    S = crop (a random window) or size, and a bool [count] that says which are targets."""
    import numpy as np

    rng = np.random.default_rng([salt, seed, index])
    images, is_target = [], []
    for _ in range(count):
        target = tw.sample_target(rng, int(rng.integers(1, 5)), id_range, attribute_rate=attribute_rate)
        as_target = bool(rng.random() < target_rate)
        spec = target if as_target else tw.sample_reference(
            rng, target.subjects[int(rng.integers(len(target.subjects)))], target.scene)
        image = tw.render(spec, size).image
        if crop is not None and crop < size:
            y, x = (int(v) for v in rng.integers(0, size - crop + 1, size=2))
            image = image[y:y + crop, x:x + crop]
        images.append(image)
        is_target.append(as_target)
    return np.stack(images), np.array(is_target)


def to_pixels(images):
    """uint8 [B, H, W, 3] → float32 [B, 3, H, W] in [-1, 1]."""
    import numpy as np
    import torch

    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def reconstruct(vae, pixels, batch_size: int = 64):
    """[B, 3, H, W] in [-1, 1] → reconstructions (distribution mode), clamped to [-1, 1]."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            x = pixels[start:start + batch_size].to(vae.device, vae.dtype)
            out.append(vae.decode(vae.encode(x).latent_dist.mode()).sample.float().clamp(-1, 1).cpu())
    return torch.cat(out)


def psnr(reconstructions, pixels):
    """Per-image PSNR in dB of 8-bit quantised images; inputs in [-1, 1], [B, 3, H, W]."""
    import torch

    def to8(t):
        return ((t.clamp(-1, 1) + 1) * 127.5).round()

    mse = (to8(reconstructions) - to8(pixels)).pow(2).mean(dim=(1, 2, 3)).clamp(min=1e-10)
    return 10 * torch.log10(255.0 ** 2 / mse)


def latent_stats(vae, pixels, batch_size: int = 64) -> tuple[float, float]:
    """(mean, std) of the distribution-mode latents of `pixels` over all elements."""
    import torch

    zs = []
    with torch.no_grad():
        for start in range(0, len(pixels), batch_size):
            x = pixels[start:start + batch_size].to(vae.device, vae.dtype)
            zs.append(vae.encode(x).latent_dist.mode().float().cpu())
    z = torch.cat(zs)
    return float(z.mean()), float(z.std())


class ToyVaeFitter:
    Options = ToyVaeOptions
    asset = ASSET

    @classmethod
    def check(cls, recipe) -> None:
        o = recipe.fitter_options()
        levels = len(o.block_out_channels)
        if levels < 2 or min(o.block_out_channels) < 8 or any(c % 8 for c in o.block_out_channels):
            raise RecipeError("options.block_out_channels", "need >= 2 levels, each a multiple of 8 (>= 8)")
        factor = 2 ** (levels - 1)
        if not (2 * factor <= o.crop <= recipe.size) or o.crop % factor:
            raise RecipeError("options.crop", f"must be a multiple of {factor} between {2 * factor} and "
                                              f"size ({recipe.size})")
        if recipe.size % factor:
            raise RecipeError("size", f"must be a multiple of the VAE factor {factor}")
        if o.layers_per_block < 1 or o.latent_channels < 1:
            raise RecipeError("options", "layers_per_block and latent_channels must be >= 1")
        if not (0.0 <= o.target_rate <= 1.0 and 0.0 <= o.attribute_rate <= 1.0):
            raise RecipeError("options", "target_rate and attribute_rate must be in [0, 1]")
        if o.edge_weight < 0 or o.kl_weight < 0 or o.grad_clip < 0:
            raise RecipeError("options", "edge_weight, kl_weight and grad_clip must be >= 0")
        if o.stats_images < 2 or o.eval_images < 2 or o.eval_identities < 0:
            raise RecipeError("options", "stats_images and eval_images must be >= 2, eval_identities >= 0")

    def __init__(self, recipe, options: ToyVaeOptions, device):
        import torch

        self.recipe, self.o, self.device = recipe, options, device
        self.vae = build_embedded_vae(recipe.seed, latent_channels=options.latent_channels,
                                      block_out_channels=tuple(options.block_out_channels),
                                      layers_per_block=options.layers_per_block).to(device)
        self.optimizer = torch.optim.AdamW(self.vae.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)

    def state_dict(self) -> dict:
        return {"vae": self.vae.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.vae.load_state_dict(state["vae"])
        self.optimizer.load_state_dict(state["optimizer"])

    def prepare(self, step: int, show_progress: bool) -> None:
        """Nothing to build: each step renders its own images."""

    def _renders(self, salt: int, index: int, count: int, split: str, crop: int | None = None):
        return render_batch(self.recipe.seed, salt, index, count, size=self.recipe.size,
                            id_range=tw.DEFAULT_ID_RANGES[split], target_rate=self.o.target_rate,
                            attribute_rate=self.o.attribute_rate, crop=crop)

    # ------------------------------------------------------------------ training
    def train_step(self, step: int) -> dict[str, float]:
        import numpy as np
        import torch

        images, _ = self._renders(_TRAIN_SALT, step, self.recipe.batch_size, "train", crop=self.o.crop)
        x = to_pixels(images).to(self.device)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.recipe)
        self.vae.train()
        posterior = self.vae.encode(x).latent_dist
        noise_seed = int(np.random.default_rng([_NOISE_SALT, self.recipe.seed, step]).integers(2**62))
        noise = torch.Generator(device=self.device).manual_seed(noise_seed)
        rec = self.vae.decode(posterior.sample(generator=noise)).sample
        l1 = (rec - x).abs().mean()

        def grads(t):
            return t[..., :, 1:] - t[..., :, :-1], t[..., 1:, :] - t[..., :-1, :]

        edge = sum((a - b).abs().mean() for a, b in zip(grads(rec), grads(x)))
        kl = posterior.kl().mean() / x[0].numel()
        loss = l1 + self.o.edge_weight * edge + self.o.kl_weight * kl
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.o.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.vae.parameters(), self.o.grad_clip)
        self.optimizer.step()
        return {"loss": loss.item(), "l1": l1.item(), "edge": edge.item(), "kl": kl.item()}

    # ------------------------------------------------------------------ output
    def save(self, folder: Path) -> None:
        """Round the weights to float16, set shift/scale from latent statistics, write the
        diffusers folder (config.json + diffusion_pytorch_model.safetensors) atomically."""
        import os
        import tempfile

        import torch

        self.vae.eval()
        self.vae.half().float()  # measure what ships
        stats = []
        for chunk in range(0, self.o.stats_images, 64):
            images, _ = self._renders(_STATS_SALT, chunk // 64, min(64, self.o.stats_images - chunk), "train")
            stats.append(to_pixels(images))
        mean, std = latent_stats(self.vae, torch.cat(stats))
        self.vae.register_to_config(shift_factor=round(mean, 4), scaling_factor=round(1.0 / std, 4))
        folder = Path(folder)
        staging = Path(tempfile.mkdtemp(dir=folder, prefix=".tmp-vae-"))
        try:
            self.vae.half().save_pretrained(str(staging), safe_serialization=True)
            for item in staging.iterdir():
                os.replace(item, folder / item.name)
        finally:
            self.vae.float()
            for item in staging.iterdir():
                item.unlink()
            staging.rmdir()

    def evaluate(self, show_progress: bool) -> dict:
        import torch

        n = self.o.eval_images
        images, is_target = self._renders(_EVAL_SALT, 0, n, "eval")
        pixels = to_pixels(images)
        values = psnr(reconstruct(self.vae, pixels), pixels)
        mask = torch.from_numpy(is_target)
        cfg = self.vae.config
        mean, std = latent_stats(self.vae, pixels)
        metrics = {
            "psnr": {"all": round(float(values.mean()), 2), "targets": round(float(values[mask].mean()), 2),
                     "references": round(float(values[~mask].mean()), 2), "min": round(float(values.min()), 2)},
            "normalized_latents": {"mean": round((mean - cfg.shift_factor) * cfg.scaling_factor, 4),
                                   "std": round(std * cfg.scaling_factor, 4)},
            "shift_factor": cfg.shift_factor, "scaling_factor": cfg.scaling_factor,
            "eval_images": n, "image_size": self.recipe.size,
            "parameters": sum(p.numel() for p in self.vae.parameters()),
        }
        if self.o.eval_identities:
            metrics["identity_retrieval"] = identity_check(self.vae, self.o.eval_identities, self.recipe.size,
                                                           show_progress)
        return metrics


def identity_check(vae, num_ids: int, size: int = 64, show_progress: bool = False) -> dict:
    """Identity retrieval (psr.toyworld.perception.metrics protocol, clean condition) with
    the query images passed through the VAE, next to the same retrieval on the originals:
    {"reference"|"target": {"original": top-1, "reconstructed": top-1}}. Needs the shipped
    ToyWorld identity encoder; without it, {"skipped": reason}."""
    import numpy as np
    from PIL import Image

    try:
        encoder = toyworld_extractor("cpu")
    except UserError as err:
        return {"skipped": str(err)}
    gallery, refs, targets = retrieval_sets(num_ids, size=size)

    def crops(images: np.ndarray, renders) -> list:
        return [crop_box(Image.fromarray(im), r.boxes[-1].tolist(), 0.1) for im, r in zip(images, renders)]

    def through_vae(renders) -> np.ndarray:
        pixels = to_pixels(np.stack([r.image for r in renders]))
        rec = reconstruct(vae, pixels)
        return ((rec + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()

    g = encoder.embed_images(crops(np.stack([r.image for r in gallery]), gallery)).numpy()
    table = {}
    for kind, renders in (("reference", refs), ("target", targets)):
        original = encoder.embed_images(crops(np.stack([r.image for r in renders]), renders)).numpy()
        rebuilt = encoder.embed_images(crops(through_vae(renders), renders)).numpy()
        table[kind] = {"original": topk(original @ g.T, ks=(1,))["top1"],
                       "reconstructed": topk(rebuilt @ g.T, ks=(1,))["top1"]}
    return table
