"""Cached references (`model.reference_mode = "cached"`): the attention pattern, timestep 0 for
references, keys and values reused across steps, gradients, and bfloat16 autocast on the CPU."""

import contextlib
import copy
import dataclasses

import numpy as np
import pytest
import torch

from psr.core import refstream
from psr.core.attention import AttentionCapture, TokenLayout
from psr.core.lora import add_lora, lora_token_mask
from psr.core.model import MultiRefFlux
from psr.core.positions import grid_ids, reference_ids
from psr.core.refstream import attention_mask, cached_references
from psr.core.schema import ModelConfig, resolve_model
from psr.errors import RecipeError, UserError

PROMPT = "a red star creature above a blue moon creature"


@pytest.fixture(scope="module")
def cached(tiny_components):
    """The tiny model in cached mode, on its own copy (cached mode swaps the processors)."""
    return MultiRefFlux(copy.deepcopy(tiny_components), reference_size=32, max_sequence_length=32,
                        reference_mode="cached")


@pytest.fixture(scope="module")
def plain_cached(tiny_components):
    """Cached mode on a transformer without a guidance embedding (text CFG with an empty
    prompt, like `embedded`)."""
    from psr.core.tiny import flux_transformer

    torch.manual_seed(1)
    transformer = flux_transformer(4, 2, 2, 16, 4, 32, (4, 6, 6), guidance_embeds=False).eval()
    components = dataclasses.replace(copy.deepcopy(tiny_components), transformer=transformer)
    return MultiRefFlux(components, reference_size=32, max_sequence_length=32, reference_mode="cached")


def _inputs(model, rgb_image, refs=2, seed=0):
    grid = (8, 8)
    text = model.encode_prompt([PROMPT])
    references = model.encode_references([rgb_image(32, 32, seed=seed + k) for k in range(refs)], grid)
    return model.noise([3], 64, 64), text, references, grid


def _joint_masked(model, latents, timestep, text, refs, grid, guidance):
    """diffusers' own forward on `[text | target | refs]` with the documented mask as an
    explicit attention mask: cached mode's meaning when every token has the same timestep."""
    layout = TokenLayout.for_velocity(text.embeds.shape[1], grid, refs.grids)
    out = model.transformer(
        hidden_states=torch.cat([latents, refs.tokens], dim=1), timestep=timestep, guidance=guidance,
        pooled_projections=text.pooled, encoder_hidden_states=text.embeds, txt_ids=text.ids,
        img_ids=torch.cat([grid_ids(*grid), refs.ids]),
        joint_attention_kwargs={"attention_mask": attention_mask(layout)[None, None]}, return_dict=False)[0]
    return out[:, :latents.shape[1]]


# ---------------------------------------------------------------------------- the mask
def test_the_mask_lets_a_reference_see_only_itself():
    layout = TokenLayout(text_len=3, target_len=4, ref_lens=(2, 5))
    mask = attention_mask(layout)
    text, target, ref1, ref2 = slice(0, 3), slice(3, 7), slice(7, 9), slice(9, 14)
    assert mask.shape == (14, 14) and mask.dtype == torch.bool
    assert mask[text].all() and mask[target].all()  # text and target read everything
    for own, other in ((ref1, ref2), (ref2, ref1)):
        assert mask[own, own].all()
        assert not mask[own, other].any()  # reference i → reference j blocked
        assert not mask[own, target].any()  # reference → target blocked
        assert not mask[own, text].any()  # reference → text blocked
    assert mask.sum() == 7 * 14 + 2 * 2 + 5 * 5


