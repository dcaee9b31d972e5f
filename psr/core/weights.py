"""Trained transformer weights put on top of a loaded model: `model.weights` of every
recipe, and `init` of `psr rl`.

What can be named: a `psr pretrain` or `psr rl` checkpoint folder (its EMA weights when
saved), a run's `final/` folder (a LoRA file, a MoE-LoRA file, or a full model folder's
`transformer/`), a MoE-LoRA file (`save_moe_lora`), or a LoRA file: psr's own
(`save_lora`), or any FLUX LoRA that diffusers reads (diffusers/peft or kohya keys),
normalised by diffusers' converters at the strength diffusers gives it.

How each is applied:
- full weights replace the transformer's;
- a plain LoRA is merged into the weights already there, so it costs nothing per step;
- MoE-LoRA (experts routed per token) and reference-only LoRA (a delta at reference tokens
  only) cannot be merged: they are added as modules and frozen
  (`psr.core.moe_lora.freeze_adapters`). An adapter trained on top keeps them on, in its
  forward and in RL's reference policy. A plain LoRA loaded on top of such frozen modules
  stays a module too, since merging folds every LoRA layer at once and MoE-LoRA not at all.

A run trained on top of frozen modules records where they came from (`frozen_below`: in its
checkpoints' state.json and in its final/ card, absolute paths), and loading its result
loads them first, so `--weights RUN/final` is the whole model. A start that was merged is
not recorded: the run's adapter applies to the base with that start folded in (docs/rl.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from psr.core.adapters import (
    LORA_FILE,
    MOE_FILE,
    AdapterConfig,
    apply_adapter,
    load_trainable,
)
from psr.core.components import FluxComponents
from psr.core.lora import (
    ADAPTER,
    add_lora,
    load_diffusers_lora,
    load_lora,
    lora_file_settings,
    merge_lora,
)
from psr.core.moe_lora import (
    MOE_TARGETS,
    MoELoRA,
    add_moe_lora,
    freeze_adapters,
    frozen_adapter_names,
    has_frozen_adapters,
    load_moe_lora,
)
from psr.core.presets import CARDS, PRESETS, STATE, run_record
from psr.core.recipe import build, read_toml
from psr.core.schema import ModelConfig
from psr.errors import UserError

FROZEN_NAME = "frozen"
"""peft adapter names of LoRA loaded as frozen modules: frozen_0, frozen_1, …"""
MAX_CHAIN = 8
"""Runs on top of runs that `frozen_below` may chain; more means a loop."""


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _frozen_name(transformer) -> str:
    taken = set(getattr(transformer, "peft_config", None) or {})
    k = 0
    while f"{FROZEN_NAME}_{k}" in taken:
        k += 1
    return f"{FROZEN_NAME}_{k}"


def frozen_count(transformer) -> int:
    """How many adapters `transformer` holds as frozen modules (peft adapters and MoE-LoRA
    modules): a load that raised it kept its weights unmerged."""
    return len(frozen_adapter_names(transformer)) + sum(
        isinstance(m, MoELoRA) and m.frozen for m in transformer.modules())


def _reason(err: UserError, path: Path) -> str:
    # `where` names the file already; the loaders' own "lora file PATH: " would repeat it
    return str(err).removeprefix(f"lora file {path}: ").removeprefix(f"MoE-LoRA file {path}: ")


def _lora_file(transformer, path: Path, where: str) -> str:
    try:
        settings = lora_file_settings(path)
        reference_only = bool(settings and settings.get("reference_only"))
        keep = reference_only or has_frozen_adapters(transformer)
        adapter = _frozen_name(transformer) if keep else ADAPTER
        (load_lora if settings is not None else load_diffusers_lora)(transformer, path, adapter=adapter)
        if keep:
            freeze_adapters(transformer)
        else:
            merge_lora(transformer)
    except UserError as err:
        raise UserError(f"{where}: {_reason(err, path)}") from None
    what = ("reference-only LoRA " if reference_only else "LoRA ") + path.name
    what += " kept as a frozen module" if keep else " merged"
    return what + ("" if settings is not None else " (read by diffusers' FLUX LoRA loader)")


def _moe_file(transformer, path: Path, where: str) -> str:
    try:
        load_moe_lora(transformer, path)
    except UserError as err:
        raise UserError(f"{where}: {_reason(err, path)}") from None
    freeze_adapters(transformer)
    return f"MoE-LoRA {path.name} kept as frozen modules"


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


def _frozen_checkpoint_adapter(transformer, adapter: AdapterConfig, tensors: dict[str, torch.Tensor],
                               folder: Path, where: str) -> None:
    """Add a checkpoint's adapter as frozen modules and load its weights."""
    try:
        if adapter.kind == "moe_lora":
            add_moe_lora(transformer, adapter.experts, adapter.top_k, adapter.rank, adapter.alpha,
                         blocks=adapter.blocks, targets=adapter.targets or MOE_TARGETS)
        else:
            name = _frozen_name(transformer)
            # No dropout: frozen weights act the same in training and evaluation mode.
            add_lora(transformer, adapter.rank, adapter.alpha, adapter.targets or ("attn",), adapter.reference_only,
                     blocks=adapter.blocks, adapter=name)
            # The run trained it as the adapter ADAPTER; its tensors carry that name.
            tensors = {k.replace(f".lora_A.{ADAPTER}.", f".lora_A.{name}.").replace(
                f".lora_B.{ADAPTER}.", f".lora_B.{name}."): v for k, v in tensors.items()}
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    named = [(n, p) for n, p in transformer.named_parameters() if p.requires_grad]
    load_trainable(named, tensors, str(folder))
    freeze_adapters(transformer)


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
    what = {"moe_lora": "MoE-LoRA", "lora": "reference-only LoRA" if adapter.reference_only else "LoRA"}[adapter.kind]
    if adapter.kind == "moe_lora" or adapter.reference_only or has_frozen_adapters(transformer):
        _frozen_checkpoint_adapter(transformer, adapter, tensors, folder, where)
        return f"{what} of {folder.name} kept as frozen modules ({weights.name})"
    dtype = transformer.dtype
    named = apply_adapter(transformer, adapter)
    load_trainable(named, tensors, str(folder))
    try:
        merge_lora(transformer)
    except UserError as err:
        raise UserError(f"{where}: {err}") from None
    transformer.to(dtype)
    return f"{what} of {folder.name} merged ({weights.name})"


