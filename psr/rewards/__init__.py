"""Rewards: batched scores of generated images, for RL training and for `psr eval`.

    from psr.rewards import RewardBatch, RewardSpec, build_rewards

    mix = build_rewards([RewardSpec("hungarian", 1.0, options={"localizer": {"name": "toyworld"},
                                                                "extractor": {"name": "toyworld"}}),
                         RewardSpec("clip_t", 0.5, options={"extractor": {"name": "clip", "path": "openai"}})])
    result = mix(RewardBatch(images, prompts, references, categories))
    result.total          # [B] float32: Σ weight · reward
    result.terms          # {"hungarian": [B], "hungarian/missing": [B], ..., "clip_t": [B]}
    result.details[b]     # {"hungarian": {...per-subject scores, boxes, failures}, "clip_t": {...}}

Rewards (`REWARDS`; exact definitions in docs/rewards.md):
    psr        PSR's pairwise subject consistency (detect, crop, DINO cosine per subject)
    hungarian  MultiCrafter's multi-ID alignment (all instances × references, Hungarian
               assignment, missing / duplicate penalties, leakage margins)
    clip_t     CLIP image-prompt cosine
    aesthetic  a linear head on CLIP image features (real preference models plug in as
               new entries)

A factory is `REWARDS[name](device="cpu", *, cache=None, **options)`; `REWARDS[name].Options`
is the dataclass of its options. Components are named by registry
(`extractor = {name = "dino", ...}`, `localizer = {name = "grounding-dino", ...}`, from
psr.core.features.FEATURE_EXTRACTORS and psr.core.detect.LOCALIZERS; for ToyWorld data,
`toyworld` in both) or passed as built objects from Python. A `ComponentCache` shared by
several rewards builds each distinct component once.

Recipes: `reward_specs_from_toml(list_of_tables, "rewards")` reads `[[rewards]]` tables whose
extra keys are options; a dataclass field `rewards: tuple[RewardSpec, ...]` read by
psr.core.recipe.build takes tables with an `options = {...}` table instead. Either way call
`check_reward_specs` in the recipe's `__post_init__` (distinct labels, at least one reward).

Helpers: psr.rewards.matching (hungarian_match, alignment_reward: the penalty rule),
psr.rewards.leakage (leakage_margins, sample_margin, margins_by_subset),
psr.rewards.position (POSITION_RULES, position_psrbench, position_correct,
canonical_relation, RELATION_PHRASES).
"""

from psr.rewards.base import COMPONENT_ERRORS, ComponentCache, Reward, RewardBatch, RewardResult
from psr.rewards.clip import AestheticReward, ClipTReward, load_linear_head
from psr.rewards.consistency import HungarianReward, PsrReward
from psr.rewards.leakage import leakage_margins, margins_by_subset, sample_margin
from psr.rewards.matching import Alignment, alignment_reward, hungarian_match
from psr.rewards.position import (POSITION_RULES, RELATION_PHRASES, canonical_relation, position_correct,
                                  position_psrbench)
from psr.rewards.registry import (REWARDS, RewardMix, RewardSpec, build_rewards, check_reward_specs,
                                  reward_specs_from_toml)

__all__ = [
    "COMPONENT_ERRORS",
    "POSITION_RULES",
    "RELATION_PHRASES",
    "REWARDS",
    "Alignment",
    "AestheticReward",
    "ClipTReward",
    "ComponentCache",
    "HungarianReward",
    "PsrReward",
    "Reward",
    "RewardBatch",
    "RewardMix",
    "RewardResult",
    "RewardSpec",
    "alignment_reward",
    "build_rewards",
    "canonical_relation",
    "check_reward_specs",
    "hungarian_match",
    "leakage_margins",
    "load_linear_head",
    "margins_by_subset",
    "position_correct",
    "position_psrbench",
    "reward_specs_from_toml",
    "sample_margin",
]
