"""`psr plan`'s activation model against measured peaks of real training steps on the CPU.

    .venv/bin/python bench/bench_plan.py            # tiny and embedded presets, ~3 minutes on 2 cores
    .venv/bin/python bench/bench_plan.py --quick    # the first three rows

Each row is a `psr pretrain` micro-step (one group: forward, float32 flow-matching loss,
attention regularizers when the row has them, backward) of a random-init tiny or the shipped
embedded transformer. "estimate" is `psr.train.plan.analyse(...).backward_peak()`, the part
of the plan that one forward + backward adds on top of the weights, computed with CPU
autocast's rules; "measured" is the peak of torch's CPU allocator during the same step,
counted from the profiler's memory events (`psr.train.memory`). Gradients start unset, as
`zero_grad(set_to_none=True)` leaves them, so the measured peak includes them as backward
allocates them, and so does the estimate.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "recipes" / "pretrain-toy.toml"
EMBEDDED = ROOT / "recipes" / "pretrain-embedded.toml"

LORA = ["adapter.kind='lora'", "adapter.rank=16"]
LORA_ALL = LORA + ["adapter.targets=['all']"]
NO_REGS = ["regularizers=[]"]

# (label, recipe, overrides): full fine-tune vs LoRA, two batch sizes, 1-2 references,
# checkpointing, MoE-LoRA, the regularizers' attention capture, bf16 autocast.
CONFIGS = [
    ("tiny full  b1 r1", TOY, NO_REGS + ["train.batch_size=1", "data.max_references=1"]),
    ("tiny lora  b1 r1", TOY, NO_REGS + LORA + ["train.batch_size=1", "data.max_references=1"]),
    ("tiny lora  b4 r2", TOY, NO_REGS + LORA + ["train.batch_size=4", "data.max_references=2"]),
    ("tiny full  b4 r2", TOY, NO_REGS + ["train.batch_size=4", "data.max_references=2"]),
    ("tiny full  b4 r2 ckpt", TOY, NO_REGS + ["train.batch_size=4", "data.max_references=2",
                                              "train.gradient_checkpointing=true"]),
    ("tiny lora-all b4 r2 ckpt", TOY, NO_REGS + LORA_ALL + ["train.batch_size=4", "data.max_references=2",
                                                            "train.gradient_checkpointing=true"]),
    ("tiny lora-all b2 r2 +regs", TOY, LORA_ALL + ["train.batch_size=2", "data.max_references=2"]),
    ("tiny lora-all b2 r2 +regs ckpt", TOY, LORA_ALL + ["train.batch_size=2", "data.max_references=2",
                                                        "train.gradient_checkpointing=true"]),
    ("tiny moe-lora b4 r1", TOY, NO_REGS + ["adapter.kind='moe_lora'", "adapter.rank=8", "train.batch_size=4",
                                            "data.max_references=1"]),
    ("tiny lora-all b4 r2 bf16", TOY, NO_REGS + LORA_ALL + ["train.batch_size=4", "data.max_references=2",
                                                            "model.dtype='bfloat16'", "train.mixed_precision='bf16'"]),
    ("embedded full b4 r2", EMBEDDED, ["train.batch_size=4", "data.max_references=2"]),
    ("embedded lora-all b8 r2 ckpt", EMBEDDED, LORA_ALL + ["train.batch_size=8", "data.max_references=2",
                                                           "train.gradient_checkpointing=true"]),
]


@contextlib.contextmanager
def quiet_fd2():
    """The profiler's tracing library writes start/stop lines (and, on a CUDA build without a
    GPU, a device-count error) straight to file descriptor 2; keep the table readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only the first three rows")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import warnings

    warnings.filterwarnings("ignore")
    from psr.cli.recipes import load_recipe
    from psr.core.presets import EMBEDDED_DIR
    from psr.train.memory import measure_step
    from psr.train.plan import analyse

    rows = CONFIGS[:3] if args.quick else CONFIGS
    print(f"{'step':<30} {'tokens':>12} {'per block':>12} {'estimate':>10} {'measured':>10} {'ratio':>6}")
    ratios = []
    for label, path, overrides in rows:
        if path == EMBEDDED:  # the shipped weights, wherever the recipe's own base model would be
            overrides = [f"model.path={str(EMBEDDED_DIR)!r}", *overrides]
        recipe = load_recipe("pretrain", str(path), overrides)
        plan = analyse(recipe, device="cpu")
        with quiet_fd2():
            measured = measure_step(recipe)["peak"]
        estimate = plan.backward_peak()
        ratios.append(estimate / measured)
        t = plan.tokens
        blocks = "/".join(f"{v:.1f}" for v in plan.act.per_block.values())
        print(f"{label:<30} {f'{t.batch}x{t.joint}':>12} {blocks:>12} {estimate / 2**20:>8.2f}Mi "
              f"{measured / 2**20:>8.2f}Mi {estimate / measured:>6.3f}", flush=True)
    print(f"ratio estimate/measured: {min(ratios):.3f} to {max(ratios):.3f}")
    print("per block: saved tensors of the first double / single block, in [batch, joint, width] activations")


if __name__ == "__main__":
    main()
