"""Cached references and bfloat16 on the CPU: what each costs per denoising step.

Part 1, `model.reference_mode`: per-step generation time with 0 and 4 references, "joint"
against "cached", on two sizes:

    embedded  the shipped `embedded` preset (6+6 blocks, width 128), 64 px target (64 tokens),
              32 px references (16 tokens each), its defaults; one forward per step (scale 1)
    wide      random-init FLUX classes, 2+2 blocks of width 512 (8 heads of 64), 256 px through
              the tiny 4x VAE: 1024 target tokens, 128 px references of 256 tokens each (the
              same reference-to-target ratio as `embedded`)

Part 2, `model.dtype`: float32 against bfloat16 (float32 weights under bfloat16 autocast,
`MultiRefFlux.from_config`) and, for comparison, the whole model cast to bfloat16, on the
embedded preset: per-step generation time with 2 references, the time of one training step
(forward, backward and AdamW update of every transformer weight, batch 8, 2 references), and
how far the bfloat16 images are from the float32 ones (same seeds).

    .venv/bin/python bench/bench_cached.py                       # both parts, ~15 min on 2 busy cores
    .venv/bin/python bench/bench_cached.py --parts modes --sizes embedded --rounds 3

How it measures: every configuration runs whole generations at several step counts, one run
of each (configuration, step count) per round, the rounds interleaved (in a rotated order) so
that background load lands on all of them. Per-step time is the least-squares slope of run
time against step count, fitted once through the per-count minimum over rounds and once
through the per-count median; the intercept (prompt and reference encoding, the cached mode's
reference pass, decoding) is left out, and reported for the cached mode's 4 references.
Training steps are timed the same way (min and median over rounds). The clock is this
process's CPU time by default, with one intra-op thread: on a shared machine, wall time
mostly measures the other processes (`--clock wall` to see it).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "the cyan checkered heart creature above the orange checkered drop creature, in the sky"
DEMO_REFS = [ROOT / "examples" / "refs" / "subject-a.png", ROOT / "examples" / "refs" / "subject-b.png"]
GOAL = 1.3  # cached mode: 4-reference step time over 0-reference step time


def slope(xs, ys) -> tuple[float, float]:
    """Least-squares line through (xs, ys): (slope, intercept)."""
    a, b = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) of one call."""
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def interleaved(runs: dict, rounds: int, clock: str) -> dict:
    """{key: [seconds per round]} on `clock` ("cpu" or "wall"); each round runs every key
    once, in a rotated order."""
    keys = list(runs)
    for key in keys:  # untimed: first calls build kernels and thread pools
        runs[key]()
    out = {key: [] for key in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            out[key].append(timed(runs[key])[0 if clock == "wall" else 1])
    return out


def per_step(samples: dict, config, steps) -> dict:
    """Per-step seconds of `config` from its runs at `steps`: slopes through the per-count
    min and median, and the intercept of the median line (the fixed cost per run)."""
    mins = [min(samples[(config, s)]) for s in steps]
    meds = [statistics.median(samples[(config, s)]) for s in steps]
    med_slope, med_fixed = slope(steps, meds)
    return {"min": slope(steps, mins)[0], "median": med_slope, "fixed": med_fixed}


def random_refs(n: int, side: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)) for _ in range(n)]


# ---------------------------------------------------------------------------- part 1
def build(size: str, mode: str):
    from psr.core.model import MultiRefFlux
    from psr.core.schema import ModelConfig, resolve_model
    from psr.core.tiny import build_tiny_components

    torch.manual_seed(0)
    if size == "embedded":
        model = MultiRefFlux.from_config(resolve_model(ModelConfig(preset="embedded", device="cpu",
                                                                   reference_mode=mode)))
        return model, 64, 32, 1.0
    components = build_tiny_components(seed=0, num_layers=2, num_single_layers=2, num_attention_heads=8,
                                       attention_head_dim=64, axes_dims_rope=(8, 28, 28), max_sequence_length=64)
    return MultiRefFlux(components, reference_size=128, max_sequence_length=64, reference_mode=mode), 256, 128, 3.5


