"""Adapters that cannot be merged (MoE-LoRA, reference-only LoRA) load as frozen modules:
through `model.weights`, `--weights` and rl's `init`, with an RL LoRA trained on top whose
reference policy is the stage-1 model, and every command reading the files of the one before."""

import copy
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from psr.cli import main
from psr.cli.recipes import load_recipe
from psr.errors import UserError
from doubles import psr_reward_on_doubles

ROOT = Path(__file__).parent.parent
RECIPES = ROOT / "recipes"
PRETRAIN = ["model.device=cpu", "train.batch_size=2", "train.steps=2", "train.warmup=0", "train.lr=1e-2",
            "logging.every=1", "logging.tensorboard=false", "samples.every=0", "checkpoint.every=2",
            "data.num_workers=0", "data.cache=false", "regularizers=[]", "train.ema_decay=0"]
RL = ["model.preset=tiny", "model.device=cpu", "rollout.group_size=2", "rollout.groups_per_step=1",
      "rollout.steps=2", "rollout.train_fraction=1.0", "train.steps=1", "train.lr=1e-2", "logging.every=1",
      "logging.tensorboard=false", "eval.every=0", "checkpoint.every=1", "adapter.rank=4"]
STAGE1 = {"moe": ["adapter.kind=moe_lora", "adapter.experts=2", "adapter.rank=4"],
          "reference-only": ["adapter.kind=lora", "adapter.rank=4", "adapter.reference_only=true"]}


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _reward(specs, device):
    """The recipe's rewards with ToyWorld's perception swapped for doubles: a random tiny
    model's images hold nothing it would find, and equal rewards train nothing."""
    return psr_reward_on_doubles()


@pytest.fixture(scope="module")
def data(tmp_path_factory, one_thread):
    from psr.workflows.synth import run_synth

    root = tmp_path_factory.mktemp("frozen-data")
    run_synth(load_recipe("synth", str(RECIPES / "synth-toy.toml"), ["shard_size=8", "workers=1"]),
              str(root / "toy"), 8, show_progress=False)
    assert main(["synth", "--recipe", str(RECIPES / "bench-toy.toml"), "--out", str(root / "bench"), "-q",
                 "--set", "bench.samples_per_subset=1", "--set", "bench.subsets=['Position']"]) == 0
    return root


@pytest.fixture(scope="module", params=sorted(STAGE1))
def chain(request, data, tmp_path_factory, one_thread):
    """`psr pretrain` (stage 1, 2 steps), then `psr rl` (GSPO, 1 step) with init = its final/."""
    root = tmp_path_factory.mktemp(f"chain-{request.param}")
    stage1, rl = root / "stage1", root / "rl"
    assert main(["pretrain", "--recipe", str(RECIPES / "pretrain-toy.toml"), "--out", str(stage1), "-q",
                 *_sets([*PRETRAIN, f"data.path={str(data / 'toy')!r}", *STAGE1[request.param]])]) == 0
    with pytest.MonkeyPatch.context() as patch:
        from psr.workflows import rl as workflow

        patch.setattr(workflow, "build_rewards", _reward)
        assert main(["rl", "--recipe", str(RECIPES / "gspo-toy.toml"), "--out", str(rl), "-q",
                     *_sets([*RL, f"data.path={str(data / 'toy')!r}", f"init={str(stage1 / 'final')!r}"])]) == 0
    return request.param, stage1, rl


def _inputs(tokens=64):
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, tokens, 16, generator=g),
            "encoder_hidden_states": torch.randn(1, 8, 32, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g), "timestep": torch.tensor([0.5]),
            "guidance": torch.tensor([1.0]), "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(8, 3),
            "return_dict": False}


