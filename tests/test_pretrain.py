"""psr pretrain: the objective's pieces, batches, exact resume, exports, failure handling."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from doubles import killed_after_first_checkpoint

from psr.cli import main
from psr.cli.recipes import load_recipe
from psr.errors import RecipeError, UserError
from psr.train import checkpoint as ckpt
from psr.train import objective as obj
from psr.train.data import epoch_batches, remap_correspondence, token_labels
from psr.train.optim import lr_factor

ROOT = Path(__file__).parent.parent
TOY = str(ROOT / "recipes" / "pretrain-toy.toml")
# Small and quick: a few steps of batch 2, no TensorBoard, no sample grids.
FAST = ["model.device=cpu", "train.batch_size=2", "train.steps=4", "train.warmup=0", "logging.every=1",
        "logging.tensorboard=false", "samples.every=0", "checkpoint.every=2", "data.num_workers=0",
        "data.cache=false", "regularizers=[]"]


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory, one_thread):
    from psr.workflows.synth import run_synth

    out = tmp_path_factory.mktemp("pretrain-data")
    recipe = load_recipe("synth", str(ROOT / "recipes" / "synth-toy.toml"), ["shard_size=24", "workers=1"])
    run_synth(recipe, str(out), 24, show_progress=False)
    return str(out)


def _recipe(data, out, *overrides):
    return load_recipe("pretrain", TOY, [*FAST, f"data.path={data!r}", f"out={str(out)!r}", *overrides])


def _train(data, out, *overrides, resume=False):
    from psr.workflows.pretrain import run_pretrain

    return run_pretrain(_recipe(data, out, *overrides), resume=resume, show_progress=False)


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


# ---------------------------------------------------------------------------- pieces
def test_token_labels_take_the_majority_subject():
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, :2, :2] = True           # token (0, 0) fully subject 0
    masks[1, 2:, 2:] = True           # token (1, 1) fully subject 1
    masks[1, 0, 2] = True             # token (0, 1): 1 of 4 pixels, not a majority
    masks[0, 2:, 0] = True            # token (1, 0): 2 of 4 pixels, half counts
    assert token_labels(masks, [1, 2], 2).tolist() == [1, 0, 1, 2]


def test_correspondence_remap_keeps_identity_and_samples_centres():
    pairs = [(0, 3), (5, 0)]
    same = remap_correspondence(pairs, (2, 2), (2, 3), (2, 2), (2, 3))
    assert same.tolist() == [3, -1, -1, -1, -1, 0]
    # 2x2 source grids onto 4x4: each source token covers 2x2 new ones, target moves likewise.
    up = remap_correspondence([(0, 3)], (2, 2), (2, 2), (4, 4), (4, 4)).reshape(4, 4)
    assert (up[:2, :2] == 15).all() and (up[2:] == -1).all() and (up[:, 2:] == -1).all()
    assert remap_correspondence([], None, None, (2, 2), (2, 2)).tolist() == [-1] * 4


def test_epoch_batches_are_a_function_of_seed_and_epoch():
    keys = [((64, 64), ((8, 8),) * (1 + i % 3)) for i in range(20)] + [((128, 128), ((8, 8),))] * 5
    a = epoch_batches(keys, 3, seed=1, epoch=0)
    assert a == epoch_batches(keys, 3, seed=1, epoch=0)
    assert a != epoch_batches(keys, 3, seed=1, epoch=1) and a != epoch_batches(keys, 3, seed=2, epoch=0)
    assert len(a) == 20 // 3 + 5 // 3 == len(epoch_batches(keys, 3, seed=1, epoch=7))
    flat = [i for b in a for i in b]
    assert len(flat) == len(set(flat)) and all(len(b) == 3 for b in a)
    assert all(len({keys[i][0] for i in b}) == 1 for b in a)          # one target size per batch
    layouts = sum(len({keys[i][1] for i in b}) == 1 for b in a)
    assert layouts >= 5                                                # same reference layout where possible


def test_resolution_shift_matches_the_sampler_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from psr.core.sampler import flux_schedule

    for settings in ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15},
                     {"use_dynamic_shifting": False, "shift": 3.0}):
        cfg = FlowMatchEulerDiscreteScheduler(**settings).config
        schedule = flux_schedule(cfg, 8, 1024)
        plain = torch.linspace(1.0, 1.0 / 8, 8)
        shifted = obj.shift_sigmas(plain.double(), cfg, 1024)
        assert torch.allclose(shifted.float(), schedule.sigmas[:-1], atol=1e-6)


def test_dropout_events_are_exclusive_with_the_given_rates():
    generator = torch.Generator().manual_seed(0)
    text, refs = obj.dropout_choices(generator, 20000, 0.1, 0.2, 0.3)
    text, refs = np.array(text), np.array(refs)
    assert abs((text & ~refs).mean() - 0.1) < 0.01
    assert abs((refs & ~text).mean() - 0.2) < 0.01
    assert abs((text & refs).mean() - 0.3) < 0.01
    assert obj.dropout_choices(torch.Generator().manual_seed(0), 5, 0, 0, 0) == ([False] * 5, [False] * 5)


@pytest.mark.parametrize("subject_weight, expected", [(1.0, 5.0), (3.0, 3.0), (0.5, 19 / 3)])
def test_subject_weight_is_a_weighted_mean_over_tokens(subject_weight, expected):
    # Two tokens of two channels: the subject token errs by 1 per channel (e = 1), the
    # background token by 3 (e = 9); the loss is (w·1 + 1·9) / (w + 1).
    pred = torch.zeros(1, 2, 2)
    target = torch.tensor([[[1.0, 1.0], [3.0, 3.0]]])
    weights = obj.subject_token_weights(torch.tensor([[1, 0]]), subject_weight)
    assert (weights is None) == (subject_weight == 1.0)
    assert obj.flow_matching_loss(pred, target, weights).item() == pytest.approx(expected)
    # Weights of one value are the plain mean, whatever the value.
    assert obj.flow_matching_loss(pred, target, torch.full((1, 2), 7.0)).item() == pytest.approx(5.0)


@pytest.mark.parametrize("step, schedule, expected", [
    (0, "constant", 0.25), (3, "constant", 1.0), (9, "constant", 1.0),
    (4, "cosine", 1.0), (7, "cosine", 0.5), (10, "cosine", 0.0),
])
def test_learning_rate_schedule(step, schedule, expected):
    cfg = load_recipe("pretrain", overrides=["train.warmup=4", "train.steps=10", f"train.schedule={schedule}"]).train
    assert lr_factor(step, cfg) == pytest.approx(expected)


@pytest.mark.parametrize("overrides, message", [
    (["adapter.reference_only=true"], "only LoRA can be reference-only"),
    (["adapter.kind=moe_lora", "adapter.experts=2", "adapter.top_k=3"], "adapter.top_k: must lie in [1, experts=2]"),
    (["adapter.kind=moe_lora", "adapter.targets=['to_q']"], "MoE-LoRA wraps feed-forwards"),
    (["model.preset=flux-dev", "model.path=/m", "train.mixed_precision=bf16"], "allow_large_full_finetune"),
    (["model.preset=flux-kontext", "model.path=/m", "adapter.kind=lora"], "set train.mixed_precision = \"bf16\""),
    (["model.device=cpu", "train.mixed_precision=fp16"], "fp16 autocast needs CUDA"),
    (["regularizers=[{name='idar'}, {name='idar'}]"], "'idar' is listed twice"),
    (["regularizers=[{name='idr'}]"], "did you mean 'idar'"),
    (["train.drop_text=0.5", "train.drop_refs=0.4", "train.drop_both=0.2"], "must be <= 1"),
    (["train.steps=0"], "train.steps: must be >= 1"),
    (["train.subject_weight=0"], "train.subject_weight: must be a finite number > 0"),
    (["data.max_references=9"], "must be <= model.max_references"),
])
def test_recipe_rejects_bad_values_with_a_hint(overrides, message):
    with pytest.raises(RecipeError, match=None) as err:
        load_recipe("pretrain", overrides=overrides)
    assert message in str(err.value)


def test_unfinished_checkpoint_folders_are_ignored_and_cleaned(tmp_path):
    good = tmp_path / "step_000002"
    good.mkdir()
    (good / "state.json").write_text("{}")
    (tmp_path / "step_000004").mkdir()                       # no state.json: never completed
    stale = tmp_path / ".tmp-step_000006"                    # killed while writing
    stale.mkdir()
    (stale / "trainable.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(tmp_path) == good
    assert ckpt.remove_stale(tmp_path) == 1 and not stale.exists()


# ---------------------------------------------------------------------------- training runs
def test_full_finetune_changes_every_weight_and_exports_a_model_folder(toy_data, tmp_path, one_thread):
    from psr.core.components import load_components
    from psr.core.tiny import build_tiny_components

    out = tmp_path / "run"
    summary = _train(toy_data, out, "train.ema_decay=0.5", "samples.every=4", "samples.count=2",
                     "samples.steps=2", "train.drop_refs=0.5")
    log = _log(out)
    assert [e["step"] for e in log] == [1, 2, 3, 4]
    assert all(math.isfinite(e[k]) for e in log for k in ("diffusion", "loss", "grad_norm", "lr"))
    assert summary["terms"]["diffusion"] == log[-1]["diffusion"]
    base = build_tiny_components(seed=0).transformer.state_dict()
    trained = _tensors(out / "checkpoints" / "step_000004" / "trainable.safetensors")
    assert trained.keys() == base.keys()
    unchanged = [k for k in base if torch.equal(base[k], trained[k])]
    assert not unchanged, f"weights that did not move: {unchanged[:3]}"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000002", "step_000004"]
    assert (out / "samples" / "step_000004.png").is_file()
    # The final folder is a complete FLUX folder holding the EMA weights.
    final = load_components(str(out / "final"), dtype="float32")
    ema = _tensors(out / "checkpoints" / "step_000004" / "ema.safetensors")
    state = final.transformer.state_dict()
    assert all(torch.equal(state[k], ema[k]) for k in ema)
    card = json.loads((out / "final" / "psr_model.json").read_text())
    assert card["trained"] and card["step"] == 4 and card["ema"]


def test_resume_continues_bit_identically(toy_data, tmp_path, monkeypatch, one_thread):
    from psr.workflows import pretrain

    settings = ["train.ema_decay=0.9", "train.schedule=cosine", "train.warmup=1", "train.grad_accum=2",
                "train.drop_refs=0.3", "train.drop_text=0.2", "regularizers=[{name='idar', weight=0.5}]",
                # LoRA dropout draws from the global generator: its state must come back too.
                "adapter.kind=lora", "adapter.rank=4", "adapter.dropout=0.2", "train.lr=1e-2"]
    _train(toy_data, tmp_path / "straight", *settings)

    with killed_after_first_checkpoint(monkeypatch, pretrain), pytest.raises(KeyboardInterrupt):
        _train(toy_data, tmp_path / "resumed", *settings)
    checkpoints = tmp_path / "resumed" / "checkpoints"
    (checkpoints / ".tmp-step_000004").mkdir()              # a kill while writing the next one
    _train(toy_data, tmp_path / "resumed", *settings, resume=True)
    assert not (checkpoints / ".tmp-step_000004").exists()

    a = ckpt.load_checkpoint(tmp_path / "straight" / "checkpoints" / "step_000004")
    b = ckpt.load_checkpoint(checkpoints / "step_000004")
    for key in ("trainable", "ema"):
        assert a[key].keys() == b[key].keys()
        assert all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    moments = [(s["exp_avg"], t["exp_avg"]) for s, t in zip(a["optimizer"]["state"].values(),
                                                             b["optimizer"]["state"].values())]
    assert all(torch.equal(x, y) for x, y in moments)

    def terms(out):
        return [{k: v for k, v in e.items() if k != "samples_per_s"} for e in _log(out)]
    assert terms(tmp_path / "straight") == terms(tmp_path / "resumed")


def test_lora_file_loads_in_diffusers_and_merge_matches_it(toy_data, tmp_path, one_thread):
    from diffusers import FluxPipeline

    from psr.core.components import load_components
    from psr.core.tiny import build_tiny_components

    out = tmp_path / "run"
    _train(toy_data, out, "adapter.kind=lora", "adapter.rank=4", "train.steps=2", "train.lr=5e-2")
    lora = out / "final" / "pytorch_lora_weights.safetensors"
    pipe = FluxPipeline(**build_tiny_components(seed=0).as_dict())
    pipe.load_lora_weights(str(lora))
    saved = _tensors(lora)
    assert saved and all(k.startswith("transformer.") for k in saved)
    assert main(["pretrain", "--export", str(out / "checkpoints" / "step_000002"), "--merge",
                 "--out", str(tmp_path / "merged")]) == 0
    merged = load_components(str(tmp_path / "merged"), dtype="float32").transformer
    torch.manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 64, 16), encoder_hidden_states=torch.randn(1, 8, 32),
                  pooled_projections=torch.randn(1, 32), timestep=torch.tensor([0.5]),
                  guidance=torch.tensor([1.0]), img_ids=torch.zeros(64, 3), txt_ids=torch.zeros(8, 3),
                  return_dict=False)
    with torch.no_grad():
        expected = pipe.transformer(**inputs)[0]
        got = merged(**inputs)[0]
        plain = build_tiny_components(seed=0).transformer(**inputs)[0]
    # The trained LoRA moves the output ~100x more than merging differs from loading it.
    assert (got - expected).abs().max() < 1e-6 and (got - plain).abs().max() > 2e-5
    # A float16 export halves the folder; a LoRA file has no model folder to cast.
    checkpoint = str(out / "checkpoints" / "step_000002")
    assert main(["pretrain", "--export", checkpoint, "--merge", "--dtype", "float16", "--out", str(tmp_path / "half")]) == 0
    half = _tensors(next((tmp_path / "half" / "transformer").glob("*.safetensors")))
    assert {t.dtype for t in half.values()} == {torch.float16}
    assert json.loads((tmp_path / "half" / "psr_model.json").read_text())["dtype"] == "float16"
    assert main(["pretrain", "--export", checkpoint, "--dtype", "float16", "--out", str(tmp_path / "no")]) == 2
    assert not (tmp_path / "no").exists()


def test_regularizers_are_logged_and_finite(toy_data, tmp_path, one_thread):
    regs = ("regularizers=[{name='idar', weight=0.5}, {name='mosaic_align', weight=0.1}, "
            "{name='mosaic_sep', weight=1.0, warmup_start=0, warmup_end=1}]")
    out = tmp_path / "run"
    _train(toy_data, out, regs, "train.steps=2", "train.gradient_checkpointing=true", "adapter.kind=lora",
           "adapter.rank=4", "adapter.reference_only=true")
    first, second = _log(out)
    assert {"idar", "mosaic_align"} <= first.keys() and "mosaic_sep" not in first   # weight 0 at step 1
    assert {"idar", "mosaic_align", "mosaic_sep"} <= second.keys()
    assert all(math.isfinite(e[k]) for e in (first, second) for k in e)
    assert first["idar"] > 0 and first["mosaic_align"] > 0 and -math.log(2) <= second["mosaic_sep"] <= 1e-6
    assert first["loss"] == pytest.approx(first["diffusion"] + 0.5 * first["idar"] + 0.1 * first["mosaic_align"],
                                          rel=1e-5)


def test_nan_loss_stops_with_one_line_and_keeps_the_last_checkpoint(toy_data, tmp_path, monkeypatch, capsys,
                                                                    one_thread):
    calls = {"n": 0}
    real = obj.flow_matching_loss

    def poisoned(pred, target, weights=None):
        calls["n"] += 1
        loss = real(pred, target, weights)
        return loss * float("nan") if calls["n"] >= 3 else loss  # one group per step: step 3
    monkeypatch.setattr(obj, "flow_matching_loss", poisoned)
    out = tmp_path / "run"
    argv = ["pretrain", "--recipe", TOY, "--out", str(out), "-q", "--set", f"data.path={toy_data!r}",
            *[a for o in FAST for a in ("--set", o)], "--set", "train.drop_refs=0", "--set", "train.drop_both=0"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "step 3: loss term 'diffusion' is nan" in err and "step_000002" in err
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000002"]
    monkeypatch.setattr(obj, "flow_matching_loss", real)
    # The suggested way to change the recipe: a new run from the checkpoint's (EMA) weights.
    suggested = err.split("--set ")[-1].rstrip(")")
    assert suggested == f"model.weights={str(out / 'checkpoints' / 'step_000002')!r}"
    fresh = tmp_path / "fresh"
    restart = [*argv[:4], str(fresh), *argv[5:], "--set", suggested, "--set", "train.lr=1e-12",
               "--set", "train.steps=2"]
    assert main(restart) == 0
    kept = ckpt.load_tensors(out / "checkpoints" / "step_000002" / "ema.safetensors")
    started = ckpt.load_tensors(fresh / "checkpoints" / "step_000002" / "trainable.safetensors")
    assert kept.keys() == started.keys()
    assert max((kept[k] - started[k]).abs().max().item() for k in kept) < 1e-6   # lr 1e-12: it stayed put
    card = json.loads((fresh / "final" / "psr_model.json").read_text())
    assert card["started_from"] == str(out / "checkpoints" / "step_000002") and card["step"] == 2
    assert main([*argv, "--resume"]) == 0                      # the kept checkpoint resumes
    assert ckpt.read_state(out / "checkpoints" / "step_000004")["step"] == 4


def test_bad_input_is_one_line_and_exit_2(toy_data, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    base = ["pretrain", "--recipe", TOY, "-q", *[a for o in FAST for a in ("--set", o)]]
    cases = {
        "missing dataset": (["--set", f"data.path='{tmp_path / 'nope'}'", "--out", str(tmp_path / "a")],
                            "no such folder"),
        "empty dataset": (["--set", f"data.path='{empty}'", "--out", str(tmp_path / "b")], "no usable rows"),
        "export without --out": (["--export", str(tmp_path)], "--export: give the model folder"),
        "export of a non-checkpoint": (["--export", str(tmp_path), "--out", str(tmp_path / "c")],
                                       "not a checkpoint folder"),
        "dtype without --export": (["--dtype", "float16", "--out", str(tmp_path / "d")], "--dtype: applies to --export"),
        "unknown export dtype": (["--export", str(tmp_path), "--out", str(tmp_path / "e"), "--dtype", "fp8"],
                                 "--dtype 'fp8': choose one of float32, float16, bfloat16"),
    }
    for name, (args, message) in cases.items():
        assert main([*base, *args]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (name, err)


def test_existing_run_needs_resume_and_the_same_recipe(toy_data, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    _train(toy_data, out, "train.steps=2")
    with pytest.raises(UserError, match="pass --resume"):
        _train(toy_data, out, "train.steps=2")
    with pytest.raises(UserError, match=r"train\.lr \(0\.0003 in the checkpoint, 0\.001 now\)"):
        _train(toy_data, out, "train.steps=4", "train.lr=1e-3", resume=True)


def test_resume_refuses_new_steps_for_a_decaying_schedule(toy_data, tmp_path, one_thread):
    """train.steps is not hashed, so a constant-rate run can be carried on; under a cosine
    schedule the total decides every step's rate, so resuming with another total is refused."""
    out = tmp_path / "run"
    _train(toy_data, out, "train.steps=2", 'train.schedule="cosine"')
    with pytest.raises(UserError, match=r"decays its learning rate \(cosine\) over 2 steps; train\.steps 3"):
        _train(toy_data, out, "train.steps=3", 'train.schedule="cosine"', resume=True)
    constant = tmp_path / "constant"
    _train(toy_data, constant, "train.steps=2", 'train.schedule="constant"')
    _train(toy_data, constant, "train.steps=3", 'train.schedule="constant"', resume=True)
    assert [r["step"] for r in _log(constant) if "loss" in r][-1] == 3


