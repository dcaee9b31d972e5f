"""Stages run by the FLUX core: text-to-image target, Kontext personalization and editing."""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

from psr.core.model import MultiRefFlux
from psr.core.presets import PRESETS
from psr.core.recipe import _suggest
from psr.core.schema import ModelConfig, resolve_model
from psr.errors import UserError

if TYPE_CHECKING:
    from PIL import Image


from psr.synth.stages.prompts import SCENES, PromptPlan

PERSONALIZE_TEMPLATE = "the {category} {scene}"
"""Kontext instruction for re-rendering one cropped subject as its reference."""

EDIT_TEMPLATES: dict[str, tuple[tuple[str, str], ...]] = {
    # kind → (instruction, rewrite) pairs. background: {place} is a SCENES noun and the
    # rewrite replaces the prompt's scene; attribute/action: {category} is one subject
    # and the rewrite becomes that subject's trailing detail in the prompt.
    "background": (("change the background to {place}", "{scene}"),),
    "attribute": (
        ("put a red hat on the {category}", "wearing a red hat"),
        ("give the {category} a blue scarf", "wearing a blue scarf"),
        ("put sunglasses on the {category}", "wearing sunglasses"),
        ("put a yellow bow on the {category}", "with a yellow bow"),
    ),
    "action": (
        ("make the {category} jump", "jumping"),
        ("make the {category} lie down", "lying down"),
        ("make the {category} sit", "sitting"),
        ("make the {category} turn to the left", "turned to the left"),
    ),
}

# ---------------------------------------------------------------------------- FLUX stages
def load_flux(device, *, preset: str, path: str | None = None, dtype: str | None = None, init_seed: int = 0,
              cpu_offload: bool = False, attention_backend: str | None = None,
              reference_size: int | None = None, max_sequence_length: int | None = None,
              reference_resize: str | None = None):
    """(MultiRefFlux, Preset) from ModelConfig-like options; None takes the preset's value."""
    if preset not in PRESETS:
        raise UserError(f"preset {preset!r}: unknown{_suggest(preset, PRESETS)}; choose one of {', '.join(PRESETS)}")
    config = resolve_model(ModelConfig(
        preset=preset, path=path, dtype=dtype, device=str(device), cpu_offload=cpu_offload,
        attention_backend=attention_backend, reference_size=reference_size, reference_resize=reference_resize,
        max_sequence_length=max_sequence_length, init_seed=init_seed))
    return MultiRefFlux.from_config(config), PRESETS[preset]


def _flux_model(device, model, preset, **load_options):
    """A shared model as given, else one loaded from the options; plus the preset's defaults."""
    if model is not None:
        if preset not in PRESETS:
            raise UserError(f"preset {preset!r}: unknown; choose one of {', '.join(PRESETS)}")
        return model, PRESETS[preset]
    return load_flux(device, preset=preset, **load_options)


class FluxTarget:
    """Text-to-image with `MultiRefFlux` and no references."""

    name = "flux"

    def __init__(self, model, *, height: int, width: int, steps: int, guidance: float):
        model.check_size(height, width)
        self.model = model
        self.height, self.width, self.steps, self.guidance = height, width, steps, guidance

    def __call__(self, prompt: str, seed: int) -> "Image.Image":
        return self.model.generate(prompt, [], height=self.height, width=self.width, steps=self.steps,
                                   guidance=self.guidance, seeds=[seed])[0]


def _flux_target(device="cpu", *, preset: str = "flux-dev", path: str | None = None, dtype: str | None = None,
                 init_seed: int = 0, cpu_offload: bool = False, attention_backend: str | None = None,
                 reference_size: int | None = None, max_sequence_length: int | None = None,
                 reference_resize: str | None = None, height: int | None = None, width: int | None = None,
                 steps: int | None = None, guidance: float | None = None, model=None) -> FluxTarget:
    """`model`: an already built MultiRefFlux to use instead of loading one (shared between stages)."""
    model, p = _flux_model(device, model, preset, path=path, dtype=dtype, init_seed=init_seed,
                           cpu_offload=cpu_offload, attention_backend=attention_backend,
                           reference_size=reference_size, max_sequence_length=max_sequence_length,
                           reference_resize=reference_resize)
    return FluxTarget(model, height=height or p.size, width=width or p.size, steps=steps or p.steps,
                      guidance=p.guidance if guidance is None else guidance)


class KontextPersonalize:
    """Re-render one cropped subject alone in a new scene: `MultiRefFlux` with the crop as
    its single reference and PERSONALIZE_TEMPLATE as the instruction."""

    name = "kontext"

    def __init__(self, model, *, size: int, steps: int, guidance: float, template: str = PERSONALIZE_TEMPLATE):
        model.check_size(size, size)
        self.model = model
        self.size, self.steps, self.guidance, self.template = size, steps, guidance, template

    def __call__(self, crop: "Image.Image", category: str, avoid_scene: str, seed: int) -> tuple["Image.Image", str]:
        """(reference image [size x size], the instruction used). The scene differs from
        `avoid_scene` so the reference does not copy the target's background."""
        rng = random.Random(seed)
        scene = rng.choice([s for s in sorted(SCENES.values()) if s != avoid_scene])
        prompt = self.template.format(category=category, scene=scene)
        image = self.model.generate(prompt, [crop], height=self.size, width=self.size, steps=self.steps,
                                    guidance=self.guidance, seeds=[seed])[0]
        return image, prompt


