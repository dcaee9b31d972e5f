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

LoRA file (`save_lora`): one safetensors file that loads at the trained strength through
every loader. Tensors `transformer.<module>.lora_A.weight` [rank, in] and
`transformer.<module>.lora_B.weight` [out, rank], with the scale alpha/rank already multiplied
into lora_B, so the file means `W + B A` exactly as a loader that assumes alpha = rank reads
it (diffusers without metadata, kohya-style tools, a plain peft `LoraConfig(r, lora_alpha=r)`).
Metadata `lora_adapter_metadata` = JSON of the peft `LoraConfig` with keys prefixed
`transformer.` (diffusers' convention) and `lora_alpha` = rank, which agrees with the tensors;
`psr_lora` = JSON {"version": 2, "rank", "alpha", "modules", "reference_only"} holds the
training alpha, which `load_lora` restores by dividing lora_B by alpha/rank again (exact when
alpha/rank is a power of two, else within one rounding of the saved weights). Version-1 files
(before the fold) kept lora_B unscaled with the alpha in both metadata entries; `load_lora`
still reads them.

Other LoRA files (`load_diffusers_lora`): anything diffusers' FLUX loader reads (diffusers or
peft keys, kohya/ComfyUI keys), normalised by diffusers' own converters and added as a peft
adapter with the file's alphas, so `merge_lora` can fold it into the weights.
"""

from __future__ import annotations

import contextlib
import json
import warnings
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
FILE_FORMAT_VERSION = 2
# Version 1 stored lora_B without the alpha/rank scale; load_lora still reads it.
UNSCALED_FILE_VERSION = 1


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
            if hasattr(module, "get_base_layer"):  # a layer that a frozen adapter below already wraps
                module = module.get_base_layer()
            if not isinstance(module, torch.nn.Linear) or not rel or ".lora_" in f".{rel}" \
                    or rel.endswith("base_layer"):
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
             modules: Sequence[str] | None = None, adapter: str = ADAPTER) -> list[str]:
    """Inject a peft LoRA adapter (rank, alpha; scale = alpha/rank, alpha defaults to rank)
    into the layers `targets` selects inside `blocks` (or exactly `modules`, full names),
    freeze the rest, and return the adapted module names. B starts at 0, so the model's
    output is unchanged until training moves it. `adapter` names it among the peft adapters;
    the one trained, saved and switched off is `ADAPTER`, others are frozen ones loaded
    below it (psr.core.weights), and every adapter stays active."""
    from peft import LoraConfig

    if rank < 1:
        raise UserError(f"lora rank {rank}: must be ≥ 1")
    if getattr(transformer, "_hf_peft_config_loaded", False) and adapter in getattr(transformer, "peft_config", {}):
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
    with warnings.catch_warnings():
        # peft warns about a second adapter; here that is a frozen one below, on purpose.
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        transformer.add_adapter(config, adapter_name=adapter)
    _activate_all(transformer)
    if reference_only:
        # One holder per transformer: a frozen reference-only adapter below reads the same mask.
        holder = getattr(transformer, "_psr_token_mask", None) or _TokenMask()
        for name, layer in _lora_layers(transformer):
            if adapter not in layer.lora_B:
                continue
            stream = _stream(name)
            if stream not in ("image", "joint"):
                raise UserError(f"reference-only LoRA: {name} sees no reference tokens")
            holder.handles.append(layer.lora_B[adapter].register_forward_hook(_mask_hook(holder, stream, name)))
        transformer._psr_token_mask = holder
    if adapter == ADAPTER:
        transformer._psr_lora_settings = {"rank": rank, "alpha": alpha, "modules": names,
                                          "reference_only": bool(reference_only)}
    mark_adapters_trainable(transformer)
    return names


def _activate_all(transformer) -> None:
    """Every peft adapter of `transformer` on: diffusers activates only the one it just added,
    which would silently switch off a frozen adapter loaded below it."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    names = list(getattr(transformer, "peft_config", None) or {})
    if len(names) < 2:
        return
    for module in transformer.modules():
        if isinstance(module, BaseTunerLayer):
            module.set_adapter(names)  # toggles requires_grad; the caller sets what trains


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
def _scales(transformer, adapter: str = ADAPTER) -> dict[str, float]:
    """Module name → the factor peft multiplies that layer's LoRA delta by (alpha/rank)."""
    return {name: float(layer.scaling[adapter]) for name, layer in _lora_layers(transformer)
            if adapter in layer.scaling}


def _rescale(tensor: torch.Tensor, factor: float, divide: bool = False) -> torch.Tensor:
    """`tensor` times (or divided by) `factor`, computed in float64 and rounded once to the
    tensor's dtype, so that a power-of-two factor round-trips bit for bit."""
    if factor == 1.0:
        return tensor
    wide = tensor.to(torch.float64)
    return (wide / factor if divide else wide * factor).to(tensor.dtype)


