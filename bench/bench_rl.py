"""Throughput of `psr rl` with the toy recipes' settings: rollout images/s, update steps/s,
FocusDPO pairs/s, and the share of each step spent computing rewards.

    .venv/bin/python bench/bench_rl.py                              # the recipes' model (embedded), CPU, 3 steps per recipe
    .venv/bin/python bench/bench_rl.py --device cuda --steps 10
    .venv/bin/python bench/bench_rl.py --recipes gspo-toy --set rollout.group_size=16
    .venv/bin/python bench/bench_rl.py --data data/synth-toy --rewards toyworld

Each recipe runs `train.steps` real steps through `psr.workflows.rl.run_rl` (G = 8 images
per prompt, 4 prompts per step, 10 rollout steps with 6 trained, as the toy recipes say)
into a temporary run folder; the numbers are the medians of its log lines, the first step
left out as warm-up when there are several. Rewards: ToyWorld's trained perception when its
weights are installed (`--rewards toyworld`), otherwise random-init tiny DINO + tiny
Grounding DINO (`--rewards tiny`): the same code path and cost class, untrained numbers.
Without `--data` a 64-row ToyWorld dataset is written to a temporary folder first.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = (("rollout_images_per_s", "rollout img/s"), ("update_steps_per_s", "update steps/s"),
           ("pairs_per_s", "pairs/s"), ("reward_time_share", "reward share"))
TINY = "extractor={name='dino', tiny=true}, localizer={name='grounding-dino', tiny=true}"


def reward_override(recipe_path: Path, kind: str) -> list[str]:
    """`--set rewards=[...]` keeping each reward of the recipe but with tiny components."""
    from psr.core.recipe import read_toml

    if kind == "toyworld":
        return []
    names = [r["name"] for r in read_toml(recipe_path).get("rewards", [])] or ["hungarian"]
    return ["rewards=[" + ", ".join(f"{{name='{n}', {TINY}}}" for n in names) + "]"]


def toyworld_weights() -> bool:
    from psr.toyworld.perception import IDENTITY_ASSETS, LOCALIZER_ASSETS

    return IDENTITY_ASSETS.is_dir() and LOCALIZER_ASSETS.is_dir()


def run_one(name: str, args, data: str, work: Path) -> dict[str, float]:
    from psr.cli.recipes import load_recipe
    from psr.workflows.rl import run_rl

    path = ROOT / "recipes" / f"{name}.toml"
    overrides = [f"data.path={data!r}", f"out={str(work / name)!r}", f"model.device={args.device!r}",
                 f"train.steps={args.steps}", "logging.every=1", "logging.tensorboard=false", "eval.every=0",
                 f"checkpoint.every={args.steps}", *reward_override(path, args.rewards), *args.set]
    run_rl(load_recipe("rl", str(path), overrides), show_progress=False)
    lines = [json.loads(line) for line in (work / name / "log.jsonl").read_text().splitlines()]
    lines = [e for e in lines if "lr" in e][1:] or lines[:1]  # skip the warm-up step
    return {key: statistics.median([e[key] for e in lines]) for key, _ in COLUMNS if key in lines[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=["gspo-toy", "grpo-toy", "focusdpo-toy"])
    parser.add_argument("--steps", type=int, default=3, help="steps per recipe (the first is warm-up)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data", help="a ToyWorld dataset folder (default: a fresh 64-row one)")
    parser.add_argument("--rewards", choices=("auto", "toyworld", "tiny"), default="auto")
    parser.add_argument("--set", action="append", default=[], help="extra recipe override, KEY=VALUE")
    args = parser.parse_args(argv)
    if args.rewards == "auto":
        args.rewards = "toyworld" if toyworld_weights() else "tiny"
    with tempfile.TemporaryDirectory(prefix="bench-rl-") as tmp:
        work = Path(tmp)
        data = args.data
        if data is None:
            from psr.cli.recipes import load_recipe
            from psr.workflows.synth import run_synth

            data = str(work / "data")
            run_synth(load_recipe("synth", str(ROOT / "recipes" / "synth-toy.toml"), ["shard_size=64", "workers=1"]),
                      data, 64, show_progress=False)
        results = {name: run_one(name, args, data, work) for name in args.recipes}
    print(f"psr rl throughput: {args.device}, {args.steps} steps per recipe, rewards: {args.rewards}")
    header = f"{'recipe':16s}" + "".join(f"{title:>16s}" for _, title in COLUMNS)
    print(header)
    print("-" * len(header))
    for name, values in results.items():
        cells = [f"{values[key]:16.3f}" if key in values else f"{'-':>16s}" for key, _ in COLUMNS]
        print(f"{name:16s}" + "".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
