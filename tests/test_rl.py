"""psr rl: GRPO / GSPO / FocusDPO runs on the tiny preset, exact resume, init, the CLI, bad input."""

import copy
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from doubles import killed_after_first_checkpoint, psr_reward_on_doubles

from psr.cli import main
from psr.cli.recipes import load_recipe
from psr.errors import RecipeError
from psr.train import checkpoint as ckpt

ROOT = Path(__file__).parent.parent
RECIPES = ROOT / "recipes"
# Two groups of two images, two denoising steps (both trained), a rank-4 LoRA, no TensorBoard.
FAST = ["model.preset=tiny", "model.device=cpu", "rollout.group_size=2", "rollout.groups_per_step=2", "rollout.steps=2",
        "rollout.train_fraction=1.0", "train.steps=2", "train.lr=1e-2", "logging.every=1",
        "logging.tensorboard=false", "eval.every=0", "checkpoint.every=1", "adapter.rank=4"]
TIMING = ("rollout_images_per_s", "update_steps_per_s", "reward_time_share", "pairs_per_s")


@pytest.fixture(scope="module")
def reward():
    return psr_reward_on_doubles()


@pytest.fixture(scope="module")
def data(tmp_path_factory, one_thread):
    """A ToyWorld dataset, a bench of training identities and a held-out bench."""
    from psr.workflows.synth import run_synth

    root = tmp_path_factory.mktemp("rl-data")
    run_synth(load_recipe("synth", str(RECIPES / "synth-toy.toml"), ["shard_size=8", "workers=1"]),
              str(root / "toy"), 8, show_progress=False)
    bench = ["bench.samples_per_subset=1", "bench.subsets=['Position', 'Three']"]
    run_synth(load_recipe("synth", str(RECIPES / "bench-toy.toml"), [*bench, "toyworld.id_split='train'", "seed=2000"]),
              str(root / "train-bench"), show_progress=False)
    run_synth(load_recipe("synth", str(RECIPES / "bench-toy.toml"), bench), str(root / "eval-bench"),
              show_progress=False)
    return {k: str(root / k) for k in ("toy", "train-bench", "eval-bench")}


def _run(name, out, *overrides, reward=None, resume=False):
    from psr.workflows.rl import run_rl

    recipe = load_recipe("rl", str(RECIPES / name), [*FAST, f"out={str(out)!r}", *overrides])
    return run_rl(recipe, resume=resume, show_progress=False, rewards=reward)


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _terms(out):
    return [{k: v for k, v in e.items() if k not in TIMING} for e in _log(out)]


def _inputs():
    """Keyword arguments of one forward of the tiny transformer (64 image and 8 text tokens)."""
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, 64, 16, generator=g), "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([0.5]),
            "guidance": torch.tensor([1.0]), "img_ids": torch.zeros(64, 3), "txt_ids": torch.zeros(8, 3),
            "return_dict": False}


GSPO = ("gspo-toy.toml", "adapter.dropout=0.1", "train.ema_decay=0.5", "policy.inner_epochs=2")


