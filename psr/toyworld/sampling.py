"""Sampling training / benchmark examples: a target scene and its references.

An `Example` is everything one multi-subject personalization sample needs:
the target scene (k subjects with poses, attributes, a relation for k = 2),
one reference scene per subject (the same identity alone, without added
attributes, in a different pose and a different scene: references are never
crops of the target), and the caption. It is a pure function of
(seed, num_subjects, id_range, options), so train and benchmark splits are
kept apart by giving them disjoint id ranges (DEFAULT_ID_RANGES) and
disjoint seed ranges; nothing here picks a split on its own.

JSON layout of `Example.to_dict()`:
    {"seed": 7, "prompt": "...", "target": SceneSpec dict,
     "references": [SceneSpec dict, ...]}   # references[i] shows target subject i
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace

import numpy as np

from psr.toyworld.attributes import ATTRIBUTES
from psr.toyworld.identity import NUM_IDENTITIES, Identity
from psr.toyworld.layout import place_centred, place_free, place_pair, place_slots
from psr.toyworld.pose import Pose
from psr.toyworld.prompts import build_prompt
from psr.toyworld.scenes import SCENES
from psr.toyworld.spec import RELATIONS, SceneSpec, SubjectSpec
from psr.toyworld.wording import PROMPT_TEMPLATES

# Disjoint identity ranges for training and held-out evaluation (about 87% / 13%).
DEFAULT_ID_RANGES: dict[str, tuple[int, int]] = {"train": (0, 64_000), "eval": (64_000, NUM_IDENTITIES)}

# Layout size (canonical unit as a fraction of the side) by subject count.
SUBJECT_SIZES: dict[int, tuple[float, float]] = {1: (0.27, 0.34), 2: (0.19, 0.24), 3: (0.15, 0.19), 4: (0.13, 0.165)}
REFERENCE_SIZE = (0.28, 0.33)
MAX_ATTRIBUTES = 2  # per subject; more makes captions long and subjects busy
MIN_ROTATION_CHANGE = 15.0  # degrees between a target pose and its reference pose
_SALT = 0x7057  # separates these streams from other users of the same seed


@dataclass(frozen=True)
class Level:
    """How hard a ToyWorld example is to personalise (see LEVELS).

    subject_sizes: canonical-unit range per subject count, fractions of the target side.
    reference_sizes: canonical-unit range of the lone subject, fractions of the reference
        side; None derives it from the target subject (see reference_scale).
    reference_scale: with reference_sizes None, the reference subject's size in pixels over
        the target subject's, drawn log-uniformly from this range (never 1, so scale always
        changes), for references rendered `reference_ratio` times smaller than the target.
    reference_ratio: target side over reference side that reference_scale assumes.
    same_pose: the reference keeps the target's pose (only position and scale change).
    eyes, top: fixed identity factors (None: any); identities then come only from the ids
        of the range that have them, so train and eval ranges stay disjoint.
    slots: place subject i at the i-th slot centre of `layout.SLOTS` (by count, and by
        relation for two) up to `slot_jitter`, instead of anywhere the relation allows.
    reference_jitter: how far the lone reference subject's box centre may move from the
        reference image's centre.
    """

    name: str
    subject_sizes: dict[int, tuple[float, float]] = field(default_factory=dict)
    reference_sizes: tuple[float, float] | None = None
    reference_scale: tuple[float, float] = (1.0, 1.0)
    reference_ratio: int = 1
    same_pose: bool = False
    eyes: str | None = None
    top: str | None = None
    slots: bool = False
    slot_jitter: float = 0.03
    reference_jitter: float = 0.04


# The full world is the benchmark's hardest level. `easy` is the level the embedded
# model learns on a CPU: the reference shows the subject in its target pose at
# 0.8-0.9x its target size in pixels (rendered at half the target side: 16 tokens),
# larger subjects at fixed slots per count and relation (so the layout the sampler must
# commit to from noise is nearly decided by the prompt), and identities that differ in
# shape, colour and pattern only (two eyes, nothing on the head).
LEVELS: dict[str, Level] = {
    "full": Level("full", subject_sizes=SUBJECT_SIZES, reference_sizes=REFERENCE_SIZE),
    "easy": Level("easy", subject_sizes={1: (0.30, 0.34), 2: (0.22, 0.25), 3: (0.20, 0.23), 4: (0.19, 0.22)},
                  reference_scale=(0.8, 0.9), reference_ratio=2, same_pose=True, eyes="two eyes", top="none",
                  slots=True),
}
# `easy-aligned` is the easy level without its jitter, for training only: each subject's box
# centred exactly on its slot, the lone reference's exactly on its image, and the reference
# always 0.849x its target size in pixels (the easy range's mean, which the embedded
# model's reference layout table assumes), so the table's box maps every reference pixel
# onto the target pixel showing the same part of the subject. Position and scale still
# change between reference and target; the same seed gives the easy level's example.
LEVELS["easy-aligned"] = replace(LEVELS["easy"], name="easy-aligned", reference_scale=(0.849, 0.849),
                                 slot_jitter=0.0, reference_jitter=0.0)


def get_level(name: str) -> Level:
    if name not in LEVELS:
        raise ValueError(f"unknown ToyWorld level {name!r}; known: {list(LEVELS)}")
    return LEVELS[name]


@functools.lru_cache(maxsize=16)
def _ids_with(id_range: tuple[int, int], eyes: str | None, top: str | None) -> tuple[int, ...]:
    lo, hi = id_range
    found = (Identity.from_id(i) for i in range(lo, hi))
    return tuple(t.id for t in found if eyes in (None, t.eyes) and top in (None, t.top))


def sample_pose(rng: np.random.Generator) -> Pose:
    """A random mild pose; values rounded so manifests stay readable."""
    return Pose(
        rotation=round(float(rng.uniform(-30.0, 30.0)), 2),
        scale=round(float(rng.uniform(0.88, 1.12)), 4),
        flip=bool(rng.random() < 0.5),
        squash=round(float(np.exp(rng.uniform(-0.18, 0.18))), 4),
        bend=round(float(rng.uniform(-0.12, 0.12)), 4),
    )


def poses_differ(a: Pose, b: Pose) -> bool:
    """Whether two poses are visibly different: mirrored, or rotated apart."""
    return a.flip != b.flip or abs(a.rotation - b.rotation) >= MIN_ROTATION_CHANGE


def sample_identities(
    rng: np.random.Generator, k: int, id_range: tuple[int, int], distinct_categories: bool = True,
    level: Level | None = None,
) -> list[int]:
    """k distinct ids from [lo, hi); with distinct_categories, also distinct shapes; with a
    level that fixes identity factors, only ids that have them."""
    lo, hi = id_range
    if not (0 <= lo and hi - lo >= k):
        raise ValueError(f"id_range {id_range} must be non-negative and hold at least {k} ids")
    pool = None
    if level is not None and (level.eyes is not None or level.top is not None):
        pool = _ids_with((int(lo), int(hi)), level.eyes, level.top)
        if len(pool) < k:
            raise ValueError(f"id_range {id_range} holds fewer than {k} ids of level {level.name!r}")
    for _ in range(100):
        if pool is None:
            ids = [lo + int(i) for i in rng.choice(hi - lo, size=k, replace=False)]
        else:
            ids = [pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False)]
        shapes = {Identity.from_id(i).shape for i in ids}
        if not distinct_categories or len(shapes) == k:
            return ids
    raise ValueError(
        f"could not draw {k} identities of distinct categories from id_range {id_range}; "
        "widen the range or pass distinct_categories=False"
    )


def sample_attributes(rng: np.random.Generator, rate: float) -> tuple[str, ...]:
    """Each attribute independently with probability `rate`, at most MAX_ATTRIBUTES."""
    chosen = [name for name in ATTRIBUTES if rng.random() < rate]
    if len(chosen) > MAX_ATTRIBUTES:
        chosen = [chosen[i] for i in sorted(rng.choice(len(chosen), MAX_ATTRIBUTES, replace=False))]
    return tuple(chosen)


def sample_target(
    rng: np.random.Generator,
    num_subjects: int,
    id_range: tuple[int, int],
    *,
    attribute_rate: float = 0.2,
    relation: str | None = None,
    scenes: tuple[str, ...] | None = None,
    distinct_categories: bool = True,
    level: str = "full",
) -> SceneSpec:
    """A target scene with `num_subjects` (1..4) distinct identities from id_range.

    For 2 subjects the relation is `relation` or, if None, a random one of
    RELATIONS, and the layout makes it hold. For other counts `relation`
    must be None. attribute_rate: chance of each added attribute per subject;
    scenes: the target scenes to pick from (default all; references always
    use any other scene); distinct_categories: no two subjects of one shape,
    so a detector queried by category can tell them apart; level: a key of LEVELS.
    """
    lvl = get_level(level)
    if num_subjects not in lvl.subject_sizes:
        raise ValueError(f"num_subjects must be one of {sorted(lvl.subject_sizes)}, got {num_subjects}")
    if relation is not None and num_subjects != 2:
        raise ValueError(f"relations are sampled for 2 subjects only, got relation={relation!r} with {num_subjects}")
    scene_names = tuple(scenes) if scenes is not None else tuple(SCENES)
    ids = sample_identities(rng, num_subjects, id_range, distinct_categories, lvl)
    size_lo, size_hi = lvl.subject_sizes[num_subjects]
    subjects = [
        SubjectSpec(
            identity=i,
            size=round(float(rng.uniform(size_lo, size_hi)), 4),
            pose=sample_pose(rng),
            attributes=sample_attributes(rng, attribute_rate),
        )
        for i in ids
    ]
    if num_subjects == 2:
        relation = relation if relation is not None else RELATIONS[int(rng.integers(len(RELATIONS)))]
    if lvl.slots:
        subjects = place_slots(rng, subjects, relation, lvl.slot_jitter)
    elif num_subjects == 2:
        subjects = list(place_pair(rng, subjects[0], subjects[1], relation))
    else:
        subjects = place_free(rng, subjects)
    return SceneSpec(
        scene=scene_names[int(rng.integers(len(scene_names)))],
        scene_seed=int(rng.integers(2**31)),
        subjects=tuple(subjects),
        relation=relation,
    )


def sample_reference(rng: np.random.Generator, subject: SubjectSpec, target_scene: str,
                     level: str = "full") -> SceneSpec:
    """The subject's identity alone, no added attributes, in a scene other than
    target_scene, in a pose that differs from `subject.pose` (poses_differ), or at the
    `same_pose` level in the target's pose at another scale."""
    lvl = get_level(level)
    if lvl.same_pose:
        pose = subject.pose
    else:
        for _ in range(20):
            pose = sample_pose(rng)
            if poses_differ(pose, subject.pose):
                break
        else:
            pose = replace(pose, flip=not subject.pose.flip)
    others = [s for s in SCENES if s != target_scene]
    if lvl.reference_sizes is not None:
        size = float(rng.uniform(*lvl.reference_sizes))
    else:
        lo, hi = np.log(lvl.reference_scale)
        size = subject.size * lvl.reference_ratio * float(np.exp(rng.uniform(lo, hi)))
    lone = SubjectSpec(identity=subject.identity, size=round(size, 4), pose=pose)
    return SceneSpec(
        scene=others[int(rng.integers(len(others)))],
        scene_seed=int(rng.integers(2**31)),
        subjects=(place_centred(rng, lone, lvl.reference_jitter),),
    )


