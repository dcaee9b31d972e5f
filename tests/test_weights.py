"""`model.weights` with LoRA files psr did not write: diffusers and kohya layouts, merged at
the strength the file says, and one clear line for files that are not a FLUX LoRA."""

import copy
import json

import pytest
import torch

from psr.core.lora import add_lora
from psr.core.weights import load_weights, weights_kind
from psr.errors import UserError


@pytest.fixture()
def base(tiny_components, one_thread):
    return tiny_components.transformer


def _inputs():
    g = torch.Generator().manual_seed(0)
    return {"hidden_states": torch.randn(1, 24, 16, generator=g), "img_ids": torch.randn(24, 3, generator=g),
            "encoder_hidden_states": torch.randn(1, 5, 32, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g), "txt_ids": torch.zeros(5, 3),
            "timestep": torch.full((1,), 0.6), "guidance": torch.full((1,), 3.5), "return_dict": False}


def _run(transformer):
    with torch.no_grad():
        return transformer(**_inputs())[0]


def _random_lora(base, rank=4, alpha=16.0, targets=("to_q", "proj_out")):
    """A peft LoRA (not psr's file format) with random A and B, at alpha ≠ rank."""
    tuned = copy.deepcopy(base)
    add_lora(tuned, rank=rank, alpha=alpha, targets=list(targets))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return tuned


def _delta(tuned, module):
    """W + (alpha/rank) B A for one layer, computed from the factors without peft's merge."""
    layer = tuned.get_submodule(module)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    scale = layer.lora_alpha["default"] / layer.r["default"]
    return layer.get_base_layer().weight + scale * b @ a


def _peft_config_json(tuned):
    return {k: sorted(v) if isinstance(v, set) else v for k, v in tuned.peft_config["default"].to_dict().items()}


def test_a_diffusers_pipeline_lora_file_merges_at_its_alpha(base, tmp_path):
    from diffusers import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    tuned = _random_lora(base)
    FluxPipeline.save_lora_weights(tmp_path, transformer_lora_layers=get_peft_model_state_dict(tuned),
                                   transformer_lora_adapter_metadata=_peft_config_json(tuned))
    path = tmp_path / "pytorch_lora_weights.safetensors"
    assert weights_kind(str(path)) == "lora file" and weights_kind(str(tmp_path)) == "lora file"
    merged = copy.deepcopy(base)
    note = load_weights(merged, str(path))
    assert "merged" in note and "diffusers" in note
    layer = "transformer_blocks.1.attn.to_q"
    assert type(merged.get_submodule(layer)) is torch.nn.Linear and not hasattr(merged, "peft_config")
    assert torch.allclose(merged.get_submodule(layer).weight, _delta(tuned, layer), atol=1e-6)
    assert torch.allclose(_run(merged), _run(tuned), atol=1e-5)
    # The folder form (a run's final/ layout) finds the same file.
    again = copy.deepcopy(base)
    load_weights(again, str(tmp_path))
    assert torch.equal(_run(again), _run(merged))


def test_a_transformer_adapter_file_without_prefix_merges_too(base, tmp_path):
    """`FluxTransformer2DModel.save_lora_adapter` writes keys and metadata without `transformer.`."""
    tuned = _random_lora(base, alpha=2.0, targets=("to_k",))
    tuned.save_lora_adapter(str(tmp_path), adapter_name="default")
    merged = copy.deepcopy(base)
    load_weights(merged, str(tmp_path / "pytorch_lora_weights.safetensors"))
    layer = "single_transformer_blocks.0.attn.to_k"
    assert torch.allclose(merged.get_submodule(layer).weight, _delta(tuned, layer), atol=1e-6)


def _kohya_file(base, path):
    """A kohya (sd-scripts) FLUX LoRA for the tiny transformer. diffusers' converter splits
    `img_attn_qkv` into to_q/to_k/to_v by thirds, which fits any width; single blocks'
    `linear1` is split at FLUX.1's fixed widths (3072, ..., 12288) and cannot fit the tiny
    model, so the file adapts `linear2` (proj_out) of a single block instead."""
    from safetensors.torch import save_file

    width = base.transformer_blocks[0].attn.to_q.in_features
    proj_out = base.single_transformer_blocks[1].proj_out
    g = torch.Generator().manual_seed(5)
    tensors = {
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": torch.randn(4, width, generator=g) * 0.2,
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": torch.randn(3 * width, 4, generator=g) * 0.2,
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(12.0),  # scale 3
        "lora_unet_single_blocks_1_linear2.lora_down.weight": torch.randn(2, proj_out.in_features, generator=g) * 0.2,
        "lora_unet_single_blocks_1_linear2.lora_up.weight": torch.randn(proj_out.out_features, 2, generator=g) * 0.2,
        "lora_unet_single_blocks_1_linear2.alpha": torch.tensor(1.0),  # scale 0.5
    }
    save_file(tensors, str(path))
    return tensors


