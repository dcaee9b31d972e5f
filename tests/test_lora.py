"""LoRA: targets, the diffusers file round trip, merging, reference-only LoRA, MoE-LoRA."""

import copy
import json

import pytest
import torch

from psr.core.attention import TokenLayout
from psr.core.lora import (
    add_lora,
    load_lora,
    lora_state_dict_for_diffusers,
    lora_token_mask,
    merge_lora,
    resolve_lora_targets,
    save_lora,
    set_lora_token_mask,
)
from psr.core.moe_lora import (
    MoELoRA,
    _AuxSink,
    add_moe_lora,
    load_balance_loss,
    load_moe_lora,
    moe_aux_loss,
    save_moe_lora,
)
from psr.errors import UserError

LAYOUT = TokenLayout(text_len=5, target_len=16, ref_lens=(8, 12))


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    n = LAYOUT.image_len
    return {"hidden_states": torch.randn(2, n, 16, generator=g), "img_ids": torch.randn(n, 3, generator=g),
            "encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
            "pooled_projections": torch.randn(2, 32, generator=g), "txt_ids": torch.zeros(5, 3),
            "timestep": torch.full((2,), 0.6), "guidance": torch.full((2,), 3.5), "return_dict": False}


def _run(transformer, seed=0):
    with torch.no_grad():
        return transformer(**_inputs(seed))[0]


@pytest.fixture()
def base(tiny_components, one_thread):
    return tiny_components.transformer


@pytest.fixture()
def fresh(base):
    return copy.deepcopy(base)


