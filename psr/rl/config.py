"""The `psr rl` recipe: online GRPO / GSPO over SDE rollouts, or offline FocusDPO.

Sections: `model` (the shared `ModelConfig`), `data` (where prompts and references come
from), `rollout` (groups, sampler, trained steps), `policy` (GRPO / GSPO settings), `dpo`
(FocusDPO settings), `train` (optimisation), `adapter` (the pretrain adapter table),
`[[rewards]]` (flat `RewardSpec` tables), `logging`, `checkpoint`, `eval`, plus `out`,
`objective` and `init`. Every invariant is checked here, before any weights load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

from psr.core.presets import PRESETS
from psr.core.recipe import require as _require
from psr.core.schema import ModelConfig, resolve_model
from psr.errors import RecipeError
from psr.rewards.registry import RewardSpec, check_reward_specs
from psr.rl.losses import GRPO_CLIP_RANGE, GSPO_CLIP_HIGH, GSPO_CLIP_LOW
from psr.train.config import LARGE_PRESETS, AdapterConfig, CheckpointConfig, LoggingConfig

OBJECTIVE_NAMES = ("grpo", "gspo", "focusdpo")
# GSPO's clip bounds before they were rescaled for psr's per-dimension log-probs.
PAPER_GSPO_CLIP = (3e-4, 4e-4)


@dataclass(frozen=True)
class RlDataConfig:
    """Where prompts, references and categories come from."""

    path: str = "data/synth-toy"
    """A `psr synth` dataset folder, or a PSRBench-format bench folder made from training
    identities (`psr synth --recipe recipes/bench-toy.toml --set toyworld.id_split=train`)."""
    subsets: tuple[str, ...] = ()
    """Bench subsets to draw from (bench folders only; empty: all)."""
    max_references: int = 4
    """Items with more references than this are skipped (and counted in the log)."""

    def __post_init__(self):
        _require(bool(self.path.strip()), "path", "must name a dataset or bench folder")
        _require(self.max_references >= 1, "max_references", "must be >= 1")


@dataclass(frozen=True)
class RolloutConfig:
    """How each step's samples are drawn: groups of G images per prompt, Flow-GRPO's SDE."""

    group_size: int = 8
    """G: images per prompt (Flow-GRPO: 8 to 24). focusdpo self-ranked: candidates per prompt."""
    groups_per_step: int = 2
    """Prompts per process per step: one group of G rollouts each (grpo/gspo), one pair
    each (focusdpo)."""
    same_noise: bool = True
    """All G rollouts of a group start from the same initial noise (the SDE noise differs)."""
    steps: int = 10
    """Denoising steps of a training rollout (Flow-GRPO: 10; evaluation uses eval.steps)."""
    noise_level: float = 0.7
    """a of the SDE step: std_dev_t = sqrt(σ/(1−σ))·a."""
    train_fraction: float = 0.6
    """Share of the denoising steps trained per step, drawn at random each step (DanceGRPO: 0.6)."""
    train_steps: tuple[int, ...] = ()
    """Explicit step indices to train (0 = the first, σ = 1); overrides train_fraction."""
    sde_steps: Literal["trained", "all"] = "trained"
    """"trained": only the trained steps are stochastic, the rest run as the ODE
    (Flow-GRPO-Fast-style branching); "all": every step is stochastic (DanceGRPO)."""
    size: int | None = None
    """Image side in pixels; None takes the preset's."""
    guidance: float | None = None
    """Guidance-embedding value; None takes the preset's."""

    def __post_init__(self):
        _require(self.group_size >= 2, "group_size",
                 f"GRPO-style training compares the rollouts of a prompt with each other, so it needs at "
                 f"least 2 per prompt to compute the advantages; you gave {self.group_size}: set "
                 f"rollout.group_size to 2 or more (Flow-GRPO uses 8 to 24)")
        _require(self.groups_per_step >= 1, "groups_per_step", "must be >= 1")
        _require(self.steps >= 1, "steps", "must be >= 1")
        _require(math.isfinite(self.noise_level) and self.noise_level > 0, "noise_level",
                 "must be > 0 (with 0 the step is deterministic and has no log-probability)")
        _require(0 < self.train_fraction <= 1, "train_fraction", "must lie in (0, 1]")
        bad = [j for j in self.train_steps if not 0 <= j < self.steps]
        _require(not bad, "train_steps", f"{bad[0] if bad else ''} is not a step index in [0, steps={self.steps})")
        _require(len(set(self.train_steps)) == len(self.train_steps), "train_steps", "lists a step twice")
        _require(self.size is None or self.size >= 16, "size", "must be >= 16 pixels")
        _require(self.guidance is None or self.guidance >= 0, "guidance", "must be >= 0")

    def trained_count(self) -> int:
        """How many steps each update trains."""
        return len(self.train_steps) or max(1, round(self.train_fraction * self.steps))


