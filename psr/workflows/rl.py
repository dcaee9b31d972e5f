"""`psr rl`: online GRPO / GSPO over Flow-GRPO's SDE rollouts, or FocusDPO on preference pairs.

One loop in phases: `setup` (recipe, prompt source, accelerator, model, `init`, adapter,
optimizer, rewards, resume), `train` (steps, logs, held-out evaluation, checkpoints),
`save_checkpoint` (atomic, exactly resumable, `psr.train.checkpoint`), `finish` (the final
export, `psr.train.export`) and `cleanup`. A step is `grpo_step` (rollouts, rewards,
advantages, `policy.inner_epochs` × `policy.mini_batches` optimizer steps; psr/rl/grpo.py) or
`dpo_step` (one pair per prompt, one optimizer step; psr/rl/dpo.py). See docs/rl.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from psr.core.adapters import apply_adapter, load_trainable
from psr.core.io import prepare_output_dir, write_json_atomic, write_text_atomic
from psr.core.lora import moe_aux_loss
from psr.core.model import MultiRefFlux
from psr.core.presets import PRESETS
from psr.core.recipe import load_recipe, to_toml
from psr.core.runlock import holding
from psr.core.weights import frozen_count, load_weights
from psr.errors import UserError
from psr.rewards import build_rewards
from psr.rl import dpo, grpo
from psr.rl.advantages import group_advantages
from psr.rl.config import OPERATIONAL, RlRecipe, resolve_rl
from psr.rl.evaluation import evaluate
from psr.rl.grpo import TimedReward
from psr.rl.policy import Policy
from psr.rl.sources import check_source, draw_indices, eval_items, open_source
from psr.train import checkpoint as ckpt
from psr.train import optim
from psr.train.config import recipe_difference, training_hash
from psr.train.export import export_final
from psr.train.launch import make_accelerator
from psr.train.logs import TrainLog, check_tensorboard
from psr.train.objective import sample_sigmas
from psr.workflows.pretrain import _check_finite

PAIR, DPO_NOISE = 0xFA12, 0xD90


class RlLog(TrainLog):
    def note(self, text: str) -> None:
        self.echo(f"psr rl: {text}")


@dataclass
class Run:
    recipe: RlRecipe
    out: Path
    accelerator: Any
    model: Any
    module: Any  # the prepared (maybe DDP-wrapped) transformer that gradient forwards go through
    policy: Any
    named: list
    optimizer: Any
    scheduler: Any
    ema: Any
    source: Any
    eval_items: list
    reward: TimedReward | None
    log: Any
    digest: str
    recipe_toml: str
    start: int
    metrics: dict = dataclasses.field(default_factory=dict)
    """Held-out evaluation metrics (`eval.metrics`): label → reward mix, never trained on."""
    frozen_below: list = dataclasses.field(default_factory=list)
    """Weights loaded as frozen modules below the trained adapter (psr.core.weights)."""


def setup(recipe: RlRecipe, resume: bool, show_progress: bool, rewards: Callable | None = None) -> Run:
    recipe = resolve_rl(recipe)
    # Everything that can be checked without weights comes first: bad input costs nothing.
    source = open_source(recipe.data.path, recipe.data.subsets, recipe.data.max_references)
    check_source(recipe, source, PRESETS[recipe.model.preset].token_stride)
    held_out = eval_items(recipe.eval.bench, recipe.eval.subsets, recipe.eval.limit, recipe.model.max_references) \
        if recipe.eval.every else []
    if recipe.logging.tensorboard:
        check_tensorboard()
    out = prepare_output_dir(recipe.out)
    digest = training_hash(recipe, OPERATIONAL)

    def changed_at(checkpoint: Path) -> str:
        old = resolve_rl(load_recipe(RlRecipe, str(checkpoint / "recipe.toml")))
        return recipe_difference(old, recipe, OPERATIONAL)

    latest, state = ckpt.resumable_checkpoint(out, digest, resume, changed_at)
    ckpt.check_planned_steps(latest, recipe.train.schedule, recipe.train.steps)

    from accelerate.utils import set_seed

    accelerator = make_accelerator(recipe.model.device, recipe.train.mixed_precision)
    device = accelerator.device
    if recipe.train.mixed_precision == "fp16" and device.type != "cuda":
        raise UserError(f"train.mixed_precision fp16: needs CUDA, this run is on {device.type}; use bf16 or no")
    if latest is not None and state.get("world_size") != accelerator.num_processes:
        raise UserError(f"--resume: {latest} was written by {state.get('world_size')} process(es), this run has "
                        f"{accelerator.num_processes}; prompts are split by process, so resume with the same number")

    model = MultiRefFlux.from_config(dataclasses.replace(recipe.model, device=str(device)))
    for frozen in (model.vae, model.components.text_encoder, model.components.text_encoder_2):
        frozen.requires_grad_(False).eval()
    transformer = model.transformer
    if not transformer.config.guidance_embeds and recipe.rollout.guidance != 1.0:
        raise UserError(f"rollout.guidance {recipe.rollout.guidance}: this model has no guidance embedding, and "
                        "rollouts sample the unguided policy whose log-probabilities GRPO/GSPO/DPO use "
                        "(no classifier-free guidance); set rollout.guidance = 1")
    # Weights kept as frozen modules (MoE-LoRA, reference-only LoRA) stay below the trained
    # adapter; the result records them so that loading it brings them along.
    below = [recipe.model.weights] if frozen_count(transformer) else []
    count = frozen_count(transformer)
    init_note = load_weights(transformer, recipe.init, key="init") if recipe.init else None
    if frozen_count(transformer) > count:
        below.append(recipe.init)
    below = [str(Path(b).expanduser().resolve()) for b in below]
    set_seed(recipe.train.seed)  # adapter initialisation; every draw of a step has its own generator
    named = apply_adapter(transformer, recipe.adapter)
    transformer.to(device).train()
    if recipe.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = optim.build_optimizer([p for _, p in named], recipe.train)
    module, optimizer = accelerator.prepare(transformer, optimizer)
    scheduler = optim.build_scheduler(optimizer, recipe.train)
    ema = optim.EMA(named, recipe.train.ema_decay) if recipe.train.ema_decay > 0 and accelerator.is_main_process \
        else None
    needs_rewards = recipe.uses_rollouts or recipe.dpo.pairs == "self-ranked" or recipe.eval.every > 0
    if rewards is None and recipe.rewards and needs_rewards:
        rewards = build_rewards(recipe.rewards, device)
    # Held-out metrics: one mix each, so every metric is its own column.
    metrics = {spec.label or spec.name: build_rewards([spec], device) for spec in recipe.eval.metrics} \
        if recipe.eval.every and accelerator.is_main_process else {}
    if latest is not None:
        saved = ckpt.load_checkpoint(latest, accelerator.process_index)
        load_trainable(named, saved["trainable"], str(latest))
        if saved["accelerate"] is not None:  # FSDP / DeepSpeed: sharded optimizer state
            accelerator.load_state(str(saved["accelerate"]))
        else:
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if ema is not None:
            ema.load_state_dict(saved["ema"] or saved["trainable"])
        if saved["rng"] is not None:
            ckpt.set_rng_state(saved["rng"])
    elif resume and accelerator.is_main_process:
        print(f"psr rl: --resume: no checkpoint in {out / 'checkpoints'}, starting at step 0", file=sys.stderr)
    start = state["step"]
    log = None
    recipe_toml = to_toml(recipe, header=f"resolved recipe of psr rl run {out}")
    if accelerator.is_main_process:
        from tqdm import tqdm

        ckpt.remove_stale(out / "checkpoints")
        write_text_atomic(out / "recipe.toml", recipe_toml)
        log = RlLog(out, tensorboard=recipe.logging.tensorboard, resume_step=start, total_steps=recipe.train.steps,
                    echo=lambda s: tqdm.write(s, file=sys.stdout))
        count = sum(p.numel() for _, p in named)
        log.note(f"{recipe.objective} on {source.summary()}; {count:,} trainable weights ({recipe.adapter.kind})"
                 + (f"; init: {init_note}" if init_note else "") + f"; {accelerator.num_processes} process(es) "
                 f"on {device}; " + (f"resuming at step {start}" if start else "starting at step 0"))
    return Run(recipe=recipe, out=out, accelerator=accelerator, model=model, module=module,
               policy=Policy(model, module, accelerator.autocast), named=named, optimizer=optimizer,
               scheduler=scheduler, ema=ema, source=source, eval_items=held_out,
               reward=TimedReward(rewards) if rewards is not None else None, log=log, digest=digest,
               recipe_toml=recipe_toml, start=start, metrics=metrics, frozen_below=below)


# ---------------------------------------------------------------------------- steps
def _sync(run: Run):
    return lambda last: contextlib.nullcontext() if last else run.accelerator.no_sync(run.module)


def _aux(run: Run):
    if run.recipe.adapter.kind != "moe_lora":
        return None

    return lambda: run.recipe.adapter.aux_weight * moe_aux_loss(run.model.transformer)


def _optimizer_step(run: Run) -> float:
    """Clip, step, zero the gradients, update the EMA; returns the gradient norm."""
    acc = run.accelerator
    grad_norm = float(acc.clip_grad_norm_([p for _, p in run.named], run.recipe.train.grad_clip or float("inf")))
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.update()
    return grad_norm


def _gather(run: Run, values):
    acc = run.accelerator
    return acc.gather(values.to(acc.device)).cpu() if acc.num_processes > 1 else values.cpu()


def grpo_step(run: Run, step: int) -> dict[str, float]:
    """Rollouts, rewards, advantages, then `policy.inner_epochs` epochs of `policy.mini_batches`
    optimizer steps each; the logged terms are means over those optimizer steps."""
    r, acc = run.recipe, run.accelerator
    rank, seed, g = acc.process_index, r.train.seed, r.rollout.group_size
    begin, reward_before = time.perf_counter(), run.reward.seconds
    chosen = grpo.trained_steps(r.rollout, seed, step)
    indices = draw_indices(len(run.source.items), seed, step, rank, acc.num_processes, r.rollout.groups_per_step)
    run.model.transformer.eval()
    first = rank * r.rollout.groups_per_step  # this process's groups in the step's global batch
    groups = [grpo.rollout(run.policy, run.source.items[i], r.rollout, chosen, seed, step, first + k)
              for k, i in enumerate(indices)]
    rolled = time.perf_counter()
    result = run.reward(grpo.reward_batch(groups))
    scored = time.perf_counter()
    totals = _gather(run, result.total.float())
    advantages = group_advantages(totals, g, r.policy.advantage_scope, r.policy.advantage_clip)
    local = len(result.total)
    advantages = advantages[rank * local:(rank + 1) * local]
    terms = {name: _gather(run, values.float()) for name, values in result.terms.items()}
    run.model.transformer.train()
    sums: dict[str, float] = {}
    updates = 0
    for epoch in range(r.policy.inner_epochs):
        for rows in grpo.mini_batches(local, r.policy.mini_batches, seed, step, rank, epoch):
            part = grpo.update(run.policy, groups, advantages, chosen, r.objective, r.policy, r.rollout.noise_level,
                               rows=rows, micro_batch=r.train.micro_batch, backward=acc.backward, sync=_sync(run),
                               aux=_aux(run))
            part = _check_finite(run, step + 1, part)
            part["grad_norm"] = _optimizer_step(run)
            for key, value in part.items():
                sums[key] = sums.get(key, 0.0) + value
            updates += 1
    stats = {key: value / updates for key, value in sums.items()}
    stats["optimizer_steps"] = float(updates)
    end = time.perf_counter()
    reward_seconds = run.reward.seconds - reward_before
    return {**stats, **grpo.reward_stats(totals, terms, g),
            "rollout_images_per_s": len(totals) / max(rolled - begin, 1e-9),
            "update_steps_per_s": updates / max(end - scored, 1e-9),
            "reward_time_share": reward_seconds / max(end - begin, 1e-9)}


def dpo_step(run: Run, step: int) -> dict[str, float]:
    """One pair per prompt, the FocusDPO loss, one optimizer step."""
    import torch

    r, acc = run.recipe, run.accelerator
    rank, seed = acc.process_index, r.train.seed
    begin = time.perf_counter()
    reward_before = run.reward.seconds if run.reward is not None else 0.0
    indices = draw_indices(len(run.source.items), seed, step, rank, acc.num_processes, r.rollout.groups_per_step)
    run.model.transformer.eval()
    pairs, results = [], []
    first = rank * r.rollout.groups_per_step  # this process's pairs in the step's global batch
    # Seeds of the pair's global index (0 where the process index was: one-process runs draw as before).
    for k, i in enumerate(indices):
        item = run.source.items[i]
        if r.dpo.pairs == "toyworld-disrupted":
            pairs.append(dpo.disrupted(run.policy, item, grpo.seed_of(seed, step, 0, first + k, PAIR),
                                       r.rollout.guidance, r.dpo))
        else:
            seeds = [grpo.seed_of(seed, step, 0, first + k, j, grpo.NOISE) for j in range(r.rollout.group_size)]
            pair, result = dpo.self_ranked(run.policy, item, r.rollout, seeds, run.reward, r.dpo)
            pairs.append(pair)
            results.append(result)
    built = time.perf_counter()
    run.model.transformer.train()
    valid = sum(p.weight for p in pairs)
    sums: dict[str, float] = {}
    sync = _sync(run)
    for k, pair in enumerate(pairs):
        gen = grpo.generator(seed, step, 0, first + k, DPO_NOISE)
        length = pair.x0.shape[1]
        sigma = float(sample_sigmas(gen, 1, r.dpo.timestep_mean, r.dpo.timestep_std,
                                    run.model.components.scheduler.config, length)[0])
        noise = torch.randn((1, *pair.x0.shape[1:]), generator=gen)
        with sync(k == len(pairs) - 1), run.policy.token_mask(pair.cond):
            loss, stats = dpo.pair_loss(run.policy, pair, sigma, noise, r.dpo)
            acc.backward(loss * (pair.weight / max(valid, 1.0)))
        for key, value in {"loss": loss.item(), **stats}.items():
            sums[key] = sums.get(key, 0.0) + value * pair.weight
    # Means over the valid pairs of every process (a tie of a self-ranked group has weight 0).
    keys = sorted(sums) or ["loss"]
    values = torch.tensor([valid] + [sums.get(k, 0.0) for k in keys], dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        values = acc.reduce(values, reduction="sum")
    count, values = float(values[0]), values[1:].tolist()
    out: dict[str, float] = {"pairs": count}
    if count > 0:
        out.update(_check_finite(run, step + 1, {k: v / count for k, v in zip(keys, values)}))
        out["grad_norm"] = _optimizer_step(run)
    else:
        run.optimizer.zero_grad(set_to_none=True)
    end = time.perf_counter()
    out["pairs_per_s"] = len(pairs) * acc.num_processes / max(end - begin, 1e-9)
    if results:
        totals = _gather(run, torch.cat([res.total.float() for res in results]))
        terms = {name: _gather(run, torch.cat([res.terms[name].float() for res in results]))
                 for name in results[0].terms}
        out.update(grpo.reward_stats(totals, terms, r.rollout.group_size))
        out["rollout_images_per_s"] = len(totals) / max(built - begin, 1e-9)
        out["reward_time_share"] = (run.reward.seconds - reward_before) / max(end - begin, 1e-9)
    return out


# ---------------------------------------------------------------------------- loop
def save_checkpoint(run: Run, step: int) -> Path:
    state = {"recipe_hash": run.digest, "objective": run.recipe.objective, "adapter": run.recipe.adapter.kind}
    if run.frozen_below:
        state["frozen_below"] = run.frozen_below
    return ckpt.save_checkpoint(run.out / "checkpoints", step, accelerator=run.accelerator,
                                trainable={n: p for n, p in run.named},
                                ema=run.ema.state_dict() if run.ema is not None else None,
                                optimizer=run.optimizer, scheduler=run.scheduler, state=state,
                                recipe_toml=run.recipe_toml, keep_last=run.recipe.checkpoint.keep_last)


def run_eval(run: Run, step: int) -> dict[str, float]:
    """Held-out evaluation on the main process (EMA weights when on); the others wait."""
    values = {}
    if run.accelerator.is_main_process:
        with run.ema.applied() if run.ema is not None else contextlib.nullcontext():
            values = evaluate(run.model, run.eval_items, run.reward, run.recipe.eval, run.accelerator.autocast,
                              run.out / "eval", step, run.metrics)
        run.log.write(step, values)
    run.accelerator.wait_for_everyone()
    return values


def train(run: Run, show_progress: bool = True) -> dict[str, float]:
    """Steps from `run.start` to `train.steps`; returns the last logged values."""
    from tqdm import tqdm

    r, acc = run.recipe, run.accelerator
    main = acc.is_main_process
    step_fn = grpo_step if r.uses_rollouts else dpo_step
    window: dict[str, float] = {}
    counts: dict[str, int] = {}
    logged: dict[str, float] = {}
    if r.eval.every and r.eval.at_start and run.start == 0:
        run_eval(run, 0)
    with tqdm(total=r.train.steps, initial=run.start, desc=f"rl {r.objective}", unit="step", file=sys.stderr,
              disable=not show_progress or not main) as bar:
        for step in range(run.start, r.train.steps):
            lr = run.scheduler.get_last_lr()[0]
            terms = step_fn(run, step)
            run.scheduler.step()
            done = step + 1
            for key, value in {**terms, "lr": lr}.items():
                if math.isfinite(value):  # a term undefined for every sample of a step is left out
                    window[key] = window.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
            bar.update(1)
            if main and (done % r.logging.every == 0 or done == r.train.steps):
                logged = {k: v / counts[k] for k, v in window.items()}
                run.log.write(done, logged)
                window, counts = {}, {}
            if r.eval.every and (done % r.eval.every == 0 or done == r.train.steps):
                run_eval(run, done)
            if done % r.checkpoint.every == 0 or done == r.train.steps:
                save_checkpoint(run, done)
    return logged


def finish(run: Run) -> dict:
    """The final export (main process) and the run's summary."""
    r = run.recipe
    out = {"step": r.train.steps, "final": str(run.out / "final"), "main_process": run.accelerator.is_main_process,
           "checkpoint": str(ckpt.latest_checkpoint(run.out / "checkpoints"))}
    if run.accelerator.is_main_process:
        folder = export_final(run.model, r, run.named, run.ema, run.out / "final", r.train.steps, run.digest)
        card = "psr_model.json" if r.adapter.kind == "none" else "psr_lora.json"
        info = {"trained": True, "note": f"psr rl ({r.objective}), step {r.train.steps}", "step": r.train.steps,
                "recipe_hash": run.digest, "ema": run.ema is not None, "objective": r.objective, "init": r.init}
        if run.frozen_below:
            info["frozen_below"] = run.frozen_below
        write_json_atomic(folder / card, info)
        merged = r.init and str(Path(r.init).expanduser().resolve()) not in run.frozen_below
        run.log.note(f"done: {r.train.steps} steps; final export in {folder}"
                     + (f" (an adapter on top of the merged init {r.init})" if merged else "")
                     + (f" (loading it loads {', '.join(run.frozen_below)} below it)" if run.frozen_below else ""))
    run.accelerator.wait_for_everyone()
    return out


def cleanup(run: Run) -> None:
    if run.log is not None:
        run.log.close()


def run_rl(recipe: RlRecipe, resume: bool = False, show_progress: bool = True,
           rewards: Callable | None = None) -> dict:
    """Train (or continue with `resume`) as the recipe says; returns a summary dict.

    rewards: from Python, a reward callable (`RewardBatch` → `RewardResult`) used instead of
    building the recipe's `[[rewards]]` (a custom reward, or one that is already loaded).
    Raises `UserError` for bad input (before any weights load where possible) and
    `TrainingError` when a loss term stops being finite.
    """
    # One run per folder: a second run (even with --resume) while this one lives would
    # interleave checkpoints and clean the live run's unfinished ones.
    with holding(recipe.out, "psr rl"):
        run = setup(recipe, resume, show_progress, rewards)
        try:
            last = train(run, show_progress)
            summary = finish(run)
        finally:
            cleanup(run)
    return {**summary, "terms": last}
