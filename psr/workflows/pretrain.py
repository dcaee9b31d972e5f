"""`psr pretrain`: in-context flow-matching fine-tuning of the multi-reference FLUX core.

One loop in four phases: `setup` (recipe, dataset, accelerator, model, adapter, optimizer,
resume), `train` (micro-steps, accumulation, clipping, EMA, logs, samples, checkpoints),
`save_checkpoint` (atomic, exactly resumable) and `cleanup`. The objective is in
`psr.train.objective`, the data in `psr.train.data` (see docs/pretrain.md).

A micro-step: draw each row's dropout, σ and noise from that row's own generator
(`objective.step_generator`, indexed by the row's place in the global batch); encode the
target (and the references) with the frozen VAE and the prompts with the frozen text
encoders; split the rows into groups that share one reference layout (rows whose
references are dropped form a group without references); per group, one forward with the
attention regularizers' capture installed, loss = MSE on the target tokens · n_g/B +
Σ weight(step)·regularizer · n_g/B_refs + aux_weight·MoE aux · n_g/B, and its backward.
Gradients are synchronised across processes only at the last backward of a step.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from psr.core.adapters import apply_adapter, input_dtype, load_trainable
from psr.core.attention import TokenLayout
from psr.core.io import prepare_output_dir, write_atomic, write_text_atomic
from psr.core.lora import lora_token_mask, moe_aux_loss
from psr.core.model import MultiRefFlux
from psr.core.packing import pack
from psr.core.presets import PRESETS
from psr.core.recipe import load_recipe, to_toml
from psr.core.refstream import cached_references
from psr.core.regularizers import RegBatch, active_specs, make_capture, regularizer_losses, regularizer_weight
from psr.core.runlock import holding
from psr.core.weights import frozen_count
from psr.errors import UserError
from psr.train import TrainingError, optim
from psr.train import checkpoint as ckpt
from psr.train import objective as obj
from psr.train.config import (
    PretrainRecipe,
    recipe_difference,
    resolve_pretrain,
    training_hash,
)
from psr.train.data import ResumableBatchSampler, TrainRows, collate, open_dataset
from psr.train.export import export_final
from psr.train.launch import make_accelerator
from psr.train.logs import TrainLog, check_tensorboard
from psr.train.samples import sample_grid, sample_inputs


@dataclass
class Run:
    recipe: PretrainRecipe
    out: Path
    accelerator: Any
    model: Any
    transformer: Any  # the prepared (maybe DDP-wrapped) module that forwards go through
    named: list
    optimizer: Any
    scheduler: Any
    ema: Any
    batches: Any
    sampler: Any
    encoders: Any
    log: Any
    digest: str
    recipe_toml: str
    start: int
    sample_rows: list = field(default_factory=list)
    skipped: int = 0
    loader: Any = None
    frozen_below: list = field(default_factory=list)
    """Weights loaded as frozen modules below the trained adapter (psr.core.weights)."""


def setup(recipe: PretrainRecipe, resume: bool, show_progress: bool) -> Run:
    recipe = resolve_pretrain(recipe)
    dataset = open_dataset(recipe.data.path)  # before any weights load: bad data costs nothing
    stride = PRESETS[recipe.model.preset].token_stride
    if recipe.logging.tensorboard:
        check_tensorboard()
    out = prepare_output_dir(recipe.out)
    digest = training_hash(recipe)

    def changed_at(checkpoint: Path) -> str:
        old = resolve_pretrain(load_recipe(PretrainRecipe, str(checkpoint / "recipe.toml")))
        return recipe_difference(old, recipe)

    latest, state = ckpt.resumable_checkpoint(out, digest, resume, changed_at)
    ckpt.check_planned_steps(latest, recipe.train.schedule, recipe.train.steps)

    import torch
    from accelerate.utils import set_seed

    accelerator = make_accelerator(recipe.model.device, recipe.train.mixed_precision)
    device = accelerator.device
    mp = recipe.train.mixed_precision
    if mp == "fp16" and device.type != "cuda":
        raise UserError(f"train.mixed_precision fp16: needs CUDA, this run is on {device.type}; use bf16 or no")
    if mp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError("train.mixed_precision bf16: this GPU has no bf16; use fp16 or no")
    if latest is not None and state.get("world_size") != accelerator.num_processes:
        raise UserError(f"--resume: {latest} was written by {state.get('world_size')} process(es), "
                        f"this run has {accelerator.num_processes}; the data order is split by process, so "
                        "resume with the same number")
    start = state["step"]

    rows = TrainRows(dataset, stride, recipe.model.reference_size, recipe.data.max_references,
                     recipe.model.resize_rule)
    set_seed(recipe.train.seed)  # adapter initialisation; everything per step has its own generator

    model = MultiRefFlux.from_config(dataclasses.replace(recipe.model, device=str(device)))
    for frozen in (model.vae, model.components.text_encoder, model.components.text_encoder_2):
        frozen.requires_grad_(False).eval()
    sampler = ResumableBatchSampler(rows.layout_keys(position_key(model)), recipe.train.batch_size,
                                    recipe.train.seed, accelerator.process_index, accelerator.num_processes,
                                    start * recipe.train.grad_accum)
    # Its own generator: an iterator otherwise draws its base seed from the global one,
    # which LoRA dropout shares, and a resumed run would draw it at another point.
    loader = torch.utils.data.DataLoader(rows, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=recipe.data.num_workers,
                                         persistent_workers=recipe.data.num_workers > 0,
                                         generator=torch.Generator().manual_seed(recipe.train.seed))
    transformer = model.transformer
    # Weights that model.weights kept as frozen modules: this run's result needs them below it.
    below = [str(Path(recipe.model.weights).expanduser().resolve())] if frozen_count(transformer) else []
    named = apply_adapter(transformer, recipe.adapter)
    transformer.to(device).train()
    if recipe.train.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    optimizer = optim.build_optimizer([p for _, p in named], recipe.train)
    prepared, optimizer = accelerator.prepare(transformer, optimizer)
    scheduler = optim.build_scheduler(optimizer, recipe.train)
    ema = optim.EMA(named, recipe.train.ema_decay) if recipe.train.ema_decay > 0 and accelerator.is_main_process \
        else None

    if latest is not None:
        saved = ckpt.load_checkpoint(latest, accelerator.process_index)
        load_trainable(named, saved["trainable"], str(latest))
        if saved["accelerate"] is not None:
            accelerator.load_state(str(saved["accelerate"]))
        else:
            optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if ema is not None:
            ema.load_state_dict(saved["ema"] or saved["trainable"])
        if saved["rng"] is not None:
            ckpt.set_rng_state(saved["rng"])
    elif resume and accelerator.is_main_process:
        print(f"psr pretrain: --resume: no checkpoint in {out / 'checkpoints'}, starting at step 0", file=sys.stderr)
    if accelerator.is_main_process:
        ckpt.remove_stale(out / "checkpoints")

    log = None
    sample_rows = []
    if accelerator.is_main_process:
        from tqdm import tqdm

        log = TrainLog(out, tensorboard=recipe.logging.tensorboard, resume_step=start,
                       total_steps=recipe.train.steps, echo=lambda s: tqdm.write(s, file=sys.stdout))
        if recipe.samples.every:
            sample_rows = sample_inputs(recipe.samples, recipe.model.reference_size)
        count = sum(p.numel() for _, p in named)
        log.note(f"{len(rows)} rows ({dataset.report.summary()}); {count:,} trainable weights "
                 f"({recipe.adapter.kind}); {accelerator.num_processes} process(es) on {device}; "
                 f"batch {recipe.train.batch_size}x{recipe.train.grad_accum}x{accelerator.num_processes}; "
                 + (f"resuming at step {start}" if start else "starting at step 0"))
    recipe_toml = to_toml(recipe, header=f"resolved recipe of psr pretrain run {out}")
    if accelerator.is_main_process:
        write_text_atomic(out / "recipe.toml", recipe_toml)
    return Run(recipe=recipe, out=out, accelerator=accelerator, model=model, transformer=prepared, named=named,
               optimizer=optimizer, scheduler=scheduler, ema=ema, batches=iter(loader), sampler=sampler,
               encoders=obj.Encoders(model, recipe.data.cache), log=log, digest=digest, recipe_toml=recipe_toml,
               start=start, sample_rows=sample_rows, loader=loader, frozen_below=below)


def term_names(recipe: PretrainRecipe, step: int) -> list[str]:
    """The loss terms logged at `step` (0-based), in order: the same on every process."""
    names = ["diffusion", *(s.name for s in active_specs(recipe.regularizers, step))]
    return names + (["moe_aux"] if recipe.adapter.kind == "moe_lora" else []) + ["loss"]


def position_key(model) -> Callable[[str, int], str] | None:
    """What besides the reference grids decides a row's position ids: the layout scheme's
    table key (reference count and the relation the prompt names); None otherwise."""
    return model.reference_layout.key if model.position_scheme == "layout" else None


def group_losses(run: Run, batch, rows: list[int], group, pred, capture, layout, step: int, ref_rows: int):
    """(terms for logging, total to backward) of one group; each term is weighted by the
    group's share so that the sums over groups are batch means."""
    import torch

    r, device = run.recipe, run.model.device
    share = len(rows) / len(batch)
    weights = obj.subject_token_weights(batch.labels[rows], r.train.subject_weight)  # moved with the loss
    total = obj.flow_matching_loss(pred, group.velocity, weights) * share
    parts = {"diffusion": total}
    if capture is not None:
        reg_batch = RegBatch(
            layout, batch.labels[rows].to(device),
            [torch.stack([batch.correspondence[b][i] for b in rows]).to(device) for i in range(layout.num_refs)],
            torch.ones(len(rows), layout.num_refs, dtype=torch.bool, device=device))
        _, raw = regularizer_losses(r.regularizers, capture, reg_batch, step)
        specs = {s.name: s for s in r.regularizers}
        for name, value in raw.items():  # mean over the rows that have references
            parts[name] = value * (len(rows) / ref_rows)
            total = total + regularizer_weight(specs[name], step) * parts[name]
    if r.adapter.kind == "moe_lora":
        parts["moe_aux"] = moe_aux_loss(run.model.transformer).to(device) * share
        total = total + r.adapter.aux_weight * parts["moe_aux"]
    parts["loss"] = total
    return {k: v.detach() for k, v in parts.items()}, total