@dataclass(frozen=True)
class PolicyConfig:
    """The GRPO / GSPO update (docs/rl.md has the formulas)."""

    clip_range: float = GRPO_CLIP_RANGE
    """grpo: the per-step ratio is clipped to 1 ± clip_range (Flow-GRPO: 1e-4)."""
    clip_low: float = GSPO_CLIP_LOW
    """gspo: the sequence ratio is clipped to [1 − clip_low, 1 + clip_high]."""
    clip_high: float = GSPO_CLIP_HIGH
    advantage_scope: Literal["group", "batch"] = "group"
    """Divide by the group's reward std, or by the std of the whole batch (all processes)."""
    advantage_clip: float = 5.0
    """Advantages are clipped to ± this value."""
    kl_beta: float = 0.0
    """Weight of the closed-form KL to the reference (the model with its adapter disabled);
    Flow-GRPO: 0.04 or 0.01 (in its convention), later advice: start at 0 (no reference
    forwards then)."""
    kl_convention: Literal["flow_grpo", "exact"] = "flow_grpo"
    """"flow_grpo": Flow-GRPO's KL, ‖μθ − μref‖²/(2·std_dev_t²) without the step's |dt|, so
    its β values carry over; "exact": the Gaussian KL of the two transitions, 1/|dt| times
    larger (the only KL before this key existed)."""
    inner_epochs: int = 1
    """Passes over each rollout batch (Flow-GRPO's num_inner_epochs)."""
    mini_batches: int = 1
    """Optimizer steps per inner epoch: the process's groups_per_step · group_size
    trajectories are shuffled (per seed, step, epoch) and cut into this many equal
    mini-batches, one optimizer step each. From the second step on the policy has left the
    rollout's, so the ratios leave 1 and the clip can act."""

    def __post_init__(self):
        _require(self.clip_range > 0, "clip_range", "must be > 0")
        _require(0 < self.clip_low < 1, "clip_low", "must lie in (0, 1)")
        _require(self.clip_high > 0, "clip_high", "must be > 0")
        _require(self.advantage_clip > 0, "advantage_clip", "must be > 0")
        _require(math.isfinite(self.kl_beta) and self.kl_beta >= 0, "kl_beta", "must be >= 0 (0 turns KL off)")
        _require(self.inner_epochs >= 1, "inner_epochs", "must be >= 1")
        _require(self.mini_batches >= 1, "mini_batches", "must be >= 1")


