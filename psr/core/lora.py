"""LoRA on the FLUX transformer (peft), reference-only LoRA, and the diffusers LoRA file.

`add_lora` injects peft LoRA layers in place (the module names stay those of
`FluxTransformer2DModel`), freezes everything else and returns the targeted module names.
Targets are short names matched against a linear layer's path inside its block:

- "to_q", "to_k", "to_v", "to_out.0": attention of the image stream (double-stream blocks)
  and of the joint stream (single-stream blocks; they have no to_out);
- "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out": attention of the text stream
  (double-stream blocks);
- "ff.net.0.proj", "ff.net.2" (image stream), "ff_context.net.0.proj", "ff_context.net.2"
  (text stream), "proj_mlp", "proj_out" (single-stream blocks' MLP input and output);
- groups: "attn" = the eight attention names, "ff" = the six feed-forward names, "all" =
  both. A name matches a path equal to it or ending in "." + name.

Reference-only LoRA (MOSAIC's idea of adapting only how references are read): the LoRA
delta is multiplied by a per-token mask, so it is added at reference tokens only. Double
blocks' image-stream layers see `[target | refs]`, single-stream layers see
`[text | target | refs]` (the text part is never masked in), and text-stream layers never
see a reference token, so reference-only LoRA leaves them out. The mask comes from
`set_lora_token_mask` / `lora_token_mask` (`TokenLayout.reference_mask()`); a forward
without one is an error, because silently adapting nothing (or everything) is wrong.

LoRA file (`save_lora`): one safetensors file readable by `FluxPipeline.load_lora_weights`:
tensors `transformer.<module>.lora_A.weight` [rank, in] and `transformer.<module>.lora_B.weight`
[out, rank]; metadata `lora_adapter_metadata` = JSON of the peft `LoraConfig` with keys
prefixed `transformer.` (diffusers' convention, so alpha survives), and `psr_lora` = JSON
{"version": 1, "rank", "alpha", "modules", "reference_only"} which `load_lora` reads.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from psr.core.attention import select_blocks
from psr.core.io import write_atomic
from psr.core.moe_lora import (  # noqa: F401
    MoELoRA,
    add_moe_lora,
    load_moe_lora,
    mark_adapters_trainable,
    moe_aux_loss,
    save_moe_lora,
)
from psr.errors import UserError

ADAPTER = "default"
ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FF_TARGETS = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out")
TARGET_GROUPS = {"attn": ATTN_TARGETS, "ff": FF_TARGETS, "all": ATTN_TARGETS + FF_TARGETS}
FILE_FORMAT_VERSION = 1


# ---------------------------------------------------------------------- targets
def _stream(module_name: str) -> str:
    """Which tokens a block linear layer sees: "image" ([target | refs]), "text", "joint"
    ([text | target | refs]) or "temb" (the modulation, no token axis)."""
    rel = module_name.split(".", 2)[2]  # the path inside the block
    if ".norm" in f".{rel}":
        return "temb"
    if module_name.startswith("single_transformer_blocks."):
        return "joint"
    if rel.startswith(("attn.add_", "ff_context.")) or rel == "attn.to_add_out":
        return "text"
    return "image"


def resolve_lora_targets(transformer, targets: Iterable[str], blocks: Iterable[str] = ("all",),
                         reference_only: bool = False) -> list[str]:
    """Full names of the linear layers that `targets` select inside `blocks`."""
    names = []
    for target in targets:
        names.extend(TARGET_GROUPS.get(target, (target,)))
    if not names:
        raise UserError("lora targets: empty; use 'attn', 'ff', 'all' or names like 'to_q', 'proj_mlp'")
    chosen = []
    per_target = {t: 0 for t in names}
    for block in select_blocks(transformer, blocks, "lora blocks"):
        for rel, module in transformer.get_submodule(block).named_modules():
            if not isinstance(module, torch.nn.Linear) or not rel:
                continue
            hits = [t for t in names if rel == t or rel.endswith("." + t)]
            full = f"{block}.{rel}"
            if not hits:
                continue
            for t in hits:
                per_target[t] += 1
            if reference_only and _stream(full) == "temb":
                raise UserError(f"lora targets: {full} modulates by timestep and has no token axis; "
                                f"reference-only LoRA needs token layers")
            if reference_only and _stream(full) == "text":
                continue  # text tokens are never reference tokens
            chosen.append(full)
    explicit = [t for t in names if t not in ATTN_TARGETS + FF_TARGETS or t in targets]
    missing = [t for t in explicit if per_target[t] == 0]
    if missing:
        raise UserError(f"lora target {missing[0]!r}: matches no linear layer in the selected blocks; use 'attn', "
                        f"'ff', 'all' or names like {', '.join(repr(t) for t in ATTN_TARGETS[:4])}, 'proj_mlp'")
    if not chosen:
        raise UserError("lora targets: no layer left to adapt (reference-only LoRA skips text-stream layers)")
    return chosen


# ---------------------------------------------------------------------- token mask
class _TokenMask:
    """Holds the current token mask and the hooks that apply it."""

    def __init__(self):
        self.mask: torch.Tensor | None = None
        self.handles: list = []


def _mask_hook(holder: _TokenMask, stream: str, name: str):
    def hook(module, args, output):
        mask = holder.mask
        if mask is None:
            raise RuntimeError(f"reference-only LoRA ({name}): no token mask set; run the transformer inside "
                               f"`with lora_token_mask(transformer, layout.reference_mask()):`")
        length, image_len = output.shape[1], mask.shape[-1]
        if stream == "joint" and length >= image_len:
            mask = torch.nn.functional.pad(mask, (length - image_len, 0))  # text in front, never masked in
        elif length != image_len:
            raise ValueError(f"reference-only LoRA ({name}): the layer sees {length} tokens, the mask has "
                             f"{image_len}")
        mask = mask.to(device=output.device, dtype=output.dtype)
        return output * (mask[None, :, None] if mask.dim() == 1 else mask[:, :, None])

    return hook


def set_lora_token_mask(transformer, mask: torch.Tensor | None) -> None:
    """Set the reference-only mask: [image_len] or [B, image_len] over `[target | refs]`,
    True (1) where the LoRA delta applies; None unsets it."""
    holder = getattr(transformer, "_psr_token_mask", None)
    if holder is None:
        raise ValueError("set_lora_token_mask: this transformer has no reference-only LoRA")
    if mask is not None and mask.dim() not in (1, 2):
        raise ValueError(f"set_lora_token_mask: expected [image_len] or [B, image_len], got {list(mask.shape)}")
    holder.mask = mask


@contextlib.contextmanager
def lora_token_mask(transformer, mask: torch.Tensor | None):
    """`set_lora_token_mask` for the duration of a `with` block; a transformer without
    reference-only LoRA is left alone, so callers need not check."""
    holder = getattr(transformer, "_psr_token_mask", None)
    if holder is None:
        yield
        return
    previous = holder.mask
    set_lora_token_mask(transformer, mask)
    try:
        yield
    finally:
        holder.mask = previous


def is_reference_only(transformer) -> bool:
    return getattr(transformer, "_psr_token_mask", None) is not None


# ---------------------------------------------------------------------- add / merge
def _lora_layers(transformer):
    from peft.tuners.lora import LoraLayer

    return [(name, m) for name, m in transformer.named_modules() if isinstance(m, LoraLayer)]


def add_lora(transformer, rank: int = 16, alpha: float | None = None, targets: Sequence[str] = ("attn",),
             reference_only: bool = False, *, blocks: Sequence[str] = ("all",), dropout: float = 0.0,
             modules: Sequence[str] | None = None) -> list[str]:
    """Inject a peft LoRA adapter (rank, alpha; scale = alpha/rank, alpha defaults to rank)
    into the layers `targets` selects inside `blocks` (or exactly `modules`, full names),
    freeze the rest, and return the adapted module names. B starts at 0, so the model's
    output is unchanged until training moves it."""
    from peft import LoraConfig

    if rank < 1:
        raise UserError(f"lora rank {rank}: must be ≥ 1")
    if getattr(transformer, "_hf_peft_config_loaded", False) and ADAPTER in getattr(transformer, "peft_config", {}):
        raise UserError("add_lora: this transformer already has a LoRA adapter")
    alpha = float(rank if alpha is None else alpha)
    names = list(modules) if modules is not None else resolve_lora_targets(transformer, targets, blocks,
                                                                            reference_only)
    for name in names:
        parts = name.split(".")
        if any(isinstance(transformer.get_submodule(".".join(parts[:i])), MoELoRA) for i in range(1, len(parts))):
            raise UserError(f"LoRA on {name}: the layer is inside a MoE-LoRA module; adapt a feed-forward layer "
                            f"with one or the other")
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, lora_dropout=dropout,
                        init_lora_weights=True)
    transformer.add_adapter(config, adapter_name=ADAPTER)
    if reference_only:
        holder = _TokenMask()
        for name, layer in _lora_layers(transformer):
            stream = _stream(name)
            if stream not in ("image", "joint"):
                raise UserError(f"reference-only LoRA: {name} sees no reference tokens")
            holder.handles.append(layer.lora_B[ADAPTER].register_forward_hook(_mask_hook(holder, stream, name)))
        transformer._psr_token_mask = holder
    transformer._psr_lora_settings = {"rank": rank, "alpha": alpha, "modules": names,
                                      "reference_only": bool(reference_only)}
    mark_adapters_trainable(transformer)
    return names


def merge_lora(transformer):
    """Fold the LoRA deltas into the base weights and remove the LoRA layers, in place;
    returns the (now plain) transformer. Routed MoE-LoRA and reference-only LoRA depend on
    the token and cannot be folded into a weight: both raise `UserError`."""
    if any(isinstance(m, MoELoRA) for m in transformer.modules()):
        raise UserError("merge_lora: MoE-LoRA experts are chosen per token by a router and cannot be merged into "
                        "fixed weights; keep them as modules (save_moe_lora / load_moe_lora)")
    if is_reference_only(transformer):
        raise UserError("merge_lora: reference-only LoRA applies to reference tokens only and cannot be merged "
                        "into weights shared by all tokens")
    layers = _lora_layers(transformer)
    if not layers:
        raise UserError("merge_lora: this transformer has no LoRA layers")
    for name, layer in layers:
        layer.merge(safe_merge=True)
        parent, _, child = name.rpartition(".")
        setattr(transformer.get_submodule(parent) if parent else transformer, child, layer.get_base_layer())
    transformer.peft_config = {}
    transformer._hf_peft_config_loaded = False
    vars(transformer).pop("_psr_lora_settings", None)
    return transformer


# ---------------------------------------------------------------------- files
def lora_state_dict_for_diffusers(transformer) -> dict[str, torch.Tensor]:
    """The adapter as `transformer.<module>.lora_A.weight` / `.lora_B.weight` tensors,
    the layout `FluxPipeline.load_lora_weights` reads (contiguous CPU copies)."""
    from peft.utils import get_peft_model_state_dict

    if not _lora_layers(transformer):
        raise UserError("this transformer has no LoRA layers to save")
    state = get_peft_model_state_dict(transformer, adapter_name=ADAPTER)
    return {f"transformer.{k}": v.detach().to("cpu").contiguous() for k, v in state.items()}


def _diffusers_metadata(transformer) -> dict:
    config = transformer.peft_config[ADAPTER].to_dict()
    out = {}
    for key, value in config.items():
        if isinstance(value, set):
            value = sorted(value)
        out[f"transformer.{key}"] = value
    return out


def save_lora(transformer, path: str | Path) -> Path:
    """Write the adapter as one safetensors file (format in the module docstring), atomically."""
    from safetensors.torch import save_file

    settings = getattr(transformer, "_psr_lora_settings", None)
    if settings is None:
        raise UserError("save_lora: this transformer has no LoRA added by add_lora")
    tensors = lora_state_dict_for_diffusers(transformer)
    metadata = {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(_diffusers_metadata(transformer), sort_keys=True, default=str),
        "psr_lora": json.dumps({"version": FILE_FORMAT_VERSION, **settings}),
    }
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_lora(transformer, path: str | Path) -> list[str]:
    """Add the adapter saved by `save_lora` to `transformer` (same settings, saved weights)."""
    from peft.utils import set_peft_model_state_dict
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"lora file {path}: not found")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        names = f.keys()
        tensors = {k: f.get_tensor(k) for k in names}
    if "psr_lora" not in meta:
        raise UserError(f"lora file {path}: no psr_lora metadata; load other LoRA files with "
                        f"FluxPipeline.load_lora_weights")
    settings = json.loads(meta["psr_lora"])
    if settings.get("version") != FILE_FORMAT_VERSION:
        raise UserError(f"lora file {path}: format version {settings.get('version')}, this psr reads "
                        f"{FILE_FORMAT_VERSION}")
    names = add_lora(transformer, settings["rank"], settings["alpha"], reference_only=settings["reference_only"],
                     modules=settings["modules"])
    state = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    result = set_peft_model_state_dict(transformer, state, adapter_name=ADAPTER)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"lora file {path}: tensors that match no LoRA layer, e.g. {result.unexpected_keys[0]}")
    return names
