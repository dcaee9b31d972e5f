"""ToyWorld implementations of PSR's synthesis stages, so the whole pipeline runs offline.

Each class answers the same call as its real counterpart (see `psr.synth.stages`):

* `toyworld` prompt      — draws identities of the asked categories and words the scene with
  ToyWorld's own captions ("the red striped star creature to the left of …, on grass").
* `toyworld` target      — ToyWorld's text-to-image: it READS the prompt (names, attributes,
  relation, scene), picks an identity that fits each name (as a text-to-image model picks
  some cat for "a cat": eyes and head part are its choice), lays the subjects out so the
  relation holds, and renders.
* `toyworld` detector    — the trained ToyWorld localizer (`LOCALIZERS["toyworld"]`) finds
  the subjects in the pixels; it is not told where they are.
* `toyworld` personalize — re-renders the cropped subject alone, in another pose and scene.
* `toyworld` matcher     — exact reference↔target token correspondences from the render
  transforms (what MOSAIC approximates with two point matchers).
* `toyworld` edit        — PSR's second stage: change the background or add an attribute,
  with the caption rewritten to match.

What a real model would have to infer, ToyWorld knows: every image the toy stages draw
carries its scene description in `image.info["toyworld"]` (kept in memory, not in the
PNGs), and a crop made by the toy detector carries the description of the subject its box
covers. The personalizer and the matcher read it — that is what makes them exact. The
target stage and the detector do not: the first works from the text, the second from the
pixels, so a detector miss or a wrong box still rejects the sample, as in the real pipeline.
"""

from __future__ import annotations

import functools
import json
import random
import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Sequence

import numpy as np

from psr import toyworld as tw
from psr.core.detect import box_iou, build_localizer
from psr.errors import UserError
from psr.synth.stages.detectors import GroundingDinoDetector
from psr.synth.stages.flux import EditResult
from psr.synth.stages.prompts import PromptPlan
from psr.toyworld import wording
from psr.toyworld.identity import COLOUR_NAMES, SHAPE_NAMES, Identity
from psr.toyworld.layout import place_free, place_pair
from psr.toyworld.prompts import subject_phrase
from psr.toyworld.sampling import SUBJECT_SIZES, sample_pose, sample_reference, sample_target

if TYPE_CHECKING:
    from PIL import Image

WORLD_KEY = "toyworld"
"""`PIL.Image.info` key of a toy image's scene: {"spec": SceneSpec dict, "boxes": [[x0, y0, x1, y1], …]}."""
SUBJECT_KEY = "toyworld_subject"
"""`PIL.Image.info` key of a toy crop: the SubjectSpec dict of the subject its box covers."""


# ---------------------------------------------------------------------------- helpers
def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng([0x7459, int(seed)])


def _id_range(split: str) -> tuple[int, int]:
    if split not in tw.DEFAULT_ID_RANGES:
        raise UserError(f"id_split {split!r}: choose one of {', '.join(tw.DEFAULT_ID_RANGES)}")
    return tw.DEFAULT_ID_RANGES[split]


@functools.lru_cache(maxsize=4)
def _identity_index(id_range: tuple[int, int]) -> dict[tuple[str, str, str], list[int]]:
    """(shape, colour, pattern) → ids in range: what a caption can say about an identity."""
    index: dict[tuple[str, str, str], list[int]] = {}
    for i in range(*id_range):
        ident = Identity.from_id(i)
        index.setdefault((ident.shape, ident.colour, ident.pattern), []).append(i)
    return index


def _shape_index(id_range: tuple[int, int]) -> dict[str, list[int]]:
    by_shape: dict[str, list[int]] = {}
    for (shape, _, _), ids in _identity_index(id_range).items():
        by_shape.setdefault(shape, []).extend(ids)
    return by_shape


def attach_world(image: "Image.Image", render: "tw.Render", spec: "tw.SceneSpec") -> "Image.Image":
    image.info[WORLD_KEY] = json.dumps({"spec": spec.to_dict(), "boxes": render.boxes.tolist()})
    return image


def read_world(image: "Image.Image", stage: str) -> tuple["tw.SceneSpec", list[list[int]]]:
    raw = image.info.get(WORLD_KEY)
    if raw is None:
        raise UserError(f"toyworld {stage}: the image carries no ToyWorld scene; the toyworld {stage} stage "
                        f"works only on images drawn by the toyworld target/personalize stages")
    data = json.loads(raw)
    return tw.SceneSpec.from_dict(data["spec"]), data["boxes"]


