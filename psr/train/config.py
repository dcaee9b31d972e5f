"""The `psr pretrain` recipe: in-context flow-matching fine-tuning of the multi-reference core.

Sections: `model` (the shared `ModelConfig`), `data`, `train`, `adapter`, `[[regularizers]]`
(`psr.core.regularizers.RegularizerSpec`), `logging`, `checkpoint`, `samples`, and `out`.
Every invariant is checked here, before any weights load, with the fix in the message.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from psr.core.adapters import AdapterConfig
from psr.core.presets import PRESETS
from psr.core.recipe import require as _require
from psr.core.regularizers import RegularizerSpec
from psr.core.schema import ModelConfig, resolve_model
from psr.toyworld.sampling import LEVELS

LARGE_PRESETS = ("flux-dev", "flux-kontext")


@dataclass(frozen=True)
class DataConfig:
    """Which `psr synth` dataset to train on and how to read it."""

    path: str = "data/synth-toy"
    """A dataset folder written by `psr synth` (or a PSRBench-format export with ground truth)."""
    max_references: int = 4
    """Rows with more references than this are skipped (and counted in the log)."""
    num_workers: int = 0
    """DataLoader worker processes (decoding, resizing, labels); 0 reads in the main process."""
    cache: bool = False
    """Keep VAE latents and prompt embeddings of every row in CPU memory after the first
    encode (each image and prompt encoded alone, so cached and fresh values are equal)."""

    def __post_init__(self):
        _require(bool(self.path.strip()), "path", "must name a dataset folder (psr synth --out DIR)")
        _require(self.max_references >= 1, "max_references", "must be >= 1")
        _require(self.num_workers >= 0, "num_workers", "must be >= 0")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: flow matching on the target tokens, AdamW, schedule, precision."""

    steps: int = 1000
    """Optimizer steps in total (a resumed run continues up to this number)."""
    batch_size: int = 1
    """Samples per device per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step; the effective batch is batch_size·grad_accum·processes."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup: int = 0
    """Steps of linear learning-rate warmup from 0."""
    schedule: Literal["constant", "cosine"] = "constant"
    """After warmup: constant, or cosine decay to 0 at `steps`."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    seed: int = 0
    """Decides data order, noise, timesteps and dropout; the same seed gives the same run."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast precision; trainable weights stay float32. fp16 needs CUDA, bf16 a device with bf16."""
    gradient_checkpointing: bool = False
    """Recompute transformer blocks in backward (less memory, about 30% more time)."""
    ema_decay: float = 0.0
    """Exponential moving average of the trainable weights (MOSAIC: 0.99); 0 turns it off.
    Sample grids and the final export use the EMA weights when it is on."""
    timestep_mean: float = 0.0
    """Logit-normal timesteps: σ = sigmoid(N(mean, std²)), then FLUX's resolution shift."""
    timestep_std: float = 1.0
    resolution_shift: bool = True
    """Shift σ as the checkpoint's scheduler config does for this many target tokens."""
    guidance: float = 1.0
    """Guidance-embedding value during training (models with guidance_embeds only)."""
    drop_text: float = 0.05
    """Probability that a sample's prompt is replaced by the empty prompt."""
    drop_refs: float = 0.05
    """Probability that a sample's references are all left out."""
    drop_both: float = 0.05
    """Probability that both are dropped (the three events are exclusive)."""
    subject_weight: float = 1.0
    """Loss weight of target tokens inside a subject's mask, against 1 for the rest (the
    loss is the weighted mean). Subjects cover ~14% of a 2-subject ToyWorld target, and
    identity lives there; 1 is the plain mean. Rows without masks weigh every token 1."""
    allow_large_full_finetune: bool = False
    """Allow adapter.kind = "none" on flux-dev/flux-kontext (12B weights: float32 master
    weights and AdamW state need ~200 GB, so FSDP or DeepSpeed across GPUs)."""

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum"):
            _require(getattr(self, name) >= 1, name, "must be >= 1")
        _require(self.lr > 0 and math.isfinite(self.lr), "lr", "must be a finite number > 0")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(all(0 <= b < 1 for b in self.betas), "betas", "each must lie in [0, 1)")
        _require(self.eps > 0, "eps", "must be > 0")
        _require(self.warmup >= 0, "warmup", "must be >= 0")
        _require(self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 turns clipping off)")
        _require(self.seed >= 0, "seed", "must be >= 0")
        _require(0 <= self.ema_decay < 1, "ema_decay", "must lie in [0, 1) (0 turns EMA off)")
        _require(self.timestep_std > 0, "timestep_std", "must be > 0")
        _require(self.guidance >= 0, "guidance", "must be >= 0")
        _require(self.subject_weight > 0 and math.isfinite(self.subject_weight), "subject_weight",
                 "must be a finite number > 0 (1 weighs subject and background tokens alike)")
        for name in ("drop_text", "drop_refs", "drop_both"):
            _require(0 <= getattr(self, name) <= 1, name, "must be a probability in [0, 1]")
        _require(self.drop_text + self.drop_refs + self.drop_both <= 1, "drop_both",
                 "drop_text + drop_refs + drop_both must be <= 1 (the three events are exclusive)")


