"""The embedded architecture: the FLUX classes at the size psr ships inside the package.

Like `psr.core.tiny`, every size is an argument and every module is a diffusers/transformers
class built from its config; the defaults are the shipped model. The differences from `tiny`
are the ones a model that is actually trained on ToyWorld (64 px renders) needs:

- VAE: 4x downsampling (three levels), 8 latent channels, so a 64 px image is a 16x16x8 latent
  and, after FLUX's 2x2 packing, an 8x8 grid of 32-channel tokens (8 px per token). Its
  `scaling_factor` / `shift_factor` come from the trained VAE's latent statistics.
- transformer: width 128 (4 heads of 32), 6 double- and 6 single-stream blocks, rotary axes
  (4, 14, 14) in FLUX's proportions (16, 56, 56)/128, no guidance embedding (nothing to
  distil from, so `guidance` is ignored by the sampler).
- text encoders: a random-init CLIP and T5 of width 32 that stay frozen: their token
  features are fixed functions of the prompt which the transformer learns to read. Their
  cost is the 49408-token CLIP vocabulary (49408 x 32 x 2 bytes = 3.2 MB each in float16).

Shipped size in float16 (`folder_sizes`): see docs/embedded.md; the test keeps it <= 30 MB.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from psr.core.components import FluxComponents, save_components
from psr.core.io import create_temp_dir
from psr.core.tiny import (
    assemble_components,
    build_tiny_text_encoders,
    flux_transformer,
)
from psr.errors import UserError

# The defaults of `build_embedded_components`, as one table so scripts and docs agree.
EMBEDDED_SIZES: dict[str, Any] = {
    "num_layers": 6,
    "num_single_layers": 6,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "axes_dims_rope": (4, 14, 14),
    "latent_channels": 8,
    "vae_block_out_channels": (16, 32, 64),
    "vae_layers_per_block": 1,
    "text_hidden_size": 32,
    "text_layers": 2,
    "max_sequence_length": 64,
}

# Parameter counts of the default build (docs/embedded.md; checked by tests/test_embedded.py).
EMBEDDED_PARAMETERS: dict[str, int] = {
    "transformer": 5_161_888,
    "vae": 655_203,
    "text_encoder": 1_600_672,
    "text_encoder_2": 1_597_632,
}

# The ToyWorld-trained VAE (`psr fit --recipe recipes/fit-toy-vae.toml` writes it).
TOY_VAE_DIR = Path(__file__).resolve().parent.parent / "assets" / "toyworld" / "vae"


# A fixed shift of 3 (SD3's value) instead of FLUX's resolution-dependent one. ToyWorld
# latents are mostly flat background, so at 64 tokens the scene stays readable in the noisy
# latent up to σ ≈ 0.97; FLUX's dynamic shift gives 64 tokens a shift of only ≈ 1.6, training
# almost never reaches that band, and the model learns to read the scene from the residual
# signal instead of the prompt and references, which fails at σ = 1 where sampling starts
# (a 1,500-step run drew the same forest-green texture for every prompt).
EMBEDDED_SHIFT = 3.0


# Where the embedded model's references go under `position_scheme = "layout"`: per key
# (reference count, or "2:" + relation), one (cx, cy, side) per reference. The centres are
# the mean subject-box centres of the easy ToyWorld level's slot layout (measured on the
# 32,000 rows of recipes/synth-toy-easy.toml; "2" is "next to", the pair about the centre
# line); `side` is the 32 px reference's span in the 64 px target at the level's mean
# reference/target subject scale (0.849, 0.809 for one subject): 0.5 / 0.849 = 0.589.
EMBEDDED_REFERENCE_LAYOUT: dict[str, list[list[float]]] = {
    "1": [[0.5, 0.5, 0.618]],
    "2": [[0.307, 0.5, 0.589], [0.692, 0.5, 0.589]],
    "2:next to": [[0.307, 0.5, 0.589], [0.692, 0.5, 0.589]],
    "2:left of": [[0.271, 0.5, 0.589], [0.73, 0.5, 0.589]],
    "2:right of": [[0.73, 0.5, 0.589], [0.27, 0.5, 0.589]],
    "2:above": [[0.5, 0.27, 0.589], [0.5, 0.731, 0.589]],
    "2:below": [[0.5, 0.73, 0.589], [0.5, 0.27, 0.589]],
    "3": [[0.27, 0.28, 0.589], [0.73, 0.28, 0.589], [0.5, 0.73, 0.589]],
    "4": [[0.27, 0.27, 0.589], [0.73, 0.27, 0.589], [0.27, 0.73, 0.589], [0.73, 0.73, 0.589]],
}


def embedded_scheduler():
    """The flow-matching scheduler the embedded model trains and samples with (fixed shift)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=EMBEDDED_SHIFT,
                                           use_dynamic_shifting=False)