def _kontext_personalize(device="cpu", *, preset: str = "flux-kontext", path: str | None = None,
                         dtype: str | None = None, init_seed: int = 0, cpu_offload: bool = False,
                         attention_backend: str | None = None, reference_size: int | None = None,
                         max_sequence_length: int | None = None, reference_resize: str | None = None,
                         size: int | None = None,
                         steps: int | None = None, guidance: float | None = None,
                         template: str = PERSONALIZE_TEMPLATE, model=None) -> KontextPersonalize:
    """`size`: side of the square reference in pixels (default: the preset's reference size)."""
    model, p = _flux_model(device, model, preset, path=path, dtype=dtype, init_seed=init_seed,
                           cpu_offload=cpu_offload, attention_backend=attention_backend,
                           reference_size=reference_size, max_sequence_length=max_sequence_length,
                           reference_resize=reference_resize)
    return KontextPersonalize(model, size=size or p.reference_size, steps=steps or p.steps,
                              guidance=p.guidance if guidance is None else guidance, template=template)


@dataclass
class EditResult:
    image: "Image.Image"
    plan: PromptPlan
    """The plan rewritten to match the edit (`plan.text` re-rendered from its template)."""
    kind: str
    instruction: str


class KontextEdit:
    """PSR's second stage: edit the target with an instruction from EDIT_TEMPLATES
    (`MultiRefFlux`, the target as the single reference) and rewrite the prompt to match.

    The rewritten prompt is always the plan's template re-rendered with the edited parts,
    so an LLM-written instruction becomes a template one after an edit.
    """

    name = "kontext-edit"

    def __init__(self, model, *, kinds: Sequence[str], rate: float, steps: int, guidance: float):
        self.model = model
        self.kinds = tuple(kinds)
        self.rate, self.steps, self.guidance = rate, steps, guidance

    def choose(self, plan: PromptPlan, seed: int) -> tuple[str, str, PromptPlan] | None:
        """(kind, instruction, rewritten plan) drawn from `random.Random(seed)`, or None
        when this sample is not edited (probability 1 - rate)."""
        rng = random.Random(seed)
        if rng.random() >= self.rate:
            return None
        kind = rng.choice(self.kinds)
        instruction, rewrite = rng.choice(EDIT_TEMPLATES[kind])
        if kind == "background":
            place = rng.choice([p for p in sorted(SCENES) if SCENES[p] != plan.scene])
            new = replace(plan, scene=SCENES[place], details=list(plan.details))
            instruction = instruction.format(place=place)
        else:
            i = rng.randrange(len(plan.categories))
            details = list(plan.details)
            details[i] = rewrite
            new = replace(plan, details=details)
            instruction = instruction.format(category=plan.categories[i])
        new.text = new.render()
        return kind, instruction, new

    def __call__(self, target: "Image.Image", plan: PromptPlan, seed: int) -> EditResult | None:
        choice = self.choose(plan, seed)
        if choice is None:
            return None
        kind, instruction, new = choice
        image = self.model.generate(instruction, [target], height=target.height, width=target.width,
                                    steps=self.steps, guidance=self.guidance, seeds=[seed])[0]
        return EditResult(image=image, plan=new, kind=kind, instruction=instruction)


def _kontext_edit(device="cpu", *, preset: str = "flux-kontext", path: str | None = None,
                  dtype: str | None = None, init_seed: int = 0, cpu_offload: bool = False,
                  attention_backend: str | None = None, reference_size: int | None = None,
                  max_sequence_length: int | None = None, reference_resize: str | None = None,
                  kinds: Sequence[str] = tuple(EDIT_TEMPLATES),
                  rate: float = 1.0, steps: int | None = None, guidance: float | None = None,
                  model=None) -> KontextEdit:
    """`kinds`: which EDIT_TEMPLATES kinds to draw from; `rate`: share of samples edited."""
    unknown = [k for k in kinds if k not in EDIT_TEMPLATES]
    if unknown or not kinds:
        raise UserError(f"edit.kinds {list(kinds)}: choose from {', '.join(EDIT_TEMPLATES)}")
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"edit.rate {rate}: must be in [0, 1]")
    model, p = _flux_model(device, model, preset, path=path, dtype=dtype, init_seed=init_seed,
                           cpu_offload=cpu_offload, attention_backend=attention_backend,
                           reference_size=reference_size, max_sequence_length=max_sequence_length,
                           reference_resize=reference_resize)
    return KontextEdit(model, kinds=kinds, rate=rate, steps=steps or p.steps,
                       guidance=p.guidance if guidance is None else guidance)