def _randomize(transformer, names=("lora_B",), seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if any(k in name for k in names):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


# ---------------------------------------------------------------------- plain LoRA
def test_targets_groups_and_errors(base):
    attn = resolve_lora_targets(base, ["attn"])
    assert len(attn) == 2 * 8 + 2 * 3  # double: 8 attention layers; single: to_q/k/v only
    assert "transformer_blocks.0.attn.to_out.0" in attn and "single_transformer_blocks.1.attn.to_v" in attn
    assert resolve_lora_targets(base, ["proj_out"], ["single"]) == [
        "single_transformer_blocks.0.proj_out", "single_transformer_blocks.1.proj_out"]  # not the model's proj_out
    assert resolve_lora_targets(base, ["to_q"], ["transformer_blocks.1"]) == ["transformer_blocks.1.attn.to_q"]
    assert len(resolve_lora_targets(base, ["ff"])) == 2 * 4 + 2 * 2
    with pytest.raises(UserError, match="lora target 'to_qq': matches no linear layer"):
        resolve_lora_targets(base, ["to_qq"])
    with pytest.raises(UserError, match="add_q_proj"):
        resolve_lora_targets(base, ["add_q_proj"], ["single"])
    with pytest.raises(UserError, match="lora blocks"):
        resolve_lora_targets(base, ["attn"], ["transformer_blocks.9"])
    # Reference-only LoRA skips the text stream, and refuses modulation layers.
    ref_only = resolve_lora_targets(base, ["attn"], reference_only=True)
    assert not any(".add_" in n or "to_add_out" in n for n in ref_only) and len(ref_only) == 2 * 4 + 2 * 3
    with pytest.raises(UserError, match="no token axis"):
        resolve_lora_targets(base, ["norm1.linear"], reference_only=True)


def test_add_lora_starts_at_the_base_model_and_trains_only_lora(base, fresh):
    names = add_lora(fresh, rank=4, alpha=8, targets=["all"])
    assert len(names) == 34
    assert torch.equal(_run(fresh), _run(base))
    trainable = [n for n, p in fresh.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(names)
    with pytest.raises(UserError, match="already has a LoRA"):
        add_lora(fresh, rank=4)


RANK, ALPHA = 4, 16  # alpha ≠ rank: a loader that drops the alpha is off by a factor of 4


@pytest.fixture()
def saved(base, tmp_path):
    """(in-memory peft model, its output, the file save_lora wrote) for rank 4, alpha 16."""
    tuned = copy.deepcopy(base)
    add_lora(tuned, rank=RANK, alpha=ALPHA, targets=["attn", "proj_mlp"])
    _randomize(tuned, names=("lora_A", "lora_B"))
    expected = _run(tuned)
    assert not torch.allclose(expected, _run(base), atol=1e-2)
    return tuned, expected, save_lora(tuned, tmp_path / "pytorch_lora_weights.safetensors")


def _read(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return f.metadata(), {k: f.get_tensor(k) for k in f.keys()}


def test_saved_lora_holds_the_scale_in_lora_b_and_alpha_equal_to_rank(saved):
    from peft.utils import get_peft_model_state_dict

    tuned, _, path = saved
    meta, tensors = _read(path)
    live = get_peft_model_state_dict(tuned)
    assert set(tensors) == {f"transformer.{k}" for k in live}
    for key, value in live.items():
        factor = ALPHA / RANK if ".lora_B." in key else 1.0
        assert torch.equal(tensors[f"transformer.{key}"], value * factor), key  # 4 is a power of two: exact
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["transformer.r"] == config["transformer.lora_alpha"] == RANK
    assert json.loads(meta["psr_lora"])["version"] == 2 and json.loads(meta["psr_lora"])["alpha"] == ALPHA
    assert lora_state_dict_for_diffusers(tuned).keys() == tensors.keys()


def _pipeline(components, base):
    from diffusers import FluxPipeline

    parts = components.as_dict()
    parts["transformer"] = copy.deepcopy(base)
    return FluxPipeline(**parts)


def _peft(base, path, from_metadata):
    """What a peft user does with the file: strip the prefix, configure, inject, load."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    meta, tensors = _read(path)
    state = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    if from_metadata:
        config = LoraConfig(**{k.removeprefix("transformer."): v
                               for k, v in json.loads(meta["lora_adapter_metadata"]).items()})
    else:
        modules = sorted({k.split(".lora_")[0] for k in state})
        config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=modules)
    transformer = copy.deepcopy(base)
    inject_adapter_in_model(config, transformer)
    result = set_peft_model_state_dict(transformer, state)
    assert not result.unexpected_keys
    return transformer


ENTRY_POINTS = ("pipeline file", "pipeline folder", "load_lora_adapter", "load_lora_adapter use_safetensors",
                "peft alpha=rank", "peft metadata")


def _load_through(entry, components, base, path):
    """A fresh copy of `base` with the file loaded the way `entry` names."""
    if entry.startswith("peft"):
        return _peft(base, path, from_metadata=entry == "peft metadata")
    if entry.startswith("pipeline"):
        pipe = _pipeline(components, base)
        if entry == "pipeline file":
            pipe.load_lora_weights(str(path))
        else:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name)
        return pipe.transformer
    transformer = copy.deepcopy(base)
    extra = {"use_safetensors": True} if entry.endswith("use_safetensors") else {}
    transformer.load_lora_adapter(str(path), prefix="transformer", **extra)
    return transformer


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_saved_lora_loads_at_the_trained_strength_everywhere(tiny_components, base, saved, entry):
    _, expected, path = saved
    transformer = _load_through(entry, tiny_components, base, path)
    assert torch.allclose(_run(transformer), expected, atol=1e-5)


def test_psr_load_lora_restores_the_trained_settings_and_weights(base, saved):
    from peft.utils import get_peft_model_state_dict

    tuned, expected, path = saved
    again = copy.deepcopy(base)
    load_lora(again, path)
    assert again._psr_lora_settings == tuned._psr_lora_settings  # alpha 16 again, not the file's 4
    assert again.peft_config["default"].lora_alpha == ALPHA
    assert all(torch.equal(v, get_peft_model_state_dict(tuned)[k]) for k, v in get_peft_model_state_dict(again).items())
    assert torch.equal(_run(again), expected)


def test_a_scale_that_is_not_a_power_of_two_round_trips_within_one_rounding(base, tmp_path):
    tuned = copy.deepcopy(base)
    add_lora(tuned, rank=4, alpha=6, targets=["to_q"])
    _randomize(tuned)
    path = save_lora(tuned, tmp_path / "x.safetensors")
    again = copy.deepcopy(base)
    load_lora(again, path)
    b = tuned.transformer_blocks[0].attn.to_q.lora_B["default"].weight
    in_file = _read(path)[1]["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"]
    assert torch.allclose(in_file, 1.5 * b, rtol=1e-6, atol=0)
    b_again = again.transformer_blocks[0].attn.to_q.lora_B["default"].weight
    assert torch.all((b - b_again).abs() <= torch.finfo(torch.float32).eps * b.abs())  # one rounding at most
    assert again._psr_lora_settings["alpha"] == 6.0
    assert torch.allclose(_run(again), _run(tuned), atol=1e-6)


def _old_format_file(tuned, path):
    """A file as save_lora wrote it before the scale moved into lora_B (version 1)."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    config = {f"transformer.{k}": sorted(v) if isinstance(v, set) else v
              for k, v in tuned.peft_config["default"].to_dict().items()}
    save_file({f"transformer.{k}": v.contiguous() for k, v in get_peft_model_state_dict(tuned).items()}, str(path),
              metadata={"format": "pt", "lora_adapter_metadata": json.dumps(config, default=str),
                        "psr_lora": json.dumps({"version": 1, **tuned._psr_lora_settings})})
    return path


def test_old_format_files_still_load_right_through_psr(base, saved, tmp_path):
    from psr.core.weights import load_weights

    tuned, expected, _ = saved
    old = _old_format_file(tuned, tmp_path / "old.safetensors")
    again = copy.deepcopy(base)
    load_lora(again, old)
    assert torch.equal(_run(again), expected)
    merged = copy.deepcopy(base)
    assert "merged" in load_weights(merged, str(old))
    assert torch.allclose(_run(merged), expected, atol=1e-5)
    # The reason for the new format: diffusers without use_safetensors ignores the metadata
    # and reads an old file at alpha = rank, a quarter of the trained strength here.
    plain = copy.deepcopy(base)
    plain.load_lora_adapter(str(old), prefix="transformer")
    assert plain.peft_config["default_0"].lora_alpha == RANK
    assert not torch.allclose(_run(plain), expected, atol=1e-2)


def test_unknown_file_versions_are_refused(base, saved, tmp_path):
    from safetensors.torch import save_file

    _, _, path = saved
    meta, tensors = _read(path)
    meta["psr_lora"] = json.dumps({**json.loads(meta["psr_lora"]), "version": 3})
    save_file(tensors, str(tmp_path / "v3.safetensors"), metadata=meta)
    with pytest.raises(UserError, match="format version 3, this psr reads versions 1 and 2"):
        load_lora(copy.deepcopy(base), tmp_path / "v3.safetensors")


def test_merge_lora_gives_a_plain_transformer_with_the_same_output(fresh):
    add_lora(fresh, rank=4, targets=["all"])
    _randomize(fresh)
    expected = _run(fresh)
    merged = merge_lora(fresh)
    assert type(merged.transformer_blocks[0].attn.to_q) is torch.nn.Linear
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert torch.allclose(_run(merged), expected, atol=1e-5)
    with pytest.raises(UserError, match="no LoRA layers"):
        merge_lora(merged)


def test_file_errors(fresh, tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_lora(fresh, tmp_path / "missing.safetensors")
    with pytest.raises(UserError, match="no LoRA added"):
        save_lora(fresh, tmp_path / "x.safetensors")


# ---------------------------------------------------------------------- reference-only LoRA
def _layer_io(transformer):
    from peft.tuners.lora import LoraLayer

    records, handles = [], []
    for name, module in transformer.named_modules():
        if isinstance(module, LoraLayer):
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: records.append((name, m, args[0].detach(), out.detach()))))
    return records, handles


def test_reference_only_lora_changes_reference_tokens_only(base, fresh):
    add_lora(fresh, rank=4, targets=["all"], reference_only=True)
    _randomize(fresh)
    records, handles = _layer_io(fresh)
    with lora_token_mask(fresh, LAYOUT.reference_mask()):
        _run(fresh)
    for h in handles:
        h.remove()
    streams = set()
    for name, module, x, out in records:
        with torch.no_grad():
            plain = module.get_base_layer()(x)
        front = out.shape[1] - LAYOUT.image_len  # text tokens in front (single-stream layers)
        streams.add(front)
        keep = slice(0, front + LAYOUT.target_len)
        assert torch.equal(out[:, keep], plain[:, keep]), name  # text and target tokens: exactly the base layer
        assert not torch.allclose(out[:, front + LAYOUT.target_len:], plain[:, front + LAYOUT.target_len:]), name
    assert streams == {0, LAYOUT.text_len}  # both image-stream and joint-stream layers were checked

    # A mask without reference tokens gives exactly the base model.
    with lora_token_mask(fresh, torch.zeros(LAYOUT.image_len, dtype=torch.bool)):
        assert torch.equal(_run(fresh), _run(base))
    with lora_token_mask(fresh, LAYOUT.reference_mask()):
        assert not torch.allclose(_run(fresh), _run(base), atol=1e-4)


def test_reference_only_lora_errors_and_file_round_trip(fresh, base, tmp_path):
    add_lora(fresh, rank=4, targets=["attn"], reference_only=True)
    _randomize(fresh)
    with pytest.raises(RuntimeError, match="no token mask set"):
        _run(fresh)
    with pytest.raises(ValueError, match="the mask has 7"), lora_token_mask(fresh, torch.ones(7, dtype=torch.bool)):
        _run(fresh)
    with pytest.raises(ValueError, match="no reference-only LoRA"):
        set_lora_token_mask(base, LAYOUT.reference_mask())
    with pytest.raises(UserError, match="reference-only LoRA applies"):
        merge_lora(fresh)
    batch_mask = LAYOUT.reference_mask()[None].expand(2, -1)
    with lora_token_mask(fresh, batch_mask):
        expected = _run(fresh)
    again = copy.deepcopy(base)
    load_lora(again, save_lora(fresh, tmp_path / "ref.safetensors"))
    with lora_token_mask(again, batch_mask):
        assert torch.equal(_run(again), expected)


# ---------------------------------------------------------------------- MoE-LoRA
def test_load_balance_loss_known_values():
    uniform = torch.full((6, 3), 1 / 3)
    assert load_balance_loss(uniform, torch.tensor([[0], [1], [2], [0], [1], [2]])).item() == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0, 0, 0]] * 5)
    assert load_balance_loss(collapsed, torch.zeros(5, 1, dtype=torch.long)).item() == pytest.approx(4.0)
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4]])
    assert load_balance_loss(probs, torch.tensor([[0], [0]])).item() == pytest.approx(2 * 0.7)


