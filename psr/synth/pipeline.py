"""PSR's staged synthesis pipeline: chosen stages in, `SynthSample` or `Rejection` out.

The spec is a plain dict, stage kind → {"name": registered name, **options}:

    {"prompt": {"name": "template"},
     "target": {"name": "flux", "preset": "flux-dev", "path": "..."},
     "detector": {"name": "grounding-dino", "path": "IDEA-Research/grounding-dino-base"},
     "personalize": {"name": "kontext", "preset": "flux-kontext", "path": "..."},
     "filter": {"name": "feature-cosine", "extractor": {"name": "dino", "path": "facebook/dino-vits16"}},
     "matcher": {"name": "dinov2-mnn", "extractor": {"name": "dinov2", "path": "facebook/dinov2-small"},
                 "agreement": "filter"},
     "edit": {"name": "kontext-edit", "model": "personalize"}}

prompt, target, detector and personalize are required; filter, matcher and edit are
optional. Sharing: an option `model`, `extractor`, `agreement` or `localizer` given as a
string names an earlier stage kind whose model / feature extractor / localizer is reused
(`"model": "personalize"` loads Kontext once for personalize and edit).

Order of one run: prompt → target → detect & crop → personalize each crop → filter →
[edit → detect & crop again → filter again] → matcher. The edit comes before the
matcher (not last) so boxes, masks and correspondences describe the target that is
written. Every random choice is drawn from a seed derived from (seed, step), so a run
is a pure function of (spec, categories, seed).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Sequence

from psr.core.components import resolve_device
from psr.core.detect import box_mask
from psr.core.recipe import _suggest
from psr.errors import UserError
from psr.synth.sample import Rejection, SynthSample, SynthSubject
from psr.synth.stages import SYNTH_STAGES, build_stage
from psr.synth.stages.common import derive_seed

ORDER = ("prompt", "target", "detector", "personalize", "filter", "matcher", "edit")
REQUIRED = ("prompt", "target", "detector", "personalize")
# option → the attribute of an earlier stage it may borrow by naming that stage's kind
SHARED_OPTIONS = {"model": "model", "extractor": "extractor", "agreement": "extractor", "localizer": "localizer"}


def category_pairs(categories: Sequence[str], k: int, seed: int) -> list[str]:
    """k distinct categories (in drawn order) for one sample, drawn with `seed`."""
    pool = list(dict.fromkeys(categories))
    if k < 1:
        raise UserError(f"subjects per sample {k}: must be >= 1")
    if k > len(pool):
        raise UserError(f"subjects per sample {k}: only {len(pool)} distinct categories given")
    import random

    return random.Random(derive_seed(seed, "categories")).sample(pool, k)


def _jsonable(value: Any) -> Any:
    """Options as provenance: plain values kept, built objects named by their class."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return f"<{type(value).__name__}>"


