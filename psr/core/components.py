"""FLUX components: load them from a hub id or a local folder, save them back.

The set is exactly what diffusers' `FluxPipeline` takes, so any FLUX.1-dev or FLUX.1
Kontext checkpoint folder loads unchanged, and `save_components` writes a folder that
`FluxPipeline.from_pretrained` reads too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psr.errors import UserError

if TYPE_CHECKING:
    import torch


@dataclass
class FluxComponents:
    transformer: Any  # diffusers.FluxTransformer2DModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel: pooled prompt embedding
    tokenizer: Any
    text_encoder_2: Any  # transformers.T5EncoderModel: per-token prompt embedding
    tokenizer_2: Any
    scheduler: Any  # diffusers.FlowMatchEulerDiscreteScheduler: holds the shift settings

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class HoldsModel:
    """Mixin for wrappers that keep a torch module in `self.model`: its device and dtype are
    read from the module's parameters, so moving the module moves the wrapper."""

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def dtype(self):
        return next(self.model.parameters()).dtype


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def cpu_has_bfloat16() -> bool:
    """Whether this CPU has bfloat16 arithmetic (AVX512-BF16 or AMX): without it torch emulates
    bfloat16 matmuls by conversion, which is slower than float32."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_device(name: str) -> "torch.device":
    """A torch device for a recipe's device string; "auto" takes cuda, then mps, then cpu."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"device {name!r}: not a torch device (try 'auto', 'cpu', 'cuda', 'cuda:1')") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r}: CUDA is not available on this machine")
    return device


def load_components(path: str, dtype: str = "bfloat16") -> FluxComponents:
    """Load every component with `from_pretrained` from a local folder or a hub id.

    A hub id is fetched by huggingface_hub (and cached) only because the user named it.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    local = Path(path).expanduser()
    looks_local = local.exists() or path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local and not (local / "transformer").is_dir():
        raise UserError(f"model.path {path}: not a FLUX folder (expected transformer/, vae/, "
                        "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/ inside)")
    source = str(local) if looks_local else path
    dt = torch_dtype(dtype)
    try:
        return FluxComponents(
            transformer=FluxTransformer2DModel.from_pretrained(source, subfolder="transformer", torch_dtype=dt),
            vae=AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dt),
            text_encoder=CLIPTextModel.from_pretrained(source, subfolder="text_encoder", dtype=dt),
            tokenizer=AutoTokenizer.from_pretrained(source, subfolder="tokenizer"),
            text_encoder_2=T5EncoderModel.from_pretrained(source, subfolder="text_encoder_2", dtype=dt),
            tokenizer_2=AutoTokenizer.from_pretrained(source, subfolder="tokenizer_2"),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(source, subfolder="scheduler"),
        )
    except OSError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise UserError(f"model.path {path}: cannot load FLUX components ({first_line})") from None


def save_components(components: FluxComponents, folder: str | Path) -> None:
    """Write a diffusers FLUX folder (model_index.json + one subfolder per component)."""
    from diffusers import FluxPipeline

    FluxPipeline(**components.as_dict()).save_pretrained(str(folder), safe_serialization=True)
    # diffusers records where a model was loaded from; a saved folder must not carry the
    # path of the machine that wrote it (nor send a reader looking for it).
    for config in Path(folder).glob("*/config.json"):
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