@dataclass(frozen=True)
class LoggingConfig:
    """Loss terms, learning rate, gradient norm and throughput."""

    every: int = 10
    """Log every N optimizer steps (stdout, out/log.jsonl, TensorBoard)."""
    tensorboard: bool = True
    """Write TensorBoard events to out/tb."""

    def __post_init__(self):
        _require(self.every >= 1, "every", "must be >= 1")


@dataclass(frozen=True)
class CheckpointConfig:
    """Atomic, exactly resumable checkpoints in out/checkpoints/step_XXXXXX."""

    every: int = 500
    """Checkpoint every N optimizer steps (and always at the last step)."""
    keep_last: int = 3
    """Keep the newest K checkpoints; older ones are deleted after a new one is complete."""

    def __post_init__(self):
        _require(self.every >= 1, "every", "must be >= 1")
        _require(self.keep_last >= 1, "keep_last", "must be >= 1")


@dataclass(frozen=True)
class SamplesConfig:
    """Fixed sample grids (out/samples/step_XXXXXX.png) from held-out prompts and references."""

    every: int = 0
    """Write a grid every N optimizer steps (and at the end); 0 turns samples off."""
    count: int = 4
    """Rows of the grid: one prompt with its references each."""
    subjects: tuple[int, ...] = (1, 2, 3)
    """Row k shows subjects[k mod len] subjects (ToyWorld eval identities)."""
    level: str = "full"
    """ToyWorld level of those rows (psr.toyworld.sampling.LEVELS), as the training data's."""
    dataset: str | None = None
    """Draw rows from this dataset folder (its first rows) instead of ToyWorld's eval identities."""
    seed: int = 0
    """Row k uses noise seed seed + k; ToyWorld rows come from example seed 2·10⁹ + seed + k."""
    steps: int | None = None
    """Denoising steps; None takes the preset's."""
    guidance: float | None = None
    """Guidance value; None takes the preset's."""
    size: int | None = None
    """Image side in pixels; None takes the preset's."""

    def __post_init__(self):
        _require(self.every >= 0, "every", "must be >= 0 (0 turns samples off)")
        _require(self.count >= 1, "count", "must be >= 1")
        _require(len(self.subjects) >= 1 and all(1 <= k <= 4 for k in self.subjects), "subjects",
                 "give subject counts between 1 and 4")
        _require(self.seed >= 0, "seed", "must be >= 0")
        _require(self.steps is None or self.steps >= 1, "steps", "must be >= 1")
        _require(self.size is None or self.size >= 16, "size", "must be >= 16 pixels")

        _require(self.level in LEVELS, "level", f"unknown level {self.level!r}; known: {', '.join(LEVELS)}")


