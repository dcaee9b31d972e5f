"""Position ids for both schemes, 2x2 packing, and the reference resize rule."""

import pytest
import torch

from psr.core.images import fit_size
from psr.core.packing import pack, unpack
from psr.core.positions import grid_ids, reference_ids, sequence_ids


def test_grid_ids_row_major():
    ids = grid_ids(2, 3)
    assert ids.tolist() == [[0, 0, 0], [0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 1, 1], [0, 1, 2]]


def test_frame_scheme_matches_kontext_convention():
    # Kontext: the reference has index 1 and (h, w) from 0; reference i has index i + 1.
    refs = reference_ids((4, 4), [(2, 3), (3, 2), (1, 1)], "frame")
    assert [r.shape[0] for r in refs] == [6, 6, 1]
    for i, r in enumerate(refs):
        assert torch.all(r[:, 0] == i + 1)
        assert r[:, 1].min() == 0 and r[:, 2].min() == 0
    assert refs[0][:, 1].max() == 1 and refs[0][:, 2].max() == 2


def test_diagonal_scheme_offsets_cumulatively():
    # Target 4x5 tokens; references of mixed sizes sit on a diagonal past everything before.
    refs = reference_ids((4, 5), [(2, 3), (3, 2), (1, 1)], "diagonal")
    starts = [(int(r[:, 1].min()), int(r[:, 2].min())) for r in refs]
    ends = [(int(r[:, 1].max()), int(r[:, 2].max())) for r in refs]
    assert starts == [(4, 5), (6, 8), (9, 10)]
    assert ends == [(5, 7), (8, 9), (9, 10)]
    assert all(torch.all(r[:, 0] == 0) for r in refs)


@pytest.mark.parametrize("scheme", ["frame", "diagonal"])
@pytest.mark.parametrize("n", [0, 1, 2, 8])
def test_no_two_tokens_share_ids(scheme, n):
    grids = [(2 + i % 3, 3 + i % 2) for i in range(n)]
    ids = sequence_ids((4, 4), grids, scheme)
    assert ids.shape == (16 + sum(h * w for h, w in grids), 3)
    assert len({tuple(row) for row in ids.tolist()}) == ids.shape[0]


def test_unknown_scheme():
    with pytest.raises(ValueError, match="unknown position scheme"):
        reference_ids((2, 2), [(1, 1)], "spiral")


def test_pack_matches_flux_pipeline_and_round_trips():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 4, 6, 10)
    tokens = pack(latents)
    assert tokens.shape == (2, 15, 16)
    assert torch.equal(tokens, FluxPipeline._pack_latents(latents, 2, 4, 6, 10))
    assert torch.equal(unpack(tokens, 6, 10), latents)
    assert torch.equal(unpack(tokens, 6, 10), FluxPipeline._unpack_latents(tokens, 6 * 8, 10 * 8, 8))


def test_pack_rejects_odd_latents():
    with pytest.raises(ValueError, match="must be even"):
        pack(torch.zeros(1, 4, 3, 4))
    with pytest.raises(ValueError):
        unpack(torch.zeros(1, 5, 16), 4, 4)


@pytest.mark.parametrize("size, longest, multiple, expected", [
    ((64, 64), 64, 8, (64, 64)),
    ((512, 512), 64, 8, (64, 64)),
    ((200, 100), 64, 8, (64, 32)),
    ((100, 300), 64, 8, (24, 64)),  # 21.3 → nearest multiple of 8
    ((1000, 10), 64, 8, (64, 8)),  # never below one stride
    ((1920, 1080), 512, 16, (512, 288)),
])
def test_reference_resize_rule(size, longest, multiple, expected):
    assert fit_size(*size, longest, multiple) == expected