@dataclass(frozen=True)
class Example:
    """One sample: target scene, one reference scene per target subject, caption."""

    seed: int
    target: SceneSpec
    references: tuple[SceneSpec, ...]
    prompt: str

    def to_dict(self) -> dict:
        return {
            "seed": int(self.seed),
            "prompt": self.prompt,
            "target": self.target.to_dict(),
            "references": [r.to_dict() for r in self.references],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Example":
        return cls(
            seed=int(d["seed"]),
            target=SceneSpec.from_dict(d["target"]),
            references=tuple(SceneSpec.from_dict(r) for r in d["references"]),
            prompt=d["prompt"],
        )


def sample_example(
    seed: int,
    num_subjects: int,
    id_range: tuple[int, int],
    *,
    attribute_rate: float = 0.2,
    relation: str | None = None,
    scenes: tuple[str, ...] | None = None,
    distinct_categories: bool = True,
    level: str = "full",
) -> Example:
    """Deterministic Example for an integer seed (see sample_target for options)."""
    rng = np.random.default_rng([_SALT, int(seed), int(num_subjects)])
    target = sample_target(
        rng,
        num_subjects,
        id_range,
        attribute_rate=attribute_rate,
        relation=relation,
        scenes=scenes,
        distinct_categories=distinct_categories,
        level=level,
    )
    references = tuple(sample_reference(rng, s, target.scene, level) for s in target.subjects)
    variant = int(rng.integers(len(PROMPT_TEMPLATES[num_subjects])))
    return Example(seed=int(seed), target=target, references=references, prompt=build_prompt(target, variant))