@torch.no_grad()
def test_velocity_is_diffusers_forward_under_the_mask_at_timestep_zero(cached, rgb_image):
    latents, text, refs, grid = _inputs(cached, rgb_image)
    g = torch.tensor([3.5])
    zero = torch.zeros(1)
    expected = _joint_masked(cached, latents, zero, text, refs, grid, g)
    recomputed = cached.velocity(latents, zero, text, refs, grid, g)
    reused = cached.velocity(latents, zero, text, refs, grid, g, cached.reference_kv(refs, text, g))
    torch.testing.assert_close(recomputed, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reused, expected, rtol=1e-5, atol=1e-5)
    # At t > 0 the references keep timestep 0, so the single-timestep masked forward differs.
    t = torch.tensor([0.6])
    assert (cached.velocity(latents, t, text, refs, grid, g)
            - _joint_masked(cached, latents, t, text, refs, grid, g)).abs().max() > 1e-4
    # And cached mode is not joint mode.
    joint = copy.copy(cached)
    joint.reference_mode = "joint"
    assert (joint.velocity(latents, zero, text, refs, grid, g) - expected).abs().max() > 1e-4


@torch.no_grad()
def test_reference_keys_are_modulated_at_timestep_zero(cached, rgb_image):
    from diffusers.models.embeddings import apply_rotary_emb

    _, text, refs, _ = _inputs(cached, rgb_image, refs=1)
    g = torch.tensor([3.5])
    tr = cached.transformer
    block = tr.transformer_blocks[0]

    def keys(t):
        temb = tr.time_text_embed(torch.tensor([t]) * 1000, g * 1000, text.pooled)
        x, *_ = block.norm1(tr.x_embedder(refs.tokens), emb=temb)
        k = block.attn.norm_k(block.attn.to_k(x).unflatten(-1, (-1, block.attn.head_dim)))
        return apply_rotary_emb(k, tr.pos_embed(refs.ids), sequence_dim=1)

    got, _ = cached.reference_kv(refs, text, g).blocks["transformer_blocks.0"]
    torch.testing.assert_close(got, keys(0.0), rtol=1e-5, atol=1e-6)
    assert (got - keys(0.5)).abs().max() > 1e-3


@torch.no_grad()
def test_a_references_keys_depend_on_itself_only(cached, rgb_image):
    _, text, refs, _ = _inputs(cached, rgb_image)
    _, _, other_second, _ = _inputs(cached, rgb_image, seed=10)
    swapped = dataclasses.replace(refs, tokens=torch.cat([refs.tokens[:, :16], other_second.tokens[:, 16:]], dim=1))
    g = torch.tensor([3.5])
    # Other per-token prompt embeddings (same pooled one): the text is not read either.
    other_text = dataclasses.replace(text, embeds=torch.randn_like(text.embeds))
    a = cached.reference_kv(refs, text, g)
    b = cached.reference_kv(swapped, other_text, g)
    for block, (key, value) in a.blocks.items():
        assert torch.equal(key[:, :16], b.blocks[block][0][:, :16]) and torch.equal(value[:, :16],
                                                                                     b.blocks[block][1][:, :16])
        assert not torch.equal(key[:, 16:], b.blocks[block][0][:, 16:])