def lora_state_dict_for_diffusers(transformer) -> dict[str, torch.Tensor]:
    """The adapter as `transformer.<module>.lora_A.weight` / `.lora_B.weight` tensors with each
    layer's alpha/rank multiplied into lora_B (contiguous CPU copies): the tensors `save_lora`
    writes, which mean the trained delta to any loader that takes alpha = rank."""
    from peft.utils import get_peft_model_state_dict

    if not _lora_layers(transformer):
        raise UserError("this transformer has no LoRA layers to save")
    scales = _scales(transformer)
    out = {}
    for key, value in get_peft_model_state_dict(transformer, adapter_name=ADAPTER).items():
        value = value.detach().to("cpu")
        module, _, kind = key.rpartition(".lora_")
        if kind == "B.weight":
            value = _rescale(value, scales[module])
        out[f"transformer.{key}"] = value.contiguous()
    return out


def _diffusers_metadata(transformer) -> dict:
    """The peft `LoraConfig` as diffusers stores it, but with alpha = rank everywhere: the
    scale is in the tensors already, and a second alpha/rank would apply it twice."""
    config = transformer.peft_config[ADAPTER].to_dict()
    config["lora_alpha"] = config["r"]
    config["alpha_pattern"] = dict(config.get("rank_pattern") or {})
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


def _read_safetensors(path: Path, with_tensors: bool = True) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file; a missing or unreadable file is a `UserError`."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise UserError(f"lora file {path}: not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
            return f.metadata() or {}, tensors
    except (SafetensorError, OSError) as err:
        reason = " ".join(str(err).split())
        raise UserError(f"lora file {path}: not a readable safetensors file ({reason})") from None


def is_psr_lora_file(path: str | Path) -> bool:
    """Whether `path` was written by `save_lora` (it carries `psr_lora` metadata)."""
    meta, _ = _read_safetensors(Path(path), with_tensors=False)
    return "psr_lora" in meta


def lora_file_settings(path: str | Path) -> dict | None:
    """The `psr_lora` settings of a file `save_lora` wrote (rank, alpha, modules,
    reference_only), read from its header; None for any other LoRA file."""
    meta, _ = _read_safetensors(Path(path), with_tensors=False)
    return json.loads(meta["psr_lora"]) if "psr_lora" in meta else None


def load_lora(transformer, path: str | Path, adapter: str = ADAPTER) -> list[str]:
    """Add the adapter saved by `save_lora` to `transformer` (as the peft adapter `adapter`):
    same settings (alpha included), same weights. Reads the current format and version 1
    (see the module docstring)."""
    from peft.utils import set_peft_model_state_dict

    path = Path(path)
    meta, tensors = _read_safetensors(path)
    if "psr_lora" not in meta:
        raise UserError(f"lora file {path}: no psr_lora metadata; load other LoRA files with "
                        f"load_diffusers_lora or FluxPipeline.load_lora_weights")
    settings = json.loads(meta["psr_lora"])
    version = settings.get("version")
    if version not in (UNSCALED_FILE_VERSION, FILE_FORMAT_VERSION):
        raise UserError(f"lora file {path}: format version {version}, this psr reads versions "
                        f"{UNSCALED_FILE_VERSION} and {FILE_FORMAT_VERSION}")
    names = add_lora(transformer, settings["rank"], settings["alpha"], reference_only=settings["reference_only"],
                     modules=settings["modules"], adapter=adapter)
    scales = _scales(transformer, adapter) if version == FILE_FORMAT_VERSION else {}
    state = {}
    for key, value in tensors.items():
        key = key.removeprefix("transformer.")
        module, _, kind = key.rpartition(".lora_")
        if kind == "B.weight" and module in scales:
            value = _rescale(value, scales[module], divide=True)  # back to the trained parametrisation
        state[key] = value
    result = set_peft_model_state_dict(transformer, state, adapter_name=adapter)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"lora file {path}: tensors that match no LoRA layer, e.g. {result.unexpected_keys[0]}")
    # Other adapters (frozen ones below, MoE-LoRA experts) are not in this file.
    missing = [k for k in getattr(result, "missing_keys", []) if ".lora_" in k and f".{adapter}." in k]
    if missing:
        raise UserError(f"lora file {path}: no tensor for {missing[0]} ({len(missing)} missing)")
    return names


