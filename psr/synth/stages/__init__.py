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

Every factory takes `device` and its options and imports torch, transformers and
diffusers only when it runs, so importing this module (recipe validation) is cheap.
"""

from __future__ import annotations

from typing import Any, Callable

from psr.errors import UserError
from psr.synth.stages.common import derive_seed
from psr.synth.stages.detectors import GroundingDinoDetector, _grounding_dino_detector
from psr.synth.stages.filters import FeatureCosineFilter, FilterVerdict, _feature_cosine, cosine_verdict
from psr.synth.stages.flux import (EDIT_TEMPLATES, PERSONALIZE_TEMPLATE, EditResult, FluxTarget, KontextEdit,
                                   KontextPersonalize, _flux_target, _kontext_edit, _kontext_personalize, load_flux)
from psr.synth.stages.matchers import (MnnMatcher, _dinov2_mnn, agree, mnn_token_pairs, mutual_nearest_neighbours,
                                       patch_tokens)
from psr.synth.stages.toy import (ToyDetector, ToyEdit, ToyMatcher, ToyPersonalize, ToyPrompt, ToyPromptPlan,
                                  ToyTarget, _toy_detector, _toy_edit, _toy_matcher, _toy_personalize, _toy_prompt,
                                  _toy_target, parse_prompt)
from psr.synth.stages.prompts import (PROMPT_TEMPLATES, RELATIONS, SCENES, LlmPrompt, PromptPlan, TemplatePrompt,
                                      _llm_prompt, _template_prompt, mentions, sanitize_llm_text, template_plan)

# ---------------------------------------------------------------------------- registry
SYNTH_STAGES: dict[str, dict[str, Callable[..., Any]]] = {
    # Real models first; `toyworld` entries run the same pipeline offline (psr.synth.stages.toy).
    "prompt": {"template": _template_prompt, "llm": _llm_prompt, "toyworld": _toy_prompt},
    "target": {"flux": _flux_target, "toyworld": _toy_target},
    "detector": {"grounding-dino": _grounding_dino_detector, "toyworld": _toy_detector},
    "personalize": {"kontext": _kontext_personalize, "toyworld": _toy_personalize},
    "filter": {"feature-cosine": _feature_cosine},
    "matcher": {"dinov2-mnn": _dinov2_mnn, "toyworld": _toy_matcher},
    "edit": {"kontext-edit": _kontext_edit, "toyworld": _toy_edit},
}


def check_stage_options(kind: str, name: str, options: dict[str, Any]) -> None:
    """Raise a one-line UserError for an unknown kind, name or option, naming the nearest
    valid one, without building anything (the factory's signature is the option list)."""
    import inspect

    from psr.core.recipe import _suggest

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