@pytest.mark.parametrize("schedule, steps, refused", [
    ("cosine", 40, False), ("cosine", 60, True), ("constant", 60, False)])
def test_planned_steps_bind_a_decaying_schedule_only(tmp_path, schedule, steps, refused):
    """The check `psr pretrain` and `psr rl` both make on --resume."""
    (tmp_path / "recipe.toml").write_text(f'command = "rl"\n[train]\nsteps = 40\nschedule = "{schedule}"\n')
    if refused:
        with pytest.raises(UserError, match="over 40 steps; train.steps 60 .* train.steps=40"):
            ckpt.check_planned_steps(tmp_path, schedule, steps)
    else:
        ckpt.check_planned_steps(tmp_path, schedule, steps)
    ckpt.check_planned_steps(None, schedule, steps)  # nothing to resume: nothing to check


def test_model_card_keeps_the_base_architecture_facts(tmp_path):
    from psr.train.export import _model_card

    (tmp_path / "psr_model.json").write_text(json.dumps(
        {"architecture": "embedded", "sizes": {"num_layers": 6}, "parameters": {"vae": 1}, "trained": False,
         "note": "base: untrained"}))
    card = _model_card(40, "abc", True, "none", str(tmp_path))
    assert card == {"trained": True, "note": "psr pretrain (full fine-tune), step 40", "step": 40,
                    "recipe_hash": "abc", "ema": True, "architecture": "embedded",
                    "sizes": {"num_layers": 6}, "parameters": {"vae": 1}}
    assert _model_card(1, "", False, "lora", None)["note"] == "psr pretrain (LoRA), step 1"
    assert "architecture" not in _model_card(1, "", False, "none", str(tmp_path / "missing"))
    # A run trained with the layout scheme says so, and keeps the base's table of boxes.
    table = {"1": [[0.5, 0.5, 0.6]]}
    (tmp_path / "psr_model.json").write_text(json.dumps({"architecture": "embedded", "reference_layout": table}))
    card = _model_card(2, "", True, "none", str(tmp_path), position_scheme="layout")
    assert card["position_scheme"] == "layout" and card["reference_layout"] == table


