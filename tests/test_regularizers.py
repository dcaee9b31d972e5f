"""Regularizer losses on hand-built attention maps with hand-computed values, and on the model."""

import copy
import math

import pytest
import torch

from psr.core.attention import TokenLayout
from psr.core.recipe import build
from psr.core.regularizers import (
    REGULARIZERS,
    RegBatch,
    RegularizerSpec,
    capture_plan,
    idar_loss,
    jensen_shannon,
    make_capture,
    mosaic_align_loss,
    mosaic_sep_loss,
    regularizer_losses,
    regularizer_weight,
)
from psr.errors import RecipeError


def _batch(layout, labels, correspondence=None, valid=None):
    labels = torch.tensor(labels)
    b = labels.shape[0]
    if correspondence is None:
        correspondence = [torch.full((b, n), -1) for n in layout.ref_lens]
    else:
        correspondence = [torch.tensor(c) for c in correspondence]
    if valid is None:
        valid = torch.ones(b, layout.num_refs, dtype=torch.bool)
    return RegBatch(layout, labels, correspondence, torch.tensor(valid) if isinstance(valid, list) else valid)


# ---------------------------------------------------------------------- IDAR
def test_idar_uniform_attention_over_equal_parts_is_log_of_classes():
    # text+target = 4 tokens, two references of 4 tokens: uniform attention gives each of the
    # N+1 = 3 classes mass 1/3, whatever the labels.
    layout = TokenLayout(text_len=1, target_len=3, ref_lens=(4, 4))
    attn = torch.full((2, 3, 8), 1 / 12)
    batch = _batch(layout, [[1, 2, 0], [0, 0, 1]])
    assert idar_loss(attn, batch).item() == pytest.approx(math.log(3), abs=1e-6)
    assert idar_loss(attn, batch, class_balanced=True).item() == pytest.approx(math.log(3), abs=1e-6)


def test_idar_hand_computed_values():
    layout = TokenLayout(text_len=2, target_len=4, ref_lens=(2, 2))  # 10 keys
    attn = torch.full((1, 4, 4), 0.1)  # uniform: each reference 0.2, rest 0.6
    batch = _batch(layout, [[1, 2, 0, 0]])
    expected = (2 * -math.log(0.2) + 2 * -math.log(0.6)) / 4
    assert idar_loss(attn, batch).item() == pytest.approx(expected, abs=1e-6)
    # Class-balanced: mean over the classes present (ref 1, ref 2, background) of their means.
    balanced = (-math.log(0.2) - math.log(0.2) - math.log(0.6)) / 3
    assert idar_loss(attn, batch, class_balanced=True).item() == pytest.approx(balanced, abs=1e-6)


def test_idar_is_zero_for_perfect_attention_and_large_for_swapped():
    layout = TokenLayout(text_len=0, target_len=2, ref_lens=(1, 1))
    batch = _batch(layout, [[1, 2]])
    perfect = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert idar_loss(perfect, batch).item() == pytest.approx(0.0, abs=1e-6)
    swapped = torch.tensor([[[0.0, 1.0], [1.0, 0.0]]])
    assert idar_loss(swapped, batch, eps=1e-6).item() == pytest.approx(-math.log(1e-6), rel=1e-5)


def test_idar_absent_reference_counts_as_rest_and_its_tokens_are_left_out():
    layout = TokenLayout(text_len=0, target_len=3, ref_lens=(1, 1))
    attn = torch.tensor([[[0.5, 0.3], [0.2, 0.6], [0.1, 0.1]]])
    batch = _batch(layout, [[1, 2, 0]], valid=[[True, False]])
    # Token 0: label ref 1, p = 0.5. Token 1: label ref 2 (absent) → left out.
    # Token 2: background, rest = 1 − 0.1 (ref 2's 0.1 counts as rest) = 0.9.
    expected = (-math.log(0.5) - math.log(0.9)) / 2
    assert idar_loss(attn, batch).item() == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------- L_align
def test_align_uniform_attention_is_log_target_len():
    layout = TokenLayout(text_len=3, target_len=5, ref_lens=(2, 3))
    attn = torch.full((2, 5, 5), 0.2)
    batch = _batch(layout, [[0] * 5] * 2, correspondence=[[[0, 4], [1, -1]], [[2, 2, 3], [-1, -1, 0]]])
    assert mosaic_align_loss(attn, batch).item() == pytest.approx(math.log(5), abs=1e-6)


