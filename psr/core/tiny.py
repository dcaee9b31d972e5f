"""The `tiny` preset: the same diffusers/transformers classes as FLUX, built from configs.

Every size is an argument, so a test model and a larger CPU model are the same function
called with other numbers. Nothing is downloaded: both tokenizers are CLIP BPE tokenizers
built from the vocabulary file that open_clip ships. FLUX's second tokenizer is T5's
SentencePiece model, which cannot be had offline; `FluxPipeline` only needs a tokenizer
that pads to `max_sequence_length`, which the CLIP BPE tokenizer does.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

from psr.core.components import FluxComponents, torch_dtype
from psr.core.io import create_temp_dir

CLIP_VOCAB_SIZE = 49408


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP byte-level BPE alphabet, in vocabulary order: the printable bytes stand for
    themselves, then the other bytes take unused code points from 256 up, so every byte
    string is a string of visible symbols. The order fixes the first 256 token ids."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    others = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + n) for n in range(len(others))]


@functools.lru_cache(maxsize=1)
def clip_bpe_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(token → id, merges) of the 49408-token CLIP vocabulary, read from open_clip's file."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    # The file starts with a version line; CLIP uses the first 49152 - 256 - 2 merges.
    merges = [tuple(line.split()) for line in lines[1: 49152 - 256 - 2 + 1]]
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == CLIP_VOCAB_SIZE, len(tokens)
    return {t: i for i, t in enumerate(tokens)}, merges


def _cache_dir() -> Path:
    return Path(os.environ.get("PSR_CACHE", Path.home() / ".cache" / "psr"))


@functools.lru_cache(maxsize=1)
def _cached_clip_tokenizer():
    """Build the tokenizer once per machine: converting the BPE tables takes ~10 s, while
    reading the saved `tokenizer.json` back takes a fraction of a second."""
    from transformers import AutoTokenizer, CLIPTokenizer

    folder = _cache_dir() / "clip-bpe-tokenizer"
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder))
    vocab, merges = clip_bpe_vocabulary()
    tokenizer = CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77)
    try:  # a cache that cannot be written only costs time
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = create_temp_dir(folder.parent, ".clip-bpe-")
        tokenizer.save_pretrained(str(staging))
        os.replace(staging, folder)
    except OSError:
        pass
    return tokenizer


def build_clip_tokenizer(model_max_length: int = 77):
    """A `transformers.CLIPTokenizer` with the real CLIP vocabulary, built offline.

    Building the BPE tables takes seconds, so one instance per length is built and copied.
    """
    import copy

    tokenizer = copy.deepcopy(_cached_clip_tokenizer())
    tokenizer.model_max_length = model_max_length
    return tokenizer


def build_tiny_text_encoders(text_hidden_size: int, text_layers: int):
    """(CLIPTextModel, T5EncoderModel), random-init at the given width and depth, on the CLIP
    vocabulary (the offline tokenizer serves both). Draws from torch's global generator, so
    callers seed it."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE, hidden_size=text_hidden_size, intermediate_size=text_hidden_size * 2,
        num_hidden_layers=text_layers, num_attention_heads=2, max_position_embeddings=77,
        projection_dim=text_hidden_size, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=CLIP_VOCAB_SIZE, d_model=text_hidden_size, d_kv=text_hidden_size // 4,
        d_ff=text_hidden_size * 2, num_layers=text_layers, num_heads=4,
        relative_attention_num_buckets=8, pad_token_id=49407, eos_token_id=49407,
        decoder_start_token_id=0,
    ))
    return text_encoder, text_encoder_2


def flux_scheduler():
    """FLUX's flow-matching scheduler with resolution-dependent shift."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True,
        base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096,
    )


def flux_transformer(latent_channels: int, num_layers: int, num_single_layers: int, attention_head_dim: int,
                     num_attention_heads: int, text_hidden_size: int, axes_dims_rope, guidance_embeds: bool):
    """A random-init `FluxTransformer2DModel` reading 2x2-packed latents and the small text
    encoders' width (the caller seeds the RNG)."""
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=latent_channels * 4,
        num_layers=num_layers,
        num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=text_hidden_size,
        pooled_projection_dim=text_hidden_size,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=tuple(axes_dims_rope),
    )


def assemble_components(transformer, vae, text_encoder, text_encoder_2, scheduler, dtype: str,
                        max_sequence_length: int) -> FluxComponents:
    """Put built modules in eval mode and `dtype`, and add the offline CLIP BPE tokenizers."""
    dt = torch_dtype(dtype)
    for module in (transformer, vae, text_encoder, text_encoder_2):
        module.eval()
        if module.dtype != dt:
            module.to(dt)
    return FluxComponents(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(77),
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_clip_tokenizer(max_sequence_length),
        scheduler=scheduler,
    )


def build_tiny_components(
    seed: int = 0,
    dtype: str = "float32",
    *,
    num_layers: int = 2,
    num_single_layers: int = 2,
    num_attention_heads: int = 4,
    attention_head_dim: int = 16,
    axes_dims_rope: tuple[int, int, int] = (4, 6, 6),
    latent_channels: int = 4,
    vae_block_out_channels: tuple[int, ...] = (16, 32, 32),
    text_hidden_size: int = 32,
    text_layers: int = 2,
    max_sequence_length: int = 512,
) -> FluxComponents:
    """Build a random-init FLUX component set; `seed` fixes every weight.

    With the defaults: a 4x-downsampling VAE with 4 latent channels, so a 64 px image is
    an 8x8 grid of 2x2-packed tokens of 16 channels; a 2+2-block transformer of width 64.
    """
    import torch
    from diffusers import AutoencoderKL

    if sum(axes_dims_rope) != attention_head_dim:
        raise ValueError("axes_dims_rope must sum to attention_head_dim")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        transformer = flux_transformer(latent_channels, num_layers, num_single_layers, attention_head_dim,
                                       num_attention_heads, text_hidden_size, axes_dims_rope, guidance_embeds=True)
        n = len(vae_block_out_channels)
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            block_out_channels=vae_block_out_channels,
            layers_per_block=1,
            latent_channels=latent_channels,
            norm_num_groups=min(8, vae_block_out_channels[0]),
            sample_size=64,
            # FLUX's VAE normalises latents with a shift and a scale and has no quant convs.
            scaling_factor=0.3611,
            shift_factor=0.1159,
            use_quant_conv=False,
            use_post_quant_conv=False,
            mid_block_add_attention=False,
        )
        text_encoder, text_encoder_2 = build_tiny_text_encoders(text_hidden_size, text_layers)
    finally:
        torch.random.set_rng_state(generator_state)
    return assemble_components(transformer, vae, text_encoder, text_encoder_2, flux_scheduler(), dtype,
                               max_sequence_length)
