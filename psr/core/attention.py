"""Attention capture: the softmax slices that the attention regularizers need, with grad.

The joint attention sequence of every FLUX block is `[text | target | ref_1 … ref_N]`
(REFERENCE §1): double-stream blocks put the text (`encoder_hidden_states`) in front inside
attention, single-stream blocks already carry it at the front of `hidden_states`. A
`TokenLayout` says where each part sits.

`AttentionCapture` swaps the processors of the selected blocks for one that computes the
block output exactly as diffusers' `FluxAttnProcessor` does (same projections, q/k RMS norms,
RoPE, and the same fused attention call), and in addition recomputes only the needed slice
of softmax(QKᵀ/√d), in float32, averaged over heads:

- "target_to_refs": queries = target tokens, keys = ALL tokens (softmax over the whole
  joint sequence), then the reference-key columns are kept → [B, target_len, refs_len];
- "refs_to_target": queries = reference tokens, keys = target tokens only (softmax over
  the target keys) → [B, refs_len, target_len].

The slices keep their autograd graph, so a loss on them reaches the q/k projections (and
their LoRA). Large slices are computed in chunks of query rows under activation
checkpointing, so only the head-averaged slice stays in memory until backward.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Self

import torch

from psr.errors import UserError

MAP_KINDS = ("target_to_refs", "refs_to_target")
BLOCK_GROUPS = ("double", "single", "all")
_BLOCK_NAME = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)$")

# Slices up to KEEP_ELEMENTS float32 elements ([B, heads, queries, keys]) keep their
# probabilities for backward (cheap, and the tiny model stays fast); larger ones are
# recomputed in backward, in chunks of query rows of about DEFAULT_CHUNK_ELEMENTS
# (256 MiB of float32), so per block only the head-averaged slice stays alive.
KEEP_ELEMENTS = 1 << 22
DEFAULT_CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class TokenLayout:
    """Where each part sits in the joint attention sequence `[text | target | refs]`."""

    text_len: int
    """Encoder (text) tokens, which come first in the joint attention."""
    target_len: int
    """Target tokens, right after the text."""
    ref_lens: tuple[int, ...] = ()
    """Tokens of reference i, following the target in order."""

    def __post_init__(self):
        object.__setattr__(self, "ref_lens", tuple(int(n) for n in self.ref_lens))
        if self.text_len < 0 or self.target_len <= 0 or any(n <= 0 for n in self.ref_lens):
            raise ValueError(f"token layout needs text_len ≥ 0, target_len > 0 and every ref_len > 0, "
                             f"got {self.text_len}, {self.target_len}, {self.ref_lens}")

    @classmethod
    def for_velocity(cls, text_len: int, target_grid: tuple[int, int],
                     ref_grids: Sequence[tuple[int, int]]) -> TokenLayout:
        """The layout of `MultiRefFlux.velocity`: text of `text_len` tokens (the prompt
        embeds' length), a target grid (rows, cols) and one grid per reference."""
        return cls(text_len, target_grid[0] * target_grid[1], tuple(r * c for r, c in ref_grids))

    @property
    def num_refs(self) -> int:
        return len(self.ref_lens)

    @property
    def refs_len(self) -> int:
        return sum(self.ref_lens)

    @property
    def image_len(self) -> int:
        """Image-stream tokens: target plus references (what double blocks' image stream sees)."""
        return self.target_len + self.refs_len

    @property
    def total_len(self) -> int:
        return self.text_len + self.image_len

    @property
    def target_slice(self) -> slice:
        """The target tokens in the joint sequence."""
        return slice(self.text_len, self.text_len + self.target_len)

    @property
    def refs_slice(self) -> slice:
        """All reference tokens in the joint sequence."""
        start = self.text_len + self.target_len
        return slice(start, start + self.refs_len)

    def ref_slices(self) -> list[slice]:
        """Reference i's tokens within the concatenated reference tokens (0-based)."""
        out, start = [], 0
        for n in self.ref_lens:
            out.append(slice(start, start + n))
            start += n
        return out

    def reference_mask(self) -> torch.Tensor:
        """[image_len] bool: True at reference tokens of the image sequence `[target | refs]`."""
        return torch.cat([torch.zeros(self.target_len, dtype=torch.bool),
                          torch.ones(self.refs_len, dtype=torch.bool)])


# ---------------------------------------------------------------------- block selection
def check_block_names(blocks: Iterable[str], what: str = "blocks") -> tuple[str, ...]:
    """Check the spelling of a block selection without a model: each item is a group
    ("double", "single", "all") or a name like "transformer_blocks.3"."""
    blocks = tuple(blocks)
    if not blocks:
        raise UserError(f"{what}: empty; use 'double', 'single', 'all' or block names like 'transformer_blocks.0'")
    for name in blocks:
        if name not in BLOCK_GROUPS and not _BLOCK_NAME.match(name):
            close = difflib.get_close_matches(name, BLOCK_GROUPS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise UserError(f"{what}: {name!r} is not a block{hint}; use 'double', 'single', 'all' or names "
                            f"like 'transformer_blocks.0' / 'single_transformer_blocks.0'")
    return blocks


def all_blocks(transformer) -> tuple[str, ...]:
    """Every attention block of `transformer`, in forward order."""
    return (tuple(f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks)))
            + tuple(f"single_transformer_blocks.{i}" for i in range(len(transformer.single_transformer_blocks))))


