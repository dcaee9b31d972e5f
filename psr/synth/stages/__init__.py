"""PSR's multi-subject data synthesis as plugin stages, one registry table `SYNTH_STAGES`.

PSR's pipeline: an instruction naming N categories → a text-to-image target → each
subject localized and cropped → each crop re-rendered alone in a new scene by a
single-subject personalization model (FLUX.1 Kontext), which becomes that subject's
reference → a filter keeps the sample only if every reference still looks like its
target crop and the references are distinct. psr adds a correspondence matcher (MOSAIC's
alignment loss needs reference↔target token pairs) and PSR's optional second stage, an
instruction edit of the target (background / attribute / action) with the prompt
rewritten to match.

Stage kinds and the call each stage object answers (`psr.synth.pipeline` chains them):

    prompt       (categories, seed)                      -> PromptPlan
    target       (prompt, seed)                          -> PIL image
    detector     (image, categories)                     -> [Detection | None] per category
    personalize  (crop, category, avoid_scene, seed)     -> (PIL image, prompt)
    filter       (references, crops, labels)             -> FilterVerdict
    matcher      (reference, target, ref_mask, tgt_mask, token_stride) -> [(ref_token, tgt_token)]
    edit         (target, plan, seed)                    -> EditResult | None

Every factory takes `device` and its options. The table names each factory by path, so
importing this package (recipe validation) loads no model library; a stage's module, and
torch, transformers or diffusers, load when a recipe names that stage.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

from psr.core.recipe import _suggest
from psr.core.registry import Registry
from psr.errors import UserError

# ---------------------------------------------------------------------------- registry
# Real models first; `toyworld` entries run the same pipeline offline (psr.synth.stages.toy).
SYNTH_STAGES: dict[str, Registry[Callable[..., Any]]] = {
    "prompt": Registry("prompt stage", {"template": "psr.synth.stages.prompts:_template_prompt",
                                        "llm": "psr.synth.stages.prompts:_llm_prompt",
                                        "toyworld": "psr.synth.stages.toy:_toy_prompt"}),
    "target": Registry("target stage", {"flux": "psr.synth.stages.flux:_flux_target",
                                        "toyworld": "psr.synth.stages.toy:_toy_target"}),
    "detector": Registry("detector stage", {"grounding-dino": "psr.synth.stages.detectors:_grounding_dino_detector",
                                            "toyworld": "psr.synth.stages.toy:_toy_detector"}),
    "personalize": Registry("personalize stage", {"kontext": "psr.synth.stages.flux:_kontext_personalize",
                                                  "toyworld": "psr.synth.stages.toy:_toy_personalize"}),
    "filter": Registry("filter stage", {"feature-cosine": "psr.synth.stages.filters:_feature_cosine"}),
    "matcher": Registry("matcher stage", {"dinov2-mnn": "psr.synth.stages.matchers:_dinov2_mnn",
                                          "toyworld": "psr.synth.stages.toy:_toy_matcher"}),
    "edit": Registry("edit stage", {"kontext-edit": "psr.synth.stages.flux:_kontext_edit",
                                    "toyworld": "psr.synth.stages.toy:_toy_edit"}),
}


def check_stage_options(kind: str, name: str, options: dict[str, Any]) -> None:
    """Raise a one-line UserError for an unknown kind, name or option, naming the nearest
    valid one, without building anything (the factory's signature is the option list)."""
    if kind not in SYNTH_STAGES:
        raise UserError(f"pipeline.{kind}: unknown stage kind{_suggest(kind, SYNTH_STAGES)}; "
                        f"choose from {', '.join(SYNTH_STAGES)}")
    if name not in SYNTH_STAGES[kind]:
        raise UserError(f"pipeline.{kind}.name: unknown {kind} stage {name!r}"
                        f"{_suggest(str(name), SYNTH_STAGES[kind])}; choose from {', '.join(SYNTH_STAGES[kind])}")
    params = inspect.signature(SYNTH_STAGES[kind][name]).parameters
    valid = [n for n, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]
    for key in options:
        if key not in valid:
            raise UserError(f"pipeline.{kind}.{key}: unknown option for {kind} stage {name!r}"
                            f"{_suggest(key, valid)}; valid: {', '.join(valid) or '(none)'}")


def build_stage(kind: str, device, options: dict[str, Any]):
    """`SYNTH_STAGES[kind][options['name']](device, **other options)` after checking them."""
    options = dict(options)
    name = options.pop("name", None)
    if name is None:
        raise UserError(f"pipeline.{kind}.name: missing; choose from {', '.join(SYNTH_STAGES.get(kind, {}))}")
    check_stage_options(kind, name, options)
    return SYNTH_STAGES[kind][name](device, **options)