def test_moe_layer_routes_with_softmax_gates():
    torch.manual_seed(0)
    base = torch.nn.Linear(8, 6)
    layer = MoELoRA(base, experts=4, top_k=1, rank=2, alpha=4, sink=_AuxSink())
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.weight.zero_()
        layer.router.bias.copy_(torch.tensor([0.0, 0.0, 5.0, 0.0]))
    x = torch.randn(3, 5, 8)
    p = torch.softmax(layer.router.bias, 0)
    expert = lambda e: x @ layer.lora_A[e].t() @ layer.lora_B[e].t() * 2.0
    with torch.no_grad():
        assert torch.allclose(layer(x), base(x) + p[2] * expert(2), atol=1e-5)
        layer.top_k = 2
        layer.router.bias.copy_(torch.tensor([3.0, 2.0, -9.0, -9.0]))
        p = torch.softmax(layer.router.bias, 0)
        assert torch.allclose(layer(x), base(x) + p[0] * expert(0) + p[1] * expert(1), atol=1e-5)
    with pytest.raises(UserError, match="top_k 5"):
        MoELoRA(base, experts=4, top_k=5, rank=2, alpha=4, sink=_AuxSink())


def test_moe_lora_on_the_transformer(base, fresh, tmp_path):
    names = add_moe_lora(fresh, experts=3, top_k=1, rank=4)
    assert names == ["transformer_blocks.0.ff", "transformer_blocks.0.ff_context", "transformer_blocks.1.ff",
                     "transformer_blocks.1.ff_context", "single_transformer_blocks.0.proj_mlp",
                     "single_transformer_blocks.1.proj_mlp"]
    assert torch.equal(_run(fresh), _run(base))  # experts' B start at zero
    assert moe_aux_loss(fresh).item() == 0.0  # nothing recorded without autograd
    trainable = {n for n, p in fresh.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B", "router.weight", "router.bias")) for n in trainable)

    _randomize(fresh, names=("lora_B",))
    out = fresh(**_inputs())[0]
    aux = moe_aux_loss(fresh)
    assert 0.0 < aux.item() <= 3.0 and moe_aux_loss(fresh).item() == 0.0  # at most K; read once, then reset
    (out.square().mean() + 0.01 * aux).backward()
    moe = fresh.transformer_blocks[0].ff
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (moe.router.weight, moe.lora_A, moe.lora_B))

    expected = _run(fresh)
    assert not torch.allclose(expected, _run(base), atol=1e-4)
    again = copy.deepcopy(base)
    assert load_moe_lora(again, save_moe_lora(fresh, tmp_path / "moe.safetensors")) == names
    assert torch.equal(_run(again), expected)
    with pytest.raises(UserError, match="cannot be merged"):
        merge_lora(again)
    with pytest.raises(UserError, match="choose from"):
        add_moe_lora(copy.deepcopy(base), targets=["ffn"])