def _render(spec: "tw.SceneSpec", size: int):
    shown = tw.render(spec, size)
    from PIL import Image

    return shown, attach_world(Image.fromarray(shown.image), shown, spec)


def _scene_key(phrase: str) -> str | None:
    return next((key for key, text in wording.SCENE_PHRASES.items() if text == phrase), None)


# ---------------------------------------------------------------------------- prompt
@dataclass
class ToyPromptPlan(PromptPlan):
    """A PromptPlan whose words come from a ToyWorld scene description (`world`)."""

    world: dict | None = None
    variant: int = 0

    def spec(self) -> "tw.SceneSpec":
        return tw.SceneSpec.from_dict(self.world)

    def subject_name(self, i: int) -> str:
        return subject_phrase(self.spec().subjects[i])

    def render(self) -> str:
        return tw.build_prompt(self.spec(), self.variant)


def toy_plan(spec: "tw.SceneSpec", variant: int = 0, source: str = "toyworld") -> ToyPromptPlan:
    plan = ToyPromptPlan(categories=[_category(s.identity) for s in spec.subjects],
                         scene=wording.SCENE_PHRASES[spec.scene],
                         relation=wording.RELATION_PHRASES[spec.relation] if spec.relation else None,
                         template="toyworld", details=[""] * len(spec.subjects), source=source,
                         world=spec.to_dict(), variant=variant)
    plan.text = plan.render()
    return plan


def _category(identity: int) -> str:
    return Identity.from_id(identity).category


class ToyPrompt:
    """A caption for subjects of the asked ToyWorld categories (shape words)."""

    name = "toyworld"

    def __init__(self, *, id_range: tuple[int, int], attribute_rate: float):
        self.id_range, self.attribute_rate = id_range, attribute_rate

    def __call__(self, categories: Sequence[str], seed: int) -> ToyPromptPlan:
        by_shape = _shape_index(self.id_range)
        unknown = [c for c in categories if c not in by_shape]
        if unknown:
            raise UserError(f"toyworld prompt: {unknown[0]!r} is not a ToyWorld category; "
                            f"choose from {', '.join(sorted(by_shape))}")
        rng = _rng(seed)
        # Draw a layout for the count, then give each slot an identity of the asked shape.
        spec = sample_target(rng, len(categories), self.id_range, attribute_rate=self.attribute_rate,
                             distinct_categories=False)
        ids = [int(rng.choice(by_shape[c])) for c in categories]
        subjects = tuple(replace(s, identity=i) for s, i in zip(spec.subjects, ids))
        spec = tw.SceneSpec(scene=spec.scene, scene_seed=spec.scene_seed, subjects=subjects,
                            relation=spec.relation)
        return toy_plan(spec, variant=int(rng.integers(2)))


def _toy_prompt(device="cpu", *, id_split: str = "train", attribute_rate: float = 0.2) -> ToyPrompt:
    """`id_split`: the identities to draw from (train / eval); `attribute_rate`: chance of
    each added attribute per subject."""
    return ToyPrompt(id_range=_id_range(id_split), attribute_rate=attribute_rate)


# ---------------------------------------------------------------------------- target
@dataclass(frozen=True)
class ParsedSubject:
    shape: str
    colour: str
    pattern: str
    attributes: tuple[str, ...]


@dataclass(frozen=True)
class ParsedPrompt:
    subjects: tuple[ParsedSubject, ...]
    relation: str | None
    scene: str | None


@functools.lru_cache(maxsize=1)
def _name_pattern() -> re.Pattern:
    alt = lambda words: "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # noqa: E731
    adjectives = [a for a in wording.PATTERN_ADJECTIVES.values() if a]
    return re.compile(rf"\bthe ({alt(COLOUR_NAMES)}) (?:({alt(adjectives)}) )?({alt(SHAPE_NAMES)}) creature\b")


def parse_prompt(text: str) -> ParsedPrompt:
    """Read a ToyWorld caption: each named subject with its attributes, the relation
    between the first two, and the scene. Raises UserError if no subject is named."""
    pattern_of = {adj: name for name, adj in wording.PATTERN_ADJECTIVES.items()}
    matches = list(_name_pattern().finditer(text.lower()))
    if not matches:
        raise UserError(f"toyworld target: no ToyWorld subject named in {text!r} "
                        f"(expected names like 'the red striped star creature')")
    subjects = []
    for k, m in enumerate(matches):
        # Attribute phrases follow their subject's name, before the next name.
        tail = text.lower()[m.end(): matches[k + 1].start() if k + 1 < len(matches) else len(text)]
        attributes = tuple(a for a, (_, obj) in wording.ATTRIBUTE_PHRASES.items() if obj in tail)
        subjects.append(ParsedSubject(shape=m.group(3), colour=m.group(1),
                                      pattern=pattern_of[m.group(2) or ""], attributes=attributes))
    relation = None
    if len(matches) >= 2:
        between = text.lower()[matches[0].end(): matches[1].start()]
        relation = next((r for r, phrase in wording.RELATION_PHRASES.items() if phrase in between), None)
    scene = next((key for key, phrase in wording.SCENE_PHRASES.items() if phrase in text.lower()), None)
    return ParsedPrompt(subjects=tuple(subjects), relation=relation, scene=scene)