def select_blocks(transformer, blocks: Iterable[str], what: str = "blocks") -> tuple[str, ...]:
    """Resolve a selection to block names in forward order, without duplicates.

    "double" = every double-stream block (`transformer_blocks.i`), "single" = every
    single-stream block (`single_transformer_blocks.i`), "all" = both; other items must
    name a block of this model. Unknown names raise `UserError`.
    """
    available = all_blocks(transformer)
    chosen = set()
    for name in check_block_names(blocks, what):
        if name == "double" or name == "all":
            chosen.update(b for b in available if b.startswith("transformer_blocks."))
        if name == "single" or name == "all":
            chosen.update(b for b in available if b.startswith("single_"))
        if name not in BLOCK_GROUPS:
            if name not in available:
                close = difflib.get_close_matches(name, available, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UserError(f"{what}: {name!r}: no such block in this model{hint}; it has "
                                f"{len(transformer.transformer_blocks)} double-stream and "
                                f"{len(transformer.single_transformer_blocks)} single-stream blocks")
            chosen.add(name)
    return tuple(b for b in available if b in chosen)


# ---------------------------------------------------------------------- slice maths
def _in_backward() -> bool:
    """True while autograd runs a backward pass: then a block forward is a checkpoint
    recomputation, whose slices must not be recorded a second time."""
    return torch._C._current_graph_task_id() != -1


def _softmax_slice(query: torch.Tensor, key: torch.Tensor, keep: slice | None) -> torch.Tensor:
    """softmax(q kᵀ/√d) over all of `key`, columns `keep`, averaged over heads.

    query [B, H, Q, D], key [B, H, K, D] → [B, Q, K'] float32.
    """
    scale = query.shape[-1] ** -0.5
    # The losses take logs of these probabilities: keep them float32 even under autocast.
    with torch.autocast(device_type=query.device.type, enabled=False):
        logits = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
    probs = logits.softmax(dim=-1)
    if keep is not None:
        probs = probs[..., keep]
    return probs.mean(dim=1)


def _slice_rows(query: torch.Tensor, key: torch.Tensor, keep: slice | None, chunk_elements: int) -> torch.Tensor:
    """`_softmax_slice` with bounded memory: beyond `KEEP_ELEMENTS` (or `chunk_elements`,
    if smaller) the query rows are split into chunks of about `chunk_elements` computed
    under non-reentrant checkpointing, so backward recomputes each chunk's [B, H, rows, K]
    probabilities instead of keeping them all."""
    b, h, q, _ = query.shape
    elements = b * h * q * key.shape[2]
    if elements <= min(KEEP_ELEMENTS, chunk_elements) or not torch.is_grad_enabled():
        return _softmax_slice(query, key, keep)
    from torch.utils.checkpoint import checkpoint

    rows = max(1, chunk_elements // (b * h * key.shape[2]))
    parts = [checkpoint(_softmax_slice, query[:, :, i:i + rows], key, keep, use_reentrant=False)
             for i in range(0, q, rows)]
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------------- processor
class FluxProcessorStandIn:
    """What psr's processors that stand in for a block's `FluxAttnProcessor` share: the
    block's name, the original processor, and its attention backend (the dispatcher reads
    these, and `set_attention_backend` sets them), so the model's backend is kept."""

    def __init__(self, block: str, original):
        self.block = block
        self.original = original
        self._attention_backend = getattr(original, "_attention_backend", None)
        self._parallel_config = getattr(original, "_parallel_config", None)


def joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb):
    """Query, key and value [B, L, H, D] as `FluxAttnProcessor` builds them: diffusers' own
    projections, the q/k norms, the text tokens first in a double-stream block, then rope."""
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import _get_qkv_projections

    query, key, value, t_query, t_key, t_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
    query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
    key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
    value = value.unflatten(-1, (-1, attn.head_dim))
    if attn.added_kv_proj_dim is not None and encoder_hidden_states is not None:
        t_query = attn.norm_added_q(t_query.unflatten(-1, (-1, attn.head_dim)))
        t_key = attn.norm_added_k(t_key.unflatten(-1, (-1, attn.head_dim)))
        query = torch.cat([t_query, query], dim=1)
        key = torch.cat([t_key, key], dim=1)
        value = torch.cat([t_value.unflatten(-1, (-1, attn.head_dim)), value], dim=1)
    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    return query, key, value


class CaptureProcessor(FluxProcessorStandIn):
    """A drop-in for diffusers' `FluxAttnProcessor` that also records attention slices.

    The block output follows the same steps as `FluxAttnProcessor` (and the same attention
    backend, through diffusers' dispatcher), so it is the same tensor; the slices are
    extra work on the side.
    """

    def __init__(self, capture: AttentionCapture, block: str, original):
        super().__init__(block, original)
        self.capture = capture

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None):
        if attention_mask is not None:
            raise ValueError(f"attention capture in {self.block}: attention masks are not supported")
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)

        self.capture._record(self.block, query, key)

        return attend_and_project(self, attn, query, key, value, encoder_hidden_states)


