"""Adapters on the transformer: the recipe's `[adapter]` table, how it is added, and the
files a trained adapter is saved in.

`AdapterConfig` is the `adapter` section of `psr pretrain` and `psr rl` recipes;
`apply_adapter` adds it to a transformer (or unfreezes everything for a full fine-tune);
`adapters_disabled` switches the trained adapter off (RL's reference policy).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from psr.core.attention import check_block_names
from psr.core.lora import ADAPTER, add_lora
from psr.core.moe_lora import MOE_TARGETS, MoELoRA, add_moe_lora, has_frozen_adapters
from psr.core.recipe import require as _require
from psr.errors import RecipeError, UserError

LORA_FILE = "pytorch_lora_weights.safetensors"
MOE_FILE = "moe_lora.safetensors"


def apply_adapter(transformer, cfg) -> list[tuple[str, torch.nn.Parameter]]:
    """Add the recipe's adapter (or unfreeze everything for a full fine-tune); return the
    trainable (name, parameter) pairs, in a fixed order, upcast to float32. Adapters that
    trained weights loaded frozen (psr.core.weights) stay frozen below it."""
    if cfg.kind == "none" and has_frozen_adapters(transformer):
        raise UserError("adapter.kind \"none\": a full fine-tune cannot train on top of trained weights kept as "
                        "modules (a MoE-LoRA or reference-only LoRA in model.weights or init); train a LoRA on top "
                        "(adapter.kind = \"lora\")")
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


@contextlib.contextmanager
def adapters_disabled(transformer):
    """The network without its trained adapter for the `with` block: the peft adapter
    `ADAPTER` is switched off (diffusers' `disable_adapters` when it is the only one, else
    per layer) and MoE-LoRA modules that train return their base's output. Frozen adapters
    (trained weights loaded below, `psr.core.moe_lora.freeze_adapters`) stay on, so this is
    the network a run started from. Everything is switched back on afterwards."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = list(getattr(transformer, "peft_config", None) or {}) \
        if getattr(transformer, "_hf_peft_config_loaded", False) else []
    trainable = {id(p): p.requires_grad for p in transformer.parameters()}
    hooks = [m.register_forward_hook(lambda mod, args, kwargs, out: mod.base(*args, **kwargs), with_kwargs=True)
             for m in transformer.modules() if isinstance(m, MoELoRA) and not m.frozen]
    whole = names == [ADAPTER]
    layers = []
    if whole:
        transformer.disable_adapters()
    elif ADAPTER in names:
        for module in transformer.modules():
            if isinstance(module, BaseTunerLayer) and ADAPTER in module.active_adapters:
                layers.append((module, list(module.active_adapters)))
                module.set_adapter([a for a in module.active_adapters if a != ADAPTER])
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        if whole:
            transformer.enable_adapters()
        for module, active in layers:
            module.set_adapter(active)
        for param in transformer.parameters():  # peft's switches also toggle requires_grad
            param.requires_grad_(trainable[id(param)])


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