class ToyTarget:
    """ToyWorld text-to-image: prompt → a render that shows what the prompt names."""

    name = "toyworld"

    def __init__(self, *, size: int, id_range: tuple[int, int]):
        self.size, self.id_range = size, id_range

    def compose(self, text: str, seed: int) -> "tw.SceneSpec":
        parsed = parse_prompt(text)
        if len(parsed.subjects) > max(SUBJECT_SIZES):
            raise UserError(f"toyworld target: {len(parsed.subjects)} subjects named; ToyWorld draws at most "
                            f"{max(SUBJECT_SIZES)}")
        rng = _rng(seed)
        index = _identity_index(self.id_range)
        lo, hi = SUBJECT_SIZES[len(parsed.subjects)]
        subjects = []
        for s in parsed.subjects:
            ids = index.get((s.shape, s.colour, s.pattern))
            if not ids:
                raise UserError(f"toyworld target: no identity in ids {self.id_range} is a {s.colour} "
                                f"{s.pattern} {s.shape}")
            subjects.append(tw.SubjectSpec(identity=int(rng.choice(ids)), size=round(float(rng.uniform(lo, hi)), 4),
                                           pose=sample_pose(rng), attributes=s.attributes))
        relation = parsed.relation if len(subjects) >= 2 else None
        if relation is not None:
            subjects[:2] = place_pair(rng, subjects[0], subjects[1], relation)
            if len(subjects) > 2:
                subjects = list(subjects[:2]) + place_free(rng, subjects[2:])
        else:
            subjects = place_free(rng, subjects)
        scene = parsed.scene or sorted(tw.SCENES)[int(rng.integers(len(tw.SCENES)))]
        return tw.SceneSpec(scene=scene, scene_seed=int(rng.integers(2**31)), subjects=tuple(subjects),
                            relation=relation if len(subjects) == 2 else None)

    def __call__(self, prompt: str, seed: int) -> "Image.Image":
        return _render(self.compose(prompt, seed), self.size)[1]


def _toy_target(device="cpu", *, size: int = 64, id_split: str = "train") -> ToyTarget:
    """`size`: render size in pixels (64 or 128); `id_split`: identities the names map to."""
    if size < 16:
        raise UserError(f"toyworld target: size {size} is too small (>= 16)")
    return ToyTarget(size=size, id_range=_id_range(id_split))


# ---------------------------------------------------------------------------- detector
class ToyDetector(GroundingDinoDetector):
    """The trained ToyWorld localizer behind the detector stage; a crop remembers which
    ground-truth subject its box covers (best IoU) so the toy personalizer can redraw it."""

    name = "toyworld"

    def crop(self, image: "Image.Image", box: Sequence[float]) -> "Image.Image":
        crop = super().crop(image, box)
        raw = image.info.get(WORLD_KEY)
        if raw is not None:
            data = json.loads(raw)
            overlaps = [box_iou(box, b) for b in data["boxes"]]
            if overlaps and max(overlaps) > 0:
                subject = data["spec"]["subjects"][int(np.argmax(overlaps))]
                crop.info[SUBJECT_KEY] = json.dumps({"subject": subject, "scene": data["spec"]["scene"]})
        return crop


def _toy_detector(device="cpu", *, path: str | None = None, threshold: float = 0.5, pad: float = 0.05,
                  max_overlap: float = 0.5, localizer=None) -> ToyDetector:
    """`path`: localizer weights (default: the shipped ones); `threshold`: detection score;
    `pad`, `max_overlap`: as for the grounding-dino detector."""
    if localizer is None:
        localizer = build_localizer("toyworld", device, path=path, threshold=threshold)
    return ToyDetector(localizer, pad=pad, max_overlap=max_overlap)


