"""The regularizer evidence table: same data, same step budget, one row per regularizer set.

    .venv/bin/python scripts/regularizer_evidence.py --steps 1200 --seeds 0,1 --out runs/evidence

Each (variant, seed) run is `psr pretrain --recipe recipes/pretrain-embedded.toml` with the
variant's `[[regularizers]]` and the seed set by `--set`, then `psr eval` of its `final/` on
the held-out ToyWorld bench. Every command is printed before it runs. A finished run or eval
is skipped and a killed one resumes (`--resume`), so the script can be rerun after a kill
and loses nothing. The table (identity accuracy and leakage margin for 2-, 3- and 4-subject
items, mean ± sample standard deviation over seeds) is written to OUT/evidence.md and
OUT/evidence.json and printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from psr.eval.report import SUBJECT_GROUPS, group_means, mean_spread

ROOT = Path(__file__).resolve().parent.parent
PSR = [sys.executable, "-m", "psr"]

# name -> the [[regularizers]] tables of that row. MOSAIC's separation loss ramps in over the
# second quarter of the run (its paper ramps from 10k to 11k steps of a much longer run).
def variants(steps: int) -> dict[str, list[dict]]:
    idar = {"name": "idar", "weight": 0.1, "blocks": ["double"]}
    align = {"name": "mosaic_align", "weight": 0.1, "blocks": ["double"]}
    sep = {"name": "mosaic_sep", "weight": 1.0, "blocks": ["double"],
           "warmup_start": steps // 4, "warmup_end": steps // 2}
    return {"none": [], "idar": [idar], "mosaic_align+sep": [align, sep], "all": [idar, align, sep]}


METRICS = {"id_acc": "id acc", "leakage": "leakage"}


def toml_inline(value) -> str:
    """A Python value as a TOML inline value (for --set)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_inline(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(toml_inline(v) for v in value) + "]"
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd[2:] if cmd[:2] == PSR else cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT)
    if done.returncode != 0:
        sys.exit(f"regularizer_evidence: command failed with exit code {done.returncode}")


def train_and_eval(args, name: str, regs: list[dict], seed: int) -> dict:
    run_dir = Path(args.out) / f"{name}-s{seed}"
    if not (run_dir / "final" / "psr_model.json").exists():
        cmd = [*PSR, "pretrain", "--recipe", args.recipe, "--out", str(run_dir), "--quiet",
               "--set", f"train.steps={args.steps}", "--set", f"train.seed={seed}",
               "--set", f"regularizers={toml_inline(regs)}", "--set", "samples.every=0"]
        if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
            cmd.append("--resume")
        run(cmd)
    eval_dir = run_dir / "eval"
    if not (eval_dir / "results.json").exists():
        cmd = [*PSR, "eval", "--recipe", args.eval_recipe, "--bench", args.bench, "--out", str(eval_dir),
               "--set", f"model.path={run_dir / 'final'}"]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        run(cmd)
    return json.loads((eval_dir / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1200, help="optimizer steps per run (same for every row)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    parser.add_argument("--variants", default="", help="comma-separated subset of: none, idar, mosaic_align+sep, all")
    parser.add_argument("--out", default="runs/evidence")
    parser.add_argument("--recipe", default="recipes/pretrain-embedded.toml")
    parser.add_argument("--eval-recipe", default="recipes/eval-toy.toml")
    parser.add_argument("--bench", default="data/bench-toy")
    parser.add_argument("--limit", type=int, default=0, help="items per bench subset (0: all)")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    table = variants(args.steps)
    chosen = [v for v in args.variants.split(",") if v] or list(table)
    unknown = [v for v in chosen if v not in table]
    if unknown:
        print(f"regularizer_evidence: unknown variant {unknown[0]!r}; choose from {', '.join(table)}", file=sys.stderr)
        sys.exit(2)
    seeds = [int(s) for s in args.seeds.split(",") if s]

    per_variant = {}
    for name in chosen:
        per_seed = [group_means(train_and_eval(args, name, table[name], seed), list(METRICS)) for seed in seeds]
        per_variant[name] = per_seed

    header = "| regularizers | " + " | ".join(f"{m} {g[0]}" for g in SUBJECT_GROUPS for m in METRICS.values()) + " |"
    lines = [f"Steps per run: {args.steps}; seeds: {', '.join(map(str, seeds))}; mean ± std over seeds.", "",
             header, "|" + "---|" * (1 + len(SUBJECT_GROUPS) * len(METRICS))]
    for name, per_seed in per_variant.items():
        cells = [mean_spread([s[g][m] for s in per_seed]) for g in SUBJECT_GROUPS for m in METRICS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evidence.md").write_text(text)
    (out / "evidence.json").write_text(json.dumps({"steps": args.steps, "seeds": seeds, "runs": per_variant}, indent=1))
    print(text, end="")


if __name__ == "__main__":
    main()
