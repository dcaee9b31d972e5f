"""Per-step cost and peak memory of psr's generation with 0, 1, 2 and 4 references, against
diffusers' FluxPipeline with 0 references on the same components, at three sizes:

    tiny      the `tiny` preset, 64 px: 64 target tokens, width 64 (Python overhead dominates)
    embedded  the shipped `embedded` preset, 64 px, 32 px references (its defaults)
    wide      random-init FLUX classes, 2+2 blocks of width 512 (8 heads of 64), 256 px through
              the tiny 4x VAE: 32x32 = 1024 target tokens, 128 px references of 256 tokens
              each (compute dominates)

    .venv/bin/python bench/bench_core.py                          # all three sizes
    .venv/bin/python bench/bench_core.py --threads 1 --clock cpu  # the same on a busy machine (16 min on 2 cores)
    .venv/bin/python bench/bench_core.py --sizes tiny             # 1.5 min
    .venv/bin/python bench/bench_core.py --sizes wide --wide-size 512 --repeats 7
    .venv/bin/python bench/bench_core.py --device cuda --wide-blocks 8

How it measures:

- Whole runs (prompt encoding, reference encoding, denoising, decoding) are timed at several
  step counts, every configuration once per round (A, B, C, A, B, C, ...), so a burst of
  background load lands on all of them. Each run is reported as min and median over the
  rounds and their spread (IQR / median) at the largest step count.
- Per-step time: in each round, a least-squares line of run time against step count; its
  slope is that round's per-step time and its intercept the fixed cost per run (prompt and
  reference encoding, decoding). Reported: the median over rounds of each, and the IQR of
  the slopes. A median slope or intercept <= 0 is refused.
- Ratios against FluxPipeline pair the rounds (in a round the configurations run back to
  back under the same background load, which cancels): "ratio" is the median over rounds of
  slope / FluxPipeline's slope, "ratio IQR" their interquartile range.
- Peak memory comes from a fresh process per configuration, after imports, model load and a
  1-step warm-up of both code paths at 2x2 tokens. CPU: the peak of live torch tensor memory
  allocated during one 2-step generation, from the profiler's allocation events (weights and
  other tensors that exist before the run are excluded; temporaries inside operators are
  included; PIL images and Python objects are not). The resident set is no use here: glibc
  serves activations from chunks freed during model loading, so its growth reads ~0 at small
  sizes and depends on heap history. CUDA: max_memory_allocated minus memory_allocated
  before the run. "step peak" is the same peak over the transformer calls only (from the
  first call's start to the last call's end): references act there, while the whole-run
  peak of a small model is often the VAE decoder's and the same for every row.
  FluxPipeline's row is measured twice to show how repeatable the numbers are.
- On a shared machine, `--threads 1 --clock cpu` times process CPU time on one thread, which
  waiting for a core does not inflate; wall time with two threads is what a user sees.

The script exits 1, one line per problem, when a result cannot be trusted: a non-positive
per-step time or fixed cost, peak memory that is not positive, a step peak that is the
same for every configuration of a size, psr with 0 references whose per-round ratio to FluxPipeline
spreads wider than the tolerance the goal checks (--tolerance), or a reference
configuration whose per-step difference from FluxPipeline is smaller than its spread.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from timing import (  # the line above makes the sibling module importable
    cpu_tensor_peaks,
    fmt,
    interleaved,
    load_average,
    machine_lines,
    ols,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    stopwatch,
    summarize,
    table,
)

SIZES = ("tiny", "embedded", "wide")
DEFAULT_STEPS = {"tiny": (4, 8, 16, 32), "embedded": (4, 8, 16, 32), "wide": (1, 2, 4, 8)}
PROMPT = "a red striped star creature next to a blue dotted moon creature"
TEXT_TOKENS = 64
BASELINE = "pipeline"
MEMORY_STEPS = 2


# ---------------------------------------------------------------------------- one size, built
@dataclass
class Case:
    name: str
    model: object  # psr.core.model.MultiRefFlux
    pipe: object  # diffusers.FluxPipeline over the same modules
    size: int
    ref_size: int
    guidance: float
    description: str
    refs: dict = field(default_factory=dict)

    @property
    def stride(self) -> int:
        return self.model.token_stride

    def target_tokens(self) -> int:
        return (self.size // self.stride) ** 2

    def ref_tokens(self) -> int:
        return (self.ref_size // self.stride) ** 2

    def references(self, n: int, side: int | None = None):
        import numpy as np
        from PIL import Image

        side = side or self.ref_size
        if (n, side) not in self.refs:
            rng = np.random.default_rng(0)
            self.refs[(n, side)] = [Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8))
                                    for _ in range(n)]
        return self.refs[(n, side)]


def build_case(name: str, args) -> Case:
    import torch
    from diffusers import FluxPipeline

    from psr.core.model import MultiRefFlux
    from psr.core.schema import ModelConfig, resolve_model
    from psr.core.tiny import build_tiny_components

    torch.manual_seed(0)
    if name == "tiny":
        model = MultiRefFlux(build_tiny_components(seed=0, max_sequence_length=TEXT_TOKENS), reference_size=64,
                             max_sequence_length=TEXT_TOKENS, device=args.device)
        size, ref_size, guidance = 64, 64, 3.5
        what = "tiny preset (2+2 blocks, width 64), random init"
    elif name == "embedded":
        model = MultiRefFlux.from_config(resolve_model(ModelConfig(preset="embedded", device=args.device)))
        # No guidance embedding: a scale of 1 is one forward per step, as FluxPipeline runs it.
        size, ref_size, guidance = 64, model.reference_size, 1.0
        what = "embedded preset (6+6 blocks, width 128), shipped weights"
    elif name == "wide":
        blocks = args.wide_blocks
        components = build_tiny_components(
            seed=0, num_layers=blocks, num_single_layers=blocks, num_attention_heads=8, attention_head_dim=64,
            axes_dims_rope=(8, 28, 28), max_sequence_length=TEXT_TOKENS)
        model = MultiRefFlux(components, reference_size=args.wide_ref_size, max_sequence_length=TEXT_TOKENS,
                             device=args.device)
        size, ref_size, guidance = args.wide_size, args.wide_ref_size, 3.5
        what = f"random-init FLUX classes, {blocks}+{blocks} blocks, width 512 (8 heads x 64)"
    else:
        raise SystemExit(f"unknown size {name!r}; choose from {', '.join(SIZES)}")
    model.check_size(size, size)
    model.check_size(ref_size, ref_size)
    pipe = FluxPipeline(**model.components.as_dict())
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in model.transformer.parameters()) / 1e6
    return Case(name, model, pipe, size, ref_size, guidance, f"{what}, {params:.1f} M transformer parameters")


def _sync(device: str):
    if device.startswith("cuda"):
        import torch

        return torch.cuda.synchronize
    return None


def generate(case: Case, key, steps: int, size: int | None = None, ref_side: int | None = None):
    """One whole generation of configuration `key` ("pipeline" or a reference count)."""
    import torch

    size = size or case.size
    if key == BASELINE:
        case.pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=case.guidance,
                  generator=torch.Generator().manual_seed(0), max_sequence_length=TEXT_TOKENS)
    else:
        case.model.generate(PROMPT, case.references(int(key), ref_side), height=size, width=size, steps=steps,
                            guidance=case.guidance, seeds=[0])


def label(key) -> str:
    if key == BASELINE:
        return "FluxPipeline, 0 refs"
    return f"psr, {key} ref" + ("" if int(key) == 1 else "s")


# ---------------------------------------------------------------------------- timing
def time_case(case: Case, keys, steps: tuple[int, ...], rounds: int, device: str, clock: str) -> dict:
    sync = _sync(device)
    for key in keys:  # untimed: first calls build kernels, caches and thread pools
        generate(case, key, steps[0])
    runs = {(key, s): (lambda key=key, s=s: stopwatch(lambda: generate(case, key, s), sync, clock))
            for s in steps for key in keys}
    samples = interleaved(runs, rounds, before_each=gc.collect)

    # One least-squares line per round (that round's run at each step count), so every
    # summary below is over rounds, and ratios pair the rounds, in which the configurations
    # ran back to back under the same background load.
    out, per_round = {}, {}
    for key in keys:
        fits = [ols(steps, [samples[(key, s)][r] for s in steps]) for r in range(rounds)]
        per_round[key] = [slope for slope, _, _ in fits]
        slopes, fixed = summarize(per_round[key]), summarize([intercept for _, intercept, _ in fits])
        out[key] = {"run": summarize(samples[(key, steps[-1])]), "slopes": slopes, "fixeds": fixed,
                    "step": slopes.median, "fixed": fixed.median, "samples": {s: samples[(key, s)] for s in steps}}
    base = per_round[BASELINE]
    for key in keys:
        out[key]["ratios"] = summarize([a / b for a, b in zip(per_round[key], base)])
        out[key]["diffs"] = summarize([a - b for a, b in zip(per_round[key], base)])
    return out


# ---------------------------------------------------------------------------- memory, one process per row
def child(args) -> None:
    """Runs in a fresh process: print the peak memory of one generation as JSON."""
    import torch

    case = build_case(args.size_name, args)
    key = args.config if args.config == BASELINE else int(args.config)
    # Warm both code paths up at the smallest size the model takes, so lazily built state
    # (kernel caches, rotary tables, thread pools) exists before the measured run.
    small = 2 * case.stride
    generate(case, BASELINE, 1, size=small)
    generate(case, 1, 1, size=small, ref_side=small)
    case.references(0 if key == BASELINE else key)  # the inputs are not what is measured
    gc.collect()

    def run():
        generate(case, key, MEMORY_STEPS)

    transformer = case.model.transformer
    step = None
    if args.device.startswith("cuda"):
        # The step peak runs from the first transformer call to the end of the last, read
        # after each call, so prompt and reference encoding before and decoding after are
        # left out; the peak before the first call is kept aside for the whole-run peak.
        early, readings = [], []

        def first_call(*_):
            if not early:
                early.append(torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()

        hooks = [transformer.register_forward_pre_hook(first_call),
                 transformer.register_forward_hook(lambda *_: readings.append(torch.cuda.max_memory_allocated()))]
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        try:
            run()
            torch.cuda.synchronize()
        finally:
            for hook in hooks:
                hook.remove()
        peak = (max(early[0], torch.cuda.max_memory_allocated()) - before) / 2**20
        step, method = (max(readings) - before) / 2**20, "cuda"
    else:
        try:
            (peak, step), method = cpu_tensor_peaks(run, transformer), "tensors"
        except (RuntimeError, AttributeError, ImportError) as err:  # the profiler's event tree is private API
            print(f"profiler allocation events unavailable ({err}); falling back to resident-set growth",
                  file=sys.stderr)
            if not reset_peak_rss():
                raise SystemExit("cannot reset the peak resident set (/proc/self/clear_refs): Linux needed")
            before = rss_mib()
            run()
            peak, method = peak_rss_mib() - before, "rss"
    print(json.dumps({"peak_mib": peak, "step_peak_mib": step, "method": method}))


def peak_memory(name: str, key, args) -> tuple[float, float | None]:
    cmd = [sys.executable, os.path.abspath(__file__), "--_child", "--size-name", name, "--config", str(key),
           "--device", args.device, "--wide-size", str(args.wide_size), "--wide-ref-size", str(args.wide_ref_size),
           "--wide-blocks", str(args.wide_blocks), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"memory child for {name}/{key} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["method"] == "rss":
        print(f"note: {name}/{key}: peak memory fell back to resident-set growth", file=sys.stderr)
    return result["peak_mib"], result["step_peak_mib"]


# ---------------------------------------------------------------------------- checks
def problems_for(name: str, timing: dict, memory: dict | None, repeat_mib: float | None, tolerance: float):
    out = []
    for key, row in timing.items():
        if row["step"] <= 0:
            out.append(f"{name}, {label(key)}: per-step time refused: the median per-round slope is "
                       f"{row['step'] * 1e3:.3f} ms/step, not positive (run time does not grow with the step count "
                       "at this noise)")
        elif row["fixed"] <= 0:
            out.append(f"{name}, {label(key)}: fixed cost per run (fit intercept) is {row['fixed'] * 1e3:.1f} ms, "
                       "not positive: the step-count fit is off by more than the fixed cost")
    for key, row in timing.items():
        if key == BASELINE:
            continue
        if key == 0:
            if row["ratios"].iqr > tolerance:
                out.append(f"{name}, {label(key)}: per-round ratio to FluxPipeline spreads over an IQR of "
                           f"{row['ratios'].iqr:.3f}, wider than the {tolerance:.2f} the goal checks")
        elif row["diffs"].iqr >= abs(row["diffs"].median):
            out.append(f"{name}, {label(key)}: per-step difference from FluxPipeline "
                       f"{row['diffs'].median * 1e3:+.2f} ms is within its spread (IQR "
                       f"{row['diffs'].iqr * 1e3:.2f} ms over rounds)")
    if memory:
        for key, (whole, step) in memory.items():
            for what, mib in (("peak memory", whole), ("step peak memory", step)):
                if mib is not None and mib <= 0:
                    out.append(f"{name}, {label(key)}: {what} {mib:.2f} MiB is not positive")
        # The step peak is where references act (they only enter the transformer), so it must
        # tell the configurations apart; the whole-run peak may legitimately be the decoder's.
        column = "step peak memory"
        values = [step for _, step in memory.values() if step is not None]
        if not values:
            column, values = "peak memory", [whole for whole, _ in memory.values()]
        floor = max(0.01, 2 * (repeat_mib or 0.0))
        if len(values) > 1 and max(values) - min(values) <= floor:
            out.append(f"{name}: {column} is the same for every configuration ({min(values):.2f}-"
                       f"{max(values):.2f} MiB, within {floor:.2f} MiB): the column does not tell them apart")
    return out


# ---------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=",".join(SIZES), help="comma list of: " + ", ".join(SIZES))
    p.add_argument("--refs", default="0,1,2,4", help="reference counts for psr (0 is always included)")
    p.add_argument("--repeats", type=int, default=5, help="rounds over all configurations (>= 5)")
    p.add_argument("--steps", default=None, help="comma list of step counts for every size "
                   "(default: 4,8,16,32; 1,2,4,8 for wide)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="cpu: process CPU time instead of elapsed time (steadier on a shared machine with "
                        "--threads 1; CPU device only)")
    p.add_argument("--wide-size", type=int, default=256, help="wide target side in px (8 px per token side: 4x VAE, 2x2 packing)")
    p.add_argument("--wide-ref-size", type=int, default=128, help="wide reference side in px")
    p.add_argument("--wide-blocks", type=int, default=2, help="double- and single-stream blocks each")
    p.add_argument("--tolerance", type=float, default=0.05, help="goal: psr 0 refs <= (1 + this) x FluxPipeline")
    p.add_argument("--skip-memory", action="store_true", help="no peak-memory column (no child processes)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size-name", help=argparse.SUPPRESS)
    p.add_argument("--config", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.clock == "cpu" and args.device != "cpu":
        p.error("--clock cpu measures host CPU time: it does not see GPU work")
    if not args._child and args.repeats < 5:
        p.error("--repeats must be >= 5: quartiles of fewer rounds say nothing about the spread")
    return args


def main(argv=None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = parse(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args._child:
        child(args)
        return 0
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown size {unknown[0]!r}; choose from {', '.join(SIZES)}")
    refs = sorted({0, *(int(r) for r in args.refs.split(","))})
    keys = [BASELINE, *refs]
    started = time.perf_counter()
    for line in machine_lines(args.device):
        print(line)
    if not args.skip_memory:
        print("peak MiB: fresh process per row, " + ("CUDA max_memory_allocated above the pre-run level"
              if args.device.startswith("cuda") else "peak of live torch tensor memory allocated")
              + f" during one {MEMORY_STEPS}-step generation (weights excluded); step peak MiB: the same, "
              "over the transformer calls only (no encoding, no decoding)")
    print(f"{args.repeats} rounds, configurations interleaved within each round; {args.clock} clock; ms/step and "
          f"fixed ms = medians over rounds of a least-squares line per round; text tokens {TEXT_TOKENS}")

    header = ["run", "image tokens", "run min ms", "run median ms", "run IQR %", "ms/step", "step IQR %",
              "fixed ms", "ratio", "ratio IQR", "peak MiB", "step peak MiB"]
    problems, report = [], {}
    for name in sizes:
        steps = tuple(int(s) for s in args.steps.split(",")) if args.steps else DEFAULT_STEPS[name]
        case = build_case(name, args)
        timing = time_case(case, keys, steps, args.repeats, args.device, args.clock)
        desc, tgt, ref, size, ref_size = (case.description, case.target_tokens(), case.ref_tokens(), case.size,
                                          case.ref_size)
        del case
        gc.collect()
        memory, repeat_mib = None, None
        if not args.skip_memory:
            memory = {key: peak_memory(name, key, args) for key in keys}
            again = peak_memory(name, BASELINE, args)
            repeat_mib = max(abs(a - b) for a, b in zip(again, memory[BASELINE]) if a is not None and b is not None)
        rows = []
        for key in keys:
            row = timing[key]
            n = 0 if key == BASELINE else key
            ok = row["step"] > 0
            rows.append([
                label(key), str(tgt + n * ref),
                f"{row['run'].min * 1e3:.1f}", f"{row['run'].median * 1e3:.1f}", f"{100 * row['run'].rel_iqr:.1f}",
                f"{row['step'] * 1e3:.2f}" if ok else "refused", f"{100 * row['slopes'].rel_iqr:.1f}",
                f"{row['fixed'] * 1e3:.1f}",
                f"{row['ratios'].median:.3f}", f"{row['ratios'].q1:.3f}-{row['ratios'].q3:.3f}",
                fmt(None if memory is None else memory[key][0], ".2f"),
                fmt(None if memory is None else memory[key][1], ".2f"),
            ])
        print()
        print(f"{name}: {desc}; {size} px target = {tgt} tokens, references {ref_size} px = {ref} tokens each; "
              f"step counts {', '.join(map(str, steps))}; whole runs at {steps[-1]} steps"
              + ("" if memory is None else f"; peak MiB repeat differs by {repeat_mib:.2f}"))
        print(table(header, rows))
        zero = timing[0]["ratios"]
        verdict = "met" if zero.median <= 1 + args.tolerance else "NOT met"
        if zero.iqr > args.tolerance:
            verdict = f"undecided: rounds spread wider than {args.tolerance:.2f}"
        print(f"goal: psr with 0 refs <= {1 + args.tolerance:.2f}x FluxPipeline per step: {zero.median:.3f}x "
              f"(per-round IQR {zero.q1:.3f}-{zero.q3:.3f}), {verdict}")
        problems += problems_for(name, timing, memory, repeat_mib, args.tolerance)
        report[name] = {
            "description": desc, "target_tokens": tgt, "reference_tokens": ref, "steps": steps,
            "rows": {str(k): {"step_s": timing[k]["step"], "fixed_s": timing[k]["fixed"],
                              "step_iqr_s": timing[k]["slopes"].iqr,
                              "run_min_s": timing[k]["run"].min, "run_median_s": timing[k]["run"].median,
                              "ratio_median": timing[k]["ratios"].median,
                              "samples_s": {str(s): v for s, v in timing[k]["samples"].items()},
                              "peak_mib": None if memory is None else memory[k][0],
                              "step_peak_mib": None if memory is None else memory[k][1]} for k in keys},
        }
    print()
    print(f"load average at end: {load_average()}; total {time.perf_counter() - started:.0f} s")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"sizes": report, "problems": problems}, fh, indent=1)
    for line in problems:
        print(f"refused: {line}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