@pytest.fixture(scope="module")
def gspo_run(data, reward, tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("gspo") / "run"
    summary = _run(GSPO[0], out, f"data.path={data['toy']!r}", *GSPO[1:], reward=reward)
    return out, summary


# ---------------------------------------------------------------------------- pieces
def test_prompt_order_is_a_function_of_seed_and_step_and_covers_every_item():
    from psr.rl.sources import draw_indices

    a = [draw_indices(10, 3, step, rank, 2, 5) for step in range(2) for rank in range(2)]  # two epochs of 10
    assert sorted(i for part in a[:2] for i in part) == list(range(10)) == sorted(i for part in a[2:] for i in part)
    assert a[:2] != a[2:]                                                 # each epoch its own order
    assert draw_indices(10, 3, 1, 1, 2, 5) == a[3] and draw_indices(10, 4, 1, 1, 2, 5) != a[3]


def test_trained_steps_are_explicit_or_a_fraction_drawn_per_step():
    from psr.rl.grpo import trained_steps

    cfg = load_recipe("rl", overrides=["rollout.steps=10", "rollout.train_fraction=0.6"]).rollout
    drawn = [trained_steps(cfg, 0, s) for s in range(4)]
    assert all(len(d) == 6 and d == sorted(set(d)) and 0 <= d[0] and d[-1] < 10 for d in drawn)
    assert drawn[0] == trained_steps(cfg, 0, 0) and len({tuple(d) for d in drawn}) > 1
    explicit = load_recipe("rl", overrides=["rollout.steps=10", "rollout.train_steps=[7, 0]"]).rollout
    assert trained_steps(explicit, 0, 5) == [0, 7]


def test_adapters_disabled_gives_the_base_network_and_restores_the_adapter(tiny_components):
    from psr.core.lora import add_lora
    from psr.rl.policy import adapters_disabled

    base = copy.deepcopy(tiny_components.transformer)
    tuned = copy.deepcopy(tiny_components.transformer)
    add_lora(tuned, rank=4)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    inputs = _inputs()
    trainable = [n for n, p in tuned.named_parameters() if p.requires_grad]
    with torch.no_grad():
        adapted = tuned(**inputs)[0]
        with adapters_disabled(tuned):
            off = tuned(**inputs)[0]
        again = tuned(**inputs)[0]
        plain = base(**inputs)[0]
    assert torch.equal(off, plain) and torch.equal(again, adapted) and (adapted - plain).abs().max() > 1e-3
    assert [n for n, p in tuned.named_parameters() if p.requires_grad] == trainable


@pytest.mark.parametrize("overrides, message", [
    (["rollout.group_size=1"], "needs at least 2 per prompt to compute the advantages; you gave 1"),
    (["rollout.train_steps=[10]"], "rollout.train_steps: 10 is not a step index in [0, steps=10)"),
    (["rollout.noise_level=0"], "has no log-probability"),
    (["objective='focusdpo'", "adapter.kind='none'"], "need an adapter: set adapter.kind = \"lora\""),
    (["policy.kl_beta=0.1", "adapter.kind='none'"], "need an adapter"),
    (["model.preset='flux-kontext'", "model.path='/m'"], "set train.mixed_precision = \"bf16\""),
    (["rewards=[]"], "grpo/gspo score rollouts with the reward mix"),
    (["objective='focusdpo'", "dpo.pairs='self-ranked'", "rewards=[]"], "self-ranked pairs are ranked"),
    (["rewards=[{name='psr'}, {name='psr'}]"], "give each reward listed twice its own label"),
    (["eval.every=5"], "eval.bench: evaluation needs a bench folder"),
])
def test_recipe_rejects_bad_values_with_a_hint(overrides, message):
    base = ["rewards=[{name='psr'}]"]
    with pytest.raises(RecipeError) as err:
        load_recipe("rl", overrides=[*base, *overrides])
    assert message in str(err.value)


def test_a_held_out_metric_that_is_a_training_reward_is_refused():
    with pytest.raises(RecipeError, match=r"eval.metrics\[0\].*not held out"):
        load_recipe("rl", str(RECIPES / "grpo-toy.toml"),
                    ["eval.metrics=[{name='psr', extractor={name='toyworld'}, localizer={name='toyworld'}}]"])


def test_every_rl_recipe_validates():
    for name in ("gspo", "grpo", "focusdpo", "gspo-toy", "grpo-toy", "focusdpo-toy"):
        path = RECIPES / f"{name}.toml"
        assert path.read_text().startswith(f"# psr rl --recipe recipes/{name}.toml")
        assert main(["validate", str(path)]) == 0


# ---------------------------------------------------------------------------- runs
def test_gspo_run_is_finite_and_moves_every_lora_weight(gspo_run):
    out, summary = gspo_run
    log = _log(out)
    assert summary["step"] == 2 and {"step": 2, **summary["terms"]} == log[-1]
    assert [e["step"] for e in log] == [1, 2]
    for key in ("loss", "policy_loss", "clip_fraction", "grad_norm", "reward", "reward/psr", "group_reward_std",
                "rollout_images_per_s", "update_steps_per_s", "reward_time_share"):
        assert all(math.isfinite(e[key]) for e in log), key
    assert 0 < log[0]["reward_time_share"] < 1 and log[0]["group_reward_std"] > 0
    first = ckpt.load_checkpoint(out / "checkpoints" / "step_000001")["trainable"]
    second = ckpt.load_checkpoint(out / "checkpoints" / "step_000002")["trainable"]
    assert first and all("lora" in k for k in first)
    assert all(first[k].abs().max() > 0 for k in first if "lora_B" in k)       # B starts at 0
    assert [k for k in first if torch.equal(first[k], second[k])] == []        # then everything moves
    assert (out / "final" / "pytorch_lora_weights.safetensors").is_file()
    card = json.loads((out / "final" / "psr_lora.json").read_text())
    assert card["objective"] == "gspo" and card["step"] == 2 and card["ema"]


def test_resume_continues_bit_identically(gspo_run, data, reward, tmp_path, monkeypatch):
    from psr.workflows import rl

    args = (GSPO[0], tmp_path / "run", f"data.path={data['toy']!r}", *GSPO[1:])
    with killed_after_first_checkpoint(monkeypatch, rl), pytest.raises(KeyboardInterrupt):
        _run(*args, reward=reward)
    _run(*args, reward=reward, resume=True)
    a = ckpt.load_checkpoint(gspo_run[0] / "checkpoints" / "step_000002")
    b = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "step_000002")
    for key in ("trainable", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(s["exp_avg"], t["exp_avg"]) and torch.equal(s["exp_avg_sq"], t["exp_avg_sq"])
    assert _terms(gspo_run[0]) == _terms(tmp_path / "run")


def test_resume_with_mini_batches_continues_bit_identically(data, reward, tmp_path, monkeypatch, one_thread):
    # Shuffled mini-batches, micro-batches and GSPO's two passes (dropout draws in both).
    from psr.workflows import rl

    args = (GSPO[0], f"data.path={data['toy']!r}", *GSPO[1:], "policy.mini_batches=2", "train.micro_batch=1")
    _run(args[0], tmp_path / "straight", *args[1:], reward=reward)
    with killed_after_first_checkpoint(monkeypatch, rl), pytest.raises(KeyboardInterrupt):
        _run(args[0], tmp_path / "run", *args[1:], reward=reward)
    _run(args[0], tmp_path / "run", *args[1:], reward=reward, resume=True)
    a = ckpt.load_checkpoint(tmp_path / "straight" / "checkpoints" / "step_000002")
    b = ckpt.load_checkpoint(tmp_path / "run" / "checkpoints" / "step_000002")
    for key in ("trainable", "ema"):
        assert a[key].keys() == b[key].keys() and all(torch.equal(a[key][k], b[key][k]) for k in a[key]), key
    for s, t in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(s["exp_avg"], t["exp_avg"]) and torch.equal(s["exp_avg_sq"], t["exp_avg_sq"])
        assert int(s["step"]) == int(t["step"]) == 8  # 2 steps · 2 epochs · 2 mini-batches
    assert _terms(tmp_path / "straight") == _terms(tmp_path / "run")
    assert [e["optimizer_steps"] for e in _log(tmp_path / "run")] == [4.0, 4.0]


def test_off_policy_mini_batches_tell_gspo_from_grpo(data, reward, tmp_path, one_thread):
    # One rollout batch, no dropout. With one mini-batch the only optimizer step is on-policy:
    # every ratio is 1 and GSPO's gradient is GRPO's. From a second mini-batch on the policy
    # has moved: GRPO weighs each step by its own ratio and clip, GSPO by the trajectory's.
    def final(objective, parts, *extra):
        out = tmp_path / f"{objective}-{parts}-{len(extra)}"
        _run("gspo-toy.toml", out, f"data.path={data['toy']!r}", f"objective={objective!r}", "train.steps=1",
             f"policy.mini_batches={parts}", *extra, reward=reward)
        weights = ckpt.load_checkpoint(out / "checkpoints" / "step_000001")["trainable"]
        return torch.cat([weights[k].flatten() for k in sorted(weights)]), _log(out)[-1]

    start = torch.cat([v.flatten() for _, v in sorted(_initial_lora(data, reward, tmp_path).items())])
    (gspo, gspo_log), (grpo, grpo_log) = final("gspo", 1), final("grpo", 1)
    assert gspo_log["optimizer_steps"] == grpo_log["optimizer_steps"] == 1
    assert gspo_log["clip_fraction"] == grpo_log["clip_fraction"] == 0 and gspo_log["ratio_mean"] == 1
    assert gspo_log["grad_norm"] == pytest.approx(grpo_log["grad_norm"], rel=1e-5)
    torch.testing.assert_close(gspo - start, grpo - start, rtol=1e-5, atol=1e-9)
    (gspo, gspo_log), (grpo, grpo_log) = final("gspo", 4), final("grpo", 4)
    assert gspo_log["optimizer_steps"] == grpo_log["optimizer_steps"] == 4
    delta = (grpo - start).abs().max()
    assert (gspo - grpo).abs().max() > 0.05 * delta > 0
    assert gspo_log["ratio_mean"] != 1 and grpo_log["ratio_mean"] != 1

    # Built to cross the bound: a large step and a clip range of 1e-5 (a hundred times the
    # rounding of an on-policy ratio). The first of the 4 optimizer steps is on-policy and
    # clips nothing; after it every ratio is far outside: 3/4 on average.
    for objective in ("grpo", "gspo"):
        _, log = final(objective, 4, "train.lr=0.05", "policy.clip_range=1e-5", "policy.clip_low=1e-5",
                       "policy.clip_high=1e-5")
        assert log["clip_fraction"] == 0.75, objective


def _initial_lora(data, reward, tmp_path):
    """The adapter a run starts from (train.seed decides its initialisation)."""
    from psr.workflows import rl

    recipe = load_recipe("rl", str(RECIPES / "gspo-toy.toml"),
                         [*FAST, f"out={str(tmp_path / 'init')!r}", f"data.path={data['toy']!r}"])
    run = rl.setup(recipe, resume=False, show_progress=False, rewards=reward)
    try:
        return {n: p.detach().clone() for n, p in run.named}
    finally:
        rl.cleanup(run)


def test_grpo_on_a_bench_with_kl_and_held_out_eval(data, reward, tmp_path, one_thread):
    out = tmp_path / "run"
    _run("grpo-toy.toml", out, f"data.path={data['train-bench']!r}", "policy.kl_beta=0.5", "eval.every=2",
         f"eval.bench={data['eval-bench']!r}", "eval.limit=1", "eval.subsets=['Position']", "eval.steps=2",
         # The backward recomputes checkpointed blocks: it must see reference-only LoRA's token mask too.
         "adapter.reference_only=true", "train.gradient_checkpointing=true",
         # A held-out metric: scored on the eval images, never trained on.
         "eval.metrics=[{name='aesthetic', label='held', options={allow_random_head=true, "
         "extractor={name='clip', tiny=true}}}]", reward=reward)
    log = _log(out)
    train = [e for e in log if "loss" in e]
    evals = [e for e in log if "eval/reward" in e]
    assert [e["step"] for e in train] == [1, 2] and [e["step"] for e in evals] == [0, 2]
    assert train[0]["kl"] == 0.0           # policy = reference until the first update
    assert train[1]["kl"] > 0              # the reference (LoRA off) stays behind
    assert all(math.isfinite(e[k]) for e in train for k in ("loss", "policy_loss", "clip_fraction", "grad_norm"))
    assert train[0]["loss"] == pytest.approx(train[0]["policy_loss"], abs=1e-9)
    assert all(math.isfinite(e["eval/reward"]) and "eval/psr" in e for e in evals)
    assert all(0.0 < e["eval/metric:held"] < 1.0 for e in evals)
    assert "reward/held" not in train[0] and "eval/held" not in evals[0]   # not part of the reward
    assert (out / "eval" / "step_000002.png").is_file()
    from safetensors.torch import load_file

    lora = load_file(str(out / "final" / "pytorch_lora_weights.safetensors"))
    still = [k for k, v in lora.items() if "lora_B" in k and v.abs().max() == 0]
    # Reference-only LoRA: the last block's queries at reference tokens reach no target token.
    assert still == ["transformer.single_transformer_blocks.1.attn.to_q.lora_B.weight"]


def test_focusdpo_starts_at_log_2_and_moves_the_lora(gspo_run, data, tmp_path, one_thread):
    init = gspo_run[0] / "checkpoints" / "step_000002"
    out = tmp_path / "run"
    _run("focusdpo-toy.toml", out, f"data.path={data['toy']!r}", "train.lr=1e-3", f"init={str(init)!r}",
         "dpo.features='embedded'")
    first, second = _log(out)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6) and first["reward_margin"] == 0.0
    assert second["reward_margin"] != 0.0 and math.isfinite(second["loss"]) and first["pairs"] == 2
    trained = ckpt.load_checkpoint(out / "checkpoints" / "step_000002")["trainable"]
    assert all(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)
    assert json.loads((out / "final" / "psr_lora.json").read_text())["init"] == str(init)


