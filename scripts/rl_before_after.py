"""The RL before/after table: each toy RL recipe, several seeds, scored on the held-out bench.

    .venv/bin/python scripts/rl_before_after.py --seeds 0,1,2 --out runs/rl-before-after

"Before" is `psr eval` of the model the recipes start from (their `[model]`, the shipped
embedded model unless `--set` says otherwise). For each recipe (gspo-toy, grpo-toy,
focusdpo-toy) and seed, the script runs `psr rl --recipe recipes/<name>.toml` with that
seed, then `psr eval --weights <run>/final` on the same bench and sampling setup. Every
command is printed before it runs; a finished run or eval is skipped and a killed one
resumes (`--resume`), so rerunning after a kill loses nothing.

The table (OUT/before_after.md and .json, also printed) has, per row, Hungarian-matched
subject consistency and identity accuracy (2-subject items), position accuracy (exact rule)
and the scene and attribute checks (the prompt's text), as mean ± sample std over seeds,
and the change in consistency against "before" with the verdict the claim needs: does
the mean gain exceed the seed-to-seed spread?
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from psr.eval.report import group_means, mean_spread

ROOT = Path(__file__).resolve().parent.parent
PSR = [sys.executable, "-m", "psr"]
RECIPES = ("gspo-toy", "grpo-toy", "focusdpo-toy")
# metric -> column; all on the 2-subject items (the claim is about multi-subject consistency).
METRICS = {"cons_hungarian": "cons Hungarian", "id_acc": "id acc", "pos_exact": "position",
           "scene_ok": "scene", "attr_ok": "attribute"}
GROUP = "2 subjects"


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd[2:] if cmd[:2] == PSR else cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, check=False)
    if done.returncode != 0:
        sys.exit(f"rl_before_after: command failed with exit code {done.returncode}")


def evaluate(args, out: Path, weights: Path | None) -> dict:
    if not (out / "results.json").exists():
        cmd = [*PSR, "eval", "--recipe", args.eval_recipe, "--bench", args.bench, "--out", str(out), "--quiet"]
        if weights is not None:
            cmd += ["--weights", str(weights)]
        if args.limit:
            cmd += ["--limit", str(args.limit)]
        cmd += [a for s in args.set for a in ("--set", s)]
        run(cmd)
    return json.loads((out / "results.json").read_text())


def train(args, name: str, seed: int) -> Path:
    run_dir = Path(args.out) / f"{name}-s{seed}"
    if not (run_dir / "final" / "psr_lora.json").exists():
        cmd = [*PSR, "rl", "--recipe", f"recipes/{name}.toml", "--out", str(run_dir), "--quiet",
               "--set", f"train.seed={seed}"]
        if args.steps:
            cmd += ["--set", f"train.steps={args.steps}"]
        if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
            cmd.append("--resume")
        run(cmd)
    return run_dir / "final"


def table(before: dict, after: dict[str, list[dict]]) -> str:
    """The Markdown table from group means: `before` one row, `after` a list per recipe."""
    head = ["model", *METRICS.values(), "Δ cons", "gain > spread"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines.append("| before | " + " | ".join(f"{before[m]:.3f}" if m in before else "–" for m in METRICS)
                 + " | – | – |")
    for name, per_seed in after.items():
        cells = [mean_spread([s[m] for s in per_seed]) if all(m in s for s in per_seed) else "–" for m in METRICS]
        gains = [s["cons_hungarian"] - before["cons_hungarian"] for s in per_seed]
        mean = sum(gains) / len(gains)
        spread = 0.0 if len(gains) < 2 else (sum((g - mean) ** 2 for g in gains) / (len(gains) - 1)) ** 0.5
        verdict = "yes" if len(gains) > 1 and mean > spread else "no" if len(gains) > 1 else "one seed"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {mean_spread(gains)} | {verdict} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated subset of {', '.join(RECIPES)}")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated training seeds")
    parser.add_argument("--steps", type=int, default=0, help="optimizer steps per run (0: the recipe's)")
    parser.add_argument("--out", default="runs/rl-before-after")
    parser.add_argument("--eval-recipe", default="recipes/eval-toy.toml")
    parser.add_argument("--bench", default="data/bench-toy")
    parser.add_argument("--limit", type=int, default=0, help="items per bench subset (0: all)")
    parser.add_argument("--set", action="append", default=[], help="extra `psr eval --set` for every eval")
    args = parser.parse_args()
    os.environ.setdefault("PYTHONUNBUFFERED", "1")

    chosen = [r for r in args.recipes.split(",") if r]
    unknown = [r for r in chosen if r not in RECIPES]
    if unknown:
        print(f"rl_before_after: unknown recipe {unknown[0]!r}; choose from {', '.join(RECIPES)}", file=sys.stderr)
        sys.exit(2)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    out = Path(args.out)

    before = group_means(evaluate(args, out / "before", None), list(METRICS))[GROUP]
    after = {name: [group_means(evaluate(args, out / f"{name}-s{seed}" / "eval", train(args, name, seed)),
                                list(METRICS))[GROUP] for seed in seeds] for name in chosen}
    text = (f"2-subject items of `{args.bench}`; seeds {', '.join(map(str, seeds))}; mean ± std over seeds; "
            f"Δ cons = after − before, per seed.\n\n" + table(before, after))
    out.mkdir(parents=True, exist_ok=True)
    (out / "before_after.md").write_text(text)
    (out / "before_after.json").write_text(json.dumps({"seeds": seeds, "before": before, "after": after}, indent=1))
    print(text, end="")


if __name__ == "__main__":
    main()