@dataclass(frozen=True)
class DpoConfig:
    """FocusDPO: region-weighted Diffusion-DPO against the model with its adapter disabled."""

    pairs: Literal["toyworld-disrupted", "self-ranked"] = "toyworld-disrupted"
    """"toyworld-disrupted": winner = the dataset target, loser = the same scene with one
    subject's identity swapped (needs ToyWorld rows); "self-ranked": the model's own
    rollout.group_size ODE samples, best vs worst by the reward mix (needs [[rewards]])."""
    beta: float = 1000.0
    """β·T of Diffusion-DPO (T folded in); the errors are per-token means, so β is large."""
    timestep_mean: float = 0.0
    """σ = sigmoid(N(mean, std²)), then FLUX's resolution shift (as `psr pretrain`)."""
    timestep_std: float = 1.0
    focus: bool = True
    """Weight tokens by FocusDPO's structure + detail maps; false: plain Diffusion-DPO."""
    features: Literal["latent", "embedded"] = "latent"
    """Structure-map features: the VAE latent tokens, or those tokens after the transformer's
    input projection (x_embedder)."""
    top_k: int = 8
    """Structure map: mean of each target token's top-k cosines to a subject's tokens."""
    detail_on_below: float = 0.5
    """The detail map is added once σ < this (the semantics have settled)."""
    floor: float = 0.1
    """Weight floor of every token (> 0): background and layout are still trained."""
    detail_sigma: float = 1.0
    """Gaussian smoothing (pixels) before the local entropy of the detail map."""

    def __post_init__(self):
        _require(math.isfinite(self.beta) and self.beta > 0, "beta", "must be > 0")
        _require(self.timestep_std > 0, "timestep_std", "must be > 0")
        _require(self.top_k >= 1, "top_k", "must be >= 1")
        _require(0 <= self.detail_on_below <= 1, "detail_on_below", "must lie in [0, 1]")
        _require(self.floor > 0, "floor", "must be > 0 so that every token keeps a weight")
        _require(self.detail_sigma >= 0, "detail_sigma", "must be >= 0")


@dataclass(frozen=True)
class RlTrainConfig:
    """Optimisation (AdamW over the adapter, schedule, precision). `steps` counts rollout
    batches (grpo/gspo) or pair batches (focusdpo)."""

    steps: int = 200
    """Steps in total (a resumed run continues up to this number)."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup: int = 0
    """Steps of linear learning-rate warmup from 0."""
    schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    seed: int = 0
    """Decides prompt order, initial and SDE noise, trained steps, DPO noise and σ."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision; trainable weights stay float32."""
    gradient_checkpointing: bool = False
    ema_decay: float = 0.0
    """EMA of the trainable weights, used for eval and the final export; 0 turns it off."""
    micro_batch: int = 0
    """grpo/gspo: images per forward and backward of the update (0: a group's G at once).
    Memory only: the gradient is the same to float rounding."""

    def __post_init__(self):
        _require(self.steps >= 1, "steps", "must be >= 1")
        _require(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a finite number > 0")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(all(0 <= b < 1 for b in self.betas), "betas", "each must lie in [0, 1)")
        _require(self.eps > 0, "eps", "must be > 0")
        _require(self.warmup >= 0, "warmup", "must be >= 0")
        _require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 turns clipping off)")
        _require(self.seed >= 0, "seed", "must be >= 0")
        _require(0 <= self.ema_decay < 1, "ema_decay", "must lie in [0, 1) (0 turns EMA off)")
        _require(self.micro_batch >= 0, "micro_batch", "must be >= 0 (0: a group's images at once)")


@dataclass(frozen=True)
class RlEvalConfig:
    """Held-out evaluation: ODE samples of a bench slice, scored by the reward mix."""

    every: int = 0
    """Evaluate every N steps (and at the end); 0 turns evaluation off."""
    bench: str | None = None
    """A PSRBench-format bench folder of held-out identities (psr synth recipes/bench-toy.toml)."""
    subsets: tuple[str, ...] = ()
    """Subsets to evaluate (empty: all)."""
    limit: int = 4
    """The first N items of each subset."""
    steps: int | None = None
    """ODE sampling steps (Flow-GRPO: 40); None takes the preset's."""
    guidance: float | None = None
    size: int | None = None
    seed: int = 0
    """Item k uses noise seed seed + k, so every evaluation sees the same noise."""
    at_start: bool = True
    """Also evaluate before the first step of a fresh run (the baseline)."""
    metrics: tuple[RewardSpec, ...] = ()
    """`[[eval.metrics]]`: registered rewards scored on the evaluation images but never
    trained on, each logged as `eval/metric:<label or name>`. A policy that games its reward
    raises the reward but not a held-out metric (e.g. consistency in another feature space)."""

    def __post_init__(self):
        _require(self.every >= 0, "every", "must be >= 0 (0 turns evaluation off)")
        if self.metrics:
            check_reward_specs(self.metrics, "eval.metrics")
        _require(not self.every or self.bench, "bench", "evaluation needs a bench folder (or set eval.every = 0)")
        _require(self.limit >= 1, "limit", "must be >= 1")
        _require(self.steps is None or self.steps >= 1, "steps", "must be >= 1")
        _require(self.size is None or self.size >= 16, "size", "must be >= 16 pixels")
        _require(self.seed >= 0, "seed", "must be >= 0")