def part_modes(sizes, rounds: int, steps_by_size: dict, clock: str) -> list[str]:
    lines = []
    for size in sizes:
        models = {mode: build(size, mode) for mode in ("joint", "cached")}
        _, target, ref_side, guidance = models["joint"]
        steps = steps_by_size[size]
        refs = {n: random_refs(n, ref_side) for n in (0, 4)}
        runs = {}
        for mode, (model, *_) in models.items():
            for n in (0, 4):
                for s in steps:
                    runs[((mode, n), s)] = (lambda model=model, images=refs[n], s=s, side=target, g=guidance:
                                            model.generate(PROMPT, images, height=side, width=side, steps=s,
                                                           guidance=g, seeds=[0], output_type="pt"))
        samples = interleaved(runs, rounds, clock)
        stride = models["joint"][0].token_stride
        tokens, ref_tokens = (target // stride) ** 2, (ref_side // stride) ** 2
        lines.append(f"\n{size}: {tokens} target tokens, references of {ref_tokens} tokens, steps {steps}, "
                     f"{rounds} rounds")
        lines.append(f"  {'mode':<8}{'0 refs ms/step':>22}{'4 refs ms/step':>22}{'4-ref / 0-ref':>20}")
        for mode in ("joint", "cached"):
            zero, four = per_step(samples, (mode, 0), steps), per_step(samples, (mode, 4), steps)
            cells = [f"{zero['min'] * 1e3:8.1f} / {zero['median'] * 1e3:8.1f}",
                     f"{four['min'] * 1e3:8.1f} / {four['median'] * 1e3:8.1f}",
                     f"{four['min'] / zero['min']:6.2f} / {four['median'] / zero['median']:6.2f}"]
            lines.append(f"  {mode:<8}{cells[0]:>22}{cells[1]:>22}{cells[2]:>20}")
        cached = [per_step(samples, ("cached", n), steps) for n in (0, 4)]
        ratio = cached[1]["median"] / cached[0]["median"]
        lines.append(f"  (min / median over rounds) goal: cached 4-ref <= {GOAL}x 0-ref: "
                     f"{'met' if ratio <= GOAL else 'MISSED'} ({ratio:.2f}x by the medians)")
        once = cached[1]["fixed"] - cached[0]["fixed"]
        lines.append(f"  cached mode's one-off cost of 4 references per run (fixed-cost difference, encoding and "
                     f"reference pass): {once * 1e3:.1f} ms")
        del models
    return lines


# ---------------------------------------------------------------------------- part 2
def build_dtype(variant: str):
    """"float32", "autocast" (model.dtype bfloat16 on the CPU) or "bf16-weights"."""
    from psr.core.model import MultiRefFlux
    from psr.core.schema import ModelConfig, resolve_model

    from psr.core.weights import load_model_components

    config = resolve_model(ModelConfig(preset="embedded", device="cpu",
                                       dtype="float32" if variant == "float32" else "bfloat16"))
    if variant == "bf16-weights":  # every component cast, as a GPU runs bfloat16
        return MultiRefFlux(load_model_components(config), reference_size=config.reference_size,
                            max_sequence_length=config.max_sequence_length)
    model = MultiRefFlux.from_config(config)
    if variant == "autocast" and model.autocast_dtype is None:
        raise SystemExit(f"this CPU has no bfloat16 instructions: {model.notes[0]}")
    return model


def train_step_fn(model, batch: int = 8):
    """One full fine-tuning step on a fixed batch of the flow-matching loss (2 references)."""
    from psr.core.packing import pack
    from psr.core.positions import grid_ids, reference_ids

    transformer = copy.deepcopy(model.transformer).train().requires_grad_(True)
    dtype = transformer.dtype
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-5)
    g = torch.Generator().manual_seed(0)
    c = model.latent_channels
    x0 = pack(torch.randn(batch, c, 16, 16, generator=g))
    refs = [pack(torch.randn(batch, c, 8, 8, generator=g)) for _ in range(2)]
    noise = torch.randn(x0.shape, generator=g)
    sigma = torch.rand(batch, generator=g)
    noisy = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    hidden = torch.cat([noisy, *refs], dim=1).to(dtype)
    ids = torch.cat([grid_ids(8, 8), *reference_ids((8, 8), [(4, 4), (4, 4)], "frame")])
    text = model.encode_prompt([PROMPT] * batch)

    def step():
        with model.autocast():
            out = transformer(hidden_states=hidden, timestep=sigma.to(dtype), guidance=None,
                              pooled_projections=text.pooled.to(dtype), encoder_hidden_states=text.embeds.to(dtype),
                              txt_ids=text.ids, img_ids=ids, return_dict=False)[0][:, :64]
        loss = (out.float() - (noise - x0)).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def part_dtype(rounds: int, steps, clock: str) -> list[str]:
    variants = ("float32", "autocast", "bf16-weights")
    models = {v: build_dtype(v) for v in variants}
    refs = [Image.open(p) for p in DEMO_REFS]
    runs = {}
    for v, model in models.items():
        for s in steps:
            runs[(v, s)] = (lambda model=model, s=s: model.generate(PROMPT, refs, height=64, width=64, steps=s,
                                                                    guidance=3.0, seeds=[0], output_type="pt"))
        runs[(v, "train")] = train_step_fn(model)
    samples = interleaved(runs, rounds, clock)
    lines = [f"\nembedded, float32 vs bfloat16 on the CPU ({rounds} rounds; generation: 2 references, text CFG 3 "
             f"= 2 forwards per step, steps {steps}; training: batch 8, 2 references, full fine-tune + AdamW)",
             f"  {'variant':<14}{'generate ms/step':>22}{'train step ms':>22}{'max |Δpixel|':>14}{'PSNR dB':>9}"]
    images = {v: m.generate(PROMPT, refs, height=64, width=64, steps=8, guidance=3.0, seeds=list(range(8)),
                            output_type="np") for v, m in models.items()}
    for v in variants:
        gen = per_step(samples, v, steps)
        train = samples[(v, "train")]
        diff = np.abs(images[v] - images["float32"])
        mse = float((diff ** 2).mean())
        psnr = "inf" if mse == 0 else f"{10 * np.log10(1 / mse):.1f}"
        cells = [f"{gen['min'] * 1e3:8.1f} / {gen['median'] * 1e3:8.1f}",
                 f"{min(train) * 1e3:8.1f} / {statistics.median(train) * 1e3:8.1f}"]
        lines.append(f"  {v:<14}{cells[0]:>22}{cells[1]:>22}{diff.max() * 255:>14.1f}{psnr:>9}")
    lines.append("  (min / median over rounds; pixel differences in 8-bit grey levels over 8 seeds at 8 steps)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default="modes,dtype", help="modes, dtype or both (comma-separated)")
    parser.add_argument("--sizes", default="embedded,wide")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu: this process's CPU time, which other processes' load does not inflate "
                             "(with one thread it is the compute time); wall: elapsed time")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1: on a shared CPU, waiting for a busy second thread dominates)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps_by_size = {"embedded": (2, 4, 8, 16), "wide": (1, 2, 4)}
    torch.set_grad_enabled(True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.clock} time, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    lines = []
    parts = args.parts.split(",")
    if "modes" in parts:
        lines += part_modes(args.sizes.split(","), args.rounds, steps_by_size, args.clock)
    if "dtype" in parts:
        lines += part_dtype(args.rounds, (2, 4, 8, 16), args.clock)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
