"""Adapters on the transformer, and what a run leaves behind.

Final export (`out/final/`, written into `out/.tmp-final` and renamed):
- full fine-tune (adapter.kind = "none"): a complete diffusers FLUX folder
  (`save_components`) that the `embedded` preset (`model.path = out/final`) and
  `FluxPipeline.from_pretrained` load, plus `psr_model.json` (trained = true, step);
- LoRA: `pytorch_lora_weights.safetensors` (alpha/rank folded into lora_B, so diffusers'
  and peft's loaders all read it at the trained strength; see `psr.core.lora`);
- MoE-LoRA: `moe_lora.safetensors` (`psr.core.lora.load_moe_lora`; routed experts have
  no diffusers format and cannot be merged).
The EMA weights are exported when EMA is on.

`export_checkpoint` does the same from a checkpoint folder, and with `merge` folds a LoRA
into the base weights and writes a complete model folder.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from psr.core.adapters import LORA_FILE, MOE_FILE, apply_adapter, load_trainable
from psr.core.components import save_components, torch_dtype
from psr.core.io import write_json_atomic
from psr.core.lora import merge_lora, save_lora, save_moe_lora
from psr.core.recipe import load_recipe
from psr.core.weights import load_model_components
from psr.errors import UserError
from psr.train.checkpoint import STATE, load_tensors, read_state
from psr.train.config import PretrainRecipe, resolve_pretrain

# Facts about the architecture that a base folder's card states and a fine-tune keeps.
INHERITED_CARD_KEYS = ("architecture", "sizes", "parameters", "reference_layout")


def _model_card(step: int, recipe_hash: str, ema: bool, kind: str, base_path: str | None,
                started_from: str | None = None, reference_mode: str = "joint",
                frozen_below: list[str] | None = None, position_scheme: str = "frame") -> dict:
    what = {"none": "full fine-tune", "lora": "LoRA", "moe_lora": "MoE-LoRA"}[kind]
    card = {"trained": True, "note": f"psr pretrain ({what}), step {step}", "step": step,
            "recipe_hash": recipe_hash, "ema": ema}
    if reference_mode != "joint":  # a reader of the weights should run them as they were trained
        card["reference_mode"] = reference_mode
    if position_scheme != "frame":  # `model.position_scheme` left out takes it from here
        card["position_scheme"] = position_scheme
    if started_from:  # `step` counts this run only; the weights it started from come first
        card["started_from"] = started_from
        card["note"] += f" of a run started from {started_from}"
    if frozen_below:  # loading this export loads them first (psr.core.weights)
        card["frozen_below"] = list(frozen_below)
    base = Path(base_path) / "psr_model.json" if base_path else None
    if base is not None and base.is_file():
        import json

        inherited = json.loads(base.read_text())
        card.update({k: inherited[k] for k in INHERITED_CARD_KEYS if k in inherited})
    return card


def write_export(components, kind: str, folder: Path, card: dict, merge: bool = False,
                 dtype: str | None = None) -> Path:
    """Write `folder` atomically from components whose transformer holds the final weights
    (a model folder is cast to `dtype` after any merge, when one is given)."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".tmp-{folder.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        transformer = components.transformer
        if kind != "none" and merge:
            merge_lora(transformer)
        if kind == "none" or merge:
            if dtype is not None:
                for module in (transformer, components.vae, components.text_encoder, components.text_encoder_2):
                    module.to(torch_dtype(dtype))
            save_components(components, tmp)
            write_json_atomic(tmp / "psr_model.json", card)
        elif kind == "lora":
            save_lora(transformer, tmp / LORA_FILE)
            write_json_atomic(tmp / "psr_lora.json", card)
        else:
            save_moe_lora(transformer, tmp / MOE_FILE)
            write_json_atomic(tmp / "psr_lora.json", card)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def export_final(model, recipe, named, ema, folder: Path, step: int, recipe_hash: str,
                 frozen_below: list[str] | None = None) -> Path:
    """The end-of-run export from the live model (EMA weights swapped in when on)."""
    import contextlib

    card = _model_card(step, recipe_hash, ema is not None, recipe.adapter.kind, recipe.model.path,
                       recipe.model.weights, recipe.model.reference_mode, frozen_below,
                       recipe.model.position_scheme or "frame")
    with ema.applied() if ema is not None else contextlib.nullcontext():
        if recipe.adapter.kind == "none":
            # Saved in the model's dtype, like the checkpoint it came from.

            saved_dtype, wanted = model.transformer.dtype, torch_dtype(recipe.model.dtype)
            if wanted == saved_dtype:
                return write_export(model.components, "none", folder, card)
            model.transformer.to(wanted)
            try:
                return write_export(model.components, "none", folder, card)
            finally:
                model.transformer.to(saved_dtype)
        return write_export(model.components, recipe.adapter.kind, folder, card)


WEIGHT_DTYPES = ("float32", "float16", "bfloat16")


def export_checkpoint(checkpoint: str, out: str, merge: bool = False, use_ema: bool = True,
                      dtype: str | None = None) -> Path:
    """Rebuild the model of a checkpoint folder and write an export to `out` (see module).

    `dtype` casts every component of a model-folder export (full fine-tune, or `merge`) to
    that weight dtype, e.g. float16 halves a folder that ships inside a package; None keeps
    the recipe's `model.dtype`. Loading upcasts again to the loader's dtype.
    """
    import dataclasses

    if dtype is not None and dtype not in WEIGHT_DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(WEIGHT_DTYPES)}")
    folder = Path(checkpoint)
    if not (folder / STATE).is_file() or not (folder / "trainable.safetensors").is_file():
        raise UserError(f"--export {checkpoint}: not a checkpoint folder (expected state.json and "
                        "trainable.safetensors, e.g. OUT/checkpoints/step_001000)")
    recipe = resolve_pretrain(load_recipe(PretrainRecipe, str(folder / "recipe.toml")))
    kind = recipe.adapter.kind
    if merge and kind == "none":
        merge = False  # a full fine-tune is already a model folder
    if dtype is not None and kind != "none" and not merge:
        raise UserError("--dtype: applies to a model folder (a full fine-tune, or a LoRA with --merge)")
    state = read_state(folder)
    weights = "ema.safetensors" if use_ema and (folder / "ema.safetensors").is_file() else "trainable.safetensors"
    config = dataclasses.replace(recipe.model, device="cpu")
    components = load_model_components(config)  # the base the run trained on
    named = apply_adapter(components.transformer, recipe.adapter)
    load_trainable(named, load_tensors(folder / weights), str(folder))

    if components.transformer.dtype != torch_dtype(recipe.model.dtype):
        components.transformer.to(torch_dtype(recipe.model.dtype))
    card = _model_card(state["step"], state.get("recipe_hash", ""), weights.startswith("ema"), kind,
                       recipe.model.path, recipe.model.weights, recipe.model.reference_mode,
                       state.get("frozen_below"), recipe.model.position_scheme or "frame")
    card["merged"] = bool(merge)
    if dtype is not None:
        card["dtype"] = dtype
    return write_export(components, kind, Path(out), card, merge=merge, dtype=dtype)
