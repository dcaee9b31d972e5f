"""How much a model uses its references: teacher-forced subject error with the right
references, another row's, and none.

    .venv/bin/python scripts/reference_gain.py --data data/heldout-toy --weights runs/x/checkpoints/step_000500

The held-out rows come from `psr synth` with evaluation identities:

    psr synth --recipe recipes/synth-toy.toml --out data/heldout-toy --num-samples 400 \
        --set 'toyworld.id_split="eval"' --set seed=2000000000

For the first `--rows` rows with `--subjects` references, at each σ, the ground-truth
latents are noised (one fixed noise draw for every model, so models compare pairwise) and
the velocity is predicted three ways: with the row's references, with the next row's
(a rotation, so each row gets another row's subjects in the same layout), and with none.
The error is reported in x0 units, σ²·mean|v̂ − v|², on the subject tokens (the rows'
token labels) and on the background with the right references. "Gain" is the error with
another row's references minus the error with the right ones: zero for a model that
ignores its references. Sampling-free, so it separates models long before identity
accuracy of sampled images leaves zero.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
REFERENCE_MODES = ("right", "other", "none")


def subject_errors(model, rows, sigmas: list[float], seed: int = 0) -> list[dict]:
    """One dict per σ: x0-space error on subject tokens per reference mode, the background
    error with the right references, and the gain (other − right)."""
    import torch

    from psr.core.packing import pack
    from psr.train.data import collate
    from psr.train.objective import Encoders, group_input, predict

    if len(rows) < 2:
        raise ValueError("need at least 2 rows (each row gets the next row's references)")
    batch = collate(rows)
    encoders = Encoders(model)
    x0 = pack(encoders.latents(None, list(batch.target))).float()
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    prompt = model.encode_prompt(batch.prompts)
    subject = batch.labels > 0
    rotated = copy.copy(batch)
    rotated.references = batch.references[1:] + batch.references[:1]
    everyone = list(range(len(batch)))
    guidance = 1.0 if model.transformer.config.guidance_embeds else None  # training's default

    def error(sigma: float, mode: str) -> tuple[float, float]:
        source = rotated if mode == "other" else batch
        group = group_input(model, encoders, source, everyone, mode != "none", x0, noise,
                            torch.full((len(batch),), sigma), prompt, model.dtype)
        with torch.no_grad():
            per_token = (predict(model.transformer, group, guidance).float() - group.velocity).pow(2).mean(-1)
        per_token = per_token * sigma * sigma  # velocity error → x0 error
        return per_token[subject].mean().item(), per_token[~subject].mean().item()

    table = []
    for sigma in sigmas:
        (right, background), (other, _), (none, _) = (error(sigma, m) for m in REFERENCE_MODES)
        table.append({"sigma": sigma, "right": right, "other": other, "none": none,
                      "background": background, "gain": other - right})
    return table


def format_table(table: list[dict]) -> str:
    lines = ["| σ | subject, right refs | subject, other refs | subject, no refs | background | gain |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {r['sigma']:.2f} | {r['right']:.4f} | {r['other']:.4f} | {r['none']:.4f} | "
              f"{r['background']:.4f} | {r['gain']:.4f} |" for r in table]
    mean_gain = sum(r["gain"] for r in table) / len(table)
    return "\n".join(lines) + f"\n\nmean gain {mean_gain:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a psr synth dataset with masks (ToyWorld)")
    parser.add_argument("--model", default=None, help="model folder (default: the shipped embedded model)")
    parser.add_argument("--weights", default=None, help="trained weights on top (checkpoint, final/, LoRA)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--subjects", type=int, default=2, help="use rows with this many references")
    parser.add_argument("--sigmas", default="0.5,0.7,0.85")
    parser.add_argument("--seed", type=int, default=0, help="the noise draw")
    args = parser.parse_args(argv)

    sys.path.insert(0, str(ROOT))
    from psr.core.model import MultiRefFlux
    from psr.core.schema import ModelConfig, resolve_model
    from psr.errors import UserError
    from psr.train.data import TrainRows, open_dataset

    try:
        sigmas = [float(s) for s in args.sigmas.split(",")]
        if not all(0 < s <= 1 for s in sigmas):
            raise ValueError
    except ValueError:
        print(f"reference_gain: --sigmas {args.sigmas!r}: comma-separated numbers in (0, 1]", file=sys.stderr)
        return 2
    try:
        data = open_dataset(args.data)  # bad paths fail before the model loads
        # The embedded preset's model section, as every command loads one (weights included).
        config = resolve_model(ModelConfig(path=args.model, weights=args.weights, dtype="float32", device="cpu"))
        model = MultiRefFlux.from_config(config)
        dataset = TrainRows(data, model.token_stride, model.reference_size, config.max_references,
                            model.reference_resize)
        picked = [i for i, row in enumerate(dataset.dataset.rows) if len(row["references"]) == args.subjects]
        rows = [dataset[i] for i in picked[:args.rows]]
        if len(rows) < 2:
            raise UserError(f"{args.data}: fewer than 2 rows with {args.subjects} references")
    except UserError as err:
        print(f"reference_gain: {err}", file=sys.stderr)
        return 2
    print(format_table(subject_errors(model, rows, sigmas, args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
