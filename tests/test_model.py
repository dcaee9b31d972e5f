"""The core model against diffusers' own pipelines, and the in-context reference sequence."""

import dataclasses
import json

import numpy as np
import pytest
import torch

from psr.core.model import MultiRefFlux
from psr.core.sampler import flux_schedule
from psr.errors import UserError


def _pixels(image):
    return np.asarray(image).astype(np.int16)


def test_no_references_equals_flux_pipeline(tiny_model, tiny_components):
    from diffusers import FluxPipeline

    ours = tiny_model.generate("a red striped star creature", [], height=64, width=48, steps=4,
                               guidance=3.5, seeds=[7])[0]
    pipe = FluxPipeline(**tiny_components.as_dict())
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a red striped star creature", height=64, width=48, num_inference_steps=4, guidance_scale=3.5,
                  generator=torch.Generator().manual_seed(7), max_sequence_length=32).images[0]
    assert ours.size == theirs.size == (48, 64)
    assert np.abs(_pixels(ours) - _pixels(theirs)).max() <= 1  # float tolerance: at most one grey level


def test_one_reference_frame_scheme_equals_kontext_pipeline(tiny_model, tiny_components, rgb_image):
    from diffusers import FluxKontextPipeline

    reference = rgb_image(64, 64, seed=3)
    ours = tiny_model.generate("put it on grass", [reference], height=64, width=64, steps=3,
                               guidance=2.5, seeds=[11])[0]
    pipe = FluxKontextPipeline(**tiny_components.as_dict())
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(image=reference, prompt="put it on grass", height=64, width=64, num_inference_steps=3,
                  guidance_scale=2.5, generator=torch.Generator().manual_seed(11), max_sequence_length=32,
                  _auto_resize=False, max_area=64 * 64).images[0]
    assert np.abs(_pixels(ours) - _pixels(theirs)).max() <= 1


def test_np_output_equals_flux_pipeline_np_output(tiny_model, tiny_components):
    from diffusers import FluxPipeline

    ours = tiny_model.generate("a red striped star creature", [], height=64, width=48, steps=4,
                               guidance=3.5, seeds=[7, 8], output_type="np")
    pipe = FluxPipeline(**tiny_components.as_dict())
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe("a red striped star creature", height=64, width=48, num_inference_steps=4, guidance_scale=3.5,
                  num_images_per_prompt=2, generator=[torch.Generator().manual_seed(s) for s in (7, 8)],
                  max_sequence_length=32, output_type="np").images
    assert isinstance(ours, np.ndarray) and ours.dtype == theirs.dtype == np.float32
    assert ours.shape == theirs.shape == (2, 64, 48, 3)
    assert ours.std() > 0.05  # a real image, not a constant both sides could agree on
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_output_types_agree(tiny_model):
    from PIL import Image

    kwargs = dict(height=32, width=48, steps=2, guidance=3.5, seeds=[3, 4])
    pil = tiny_model.generate("x", [], **kwargs)
    arr = tiny_model.generate("x", [], **kwargs, output_type="np")
    pt = tiny_model.generate("x", [], **kwargs, output_type="pt")
    assert len(pil) == 2 and all(isinstance(im, Image.Image) and im.size == (48, 32) for im in pil)
    assert arr.shape == (2, 32, 48, 3) and arr.dtype == np.float32
    assert isinstance(pt, torch.Tensor) and pt.shape == (2, 3, 32, 48) and pt.dtype == torch.float32
    assert 0 <= arr.min() < arr.max() <= 1
    # One float result in three layouts: the same numbers, and PIL rounds them to 8 bits.
    assert np.array_equal(arr, pt.permute(0, 2, 3, 1).cpu().numpy())
    for image, a in zip(pil, arr):
        assert np.array_equal(np.asarray(image), (a * 255).round().astype(np.uint8))
    assert not np.array_equal(arr[0], arr[1])  # one image per seed, in seed order


def test_unknown_output_type_is_one_line_before_any_work(tiny_model, monkeypatch):
    from psr.errors import UserError

    monkeypatch.setattr(tiny_model, "encode_prompt", lambda *a: pytest.fail("work started"))
    with pytest.raises(UserError) as err:
        tiny_model.generate("x", [], height=32, width=32, steps=1, guidance=1.0, seeds=[0], output_type="latent")
    assert str(err.value) == "output_type 'latent': must be one of 'pil', 'np', 'pt'"


class _Stop(Exception):
    pass


def _kontext_pipeline_input(components, image) -> torch.Tensor:
    """The pixels FluxKontextPipeline's default preprocessing (auto-resize on) makes of
    `image`: the pipeline runs until it hands them to `prepare_latents`."""
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline(**components.as_dict())
    seen = {}

    def capture(image, *args, **kwargs):
        seen["image"] = image
        raise _Stop

    pipe.prepare_latents = capture
    with pytest.raises(_Stop):
        pipe(image=image, prompt="x", height=64, width=64, num_inference_steps=1, max_sequence_length=32)
    return seen["image"]


