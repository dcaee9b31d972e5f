"""Scoring one sample (one output image of one bench item): every metric of docs/eval.md.

A sample runs in stages: reading the images, then "subjects" (detection, both consistency
protocols, leakage, position, ToyWorld checks), "clip_t", "aesthetic" and one stage per
extra reward. A stage that fails (unreadable image, a component raising one of the
errors components raise) gives its metrics the penalty value `PENALTY` and is listed with
its reason; the sample is never dropped.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

from psr import toyworld as tw
from psr.core.detect import box_iou
from psr.errors import UserError
from psr.eval import psrbench
from psr.eval.bench import Item
from psr.eval.perception import Perception, Picture, UnreadableImage, open_picture
from psr.rewards.leakage import leakage_margins, sample_margin
from psr.rewards.matching import alignment_reward
from psr.rewards.position import canonical_relation, position_correct, position_psrbench

if TYPE_CHECKING:
    from psr.eval.config import EvalRecipe

SUBJECT_METRICS = ("cons_psrbench", "cons_hungarian", "leakage", "pos_psrbench", "pos_exact",
                   "id_acc", "count_ok", "relation_ok", "scene_ok", "attr_ok")
PENALTY = 0.0
"""Value of a metric whose stage failed: the bottom of every [0, 1] score and the margin of
an image that carries no identity; the failure is also listed with its reason."""

# What a component may raise on a bad image or an internal failure: listed, not fatal
# (psr.rewards' list; a UserError is a configuration mistake and stops the run, and so
# does running out of memory, which would only repeat on every sample).
COMPONENT_ERRORS = (RuntimeError, ValueError, OSError)
ATTRIBUTE_IOU = 0.5
"""An analysed subject is the matched instance when their boxes overlap at least this much."""
ATTRIBUTE_PROBABILITY = 0.5
"""An attribute given as a probability counts as worn from this value on."""


def metric_names(recipe: "EvalRecipe") -> list[str]:
    names = list(SUBJECT_METRICS)
    if recipe.clip_t.enabled:
        names.append("clip_t")
    if recipe.aesthetic.enabled:
        names.append("aesthetic")
    names += [spec.column for spec in recipe.rewards]
    return names


def applicable(item: Item, recipe: "EvalRecipe") -> list[str]:
    """The metrics this item is scored on (a metric is n/a when the bench cannot check it)."""
    gt = item.gt
    names = ["cons_psrbench", "cons_hungarian"]
    if len(item.categories) >= 2:
        names.append("leakage")
    if recipe.protocol == "psrbench":
        # PSRBench's position script reads the relation from the instruction and drops an
        # item that names none of its phrases.
        if len(item.categories) >= 2 and psrbench.relation_from_instruction(item.instruction) is not None:
            names.append("pos_psrbench")
    elif item.position is not None:
        names.append("pos_psrbench")
    if item.position is not None:
        names.append("pos_exact")
    if gt is not None:
        names += ["id_acc", "count_ok"]
        if gt.get("relation") and len(item.categories) >= 2:
            names.append("relation_ok")
        if gt.get("scene"):
            names.append("scene_ok")
        if any(s.get("attributes") for s in gt.get("subjects", [])):
            names.append("attr_ok")
    return names + [m for m in metric_names(recipe) if m not in SUBJECT_METRICS]


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{err.__class__.__name__}: {text.splitlines()[0]}" if text else err.__class__.__name__


def failure_reason(err: BaseException) -> str:
    """The one-line reason of a component error, or the error itself again when it is out
    of memory (it would only repeat on every sample)."""
    import torch

    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower():
        raise err
    return _first_line(err)


# Why a subject's identity check failed, by the first of its three conditions it misses
# (the `identity_failure` of each subject in a sample's details; report.py counts them,
# under these labels): no detected instance (of its category, with same_category) was
# matched to it, the matched instance looks closer to another of the item's references, or
# its similarity to its own reference is below identity_threshold.
IDENTITY_FAILURES = {"no_instance": "no instance of its category", "other_reference": "closer to another reference",
                     "below_threshold": "below the threshold"}


def identity_failure_reason(sim: np.ndarray, reference: int, instance: int | None, threshold: float) -> str | None:
    """The identity check of `reference` matched to `instance` (None: unmatched), sim being
    [instances, references]: None when it passes, else the IDENTITY_FAILURES key of the
    first condition it misses."""
    if instance is None:
        return "no_instance"
    if int(np.argmax(sim[instance])) != reference:
        return "other_reference"
    return None if sim[instance, reference] >= threshold else "below_threshold"


def _iou(a, b) -> float:
    return box_iou(a, b)


def instances_from(by_category: dict[str, list[dict]], limit: int) -> list[dict]:
    """The instances for Hungarian matching: each category's detections, best first, at
    most `limit` per category, in category order (labels say which query found them)."""
    return [d for found in by_category.values() for d in found[:limit]]


def psrbench_boxes(categories: Sequence[str], by_category: dict[str, list[dict]]) -> list[list | None]:
    """Protocol "psr": subject i takes the k-th best detection of its category, k = how many
    earlier subjects share that category (the first takes box 0, a second of the same
    category box 1, at any subject count: PSRBench's 2-subject rule made general); None
    when there are not that many detections."""
    seen: Counter = Counter()
    boxes = []
    for category in categories:
        found, k = by_category[category], seen[category]
        seen[category] += 1
        boxes.append(found[k]["box"] if len(found) > k else None)
    return boxes


def _subjects(perc: Perception, recipe: "EvalRecipe", item: Item, refs: list[Picture], out: Picture,
              names: list[str]) -> tuple[dict, dict]:
    cats, n = item.categories, len(item.categories)
    notes = []
    ref_boxes = []
    for i, (ref, category) in enumerate(zip(refs, cats)):
        found = perc.detect(ref, category)
        ref_boxes.append(found[0]["box"] if found else None)
        if not found:
            notes.append(f"reference {i}: no {category!r} detected, the whole reference is used")
    ref_emb = np.concatenate([perc.embed(ref, [box]) for ref, box in zip(refs, ref_boxes)])  # [N, D]

    by_category = {c: perc.detect(out, c) for c in dict.fromkeys(cats)}
    instances = instances_from(by_category, recipe.max_instances)
    if recipe.protocol == "psrbench":
        # PSRBench's scripts: stored pixels, first box(es) in the detector's order, truncated
        # crops, the whole image where detection fails (psr.eval.psrbench).
        raw_found = {c: perc.detect_psrbench(out, c) for c in dict.fromkeys(cats)}
        p_boxes = psrbench.subject_boxes(cats, raw_found)
        p_sims = []
        for i, (ref, category) in enumerate(zip(refs, cats)):
            found = perc.detect_psrbench(ref, category)
            ref_vector = perc.embed_psrbench(ref, found[0]["box"] if found else None)
            p_sims.append(float(perc.embed_psrbench(out, p_boxes[i]) @ ref_vector))
        perc.embed(out, [d["box"] for d in instances])  # one batch
    else:
        # psr's variant: the k-th best box per category, clipped crops, a missing box scores 0.
        p_boxes = psrbench_boxes(cats, by_category)
        perc.embed(out, [d["box"] for d in instances] + [b for b in p_boxes if b is not None])  # one batch
        p_sims = [float(perc.embed(out, [box])[0] @ ref_emb[i]) if box is not None else None
                  for i, box in enumerate(p_boxes)]
    # psr's protocol: every instance against every reference, Hungarian assignment.
    sim = (perc.embed(out, [d["box"] for d in instances]) @ ref_emb.T if instances
           else np.zeros((0, n), np.float32)).astype(np.float64)  # [I, N]
    allowed = np.array([[d["label"] == c for c in cats] for d in instances], bool).reshape(sim.shape)
    if not recipe.same_category:
        allowed[:] = True
    align = alignment_reward(sim, allowed, missing_penalty=-PENALTY, duplicate_penalty=0.0,
                             duplicate_threshold=recipe.identity_threshold)
    matched = [align.instance_of(i) for i in range(n)]
    m_sims = [float(sim[j, i]) if j is not None else None for i, j in enumerate(matched)]
    m_boxes = [instances[j]["box"] if j is not None else None for j in matched]

    scores = {
        "cons_psrbench": float(np.mean([s if s is not None else PENALTY for s in p_sims])),
        "cons_hungarian": float(np.mean(align.per_reference)),
    }
    if "leakage" in names:
        margin = sample_margin(leakage_margins(sim, (align.rows, align.cols)))
        scores["leakage"] = PENALTY if np.isnan(margin) else float(margin)  # NaN: nothing matched
    position_failure = None
    if "pos_psrbench" in names and recipe.protocol == "psrbench":
        # Box 0 of each category, even when both subjects share one (the position script).
        first = [raw_found[c][0]["box"] if raw_found[c] else None for c in cats[:2]]
        locality = psrbench.relation_from_instruction(item.instruction)
        scores["pos_psrbench"] = psrbench.position_score(locality, first[0], first[1])
    if "pos_exact" in names:
        relation = None
        try:
            relation = canonical_relation(item.position)
        except UserError as err:  # a bench phrase psr does not know: this item's position fails
            position_failure = str(err)
        if relation is not None and n < 2:
            position_failure = f"position {item.position!r}: the item has only {n} subject"
        psr_rule = "pos_psrbench" in names and recipe.protocol == "psr"
        if position_failure is not None:
            scores["pos_exact"] = PENALTY
            if psr_rule:
                scores["pos_psrbench"] = PENALTY
        else:
            if psr_rule:
                a, b = p_boxes[0], p_boxes[1]
                scores["pos_psrbench"] = float(position_psrbench(relation, a, b)) if a and b else PENALTY
            a, b = m_boxes[0], m_boxes[1]
            scores["pos_exact"] = float(bool(position_correct(relation, a, b, out.size))) if a and b else PENALTY

    identity_ok = [None] * n
    identity_failure = [None] * n
    analysis = None
    gt = item.gt
    if gt is not None:
        for i, j in enumerate(matched):
            identity_failure[i] = identity_failure_reason(sim, i, j, recipe.identity_threshold)
            identity_ok[i] = identity_failure[i] is None
        scores["id_acc"] = float(np.mean(identity_ok))
        analysis = perc.analyze(out)
        counted = analysis.get("detections", []) if analysis is not None else instances
        scores["count_ok"] = float(len(counted) == n)
        if "relation_ok" in names:
            a, b = m_boxes[0], m_boxes[1]
            scores["relation_ok"] = float(bool(a and b and tw.relation_holds(a, b, gt["relation"])))
        if analysis is not None and "scene_ok" in names:
            scores["scene_ok"] = float(analysis.get("scene") == gt["scene"])
        if analysis is not None and "attr_ok" in names:
            scores["attr_ok"] = _attributes_present(gt, m_boxes, analysis.get("detections", []))

    details = {
        "subjects": [{"category": c, "reference_box": ref_boxes[i], "psrbench_box": p_boxes[i],
                      "psrbench_sim": p_sims[i], "matched_box": m_boxes[i], "matched_sim": m_sims[i],
                      "identity_ok": identity_ok[i], "identity_failure": identity_failure[i]}
                     for i, c in enumerate(cats)],
        "instances": [{"box": d["box"], "score": d["score"], "label": d["label"]} for d in instances],
        "duplicates": [{"instance": e, "of_reference": r} for e, r in zip(align.duplicates, align.duplicate_of)],
        "similarity": sim.round(4).tolist(),
        "analysis": analysis is not None,
        "scene": analysis.get("scene") if analysis is not None else None,
        "notes": notes,
        "position_failure": position_failure,
    }
    return scores, details


def _attributes_present(gt: dict, boxes: list, analysed: list[dict]) -> float:
    """Fraction of subjects with ground-truth attributes whose matched instance is analysed
    as wearing all of them (the analysed subject overlapping its box most, IoU ≥ 0.5)."""
    hits = []
    for subject, box in zip(gt["subjects"], boxes):
        wanted = set(subject.get("attributes") or ())
        if not wanted:
            continue
        best = max(analysed, key=lambda d: _iou(d["box"], box), default=None) if box else None
        ok = best is not None and _iou(best["box"], box) >= ATTRIBUTE_IOU and wanted <= _worn(best.get("attributes"))
        hits.append(ok)
    return float(np.mean(hits))


def _worn(attributes) -> set[str]:
    """Attribute names an analysed subject wears: a list of names, or {name: probability}
    read at probability ≥ 0.5."""
    if isinstance(attributes, dict):
        return {name for name, p in attributes.items() if p is not None and float(p) >= ATTRIBUTE_PROBABILITY}
    return set(attributes or ())


def load_references(item: Item) -> tuple[list[Picture] | None, str | None]:
    try:
        return [open_picture(p, "reference") for p in item.references], None
    except UnreadableImage as err:
        return None, err.reason


def score_sample(perc: Perception, recipe: "EvalRecipe", item: Item, seed: int, image: Path | None,
                 shown_path: str | None, refs: list[Picture] | None, ref_error: str | None,
                 missing_reason: str | None = None) -> dict:
    """The record of one sample: scores of every applicable metric, failures, details."""
    names = applicable(item, recipe)
    record = {"subset": item.subset, "index": item.index, "seed": seed, "image": shown_path,
              "scores": {}, "failures": [], "details": {}}

    def fail(stage: str, reason: str, metrics: Sequence[str]) -> None:
        record["failures"].append({"stage": stage, "reason": reason})
        for m in metrics:
            record["scores"][m] = PENALTY

    if ref_error is not None:
        fail("references", ref_error, names)
        return record
    if image is None:
        fail("image", missing_reason or "no output image", names)
        return record
    try:
        out = open_picture(image, "output image")
    except UnreadableImage as err:
        fail("image", err.reason, names)
        return record
    record["size"] = list(out.size)

    subject_names = [m for m in names if m in SUBJECT_METRICS]
    try:
        scores, details = _subjects(perc, recipe, item, refs, out, names)
        record["scores"].update(scores)
        record["details"] = details
        if details["position_failure"] is not None:
            record["failures"].append({"stage": "position", "reason": details["position_failure"]})
    except COMPONENT_ERRORS as err:
        fail("subjects", failure_reason(err), subject_names)
    if recipe.clip_t.enabled:
        try:
            record["scores"]["clip_t"] = perc.clip_t(out, item.instruction)
        except COMPONENT_ERRORS as err:
            fail("clip_t", failure_reason(err), ["clip_t"])
    extra = ([("aesthetic", "aesthetic", recipe.aesthetic.options)] if recipe.aesthetic.enabled else [])
    extra += [(spec.column, spec.name, spec.options) for spec in recipe.rewards]
    for metric, name, options in extra:
        try:
            value = perc.reward(name, dict(options), out, item.instruction, refs, item.categories)
            record["scores"][metric] = value["total"]
        except COMPONENT_ERRORS as err:
            fail(metric, failure_reason(err), [metric])
    return record