def attend_and_project(processor, attn, query, key, value, encoder_hidden_states):
    """The tail `FluxAttnProcessor` ends with: attention through diffusers' dispatcher, then
    the output projections, split back into (image, text) in a double-stream block."""
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    out = dispatch_attention_fn(query, key, value, attn_mask=None, backend=processor._attention_backend,
                                parallel_config=processor._parallel_config)
    out = out.flatten(2, 3).to(query.dtype)
    if encoder_hidden_states is None:
        return out
    text_out, image_out = out.split_with_sizes(
        [encoder_hidden_states.shape[1], out.shape[1] - encoder_hidden_states.shape[1]], dim=1)
    image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
    return image_out, attn.to_add_out(text_out.contiguous())


# ---------------------------------------------------------------------- capture
class AttentionCapture:
    """Context manager that records attention slices in the selected blocks.

    `blocks`: block names or groups (see `select_blocks`); `want` ⊆ {"target_to_refs",
    "refs_to_target"}. Inside the `with`, every forward of `transformer` appends, per
    selected block in forward order:

    - maps["target_to_refs"]: [B, target_len, refs_len] float32, softmax over ALL keys;
    - maps["refs_to_target"]: [B, refs_len, target_len] float32, softmax over target keys;

    both averaged over heads and connected to the graph. `layout` may be replaced between
    forwards (e.g. `capture.layout = ...` when the reference sizes change). The original
    processors are restored on exit, also after an exception. Call `clear()` between
    training steps; forwards recomputed by gradient checkpointing are not recorded. With
    gradient checkpointing, run backward inside the `with`: the recomputation must see the
    same processors as the forward did.
    """

    def __init__(self, transformer, blocks: Sequence[str], layout: TokenLayout, want: Iterable[str], *,
                 chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        want = set(want)
        unknown = sorted(want - set(MAP_KINDS))
        if unknown or not want:
            raise ValueError(f"attention capture: want must be a non-empty subset of {MAP_KINDS}, got {sorted(want)}")
        self.transformer = transformer
        self.blocks = select_blocks(transformer, blocks)
        self.layout = layout
        self.want = want
        self.chunk_elements = int(chunk_elements)
        self.maps: dict[str, list[torch.Tensor]] = {k: [] for k in sorted(want)}
        self.sources: dict[str, list[str]] = {k: [] for k in sorted(want)}
        """The block that recorded each entry of `maps[key]`."""
        self._saved: dict[str, object] = {}

    def __enter__(self) -> Self:
        from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

        if self._saved:
            raise RuntimeError("attention capture is already active")
        for block in self.blocks:
            attn = self.transformer.get_submodule(block).attn
            if type(attn.processor) is not FluxAttnProcessor:
                self._restore()
                raise ValueError(f"attention capture: {block} uses {type(attn.processor).__name__}, "
                                 f"only FluxAttnProcessor blocks can be captured")
            self._saved[block] = attn.processor
            attn.set_processor(CaptureProcessor(self, block, attn.processor))
        return self

    def __exit__(self, *exc) -> None:
        self._restore()

    def _restore(self) -> None:
        for block, processor in self._saved.items():
            self.transformer.get_submodule(block).attn.set_processor(processor)
        self._saved = {}

    def clear(self) -> None:
        """Drop every recorded slice (and its graph)."""
        for key in self.maps:
            self.maps[key].clear()
            self.sources[key].clear()

    def _record(self, block: str, query: torch.Tensor, key: torch.Tensor) -> None:
        """query, key: [B, L, H, D] after norms and RoPE, L = the joint sequence."""
        layout = self.layout
        if query.shape[1] != layout.total_len:
            raise ValueError(f"attention capture in {block}: the joint sequence has {query.shape[1]} tokens, the "
                             f"layout says {layout.text_len} text + {layout.target_len} target + "
                             f"{layout.refs_len} reference tokens")
        if not layout.refs_len:
            return
        # A block forward during backward is a gradient-checkpointing recomputation: the
        # slices are computed again (checkpointing expects the same saved tensors as in the
        # first forward) but not recorded a second time.
        record = not _in_backward()
        q = query.transpose(1, 2)  # [B, H, L, D]
        k = key.transpose(1, 2)
        if "target_to_refs" in self.want:
            rows = q[:, :, layout.target_slice]
            # Columns of the references, counted from the start of the joint sequence.
            value = _slice_rows(rows, k, layout.refs_slice, self.chunk_elements)
            if record:
                self._add("target_to_refs", block, value)
        if "refs_to_target" in self.want:
            rows = q[:, :, layout.refs_slice]
            value = _slice_rows(rows, k[:, :, layout.target_slice], None, self.chunk_elements)
            if record:
                self._add("refs_to_target", block, value)

    def _add(self, key: str, block: str, value: torch.Tensor) -> None:
        self.maps[key].append(value)
        self.sources[key].append(block)

    def mean(self, key: str, blocks: Iterable[str] | None = None) -> torch.Tensor:
        """The recorded slices of `key` averaged over entries (blocks and forwards).

        `blocks` (resolved names) restricts the average to entries recorded by those blocks.
        """
        if key not in self.maps:
            raise KeyError(f"attention capture: {key!r} was not requested (want={sorted(self.want)})")
        entries = self.maps[key]
        if blocks is not None:
            keep = set(blocks)
            entries = [m for m, b in zip(entries, self.sources[key]) if b in keep]
        if not entries:
            raise RuntimeError(f"attention capture: no {key!r} slice recorded; run the transformer inside the "
                               f"`with` block (with at least one reference)")
        return torch.stack(entries).mean(dim=0)
