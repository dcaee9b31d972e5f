"""Adapters on the transformer: the recipe's `[adapter]` table, how it is added, and the
files a trained adapter is saved in.

`AdapterConfig` is the `adapter` section of `psr pretrain` and `psr rl` recipes;
`apply_adapter` adds it to a transformer (or unfreezes everything for a full fine-tune).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from psr.core.attention import check_block_names
from psr.core.lora import add_lora
from psr.core.moe_lora import MOE_TARGETS, add_moe_lora
from psr.core.recipe import require as _require
from psr.errors import RecipeError, UserError

LORA_FILE = "pytorch_lora_weights.safetensors"
MOE_FILE = "moe_lora.safetensors"


def apply_adapter(transformer, cfg) -> list[tuple[str, torch.nn.Parameter]]:
    """Add the recipe's adapter (or unfreeze everything for a full fine-tune); return the
    trainable (name, parameter) pairs, in a fixed order, upcast to float32."""
    if cfg.kind == "none":
        transformer.requires_grad_(True)
    elif cfg.kind == "lora":
        add_lora(transformer, cfg.rank, cfg.alpha, cfg.targets or ("attn",), cfg.reference_only,
                 blocks=cfg.blocks, dropout=cfg.dropout)
    else:
        add_moe_lora(transformer, cfg.experts, cfg.top_k, cfg.rank, cfg.alpha, blocks=cfg.blocks,
                     targets=cfg.targets or MOE_TARGETS)
    named = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
    for _, param in named:  # float32 master weights; autocast decides the compute dtype
        param.data = param.data.float()
    return named


def load_trainable(named: list[tuple[str, torch.nn.Parameter]], tensors: dict[str, torch.Tensor],
                   where: str) -> None:
    """Copy saved tensors into the trainable parameters; every one must be there."""
    missing = [n for n, _ in named if n not in tensors]
    if missing:
        raise UserError(f"checkpoint {where}: has no weight {missing[0]!r} ({len(missing)} missing); "
                        "it was written with another adapter setting")
    with torch.no_grad():
        for name, param in named:
            param.copy_(tensors[name])


def input_dtype(transformer, kind: str):
    """The dtype the transformer's inputs take: its frozen base weights' (adapters), or the
    float32 master weights' (full fine-tune; autocast decides the compute dtype)."""
    params = list(transformer.parameters())
    frozen = [p for p in params if not p.requires_grad]
    return (frozen[0] if kind != "none" and frozen else params[0]).dtype


@dataclass(frozen=True)
class AdapterConfig:
    """What is trained: everything (kind = "none"), LoRA, or MoE-LoRA (psr.core.lora)."""

    kind: Literal["none", "lora", "moe_lora"] = "none"
    """"none" trains every transformer weight (full fine-tune); "lora"; "moe_lora"."""
    rank: int = 16
    alpha: float | None = None
    """LoRA scale is alpha/rank; None takes alpha = rank."""
    targets: tuple[str, ...] = ()
    """LoRA layers: "attn", "ff", "all", or short names like "to_q", "proj_mlp" (empty:
    "attn"). MoE-LoRA: any of "ff", "ff_context", "proj_mlp" (empty: all three)."""
    blocks: tuple[str, ...] = ("all",)
    """Blocks that get adapters: "double", "single", "all" or names like "transformer_blocks.3"."""
    reference_only: bool = False
    """LoRA delta only at reference tokens (lora only; cannot be merged into weights)."""
    dropout: float = 0.0
    """LoRA dropout."""
    experts: int = 4
    """MoE-LoRA experts per wrapped feed-forward."""
    top_k: int = 1
    """Experts chosen per token (MultiCrafter: 1)."""
    aux_weight: float = 0.01
    """Weight of the MoE load-balancing loss."""

    def __post_init__(self):
        _require(self.rank >= 1, "rank", "must be >= 1")
        _require(self.alpha is None or self.alpha > 0, "alpha", "must be > 0")
        _require(0 <= self.dropout < 1, "dropout", "must lie in [0, 1)")
        try:
            check_block_names(self.blocks, "blocks")
        except UserError as err:
            raise RecipeError("blocks", str(err).removeprefix("blocks: ")) from None
        _require(not self.reference_only or self.kind == "lora", "reference_only",
                 "only LoRA can be reference-only; set adapter.kind = \"lora\"")
        if self.kind == "moe_lora":
            _require(self.experts >= 1, "experts", "must be >= 1")
            _require(1 <= self.top_k <= self.experts, "top_k", f"must lie in [1, experts={self.experts}]")
            bad = [t for t in self.targets if t not in MOE_TARGETS]
            _require(not bad, "targets", f"MoE-LoRA wraps feed-forwards: choose from {', '.join(MOE_TARGETS)} "
                                         f"(got {bad[0] if bad else ''!r})")
        _require(self.aux_weight >= 0, "aux_weight", "must be >= 0")
