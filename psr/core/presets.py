"""The preset table: named ways to obtain FLUX components, with their sampling defaults.

Importing this module is cheap: each loader imports torch and diffusers when it runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from psr.core.components import load_components
from psr.core.recipe import read_toml
from psr.core.registry import Registry
from psr.core.tiny import build_tiny_components
from psr.errors import UserError

if TYPE_CHECKING:
    from psr.core.components import FluxComponents
    from psr.core.schema import ModelConfig

EMBEDDED_DIR = Path(__file__).resolve().parent.parent / "assets" / "embedded"


@dataclass(frozen=True)
class Preset:
    description: str
    load: Callable[["ModelConfig"], "FluxComponents"]
    dtype: str
    size: int
    """Default target side in pixels."""
    reference_size: int
    """Default longer side of a reference in pixels."""
    max_sequence_length: int
    steps: int
    guidance: float
    token_stride: int
    """Pixels per token side (VAE factor x 2): sizes are checked against it before loading."""
    default_path: str | None = None
    guidance_embeds: bool = True
    """Whether the preset's transformer has a guidance embedding; without one, `guidance` is a
    classifier-free guidance scale, which RL rollouts do not apply (their default is then 1)."""
    needs_path: bool = False
    """Whether the preset loads a model folder or hub id (`model.path`, else `default_path`)."""
    reference_resize: str = "longest"
    """Default rule that brings a reference to the grid (`psr.core.images.RESIZE_RULES`):
    "kontext" where the checkpoint was trained on Kontext's resolutions."""
    image_guidance: float = 1.0
    """Default classifier-free guidance scale over the references (1 is off): the value measured
    best for the preset's shipped weights, where it has some."""


def _load_pretrained(config: "ModelConfig") -> "FluxComponents":
    if not config.path:
        raise UserError(
            f"model.path: preset {config.preset!r} needs a local directory or a hub id "
            "(e.g. black-forest-labs/FLUX.1-dev); nothing is downloaded unless you name one"
        )
    return load_components(config.path, dtype=config.dtype)


def _load_tiny(config: "ModelConfig") -> "FluxComponents":
    return build_tiny_components(seed=config.init_seed, dtype=config.dtype)


PRESETS: Registry[Preset] = Registry("preset", {
    "embedded": Preset(
        description="the embedded architecture trained on ToyWorld, weights shipped in the package (CPU-friendly)",
        load=_load_pretrained, needs_path=True, dtype="float32", size=64, reference_size=32,
        max_sequence_length=64, steps=8, guidance=3.0, token_stride=8, default_path=str(EMBEDDED_DIR),
        guidance_embeds=False, image_guidance=4.0,  # docs/embedded.md: the guidance sweep
    ),
    "tiny": Preset(
        description="the tiny architecture, random-init from configs (tests, benchmarks)",
        load=_load_tiny, dtype="float32", size=64, reference_size=64,
        max_sequence_length=64, steps=8, guidance=3.5, token_stride=8,
    ),
    "flux-dev": Preset(
        description="FLUX.1-dev layout from model.path (hub id or local directory)",
        load=_load_pretrained, needs_path=True, dtype="bfloat16", size=1024, reference_size=512,
        max_sequence_length=512, steps=28, guidance=3.5, token_stride=16,
    ),
    "flux-kontext": Preset(
        description="FLUX.1 Kontext layout from model.path; frame position ids work unchanged, references sized as "
                    "FluxKontextPipeline sizes its input",
        load=_load_pretrained, needs_path=True, dtype="bfloat16", size=1024, reference_size=512,
        max_sequence_length=512, steps=28, guidance=2.5, token_stride=16, reference_resize="kontext",
    ),
})


STATE = "state.json"
"""The file that makes a folder a psr checkpoint (with its `recipe.toml`)."""
CARDS = ("psr_model.json", "psr_lora.json")
"""What psr writes beside exported weights: a model folder's card, a LoRA file's card."""


def _read_card(card: Path) -> dict:
    try:
        info = json.loads(card.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{card}: not a readable model card ({err})") from None
    if not isinstance(info, dict):
        raise UserError(f"{card}: a model card must be a JSON object")
    return info


def model_card(model_path: str | None) -> dict:
    """The `psr_model.json` card of a local model folder; {} for a hub id or a folder without one."""
    card = Path(model_path).expanduser() / CARDS[0] if model_path else None
    return _read_card(card) if card is not None and card.is_file() else {}


def run_record(source: str | None) -> tuple[str, dict, Path | None]:
    """What a psr run wrote about the weights at `source` (a file, or its folder): ("checkpoint",
    the `[model]` table of the checkpoint's recipe, its path), ("card", the card, its path),
    or ("", {}, None) for a hub id or a folder that no psr run wrote."""
    if not source:
        return "", {}, None
    folder = Path(source).expanduser()
    folder = folder.parent if folder.is_file() else folder
    if (folder / STATE).is_file() and (folder / "recipe.toml").is_file():
        return "checkpoint", read_toml(folder / "recipe.toml").get("model", {}), folder / "recipe.toml"
    for name in CARDS:
        if (folder / name).is_file():
            return "card", _read_card(folder / name), folder / name
    return "", {}, None


def embedded_model_note(model_path: str) -> str | None:
    """The shipped model card's warning, if the embedded weights are not trained."""
    card = Path(model_path) / "psr_model.json"
    if not card.is_file():
        return None
    info = json.loads(card.read_text())
    return None if info.get("trained") else info.get("note", "the embedded model is untrained (random init)")
