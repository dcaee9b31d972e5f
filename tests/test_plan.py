"""psr plan: exact parameter counts from meta-device models, the activation model against
measured CPU peaks of real training steps, and the command's output and bad input."""

import json
import math
from pathlib import Path

import pytest

from psr.cli import main
from psr.cli.recipes import load_recipe
from psr.core.embedded import EMBEDDED_PARAMETERS
from psr.core.presets import EMBEDDED_DIR
from psr.train.plan import analyse, memory_plan

ROOT = Path(__file__).resolve().parent.parent
TOY = str(ROOT / "recipes" / "pretrain-toy.toml")
LORA = str(ROOT / "recipes" / "pretrain-lora.toml")
GSPO = str(ROOT / "recipes" / "gspo.toml")
NO_REGS = ["regularizers=[]"]


def _rows(plan):
    return {row.name: row.bytes for row in plan.rows}


def test_kontext_lora_rank_512_on_every_target_trains_2_1_billion_float32_weights():
    plan = memory_plan(load_recipe("pretrain", LORA))
    trainable = 2_091_909_120
    assert plan.parameters == {"transformer": 11_901_408_320, "trainable": trainable,
                               "text_encoder_2": 4_762_310_656, "text_encoder": 123_060_480, "vae": 83_819_683}
    rows = _rows(plan)
    assert rows["weights, frozen"] == 2 * 11_901_408_320                      # bfloat16
    assert rows["weights, trained"] == rows["gradients"] == rows["EMA"] == 4 * trainable
    assert rows["optimizer (AdamW)"] == 8 * trainable
    assert rows["DDP buckets"] == 0                                           # one process: no DDP wrapper
    assert plan.tokens["joint"] == 512 + 4096 + 4 * 1024                      # text, 1024 px target, 4 x 512 px
    assert plan.peak <= plan.sum_of_rows


@pytest.mark.parametrize("overrides", [
    [],
    ["adapter.kind='lora'", "adapter.rank=8"],
    ["adapter.kind='lora'", "adapter.rank=4", "adapter.targets=['all']", "adapter.blocks=['single']"],
    ["adapter.kind='lora'", "adapter.reference_only=true", "adapter.targets=['all']"],
    ["adapter.kind='moe_lora'", "adapter.rank=4", "adapter.experts=3"],
], ids=["full", "lora-attn", "lora-single", "lora-reference-only", "moe-lora"])
def test_counted_parameters_are_what_apply_adapter_trains(overrides):
    from psr.core.adapters import apply_adapter
    from psr.core.tiny import build_tiny_components

    recipe = load_recipe("pretrain", TOY, overrides)
    plan = analyse(recipe)
    named = apply_adapter(build_tiny_components(seed=0).transformer, recipe.adapter)
    assert plan.layers.trainable == sum(p.numel() for _, p in named)
    assert sum(plan.grads.values()) == 4 * plan.layers.trainable  # every gradient sits in one stage


def test_embedded_sizes_come_from_the_shipped_model_configs():
    plan = memory_plan(load_recipe("pretrain", str(ROOT / "recipes" / "pretrain-embedded.toml"),
                                   [f"model.path={str(EMBEDDED_DIR)!r}"]))
    frozen = {k: v for k, v in EMBEDDED_PARAMETERS.items() if k != "transformer"}
    assert plan.parameters == {"transformer": EMBEDDED_PARAMETERS["transformer"],
                               "trainable": EMBEDDED_PARAMETERS["transformer"], **frozen}


@pytest.mark.parametrize("overrides", [
    NO_REGS + ["adapter.kind='lora'", "adapter.rank=16", "train.batch_size=2", "data.max_references=2"],
    NO_REGS + ["train.batch_size=1", "data.max_references=1"],
    ["adapter.kind='lora'", "adapter.rank=16", "adapter.targets=['all']", "train.batch_size=2",
     "data.max_references=2", "train.gradient_checkpointing=true"],
], ids=["lora", "full", "lora-checkpointed-with-regularizers"])
def test_activation_estimate_is_within_20_percent_of_the_measured_peak(overrides):
    from psr.train.memory import measure_step

    recipe = load_recipe("pretrain", TOY, overrides)
    measured = measure_step(recipe)["peak"]
    estimate = analyse(recipe, device="cpu").backward_peak()
    assert 0.8 <= estimate / measured <= 1.2, (estimate, measured)