def test_init_merges_a_lora_file_and_an_rl_checkpoint(gspo_run, tiny_components):
    from psr.core.adapters import AdapterConfig, apply_adapter, load_trainable
    from psr.core.lora import add_lora, save_lora
    from psr.core.model import MultiRefFlux
    from psr.core.schema import ModelConfig
    from psr.core.weights import load_weights
    from psr.train.checkpoint import load_tensors

    inputs = _inputs()
    tuned = copy.deepcopy(tiny_components.transformer)
    add_lora(tuned, rank=4)
    with torch.no_grad():
        for name, param in tuned.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    path = save_lora(tuned, gspo_run[0].parent / "init.safetensors")
    merged = copy.deepcopy(tiny_components.transformer)
    assert "merged" in load_weights(merged, str(path), key="init")
    folder = gspo_run[0] / "checkpoints" / "step_000002"
    from_ckpt = copy.deepcopy(tiny_components.transformer)
    load_weights(from_ckpt, str(folder), key="init")
    expected = copy.deepcopy(tiny_components.transformer)
    named = apply_adapter(expected, AdapterConfig(kind="lora", rank=4, dropout=0.1))
    load_trainable(named, load_tensors(folder / "ema.safetensors"), str(folder))
    expected.eval()
    with torch.no_grad():
        assert (merged(**inputs)[0] - tuned(**inputs)[0]).abs().max() < 1e-5
        assert (from_ckpt(**inputs)[0] - expected(**inputs)[0]).abs().max() < 1e-5
    assert not any("lora" in n for n, _ in merged.named_parameters())
    # `model.weights` does the same for any command: here an RL run's checkpoint under a
    # generator built from the config alone (what psr generate and psr eval load).
    loaded = MultiRefFlux.from_config(ModelConfig(preset="tiny", device="cpu", dtype="float32",
                                                 weights=str(folder))).transformer
    with torch.no_grad():
        assert (loaded(**inputs)[0] - expected(**inputs)[0]).abs().max() < 1e-5