def build_embedded_vae(
    seed: int = 0,
    *,
    latent_channels: int = 8,
    block_out_channels: tuple[int, ...] = (16, 32, 64),
    layers_per_block: int = 1,
    scaling_factor: float = 1.0,
    shift_factor: float = 0.0,
):
    """A random-init `AutoencoderKL` in FLUX's VAE layout (no quant convs, shift + scale).

    Downsampling is 2 ** (len(block_out_channels) - 1). The shift and scale default to the
    identity; a trained VAE stores the values measured on its latents.
    """
    import torch
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    groups = min(8, *block_out_channels)
    if any(c % groups for c in block_out_channels):
        raise ValueError(f"vae block_out_channels {block_out_channels}: each must be a multiple of {groups}")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            latent_channels=latent_channels,
            norm_num_groups=groups,
            sample_size=64,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=False,
            use_post_quant_conv=False,
            # Attention over a 16x16 latent buys nothing on 64 px renders and costs time.
            mid_block_add_attention=False,
        )
    finally:
        torch.random.set_rng_state(state)
    return vae.eval()


def build_embedded_components(
    seed: int = 0,
    vae: Any = None,
    *,
    dtype: str = "float32",
    num_layers: int = EMBEDDED_SIZES["num_layers"],
    num_single_layers: int = EMBEDDED_SIZES["num_single_layers"],
    num_attention_heads: int = EMBEDDED_SIZES["num_attention_heads"],
    attention_head_dim: int = EMBEDDED_SIZES["attention_head_dim"],
    axes_dims_rope: tuple[int, int, int] = EMBEDDED_SIZES["axes_dims_rope"],
    latent_channels: int = EMBEDDED_SIZES["latent_channels"],
    vae_block_out_channels: tuple[int, ...] = EMBEDDED_SIZES["vae_block_out_channels"],
    vae_layers_per_block: int = EMBEDDED_SIZES["vae_layers_per_block"],
    text_hidden_size: int = EMBEDDED_SIZES["text_hidden_size"],
    text_layers: int = EMBEDDED_SIZES["text_layers"],
    max_sequence_length: int = EMBEDDED_SIZES["max_sequence_length"],
) -> FluxComponents:
    """The embedded FLUX component set; `seed` fixes every random-init weight.

    vae: a (trained) `AutoencoderKL` to use instead of a random-init one; its
    `latent_channels` must equal `latent_channels`. The text encoders and the transformer are
    always random-init from `seed`, so the same seed gives the same base model.
    """
    import torch

    if sum(axes_dims_rope) != attention_head_dim:
        raise ValueError(f"axes_dims_rope {tuple(axes_dims_rope)} must sum to attention_head_dim {attention_head_dim}")
    if any(d % 2 for d in axes_dims_rope):
        raise ValueError(f"axes_dims_rope {tuple(axes_dims_rope)}: each axis needs an even number of dims")
    if vae is None:
        vae = build_embedded_vae(seed, latent_channels=latent_channels, block_out_channels=vae_block_out_channels,
                                 layers_per_block=vae_layers_per_block)
    elif vae.config.latent_channels != latent_channels:
        raise ValueError(f"vae has {vae.config.latent_channels} latent channels, the transformer expects "
                         f"{latent_channels}")
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        transformer = flux_transformer(latent_channels, num_layers, num_single_layers, attention_head_dim,
                                       num_attention_heads, text_hidden_size, axes_dims_rope, guidance_embeds=False)
        # The text encoders are never trained: small widths keep the vocabulary table (the
        # bulk of their size) at 3.2 MB each in float16.
        text_encoder, text_encoder_2 = build_tiny_text_encoders(text_hidden_size, text_layers)
    finally:
        torch.random.set_rng_state(state)
    return assemble_components(transformer, vae, text_encoder, text_encoder_2, embedded_scheduler(), dtype,
                               max_sequence_length)


