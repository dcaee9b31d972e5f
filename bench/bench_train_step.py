"""What a training step of the shipped embedded transformer costs under the CPU levers that
docs/embedded.md weighs, side by side against the plain float32 step:

    .venv/bin/python bench/bench_train_step.py                  # 2 threads, 6 rounds (~1-2 min)
    .venv/bin/python bench/bench_train_step.py --threads 1 --rounds 4 --no-compile

One step = forward of `FluxTransformer2DModel` (psr/assets/embedded/transformer, float32) on a
stage-1 batch (16 rows: 64 text tokens, 64 target tokens, two 32 px references of 16 tokens
at the `layout` scheme's "2:left of" positions), MSE on the target tokens, backward, AdamW.

    eager          the step as `psr pretrain` runs it (the baseline)
    bf16           the same under torch.autocast("cpu", torch.bfloat16) (AMX-BF16 where present)
    compile        torch.compile(transformer) (inductor); its first call, the compile, is
                   timed apart and left out of the rounds
    text-32        32 text tokens instead of 64 (the token lever: 128 tokens per row, not 160)

Every configuration runs --steps steps once per round, in turn (A, B, C, D, A, ...), so load
on a shared machine falls on all of them; the table gives the median seconds per step, its
spread over rounds (IQR / median) and the median over rounds of the ratio to eager in the
same round. The script exits 1 when a ratio's spread is wider than its distance from 1, so a
number it prints is never noise called a speed-up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import interleaved, machine_lines, summarize, table  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


class Step:
    """One configuration's model, optimizer and batch, built once."""

    def __init__(self, text_tokens: int, autocast: bool, compiled: bool, seed: int = 0):
        import torch
        from diffusers import FluxTransformer2DModel

        from psr.core.embedded import EMBEDDED_REFERENCE_LAYOUT
        from psr.core.positions import sequence_ids

        self.autocast = autocast
        self.transformer = FluxTransformer2DModel.from_pretrained(ROOT / "psr/assets/embedded/transformer",
                                                                  torch_dtype=torch.float32).train()
        self.optimizer = torch.optim.AdamW(self.transformer.parameters(), lr=1e-4)
        self.forward = torch.compile(self.transformer) if compiled else self.transformer
        g = torch.Generator().manual_seed(seed)
        batch, channels = 16, self.transformer.config.in_channels
        self.hidden = torch.randn(batch, 64 + 2 * 16, channels, generator=g)
        self.target = torch.randn(batch, 64, channels, generator=g)
        self.text = torch.randn(batch, text_tokens, self.transformer.config.joint_attention_dim, generator=g)
        self.pooled = torch.randn(batch, self.transformer.config.pooled_projection_dim, generator=g)
        self.timestep = torch.rand(batch, generator=g)
        boxes = EMBEDDED_REFERENCE_LAYOUT["2:left of"]
        self.img_ids = sequence_ids((8, 8), [(4, 4), (4, 4)], "layout", [tuple(b) for b in boxes])
        self.txt_ids = torch.zeros(text_tokens, 3)

    def __call__(self) -> None:
        import torch

        context = torch.autocast("cpu", torch.bfloat16) if self.autocast else torch.autocast("cpu", enabled=False)
        with context:
            out = self.forward(hidden_states=self.hidden, encoder_hidden_states=self.text,
                               pooled_projections=self.pooled, timestep=self.timestep, img_ids=self.img_ids,
                               txt_ids=self.txt_ids, return_dict=False)[0]
        loss = (out[:, :64].float() - self.target).pow(2).mean()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration per round")
    parser.add_argument("--no-compile", action="store_true", help="leave out the torch.compile row")
    args = parser.parse_args()
    if args.threads < 1 or args.rounds < 2 or args.steps < 1:
        parser.error("--threads and --steps must be >= 1 and --rounds >= 2")

    import torch

    torch.set_num_threads(args.threads)
    configs = {"eager": (64, False, False), "bf16": (64, True, False), "text-32": (32, False, False)}
    if not args.no_compile:
        configs["compile"] = (64, False, True)
    steps, notes = {}, []
    for name, (text_tokens, autocast, compiled) in configs.items():
        step = Step(text_tokens, autocast, compiled)
        start = time.perf_counter()
        step()  # warm-up; for `compile`, the compile itself
        if compiled:
            notes.append(f"compile: first step (the compile) took {time.perf_counter() - start:.1f} s")
        step()
        steps[name] = step

    def timed(step):
        def run() -> float:
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            return (time.perf_counter() - start) / args.steps
        return run

    seconds = interleaved({name: timed(step) for name, step in steps.items()}, args.rounds)
    base = seconds["eager"]
    rows, problems = [], []
    for name, values in seconds.items():
        s = summarize(values)
        ratios = summarize([b / v for b, v in zip(base, values)])
        rows.append([name, f"{s.median:.3f}", f"{s.rel_iqr:.1%}", f"{ratios.median:.2f}x", f"{ratios.iqr:.2f}"])
        if name != "eager" and ratios.iqr >= abs(ratios.median - 1.0):
            problems.append(f"{name}: its speed-up over eager ({ratios.median:.2f}x) is within its spread "
                            f"(IQR {ratios.iqr:.2f}); rerun on an idle machine or with more --rounds")
    print("\n".join(machine_lines("cpu")))
    print(f"threads {args.threads}, {args.rounds} rounds of {args.steps} steps per configuration")
    print(table(["config", "s/step", "spread", "speed-up vs eager", "ratio IQR"], rows))
    for note in notes:
        print(note)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