def _forward(transformer):
    from psr.core.lora import lora_token_mask

    mask = torch.zeros(64, dtype=torch.bool)
    mask[32:] = True  # the last half plays the references
    with torch.no_grad(), lora_token_mask(transformer, mask):
        return transformer(**_inputs())[0]


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_rl_keeps_the_stage1_adapter_frozen_below_its_lora(chain, tiny_components):
    from psr.core.weights import load_weights
    from psr.train import checkpoint as ckpt

    _, stage1, rl = chain
    trained = ckpt.load_checkpoint(rl / "checkpoints" / "step_000001")["trainable"]
    # Only the RL LoRA trains: no stage-1 tensor among the checkpoint's, and each one moved.
    assert trained and all(".lora_A.default." in k or ".lora_B.default." in k for k in trained)
    assert all(v.abs().max() > 0 for k, v in trained.items() if "lora_B" in k)
    card = json.loads((rl / "final" / "psr_lora.json").read_text())
    assert card["frozen_below"] == [str((stage1 / "final").resolve())]
    assert ckpt.read_state(rl / "checkpoints" / "step_000001")["frozen_below"] == card["frozen_below"]

    # The stage-1 weights after the RL step are the ones stage 1 wrote.
    stage = copy.deepcopy(tiny_components.transformer)
    assert " kept as " in load_weights(stage, str(stage1 / "final"))  # frozen, not merged
    # --weights of the RL result: stage 1 first (from the card), then the RL LoRA.
    result = copy.deepcopy(tiny_components.transformer)
    note = load_weights(result, str(rl / "final"))
    assert note.startswith(("MoE-LoRA", "reference-only LoRA")) and "then LoRA" in note
    assert not any(p.requires_grad for p in result.parameters())
    # The same from the RL checkpoint (its state.json records stage 1).
    from_ckpt = copy.deepcopy(tiny_components.transformer)
    load_weights(from_ckpt, str(rl / "checkpoints" / "step_000001"))
    plain = tiny_components.transformer
    out, base, below, again = _forward(result), _forward(plain), _forward(stage), _forward(from_ckpt)
    assert (below - base).abs().max() > 1e-4          # stage 1 moved the model
    assert (out - below).abs().max() > 1e-5           # and the RL LoRA moved it further
    assert (again - out).abs().max() < 1e-6


def test_reference_policy_is_the_stage1_model(chain, data, tmp_path, tiny_components):
    from psr.core.model import MultiRefFlux
    from psr.rl.policy import Policy, condition
    from psr.workflows import rl

    _, stage1, _ = chain
    recipe = load_recipe("rl", str(RECIPES / "gspo-toy.toml"),
                         [*RL, f"out={str(tmp_path / 'rl')!r}", f"data.path={str(data / 'toy')!r}",
                          f"init={str(stage1 / 'final')!r}"])
    run = rl.setup(recipe, resume=False, show_progress=False, rewards=lambda batch: None)
    try:
        assert all(".default." in n for n, _ in run.named)
        with torch.no_grad():
            for name, param in run.named:  # an RL LoRA that has moved
                if "lora_B" in name:
                    param.normal_(0, 0.3, generator=torch.Generator().manual_seed(4))
        item = run.source.items[0]

        def model(weights=None):  # the run's model section, other weights
            return MultiRefFlux.from_config(dataclasses.replace(run.recipe.model, weights=weights))

        stage, base = model(str(stage1 / "final")), model()

        def velocity(model, policy, reference=False):
            cond = condition(model, item.prompt, item.references(), 64, 1, 1.0)
            latents = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(1))
            return policy.velocity(latents, torch.tensor([0.7]), cond, reference=reference)

        reference = velocity(run.model, run.policy, reference=True)
        current = velocity(run.model, run.policy)
        expected = velocity(stage, Policy(stage, stage.transformer))
        original = velocity(base, Policy(base, base.transformer))
        assert (reference - expected).abs().max() < 1e-6
        assert (expected - original).abs().max() > 1e-4    # the stage-1 model, not the base
        assert (current - reference).abs().max() > 1e-4    # the RL LoRA is what was switched off
        trainable = [n for n, p in run.model.transformer.named_parameters() if p.requires_grad]
        assert trainable == [n for n, _ in run.named]      # switched back on, stage 1 still frozen
    finally:
        rl.cleanup(run)