@dataclass(frozen=True)
class RlRecipe:
    """`psr rl`: GRPO / GSPO with rewards on SDE rollouts, or FocusDPO on preference pairs."""

    command: Literal["rl"] = "rl"
    out: str = "runs/rl"
    """Run folder: checkpoints/, tb/, log.jsonl, recipe.toml, final/ (`--out` overrides)."""
    objective: Literal["grpo", "gspo", "focusdpo"] = "gspo"
    init: str | None = None
    """Start from a `psr pretrain` (or `psr rl`) checkpoint folder, a final/ folder, or a
    LoRA file; a LoRA is merged into the base weights, which are then the reference policy."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="tiny"))
    data: RlDataConfig = field(default_factory=RlDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    dpo: DpoConfig = field(default_factory=DpoConfig)
    train: RlTrainConfig = field(default_factory=RlTrainConfig)
    adapter: AdapterConfig = field(default_factory=lambda: AdapterConfig(kind="lora"))
    rewards: tuple[RewardSpec, ...] = field(default_factory=lambda: (RewardSpec("hungarian", options={
        "extractor": {"name": "toyworld"}, "localizer": {"name": "toyworld"}}),))
    """`[[rewards]]` tables: name (psr, hungarian, clip_t, aesthetic), weight, label, and the
    reward's options flat beside them. Default: Hungarian alignment with ToyWorld's perception."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: RlEvalConfig = field(default_factory=RlEvalConfig)

    def __post_init__(self):
        _require(bool(self.out.strip()), "out", "must name a folder")
        _require(self.init is None or bool(self.init.strip()), "init", "must name a folder or file (or leave it out)")
        _require(self.model.device in ("auto", "cpu", "cuda", "mps"), "model.device",
                 f"{self.model.device!r}: training takes its GPUs from the launcher; use \"auto\" (or \"cpu\") "
                 "and pick GPUs with CUDA_VISIBLE_DEVICES or accelerate launch --gpu_ids")
        preset = self.model.preset
        reference_needed = self.objective == "focusdpo" or self.policy.kl_beta > 0
        if self.adapter.kind == "none":
            _require(not reference_needed, "adapter.kind",
                     "the reference policy is the model with its adapter disabled, so focusdpo and "
                     "policy.kl_beta > 0 need an adapter: set adapter.kind = \"lora\"")
            _require(preset not in LARGE_PRESETS, "adapter.kind",
                     f"full fine-tuning of {preset} needs ~200 GB for weights and AdamW state; "
                     "use adapter.kind = \"lora\"")
        dtype = self.model.dtype or PRESETS[preset].dtype
        if dtype != "float32" and self.adapter.kind != "none":
            wanted = {"bfloat16": "bf16", "float16": "fp16"}[dtype]
            _require(self.train.mixed_precision == wanted, "train.mixed_precision",
                     f"the frozen {dtype} weights need autocast: set train.mixed_precision = \"{wanted}\" "
                     f"(or model.dtype = \"float32\")")
        _require(not (self.train.mixed_precision == "fp16" and self.model.device == "cpu"),
                 "train.mixed_precision", "fp16 autocast needs CUDA; on the CPU use \"bf16\" or \"no\"")
        _require(self.data.max_references <= self.model.max_references, "data.max_references",
                 f"must be <= model.max_references ({self.model.max_references})")
        if self.rewards:
            check_reward_specs(self.rewards, "rewards")
            trained = {(spec.name, repr(sorted(spec.options.items()))) for spec in self.rewards}
            for k, spec in enumerate(self.eval.metrics):
                _require((spec.name, repr(sorted(spec.options.items()))) not in trained, f"eval.metrics[{k}]",
                         f"{spec.name} with these options is a training reward, so it is not held out; "
                         "change its options (e.g. another extractor) or drop it")
        else:
            needs = "grpo/gspo score rollouts" if self.objective != "focusdpo" else \
                "self-ranked pairs are ranked" if self.dpo.pairs == "self-ranked" else \
                "evaluation scores samples" if self.eval.every else ""
            _require(not needs, "rewards", f"{needs} with the reward mix: add at least one [[rewards]] table "
                                           "with a name (psr, hungarian, clip_t, aesthetic)")
        if self.uses_rollouts:
            batch = self.rollout.groups_per_step * self.rollout.group_size
            _require(batch % self.policy.mini_batches == 0, "policy.mini_batches",
                     f"{self.policy.mini_batches} does not divide the {batch} trajectories a process rolls out per "
                     f"step (rollout.groups_per_step · rollout.group_size); pick a divisor of {batch}")
        if self.eval.bench is not None:
            _require(self.eval.bench.rstrip("/") != self.data.path.rstrip("/"), "eval.bench",
                     "is the training source; evaluate on a held-out bench")

    @property
    def uses_rollouts(self) -> bool:
        return self.objective in ("grpo", "gspo")

    def hash_view(self) -> RlRecipe:
        """The recipe as the training hash sees it (`psr.train.config.training_hash`): a policy
        key the run never reads hashes as its value from before its default changed, so a new
        default moves the hash only of the runs it changes. The KL convention matters only
        with a KL term (kl_beta > 0 in grpo/gspo), else it hashes as "exact", the value that
        (as an added key, `ADDED_KEYS`) is left out; GSPO's clip bounds matter only to gspo."""
        policy = self.policy
        if self.objective == "focusdpo" or policy.kl_beta == 0:
            policy = replace(policy, kl_convention="exact")
        if self.objective != "gspo":
            policy = replace(policy, clip_low=PAPER_GSPO_CLIP[0], clip_high=PAPER_GSPO_CLIP[1])
        return self if policy == self.policy else replace(self, policy=policy)