# ---------------------------------------------------------------------------- personalize
class ToyPersonalize:
    """Re-render the cropped subject alone, without added attributes, in a new pose and a
    scene other than the target's (psr.toyworld.sample_reference)."""

    name = "toyworld"

    def __init__(self, *, size: int):
        self.size = size

    def __call__(self, crop: "Image.Image", category: str, avoid_scene: str, seed: int) -> tuple["Image.Image", str]:
        raw = crop.info.get(SUBJECT_KEY)
        if raw is None:
            raise UserError("toyworld personalize: the crop carries no ToyWorld subject; use the toyworld "
                            "detector stage with the toyworld target")
        data = json.loads(raw)
        subject = tw.SubjectSpec.from_dict(data["subject"])
        scene = _scene_key(avoid_scene) or data["scene"]
        spec = sample_reference(_rng(seed), subject, scene)
        return _render(spec, self.size)[1], tw.build_prompt(spec)


def _toy_personalize(device="cpu", *, size: int = 64) -> ToyPersonalize:
    """`size`: reference render size in pixels."""
    return ToyPersonalize(size=size)


# ---------------------------------------------------------------------------- matcher
class ToyMatcher:
    """Exact (reference token, target token) pairs from the two renders' transforms."""

    name = "toyworld"

    def __call__(self, reference: "Image.Image", target: "Image.Image", ref_mask, tgt_mask,
                 token_stride: int) -> list[tuple[int, int]]:
        ref_spec, _ = read_world(reference, "matcher")
        tgt_spec, _ = read_world(target, "matcher")
        identity = ref_spec.subjects[0].identity
        where = [i for i, s in enumerate(tgt_spec.subjects) if s.identity == identity]
        if not where:
            return []
        tgt_render, ref_render = tw.render(tgt_spec, target.width), tw.render(ref_spec, reference.width)
        grid = (target.height // token_stride, target.width // token_stride)
        ref_grid = (reference.height // token_stride, reference.width // token_stride)
        mapping = tw.correspondence_grid(tgt_render, where[0], ref_render, 0, grid, ref_grid).reshape(-1)
        return [(int(r), int(t)) for t, r in enumerate(mapping) if r >= 0]


def _toy_matcher(device="cpu") -> ToyMatcher:
    return ToyMatcher()


# ---------------------------------------------------------------------------- edit
EDIT_KINDS = ("background", "attribute")


class ToyEdit:
    """PSR's second stage in ToyWorld: redraw the target with another scene, or with one
    more attribute on one subject; the caption is re-rendered from the edited scene."""

    name = "toyworld"

    def __init__(self, *, kinds: Sequence[str], rate: float):
        self.kinds, self.rate = tuple(kinds), rate

    def __call__(self, target: "Image.Image", plan: PromptPlan, seed: int) -> EditResult | None:
        rng = random.Random(seed)
        if rng.random() >= self.rate:
            return None
        spec, _ = read_world(target, "edit")
        kind = rng.choice(self.kinds)
        if kind == "background":
            scene = rng.choice([s for s in sorted(tw.SCENES) if s != spec.scene])
            edited = replace(spec, scene=scene)
            instruction = f"change the background to {wording.SCENE_PHRASES[scene].split(' ', 1)[1]}"
        else:
            i = rng.randrange(len(spec.subjects))
            subject = spec.subjects[i]
            missing = [a for a in sorted(tw.ATTRIBUTES) if a not in subject.attributes]
            if not missing:
                return None
            attribute = rng.choice(missing)
            subjects = list(spec.subjects)
            subjects[i] = replace(subject, attributes=tuple(subject.attributes) + (attribute,))
            edited = replace(spec, subjects=tuple(subjects))
            verb, obj = wording.ATTRIBUTE_PHRASES[attribute]
            instruction = f"give {tw.Identity.from_id(subject.identity).name} {obj}"
        image = _render(edited, target.width)[1]
        variant = plan.variant if isinstance(plan, ToyPromptPlan) else 0
        return EditResult(image=image, plan=toy_plan(edited, variant, source=plan.source), kind=kind,
                          instruction=instruction)


def _toy_edit(device="cpu", *, kinds: Sequence[str] = EDIT_KINDS, rate: float = 0.5) -> ToyEdit:
    """`kinds`: edits to draw from (background, attribute); `rate`: chance a sample is edited."""
    bad = [k for k in kinds if k not in EDIT_KINDS]
    if bad or not kinds:
        raise UserError(f"toyworld edit: kinds {list(kinds)}: choose from {', '.join(EDIT_KINDS)}")
    if not 0.0 <= rate <= 1.0:
        raise UserError(f"toyworld edit: rate {rate} must be in [0, 1]")
    return ToyEdit(kinds=kinds, rate=rate)

