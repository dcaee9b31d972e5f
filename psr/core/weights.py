"""Trained transformer weights put on top of a loaded model: `model.weights` of every
recipe, and `init` of `psr rl`.

What can be named: a `psr pretrain` or `psr rl` checkpoint folder (its EMA weights when
saved), a run's `final/` folder (a LoRA file, or a full model folder's `transformer/`), or
a LoRA file. A LoRA is merged into the weights already there; full weights replace them.
MoE-LoRA routes tokens through experts, which cannot be merged, so it is refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from psr.core.components import FluxComponents
from psr.core.adapters import LORA_FILE, MOE_FILE, AdapterConfig, apply_adapter, load_trainable
from psr.core.lora import load_lora, merge_lora
from psr.core.presets import PRESETS
from psr.core.recipe import build, read_toml
from psr.core.schema import ModelConfig
from psr.errors import UserError

STATE = "state.json"
"""The file that marks a complete training checkpoint folder (written last)."""


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _merge_lora_file(transformer, path: Path, where: str) -> str:
    try:
        load_lora(transformer, path)
        merge_lora(transformer)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    return f"LoRA {path.name} merged"


def _full_weights(transformer, tensors: dict[str, torch.Tensor], where: str) -> str:
    own = transformer.state_dict()
    missing = [k for k in own if k not in tensors]
    if missing:
        raise UserError(f"{where}: has no weight {missing[0]!r} ({len(missing)} missing); it was made for "
                        "another architecture")
    with torch.no_grad():
        for name, param in own.items():
            param.copy_(tensors[name])
    return "full weights loaded"


def _from_checkpoint(transformer, folder: Path, where: str, use_ema: bool = True) -> str:
    recipe = read_toml(folder / "recipe.toml")
    kind = recipe.get("command")
    if kind not in ("pretrain", "rl"):
        raise UserError(f"{where}: a checkpoint of `psr {kind}`; give a pretrain or rl checkpoint")
    # Only the adapter table matters here; an rl recipe's adapter defaults to LoRA.
    table = dict(recipe.get("adapter", {}))
    if kind == "rl":
        table.setdefault("kind", "lora")
    adapter = build(AdapterConfig, table, "adapter")
    weights = folder / ("ema.safetensors" if use_ema and (folder / "ema.safetensors").is_file()
                        else "trainable.safetensors")
    tensors = load_tensors(weights)
    if adapter.kind == "none":
        return _full_weights(transformer, tensors, where) + f" ({weights.name})"
    if adapter.kind == "moe_lora":
        raise UserError(f"{where}: MoE-LoRA experts cannot be merged into the base weights; give a LoRA or a "
                        "full fine-tune")
    dtype = transformer.dtype
    named = apply_adapter(transformer, adapter)
    load_trainable(named, tensors, str(folder))
    try:
        merge_lora(transformer)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    transformer.to(dtype)
    return f"LoRA of {folder.name} merged ({weights.name})"


def weights_kind(source: str, key: str = "model.weights") -> str:
    """What `source` holds ("lora file", "checkpoint", "full weights"), read from the file
    names only, so a wrong path fails before any model loads."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{key} {source}: no such file or folder")
    if path.is_file() or (path / LORA_FILE).is_file():
        return "lora file"
    if (path / STATE).is_file():
        return "checkpoint"
    if (path / MOE_FILE).is_file():
        raise UserError(f"{key} {source}: MoE-LoRA experts cannot be merged into the base weights; give a LoRA "
                        "or a full fine-tune")
    if any((path / "transformer").glob("*.safetensors")):
        return "full weights"
    raise UserError(f"{key} {source}: not a checkpoint (state.json), a final/ folder (LoRA file or transformer/) "
                    "or a LoRA file")


def load_weights(transformer, source: str, key: str = "model.weights") -> str:
    """Load the trained weights named by the recipe key `key` (`model.weights`, or `init` of
    `psr rl`) into `transformer`, before any adapter is added; returns what was done, for
    the log. A LoRA is merged into the weights already there; full weights replace them."""
    kind = weights_kind(source, key)
    path, where = Path(source).expanduser(), f"{key} {source}"
    if kind == "full weights":
        from safetensors.torch import load_file

        tensors = {}
        for file in sorted((path / "transformer").glob("*.safetensors")):
            tensors.update(load_file(str(file)))
        return _full_weights(transformer, tensors, where)
    if kind == "lora file":
        note = _merge_lora_file(transformer, path if path.is_file() else path / LORA_FILE, where)
    else:
        note = _from_checkpoint(transformer, path, where)
    if not getattr(transformer, "peft_config", True):
        del transformer.peft_config  # merged away: the run's own adapter is the only one
    return note


def load_model_components(config: ModelConfig) -> FluxComponents:
    """The preset's components, with `model.weights` (trained weights) loaded into the
    transformer when the recipe names them."""
    if not config.weights:
        return PRESETS[config.preset].load(config)
    weights_kind(config.weights)  # a wrong path fails before the model loads
    components = PRESETS[config.preset].load(config)
    load_weights(components.transformer, config.weights)
    return components