# ---------------------------------------------------------------------------- generation
@pytest.mark.parametrize("which, guidance, image_guidance, branches", [
    ("cached", 3.5, 2.0, 1),  # guidance embedding; image CFG adds a branch without references
    ("plain_cached", 3.0, 2.0, 2),  # text CFG: the prompt's and the empty prompt's reference sets
])
def test_reused_and_recomputed_references_give_the_same_images(request, rgb_image, monkeypatch, which, guidance,
                                                               image_guidance, branches):
    model = request.getfixturevalue(which)
    refs = [rgb_image(32, 32, seed=k) for k in range(2)]
    calls = []
    real = refstream.reference_kv
    monkeypatch.setattr(refstream, "reference_kv", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr("psr.core.model.reference_kv", refstream.reference_kv)
    kwargs = dict(height=64, width=64, steps=4, guidance=guidance, image_guidance=image_guidance, seeds=[5, 6])
    reused = model.generate(PROMPT, refs, output_type="np", **kwargs)
    assert len(calls) == branches  # once per branch with references, not per step
    recomputed = model.generate(PROMPT, refs, output_type="np", reuse_references=False, **kwargs)
    assert len(calls) == branches + 4 * branches
    assert reused.std() > 0.05 and not np.array_equal(reused[0], reused[1])
    np.testing.assert_allclose(reused, recomputed, rtol=0, atol=1e-5)
    pil = [model.generate(PROMPT, refs, reuse_references=r, **kwargs) for r in (True, False)]
    for x, y in zip(*pil):
        assert np.abs(np.asarray(x, np.int16) - np.asarray(y, np.int16)).max() <= 1


@torch.no_grad()
def test_without_references_cached_mode_is_joint_mode(cached, tiny_model):
    kwargs = dict(height=64, width=48, steps=3, guidance=3.5, seeds=[7], output_type="np")
    assert np.array_equal(cached.generate(PROMPT, [], **kwargs), tiny_model.generate(PROMPT, [], **kwargs))


@torch.no_grad()
def test_joint_forwards_are_unchanged_on_a_transformer_that_ran_cached(tiny_components, rgb_image):
    model = MultiRefFlux(copy.deepcopy(tiny_components), reference_size=32, max_sequence_length=32)
    latents, text, refs, grid = _inputs(model, rgb_image)
    t, g = torch.tensor([0.4]), torch.tensor([3.5])
    before = model.velocity(latents, t, text, refs, grid, g)
    model.reference_kv(refs, text, g)  # installs the processors and hooks
    assert isinstance(model.transformer.transformer_blocks[0].attn.processor, refstream.ReferenceKVProcessor)
    assert torch.equal(model.velocity(latents, t, text, refs, grid, g), before)


# ---------------------------------------------------------------------------- training
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("reference_only_lora", [False, True])
def test_gradients_equal_the_masked_forward_at_timestep_zero(tiny_components, checkpointing, reference_only_lora):
    transformer = copy.deepcopy(tiny_components.transformer).train()
    if reference_only_lora:  # adapted in the reference streams only
        add_lora(transformer, rank=2, targets=("attn", "ff"), reference_only=True)
        with torch.no_grad():
            for name, param in transformer.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    if checkpointing:
        transformer.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(1)
    grid, ref_grids = (4, 4), [(2, 2), (3, 2)]
    layout = TokenLayout(5, 16, (4, 6))
    inputs = dict(hidden_states=torch.randn(2, 26, 16, generator=g), encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                  pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.zeros(2),
                  guidance=torch.tensor([1.0, 2.0]), txt_ids=torch.zeros(5, 3), return_dict=False,
                  img_ids=torch.cat([grid_ids(*grid), *reference_ids(grid, ref_grids, "frame")]))
    weights = torch.randn(2, 16, 16, generator=g)
    params = [p for p in transformer.parameters() if p.requires_grad]

    def grads(context, **extra):
        with lora_token_mask(transformer, layout.reference_mask()), context:
            out = transformer(**inputs, **extra)[0][:, :16]
            (out * weights).sum().backward()
        result = [p.grad.clone() for p in params]
        transformer.zero_grad()
        return out.detach(), result

    mask = attention_mask(layout)[None, None]
    expected_out, expected = grads(contextlib.nullcontext(), joint_attention_kwargs={"attention_mask": mask})
    out, got = grads(cached_references(transformer, layout))
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-5)
    assert sum(bool(e.abs().max() > 0) for e in expected) > len(params) // 2
    for e, x in zip(expected, got):
        torch.testing.assert_close(x, e, rtol=1e-4, atol=1e-6)


def test_attention_capture_is_refused_in_cached_mode(cached, rgb_image):
    _, text, refs, grid = _inputs(cached, rgb_image)
    layout = TokenLayout.for_velocity(text.embeds.shape[1], grid, refs.grids)
    with pytest.raises(ValueError, match="ReferenceKVProcessor"):
        with AttentionCapture(cached.transformer, ["double"], layout, ["target_to_refs"]):
            pass