def test_weights_kind_reads_what_a_source_is_from_its_file_names(tmp_path):
    from psr.core.adapters import LORA_FILE, MOE_FILE
    from psr.core.weights import weights_kind

    def folder(name, *files):
        path = tmp_path / name
        for f in files:
            (path / f).parent.mkdir(parents=True, exist_ok=True)
            (path / f).write_bytes(b"")
        return str(path)

    assert weights_kind(folder("a", "x.safetensors") + "/x.safetensors") == "lora file"
    assert weights_kind(folder("b", LORA_FILE, "psr_lora.json")) == "lora file"
    assert weights_kind(folder("c", "state.json", "trainable.safetensors")) == "checkpoint"
    assert weights_kind(folder("d", "transformer/diffusion_pytorch_model.safetensors")) == "full weights"
    assert weights_kind(folder("e", MOE_FILE, "psr_lora.json")) == "moe file"
    assert weights_kind(folder("e") + f"/{MOE_FILE}") == "moe file"
    for source, message in [(folder("f", "notes.txt"), r"not a checkpoint \(state\.json\)"),
                             (str(tmp_path / "none"), "no such file or folder")]:
        with pytest.raises(UserError, match=message) as err:
            weights_kind(source, key="init")
        assert str(err.value).startswith(f"init {source}: ")


