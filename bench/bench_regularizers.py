"""Training-step cost of the attention regularizers: idar + mosaic_align + mosaic_sep on all
double-stream blocks against the plain flow-matching step, run side by side.

    .venv/bin/python bench/bench_regularizers.py                    # tiny preset, CPU, 64 px, batch 4
    .venv/bin/python bench/bench_regularizers.py --device cuda --size 256 --repeats 30
    .venv/bin/python bench/bench_regularizers.py --trainable full   # every weight trains, not LoRA

One step = flow-matching forward through `MultiRefFlux.velocity` with 2 references,
backward, AdamW step. With regularizers on, the step also captures the attention slices and
adds the three losses. The two kinds of step alternate (the order flips every repeat) and
the median over repeats is reported. Peak memory: on CUDA the allocator's peak over a few
steps of each kind; on the CPU the peak resident size of a fresh process per kind.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

SPECS = (("idar", 1.0), ("mosaic_align", 0.1), ("mosaic_sep", 1.0))


def _sync(device):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Step:
    """Everything one training step needs, built once."""

    def __init__(self, args):
        import numpy as np
        import torch
        from PIL import Image

        from psr.core.attention import TokenLayout
        from psr.core.lora import add_lora
        from psr.core.model import MultiRefFlux
        from psr.core.regularizers import RegBatch, RegularizerSpec
        from psr.core.tiny import build_tiny_components

        torch.manual_seed(0)
        self.args = args
        self.model = MultiRefFlux(build_tiny_components(seed=0), reference_size=args.size,
                                  max_sequence_length=args.max_sequence_length, device=args.device)
        transformer = self.model.transformer
        if args.trainable == "lora":
            add_lora(transformer, rank=16, targets=["all"])
        else:
            transformer.requires_grad_(True)
        transformer.train()
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-5)
        b, stride = args.batch, self.model.token_stride
        self.grid = (args.size // stride, args.size // stride)
        rng = np.random.default_rng(0)
        refs = [Image.fromarray(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)) for _ in range(2)]
        text = self.model.encode_prompt(["a red striped star creature next to a blue dotted moon creature"] * b)
        self.text, self.refs = text, self.model.encode_references(refs, self.grid)
        self.layout = TokenLayout.for_velocity(text.embeds.shape[1], self.grid, self.refs.grids)
        t = self.layout.target_len
        g = torch.Generator().manual_seed(1)
        self.batch = RegBatch(
            self.layout, torch.randint(0, 3, (b, t), generator=g),
            [torch.randint(-1, t, (b, n), generator=g) for n in self.layout.ref_lens],
            torch.ones(b, 2, dtype=torch.bool)).to(args.device)
        self.specs = [RegularizerSpec(name, weight=w, blocks=("double",)) for name, w in SPECS]
        self.x0 = torch.randn(b, t, self.model.latent_channels * 4, generator=g).to(args.device)
        self.guidance = torch.full((b,), 3.5, device=args.device)

    def run(self, regularized: bool) -> float:
        import torch

        from psr.core.regularizers import make_capture, regularizer_losses

        _sync(self.args.device)
        start = time.perf_counter()
        noise = torch.randn_like(self.x0)
        sigma = torch.sigmoid(torch.randn(self.x0.shape[0], device=self.x0.device))
        x_t = (1 - sigma[:, None, None]) * self.x0 + sigma[:, None, None] * noise
        capture = make_capture(self.specs, self.model.transformer, self.layout) if regularized else None
        if capture is not None:
            capture.__enter__()
        try:
            v = self.model.velocity(x_t, sigma, self.text, self.refs, self.grid, self.guidance)
            loss = (v.float() - (noise - self.x0)).square().mean()
            if capture is not None:
                total, _ = regularizer_losses(self.specs, capture, self.batch, step=0)
                loss = loss + total
        finally:
            if capture is not None:
                capture.__exit__(None, None, None)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        _sync(self.args.device)
        return time.perf_counter() - start


def latency(step: Step, repeats: int) -> dict[str, float]:
    for _ in range(3):  # warm-up both paths
        step.run(False), step.run(True)
    times = {False: [], True: []}
    for r in range(repeats):
        for regularized in ((False, True) if r % 2 == 0 else (True, False)):
            times[regularized].append(step.run(regularized))
    return {"off": statistics.median(times[False]), "on": statistics.median(times[True])}


def peak_memory(args, step: Step | None, kind: str) -> float:
    """Peak memory in MiB of a few training steps of one kind ('on' or 'off')."""
    if args.device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(3):
            step.run(kind == "on")
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    command = [sys.executable, __file__, "--_child", kind, "--size", str(args.size), "--batch", str(args.batch),
               "--trainable", args.trainable, "--device", args.device]
    out = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=64, help="target and reference side in pixels")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--trainable", choices=("lora", "full"), default="lora",
                        help="LoRA rank 16 on every attention and feed-forward layer, or every weight")
    parser.add_argument("--max-sequence-length", type=int, default=64)
    parser.add_argument("--_child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    step = Step(args)
    if args._child:
        for _ in range(3):
            step.run(args._child == "on")
        print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return

    print(f"tiny preset, {args.size}px, batch {args.batch}, 2 references, {args.trainable} training, "
          f"device {args.device}, median of {args.repeats}; layout {step.layout}")
    times = latency(step, args.repeats)
    memory = {kind: peak_memory(args, step, kind) for kind in ("off", "on")}
    label = "peak MiB" if args.device.startswith("cuda") else "peak RSS MiB"
    print(f"{'step':>28} {'ms':>9} {label:>13}")
    print(f"{'flow matching only':>28} {times['off'] * 1e3:9.2f} {memory['off']:13.1f}")
    print(f"{'+ idar, align, sep (double)':>28} {times['on'] * 1e3:9.2f} {memory['on']:13.1f}")
    print(f"goal: regularized step ≤ 1.3× the plain step — measured {times['on'] / times['off']:.3f}×")


if __name__ == "__main__":
    main()