def micro_step(run: Run, batch, generators, step: int, last: bool) -> dict[str, float]:
    """Forward and backward of one micro-batch (module docstring; `generators`: one per row);
    returns its loss terms."""
    import torch

    r, model, acc = run.recipe, run.model, run.accelerator
    drops = [obj.dropout_choices(g, 1, r.train.drop_text, r.train.drop_refs, r.train.drop_both) for g in generators]
    drop_text, drop_refs = [t[0] for t, _ in drops], [d[0] for _, d in drops]
    x0 = pack(run.encoders.latents([(i, "target") for i in batch.indices], list(batch.target))).float()
    length = x0.shape[1]
    sigmas = torch.cat([obj.sample_sigmas(g, 1, r.train.timestep_mean, r.train.timestep_std,
                                          model.components.scheduler.config, length, r.train.resolution_shift)
                        for g in generators])
    noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in generators])
    prompt = run.encoders.prompts(["" if d else p for p, d in zip(batch.prompts, drop_text)])
    guidance = r.train.guidance if model.transformer.config.guidance_embeds else None
    dtype = input_dtype(model.transformer, r.adapter.kind)
    groups = batch.groups([not d for d in drop_refs], position_key(model))
    ref_rows = sum(len(g) for g in groups if not drop_refs[g[0]] and batch.ref_grids[g[0]])
    terms = dict.fromkeys(term_names(r, step), 0.0)
    for k, rows in enumerate(groups):
        group = obj.group_input(model, run.encoders, batch, rows, not drop_refs[rows[0]], x0, noise, sigmas,
                                prompt, dtype)
        layout = TokenLayout(group.prompt.embeds.shape[1], length, tuple(h * w for h, w in group.ref_grids))
        capture = make_capture(r.regularizers, model.transformer, layout, step) if group.ref_grids else None
        # Gradients are all-reduced once per optimizer step: at its last backward.
        sync = contextlib.nullcontext() if last and k == len(groups) - 1 else acc.no_sync(run.transformer)
        token_mask = layout.reference_mask().to(model.device)
        # Cached mode splits the forward into reference and target streams (psr.core.refstream).
        streams = cached_references(model.transformer, layout) if model.reference_mode == "cached" \
            else contextlib.nullcontext()
        # Backward runs inside the capture, so checkpointed blocks recompute with its processors.
        with sync, capture or contextlib.nullcontext(), lora_token_mask(model.transformer, token_mask), streams:
            with acc.autocast(), model.autocast():  # the model's: bfloat16 on the CPU (MultiRefFlux.from_config)
                pred = obj.predict(run.transformer, group, guidance)
            parts, total = group_losses(run, batch, rows, group, pred, capture, layout, step, ref_rows)
            acc.backward(total / r.train.grad_accum)
        for key, value in parts.items():
            terms[key] += float(value)
    return terms