def test_align_hand_computed_and_masked_tokens():
    layout = TokenLayout(text_len=0, target_len=2, ref_lens=(1, 2))
    attn = torch.tensor([[[0.9, 0.1], [0.25, 0.75], [0.5, 0.5]]])
    batch = _batch(layout, [[0, 0]], correspondence=[[[0]], [[1, -1]]])
    assert mosaic_align_loss(attn, batch).item() == pytest.approx((-math.log(0.9) - math.log(0.75)) / 2, abs=1e-6)
    absent = _batch(layout, [[0, 0]], correspondence=[[[0]], [[1, -1]]], valid=[[True, False]])
    assert mosaic_align_loss(attn, absent).item() == pytest.approx(-math.log(0.9), abs=1e-6)
    nothing = _batch(layout, [[0, 0]])
    assert mosaic_align_loss(attn, nothing).item() == 0.0
    assert mosaic_align_loss(torch.zeros(1, 3, 2), batch, eps=1e-4).item() == pytest.approx(-math.log(1e-4))


def test_align_adds_eps_as_mosaic_does_so_the_worst_tokens_keep_their_gradient():
    # MOSAIC's -log(p + 1e-9): at p = 1e-8 the loss is -log(1.1e-8) and d/dp = -1/(p + eps);
    # a clamp at 1e-6 would give -log(1e-6) and no gradient at all.
    layout = TokenLayout(text_len=0, target_len=2, ref_lens=(1,))
    batch = _batch(layout, [[0, 0]], correspondence=[[[0]]])
    attn = torch.tensor([[[1e-8, 1.0 - 1e-8]]], dtype=torch.float64, requires_grad=True)
    loss = mosaic_align_loss(attn, batch)
    assert loss.item() == pytest.approx(-math.log(1e-8 + 1e-9), rel=1e-12)
    loss.backward()
    assert attn.grad[0, 0, 0].item() == pytest.approx(-1 / (1e-8 + 1e-9), rel=1e-9)
    assert attn.grad[0, 0, 1].item() == 0.0


# ---------------------------------------------------------------------- L_sep / JSD
def test_jensen_shannon_known_values():
    p, q = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.5])
    expected = 0.5 * math.log(1 / 0.75) + 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert jensen_shannon(p, q).item() == pytest.approx(expected, abs=1e-6)
    assert jensen_shannon(q, p).item() == pytest.approx(expected, abs=1e-6)
    assert jensen_shannon(q, q).item() == pytest.approx(0.0, abs=1e-7)
    assert jensen_shannon(p, torch.tensor([0.0, 1.0])).item() == pytest.approx(math.log(2), abs=1e-6)


def test_sep_identical_disjoint_and_single_reference():
    layout = TokenLayout(text_len=0, target_len=4, ref_lens=(2, 2))
    same = torch.full((1, 4, 4), 0.25)
    batch = _batch(layout, [[0] * 4])
    assert mosaic_sep_loss(same, batch).item() == pytest.approx(0.0, abs=1e-7)
    # Reference 1 attends to target tokens 0/1, reference 2 to 2/3: disjoint means.
    disjoint = torch.tensor([[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]]])
    assert mosaic_sep_loss(disjoint, batch).item() == pytest.approx(-math.log(2), abs=1e-6)
    absent = _batch(layout, [[0] * 4], valid=[[True, False]])
    assert mosaic_sep_loss(disjoint, absent).item() == 0.0
    one = TokenLayout(text_len=0, target_len=4, ref_lens=(4,))
    assert mosaic_sep_loss(disjoint, _batch(one, [[0] * 4])).item() == 0.0


def test_sep_averages_over_pairs():
    layout = TokenLayout(text_len=0, target_len=2, ref_lens=(1, 1, 1))
    attn = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]])  # pairs: disjoint, equal, disjoint
    assert mosaic_sep_loss(attn, _batch(layout, [[0, 0]])).item() == pytest.approx(-2 * math.log(2) / 3, abs=1e-6)


# ---------------------------------------------------------------------- weights and specs
@pytest.mark.parametrize("start,end,step,expected", [
    (0, 0, 0, 2.0), (10, 20, 0, 0.0), (10, 20, 10, 0.0), (10, 20, 15, 1.0), (10, 20, 20, 2.0),
    (10, 20, 500, 2.0), (5, 5, 4, 0.0), (5, 5, 5, 2.0),
])
def test_regularizer_weight_ramp(start, end, step, expected):
    spec = RegularizerSpec("mosaic_sep", weight=2.0, warmup_start=start, warmup_end=end)
    assert regularizer_weight(spec, step) == pytest.approx(expected)


def test_spec_from_recipe_table_and_every_bad_value():
    spec = build(RegularizerSpec, {"name": "idar", "weight": 0.5, "blocks": ["transformer_blocks.0", "single"],
                                   "options": {"class_balanced": True}})
    assert spec.blocks == ("transformer_blocks.0", "single") and spec.options == {"class_balanced": True}
    bad = [
        ({"name": "idra"}, "name: regularizer 'idra': unknown.*did you mean 'idar'"),
        ({"name": "idar", "weight": -1}, "weight: must be"),
        ({"name": "idar", "warmup_start": 10, "warmup_end": 5}, "warmup_end"),
        ({"name": "idar", "blocks": ["doubl"]}, "blocks: 'doubl' is not a block"),
        ({"name": "idar", "blocks": []}, "blocks: empty"),
        ({"name": "mosaic_sep", "options": {"eps": 1e-3}}, "options.eps: unknown option of mosaic_sep"),
        ({"name": "idar", "options": {"class_balanced": 1}}, "options.class_balanced: expected bool"),
        ({"name": "idar", "wieght": 1}, "wieght: unknown key"),
    ]
    for table, message in bad:
        with pytest.raises(RecipeError, match=message):
            build(RegularizerSpec, table, "regularizers[0]")


