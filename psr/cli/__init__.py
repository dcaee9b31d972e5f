"""The `psr` command line: each command reads its recipe, applies overrides and calls one
workflow function. Heavy libraries are imported inside the commands so `psr --help` is fast.

Bad input (`UserError`, usage errors) prints one line on stderr and exits with code 2.
"""

from __future__ import annotations

import contextlib
import json
import sys
import warnings
from typing import Annotated, Optional

import typer

from psr.cli.recipes import RECIPE_KINDS, load_recipe
from psr.core.presets import PRESETS
from psr.core.recipe import _suggest, read_toml
from psr.errors import UserError

app = typer.Typer(
    name="psr",
    help="Multi-subject personalized image generation: synth, pretrain, rl, eval, generate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

RecipeOpt = Annotated[Optional[str], typer.Option("--recipe", "-r", help="TOML recipe (default: built-in).")]
WeightsOpt = Annotated[Optional[str], typer.Option(
    "--weights", help="Trained weights on top of the model: a pretrain/rl checkpoint or final/ folder, a LoRA file "
                      "(psr's, diffusers' or kohya's; merged) or a MoE-LoRA file (kept as modules); sets "
                      "model.weights.")]
SetOpt = Annotated[Optional[list[str]], typer.Option(
    "--set", help="Override a recipe key: --set sample.steps=8 (value parsed as TOML).")]


@contextlib.contextmanager
def _library_progress(show: bool):
    """With `--quiet`, the libraries' own progress bars (transformers' "Loading weights",
    diffusers' and huggingface_hub's) are off too, and back as they were afterwards."""
    if show:
        yield
        return
    import diffusers.utils.logging as diffusers_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as transformers_logging

    shown = (transformers_logging.is_progress_bar_enabled(), diffusers_logging.is_progress_bar_enabled(),
             not hub_utils.are_progress_bars_disabled())
    with warnings.catch_warnings():  # HF_HUB_DISABLE_PROGRESS_BARS=0 in the environment would warn
        warnings.simplefilter("ignore")
        transformers_logging.disable_progress_bar()
        diffusers_logging.disable_progress_bar()
        hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if shown[0]:
                transformers_logging.enable_progress_bar()
            if shown[1]:
                diffusers_logging.enable_progress_bar()
            if shown[2]:
                hub_utils.enable_progress_bars()


def _size_overrides(size: str) -> list[str]:
    """`--size 512` or `--size 768x512` (WIDTHxHEIGHT) → recipe overrides."""
    parts = size.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--size {size!r}: expected N or WIDTHxHEIGHT, e.g. 64 or 96x64")
    width, height = (parts[0], parts[0]) if len(parts) == 1 else parts
    return [f"sample.width={width}", f"sample.height={height}"]


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="What to draw; name the subjects of the references.")],
    ref: Annotated[Optional[list[str]], typer.Option(
        "--ref", help="A reference image (repeat for several subjects, in prompt order).")] = None,
    recipe: RecipeOpt = None,
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder.")] = "psr-out",
    seed: Annotated[Optional[int], typer.Option(help="Seed of the first image; image k uses seed + k.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps.")] = None,
    guidance: Annotated[Optional[float], typer.Option(
        help="Guidance embedding value, or the prompt's CFG scale for a model without one.")] = None,
    image_guidance: Annotated[Optional[float], typer.Option(
        "--image-guidance", help="CFG scale over the references (1 is off; default: the preset's, 4 for embedded).")] = None,
    size: Annotated[Optional[str], typer.Option(help="N or WIDTHxHEIGHT in pixels.")] = None,
    num_images: Annotated[Optional[int], typer.Option("--num-images", "-n", help="Images to make.")] = None,
    sheet: Annotated[bool, typer.Option(
        "--sheet", help="Also write NNNN.sheet.png: the references, then every image.")] = False,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1, mps …")] = None,
    weights: WeightsOpt = None,
    set_: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Generate images of the reference subjects doing what the prompt says."""
    from psr.workflows.generate import run_generate

    overrides = list(set_ or [])
    flags = {"sample.seed": seed, "sample.steps": steps, "sample.guidance": guidance,
             "sample.image_guidance": image_guidance, "sample.num_images": num_images}
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    if device is not None:
        overrides.append(f"model.device={device!r}")
    if weights is not None:
        overrides.append(f"model.weights={json.dumps(weights)}")  # a TOML basic string
    if size is not None:
        overrides += _size_overrides(size)
    loaded = load_recipe("generate", recipe, overrides)
    with _library_progress(not quiet):
        written = run_generate(loaded, prompt, ref or [], out, show_progress=not quiet, sheet=sheet)
    for path in written:
        print(path)


@app.command()
def synth(
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Synth recipe (recipes/synth-toy.toml, …).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Dataset folder (created; reruns resume).")],
    num_samples: Annotated[Optional[int], typer.Option("--num-samples", "-n", help="Samples to draw.")] = None,
    set_: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Synthesize multi-subject training data, or a PSRBench-format benchmark."""
    from psr.workflows.synth import run_synth

    loaded = load_recipe("synth", recipe, set_ or [])
    with _library_progress(not quiet):
        run_synth(loaded, out, num_samples, show_progress=not quiet)