def test_recipe_hashes_of_the_default_recipes_are_pinned():
    # A checkpoint stores this hash and `--resume` compares it: a change to the schema that
    # moves it (a new key counted at its default) would strand every run already written.
    from psr.rl.config import OPERATIONAL as RL_OPERATIONAL
    from psr.train.config import training_hash

    assert training_hash(load_recipe("pretrain", None, [])) == "79718b6117abcc3b"
    # A model whose card names no scheme runs `frame`, given or left out.
    frame = ["model.position_scheme='frame'"]
    assert training_hash(load_recipe("pretrain", None, ["model.preset='tiny'", *frame])) == "79718b6117abcc3b"
    # The default rl objective is gspo, whose default clip bounds were rescaled on purpose
    # (docs/rl.md): with the former bounds given, the hash is the one earlier runs carry.
    assert training_hash(load_recipe("rl", None, []), RL_OPERATIONAL) == "0289f81536bcdfad"
    former = ["policy.clip_low=3e-4", "policy.clip_high=4e-4"]
    assert training_hash(load_recipe("rl", None, former), RL_OPERATIONAL) == "ae62ef1a92f58def"
    # A key set away from its default does count.
    assert training_hash(load_recipe("pretrain", None, ['model.weights="runs/x/final"'])) != "79718b6117abcc3b"
    assert training_hash(load_recipe("pretrain", None, ["train.subject_weight=2.0"])) != "79718b6117abcc3b"
    # `model.reference_resize` at the tiny preset's rule, given or left out, is the run as before.
    tiny = ["model.preset='tiny'"]
    assert training_hash(load_recipe("pretrain", None, tiny + ["model.reference_resize='longest'"])) == "79718b6117abcc3b"
    assert training_hash(load_recipe("pretrain", None, tiny + ["model.reference_resize='kontext'"])) != "79718b6117abcc3b"


