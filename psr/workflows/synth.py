"""`psr synth`: draw samples from a source and write a sharded dataset, resumably.

Work is cut into shards of `shard_size` consecutive sample indices. A shard is finished
when its manifest part exists (written last, atomically), so a killed run loses at most
the shards in flight, and rerunning the same command redoes exactly those. Shards are
dealt round-robin to processes (`torchrun --nproc_per_node N -m psr synth …` on CPUs,
`accelerate launch --num_processes N -m psr synth …` on GPUs) and, within a
process, to `workers` local worker processes. Sample i depends only on (recipe, i), so
the result is the same bytes however the work was split or interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from psr.core.io import prepare_output_dir, write_json_atomic, write_text_atomic
from psr.core.recipe import to_toml
from psr.core.runlock import RunLock
from psr.errors import UserError
from psr.synth import dataset as ds
from psr.synth.config import SynthRecipe
from psr.synth.psrbench import export_psrbench
from psr.synth.sources import SOURCES


def recipe_hash(recipe: SynthRecipe) -> str:
    """Hash of everything that decides sample contents (not how many, not how fast)."""
    same_data = dataclasses.replace(recipe, num_samples=1, workers=1, device="auto")
    text = to_toml(same_data)
    if recipe.toyworld.level == "full":  # data made before ToyWorld levels existed keeps its hash
        text = text.replace('level = "full"\n', "", 1)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_same_recipe(out: Path, digest: str) -> None:
    info = out / "dataset.json"
    try:
        previous = json.loads(info.read_bytes()).get("recipe_hash") if info.is_file() else None
    except (OSError, ValueError, AttributeError):
        # dataset.json is rewritten when the run ends; a damaged one proves nothing, and
        # the manifest's own stamp still guards against mixing recipes.
        previous = None
    if previous is not None:
        if previous != digest:
            raise UserError(f"output {out}: holds data from another recipe (hash {previous}, this one {digest}); "
                            "choose another --out")
    elif (out / "manifest").is_dir() and any((out / "manifest").glob("*.jsonl")):
        stamp = out / "manifest" / "recipe_hash"
        if stamp.is_file() and stamp.read_bytes().strip() != digest.encode():
            raise UserError(f"output {out}: holds a partial dataset from another recipe; choose another --out")


_SOURCES_BUILT: dict[tuple[str, str], object] = {}


def _work_shard(args) -> tuple[int, int, int]:
    """Worker entry: build the source once per process and recipe, write one shard."""
    recipe, out, shard, num_samples, digest, device = args
    if (digest, device) not in _SOURCES_BUILT:
        _SOURCES_BUILT.clear()  # one source (and its models) alive at a time
        _SOURCES_BUILT[digest, device] = SOURCES[recipe.source](recipe, device)
    source = _SOURCES_BUILT[digest, device]

    def results():
        for index in ds.shard_indices(shard, recipe.shard_size, num_samples):
            result = source(index)
            result.provenance["recipe_hash"] = digest
            yield index, result

    rows, rejected = ds.write_shard(Path(out), shard, results(), recipe.token_stride)
    return shard, rows, rejected


def run_synth(recipe: SynthRecipe, out_dir: str, num_samples: int | None = None,
              show_progress: bool = True) -> dict:
    """Write (or finish) the dataset in `out_dir`; returns the summary written to dataset.json."""
    if num_samples is not None:
        if num_samples < 1:
            raise UserError("--num-samples: must be >= 1")
        recipe = dataclasses.replace(recipe, num_samples=num_samples)
    if recipe.format == "psrbench":
        out = prepare_output_dir(out_dir)
        with RunLock(out, "psr synth"):
            return export_psrbench(recipe, out_dir, recipe_hash(recipe), show_progress=show_progress)

    from accelerate import PartialState

    # ToyWorld needs no accelerator; cpu=True also makes torchrun-launched CPU processes
    # form a gloo group (accelerate's launcher starts one CPU process only).
    state = PartialState(cpu=recipe.device == "cpu" or recipe.source == "toyworld")
    out = prepare_output_dir(out_dir)
    # The main process holds the folder for all of them: startup deletes every staging
    # folder it finds, which is only safe when no other run is writing there.
    with RunLock(out, "psr synth") if state.is_main_process else contextlib.nullcontext():
        return _fill(recipe, out, state, show_progress)


def _fill(recipe: SynthRecipe, out: Path, state, show_progress: bool) -> dict:
    """`run_synth`'s work, done while the main process holds the folder."""
    from tqdm import tqdm

    digest = recipe_hash(recipe)
    _check_same_recipe(out, digest)
    n = recipe.num_samples
    num_shards = ds.num_shards_for(n, recipe.shard_size)
    if state.is_main_process:
        for folder in ("shards", "manifest"):
            with ds.writing_to(out, f"{folder}/"):
                (out / folder).mkdir(exist_ok=True)
        if not (out / "manifest" / "recipe_hash").is_file():
            with ds.writing_to(out, "manifest/recipe_hash"):
                write_text_atomic(out / "manifest" / "recipe_hash", digest + "\n")
        with ds.writing_to(out, "recipe.toml"):
            write_text_atomic(out / "recipe.toml", to_toml(recipe, header="resolved recipe of this dataset"))
        for stale in (out / "shards").glob(".tmp-*"):  # staging folders of killed runs
            shutil.rmtree(stale, ignore_errors=True)
    state.wait_for_everyone()

    mine = [s for s in range(num_shards) if s % state.num_processes == state.process_index]
    todo = []
    for s in mine:
        complete, damage = ds.check_shard(out, s, recipe.shard_size, n)
        if damage:
            print(f"psr synth: shard {ds.shard_name(s)} is damaged ({damage}); redoing it", file=sys.stderr)
        if not complete:
            todo.append(s)
    todo_samples = sum(len(ds.shard_indices(s, recipe.shard_size, n)) for s in todo)
    device = str(state.device)
    jobs = [(recipe, str(out), s, n, digest, device) for s in todo]
    start = time.perf_counter()
    written = rejected = 0
    with tqdm(total=todo_samples, desc="synth", unit="sample", disable=not show_progress or not todo,
              file=sys.stderr) as bar:
        if recipe.workers > 1 and len(jobs) > 1:
            import multiprocessing as mp

            with mp.get_context("fork").Pool(min(recipe.workers, len(jobs))) as pool:
                for shard, rows, rej in pool.imap_unordered(_work_shard, jobs):
                    written, rejected = written + rows, rejected + rej
                    bar.update(rows + rej)
        else:
            for job in jobs:
                shard, rows, rej = _work_shard(job)
                written, rejected = written + rows, rejected + rej
                bar.update(rows + rej)
    elapsed = time.perf_counter() - start
    state.wait_for_everyone()

    summary = {}
    if state.is_main_process:
        with ds.writing_to(out, "manifest.jsonl"):
            rows_total = ds.merge_manifest(out, num_shards)
        rejected_total = sum(
            len(p.read_text().splitlines()) for p in (out / "manifest").glob("*.rejected.jsonl"))
        summary = {
            "format_version": ds.FORMAT_VERSION, "source": recipe.source, "recipe_hash": digest,
            "num_samples": n, "rows": rows_total, "rejected": rejected_total,
            "shard_size": recipe.shard_size, "num_shards": num_shards, "token_stride": recipe.token_stride,
        }
        with ds.writing_to(out, "dataset.json"):
            write_json_atomic(out / "dataset.json", summary)
        rate = todo_samples / elapsed if elapsed > 0 and todo_samples else 0.0
        if todo:
            who = "" if state.num_processes == 1 else f" by process 0 of {state.num_processes}"
            print(f"psr synth: {written} rows written, {rejected} rejected{who} in {elapsed:.1f} s "
                  f"({rate:.0f} samples/s); dataset: {rows_total} rows in {out}", file=sys.stderr)
        else:
            print(f"psr synth: nothing to do, {out} already holds all {rows_total} rows", file=sys.stderr)
    return summary