def test_eval_and_generate_take_the_rl_result(chain, data, tmp_path, capsys):
    kind, stage1, rl = chain
    if kind == "moe":
        out = tmp_path / "eval"
        assert main(["eval", "--recipe", str(RECIPES / "eval-toy.toml"), "--bench", str(data / "bench"),
                     "--out", str(out), "-q", "--device", "cpu", "--weights", str(rl / "final"),
                     *_sets(["model.preset=tiny", "model.device=cpu", "sample.steps=2"])]) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["generated"] == 1 and results["subsets"]["Position"]["items"] == 1
        return
    # Reference-only: stage 1 alone, then the RL result, through psr generate.
    ref = tmp_path / "ref.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(ref)
    for name, weights in (("stage1", stage1 / "final"), ("rl", rl / "final")):
        assert main(["generate", "--recipe", str(RECIPES / "generate-tiny.toml"), "--ref", str(ref), "a red cat",
                     "--out", str(tmp_path / name), "--steps", "2", "--size", "32", "-q",
                     "--weights", str(weights)]) == 0
        assert (tmp_path / name / "0000.png").is_file()
    capsys.readouterr()
    # The sampler's forwards carry the reference mask: the LoRA acts, at the references only.
    from psr.core.model import MultiRefFlux
    from psr.core.schema import ModelConfig, resolve_model

    def draw(weights, refs):
        model = MultiRefFlux.from_config(resolve_model(ModelConfig(preset="tiny", device="cpu", weights=weights)))
        return model.generate("a red cat", refs, height=32, width=32, steps=2, guidance=1.0, seeds=[0],
                              output_type="pt")

    refs = [Image.open(ref)]
    assert (draw(str(rl / "final"), refs) - draw(None, refs)).abs().max() > 1e-5
    # Without references the reference-only stage 1 has no token to act on.
    assert torch.equal(draw(str(stage1 / "final"), []), draw(None, []))
    assert not torch.equal(draw(str(stage1 / "final"), refs), draw(None, refs))


def test_training_on_top_of_frozen_modules_refuses_what_cannot_stack(tiny_components, tmp_path):
    from psr.core.adapters import AdapterConfig, apply_adapter
    from psr.core.lora import add_lora, save_lora
    from psr.core.moe_lora import add_moe_lora, save_moe_lora
    from psr.core.weights import load_weights, weights_kind

    stage = copy.deepcopy(tiny_components.transformer)
    add_lora(stage, rank=2, reference_only=True)
    path = save_lora(stage, tmp_path / "ref.safetensors")
    transformer = copy.deepcopy(tiny_components.transformer)
    assert load_weights(transformer, str(path)) == "reference-only LoRA ref.safetensors kept as a frozen module"
    with pytest.raises(UserError, match="a full fine-tune cannot train on top of trained weights kept as modules"):
        apply_adapter(transformer, AdapterConfig(kind="none"))

    moe = copy.deepcopy(tiny_components.transformer)
    add_moe_lora(moe, 2, 1, 2)
    path = save_moe_lora(moe, tmp_path / "experts.safetensors")  # found by its header, not its name
    assert weights_kind(str(path)) == "moe file"
    transformer = copy.deepcopy(tiny_components.transformer)
    assert load_weights(transformer, str(path)) == "MoE-LoRA experts.safetensors kept as frozen modules"
    with pytest.raises(UserError, match="already hold MoE-LoRA experts \\(kept frozen\\); train a LoRA on top"):
        apply_adapter(transformer, AdapterConfig(kind="moe_lora", experts=2))


def test_a_result_whose_stage1_is_gone_is_one_line(tiny_components, tmp_path):
    from psr.core.lora import add_lora, save_lora
    from psr.core.weights import load_weights

    tuned = copy.deepcopy(tiny_components.transformer)
    add_lora(tuned, rank=2)
    final = tmp_path / "final"
    final.mkdir()
    save_lora(tuned, final / "pytorch_lora_weights.safetensors")
    gone = tmp_path / "stage1" / "final"
    (final / "psr_lora.json").write_text(json.dumps({"trained": True, "frozen_below": [str(gone)]}))
    with pytest.raises(UserError) as err:
        load_weights(copy.deepcopy(tiny_components.transformer), str(final))
    assert str(err.value) == f"model.weights {final}: trained on top of {gone}: no such file or folder"
