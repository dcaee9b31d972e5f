"""Subject-consistency rewards: `psr` (PSR's pairwise reward) and `hungarian` (MultiCrafter's
multi-ID alignment). Exact definitions in docs/rewards.md; summary:

psr — for each subject i (reference order): the localizer finds boxes of i's category in
the generated image; R_i = cos(embed(crop of i's box), embed(reference crop of i)).
Subjects that share a category share that category's boxes: with `candidates = "top"`
the k best-scoring boxes (k = number of subjects of the category; with k = 1 this is
PSR's single best box), with "all" every box; `assignment = "match"` gives each subject
a different box by maximum total similarity (scipy's linear_sum_assignment), `"order"`
gives the j-th subject the j-th best box (PSRBench's behaviour, kept to reproduce its
numbers). A subject left without a usable box (none detected, fewer boxes than subjects,
a crop, detector or extractor failure) gets R_i = `missing_value` (default 0) and is
listed as a failure. Total = mean over subjects of R_i.

hungarian — all boxes of all queried categories are instances; S[e, r] = cosine of
instance e's and reference r's crops, pairs across categories not allowed (unless
`same_category = false`); the reward is `matching.alignment_reward` (missing and
duplicate penalties, module docstring of psr.rewards.matching).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from psr.errors import RecipeError, UserError
from psr.rewards.base import ComponentCache, RewardBatch, RewardResult, as_tensor, json_float, parse_options
from psr.rewards.leakage import leakage_margins, sample_margin
from psr.rewards.matching import alignment_reward, hungarian_match
from psr.rewards.subjects import SubjectCrop, SubjectFinder, unique


def _default_extractor() -> dict[str, Any]:
    return {"name": "dino", "path": "facebook/dino-vits16"}


def _default_localizer() -> dict[str, Any]:
    return {"name": "grounding-dino", "path": "IDEA-Research/grounding-dino-tiny"}


@dataclass(frozen=True)
class SubjectOptions:
    extractor: dict[str, Any] = field(default_factory=_default_extractor)
    """Crop embedder, `{name = "...", options...}` from FEATURE_EXTRACTORS. Default: DINO
    ViT-S/16, PSR's protocol (resize 256 bicubic, center crop 224, ImageNet normalisation)."""
    localizer: dict[str, Any] = field(default_factory=_default_localizer)
    """Box finder, `{name = "...", options...}` from LOCALIZERS, queried with each category."""
    pad: float = 0.0
    """Grow every box by this fraction of its size on each side before cropping."""

    def __post_init__(self):
        if not 0.0 <= self.pad <= 1.0:
            raise RecipeError("pad", f"must be in [0, 1], got {self.pad}")


def _need_subjects(batch: RewardBatch, name: str) -> None:
    for b, refs in enumerate(batch.references):
        if not refs:
            raise UserError(f"{name} reward: sample {b} has no references; subject consistency needs at least one")


def _cos(a, b) -> float:
    return float((a * b).sum())


def _similarity(rows: list[SubjectCrop], cols: list[SubjectCrop]):
    """([I, R] float64 cosine, NaN where either crop failed; [I, R] bool usable)."""
    import numpy as np

    sim = np.full((len(rows), len(cols)), np.nan)
    for e, inst in enumerate(rows):
        for r, ref in enumerate(cols):
            if inst.ok and ref.ok:
                sim[e, r] = _cos(inst.embedding, ref.embedding)
    return sim, ~np.isnan(sim)


class _SubjectReward:
    Options = SubjectOptions
    name = "subject"

    def __init__(self, device="cpu", *, cache: ComponentCache | None = None, **options):
        self.options = parse_options(self.Options, options)
        cache = cache if cache is not None else ComponentCache()
        self.finder = SubjectFinder(cache.get_extractor(self.options.extractor, device),
                                    cache.get_localizer(self.options.localizer, device), self.options.pad)


# ---------------------------------------------------------------------------- psr
@dataclass(frozen=True)
class PsrOptions(SubjectOptions):
    assignment: Literal["match", "order"] = "match"
    """'match': boxes of a shared category go to subjects by maximum total similarity, no box
    used twice; 'order': the j-th subject of a category takes its j-th best box (PSRBench)."""
    candidates: Literal["top", "all"] = "top"
    """'top': a category's k best-scoring boxes, k = its number of subjects; 'all': every box."""
    missing_value: float = 0.0
    """R_i of a subject that cannot be scored (not detected, or a component failed)."""