def test_allocation_peak_counts_what_a_function_holds_at_its_busiest():
    import torch

    from psr.train.memory import allocation_peak

    def work():
        a = torch.ones(1 << 20)           # 4 MiB
        b = torch.ones(1 << 20)           # 8 MiB held
        del a, b
        keep.append(torch.ones(1 << 18))  # 1 MiB left

    keep = []
    peak, final = allocation_peak(work)
    assert peak == 8 << 20 and final == 1 << 20


def test_checkpointing_keeps_one_joint_tensor_per_block():
    recipe = load_recipe("pretrain", LORA)
    plan = analyse(recipe)
    joint = plan.tokens.joint * plan.arch.width * 2  # bfloat16 block inputs
    blocks = [s for s in plan.act.stages if s.name not in ("head", "tail")]
    assert len(blocks) == 19 + 38 and all(s.held == joint for s in blocks)
    without = analyse(load_recipe("pretrain", LORA, ["train.gradient_checkpointing=false"]))
    assert without.activations > 10 * plan.activations
    assert without.act.per_block == plan.act.per_block  # the same tensors, kept or rebuilt


def test_rl_updates_backpropagate_one_trained_step_of_one_micro_batch_at_a_time():
    gspo = memory_plan(load_recipe("rl", GSPO))
    assert (gspo.tokens["batch"], gspo.tokens["backwards_per_step"]) == (16, 2 * 6)  # groups x trained steps
    grpo = memory_plan(load_recipe("rl", GSPO, ["objective='grpo'"]))
    assert _rows(grpo)["activations"] == _rows(gspo)["activations"]
    small = memory_plan(load_recipe("rl", GSPO, ["train.micro_batch=4"]))
    assert (small.tokens["batch"], small.tokens["backwards_per_step"]) == (4, 2 * 4 * 6)
    assert _rows(small)["activations"] < _rows(gspo)["activations"] / 3
    dpo = memory_plan(load_recipe("rl", str(ROOT / "recipes" / "focusdpo.toml")))
    assert dpo.tokens["batch"] == 2  # winner and loser


def test_processes_add_ddp_buckets_and_fsdp_divides_the_state():
    recipe = load_recipe("pretrain", LORA)
    one, ddp = _rows(memory_plan(recipe)), _rows(memory_plan(recipe, processes=8))
    fsdp = _rows(memory_plan(recipe, processes=8, strategy="fsdp"))
    assert ddp["DDP buckets"] == ddp["gradients"] == one["gradients"]
    assert fsdp["gradients"] == math.ceil(one["gradients"] / 8)
    assert fsdp["optimizer (AdamW)"] == math.ceil(one["optimizer (AdamW)"] / 8)
    assert fsdp["weights, frozen"] == math.ceil(one["weights, frozen"] / 8)
    assert fsdp["EMA"] == one["EMA"] and fsdp["FSDP gathered blocks"] > 0


def test_cpu_offload_leaves_the_encoders_on_the_cpu():
    offloaded = _rows(memory_plan(load_recipe("pretrain", LORA, ["model.cpu_offload=true"])))
    assert offloaded["text encoders + VAE"] == 0
    assert _rows(memory_plan(load_recipe("pretrain", LORA)))["text encoders + VAE"] > 9 * 2**30


def test_plan_prints_a_table_and_json(capsys):
    assert main(["plan", GSPO]) == 0
    out = capsys.readouterr().out
    for name in ("weights, frozen", "gradients", "optimizer (AdamW)", "EMA", "activations", "peak per GPU"):
        assert name in out
    assert main(["plan", TOY, "--json", "--processes", "2", "--set", "train.batch_size=2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["processes"] == 2 and data["tokens"]["batch"] == 2
    assert data["peak"] == max(0, data["peak"]) and data["peak_gib"] == round(data["peak"] / 2**30, 3)


@pytest.mark.parametrize("args, message", [
    (["recipes/generate-tiny.toml"], "psr plan reads pretrain and rl recipes"),
    ([TOY, "--processes", "0"], "--processes 0: must be >= 1"),
    ([TOY, "--strategy", "zero"], "--strategy 'zero'"),
    ([LORA, "--size", "1000"], "multiple of the token stride (16 px)"),
    ([TOY, "--references", "9"], "--references 9"),
    ([TOY, "--set", "train.batch_sise=2"], "did you mean 'batch_size'?"),
    (["nowhere.toml"], "no such file"),
], ids=["generate recipe", "zero processes", "unknown strategy", "size off the grid", "too many references",
        "unknown key", "missing recipe"])
def test_bad_input_is_one_line_and_exit_2(capsys, args, message):
    assert main(["plan", *[str(ROOT / a) if a.startswith("recipes/") else a for a in args]]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("psr: error: ") and message in lines[0], captured.err
    assert captured.out == ""