def test_lora_and_moe_lora_do_not_stack_on_one_layer(base):
    both = copy.deepcopy(base)
    add_moe_lora(both, experts=2, blocks=["double"], targets=["ff"])
    with pytest.raises(UserError, match="inside a MoE-LoRA module"):
        add_lora(both, rank=2, targets=["net.2"])
    assert len(add_lora(both, rank=2, targets=["attn"])) == 22  # attention LoRA + FFN experts is fine
    other = copy.deepcopy(base)
    add_lora(other, rank=2, targets=["ff"])
    with pytest.raises(UserError, match="already has LoRA"):
        add_moe_lora(other, experts=2)


def test_moe_lora_trains_under_gradient_checkpointing_with_the_same_gradients(base):
    plain, checkpointed = copy.deepcopy(base), copy.deepcopy(base)
    grads = []
    for model in (plain, checkpointed):
        torch.manual_seed(0)  # same experts and router in both
        add_moe_lora(model, experts=2, top_k=1, rank=4)
        _randomize(model, names=("lora_B",))
        if model is checkpointed:
            model.enable_gradient_checkpointing()
        model.train()
        out = model(**_inputs())[0]
        (out.square().mean() + 0.01 * moe_aux_loss(model)).backward()
        grads.append(model.transformer_blocks[0].ff.router.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
