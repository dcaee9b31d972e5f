"""`sample.guidance` always acts: a guidance embedding, or classifier-free guidance (CFG) over
the prompt and the references (InstructPix2Pix's two scales); scale 1 is exactly no CFG."""

import dataclasses
from pathlib import Path

import pytest
import torch

from psr.core.model import Guidance, MultiRefFlux
from psr.core.sampler import euler_sample, flux_schedule
from psr.errors import RecipeError

GSPO_TOY = str(Path(__file__).resolve().parent.parent / "recipes" / "gspo-toy.toml")


@pytest.fixture(scope="module")
def plain_model(tiny_components):
    """The tiny model with a transformer that has no guidance embedding (like `embedded`)."""
    from psr.core.tiny import flux_transformer

    torch.manual_seed(1)
    transformer = flux_transformer(4, 2, 2, 16, 4, 32, (4, 6, 6), guidance_embeds=False).eval()
    components = dataclasses.replace(tiny_components, transformer=transformer)
    return MultiRefFlux(components, reference_size=64, max_sequence_length=32)


def _inputs(model, rgb_image, refs=2):
    grid = (8, 8)
    text = model.encode_prompt(["a red star creature above a blue moon creature"])
    references = model.encode_references([rgb_image(seed=k) for k in range(refs)], grid)
    latents = model.noise([3], 64, 64)
    timestep = torch.tensor([0.7])
    return latents, timestep, text, references, grid


@torch.no_grad()
def test_scales_of_one_are_exactly_the_plain_velocity(plain_model, rgb_image):
    latents, t, text, refs, grid = _inputs(plain_model, rgb_image)
    plain = plain_model.velocity(latents, t, text, refs, grid)
    guided = plain_model.guided_velocity(latents, t, text, refs, grid, Guidance(text=1.0, image=1.0),
                                         plain_model.null_prompt(1))
    assert torch.equal(guided, plain)
    assert Guidance(text=1.0, image=1.0).branches == 1