def _check_finite(run: Run, step: int, terms: dict[str, float]) -> dict[str, float]:
    """Average the terms over processes; stop on a non-finite one before any update."""
    import torch

    acc = run.accelerator
    values = torch.tensor(list(terms.values()), dtype=torch.float64, device=acc.device)
    if acc.num_processes > 1:
        values = acc.reduce(values, reduction="mean")
    averaged = dict(zip(terms, values.tolist()))
    for name, value in averaged.items():
        if not math.isfinite(value):
            latest = ckpt.latest_checkpoint(run.out / "checkpoints")
            # --resume only continues the same recipe; other settings start a new run from its weights
            where = f"the last good checkpoint is {latest} (--resume retries the same recipe; to change it, e.g. a " \
                    f"lower train.lr, start a new run with --set model.weights={str(latest)!r})" \
                if latest else "no checkpoint was written yet"
            raise TrainingError(f"step {step}: loss term {name!r} is {value}; stopped before updating the "
                                f"weights; {where}")
    return averaged


def save_checkpoint(run: Run, step: int) -> Path:
    r = run.recipe
    micro = step * r.train.grad_accum
    epoch, index = run.sampler.position(micro)
    state = {"micro_batches": micro, "epoch": epoch, "epoch_index": index, "recipe_hash": run.digest,
             "adapter": r.adapter.kind, "rows_skipped": run.skipped}
    if run.frozen_below:
        state["frozen_below"] = run.frozen_below
    return ckpt.save_checkpoint(run.out / "checkpoints", step, accelerator=run.accelerator,
                                trainable={n: p for n, p in run.named},
                                ema=run.ema.state_dict() if run.ema is not None else None,
                                optimizer=run.optimizer, scheduler=run.scheduler, state=state,
                                recipe_toml=run.recipe_toml, keep_last=r.checkpoint.keep_last)


