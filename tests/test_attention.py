"""Attention capture: the block output is untouched, the slices are the true softmax slices."""

import copy

import pytest
import torch

from psr.core.attention import (
    AttentionCapture,
    TokenLayout,
    check_block_names,
    select_blocks,
)
from psr.errors import UserError

BOTH = {"target_to_refs", "refs_to_target"}
LAYOUT = TokenLayout(text_len=5, target_len=16, ref_lens=(8, 12))


def _inputs(layout=LAYOUT, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = layout.image_len
    return {
        "hidden_states": torch.randn(batch, image, 16, generator=g),
        "img_ids": torch.randn(image, 3, generator=g) * 4,  # any ids: RoPE must be applied as the real path does
        "encoder_hidden_states": torch.randn(batch, layout.text_len, 32, generator=g),
        "pooled_projections": torch.randn(batch, 32, generator=g),
        "txt_ids": torch.zeros(layout.text_len, 3),
        "timestep": torch.full((batch,), 0.4), "guidance": torch.full((batch,), 3.5), "return_dict": False}


@pytest.fixture()
def transformer(tiny_components, one_thread):
    return copy.deepcopy(tiny_components.transformer)


def _block_outputs(transformer, inputs):
    """The output of every block (both streams), via forward hooks."""
    outputs, handles = {}, []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        for i, block in enumerate(getattr(transformer, name)):
            handles.append(block.register_forward_hook(
                lambda m, a, out, key=f"{name}.{i}": outputs.__setitem__(key, [o.detach() for o in out])))
    try:
        final = transformer(**inputs)[0].detach()
    finally:
        for h in handles:
            h.remove()
    return final, outputs


def test_capture_leaves_every_block_output_unchanged(transformer):
    inputs = _inputs()
    plain, plain_blocks = _block_outputs(transformer, inputs)
    with AttentionCapture(transformer, ["all"], LAYOUT, BOTH) as capture:
        captured, captured_blocks = _block_outputs(transformer, inputs)
    assert len(capture.maps["target_to_refs"]) == 4 and len(capture.maps["refs_to_target"]) == 4
    assert torch.allclose(plain, captured, atol=1e-6, rtol=0)
    for name, outs in plain_blocks.items():
        for a, b in zip(outs, captured_blocks[name]):
            assert torch.allclose(a, b, atol=1e-6, rtol=0), name


def test_processors_are_restored_on_exit_and_on_error(transformer):
    before = {k: v for k, v in transformer.attn_processors.items()}
    with AttentionCapture(transformer, ["double"], LAYOUT, {"refs_to_target"}):
        during = transformer.attn_processors
        assert type(during["transformer_blocks.0.attn.processor"]).__name__ == "CaptureProcessor"
        assert during["single_transformer_blocks.0.attn.processor"] is before[
            "single_transformer_blocks.0.attn.processor"]
    assert transformer.attn_processors == before
    with pytest.raises(RuntimeError, match="inside"), AttentionCapture(transformer, ["all"], LAYOUT, BOTH):
        raise RuntimeError("inside the capture")
    assert transformer.attn_processors == before


def test_slices_equal_the_full_attention_that_diffusers_computes(transformer, monkeypatch):
    """Record the full softmax from diffusers' own q/k (after its norms and RoPE) and slice it by hand."""
    from diffusers.models.transformers import transformer_flux

    full = []
    real = transformer_flux.dispatch_attention_fn

    def recording(query, key, value, **kw):  # [B, L, H, D]
        q, k = query.transpose(1, 2).double(), key.transpose(1, 2).double()
        full.append(torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1))
        return real(query, key, value, **kw)

    inputs = _inputs(seed=3)
    monkeypatch.setattr(transformer_flux, "dispatch_attention_fn", recording)
    with torch.no_grad():
        transformer(**inputs)
    monkeypatch.undo()
    with torch.no_grad(), AttentionCapture(transformer, ["all"], LAYOUT, BOTH) as capture:
        transformer(**inputs)
    t, r = LAYOUT.target_slice, LAYOUT.refs_slice
    for probs, to_refs, to_target in zip(full, capture.maps["target_to_refs"], capture.maps["refs_to_target"]):
        expected = probs[:, :, t, r].mean(1)
        assert torch.allclose(to_refs.double(), expected, atol=1e-6)
        # Softmax over the target keys only = the full rows restricted to target keys, renormalised.
        rows = probs[:, :, r, t]
        expected = (rows / rows.sum(-1, keepdim=True)).mean(1)
        assert torch.allclose(to_target.double(), expected, atol=1e-6)
    assert torch.allclose(capture.maps["refs_to_target"][0].sum(-1), torch.ones(2, 20))
    assert (capture.maps["target_to_refs"][0].sum(-1) < 1).all()


def test_capture_on_the_model_velocity(tiny_model, rgb_image, one_thread):
    grid = (8, 8)
    text = tiny_model.encode_prompt(["two creatures", "two creatures"])
    refs = tiny_model.encode_references([rgb_image(seed=1), rgb_image(32, 64, seed=2)], grid)
    layout = TokenLayout.for_velocity(text.embeds.shape[1], grid, refs.grids)
    assert layout.ref_lens == (64, 32) and layout.text_len == 32
    latents = tiny_model.noise([0, 1], 64, 64)
    with torch.no_grad(), AttentionCapture(tiny_model.transformer, ["double"], layout, BOTH) as capture:
        tiny_model.velocity(latents, torch.full((2,), 0.5), text, refs, grid, torch.full((2,), 3.5))
    assert capture.mean("target_to_refs").shape == (2, 64, 96)
    assert capture.mean("refs_to_target").shape == (2, 96, 64)
    assert capture.sources["refs_to_target"] == ["transformer_blocks.0", "transformer_blocks.1"]


