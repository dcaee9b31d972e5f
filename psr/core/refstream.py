"""Cached references: each reference in its own stream at timestep 0, its keys and values
computed once and reused by every denoising step (`model.reference_mode = "cached"`).

In the default "joint" mode every token of `[text | target | ref_1 … ref_N]` attends to every
other one and all share the target's timestep embedding, so a reference's hidden states
depend on the noisy target and cost as much as target tokens on every step. "cached" mode
follows OminiControl2's condition caching, with MOSAIC's timestep 0 for references:

- reference tokens are modulated (adaLN) with the timestep embedding of t = 0; the rest of
  that embedding (pooled prompt, guidance value) is the target's, as OminiControl computes it;
- reference i attends to its own tokens only: not to the text, the target or reference j;
- text and target tokens attend to everything: text, target and every reference.

As a mask over the joint sequence (rows are queries, columns keys; `attention_mask`):

               text  target  ref_1  ref_2
      text      ✓      ✓       ✓      ✓
      target    ✓      ✓       ✓      ✓
      ref_1     ·      ·       ✓      ·
      ref_2     ·      ·       ·      ✓

References do not read the text because the text is not fixed either: in double-stream
blocks the text tokens attend to the target, so from the second block on their keys and
values change with the noisy latents, and a reference that read them could not be cached.
The prompt still reaches a reference through the pooled embedding in its modulation.

So reference i's keys and values in every block (after the q/k RMS norms and RoPE) are a
function of its tokens, its position ids, the pooled prompt embedding and the guidance value
only: `reference_kv` computes them once per prompt, and every step runs the text and target
tokens alone with them appended to each block's keys and values.

Cost per step (N = text + target tokens, R = reference tokens, summed over references):
joint mode puts N + R tokens through every linear layer and (N + R)² pairs through attention;
cached mode, reusing the keys and values, puts N tokens through the linear layers and
N·(N + R) pairs through attention. Once per prompt, each reference goes through the network
alone (R_i tokens, R_i² pairs), and the cache holds a key and a value per reference token in
every block. Recomputed at every forward (training), the references cost their linear layers
again, but attention still drops to N·(N + R) + Σ R_i² pairs.

Everything runs diffusers' own code: the reference stream is `FluxTransformer2DModel.forward`
on one reference's tokens with an empty text sequence and timestep 0, and the target stream is
the same forward on the text and target tokens. Only the attention processor changes:
`ReferenceKVProcessor` follows `FluxAttnProcessor` step by step and, when a joint attention
kwarg asks for it, records this block's keys and values (`reference_record`) or appends the
recorded ones (`reference_kv`). Kwargs are inputs of each block call, so gradient
checkpointing recomputes a block with the same tensors.

Training runs the same two streams inside one transformer call (so a DDP wrapper sees one
forward): inside `cached_references(transformer, layout)`, a forward on `[target | refs]` is
split by a pre-hook, which runs each reference's stream (with grad) and then lets the call go
on with the target tokens and the fresh keys and values. Reference-only LoRA
(`psr.core.lora`) needs no token mask then: a block hook sets it to "every token" in a
reference stream and "no token" in the target stream, at every call, so a checkpointing
recomputation gets it right too.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from psr.core.attention import (
    FluxProcessorStandIn,
    TokenLayout,
    _in_backward,
    all_blocks,
    attend_and_project,
    joint_qkv,
)
from psr.core.lora import is_reference_only, set_lora_token_mask

_STATE = "_psr_reference_stream"
_RECORD, _KV = "reference_record", "reference_kv"


def attention_mask(layout: TokenLayout) -> torch.Tensor:
    """The cached mode's attention pattern over `[text | target | ref_1 … ref_N]`: [total,
    total] bool, True where a query (row) attends to a key (column)."""
    total = layout.total_len
    mask = torch.ones(total, total, dtype=torch.bool)
    start = layout.refs_slice.start
    mask[start:] = False
    for part in layout.ref_slices():
        rows = slice(start + part.start, start + part.stop)
        mask[rows, rows] = True
    return mask


@dataclass
class ReferenceKV:
    """Every block's reference keys and values: block name → (key, value), each
    [B, R, heads, head_dim] with references in order; B = 1 serves any batch."""

    blocks: dict[str, tuple[torch.Tensor, torch.Tensor]]
    ref_lens: tuple[int, ...]

    def get(self, block: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        key, value = self.blocks[block]
        if key.shape[0] != batch:
            if key.shape[0] != 1:
                raise ValueError(f"cached references: keys for {key.shape[0]} rows cannot serve {batch}")
            key, value = key.expand(batch, -1, -1, -1), value.expand(batch, -1, -1, -1)
        return key, value


class _Recorder:
    """Collects each block's keys and values over the forwards of one reference set."""

    def __init__(self):
        self.parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, block: str, key: torch.Tensor, value: torch.Tensor) -> None:
        # A forward during backward is a checkpointing recomputation of a block already recorded.
        if not _in_backward():
            self.parts.setdefault(block, []).append((key, value))

    def result(self, ref_lens: tuple[int, ...]) -> ReferenceKV:
        blocks = {}
        for block, parts in self.parts.items():
            if len(parts) != len(ref_lens):
                raise RuntimeError(f"cached references: {block} recorded {len(parts)} of {len(ref_lens)} references")
            blocks[block] = (torch.cat([k for k, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1))
        return ReferenceKV(blocks, ref_lens)


class ReferenceKVProcessor(FluxProcessorStandIn):
    """`FluxAttnProcessor` with the reference stream's two kwargs (module docstring); without
    them it calls the block's original `FluxAttnProcessor`, so a joint-mode forward is unchanged."""

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None,
                 image_rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
                 reference_record: _Recorder | None = None, reference_kv: ReferenceKV | None = None):
        if reference_record is None and reference_kv is None:
            self.original._attention_backend = self._attention_backend
            self.original._parallel_config = self._parallel_config
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if attention_mask is not None:
            raise ValueError(f"cached references in {self.block}: an attention mask cannot be combined")
        query, key, value = joint_qkv(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        if reference_record is not None:
            # A reference stream has no text: these are the reference's own keys and values.
            reference_record.add(self.block, key, value)
        if reference_kv is not None:
            ref_key, ref_value = reference_kv.get(self.block, query.shape[0])
            key = torch.cat([key, ref_key.to(key.dtype)], dim=1)
            value = torch.cat([value, ref_value.to(value.dtype)], dim=1)

        return attend_and_project(self, attn, query, key, value, encoder_hidden_states)


# ---------------------------------------------------------------------- installation
class _State:
    def __init__(self):
        self.layout: TokenLayout | None = None


def _install(transformer) -> _State:
    """Swap every block's `FluxAttnProcessor` for a `ReferenceKVProcessor` and add the hooks
    (once per transformer; both are inert outside cached-mode calls)."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    state = getattr(transformer, _STATE, None)
    if state is not None:
        return state
    for block in all_blocks(transformer):
        attn = transformer.get_submodule(block).attn
        if type(attn.processor) is not FluxAttnProcessor:
            raise ValueError(f"cached references: {block} uses {type(attn.processor).__name__}, only "
                             f"FluxAttnProcessor blocks can take reference keys and values")
    for block in all_blocks(transformer):
        attn = transformer.get_submodule(block).attn
        attn.set_processor(ReferenceKVProcessor(block, attn.processor))
        # A partial, not a module attribute: that would register the transformer as a submodule.
        transformer.get_submodule(block).register_forward_pre_hook(functools.partial(_block_hook, transformer),
                                                                   with_kwargs=True)
    transformer.register_forward_pre_hook(_split_hook, with_kwargs=True)
    state = _State()
    setattr(transformer, _STATE, state)
    return state


def _check_processors(transformer) -> None:
    for block in all_blocks(transformer):
        processor = transformer.get_submodule(block).attn.processor
        if not isinstance(processor, ReferenceKVProcessor):
            # e.g. an AttentionCapture, whose processor would drop the reference keys unseen
            raise ValueError(f"cached references: {block} now uses {type(processor).__name__}; attention "
                             f"capture (regularizers) needs model.reference_mode = \"joint\"")


def _block_hook(transformer, block, args, kwargs):
    """Reference-only LoRA: every token of a reference stream is a reference token, no token
    of the target stream is. Set at each block call, so recomputations see it too."""
    if not is_reference_only(transformer):
        return None
    extra = kwargs.get("joint_attention_kwargs", args[4] if len(args) > 4 else None) or {}
    if _RECORD not in extra and _KV not in extra:
        return None
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    fill = torch.ones if _RECORD in extra else torch.zeros
    set_lora_token_mask(transformer, fill(hidden.shape[1], dtype=torch.bool, device=hidden.device))
    return None


@contextlib.contextmanager
def cached_references(transformer, layout: TokenLayout):
    """Run forwards of `transformer` on `[target | refs]` (`layout`'s sizes) in cached mode:
    the pre-hook splits each call into the reference streams and the target stream, whose
    output has the target tokens only. A backward that recomputes checkpointed blocks must
    run inside it, like the forward."""
    state = _install(transformer)
    previous, state.layout = state.layout, layout
    try:
        yield
    finally:
        state.layout = previous


def _split_hook(transformer, args, kwargs):
    state = getattr(transformer, _STATE)
    extra = kwargs.get("joint_attention_kwargs") or {}
    if _KV in extra or _RECORD in extra:
        _check_processors(transformer)
        return None
    layout = state.layout
    if layout is None or not layout.ref_lens:
        return None
    if args:
        raise ValueError("cached references: call the transformer with keyword arguments")
    _check_processors(transformer)
    hidden, ids = kwargs["hidden_states"], kwargs["img_ids"]
    target = layout.target_len
    if hidden.shape[1] != layout.image_len or ids.shape[0] != layout.image_len:
        raise ValueError(f"cached references: the forward has {hidden.shape[1]} image tokens, the layout says "
                         f"{layout.target_len} target + {layout.refs_len} reference tokens")
    kv = reference_kv(transformer, hidden[:, target:], ids[target:], layout.ref_lens,
                      pooled=kwargs["pooled_projections"], guidance=kwargs.get("guidance"),
                      text=kwargs["encoder_hidden_states"], txt_ids=kwargs["txt_ids"])
    return args, {**kwargs, "hidden_states": hidden[:, :target], "img_ids": ids[:target],
                  "joint_attention_kwargs": {**extra, _KV: kv}}


def reference_kv(transformer, tokens: torch.Tensor, ids: torch.Tensor, ref_lens: Sequence[int], *,
                 pooled: torch.Tensor, guidance: torch.Tensor | None, text: torch.Tensor,
                 txt_ids: torch.Tensor) -> ReferenceKV:
    """Run each reference alone through `transformer` at timestep 0 and return every block's
    keys and values. tokens [B, R, C] (references in order), ids [R, 3], pooled [B, P],
    guidance [B] or None (the target's), text [B, T, D] (only its width and dtype are used;
    the reference stream has no text tokens)."""
    _install(transformer)
    _check_processors(transformer)
    ref_lens = tuple(int(n) for n in ref_lens)
    if tokens.shape[1] != sum(ref_lens) or ids.shape[0] != sum(ref_lens):
        raise ValueError(f"cached references: {tokens.shape[1]} tokens and {ids.shape[0]} ids for references "
                         f"of {ref_lens} tokens")
    recorder = _Recorder()
    batch = tokens.shape[0]
    zero = torch.zeros(batch, device=tokens.device, dtype=tokens.dtype)
    start = 0
    for n in ref_lens:
        # `forward`, not `__call__`: the pre-hook would split this call again.
        transformer.forward(hidden_states=tokens[:, start:start + n], encoder_hidden_states=text[:, :0],
                            pooled_projections=pooled, timestep=zero, img_ids=ids[start:start + n],
                            txt_ids=txt_ids[:0], guidance=guidance,
                            joint_attention_kwargs={_RECORD: recorder}, return_dict=False)
        start += n
    return recorder.result(ref_lens)