def test_cli_runs_the_flux_kontext_recipe_on_a_tiny_folder(data, tmp_path, tiny_components, capsys, one_thread):
    from psr.core.components import save_components

    folder = tmp_path / "kontext"
    save_components(tiny_components, folder)
    tiny = "{name='dino', tiny=true}", "{name='grounding-dino', tiny=true}"
    rewards = ("rewards=[" + ", ".join(f"{{name='{n}', extractor={tiny[0]}, localizer={tiny[1]}}}"
                                       for n in ("hungarian", "psr")) + "]")
    sets = [f"model.path={str(folder)!r}", "model.device=cpu", "model.reference_size=64",
            "model.max_sequence_length=32", f"data.path={data['toy']!r}", "rollout.size=64", "rollout.steps=2",
            "rollout.group_size=2", "rollout.groups_per_step=1", "train.steps=2", "eval.every=0",
            "logging.tensorboard=false", "train.gradient_checkpointing=false", rewards]
    out = tmp_path / "run"
    argv = ["rl", "--recipe", str(RECIPES / "gspo.toml"), "--out", str(out), "-q",
            *[a for s in sets for a in ("--set", s)]]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip().endswith(str(out / "final"))
    log = _log(out)
    assert [e["step"] for e in log] == [1, 2] and all(math.isfinite(e["loss"]) for e in log)
    assert {"reward/hungarian", "reward/psr"} <= log[0].keys()
    recipe = (out / "recipe.toml").read_text()
    assert 'preset = "flux-kontext"' in recipe and 'dtype = "bfloat16"' in recipe
    assert main(argv) == 2                              # the folder holds a run: --resume or another --out
    assert "pass --resume" in capsys.readouterr().err