@pytest.mark.parametrize("size", [(96, 96), (150, 100), (75, 37), (37, 75)])
def test_kontext_rule_equals_kontext_pipeline_auto_resize(tiny_components, rgb_image, size):
    from psr.core.images import to_tensor

    image = rgb_image(*size, seed=sum(size))
    model = MultiRefFlux(tiny_components, reference_size=64, max_sequence_length=32, reference_resize="kontext")
    ours = to_tensor(model.prepare_reference(image))
    theirs = _kontext_pipeline_input(tiny_components, image)
    # (75, 37) and (37, 75) pick another resolution from their floored 72 x 32 than from
    # their own ratio, so they check that the ratio is measured as the pipeline measures it.
    assert ours.shape == theirs.shape
    assert 0.9e6 <= ours.shape[2] * ours.shape[3] <= 1.1e6  # about 1 MP, whatever the input size
    assert torch.equal(ours, theirs)  # same size, same Lanczos resize, same conversion
    longest = MultiRefFlux(tiny_components, reference_size=64, max_sequence_length=32)
    assert max(longest.prepare_reference(image).size) == 64  # the other rule is still there


def test_unknown_reference_resize_rule_is_refused(tiny_components):
    from psr.errors import UserError

    with pytest.raises(UserError, match=r"^reference_resize 'nearest': must be one of 'kontext', 'longest'$"):
        MultiRefFlux(tiny_components, reference_resize="nearest")


def test_schedule_matches_scheduler_with_dynamic_shift(tiny_components):
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(tiny_components.scheduler.config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=calculate_shift(1024))
    schedule = flux_schedule(tiny_components.scheduler.config, 6, 1024)
    assert torch.allclose(schedule.sigmas, scheduler.sigmas.float())
    assert schedule.sigmas[-1] == 0 and schedule.sigmas[0] == 1
    shorter = flux_schedule(tiny_components.scheduler.config, 6, 64)
    assert torch.all(shorter.sigmas[1:-1] < schedule.sigmas[1:-1])  # fewer tokens, less shift