def test_eval_stamp_keeps_runs_made_before_reference_resize():
    # Pinned hashes were computed before `model.reference_resize` existed: every preset whose
    # rule stays "longest" keeps them, flux-kontext's new default rule moves its generate stamp.
    from psr.eval.config import resolve_eval
    from psr.workflows.eval import _generator_hash

    def stamp(mode, *overrides):
        return _generator_hash(resolve_eval(load_recipe("eval", None, list(overrides))), mode)

    tiny = ("model.preset='tiny'",)
    assert stamp("generate", *tiny) == stamp("generate", *tiny, "model.reference_resize='longest'") == "2f45e17396bfad24"
    assert stamp("reconstruct", *tiny) == "5b8593e62023c833"
    assert stamp("generate", *tiny, "model.reference_resize='kontext'") != "2f45e17396bfad24"
    kontext = ("model.preset='flux-kontext'", "model.path='/x'")
    assert stamp("generate", *kontext, "model.reference_resize='longest'") == "ad9b8ae028234ab7"
    assert stamp("generate", *kontext) == stamp("generate", *kontext, "model.reference_resize='kontext'") \
        != "ad9b8ae028234ab7"
    assert stamp("reconstruct", *kontext) == "bee431be415ab470"  # the rule never touches a reconstruction


def test_one_step_in_cached_reference_mode(toy_data, tmp_path, monkeypatch, one_thread):
    from psr.core import refstream
    from psr.core.model import MultiRefFlux
    from psr.core.schema import ModelConfig, resolve_model
    from psr.core.weights import trained_reference_mode

    streams = []
    real = refstream.reference_kv

    def spy(*args, **kwargs):
        kv = real(*args, **kwargs)
        streams.append(all(k.requires_grad for k, _ in kv.blocks.values()))
        return kv

    monkeypatch.setattr(refstream, "reference_kv", spy)
    out = tmp_path / "run"
    _train(toy_data, out, "model.reference_mode='cached'", "train.steps=1", "train.drop_refs=0",
           "train.drop_both=0", "checkpoint.every=1")
    (entry,) = _log(out)
    assert math.isfinite(entry["diffusion"]) and math.isfinite(entry["grad_norm"])
    assert streams and all(streams)  # the references' stream ran in the training forward, with grad
    # The mode travels with the weights: the card says it, and running them otherwise is noted.
    assert json.loads((out / "final" / "psr_model.json").read_text())["reference_mode"] == "cached"
    assert trained_reference_mode(str(out / "final")) == trained_reference_mode(
        str(out / "checkpoints" / "step_000001")) == "cached"
    joint = MultiRefFlux.from_config(resolve_model(ModelConfig(preset="tiny", device="cpu",
                                                               weights=str(out / "final"))))
    assert joint.notes == [f"{out / 'final'} was trained with model.reference_mode = 'cached', this run uses "
                           "'joint'; set model.reference_mode = 'cached' to run it as trained"]