def test_a_kohya_lora_file_merges_through_diffusers_converter(base, tmp_path):
    tensors = _kohya_file(base, tmp_path / "kohya.safetensors")
    merged = copy.deepcopy(base)
    load_weights(merged, str(tmp_path / "kohya.safetensors"))
    width = base.transformer_blocks[0].attn.to_q.in_features
    down = tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"]
    up = tensors["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    attn, merged_attn = base.transformer_blocks[0].attn, merged.transformer_blocks[0].attn
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        expected = getattr(attn, name).weight + 3.0 * up[i * width:(i + 1) * width] @ down
        assert torch.allclose(getattr(merged_attn, name).weight, expected, atol=1e-5), name
    expected = base.single_transformer_blocks[1].proj_out.weight + 0.5 * (
        tensors["lora_unet_single_blocks_1_linear2.lora_up.weight"]
        @ tensors["lora_unet_single_blocks_1_linear2.lora_down.weight"])
    assert torch.allclose(merged.single_transformer_blocks[1].proj_out.weight, expected, atol=1e-6)
    # Layers the file does not name are untouched.
    assert torch.equal(merged.transformer_blocks[1].attn.to_q.weight, base.transformer_blocks[1].attn.to_q.weight)
    assert torch.equal(merged.transformer_blocks[0].attn.add_q_proj.weight,
                       base.transformer_blocks[0].attn.add_q_proj.weight)


def _one_line_error(base, path, match):
    with pytest.raises(UserError, match=match) as err:
        load_weights(copy.deepcopy(base), str(path))
    assert "\n" not in str(err.value)
    return str(err.value)


def test_files_that_are_not_a_flux_lora_for_this_model_get_one_clear_line(base, tmp_path):
    from safetensors.torch import save_file

    save_file({"encoder.weight": torch.zeros(3, 3), "decoder.bias": torch.ones(2)}, str(tmp_path / "junk.safetensors"))
    message = _one_line_error(base, tmp_path / "junk.safetensors", "holds no LoRA tensors")
    assert message.startswith(f"model.weights {tmp_path / 'junk.safetensors'}: ")

    (tmp_path / "notes.safetensors").write_text("not a tensor file")
    _one_line_error(base, tmp_path / "notes.safetensors", "not a readable safetensors file")

    # Diffusers keys for a block the model lacks, and for a layer of another width.
    save_file({"transformer.transformer_blocks.7.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.transformer_blocks.7.attn.to_q.lora_B.weight": torch.zeros(64, 4)},
              str(tmp_path / "deeper.safetensors"))
    _one_line_error(base, tmp_path / "deeper.safetensors", "names no linear layer of this transformer")
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)},
              str(tmp_path / "wider.safetensors"))
    _one_line_error(base, tmp_path / "wider.safetensors", r"shape \[4, 3072\], which does not fit")

    # A text-encoder part cannot be merged into the transformer, so the file is refused whole.
    save_file({"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 64),
               "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(64, 4),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32),
               "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(32, 4)},
              str(tmp_path / "with_te.safetensors"))
    _one_line_error(base, tmp_path / "with_te.safetensors", "also adapts the text encoder")

    # kohya keys that diffusers' converter does not know.
    save_file({"lora_unet_nowhere.lora_down.weight": torch.zeros(4, 8),
               "lora_unet_nowhere.lora_up.weight": torch.zeros(8, 4)}, str(tmp_path / "odd.safetensors"))
    _one_line_error(base, tmp_path / "odd.safetensors", "not a FLUX LoRA that diffusers can read")


def test_psr_files_keep_psr_settings_through_load_weights(base, tmp_path):
    """psr's own file goes through load_lora (its metadata), not diffusers' guesses."""
    from safetensors import safe_open

    from psr.core.lora import save_lora

    tuned = _random_lora(base, alpha=8.0)
    path = save_lora(tuned, tmp_path / "own.safetensors")
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["psr_lora"])["version"] == 2
    merged = copy.deepcopy(base)
    assert load_weights(merged, str(path)) == "LoRA own.safetensors merged"
    layer = "single_transformer_blocks.1.proj_out"
    assert torch.allclose(merged.get_submodule(layer).weight, _delta(tuned, layer), atol=1e-6)