def _check_fits(transformer, state: dict[str, torch.Tensor], path: Path) -> list[str]:
    """The module names a peft-format LoRA state dict (keys without the `transformer.`
    prefix) adapts; tensors that name no linear layer of `transformer`, or do not fit one,
    are a `UserError` here rather than being skipped with a log warning by the loader."""
    modules = {}
    for key, value in state.items():
        module, sep, kind = key.partition(".lora_")
        if not sep:
            raise UserError(f"lora file {path}: tensor {key!r} is not a LoRA tensor")
        try:
            layer = transformer.get_submodule(module)
        except AttributeError:
            layer = None
        if hasattr(layer, "get_base_layer"):  # a layer that a frozen adapter below already wraps
            layer = layer.get_base_layer()
        if not isinstance(layer, torch.nn.Linear):
            raise UserError(f"lora file {path}: {key!r} names no linear layer of this transformer (a LoRA for "
                            f"another model?)")
        expected = {"A.weight": (None, layer.in_features), "B.weight": (layer.out_features, None)}.get(kind)
        if expected is not None and (value.dim() != 2 or any(
                want is not None and got != want for want, got in zip(expected, value.shape))):
            raise UserError(f"lora file {path}: {key!r} has shape {list(value.shape)}, which does not fit "
                            f"{module} ({layer.in_features} → {layer.out_features}; a LoRA for another model?)")
        modules[module] = True
    return list(modules)


def load_diffusers_lora(transformer, path: str | Path, adapter: str = ADAPTER) -> list[str]:
    """Add a LoRA file that psr did not write (diffusers or peft keys, kohya/ComfyUI keys, any
    layout diffusers' FLUX loader reads) to `transformer` as the adapter `ADAPTER`, at the
    strength `FluxPipeline.load_lora_weights` gives it: diffusers' `lora_state_dict` normalises
    the keys (folding kohya alphas into the weights) and returns the file's alphas and
    `lora_adapter_metadata`, which `load_lora_adapter` turns into the peft config. Returns the
    adapted module names. Text-encoder layers are refused: psr adapts the transformer only."""
    from diffusers import FluxPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    path = Path(path)
    _read_safetensors(path, with_tensors=False)  # missing or unreadable: one clear line
    try:
        state, alphas, metadata = FluxPipeline.lora_state_dict(
            str(path), return_alphas=True, return_lora_metadata=True, use_safetensors=True)
    except (ValueError, KeyError, AssertionError, RuntimeError, OSError) as err:
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"lora file {path}: not a FLUX LoRA that diffusers can read ({reason})") from None
    if not any("lora" in k for k in state):
        example = next(iter(state), "none")
        raise UserError(f"lora file {path}: holds no LoRA tensors (first key {example!r}); expected diffusers "
                        f"keys (transformer.<layer>.lora_A.weight) or kohya keys (lora_unet_<layer>.lora_down.weight)")
    encoder = [k for k in state if k.startswith(("text_encoder", "lora_te"))]
    if encoder:
        raise UserError(f"lora file {path}: also adapts the text encoder ({encoder[0]}); psr merges LoRA into the "
                        f"transformer only, so drop the text-encoder tensors from the file to use its transformer part")
    alphas = {k: float(v) for k, v in (alphas or {}).items()}  # scalar tensors → the floats peft expects
    if not any(k.startswith("transformer.") for k in state):
        # `transformer.save_lora_adapter` writes keys and metadata without the prefix.
        state = {f"transformer.{k}": v for k, v in state.items()}
        alphas = {f"transformer.{k}": v for k, v in alphas.items()}
        if metadata and not any(k.startswith("transformer.") for k in metadata):
            metadata = {f"transformer.{k}": v for k, v in metadata.items()}
    outside = [k for k in state if not k.startswith("transformer.")]
    if outside:
        raise UserError(f"lora file {path}: tensor {outside[0]!r} is not a transformer LoRA tensor")
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    if not all("lora_A" in k or "lora_B" in k for k in state):
        state = convert_unet_state_dict_to_peft(state)  # older diffusers names (to_q_lora.down, ...)
    names = _check_fits(transformer, state, path)
    if getattr(transformer, "_hf_peft_config_loaded", False) and adapter in getattr(transformer, "peft_config", {}):
        raise UserError("load_diffusers_lora: this transformer already has a LoRA adapter")
    try:
        transformer.load_lora_adapter({f"transformer.{k}": v for k, v in state.items()}, prefix="transformer",
                                      adapter_name=adapter, network_alphas=alphas or None,
                                      metadata=metadata or None)
    except (ValueError, TypeError, RuntimeError) as err:
        reason = " ".join(str(err).split())[:200]
        raise UserError(f"lora file {path}: diffusers could not load it into this transformer ({reason})") from None
    _activate_all(transformer)
    if not _lora_layers(transformer):
        raise UserError(f"lora file {path}: no layer of this transformer was adapted")
    return names