def test_a_torn_log_line_is_dropped_on_resume(tmp_path):
    # A full disk or a kill mid-write leaves half a JSON line; resuming keeps the complete
    # lines up to the checkpoint's step and says what it dropped.
    from psr.train.logs import TrainLog

    (tmp_path / "log.jsonl").write_bytes(b'{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n'
                                         b'{"step": 3, "loss": 0.3}\n{"step": 4, "lo\xff')
    said = []
    log = TrainLog(tmp_path, tensorboard=False, resume_step=2, total_steps=5, echo=said.append)
    log.write(3, {"loss": 0.25})
    log.close()
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]
    assert json.loads(lines[-1])["loss"] == 0.25
    assert said[0] == "psr: log.jsonl: dropped 1 damaged line(s); the checkpoint holds the state"


def _fake_checkpoint(root, step, digest="h"):
    from safetensors.torch import save_file

    folder = root / "checkpoints" / f"step_{step:06d}"
    folder.mkdir(parents=True)
    save_file({"w": torch.full((4,), float(step))}, str(folder / "trainable.safetensors"))
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"state": {}}, folder / "optimizer.pt")
    (folder / "state.json").write_text(json.dumps({"step": step, "recipe_hash": digest}))
    return folder


@pytest.mark.parametrize("damage", ["truncated weights", "garbage state", "truncated optimizer"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, capsys, damage):
    from psr.train.checkpoint import resumable_checkpoint

    _fake_checkpoint(tmp_path, 100)
    newest = _fake_checkpoint(tmp_path, 200)
    if damage == "truncated weights":
        data = (newest / "trainable.safetensors").read_bytes()
        (newest / "trainable.safetensors").write_bytes(data[:20])
    elif damage == "garbage state":
        (newest / "state.json").write_text("{not json")
    else:
        data = (newest / "optimizer.pt").read_bytes()
        (newest / "optimizer.pt").write_bytes(data[: len(data) // 2])
    latest, state = resumable_checkpoint(tmp_path, "h", True, lambda c: "")
    assert latest.name == "step_000100" and state["step"] == 100
    assert "checkpoint step_000200 is damaged" in capsys.readouterr().err
    # An intact newest checkpoint is taken as before.
    intact = _fake_checkpoint(tmp_path, 300)
    assert resumable_checkpoint(tmp_path, "h", True, lambda c: "")[0] == intact


def test_rows_whose_prompts_place_references_apart_share_no_forward():
    from psr.train.data import Batch

    grids = ((4, 4), (4, 4))
    batch = Batch(indices=list(range(5)), prompts=["a left of b", "a above b", "a left of b", "a and b", "x"],
                  target=torch.zeros(5, 3, 8, 8), labels=torch.zeros(5, 1, dtype=torch.long),
                  references=[[]] * 5, ref_grids=[grids] * 4 + [((4, 4),)], correspondence=[[]] * 5)
    keep = [True, True, True, True, False]
    assert batch.groups(keep) == [[0, 1, 2, 3], [4]]  # one forward per reference grid layout

    def relation(prompt, count):
        return next((r for r in ("left of", "above") if r in prompt), "none") + f"/{count}"

    assert batch.groups(keep, relation) == [[0, 2], [1], [3], [4]]
    assert batch.groups([False] * 5, relation) == [[0, 1, 2, 3, 4]]  # no references: no ids to differ


def test_layout_scheme_trains_with_each_rows_boxes(toy_data, tmp_path, monkeypatch, one_thread):
    import psr.core.model as model_module
    from psr.core.positions import ReferenceLayout
    from psr.train import objective

    table = {str(n): [[0.2 + 0.2 * i, 0.5, 0.5] for i in range(n)] for n in (1, 3, 4)}
    table.update({"2": [[0.3, 0.5, 0.5], [0.7, 0.5, 0.5]], "2:above": [[0.5, 0.3, 0.5], [0.5, 0.7, 0.5]]})
    layout = ReferenceLayout.from_dict(table, "test")
    monkeypatch.setattr(model_module, "card_reference_layout", lambda config: layout)
    seen = []
    build = objective.group_input

    def spy(model, encoders, batch, rows, with_refs, *args):
        group = build(model, encoders, batch, rows, with_refs, *args)
        if group.ref_grids:
            keys = {layout.key(batch.prompts[b], len(group.ref_grids)) for b in rows}
            assert len(keys) == 1, keys  # one forward shares one set of boxes
            length = group.target_grid[0] * group.target_grid[1]
            expected = model.reference_positions(group.target_grid, group.ref_grids, batch.prompts[rows[0]])
            assert torch.equal(group.ids[length:].cpu(), expected)
            seen.append(keys.pop())
        return group

    monkeypatch.setattr(objective, "group_input", spy)
    _train(toy_data, tmp_path / "run", "model.position_scheme='layout'", "train.drop_refs=0.0",
           "train.drop_both=0.0")
    assert seen and all(k in table for k in seen)
    recipe = (tmp_path / "run" / "recipe.toml").read_text()
    assert 'position_scheme = "layout"' in recipe