@dataclass(frozen=True)
class PretrainRecipe:
    """`psr pretrain`: flow matching on `[text | noisy target | refs]` plus attention regularizers."""

    command: Literal["pretrain"] = "pretrain"
    out: str = "runs/pretrain"
    """Run folder: checkpoints/, samples/, tb/, log.jsonl, final/ (`--out` overrides)."""
    model: ModelConfig = field(default_factory=lambda: ModelConfig(preset="tiny"))
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    regularizers: tuple[RegularizerSpec, ...] = ()
    """`[[regularizers]]` tables: name (idar, mosaic_align, mosaic_sep), weight, blocks, warmup."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)

    def __post_init__(self):
        _require(bool(self.out.strip()), "out", "must name a folder")
        _require(self.model.device in ("auto", "cpu", "cuda", "mps"), "model.device",
                 f"{self.model.device!r}: training takes its GPUs from the launcher; use \"auto\" (or \"cpu\") "
                 "and pick GPUs with CUDA_VISIBLE_DEVICES or accelerate launch --gpu_ids")
        preset = self.model.preset
        if self.adapter.kind == "none" and preset in LARGE_PRESETS:
            _require(self.train.allow_large_full_finetune, "adapter.kind",
                     f"full fine-tuning of {preset} needs ~200 GB for float32 weights and AdamW state; use "
                     f"adapter.kind = \"lora\", or set train.allow_large_full_finetune = true and shard with "
                     f"FSDP/DeepSpeed through `accelerate launch --config_file ...`")
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
        _require(not self.regularizers or self.model.reference_mode == "joint", "regularizers",
                 "attention regularizers read reference↔target attention, which model.reference_mode = "
                 "\"cached\" does not compute (references attend only to themselves); use reference_mode "
                 "\"joint\" or leave the regularizers out")
        names = [s.name for s in self.regularizers]
        dup = sorted({n for n in names if names.count(n) > 1})
        _require(not dup, "regularizers", f"{dup[0] if dup else ''!r} is listed twice; give each regularizer once")


def resolve_pretrain(recipe: PretrainRecipe) -> PretrainRecipe:
    """Fill every None that the preset decides (model dtype, sizes, sample settings)."""
    preset = PRESETS[recipe.model.preset]
    model = resolve_model(recipe.model)
    samples = replace(
        recipe.samples,
        steps=recipe.samples.steps or preset.steps,
        guidance=preset.guidance if recipe.samples.guidance is None else recipe.samples.guidance,
        size=recipe.samples.size or preset.size,
    )
    return replace(recipe, model=model, samples=samples)


# Keys that change how a run is operated, not what it computes: a resume may change them.
OPERATIONAL = ("out", "train.steps", "logging", "checkpoint", "samples", "data.num_workers", "data.cache",
               "model.device", "model.cpu_offload", "model.attention_backend")


# Keys added after runs were already written, with the default that means "as before": at
# that default they are left out of the hash, so those runs still resume (`--resume`).
ADDED_KEYS = {"model.weights": None, "train.subject_weight": 1.0, "model.reference_resize": "longest",
              "model.reference_mode": "joint",
              # psr rl's (RlRecipe.hash_view hashes an unused KL convention as "exact")
              "policy.mini_batches": 1, "policy.kl_convention": "exact"}


def _hashed(recipe) -> dict:
    """The recipe as the hash sees it: `model.reference_resize` is the rule that runs, so an
    unresolved None and the preset's rule it stands for hash alike. A recipe class may also
    define `hash_view()`: the same recipe with the keys it never reads at neutral values."""
    view = getattr(recipe, "hash_view", None)
    if callable(view):
        recipe = view()
    data = dataclasses.asdict(recipe)
    if isinstance(getattr(recipe, "model", None), ModelConfig):
        data["model"]["reference_resize"] = recipe.model.resize_rule
        if recipe.model.position_scheme is None:  # left to the model card: hash the scheme that runs
            data["model"]["position_scheme"] = resolve_model(recipe.model).position_scheme
    return data


def _flat(data: dict, prefix: str = "", operational: tuple[str, ...] = OPERATIONAL) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if any(path == k or path.startswith(k + ".") for k in operational):
            continue
        if path in ADDED_KEYS and value == ADDED_KEYS[path]:
            continue
        if isinstance(value, dict):
            out.update(_flat(value, path + ".", operational))
        else:
            out[path] = value
    return out


def training_hash(recipe: PretrainRecipe, operational: tuple[str, ...] = OPERATIONAL) -> str:
    """Hash of everything that decides the weights a run computes (any recipe dataclass;
    `operational` names the keys left out, as dotted prefixes)."""
    flat = _flat(_hashed(recipe), operational=operational)
    return hashlib.sha256(repr(sorted(flat.items())).encode()).hexdigest()[:16]


def recipe_difference(old: PretrainRecipe, new: PretrainRecipe, operational: tuple[str, ...] = OPERATIONAL) -> str:
    """The first key (outside `operational`) whose value differs, with both values."""
    a = _flat(_hashed(old), operational=operational)
    b = _flat(_hashed(new), operational=operational)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            return f"{key} ({a.get(key)!r} in the checkpoint, {b.get(key)!r} now)"
    # Every key agrees, so the hash itself was computed differently: another psr version.
    return "no key (the checkpoint was written by a psr version that hashes recipes differently)"