def write_samples(run: Run, step: int) -> Path:
    s = run.recipe.samples
    with run.ema.applied() if run.ema is not None else contextlib.nullcontext():
        grid = sample_grid(run.model, run.sample_rows, size=s.size, steps=s.steps, guidance=s.guidance,
                           seed=s.seed, autocast=run.accelerator.autocast)
    folder = run.out / "samples"
    folder.mkdir(exist_ok=True)
    return write_atomic(folder / f"step_{step:06d}.png", lambda tmp: grid.save(tmp, format="PNG"))


def train(run: Run, show_progress: bool = True) -> dict[str, float]:
    """Optimizer steps from `run.start` to `train.steps`; returns the last logged terms."""
    from tqdm import tqdm

    r, acc = run.recipe, run.accelerator
    params = [p for _, p in run.named]
    main = acc.is_main_process
    window: dict[str, float] = {}
    window_steps, window_rows, window_start, logged = 0, 0, time.perf_counter(), {}
    with tqdm(total=r.train.steps, initial=run.start, desc="pretrain", unit="step", file=sys.stderr,
              disable=not show_progress or not main) as bar:
        for step in range(run.start, r.train.steps):
            terms = dict.fromkeys(term_names(r, step), 0.0)
            for micro in range(r.train.grad_accum):
                batch = next(run.batches)
                run.skipped += batch.skipped
                window_rows += len(batch) * acc.num_processes
                first = acc.process_index * r.train.batch_size  # this process's rows in the global batch
                generators = [obj.step_generator(r.train.seed, step, micro, first + i) for i in range(len(batch))]
                for key, value in micro_step(run, batch, generators, step, micro == r.train.grad_accum - 1).items():
                    terms[key] += value / r.train.grad_accum
            done = step + 1
            terms = _check_finite(run, done, terms)
            grad_norm = float(acc.clip_grad_norm_(params, r.train.grad_clip or float("inf")))
            if not math.isfinite(grad_norm) and r.train.mixed_precision != "fp16":  # fp16: the scaler skips it
                _check_finite(run, done, {"gradient norm": grad_norm})
            lr = run.scheduler.get_last_lr()[0]
            run.optimizer.step()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            if run.ema is not None:
                run.ema.update()
            for key, value in {**terms, "grad_norm": grad_norm}.items():
                window[key] = window.get(key, 0.0) + value
            window_steps += 1
            bar.update(1)
            if main and (done % r.logging.every == 0 or done == r.train.steps):
                elapsed = time.perf_counter() - window_start
                logged = {k: v / window_steps for k, v in window.items()}
                logged.update(lr=lr, samples_per_s=window_rows / max(elapsed, 1e-9))
                if run.skipped:
                    logged["rows_skipped"] = float(run.skipped)
                run.log.write(done, logged)
                window, window_steps, window_rows, window_start = {}, 0, 0, time.perf_counter()
            if r.samples.every and (done % r.samples.every == 0 or done == r.train.steps):
                if main:
                    write_samples(run, done)
                acc.wait_for_everyone()
            if done % r.checkpoint.every == 0 or done == r.train.steps:
                save_checkpoint(run, done)
    return logged


