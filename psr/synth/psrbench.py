"""A ToyWorld benchmark in PSRBench's layout: seven subsets, PSRBench's JSON schema, plus
exact ground truth in extra fields.

    OUT/Attribute.json  OUT/Action.json  …  OUT/Four.json   (one JSON list per subset)
    OUT/images/<Subset>/0000_ref0.png …     references (paths in `input_path`)
    OUT/images/<Subset>/0000_target.png     the ground-truth target (`gt_target_path`)
    OUT/bench.json                          counts, seeds, recipe hash

Each item has PSRBench's keys — `instruction`, `input_path` (list, relative to OUT),
`category1` … `categoryN`, and for Position items `position` (the relation: "left of",
"right of", "above", "below", "next to") — plus `gt_target_path` and `gt` (identities,
names, boxes, masks as RLE, scene, relation, attributes, actions, and the ToyWorld example
that re-renders the target exactly). Evaluators add `result_path`.

Subsets (two subjects unless named otherwise): Attribute (each subject wears an added
attribute), Action (each subject is posed: leaning, stretching, crouching, bending),
Background (the scene is named), Position (the relation is named; the five relations in
turn), Complex (attributes, actions and relation together), Three and Four subjects.
Sample k of subset s is drawn from seed `recipe.seed + 100000·s + k` with identities from
the held-out range, so a benchmark never meets training data.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from psr import toyworld as tw
from psr.core.io import create_temp_dir, prepare_output_dir, write_json_atomic
from psr.synth.dataset import rle_encode

# Action phrase → pose change. Kept mild so layouts and relations stay valid.
ACTIONS: dict[str, dict] = {
    "leaning to the left": {"rotation": 24.0},
    "leaning to the right": {"rotation": -24.0},
    "stretching up": {"squash": 0.8},
    "crouching down": {"squash": 1.25},
    "bending sideways": {"bend": 0.14},
}

# name → (subjects, attributes, actions, relation named in the instruction)
SUBSETS: dict[str, tuple[int, bool, bool, bool]] = {
    "Attribute": (2, True, False, False),
    "Action": (2, False, True, False),
    "Background": (2, False, False, False),
    "Position": (2, False, False, True),
    "Complex": (2, True, True, True),
    "Three": (3, False, False, False),
    "Four": (4, False, False, False),
}
SEED_STRIDE = 100_000


def _with_actions(spec: "tw.SceneSpec", rng: np.random.Generator) -> tuple["tw.SceneSpec", list[str]]:
    names = list(ACTIONS)
    chosen = [names[int(rng.integers(len(names)))] for _ in spec.subjects]
    subjects = tuple(dataclasses.replace(s, pose=dataclasses.replace(s.pose, **ACTIONS[a]))
                     for s, a in zip(spec.subjects, chosen))
    return dataclasses.replace(spec, subjects=subjects), chosen


def _with_attributes(spec: "tw.SceneSpec", rng: np.random.Generator) -> "tw.SceneSpec":
    names = list(tw.ATTRIBUTES)
    subjects = tuple(s if s.attributes else dataclasses.replace(s, attributes=(names[int(rng.integers(len(names)))],))
                     for s in spec.subjects)
    return dataclasses.replace(spec, subjects=subjects)


def bench_example(subset: str, k: int, seed: int, id_range: tuple[int, int], level: str = "full"):
    """The k-th item of `subset`: (example, actions), retrying seeds until the layout holds."""
    subjects, attributes, actions, positional = SUBSETS[subset]
    for attempt in range(50):
        item_seed = seed + attempt * 7919  # a prime stride keeps retries off other items' seeds
        rng = np.random.default_rng([0xBE7C, item_seed])
        relation = tw.RELATIONS[k % len(tw.RELATIONS)] if positional else None
        example = tw.sample_example(item_seed, subjects, id_range, attribute_rate=0.0, relation=relation,
                                    level=level)
        target, chosen = example.target, []
        if attributes:
            target = _with_attributes(target, rng)
        if actions:
            target, chosen = _with_actions(target, rng)
        prompt = tw.build_prompt(target)
        if chosen:
            prompt += ", " + ", ".join(f"{tw.Identity.from_id(s.identity).name} {a}"
                                       for s, a in zip(target.subjects, chosen))
        example = dataclasses.replace(example, target=target, prompt=prompt)
        rendered = tw.render(target, 64)
        if all(rendered.masks[i].any() for i in range(subjects)) and rendered.relation_holds() is not False:
            return example, chosen, rendered
    raise RuntimeError(f"no valid {subset} layout for item {k}")  # a ToyWorld bug, not user input


def _write_subset(out: Path, subset: str, count: int, seed: int, size: int, ref_size: int,
                  id_range: tuple[int, int], level: str = "full") -> list[dict]:
    folder = out / "images" / subset
    staging = create_temp_dir(out / "images", f".tmp-{subset}-")
    items = []
    try:
        for k in range(count):
            example, actions, _ = bench_example(subset, k, seed + k, id_range, level)
            target = tw.render(example.target, size)
            refs = [tw.render(r, ref_size) for r in example.references]
            stem = f"{k:04d}"
            Image.fromarray(target.image).save(staging / f"{stem}_target.png")
            for i, ref in enumerate(refs):
                Image.fromarray(ref.image).save(staging / f"{stem}_ref{i}.png")
            truth = target.ground_truth()
            item = {
                "instruction": example.prompt,
                "input_path": [f"images/{subset}/{stem}_ref{i}.png" for i in range(len(refs))],
                **{f"category{i + 1}": s["category"] for i, s in enumerate(truth["subjects"])},
            }
            if SUBSETS[subset][3]:
                item["position"] = example.target.relation
            item["gt_target_path"] = f"images/{subset}/{stem}_target.png"
            item["gt"] = {
                "subjects": [{**s, "mask": rle_encode(target.masks[i]),
                              "attributes": list(example.target.subjects[i].attributes),
                              "action": actions[i] if actions else None}
                             for i, s in enumerate(truth["subjects"])],
                "scene": example.target.scene,
                "relation": truth["relation"],
                "example": example.to_dict(),
                "size": size,
            }
            items.append(item)
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return items


def export_psrbench(recipe, out_dir: str, recipe_hash: str, show_progress: bool = True) -> dict:
    """Write (or finish) the benchmark; a subset is done once its JSON file exists.
    `recipe_hash` (the synth recipe's, `psr.workflows.synth.recipe_hash`) goes into bench.json."""
    from tqdm import tqdm

    out = prepare_output_dir(out_dir)
    (out / "images").mkdir(exist_ok=True)
    for stale in (out / "images").glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    count = recipe.bench.samples_per_subset
    id_range = tw.DEFAULT_ID_RANGES[recipe.toyworld.id_split]
    done = {}
    for subset in tqdm(recipe.bench.subsets, desc="psrbench", unit="subset", disable=not show_progress,
                       file=sys.stderr):
        path = out / f"{subset}.json"
        if path.is_file() and len(json.loads(path.read_text())) == count:
            done[subset] = count
            continue
        seed = recipe.seed + SEED_STRIDE * list(SUBSETS).index(subset)
        items = _write_subset(out, subset, count, seed, recipe.toyworld.size, recipe.toyworld.reference_size,
                              id_range, recipe.toyworld.level)
        write_json_atomic(path, items)
        done[subset] = len(items)
    summary = {"format": "psrbench", "subsets": done, "seed": recipe.seed, "id_split": recipe.toyworld.id_split,
               "level": recipe.toyworld.level,
               "recipe_hash": recipe_hash}
    write_json_atomic(out / "bench.json", summary)
    print(f"psr synth: PSRBench export with {sum(done.values())} items in {out}", file=sys.stderr)
    return summary