# ---------------------------------------------------------------------------- recipes
def test_reference_mode_is_checked_and_hashed_only_when_not_the_default():
    from psr.cli.recipes import load_recipe
    from psr.train.config import training_hash

    with pytest.raises(RecipeError, match=r"^reference_mode: must be one of 'joint', 'cached', got 'kv'$"):
        ModelConfig(reference_mode="kv")
    with pytest.raises(UserError, match="^reference_mode 'kv': must be one of 'joint', 'cached'$"):
        MultiRefFlux(None, reference_mode="kv")
    base = ["model.preset='tiny'"]
    default = training_hash(load_recipe("pretrain", overrides=base))
    assert training_hash(load_recipe("pretrain", overrides=[*base, "model.reference_mode='joint'"])) == default
    assert training_hash(load_recipe("pretrain", overrides=[*base, "model.reference_mode='cached'"])) != default
    with pytest.raises(RecipeError, match="^regularizers: attention regularizers read"):
        load_recipe("pretrain", overrides=[*base, "model.reference_mode='cached'", "regularizers=[{name='idar'}]"])


def test_eval_stamp_leaves_out_the_default_reference_mode():
    from psr.cli.recipes import load_recipe
    from psr.workflows.eval import _generator_hash

    recipe = load_recipe("eval")
    cached = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, reference_mode="cached"))
    before = dataclasses.asdict(recipe.model)
    assert "reference_mode" in before
    assert _generator_hash(cached, "generate") != _generator_hash(recipe, "generate")
    assert _generator_hash(cached, "reconstruct") == _generator_hash(recipe, "reconstruct")


# ---------------------------------------------------------------------------- bfloat16 on the CPU
# Tolerance for the tiny preset (random init, 4 steps): bfloat16 keeps 8 mantissa bits, so a
# single forward is off by ~2⁻⁸ relative; after 4 steps and the float32 VAE the pixels differ by
# a few grey levels.
BF16_MAX_PIXEL_DIFF = 0.04  # in [0, 1]
BF16_MIN_PSNR = 35.0  # dB


def _tiny(dtype, mode="joint"):
    config = resolve_model(ModelConfig(preset="tiny", device="cpu", dtype=dtype, max_sequence_length=32,
                                       reference_size=32, reference_mode=mode))
    return MultiRefFlux.from_config(config)


@pytest.mark.parametrize("mode", ["joint", "cached"])
def test_bfloat16_generates_on_the_cpu_close_to_float32(rgb_image, monkeypatch, mode):
    monkeypatch.setattr("psr.core.model.cpu_has_bfloat16", lambda: True)
    refs = [rgb_image(32, 32, seed=k) for k in range(2)]
    kwargs = dict(height=64, width=64, steps=4, guidance=3.5, seeds=[1], output_type="np")
    fp32 = _tiny("float32", mode)
    bf16 = _tiny("bfloat16", mode)
    assert fp32.autocast_dtype is None and bf16.autocast_dtype is torch.bfloat16
    assert bf16.transformer.dtype == torch.float32 and not bf16.notes  # float32 weights, bfloat16 autocast
    seen = []
    hook = bf16.transformer.proj_out.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    b = bf16.generate(PROMPT, refs, **kwargs)
    hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    a = fp32.generate(PROMPT, refs, **kwargs)
    diff = np.abs(a - b)
    psnr = 10 * np.log10(1.0 / float((diff ** 2).mean()))
    assert 0 < diff.max() <= BF16_MAX_PIXEL_DIFF and psnr >= BF16_MIN_PSNR, (diff.max(), psnr)


def test_bfloat16_without_cpu_support_runs_float32_with_a_note(monkeypatch):
    monkeypatch.setattr("psr.core.model.cpu_has_bfloat16", lambda: False)
    model = _tiny("bfloat16")
    assert model.autocast_dtype is None and model.transformer.dtype == torch.float32
    assert model.notes == ["model.dtype bfloat16: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX); "
                           "running float32"]
    kwargs = dict(height=32, width=32, steps=2, guidance=3.5, seeds=[0], output_type="np")
    assert np.array_equal(model.generate(PROMPT, [], **kwargs), _tiny("float32").generate(PROMPT, [], **kwargs))