@pytest.mark.parametrize("scheme", ["frame", "diagonal"])
def test_any_number_of_mixed_size_references(tiny_components, rgb_image, scheme):
    model = MultiRefFlux(tiny_components, position_scheme=scheme, reference_size=32, max_sequence_length=16)
    sizes = [(64, 64), (90, 30), (20, 60), (33, 33), (64, 16), (16, 64), (50, 70), (70, 50)]
    refs = [rgb_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    grid = (4, 4)
    encoded = model.encode_references(refs, grid)
    # (rows, cols) after the resize rule: longer side 32 px = 4 tokens of 8 px
    assert encoded.grids == [(4, 4), (1, 4), (4, 1), (4, 4), (1, 4), (4, 1), (4, 3), (3, 4)]
    assert encoded.tokens.shape == (1, sum(h * w for h, w in encoded.grids), 16)
    assert encoded.ids.shape == (encoded.tokens.shape[1], 3)
    for n in (0, 1, 2, 8):
        out = model.generate("x", refs[:n], height=32, width=32, steps=1, guidance=1.0, seeds=[0])
        assert out[0].size == (32, 32)


def test_velocity_is_read_from_target_tokens_and_depends_on_references(tiny_model, rgb_image):
    grid = (8, 8)
    text = tiny_model.encode_prompt(["x", "x"])
    latents = tiny_model.noise([0, 1], 64, 64)
    t = torch.full((2,), 0.5)
    g = torch.full((2,), 3.5)
    none = tiny_model.encode_references([], grid)
    one = tiny_model.encode_references([rgb_image(seed=1)], grid)
    other = tiny_model.encode_references([rgb_image(seed=2)], grid)
    with torch.no_grad():
        v0 = tiny_model.velocity(latents, t, text, none, grid, g)
        v1 = tiny_model.velocity(latents, t, text, one, grid, g)
        v2 = tiny_model.velocity(latents, t, text, other, grid, g)
    assert v0.shape == v1.shape == latents.shape
    assert not torch.allclose(v1, v2)  # the references reach the target tokens
    assert not torch.allclose(v0, v1)


def test_same_seed_same_pixels_and_seed_per_image(tiny_model):
    a = tiny_model.generate("x", [], height=32, width=32, steps=2, guidance=3.5, seeds=[5, 6])
    b = tiny_model.generate("x", [], height=32, width=32, steps=2, guidance=3.5, seeds=[6])
    assert np.array_equal(np.asarray(a[1]), np.asarray(b[0]))  # image k is reproducible alone
    assert not np.array_equal(np.asarray(a[0]), np.asarray(a[1]))


def test_saved_tiny_model_loads_back_as_flux_dev_local_path(tiny_components, tmp_path):
    from psr.cli.recipes import load_recipe
    from psr.core.components import save_components
    from psr.core.schema import resolve_generate, resolve_model

    save_components(tiny_components, tmp_path / "flux")
    recipe = resolve_generate(load_recipe("generate", overrides=[
        "model.preset=flux-dev", f"model.path={str(tmp_path / 'flux')!r}", "model.dtype=float32",
        "model.device=cpu", "model.max_sequence_length=32"]))
    loaded = MultiRefFlux.from_config(dataclasses.replace(recipe.model, reference_size=64))
    original = MultiRefFlux(tiny_components, reference_size=64, max_sequence_length=32)
    kwargs = dict(height=32, width=32, steps=2, guidance=3.5, seeds=[1])
    assert np.array_equal(np.asarray(loaded.generate("hello", [], **kwargs)[0]),
                          np.asarray(original.generate("hello", [], **kwargs)[0]))
    for name, p in tiny_components.transformer.state_dict().items():
        assert torch.equal(p, loaded.transformer.state_dict()[name]), name
    assert loaded.reference_resize == "longest"
    # The same folder under flux-kontext resizes references as Kontext's pipeline does,
    # unless the recipe names the rule.
    as_kontext = dataclasses.replace(recipe.model, preset="flux-kontext", reference_size=None, reference_resize=None)
    assert MultiRefFlux.from_config(resolve_model(as_kontext)).reference_resize == "kontext"
    as_longest = dataclasses.replace(as_kontext, reference_size=64, reference_resize="longest")
    assert MultiRefFlux.from_config(resolve_model(as_longest)).reference_resize == "longest"

    # Saving what was loaded from a folder does not write that folder's path into the copy.
    save_components(loaded.components, tmp_path / "copy")
    assert "_name_or_path" in json.dumps(dict(loaded.transformer.config))
    for config in (tmp_path / "copy").glob("*/config.json"):
        assert "_name_or_path" not in json.loads(config.read_text()), config


def test_pretrained_presets_need_a_path_and_a_flux_folder(tmp_path):
    from psr.cli.recipes import load_recipe
    from psr.errors import UserError

    for overrides, message in [
        (["model.preset=flux-kontext"], "needs a local directory or a hub id"),
        (["model.preset=flux-dev", f"model.path={str(tmp_path)!r}"], "not a FLUX folder"),
    ]:
        with pytest.raises(UserError, match=message):
            MultiRefFlux.from_config(load_recipe("generate", overrides=overrides).model)


def test_cpu_offload_gives_the_same_pixels(tiny_components):
    on = MultiRefFlux(tiny_components, max_sequence_length=16, cpu_offload=True)
    off = MultiRefFlux(tiny_components, max_sequence_length=16)
    kwargs = dict(height=32, width=32, steps=2, guidance=3.5, seeds=[2])
    assert np.array_equal(np.asarray(on.generate("x", [], **kwargs)[0]), np.asarray(off.generate("x", [], **kwargs)[0]))


def test_layout_scheme_comes_from_the_card_and_places_references_by_the_prompt(tiny_components, rgb_image,
                                                                               tmp_path):
    from psr.cli.recipes import load_recipe
    from psr.core.components import save_components
    from psr.core.positions import reference_ids
    from psr.core.schema import resolve_model

    folder = tmp_path / "flux"
    save_components(tiny_components, folder)
    table = {"2": [[0.3, 0.5, 0.5], [0.7, 0.5, 0.5]], "2:left of": [[0.25, 0.5, 0.5], [0.75, 0.5, 0.5]],
             "2:above": [[0.5, 0.25, 0.5], [0.5, 0.75, 0.5]]}
    base = load_recipe("generate", overrides=[
        "model.preset=flux-dev", f"model.path={str(folder)!r}", "model.dtype=float32", "model.device=cpu",
        "model.max_sequence_length=32", "model.reference_size=32"]).model
    assert resolve_model(base).position_scheme == "frame"  # no card: Kontext's ids
    (folder / "psr_model.json").write_text(json.dumps({"trained": True, "position_scheme": "layout"}))
    assert resolve_model(base).position_scheme == "layout"  # the weights' own scheme
    with pytest.raises(UserError, match="needs the model's reference layout table"):
        MultiRefFlux.from_config(resolve_model(base))
    (folder / "psr_model.json").write_text(json.dumps({"trained": True, "position_scheme": "layout",
                                                        "reference_layout": table}))
    model = MultiRefFlux.from_config(resolve_model(base))
    refs = [rgb_image(seed=1), rgb_image(seed=2)]
    encoded = model.encode_references(refs, (4, 4), "a cat left of a dog")
    expected = reference_ids((4, 4), [(4, 4), (4, 4)], "layout", boxes=[(0.25, 0.5, 0.5), (0.75, 0.5, 0.5)])
    assert torch.equal(encoded.ids, torch.cat(expected))
    kwargs = dict(height=32, width=32, steps=2, guidance=3.5, seeds=[0])
    left, above = (np.asarray(model.generate(p, refs, **kwargs)[0]) for p in ("a left of b", "a above b"))
    assert not np.array_equal(left, above)  # where the references sit is read from the prompt
    assert np.array_equal(left, np.asarray(model.generate("a left of b", refs, **kwargs)[0]))
    with pytest.raises(UserError, match="covers 2 reference\\(s\\), not 3"):
        model.generate("x", refs + refs[:1], **kwargs)
    # A recipe that names a scheme keeps it, whatever the card says.
    assert resolve_model(dataclasses.replace(base, position_scheme="frame")).position_scheme == "frame"