def test_capture_plan_is_the_union_of_active_specs(tiny_components):
    tr = tiny_components.transformer
    specs = [RegularizerSpec("idar", blocks=("transformer_blocks.1",)),
             RegularizerSpec("mosaic_align", blocks=("single_transformer_blocks.0",), warmup_start=100,
                             warmup_end=100)]
    assert capture_plan(specs, tr) == ({"target_to_refs", "refs_to_target"},
                                       ("transformer_blocks.1", "single_transformer_blocks.0"))
    assert capture_plan(specs, tr, step=5) == ({"target_to_refs"}, ("transformer_blocks.1",))
    assert capture_plan([RegularizerSpec("idar", weight=0.0)], tr) == (set(), ())
    assert make_capture([RegularizerSpec("idar", weight=0.0)], tr, TokenLayout(1, 1)) is None


# ---------------------------------------------------------------------- on the model
LAYOUT = TokenLayout(text_len=4, target_len=16, ref_lens=(8, 8))


def _model_batch():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (2, 16), generator=g)
    corr = [torch.randint(-1, 16, (2, 8), generator=g) for _ in range(2)]
    return RegBatch(LAYOUT, labels, corr, torch.ones(2, 2, dtype=torch.bool))


def _forward(transformer):
    g = torch.Generator().manual_seed(2)
    transformer(hidden_states=torch.randn(2, 32, 16, generator=g), img_ids=torch.randn(32, 3, generator=g),
                encoder_hidden_states=torch.randn(2, 4, 32, generator=g), pooled_projections=torch.randn(2, 32),
                txt_ids=torch.zeros(4, 3), timestep=torch.full((2,), 0.3), guidance=torch.full((2,), 3.5))


@pytest.mark.parametrize("name", list(REGULARIZERS))
def test_each_regularizer_reaches_query_and_key_weights(tiny_components, one_thread, name):
    transformer = copy.deepcopy(tiny_components.transformer)
    spec = RegularizerSpec(name, blocks=("double",))
    with make_capture([spec], transformer, LAYOUT) as capture:
        _forward(transformer)
        total, terms = regularizer_losses([spec], capture, _model_batch(), step=0)
    assert set(terms) == {name} and torch.isfinite(total) and total.item() == terms[name].item()
    total.backward()
    for block in transformer.transformer_blocks:
        for proj in (block.attn.to_q, block.attn.to_k):
            assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0, name


def test_each_spec_averages_over_its_own_blocks(tiny_components, one_thread):
    transformer = tiny_components.transformer
    specs = [RegularizerSpec("mosaic_align", weight=0.1, blocks=("transformer_blocks.0",)),
             RegularizerSpec("mosaic_align", weight=2.0, warmup_start=0, warmup_end=10, blocks=("all",))]
    batch = _model_batch()
    with torch.no_grad(), make_capture(specs, transformer, LAYOUT, step=5) as capture:
        _forward(transformer)
        total, terms = regularizer_losses(specs, capture, batch, step=5)
        first = mosaic_align_loss(capture.maps["refs_to_target"][0], batch)
        every = mosaic_align_loss(torch.stack(capture.maps["refs_to_target"]).mean(0), batch)
    assert len(capture.maps["refs_to_target"]) == 4
    assert terms["mosaic_align[0]"].item() == pytest.approx(first.item())
    assert terms["mosaic_align[1]"].item() == pytest.approx(every.item())
    assert total.item() == pytest.approx(0.1 * first.item() + 1.0 * every.item(), rel=1e-6)


def test_reg_batch_checks_shapes():
    labels, corr, valid = torch.zeros(2, 16, dtype=torch.long), [torch.zeros(2, 8, dtype=torch.long)] * 2, \
        torch.ones(2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="target_labels"):
        RegBatch(LAYOUT, torch.zeros(2, 15, dtype=torch.long), corr, valid)
    with pytest.raises(ValueError, match="correspondence: expected 2"):
        RegBatch(LAYOUT, labels, corr[:1], valid)
    with pytest.raises(ValueError, match=r"correspondence\[1\]: indices"):
        RegBatch(LAYOUT, labels, [corr[0], torch.full((2, 8), 16)], valid)
    with pytest.raises(ValueError, match="ref_valid"):
        RegBatch(LAYOUT, labels, corr, torch.ones(2, 2))
    with pytest.raises(ValueError, match="values must lie"):
        RegBatch(LAYOUT, torch.full((2, 16), 3), corr, valid)