def test_bad_input_is_one_line_and_exit_2(data, tmp_path, capsys):
    plain = tmp_path / "plain-bench"       # PSRBench items without ToyWorld ground truth
    plain.mkdir()
    items = json.loads((Path(data["train-bench"]) / "Position.json").read_text())
    for item in items:
        item["input_path"] = [str(Path(data["train-bench"]) / p) for p in item["input_path"]]
        del item["gt"], item["gt_target_path"]
    (plain / "Position.json").write_text(json.dumps(items))
    base = ["rl", "--recipe", str(RECIPES / "gspo-toy.toml"), "-q", *[a for o in FAST for a in ("--set", o)]]
    cases = {
        "group of one": (["--set", "rollout.group_size=1"], "rollout.group_size: GRPO-style training"),
        "unknown reward": (["--set", "rewards=[{name='psrr'}]"], "unknown reward 'psrr' (did you mean 'psr'?)"),
        "missing dataset": (["--set", f"data.path='{tmp_path / 'nope'}'"], "no such folder"),
        "held-out bench as data": (["--set", f"data.path={data['eval-bench']!r}"], "held-out (eval) identities"),
        "disrupted pairs without ToyWorld": (["--set", "objective='focusdpo'", "--set", "rewards=[]", "--set",
                                              f"data.path='{plain}'"], "has no ToyWorld example and target"),
        "size off the token grid": (["--set", f"data.path={data['toy']!r}", "--set", "rollout.size=60"],
                                    "rollout.size 60: must be a multiple of 8"),
    }
    for name, (args, message) in cases.items():
        assert main([*base, "--out", str(tmp_path / name), *args]) == 2, name
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (name, err)