def parameter_counts(components: FluxComponents) -> dict[str, int]:
    """Parameters per module: {"transformer", "vae", "text_encoder", "text_encoder_2"}."""
    return {name: sum(p.numel() for p in getattr(components, name).parameters())
            for name in ("transformer", "vae", "text_encoder", "text_encoder_2")}


def folder_sizes(folder: str | Path) -> dict[str, int]:
    """Bytes on disk per top-level entry of a saved model folder (subfolders summed)."""
    folder = Path(folder)
    sizes = {}
    for entry in sorted(folder.iterdir()):
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        sizes[entry.name] = sum(p.stat().st_size for p in files)
    return sizes


def load_toy_vae(path: str | Path | None = None):
    """The trained ToyWorld VAE (float32, eval mode) from `path` (default TOY_VAE_DIR)."""
    import torch
    from diffusers import AutoencoderKL

    folder = Path(path).expanduser() if path is not None else TOY_VAE_DIR
    if not (folder / "config.json").is_file():
        raise UserError(f"vae {folder}: no AutoencoderKL folder there (train one with "
                        "`psr fit --recipe recipes/fit-toy-vae.toml`)")
    return AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32).eval()


def write_embedded_base(out: str | Path, *, seed: int = 0, vae_path: str | Path | None = None,
                        **sizes) -> dict[str, int]:
    """Write the embedded base model to the folder `out` (which must not exist): the trained
    VAE from `vae_path` (default TOY_VAE_DIR), a random-init transformer and the frozen text
    encoders from `seed`, all in float16 safetensors, plus a `psr_model.json` card that marks
    it untrained. `sizes` override EMBEDDED_SIZES except the VAE's, which its config fixes.
    Returns `folder_sizes(out)`.
    """
    import json
    import os
    import shutil

    out = Path(out)
    if out.exists():
        raise UserError(f"output {out}: already exists; choose a new folder or remove it first")
    vae = load_toy_vae(vae_path)
    sizes = {**sizes, "latent_channels": vae.config.latent_channels}
    components = build_embedded_components(seed, vae=vae, **sizes)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = create_temp_dir(out.parent, f".tmp-{out.name}-")
    try:
        for module in (components.transformer, components.vae, components.text_encoder, components.text_encoder_2):
            module.half()
        save_components(components, staging)
        card = {
            "architecture": "embedded",
            "trained": False,
            "seed": seed,
            "sizes": {**EMBEDDED_SIZES, **{k: v for k, v in sizes.items() if k in EMBEDDED_SIZES},
                      "vae_block_out_channels": tuple(vae.config.block_out_channels),
                      "vae_layers_per_block": vae.config.layers_per_block},
            "parameters": parameter_counts(components),
            "position_scheme": "layout",  # how the embedded architecture is trained and run
            "reference_layout": EMBEDDED_REFERENCE_LAYOUT,
            "note": "embedded base model: ToyWorld-trained VAE, random-init (untrained) transformer; its images "
                    "are noise-like until `psr pretrain` trains it. Name real FLUX weights with --recipe.",
        }
        (staging / "psr_model.json").write_text(json.dumps(card, indent=2) + "\n")
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder_sizes(out)