@torch.no_grad()
def test_two_scale_cfg_matches_the_instructpix2pix_formula(plain_model, rgb_image):
    latents, t, text, refs, grid = _inputs(plain_model, rgb_image)
    null = plain_model.null_prompt(1)
    none = plain_model.no_references()
    v_tr = plain_model.velocity(latents, t, text, refs, grid)
    v_r = plain_model.velocity(latents, t, null, refs, grid)
    v_0 = plain_model.velocity(latents, t, null, none, grid)
    assert not torch.allclose(v_tr, v_r) and not torch.allclose(v_r, v_0)
    for s_text, s_image in [(3.0, 1.0), (1.0, 2.0), (2.5, 1.5), (0.0, 0.0)]:
        guided = plain_model.guided_velocity(latents, t, text, refs, grid, Guidance(text=s_text, image=s_image), null)
        expected = v_0 + s_image * (v_r - v_0) + s_text * (v_tr - v_r)
        torch.testing.assert_close(guided, expected, rtol=1e-5, atol=1e-5)
    # no references: plain text CFG, whatever the image scale
    no_refs = plain_model.guided_velocity(latents, t, text, none, grid, Guidance(text=2.0, image=3.0), null)
    v_t = plain_model.velocity(latents, t, text, none, grid)
    torch.testing.assert_close(no_refs, v_0 + 2.0 * (v_t - v_0), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_a_guidance_distilled_model_keeps_its_embedding_and_guides_only_the_references(tiny_model, rgb_image):
    latents, t, text, refs, grid = _inputs(tiny_model, rgb_image)
    how = Guidance.for_model(tiny_model.transformer, 3.5, image_guidance=2.0)
    assert how == Guidance(embedded=3.5, text=1.0, image=2.0) and how.branches == 2
    g = torch.full((1,), 3.5)
    with_refs = tiny_model.velocity(latents, t, text, refs, grid, g)
    without = tiny_model.velocity(latents, t, text, tiny_model.no_references(), grid, g)
    guided = tiny_model.guided_velocity(latents, t, text, refs, grid, how)
    torch.testing.assert_close(guided, without + 2.0 * (with_refs - without), rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_generate_with_scale_one_equals_the_unguided_sampler(plain_model, rgb_image):
    refs_pil = [rgb_image(seed=0), rgb_image(seed=1)]
    prompt = "a red star creature"
    image = plain_model.generate(prompt, refs_pil, height=64, width=64, steps=3, guidance=1.0, seeds=[5])[0]
    grid = (8, 8)
    text = plain_model.encode_prompt([prompt])
    refs = plain_model.encode_references(refs_pil, grid)
    schedule = flux_schedule(plain_model.components.scheduler.config, 3, 64)
    latents = euler_sample(lambda x, t: plain_model.velocity(x, t, text, refs, grid), plain_model.noise([5], 64, 64),
                           schedule)
    from psr.core import images as imgs

    manual = imgs.to_pil(plain_model.decode(latents, 64, 64))[0]
    assert image.tobytes() == manual.tobytes()


@torch.no_grad()
def test_guidance_is_never_ignored(plain_model, tiny_model, rgb_image):
    """Every guidance value changes the pixels: CFG without an embedding, the embedding with one."""
    refs = [rgb_image(seed=0)]
    for model in (plain_model, tiny_model):
        one, three = (model.generate("a star", refs, height=64, width=64, steps=2, guidance=g, seeds=[0])[0]
                      for g in (1.0, 3.0))
        assert one.tobytes() != three.tobytes()
    base, image_cfg = (plain_model.generate("a star", refs, height=64, width=64, steps=2, guidance=1.0, seeds=[0],
                                            image_guidance=s)[0] for s in (1.0, 2.0))
    assert base.tobytes() != image_cfg.tobytes()


def test_text_cfg_without_the_empty_prompt_is_a_programming_error(plain_model, rgb_image):
    latents, t, text, refs, grid = _inputs(plain_model, rgb_image)
    with pytest.raises(ValueError, match="null_prompt"):
        plain_model.guided_velocity(latents, t, text, refs, grid, Guidance(text=2.0))


@pytest.mark.parametrize("key,value,message", [
    ("sample.guidance", "inf", "finite"),
    ("sample.image_guidance", "-1.0", "image_guidance"),
    ("sample.image_guidance", "nan", "image_guidance"),
])
def test_bad_guidance_values_are_refused(key, value, message):
    from psr.cli.recipes import load_recipe

    with pytest.raises(RecipeError, match=message):
        load_recipe("generate", overrides=[f"{key}={value}"])


@pytest.mark.parametrize("preset,overrides,expected", [
    ("embedded", [], 4.0),  # the sweep's best for the shipped weights (docs/embedded.md)
    ("embedded", ["sample.image_guidance=1.0"], 1.0),  # an explicit value wins, 1 included
    ("tiny", [], 1.0),
    ("flux-kontext", [], 1.0),
])
def test_image_guidance_left_out_takes_the_presets(preset, overrides, expected):
    from psr.cli.recipes import load_recipe
    from psr.core.schema import resolve_generate

    recipe = load_recipe("generate", overrides=[f'model.preset="{preset}"', 'model.path="x"', *overrides])
    assert resolve_generate(recipe).sample.image_guidance == expected


def test_rl_refuses_guidance_it_would_not_apply():
    """RL rollouts sample the unguided policy: a CFG scale there would be silently ignored."""
    from psr.cli.recipes import load_recipe
    from psr.rl.config import resolve_rl

    recipe = load_recipe("rl", GSPO_TOY, ["rollout.guidance=3.5"])
    with pytest.raises(RecipeError, match="rollout.guidance: 3.5: preset 'embedded' has no guidance embedding"):
        resolve_rl(recipe)
    default = load_recipe("rl", GSPO_TOY, ["rollout.guidance=1.0"])
    assert resolve_rl(dataclasses.replace(default, rollout=dataclasses.replace(default.rollout, guidance=None))
                      ).rollout.guidance == 1.0