def test_self_ranked_pairs_weight_each_image_by_its_own_focus_map(data, tiny_components, monkeypatch, one_thread):
    # The winner and the loser come from different noise, so their subjects sit in different
    # places; each error is weighted by the map of its own image.
    from psr.core.model import MultiRefFlux
    from psr.rewards.base import RewardResult
    from psr.rl import dpo
    from psr.rl.config import DpoConfig, RolloutConfig
    from psr.rl.focus import focus_weights
    from psr.rl.policy import Policy
    from psr.rl.sources import open_source

    model = MultiRefFlux(tiny_components, reference_size=32, max_sequence_length=16)
    policy = Policy(model, model.transformer)
    item = open_source(data["train-bench"], (), 2).items[0]
    rollout = RolloutConfig(group_size=3, steps=2, size=32, guidance=1.0)
    cfg = DpoConfig(pairs="self-ranked", focus=True)

    def by_brightness(batch):  # prefers the brightest image
        return RewardResult(torch.tensor([float(np.asarray(im).mean()) for im in batch.images]))

    pair, _ = dpo.self_ranked(policy, item, rollout, [11, 12, 13], by_brightness, cfg)
    own_winner = dpo.focus_maps(policy, pair.cond, pair.x0[0], pair.winner, item, cfg)
    assert torch.equal(pair.structure, own_winner[0]) and torch.equal(pair.detail, own_winner[1])
    assert pair.structure_loser is not None and not torch.equal(pair.structure_loser, pair.structure)

    seen = {}
    real = dpo.diffusion_dpo_loss

    def spy(*args, weights_w=None, weights_l=None, **kwargs):
        seen.update(w=weights_w, l=weights_l)
        return real(*args, weights_w=weights_w, weights_l=weights_l, **kwargs)

    monkeypatch.setattr(dpo, "diffusion_dpo_loss", spy)
    sigma, noise = 0.5, torch.randn(1, *pair.x0.shape[1:], generator=torch.Generator().manual_seed(0))
    dpo.pair_loss(policy, pair, sigma, noise, cfg)
    assert torch.equal(seen["w"], focus_weights(pair.structure, pair.detail, sigma, cfg.detail_on_below, cfg.floor))
    assert torch.equal(seen["l"], focus_weights(pair.structure_loser, pair.detail_loser, sigma,
                                                cfg.detail_on_below, cfg.floor))
    assert not torch.equal(seen["w"], seen["l"])


def test_one_step_in_cached_reference_mode_with_reference_only_lora(data, reward, tmp_path, monkeypatch, one_thread):
    from psr.core import refstream

    streams = []
    real = refstream.reference_kv

    def spy(*args, **kwargs):
        kv = real(*args, **kwargs)
        streams.append(torch.is_grad_enabled() and all(k.requires_grad for k, _ in kv.blocks.values()))
        return kv

    monkeypatch.setattr(refstream, "reference_kv", spy)
    out = tmp_path / "run"
    # Reference-only LoRA adapts the reference streams only; checkpointing recomputes them in backward.
    _run(GSPO[0], out, f"data.path={data['toy']!r}", "model.reference_mode='cached'", "train.steps=1",
         "adapter.reference_only=true", "train.gradient_checkpointing=true", reward=reward)
    (entry,) = _log(out)
    assert all(math.isfinite(entry[k]) for k in ("loss", "policy_loss", "grad_norm", "reward"))
    assert entry["grad_norm"] > 0
    assert False in streams and True in streams  # rollouts without grad, the update with it
    trained = ckpt.load_checkpoint(out / "checkpoints" / "step_000001")["trainable"]
    still = [k for k in trained if "lora_B" in k and not trained[k].abs().max() > 0]
    # Only the last block's reference queries stay put: their output feeds no later block.
    assert still == ["single_transformer_blocks.1.attn.to_q.lora_B.default.weight"]