class PsrReward(_SubjectReward):
    """PSR's pairwise subject-consistency reward (module docstring). Terms: `found` (fraction
    of subjects scored), `min_subject` (lowest R_i)."""

    Options = PsrOptions
    name = "psr"

    def __call__(self, batch: RewardBatch) -> RewardResult:
        _need_subjects(batch, self.name)
        opts = self.options
        refs = self.finder.reference_crops(batch)
        found = []
        for b, image in enumerate(batch.images):
            crops, errors = self.finder.detect(image, batch.categories[b])
            if opts.candidates == "top":
                crops = {c: boxes[:batch.categories[b].count(c)] for c, boxes in crops.items()}
            found.append((crops, errors))
        self.finder.embed_crops([c for row in refs for c in row] +
                                [c for crops, _ in found for boxes in crops.values() for c in boxes])
        totals, terms_found, terms_min, details = [], [], [], []
        for b, (crops, errors) in enumerate(found):
            cats = batch.categories[b]
            scores: list[float] = [opts.missing_value] * len(cats)
            subjects: list[dict] = [{} for _ in cats]
            for category in unique(cats):
                members = [i for i, c in enumerate(cats) if c == category]
                boxes = crops[category]
                pairs, sim = self._assign(boxes, [refs[b][i] for i in members])
                for j, i in enumerate(members):
                    entry = {"category": category, "reference": refs[b][i].to_json(), "box": None}
                    k = pairs.get(j)
                    if k is not None:
                        scores[i] = float(sim[k, j])
                        entry.update(box=boxes[k].to_json()["box"], detection_score=json_float(boxes[k].score),
                                     candidate=k)
                    else:
                        entry["failure"] = self._why(category, j, boxes, refs[b][i], errors, len(members))
                    entry["score"] = json_float(scores[i])
                    subjects[i] = entry
            failures = sum(1 for s in subjects if "failure" in s)
            total = sum(scores) / len(scores)
            totals.append(total)
            terms_found.append(1.0 - failures / len(cats))
            terms_min.append(min(scores))
            details.append({"score": json_float(total), "subjects": subjects, "failures": failures,
                            "candidates": {c: len(v) for c, v in crops.items()}})
        return RewardResult(as_tensor(totals), {"found": as_tensor(terms_found), "min_subject": as_tensor(terms_min)},
                            details)

    def _assign(self, boxes: list[SubjectCrop], refs: list[SubjectCrop]):
        """({subject j → box k}, [boxes, subjects] similarity) for one category."""
        sim, usable = _similarity(boxes, refs)
        if self.options.assignment == "order":
            return {j: j for j in range(min(len(boxes), len(refs))) if usable[j, j]}, sim
        rows, cols = hungarian_match(sim, usable)
        return {int(c): int(r) for r, c in zip(rows, cols)}, sim

    def _why(self, category, j, boxes, ref, errors, members) -> str:
        """Why subject j (of `members` sharing `category`) has no box."""
        if not ref.ok:
            return ref.failure or "reference crop has no embedding"
        if category in errors:
            return errors[category]
        if not boxes:
            return f"no {category!r} detected"
        if self.options.assignment == "order":
            if j >= len(boxes):
                return f"only {len(boxes)} {category!r} boxes for {members} subjects"
            return boxes[j].failure or "box has no embedding"
        broken = [b.failure for b in boxes if not b.ok]
        note = f" ({'; '.join(f for f in broken if f)})" if any(broken) else ""
        return f"{len(boxes) - len(broken)} usable {category!r} boxes for {members} subjects{note}"