def _attention_loss(capture):
    return -capture.mean("refs_to_target")[..., 0].clamp_min(1e-6).log().mean() + \
        capture.mean("target_to_refs").sum()


def test_gradient_reaches_query_and_key_projections_but_not_values(transformer):
    inputs = _inputs()
    with AttentionCapture(transformer, ["transformer_blocks.1"], LAYOUT, BOTH) as capture:
        transformer(**inputs)
        _attention_loss(capture).backward()
    attn = transformer.transformer_blocks[1].attn
    for proj in (attn.to_q, attn.to_k, attn.add_k_proj):
        assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
    # The slice depends on queries and keys only: this block's values get no gradient.
    assert attn.to_v.weight.grad is None or attn.to_v.weight.grad.abs().sum() == 0


def _loss_and_grads(transformer, chunk_elements=1 << 22):
    transformer.zero_grad(set_to_none=True)
    with AttentionCapture(transformer, ["all"], LAYOUT, BOTH, chunk_elements=chunk_elements) as capture:
        transformer(**_inputs())
        loss = _attention_loss(capture)
        loss.backward()
        count = len(capture.maps["target_to_refs"])
    return loss.detach(), count, {n: p.grad.clone() for n, p in transformer.named_parameters()
                                  if p.grad is not None and ".to_q." in n}


def test_chunked_slices_and_gradient_checkpointing_give_the_same_loss_and_gradients(transformer):
    loss, count, grads = _loss_and_grads(transformer)
    chunked_loss, chunked_count, chunked = _loss_and_grads(transformer, chunk_elements=64)  # many small chunks
    transformer.enable_gradient_checkpointing()
    ckpt_loss, ckpt_count, ckpt = _loss_and_grads(transformer)
    assert count == chunked_count == ckpt_count == 4  # recomputation in backward records nothing
    assert torch.allclose(loss, chunked_loss, atol=1e-6) and torch.allclose(loss, ckpt_loss, atol=1e-6)
    assert grads.keys() == chunked.keys() == ckpt.keys() and len(grads) == 8  # 4 blocks, weight and bias
    for name in grads:
        assert torch.allclose(grads[name], chunked[name], atol=1e-6), name
        assert torch.allclose(grads[name], ckpt[name], atol=1e-6), name


def test_layout_mismatch_and_bad_requests_are_errors(transformer):
    wrong = TokenLayout(5, 16, (8, 8))
    with pytest.raises(ValueError, match="joint sequence has 41 tokens"), torch.no_grad(), \
            AttentionCapture(transformer, ["double"], wrong, BOTH):
        transformer(**_inputs())
    with pytest.raises(ValueError, match="want"):
        AttentionCapture(transformer, ["double"], LAYOUT, {"refs_to_refs"})
    capture = AttentionCapture(transformer, ["double"], LAYOUT, {"refs_to_target"})
    with pytest.raises(KeyError):
        capture.mean("target_to_refs")
    with pytest.raises(RuntimeError, match="no 'refs_to_target' slice"):
        capture.mean("refs_to_target")


def test_clear_and_mean_over_a_subset_of_blocks(transformer):
    with torch.no_grad(), AttentionCapture(transformer, ["double"], LAYOUT, {"refs_to_target"}) as capture:
        transformer(**_inputs())
        first, second = capture.maps["refs_to_target"]
        assert torch.allclose(capture.mean("refs_to_target"), (first + second) / 2)
        assert torch.equal(capture.mean("refs_to_target", ["transformer_blocks.1"]), second)
        capture.clear()
        assert capture.maps["refs_to_target"] == []


def test_block_selection(transformer):
    assert select_blocks(transformer, ["double"]) == ("transformer_blocks.0", "transformer_blocks.1")
    assert select_blocks(transformer, ["single"]) == ("single_transformer_blocks.0", "single_transformer_blocks.1")
    assert len(select_blocks(transformer, ["all"])) == 4
    # Forward order, no duplicates, groups and names mixed.
    assert select_blocks(transformer, ["single_transformer_blocks.1", "transformer_blocks.1", "single"]) == (
        "transformer_blocks.1", "single_transformer_blocks.0", "single_transformer_blocks.1")
    with pytest.raises(UserError, match="no such block.*2 double-stream and 2 single-stream"):
        select_blocks(transformer, ["transformer_blocks.7"])
    with pytest.raises(UserError, match="did you mean 'double'"):
        select_blocks(transformer, ["doubel"])
    with pytest.raises(UserError, match="not a block"):
        check_block_names(["attn.to_q"])
    with pytest.raises(UserError, match="empty"):
        check_block_names([])


def test_token_layout():
    layout = TokenLayout.for_velocity(7, (4, 6), [(2, 3), (4, 4)])
    assert (layout.target_len, layout.ref_lens, layout.refs_len, layout.total_len) == (24, (6, 16), 22, 53)
    assert layout.target_slice == slice(7, 31) and layout.refs_slice == slice(31, 53)
    assert layout.ref_slices() == [slice(0, 6), slice(6, 22)]
    mask = layout.reference_mask()
    assert mask.shape == (46,) and not mask[:24].any() and mask[24:].all()
    with pytest.raises(ValueError):
        TokenLayout(3, 0, (4,))
    with pytest.raises(ValueError):
        TokenLayout(3, 4, (4, 0))