def resolve_rl(recipe: RlRecipe) -> RlRecipe:
    """Fill every None that the preset decides (model dtype and sizes, sampler settings)."""
    preset = PRESETS[recipe.model.preset]
    model = resolve_model(recipe.model)
    default_guidance = preset.guidance if preset.guidance_embeds else 1.0  # rollouts apply no CFG
    rollout = replace(recipe.rollout, size=recipe.rollout.size or preset.size,
                      guidance=default_guidance if recipe.rollout.guidance is None else recipe.rollout.guidance)
    if not preset.guidance_embeds and rollout.guidance != 1.0:
        raise RecipeError("rollout.guidance", f"{rollout.guidance}: preset {recipe.model.preset!r} has no guidance "
                          "embedding and rollouts apply no classifier-free guidance; set it to 1")
    evaluation = replace(recipe.eval, steps=recipe.eval.steps or preset.steps, size=recipe.eval.size or rollout.size,
                         guidance=rollout.guidance if recipe.eval.guidance is None else recipe.eval.guidance)
    return replace(recipe, model=model, rollout=rollout, eval=evaluation)


# Keys that change how a run is operated, not what it computes: a resume may change them.
# train.micro_batch only splits forwards (like the attention backend, it moves float rounding).
OPERATIONAL = ("out", "train.steps", "logging", "checkpoint", "eval", "model.device", "model.cpu_offload",
               "model.attention_backend", "train.micro_batch")