# ---------------------------------------------------------------------------- hungarian
@dataclass(frozen=True)
class HungarianOptions(SubjectOptions):
    missing_penalty: float = 0.0
    """An unmatched reference (missing subject) contributes -missing_penalty to the mean."""
    duplicate_penalty: float = 0.25
    """Subtracted from the total once per duplicated identity."""
    duplicate_threshold: float = 0.5
    """An unmatched instance is a duplicate when its best similarity to a matched reference
    reaches this cosine (lower ones are background boxes; the scale depends on the extractor)."""
    same_category: bool = True
    """Only match instances to references of the category they were detected as."""
    max_instances: int | None = None
    """Keep at most this many best-scoring boxes per category (None: all)."""

    def __post_init__(self):
        super().__post_init__()
        if self.missing_penalty < 0 or self.duplicate_penalty < 0:
            raise RecipeError("missing_penalty" if self.missing_penalty < 0 else "duplicate_penalty",
                              "must be >= 0 (it is subtracted)")
        if not -1.0 <= self.duplicate_threshold <= 1.0:
            raise RecipeError("duplicate_threshold", "must be a cosine in [-1, 1]")
        if self.max_instances is not None and self.max_instances < 1:
            raise RecipeError("max_instances", "must be >= 1")


class HungarianReward(_SubjectReward):
    """MultiCrafter's multi-ID alignment reward. Terms: `matched_similarity` (mean over
    matched pairs, NaN if none), `missing`, `duplicates` (counts), `leakage_margin`
    (psr.rewards.leakage, NaN where undefined)."""

    Options = HungarianOptions
    name = "hungarian"

    def __call__(self, batch: RewardBatch) -> RewardResult:
        import numpy as np

        _need_subjects(batch, self.name)
        opts = self.options
        refs = self.finder.reference_crops(batch)
        instances, errors = [], []
        for b, image in enumerate(batch.images):
            crops, errs = self.finder.detect(image, batch.categories[b])
            instances.append([c for boxes in crops.values() for c in boxes[:opts.max_instances]])
            errors.append(errs)
        self.finder.embed_crops([c for row in refs for c in row] + [c for row in instances for c in row])
        columns = {k: [] for k in ("total", "matched_similarity", "missing", "duplicates", "leakage_margin")}
        details = []
        for b, insts in enumerate(instances):
            cats = batch.categories[b]
            sim, usable = _similarity(insts, refs[b])
            if opts.same_category:
                usable &= np.array([[inst.label == c for c in cats] for inst in insts], bool).reshape(usable.shape)
            result = alignment_reward(sim, usable, missing_penalty=opts.missing_penalty,
                                      duplicate_penalty=opts.duplicate_penalty,
                                      duplicate_threshold=opts.duplicate_threshold)
            margins = leakage_margins(sim, (result.rows, result.cols))
            references = []
            for r, ref in enumerate(refs[b]):
                e = result.instance_of(r)
                entry = {"category": cats[r], "reference": ref.to_json(), "score": json_float(result.per_reference[r]),
                         "instance": e, "leakage_margin": json_float(margins[r])}
                if e is None:
                    entry["failure"] = self._why(cats[r], ref, insts, errors[b])
                references.append(entry)
            sample = {"score": json_float(result.total),
                      "instances": [{**inst.to_json(), "label": inst.label} for inst in insts],
                      "similarity": [[json_float(v) for v in row] for row in sim],
                      "references": references, "missing": result.missing,
                      "duplicates": [{"instance": e, "of_reference": r}
                                     for e, r in zip(result.duplicates, result.duplicate_of)],
                      "failures": sum(1 for r in references if "failure" in r)}
            details.append(sample)
            for key, value in (("total", result.total), ("matched_similarity", result.matched_similarity),
                               ("missing", result.missing), ("duplicates", len(result.duplicates)),
                               ("leakage_margin", sample_margin(margins))):
                columns[key].append(value)
        total = as_tensor(columns.pop("total"))
        return RewardResult(total, {k: as_tensor(v) for k, v in columns.items()}, details)

    @staticmethod
    def _why(category, ref, insts, errors) -> str:
        if not ref.ok:
            return ref.failure or "reference crop has no embedding"
        if category in errors:
            return errors[category]
        usable = [i for i in insts if i.ok and i.label == category]
        if not usable:
            broken = [i.failure for i in insts if i.label == category and i.failure]
            return f"no usable {category!r} instance" + (f" ({'; '.join(broken)})" if broken else "")
        return f"more {category!r} references than usable instances"