# ---------------------------------------------------------------------------- layout scheme
def test_layout_ids_land_each_reference_token_on_its_target_position():
    # A 4x4 reference over the middle half of an 8x8 target covers tokens 2..5 on both axes.
    [ids] = reference_ids((8, 8), [(4, 4)], "layout", boxes=[(0.5, 0.5, 0.5)])
    assert torch.all(ids[:, 0] == 1)  # frame index, so references stay apart
    assert ids[:, 1].reshape(4, 4)[:, 0].tolist() == [2.0, 3.0, 4.0, 5.0]
    assert ids[:, 2].reshape(4, 4)[0].tolist() == [2.0, 3.0, 4.0, 5.0]
    # Over the quarter-width box at (0.25, 0.75): target pixels 8..24 by 40..56; reference
    # token 0 covers 40..44 in y, centred at 42 px, i.e. token coordinate (42 - 4) / 8.
    [ids] = reference_ids((8, 8), [(4, 4)], "layout", boxes=[(0.25, 0.75, 0.25)])
    assert ids[:, 1].reshape(4, 4)[:, 0].tolist() == [4.75, 5.25, 5.75, 6.25]
    assert ids[:, 2].reshape(4, 4)[0].tolist() == [0.75, 1.25, 1.75, 2.25]
    # A wide reference (2 rows, 4 columns) keeps its aspect: half the rows' span.
    [ids] = reference_ids((8, 8), [(2, 4)], "layout", boxes=[(0.5, 0.5, 0.5)])
    assert ids[:, 1].reshape(2, 4)[:, 0].tolist() == [3.0, 4.0]
    two = reference_ids((8, 8), [(4, 4), (4, 4)], "layout", boxes=[(0.3, 0.5, 0.5), (0.7, 0.5, 0.5)])
    assert [r[0, 0].item() for r in two] == [1.0, 2.0]
    with pytest.raises(ValueError, match="one box per reference"):
        reference_ids((8, 8), [(4, 4), (4, 4)], "layout", boxes=[(0.5, 0.5, 0.5)])


LAYOUT = {"1": [[0.5, 0.5, 0.6]], "2": [[0.3, 0.5, 0.5], [0.7, 0.5, 0.5]],
          "2:left of": [[0.25, 0.5, 0.5], [0.75, 0.5, 0.5]], "2:above": [[0.5, 0.25, 0.5], [0.5, 0.75, 0.5]],
          "2:on": [[0.5, 0.6, 0.5], [0.5, 0.4, 0.5]], "2:on top of": [[0.5, 0.3, 0.5], [0.5, 0.7, 0.5]]}


@pytest.mark.parametrize("prompt, count, key", [
    ("a cat left of a dog", 2, "2:left of"),
    ("A cat ABOVE a dog", 2, "2:above"),
    ("a cat below a dog, both left of a tree", 2, "2:left of"),  # "below" is not in this table
    ("a dog above a cat left of the sea", 2, "2:above"),  # the first one named
    ("a cat on top of a dog", 2, "2:on top of"),  # same start: the longer phrase
    ("a cat on a dog", 2, "2:on"),
    ("an aboveground pool with a cat and a dog", 2, "2"),  # whole words only
    ("a cat and a dog", 2, "2"),
    ("a cat left of a dog", 1, "1"),
    ("three cats", 3, "3"),
])
def test_layout_key_reads_the_count_and_the_relation(prompt, count, key):
    from psr.core.positions import ReferenceLayout

    assert ReferenceLayout.from_dict(LAYOUT, "card").key(prompt, count) == key


def test_layout_table_is_checked_and_a_count_it_lacks_is_refused():
    from psr.core.positions import ReferenceLayout
    from psr.errors import UserError

    layout = ReferenceLayout.from_dict(LAYOUT, "card")
    assert layout.boxes_for("a left of b", 2) == ((0.25, 0.5, 0.5), (0.75, 0.5, 0.5))
    assert ReferenceLayout.from_dict(layout.to_dict(), "again") == layout
    with pytest.raises(UserError, match="covers 1, 2 reference\\(s\\), not 3"):
        layout.boxes_for("three", 3)
    for bad in ({}, [], {"2": [[0.5, 0.5, 0.5]]}, {"1": [[0.5, 0.5, 0]]}, {"1": [[0.5, "x", 1]]},
                {"x": [[0.5, 0.5, 1]]}, {"1": [[0.5, 0.5]]}, {"1": "box"}):
        with pytest.raises(UserError, match="^card: "):
            ReferenceLayout.from_dict(bad, "card")
