"""Measured memory of one training forward + backward on the CPU, to check `psr.train.plan`.

The CPU has no allocator statistics like `torch.cuda.max_memory_allocated`, so the step
runs under `torch.profiler.profile(profile_memory=True)`: torch's CPU allocator reports
every allocation and free to the profiler as a `[memory]` event with its signed size.
Summing them in time order gives the bytes allocated since the step began; its maximum is
the step's peak above what existed before (weights, inputs). Python's `tracemalloc` would
not see these allocations (they bypass Python's allocator), and the process's resident
size moves in whole pages and keeps freed memory.

The step is a `psr pretrain` micro-step on one group as `psr.workflows.pretrain` runs it
after encoding: `apply_adapter`, the transformer in train mode (checkpointed if the recipe
says so), autocast as accelerate enables it, `objective.predict`, the float32 flow-matching
loss, the attention regularizers' capture when the recipe has them (with a stand-in loss on
the same slices), and backward, with the gradients unset beforehand as `zero_grad` leaves them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from psr.core.adapters import apply_adapter, input_dtype
from psr.core.attention import AttentionCapture, TokenLayout
from psr.core.components import load_components
from psr.core.images import reference_fit_size
from psr.core.model import PromptEmbeds
from psr.core.positions import grid_ids, reference_ids
from psr.core.presets import PRESETS
from psr.core.regularizers import capture_plan
from psr.core.schema import resolve_model
from psr.core.tiny import build_tiny_components
from psr.train import objective as obj
from psr.train.plan import forward_shape


def allocation_peak(fn) -> tuple[int, int]:
    """(peak, final) bytes held by torch's CPU allocator while `fn()` runs, counted from
    zero at its start (the profiler's memory events, see the module docstring)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type().name == "CPU"]
    events.sort(key=lambda e: e.start_ns())
    held = peak = 0
    for event in events:
        held += event.nbytes()
        peak = max(peak, held)
    return peak, held


def build_transformer(model):
    """The recipe's transformer with real (random or shipped) weights, on the CPU."""
    if model.preset == "tiny":
        return build_tiny_components(seed=model.init_seed, dtype=model.dtype).transformer
    return load_components(model.path, dtype=model.dtype).transformer


def step_inputs(recipe, transformer, size: int | None, references: int | None, seed: int = 0):
    """(GroupInput, layout, guidance) of one forward with the plan's token counts."""
    model = recipe.model
    stride = PRESETS[model.preset].token_stride
    tokens = forward_shape(recipe, size, references)[0]
    side = math.isqrt(tokens.target)
    ref_w, ref_h = reference_fit_size(model.reference_size, model.reference_size, model.resize_rule,
                                      model.reference_size, stride)
    ref_grids = ((ref_h // stride, ref_w // stride),) * len(tokens.refs)
    config = transformer.config
    dtype = input_dtype(transformer, recipe.adapter.kind)
    gen = torch.Generator().manual_seed(seed)
    b, n = tokens.batch, tokens.image

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(dtype)

    # Memory depends on token counts, not on where the ids put the references.
    scheme = "diagonal" if model.position_scheme == "diagonal" else "frame"
    ids = torch.cat([grid_ids(side, side), *reference_ids((side, side), list(ref_grids), scheme)])
    prompt = PromptEmbeds(randn(b, tokens.text, config.joint_attention_dim), randn(b, config.pooled_projection_dim),
                          torch.zeros(tokens.text, 3))
    group = obj.GroupInput(hidden=randn(b, n, config.in_channels), ids=ids, prompt=prompt,
                           timestep=torch.rand(b, generator=gen).to(dtype),
                           velocity=torch.randn(b, tokens.target, config.in_channels, generator=gen),
                           target_grid=(side, side), ref_grids=ref_grids)
    layout = TokenLayout(tokens.text, tokens.target, tuple(h * w for h, w in ref_grids))
    guidance = 1.0 if config.guidance_embeds else None
    return group, layout, guidance


def measure_step(recipe, *, size: int | None = None, references: int | None = None, transformer=None) -> dict:
    """Measure one forward + backward of the recipe's training step (module docstring).

    Returns {"peak": bytes, "gradients": bytes of the gradients at the end, "trainable":
    parameter count}. `transformer`: a fresh one to use instead of building it (it is
    modified: the adapter is added)."""
    recipe = dataclasses.replace(recipe, model=resolve_model(recipe.model))
    if transformer is None:
        transformer = build_transformer(recipe.model)
    named = apply_adapter(transformer, recipe.adapter)
    transformer.train()
    if getattr(recipe.train, "gradient_checkpointing", False):
        transformer.enable_gradient_checkpointing()
    group, layout, guidance = step_inputs(recipe, transformer, size, references)
    maps, blocks = (), ()
    if recipe.command == "pretrain" and layout.refs_len:
        maps, blocks = capture_plan(recipe.regularizers, transformer)
    autocast = recipe.train.mixed_precision in ("bf16", "fp16")
    dtype = torch.bfloat16 if recipe.train.mixed_precision == "bf16" else torch.float16

    def step():
        capture = AttentionCapture(transformer, blocks, layout, maps) if maps else contextlib.nullcontext()
        with capture:
            with torch.autocast("cpu", dtype=dtype, enabled=autocast):
                pred = obj.predict(transformer, group, guidance)
            loss = obj.flow_matching_loss(pred, group.velocity)
            for kind in sorted(maps):  # a stand-in for the regularizers' losses on the same slices
                loss = loss + capture.mean(kind).square().mean()
            loss.backward()

    step()  # the first step builds what later steps reuse (peft and autocast state)
    transformer.zero_grad(set_to_none=True)
    peak, _ = allocation_peak(step)
    gradients = sum(p.grad.numel() * p.grad.element_size() for _, p in named if p.grad is not None)
    return {"peak": peak, "gradients": gradients, "trainable": sum(p.numel() for _, p in named)}