def _is_moe_file(path: Path) -> bool:
    if path.name == MOE_FILE:
        return True
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return "psr_moe_lora" in (f.metadata() or {})
    except (SafetensorError, OSError):  # unreadable: the LoRA loader reports it with its reason
        return False


def weights_kind(source: str, key: str = "model.weights") -> str:
    """What `source` holds ("lora file", "moe file", "checkpoint", "full weights"), read from
    file names and a file's safetensors header, so a wrong path fails before any model loads."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"{key} {source}: no such file or folder")
    if path.is_file():
        return "moe file" if _is_moe_file(path) else "lora file"
    if (path / LORA_FILE).is_file():
        return "lora file"
    if (path / STATE).is_file():
        return "checkpoint"
    if (path / MOE_FILE).is_file():
        return "moe file"
    if any((path / "transformer").glob("*.safetensors")):
        return "full weights"
    raise UserError(f"{key} {source}: not a checkpoint (state.json), a final/ folder (LoRA or MoE-LoRA file, or "
                    "transformer/) or a LoRA file")


def frozen_below(source: str) -> list[str]:
    """The weights a run's result was trained on top of as frozen modules (module
    docstring): from a checkpoint's state.json, or the card beside an export."""
    path = Path(source).expanduser()
    folder = path.parent if path.is_file() else path
    for name in (STATE, *CARDS):
        if (folder / name).is_file():
            try:
                return list(json.loads((folder / name).read_text()).get("frozen_below") or [])
            except (OSError, ValueError):
                return []
    return []


def load_weights(transformer, source: str, key: str = "model.weights", _depth: int = 0) -> str:
    """Load the trained weights named by the recipe key `key` (`model.weights`, or `init` of
    `psr rl`) into `transformer`, before any adapter is added; returns what was done, for
    the log (module docstring: merged, replaced, or kept as frozen modules)."""
    kind = weights_kind(source, key)
    path, where = Path(source).expanduser(), f"{key} {source}"
    notes = []
    for below in frozen_below(source) if kind != "full weights" else []:
        if _depth >= MAX_CHAIN:
            raise UserError(f"{where}: more than {MAX_CHAIN} runs on top of each other in frozen_below (a loop?)")
        notes.append(load_weights(transformer, below, f"{where}: trained on top of", _depth + 1))
    if kind == "full weights":
        tensors = {}
        for file in sorted((path / "transformer").glob("*.safetensors")):
            tensors.update(load_tensors(file))
        notes.append(_full_weights(transformer, tensors, where))
    elif kind == "moe file":
        notes.append(_moe_file(transformer, path if path.is_file() else path / MOE_FILE, where))
    elif kind == "lora file":
        notes.append(_lora_file(transformer, path if path.is_file() else path / LORA_FILE, where))
    else:
        notes.append(_from_checkpoint(transformer, path, where))
    if not getattr(transformer, "peft_config", True):
        del transformer.peft_config  # merged away: the run's own adapter is the only one
    return "; then ".join(notes)


def trained_reference_mode(source: str | None) -> str | None:
    """The `model.reference_mode` that weights were trained in, where a psr run says so: a
    checkpoint's recipe, or the card beside a run's export (`psr_model.json`, `psr_lora.json`;
    cards and recipes written before the key existed mean "joint"). None for anything else
    (a hub id, a folder without a card, a LoRA file from elsewhere)."""
    kind, info, _ = run_record(source)
    if kind == "checkpoint" or (kind == "card" and info.get("trained")):
        return info.get("reference_mode", "joint")
    return None


def load_model_components(config: ModelConfig) -> FluxComponents:
    """The preset's components, with `model.weights` (trained weights) loaded into the
    transformer when the recipe names them."""
    if not config.weights:
        return PRESETS[config.preset].load(config)
    weights_kind(config.weights)  # a wrong path fails before the model loads
    components = PRESETS[config.preset].load(config)
    load_weights(components.transformer, config.weights)
    return components