class SynthPipeline:
    """Build every chosen stage once; `run` draws one sample.

    `counts` tallies what happened over all runs: candidates, kept, rejected,
    rejected:<stage>, prompt_fallback (the LLM's text was replaced by the template), edited.
    """

    def __init__(self, spec: dict[str, dict[str, Any]], device="auto", token_stride: int = 8):
        unknown = [k for k in spec if k not in SYNTH_STAGES]
        if unknown:
            raise UserError(f"pipeline.{unknown[0]}: unknown stage kind{_suggest(unknown[0], SYNTH_STAGES)}; "
                            f"choose from {', '.join(SYNTH_STAGES)}")
        missing = [k for k in REQUIRED if k not in spec]
        if missing:
            raise UserError(f"pipeline: missing stage(s) {', '.join(missing)} "
                            f"(required: {', '.join(REQUIRED)}; optional: filter, matcher, edit)")
        if token_stride < 1:
            raise UserError(f"token_stride {token_stride}: must be >= 1")
        self.device = resolve_device(device) if isinstance(device, str) else device
        self.token_stride = token_stride
        self.spec = {kind: _jsonable(dict(spec[kind])) for kind in ORDER if kind in spec}
        self.stages: dict[str, Any] = {}
        for kind in ORDER:
            if kind in spec:
                self.stages[kind] = build_stage(kind, self.device, self._share(kind, dict(spec[kind])))
        self.counts: Counter[str] = Counter()

    def _share(self, kind: str, options: dict[str, Any]) -> dict[str, Any]:
        for key, attribute in SHARED_OPTIONS.items():
            source = options.get(key)
            if not isinstance(source, str):
                continue
            stage = self.stages.get(source)
            if stage is None or not hasattr(stage, attribute):
                built = [k for k, s in self.stages.items() if hasattr(s, attribute)]
                raise UserError(f"pipeline.{kind}.{key} = {source!r}: names no earlier stage with a {attribute} "
                                f"(stages built before {kind}: {', '.join(built) or 'none'})")
            options[key] = getattr(stage, attribute)
        return options

    @property
    def stage_names(self) -> dict[str, str]:
        return {kind: self.spec[kind].get("name") for kind in self.spec}

    # ------------------------------------------------------------------ one sample
    def _reject(self, stage: str, reason: str, provenance: dict) -> Rejection:
        self.counts["rejected"] += 1
        self.counts[f"rejected:{stage}"] += 1
        provenance["rejected_at"] = stage
        return Rejection(reason=reason, provenance=provenance)

    def _locate(self, target, categories):
        """(detections, crops), or the first category not found."""
        detector = self.stages["detector"]
        found = detector(target, categories)
        for category, det in zip(categories, found):
            if det is None:
                return None, category
        return (found, [detector.crop(target, d.box) for d in found]), None

    def run(self, sample_index: int, categories: Sequence[str], seed: int) -> SynthSample | Rejection:
        categories = list(categories)
        if not categories:
            raise UserError("pipeline: a sample needs at least one category")
        st = self.stages
        self.counts["candidates"] += 1
        provenance: dict[str, Any] = {"generator": "pipeline", "index": int(sample_index), "seed": int(seed),
                                      "categories": categories, "stages": self.stage_names, "options": self.spec}

        plan = st["prompt"](categories, derive_seed(seed, "prompt"))
        provenance["prompt_source"] = plan.source
        if plan.source == "llm-fallback":
            self.counts["prompt_fallback"] += 1
        target = st["target"](plan.text, derive_seed(seed, "target"))

        located, lost = self._locate(target, categories)
        if located is None:
            return self._reject("detector", f"detector: no {lost!r} found in the target", provenance)
        detections, crops = located

        references, reference_prompts = [], []
        for i, (crop, category) in enumerate(zip(crops, categories)):
            image, prompt = st["personalize"](crop, category, plan.scene, derive_seed(seed, "personalize", i))
            references.append(image)
            reference_prompts.append(prompt)

        verdict = None
        if "filter" in st:
            verdict = st["filter"](references, crops, labels=categories)
            if not verdict.keep:
                return self._reject("filter", verdict.reason, provenance)

        edit_info, original_prompt = None, plan.text
        if "edit" in st:
            edited = st["edit"](target, plan, derive_seed(seed, "edit"))
            if edited is not None:
                self.counts["edited"] += 1
                target, plan = edited.image, edited.plan
                edit_info = {"kind": edited.kind, "instruction": edited.instruction}
                provenance["edit"] = edit_info
                located, lost = self._locate(target, categories)
                if located is None:
                    return self._reject("edit", f"detector after edit: no {lost!r} found in the edited target",
                                        provenance)
                detections, crops = located
                if "filter" in st:
                    verdict = st["filter"](references, crops, labels=categories)
                    if not verdict.keep:
                        return self._reject("edit", f"after edit: {verdict.reason}", provenance)

        subjects = []
        height, width = target.height, target.width
        for i, (det, reference, category) in enumerate(zip(detections, references, categories)):
            mask = box_mask(det.box, height, width)
            extra: dict[str, Any] = {"detection_score": det.score, "reference_prompt": reference_prompts[i]}
            if verdict is not None:
                extra["filter_cosine"] = verdict.similarity[i]
            pairs: list[tuple[int, int]] = []
            if "matcher" in st:
                # The reference shows the subject in a new scene: match only where it is.
                ref_det = st["detector"](reference, [category])[0]
                ref_mask = box_mask(ref_det.box, reference.height, reference.width) if ref_det else None
                extra["reference_box"] = list(ref_det.box) if ref_det else None
                pairs = st["matcher"](reference, target, ref_mask, mask, self.token_stride)
            subjects.append(SynthSubject(
                name=plan.subject_name(i), category=category, box=tuple(float(v) for v in det.box), mask=mask,
                reference=reference, identity=None, correspondence=pairs, extra=extra))
        self.counts["kept"] += 1
        return SynthSample(
            prompt=plan.text, target=target, subjects=subjects, provenance=provenance,
            extra={"scene": plan.scene, "relation": plan.relation, "template": plan.template,
                   "edit": edit_info, "prompt_before_edit": original_prompt if edit_info else None})
