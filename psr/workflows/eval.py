"""`psr eval`: generate a PSRBench-format bench with a model, then score the outputs.

Phases: check everything (bench files, subsets, recipe, devices, weights path, --compare
file, and that OUT holds no images of another generator) before anything is written or any
weights load → make the missing output images → write OUT/<Subset>.json (the bench items with
`result_path`) → score every sample through the disk cache → write results.json,
samples.json, results.md and the contact sheets. Each phase resumes: images on disk are
kept, cached perception is reused, so a killed run picks up where it stopped and a
finished one reruns without generating or computing anything.

Modes: default (generate, then score), `score_only` (score the bench's own `result_path`
images), `oracle` (score the ground-truth targets `gt_target_path`: the top of each scale),
`reconstruct` (score the model VAE's reconstructions of those targets: the top any generator
drawing in that latent space can reach).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from pathlib import Path
from typing import Sequence

from psr.core.components import resolve_device
from psr.core.io import output_dir, write_json_atomic, write_text_atomic
from psr.core.recipe import to_toml
from psr.core.schema import check_generation
from psr.errors import UserError
from psr.eval import report
from psr.eval.bench import Bench, Item, load_bench, with_result_paths
from psr.eval.cache import DiskCache
from psr.eval.config import EvalRecipe, resolve_eval
from psr.eval.generation import generate_missing, output_path, reconstruct_missing
from psr.eval.perception import Perception
from psr.eval.scoring import PENALTY, load_references, metric_names, score_sample
from psr.eval.sheets import write_sheets
from psr.workflows.generate import check_model_inputs


def _weights_fingerprint(path: str | None) -> list:
    """Name, size and mtime of a local weights file or of every file of a local folder (so
    replaced weights under the same path count as another model); [] for a hub id or none."""
    where = Path(path).expanduser() if path else None
    if where is not None and where.is_file():
        return [[where.name, where.stat().st_size, where.stat().st_mtime_ns]]
    if where is None or not where.is_dir():
        return []
    return [[p.relative_to(where).as_posix(), p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(where.rglob("*")) if p.is_file()]


def _generator_hash(recipe: EvalRecipe, mode: str) -> str:
    """What decides the output pixels (not where or how fast they are made)."""
    model = dataclasses.replace(recipe.model, device="auto", cpu_offload=False, attention_backend=None)
    fields = dataclasses.asdict(model)
    if fields["weights"] is None:  # runs made before `model.weights` existed keep their hash
        del fields["weights"]
    # Runs made before `model.reference_mode` existed were "joint": they keep their hash. The
    # mode never touches a reconstruction.
    if fields["reference_mode"] == "joint" or mode == "reconstruct":
        del fields["reference_mode"]
    # Runs made before `model.reference_resize` existed used the "longest" rule: they keep
    # their hash, and a flux-kontext run, whose default rule changed, gets a new one. The rule
    # never touches a reconstruction.
    fields["reference_resize"] = recipe.model.resize_rule
    if fields["reference_resize"] == "longest" or mode == "reconstruct":
        del fields["reference_resize"]
    what = {"model": fields, "weights": _weights_fingerprint(recipe.model.path)}
    if recipe.model.weights:
        what["trained_weights"] = _weights_fingerprint(recipe.model.weights)
    if mode == "reconstruct":  # only the VAE and the size matter
        what.update(reconstruct=[recipe.sample.height, recipe.sample.width])
    else:
        sample = dataclasses.asdict(recipe.sample)
        if sample["image_guidance"] == 1.0:  # runs made before image guidance existed keep their hash
            del sample["image_guidance"]
        what.update(sample=sample, seeds_per_item=recipe.seeds_per_item)
    text = json.dumps(what, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _holds_results(out: Path) -> bool:
    """Whether `out` holds what a run made (images or results), not only psr's own
    metadata from a run that was refused or failed before it made anything."""
    images = out / "images"
    return (out / "results.json").is_file() or (images.is_dir() and any(images.rglob("*.png")))


def _check_same_generator(out: Path, recipe: EvalRecipe, mode: str) -> str:
    """The generator hash of this run; refuses an output folder whose images were made by
    another generator. Writes nothing: the caller stamps the folder once every check passed."""
    stamp = out / "eval.json"
    digest = _generator_hash(recipe, mode)
    if stamp.is_file() and _holds_results(out):
        try:
            previous = json.loads(stamp.read_text(encoding="utf-8")).get("generator")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            previous = None
        if previous != digest:
            raise UserError(f"output {out}: holds images made with another model or sampling setup "
                            f"(hash {previous}, this one {digest}); choose another --out")
    return digest


def _samples(mode: str, bench: Bench, items: Sequence[Item], out: Path, recipe: EvalRecipe,
             gen_failures: dict) -> tuple[list[tuple], dict[str, dict[int, str]]]:
    """[(item, seed index, image path or None, path as shown, why missing)] and, per subset,
    the `result_path` to write for each item (only in generate mode)."""
    samples, result_paths = [], {}
    for item in items:
        if mode in ("generate", "reconstruct"):
            n = recipe.seeds_per_item if mode == "generate" else 1
            for k in range(n):
                path = output_path(out, item, k, n)
                shown = path.relative_to(out).as_posix()
                reason = gen_failures.get((item.subset, item.index, k), "no output image was made")
                samples.append((item, k, path if path.is_file() else None, shown, reason))
            result_paths.setdefault(item.subset, {})[item.index] = output_path(out, item, 0, n).relative_to(out).as_posix()
            continue
        key = "gt_target_path" if mode == "oracle" else "result_path"
        shown = item.data.get(key)
        paths = [shown] if shown else []
        if mode == "score-only" and isinstance(item.data.get("result_paths"), list):
            paths = [p for p in item.data["result_paths"] if isinstance(p, str)] or paths
        if not paths:
            samples.append((item, 0, None, None, f"item has no {key}"))
        for k, p in enumerate(paths):
            resolved = bench.resolve(p)
            samples.append((item, k, resolved if resolved.is_file() else None, p, f"{key} {p}: no such file"))
    return samples, result_paths


def _check_inputs(mode: str, recipe: EvalRecipe, items: Sequence[Item]) -> None:
    if not items:
        raise UserError("bench: the chosen subsets hold no items")
    if mode in ("oracle", "reconstruct") and not any("gt_target_path" in it.data for it in items):
        raise UserError(f"--{mode}: the bench has no gt_target_path (only ToyWorld benches from psr synth do)")
    if mode == "score-only" and not any("result_path" in it.data for it in items):
        raise UserError("--score-only: the bench items have no result_path; run without --score-only to "
                        "generate them")
    if mode == "generate":
        limit = recipe.model.max_references
        for it in items:
            if len(it.references) > limit:
                raise UserError(f"bench {it.where}: {len(it.references)} references, but this recipe allows at "
                                f"most {limit} (model.max_references)")


def parse_subsets(text: str | None) -> list[str]:
    if text is None:
        return []
    names = [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise UserError(f"--subsets {text!r}: give subset names separated by commas, e.g. Position,Three")
    return names


def run_eval(recipe: EvalRecipe, bench_dir: str, out_dir: str, *, score_only: bool = False, oracle: bool = False,
             reconstruct: bool = False, limit: int | None = None, subsets: Sequence[str] = (),
             compare: str | None = None, show_progress: bool = True) -> dict:
    """Evaluate and write OUT; returns the results dict written to OUT/results.json."""
    chosen_modes = [flag for flag, on in (("--score-only", score_only), ("--oracle", oracle),
                                          ("--reconstruct", reconstruct)) if on]
    if len(chosen_modes) > 1:
        raise UserError(f"{' and '.join(chosen_modes)}: choose one of them")
    recipe = resolve_eval(recipe)
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: must be >= 1")
    bench = load_bench(bench_dir, list(subsets) or list(recipe.subsets))
    other = report.read_results(compare) if compare else None
    mode = "oracle" if oracle else "score-only" if score_only else "reconstruct" if reconstruct else "generate"
    chosen = {name: items[:limit] for name, items in bench.subsets.items()}
    items = [it for its in chosen.values() for it in its]
    _check_inputs(mode, recipe, items)
    if Path(out_dir).expanduser().resolve() == bench.root.resolve():
        raise UserError(f"--out {out_dir}: is the bench folder; choose another (the bench stays unchanged)")
    resolve_device(recipe.device)
    if mode in ("generate", "reconstruct"):
        check_generation(recipe.model, recipe.sample)
        check_model_inputs(recipe.model)
    # Every check above and the same-generator check below run before anything is written:
    # a refused run leaves the folder, and the recipe of the run that made it, as they were.
    with output_dir(out_dir) as out:
        digest = _check_same_generator(out, recipe, mode) if mode in ("generate", "reconstruct") else None
        write_text_atomic(out / "recipe.toml", to_toml(recipe, header=f"resolved recipe of psr eval ({mode})"))
        if digest is not None:
            write_json_atomic(out / "eval.json", {"generator": digest})
        generated, gen_failures = 0, {}
        if mode == "generate":
            generated, gen_failures = generate_missing(recipe, out, items, show_progress)
        elif mode == "reconstruct":
            generated, gen_failures = reconstruct_missing(recipe, out, bench, items, show_progress)
    samples, result_paths = _samples(mode, bench, items, out, recipe, gen_failures)
    for name in chosen:
        data = with_result_paths(bench, name, result_paths.get(name, {}))
        if mode == "generate" and recipe.seeds_per_item > 1:
            for item in chosen[name]:
                data[item.index]["result_paths"] = [
                    output_path(out, item, k, recipe.seeds_per_item).relative_to(out).as_posix()
                    for k in range(recipe.seeds_per_item)]
        write_json_atomic(out / f"{name}.json", data)

    records, stats = _score(recipe, out, samples, show_progress)
    results = _write_results(recipe, bench, out, mode, chosen, samples, records, generated, stats, other)
    text = report.markdown(results)
    write_text_atomic(out / "results.md", text)
    print(text, end="")
    print(f"psr eval: {len(records)} samples scored, {results['overall']['failed']} failed, "
          f"{generated} images generated; results in {out}", file=sys.stderr)
    return results


def _score(recipe: EvalRecipe, out: Path, samples: list[tuple], show_progress: bool) -> tuple[list[dict], dict]:
    """Score every sample; returns (records, {"cache": hits/misses, "components_built"})."""
    from tqdm import tqdm

    cache = DiskCache(out / "cache")
    perc = Perception(recipe, cache, recipe.device)
    records, refs_of = [], {}
    with tqdm(total=len(samples), desc="score", unit="sample", disable=not show_progress, file=sys.stderr) as bar:
        for item, k, path, shown, reason in samples:
            key = (item.subset, item.index)
            if key not in refs_of:
                refs_of = {key: load_references(item)}  # one item's references in memory at a time
            refs, ref_error = refs_of[key]
            records.append(score_sample(perc, recipe, item, k, path, shown, refs, ref_error, reason))
            cache.flush()
            bar.update(1)
    return records, {"cache": {"hits": cache.hits, "misses": cache.misses}, "components_built": list(perc.built)}


def _write_results(recipe, bench, out, mode, chosen, samples, records, generated, stats, other) -> dict:
    metrics = metric_names(recipe)
    results = {"mode": mode, "bench": str(bench.root), "out": str(out), "metrics": metrics, "penalty": PENALTY,
               "protocol": recipe.protocol}
    results.update(report.aggregate(records, list(chosen), metrics))
    results["generated"] = generated
    results.update(stats)
    results["config"] = dataclasses.asdict(recipe)
    if other is not None:
        results["compare"] = report.compare(results, other)
    write_json_atomic(out / "samples.json", {"samples": records})
    write_json_atomic(out / "results.json", results)
    images = {(item.subset, item.index, k): path for item, k, path, _, _ in samples}
    write_sheets(out, chosen, records, images, recipe.sheet_cell)
    return results