@app.command()
def validate(
    recipe: Annotated[str, typer.Argument(help="TOML recipe to check.")],
    set_: SetOpt = None,
):
    """Check a recipe (keys, types, values, names) without loading any weights."""
    kind = read_toml(recipe).get("command")
    if kind not in RECIPE_KINDS:
        hint = _suggest(kind, RECIPE_KINDS) if isinstance(kind, str) else ""
        raise UserError(f"{recipe}: command: must name one of {', '.join(RECIPE_KINDS)}, "
                        f"got {kind!r}{hint}")
    loaded = load_recipe(kind, recipe, set_ or [])
    if kind in ("generate", "eval"):  # what those commands check before loading any weights
        from psr.core.schema import check_generation

        check_generation(loaded.model, loaded.sample)
    print(f"{recipe}: ok ({kind} recipe)")


@app.command()
def presets():
    """List the model presets a recipe can name in `model.preset`."""
    for name, preset in PRESETS.items():
        print(f"{name:14s} {preset.description}")


@app.command("eval")
def eval_(
    bench: Annotated[str, typer.Option("--bench", "-b", help="PSRBench-format folder (<Subset>.json lists).")],
    out: Annotated[str, typer.Option("--out", "-o", help="Output folder (created; reruns resume).")],
    recipe: RecipeOpt = None,
    score_only: Annotated[bool, typer.Option("--score-only", help="Score the bench's result_path images.")] = False,
    oracle: Annotated[bool, typer.Option("--oracle", help="Score the ground-truth targets (gt_target_path).")] = False,
    reconstruct: Annotated[bool, typer.Option("--reconstruct", help="Score the model VAE's reconstructions of the "
                                              "ground-truth targets (a generator's ceiling).")] = False,
    limit: Annotated[Optional[int], typer.Option("--limit", "-n", help="First N items of each subset.")] = None,
    subsets: Annotated[Optional[str], typer.Option("--subsets", help="Comma-separated subsets, e.g. Position,Three.")] = None,
    compare: Annotated[Optional[str], typer.Option("--compare", help="Another run's results.json: report the gap.")] = None,
    device: Annotated[Optional[str], typer.Option(help="Device of the model and the scoring components.")] = None,
    weights: WeightsOpt = None,
    set_: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Generate a PSRBench-format bench and score it (consistency, position, ToyWorld checks)."""
    from psr.workflows.eval import parse_subsets, run_eval

    overrides = list(set_ or [])
    if device is not None:
        overrides += [f"model.device={device!r}", f"device={device!r}"]
    if weights is not None:
        overrides.append(f"model.weights={json.dumps(weights)}")  # a TOML basic string
    loaded = load_recipe("eval", recipe, overrides)
    with _library_progress(not quiet):
        run_eval(loaded, bench, out, score_only=score_only, oracle=oracle, reconstruct=reconstruct, limit=limit,
                 subsets=parse_subsets(subsets), compare=compare, show_progress=not quiet)


@app.command()
def fit(
    recipe: Annotated[str, typer.Option("--recipe", "-r", help="Fit recipe (recipes/fit-toy-identity.toml, …).")],
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Weights folder (default: the shipped one).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimisation steps.")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu, auto, cuda, cuda:1 …")] = None,
    resume: Annotated[bool, typer.Option("--resume/--fresh", help="Continue from the checkpoint in --out, "
                                         "or start over.")] = True,
    set_: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Train one of psr's small models (ToyWorld perception, …) and write its weights + metrics.json."""
    from psr.fit.loop import format_metrics, run_fit

    overrides = list(set_ or [])
    flags = {"out": repr(out) if out is not None else None, "steps": steps,
             "device": repr(device) if device is not None else None}
    overrides += [f"{key}={value}" for key, value in flags.items() if value is not None]
    loaded = load_recipe("fit", recipe, overrides)
    with _library_progress(not quiet):
        print(format_metrics(run_fit(loaded, resume=resume, show_progress=not quiet)))


@app.command()
def pretrain(
    recipe: RecipeOpt = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Run folder (recipe key `out`).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in the run folder.")] = False,
    export: Annotated[Optional[str], typer.Option(
        "--export", help="Instead of training: export this checkpoint folder to --out.")] = None,
    merge: Annotated[bool, typer.Option("--merge", help="With --export: fold LoRA into the base weights.")] = False,
    no_ema: Annotated[bool, typer.Option("--no-ema", help="With --export: the raw weights, not the EMA.")] = False,
    dtype: Annotated[Optional[str], typer.Option(
        "--dtype", help="With --export: weight dtype of the model folder (float16 to ship it small).")] = None,
    set_: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Fine-tune the multi-reference core in context (full, LoRA, MoE-LoRA; attention regularizers)."""
    if dtype is not None and export is None:
        raise UserError("--dtype: applies to --export only (training precision is train.mixed_precision)")
    if export is not None:
        from psr.train.export import export_checkpoint

        if out is None:
            raise UserError("--export: give the model folder to write with --out")
        print(export_checkpoint(export, out, merge=merge, use_ema=not no_ema, dtype=dtype))
        return
    from psr.workflows.pretrain import run_pretrain

    overrides = list(set_ or []) + ([f"out={out!r}"] if out is not None else [])
    loaded = load_recipe("pretrain", recipe, overrides)
    with _library_progress(not quiet):
        summary = run_pretrain(loaded, resume=resume, show_progress=not quiet)
    if summary["main_process"]:
        print(summary["final"])


@app.command()
def rl(
    recipe: RecipeOpt = None,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Run folder (recipe key `out`).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the newest checkpoint in the run folder.")] = False,
    set_: SetOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
):
    """Tune with rewards: GRPO / GSPO over SDE rollouts, or FocusDPO on preference pairs."""
    from psr.workflows.rl import run_rl

    overrides = list(set_ or []) + ([f"out={out!r}"] if out is not None else [])
    loaded = load_recipe("rl", recipe, overrides)
    with _library_progress(not quiet):
        summary = run_rl(loaded, resume=resume, show_progress=not quiet)
    if summary["main_process"]:
        print(summary["final"])


@app.command()
def plan(
    recipe: Annotated[str, typer.Argument(help="A pretrain or rl recipe (TOML).")],
    processes: Annotated[int, typer.Option("--processes", "-p", help="Training processes (one per GPU).")] = 1,
    strategy: Annotated[str, typer.Option(help="ddp (every process holds everything) or fsdp (FULL_SHARD).")] = "ddp",
    size: Annotated[Optional[int], typer.Option(
        help="Target side in pixels (default: rollout.size for rl, the preset's size for pretrain).")] = None,
    references: Annotated[Optional[int], typer.Option(
        help="References per row (default: data.max_references).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    set_: SetOpt = None,
):
    """Memory per GPU of a pretrain or rl recipe at full size, without loading any weights."""
    from psr.train.plan import format_plan, memory_plan

    kind = read_toml(recipe).get("command")
    if kind not in ("pretrain", "rl"):
        raise UserError(f"{recipe}: command: psr plan reads pretrain and rl recipes, got {kind!r}")
    result = memory_plan(load_recipe(kind, recipe, set_ or []), processes=processes, strategy=strategy, size=size,
                         references=references, source_name=recipe)
    print(json.dumps(result.to_json(), indent=2) if as_json else format_plan(result))


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for bad input, with one line on stderr)."""
    try:
        # Outside standalone mode typer returns an Exit's code instead of raising it, and
        # turns Ctrl-C into Exit(130): the returned value is the exit status.
        status = app(args=argv, prog_name="psr", standalone_mode=False)
    except UserError as err:
        print(f"psr: error: {' '.join(str(err).split(chr(10)))}", file=sys.stderr)
        return 2
    except OSError as err:
        # The system refused a file operation (a read-only folder, a full disk, a permission):
        # one line naming the file and the reason. An OSError that names no file is a bug
        # and keeps its traceback.
        if err.filename is None or not err.strerror:
            raise
        print(f"psr: error: {err.filename}: {err.strerror}", file=sys.stderr)
        return 2
    except typer.Exit as exit_:
        return exit_.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("psr: interrupted", file=sys.stderr)
        return 130
    except typer.TyperException as err:  # usage errors: bad flag, missing argument, bad value
        message = err.format_message() if hasattr(err, "format_message") else str(err)
        if not message.strip():  # `psr` alone: the help is printed, with an empty usage error
            message = "no command given; choose one of the commands listed above"
        print(f"psr: error: {' '.join(message.split(chr(10)))}", file=sys.stderr)
        return 2
    if isinstance(status, int) and not isinstance(status, bool) and status:
        if status == 130:
            print("psr: interrupted", file=sys.stderr)
        return status
    return 0