def finish(run: Run) -> dict:
    """The final export (main process) and the run's summary."""
    out = {"step": run.recipe.train.steps, "final": str(run.out / "final"),
           "main_process": run.accelerator.is_main_process,
           "checkpoint": str(ckpt.latest_checkpoint(run.out / "checkpoints"))}
    if run.accelerator.is_main_process:
        export_final(run.model, run.recipe, run.named, run.ema, run.out / "final", run.recipe.train.steps,
                     run.digest, frozen_below=run.frozen_below)
        run.log.note(f"done: {run.recipe.train.steps} steps; final export in {run.out / 'final'}"
                     + (f"; {run.skipped} unreadable rows skipped" if run.skipped else ""))
    run.accelerator.wait_for_everyone()
    return out


def cleanup(run: Run) -> None:
    if run.log is not None:
        run.log.close()
    run.batches = None  # stops DataLoader workers
    run.loader = None


def run_pretrain(recipe: PretrainRecipe, resume: bool = False, show_progress: bool = True) -> dict:
    """Train (or continue with `resume`) as the recipe says; returns a summary dict.

    Raises `UserError` for bad input (before any weights load where possible) and
    `TrainingError` when a loss term stops being finite.
    """
    # One run per folder: a second run (even with --resume) while this one lives would
    # interleave checkpoints and clean the live run's unfinished ones.
    with holding(recipe.out, "psr pretrain"):
        run = setup(recipe, resume, show_progress)
        try:
            last = train(run, show_progress)
            summary = finish(run)
        finally:
            cleanup(run)
    return {**summary, "terms": last}
