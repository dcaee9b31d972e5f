"""Memory plan of a `psr pretrain` or `psr rl` recipe: what one training process holds on its GPU.

Nothing is loaded and nothing is allocated. The transformer is built on the meta device from
its config (FLUX.1-dev / Kontext: their published config; `tiny`: its builder; `embedded` or
a local model folder: the folder's configs), so parameter counts and the shapes of the
layers an adapter wraps are exact. The rows of a plan:

- weights: the frozen transformer in `model.dtype`, the trained weights in float32 (psr
  keeps float32 master weights of whatever it trains, `apply_adapter`), and the frozen text
  encoders and VAE in `model.dtype` (none on the GPU with `model.cpu_offload`);
- gradients: float32, one per trained weight;
- optimizer: AdamW's two float32 moments per trained weight;
- EMA: a float32 copy of the trained weights, on the main process only;
- optimizer step scratch: the float32 temporary foreach AdamW allocates inside `step()`;
- DDP buckets: DistributedDataParallel's flat gradient buffers (several processes), or
  under FSDP (FULL_SHARD) the weights, gradients and optimizer state divided among the
  processes plus the gathered weights of two blocks;
- activations: the tensors autograd keeps between forward and backward
  (`block_activations`), plus the working memory of one block's backward.

Gradients only exist from the first backward of an optimizer step until `zero_grad`, and
they grow during backward while the activations are freed, so the peak is the weights,
optimizer state and EMA plus the larger of the backward phase (activations and the
gradients that exist so far, walked block by block; all gradients when an earlier backward
of the same optimizer step allocated them) and the optimizer step (gradients plus scratch).

An rl recipe's sections (`objective`, `rollout`) are read by name, so this module sits in
`psr.train`, below `psr.rl`, and `psr.cli` passes it either kind of recipe.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from psr.core.attention import DEFAULT_CHUNK_ELEMENTS, KEEP_ELEMENTS
from psr.core.images import reference_fit_size
from psr.core.lora import resolve_lora_targets
from psr.core.moe_lora import MOE_TARGETS, resolve_moe_targets
from psr.core.presets import PRESETS
from psr.core.regularizers import capture_plan
from psr.core.schema import resolve_model
from psr.core.tiny import build_tiny_components
from psr.errors import UserError

GIB = 1 << 30
MIB = 1 << 20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
STRATEGIES = ("ddp", "fsdp")

# The published FLUX.1-dev transformer config; FLUX.1 Kontext [dev] has the same one.
FLUX_TRANSFORMER = {
    "patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128,
    "num_attention_heads": 24, "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True,
    "axes_dims_rope": (16, 56, 56),
}
# Parameters of FLUX.1's frozen components, counted from their configs on the meta device
# (T5 v1.1 XXL encoder with its embedding tied, CLIP ViT-L/14 text model, the 16-channel VAE).
FLUX_FROZEN = {"text_encoder_2": 4_762_310_656, "text_encoder": 123_060_480, "vae": 83_819_683}
FROZEN_NAMES = {"text_encoder_2": "T5", "text_encoder": "CLIP", "vae": "VAE"}

# Working memory of backward, in [batch, joint, width] activation tensors, on top of the saved
# tensors of the block being differentiated: the gradients alive together while the widest
# part of a block is differentiated (a single block's 5-wide proj_out input gradient with the
# 4-wide GELU input gradient, the residual gradient and the one being accumulated). Measured
# on the tiny and embedded presets (bench/bench_plan.py) with LoRA, where gradients do not
# blur it, with and without checkpointing: 10.7 to 11.4.
BACKWARD_WORKING_SET = 11


# ---------------------------------------------------------------------------- architecture
@dataclass(frozen=True)
class Architecture:
    """The sizes of a FluxTransformer2DModel that the activation model reads."""

    width: int
    heads: int
    head_dim: int
    double: int
    single: int
    in_channels: int
    out_channels: int
    text_width: int
    """joint_attention_dim: the width of the T5 features the context embedder reads."""

    @classmethod
    def of(cls, transformer) -> Architecture:
        c = transformer.config
        return cls(width=transformer.inner_dim, heads=c.num_attention_heads, head_dim=c.attention_head_dim,
                   double=c.num_layers, single=c.num_single_layers, in_channels=c.in_channels,
                   out_channels=c.out_channels or c.in_channels, text_width=c.joint_attention_dim)


def _meta_flux(config: dict):
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        return FluxTransformer2DModel(**config)


def _folder_configs(folder: Path):
    """(meta transformer, frozen parameter counts) from a diffusers FLUX folder's configs."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    modules = {}
    with init_empty_weights():
        config = FluxTransformer2DModel.load_config(str(folder / "transformer"))
        transformer = FluxTransformer2DModel.from_config(config)
        if (folder / "text_encoder_2" / "config.json").is_file():
            modules["text_encoder_2"] = T5EncoderModel(T5Config.from_pretrained(str(folder / "text_encoder_2")))
        if (folder / "text_encoder" / "config.json").is_file():
            modules["text_encoder"] = CLIPTextModel(CLIPTextConfig.from_pretrained(str(folder / "text_encoder")))
        if (folder / "vae" / "config.json").is_file():
            modules["vae"] = AutoencoderKL.from_config(AutoencoderKL.load_config(str(folder / "vae")))
    return transformer, {name: _count(module) for name, module in modules.items()}


def _count(module) -> int:
    """Parameters of a module, a tied weight once. A module built under `init_empty_weights`
    has its embeddings untied (T5's encoder and shared tables), so they are tied first."""
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    return sum(p.numel() for p in module.parameters())


def model_skeleton(model) -> tuple[Any, dict[str, int], str]:
    """(transformer on the meta device, frozen components' parameter counts, where the sizes
    came from) for a resolved `ModelConfig`."""
    from accelerate import init_empty_weights

    preset = model.preset
    local = Path(model.path).expanduser() if model.path else None
    has_folder = local is not None and (local / "transformer" / "config.json").is_file()
    if preset == "tiny":
        with init_empty_weights():
            components = build_tiny_components(seed=model.init_seed, dtype="float32")
        frozen = {name: _count(getattr(components, name)) for name in FLUX_FROZEN}
        return components.transformer, frozen, "the tiny builder (psr.core.tiny)"
    if preset in ("flux-dev", "flux-kontext"):
        if has_folder:
            transformer, _ = _folder_configs(local)
            return transformer, dict(FLUX_FROZEN), f"{local / 'transformer' / 'config.json'}"
        return _meta_flux(FLUX_TRANSFORMER), dict(FLUX_FROZEN), "FLUX.1's published transformer config"
    if not has_folder:
        raise UserError(f"model.path {model.path}: no transformer/config.json there, so the sizes of preset "
                        f"{preset!r} are unknown; point model.path at a diffusers FLUX folder")
    transformer, frozen = _folder_configs(local)
    return transformer, frozen, f"{local}"


# ---------------------------------------------------------------------------- adapters
@dataclass
class AdapterLayers:
    """What an adapter trains: parameter count and the wrapped layers' (in, out) features."""

    kind: str
    trainable: int
    lora: dict[str, tuple[int, int]] = field(default_factory=dict)
    moe: dict[str, tuple[int, int]] = field(default_factory=dict)
    rank: int = 0
    experts: int = 0
    dropout: float = 0.0


def _features(module) -> tuple[int, int]:
    """(in, out) of a linear layer, or of a feed-forward stack (first in, last out)."""
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return linears[0].in_features, linears[-1].out_features


def adapter_layers(transformer, adapter) -> AdapterLayers:
    """The layers `apply_adapter` would wrap (same target resolution) and what they train:
    LoRA adds rank·(in + out) per layer (peft's A and B, no bias); a MoE-LoRA expert set
    adds a router (in·K + K) and K·rank·(in + out)."""
    if adapter.kind == "none":
        return AdapterLayers("none", _count(transformer))
    if adapter.kind == "lora":
        names = resolve_lora_targets(transformer, adapter.targets or ("attn",), adapter.blocks, adapter.reference_only)
        shapes = {n: _features(transformer.get_submodule(n)) for n in names}
        count = sum(adapter.rank * (i + o) for i, o in shapes.values())
        return AdapterLayers("lora", count, lora=shapes, rank=adapter.rank, dropout=adapter.dropout)
    names = resolve_moe_targets(transformer, adapter.blocks, adapter.targets or MOE_TARGETS)
    shapes = {n: _features(transformer.get_submodule(n)) for n in names}
    k, r = adapter.experts, adapter.rank
    count = sum(i * k + k + k * r * (i + o) for i, o in shapes.values())
    return AdapterLayers("moe_lora", count, moe=shapes, rank=r, experts=k)


# ---------------------------------------------------------------------------- activations
@dataclass(frozen=True)
class Tokens:
    """The sequence of one training forward: `batch` rows of [text | target | refs]."""

    batch: int
    text: int
    target: int
    refs: tuple[int, ...] = ()

    @property
    def image(self) -> int:
        return self.target + sum(self.refs)

    @property
    def joint(self) -> int:
        return self.text + self.image

    def count(self, kind: str) -> int:
        return {"txt": self.text, "img": self.image, "joint": self.joint, "target": self.target}[kind]


@dataclass(frozen=True)
class Precision:
    """How the forward computes: autocast or not, on CUDA or on the CPU.

    Under CUDA autocast LayerNorm runs in float32 (an input copy is saved) and FLUX's
    modulation `norm(x)·(1 + scale) + shift` promotes to float32; CPU autocast keeps
    LayerNorm in bfloat16. Every matmul under autocast saves its own 16-bit copy of an
    input that is not 16-bit already."""

    autocast: bool
    cuda: bool
    weights: int
    """Bytes per element of the frozen base weights (the dtype RMSNorm casts back to)."""
    inputs: int
    """Bytes per element of the transformer's inputs (`input_dtype`)."""

    @property
    def norms_fp32(self) -> bool:
        return self.autocast and self.cuda

    @property
    def act(self) -> int:
        """Bytes per element of a linear layer's output."""
        return 2 if self.autocast else self.weights


class _T:
    """A symbolic activation: width per token, which tokens, bytes per element, grad."""

    __slots__ = ("width", "tokens", "size", "grad")

    def __init__(self, width: float, tokens: str, size: int, grad: bool):
        self.width, self.tokens, self.size, self.grad = width, tokens, size, grad


class _Trace:
    """Walks a FLUX forward op by op as diffusers, peft and psr write it, and records what
    autograd saves for backward: an op saves an input only if the gradient of another input
    that requires grad needs it (a frozen linear layer keeps no input). Saved tensors are
    kept by identity, so a tensor that several ops save counts once."""

    def __init__(self, prec: Precision, full: bool, layers: AdapterLayers, heads: int):
        self.p, self.full, self.layers, self.heads = prec, full, layers, heads
        self.saved: dict[int, _T] = {}

    def save(self, t: _T) -> None:
        self.saved[id(t)] = t

    def bytes(self, tokens: Tokens) -> int:
        return sum(int(t.width * tokens.count(t.tokens)) * t.size for t in self.saved.values()) * tokens.batch

    def new(self, like: _T, width: float | None = None, size: int | None = None, grad: bool | None = None) -> _T:
        return _T(like.width if width is None else width, like.tokens, like.size if size is None else size,
                  like.grad if grad is None else grad)

    def matmul_input(self, x: _T) -> _T:
        """The tensor a matmul actually reads: under autocast a fresh 16-bit copy (autocast
        caches the casts of weights only), else x itself."""
        return self.new(x, size=2) if self.p.autocast and x.size != 2 else x

    def linear(self, x: _T, name: str, out: float) -> _T:
        """A linear layer, with peft's LoRA branch when `name` has one."""
        trains = self.full
        if trains:  # the weight's gradient reads the input
            self.save(self.matmul_input(x))
        grad = x.grad or trains
        if name in self.layers.lora:
            # peft casts x to the float32 LoRA weights, then autocast casts it back: a copy
            # per LoRA layer; without autocast lora_A reads x itself.
            xa = self.new(x, size=2) if self.p.autocast else x
            if self.layers.dropout > 0:
                # CUDA's fused dropout keeps a bool mask, the CPU path a scaled noise tensor.
                self.save(self.new(xa, size=1 if self.p.cuda else xa.size))
                xa = self.new(xa)
            self.save(xa)
            self.save(self.new(x, width=self.layers.rank, size=self.p.act, grad=True))  # lora_A's output
            grad = True
        return _T(out, x.tokens, self.p.act, grad)

    def layer_norm(self, x: _T) -> _T:
        xin = self.new(x, size=4) if self.p.norms_fp32 and x.size != 4 else x
        if x.grad:
            self.save(xin)
        return self.new(x, size=4 if self.p.norms_fp32 else x.size)

    def modulate(self, x: _T) -> _T:
        """norm(x)·(1 + scale) + shift with scale and shift from a frozen (or trained) linear."""
        if self.full:
            self.save(x)
        return self.new(x, size=max(x.size, self.p.act), grad=x.grad or self.full)

    def rms_norm(self, q: _T) -> _T:
        """diffusers' RMSNorm: float32 variance of q, q·rsqrt, cast to the weight's dtype, ·weight."""
        if q.grad:
            self.save(q if q.size == 4 else self.new(q, size=4))  # pow's input (the float32 copy)
            self.save(q)                                           # the product's other factor
        weight = 4 if self.full else self.p.weights
        h = self.new(q, size=4)
        if weight == 2:
            h = self.new(h, size=2)
        if self.full:
            self.save(h)
        return self.new(q, size=max(h.size, weight), grad=q.grad or self.full)

    def gelu(self, x: _T) -> _T:
        if x.grad:
            self.save(x)
        return self.new(x)

    def gate(self, x: _T) -> _T:
        """gate·x with the gate from the modulation linear: x is saved if the gate trains."""
        if self.full:
            self.save(x)
        return self.new(x, grad=x.grad or self.full)

    def sdpa(self, q: _T, k: _T, v: _T) -> _T:
        grad = q.grad or k.grad or v.grad
        out = _T(q.width, "joint", 2 if self.p.autocast else q.size, grad)
        if grad:  # flash / memory-efficient kernels save q, k, v, the output and log-sum-exp
            for t in (q, k, v):
                self.save(self.matmul_input(t))
            self.save(out)
            self.save(_T(self.heads, "joint", 4, False))
        return out

    def feed_forward(self, x: _T, prefix: str, width: int) -> _T:
        if prefix in self.layers.moe:
            return self.moe(x, lambda: self.linear(self.gelu(self.linear(x, f"{prefix}.net.0.proj", 4 * width)),
                                                   f"{prefix}.net.2", width))
        h = self.gelu(self.linear(x, f"{prefix}.net.0.proj", 4 * width))
        return self.linear(h, f"{prefix}.net.2", width)

    def moe(self, x: _T, base) -> _T:
        """MoELoRA.forward: the frozen module, a router on x, dense experts gated per token."""
        y = base()
        k, r = self.layers.experts, self.layers.rank
        self.save(self.matmul_input(x))                       # router input
        self.save(self.new(x, size=2) if self.p.autocast else x)  # experts' input (float32 cast, then autocast's)
        self.save(self.new(x, width=k, size=4, grad=True))    # router probabilities
        self.save(self.new(x, width=k * r, size=self.p.act, grad=True))  # x·A
        self.save(self.new(x, width=k * r, size=self.p.act, grad=True))  # gated x·A, read by ·B
        return self.new(y, grad=True)


def _double_block(tr: _Trace, i: int, img: _T, txt: _T, width: int) -> tuple[_T, _T]:
    """FluxTransformerBlock.forward (diffusers), both streams."""
    name = f"transformer_blocks.{i}"
    streams = {}
    for key, x, q_name, k_name, v_name in (("img", img, "to_q", "to_k", "to_v"),
                                           ("txt", txt, "add_q_proj", "add_k_proj", "add_v_proj")):
        n = tr.modulate(tr.layer_norm(x))
        q = tr.rms_norm(tr.linear(n, f"{name}.attn.{q_name}", width))
        k = tr.rms_norm(tr.linear(n, f"{name}.attn.{k_name}", width))
        v = tr.linear(n, f"{name}.attn.{v_name}", width)
        streams[key] = (q, k, v)
    joint = [_T(width, "joint", max(a.size, b.size), a.grad or b.grad)
             for a, b in zip(streams["txt"], streams["img"])]
    q, k, v = joint
    # RoPE: (q·cos + rot(q)·sin) in float32, cast back to q's dtype; cos and sin need no grad.
    q, k = tr.new(q), tr.new(k)
    out = tr.sdpa(q, k, v)
    out = tr.new(out, size=q.size)  # .to(query.dtype)
    outs = []
    for key, x, out_name, ff in (("img", img, "to_out.0", "ff"), ("txt", txt, "to_add_out", "ff_context")):
        part = _T(width, key, out.size, out.grad)  # split + contiguous
        a = tr.gate(tr.linear(part, f"{name}.attn.{out_name}", width))
        h = _T(width, key, max(x.size, a.size), x.grad or a.grad)
        n = tr.modulate(tr.layer_norm(h))
        f = tr.gate(tr.feed_forward(n, f"{name}.{ff}", width))
        outs.append(_T(width, key, h.size, h.grad or f.grad))
    return outs[0], outs[1]


def _single_block(tr: _Trace, i: int, x: _T, width: int) -> _T:
    """FluxSingleTransformerBlock.forward (diffusers) on the joint sequence."""
    name = f"single_transformer_blocks.{i}"
    n = tr.modulate(tr.layer_norm(x))
    if f"{name}.proj_mlp" in tr.layers.moe:
        mlp = tr.gelu(tr.moe(n, lambda: tr.linear(n, f"{name}.proj_mlp", 4 * width)))
    else:
        mlp = tr.gelu(tr.linear(n, f"{name}.proj_mlp", 4 * width))
    q = tr.new(tr.rms_norm(tr.linear(n, f"{name}.attn.to_q", width)))
    k = tr.new(tr.rms_norm(tr.linear(n, f"{name}.attn.to_k", width)))
    v = tr.linear(n, f"{name}.attn.to_v", width)
    out = tr.new(tr.sdpa(q, k, v), size=q.size)
    cat = _T(5 * width, "joint", max(out.size, mlp.size), out.grad or mlp.grad)
    p = tr.gate(tr.linear(cat, f"{name}.proj_out", width))
    return _T(width, "joint", max(x.size, p.size), x.grad or p.grad)


@dataclass
class Stage:
    """A part of the forward in order: what it keeps until backward reaches it, and what
    backward rebuilds there (a checkpointed block's saved tensors)."""

    name: str
    held: int
    rebuilt: int = 0


@dataclass
class Activations:
    """Estimated activation bytes of one forward + backward, and how they add up."""

    stages: list[Stage]
    """head (embedders, RoPE tables), every block, tail (norm_out, proj_out, loss), in forward order."""
    maps: int
    """Attention slices the regularizers keep until backward."""
    working: int
    """Transient bytes on top of what is held: one block's backward working set
    (BACKWARD_WORKING_SET joint tensors), or the regularizers' largest transient if larger."""
    per_block: dict[str, float]
    """Saved tensors of the first block of each kind, in [batch, joint, width] activation tensors."""

    @property
    def held(self) -> int:
        """Bytes kept from the forward until backward (without the rebuilt block)."""
        return sum(s.held for s in self.stages) + self.maps

    @property
    def rebuilt(self) -> int:
        return max(s.rebuilt for s in self.stages)

    @property
    def blocks(self) -> int:
        return sum(s.held for s in self.stages if s.name not in ("head", "tail"))

    @property
    def outside(self) -> int:
        return sum(s.held for s in self.stages if s.name in ("head", "tail"))

    def peak(self, grads: dict[str, int], grads_before: int = 0) -> int:
        """Peak bytes of activations plus gradients while backward runs, stage by stage from
        the end: a stage's held (and rebuilt) tensors are alive until its backward, and the
        gradients of its trained weights exist from then on. `grads`: gradient bytes per
        stage name; `grads_before`: gradient bytes already allocated (an earlier backward of
        the same optimizer step)."""
        held = self.held
        have = grads_before
        peak = 0
        for stage in reversed(self.stages):
            peak = max(peak, held + stage.rebuilt + have + self.working)
            held -= stage.held
            if not grads_before:
                have += grads.get(stage.name, 0)
            peak = max(peak, held + have + self.working)
        return peak


def regularizer_maps(tokens: Tokens, heads: int, maps, blocks: int) -> tuple[int, int, int]:
    """(bytes kept until backward, bytes each capturing block saves inside its own graph,
    bytes of the largest transient) of the attention slices the regularizers capture
    (`psr.core.attention`). Per block and map a head-averaged float32 [B, queries, keys]
    slice is kept; when a loss averages a map over the blocks, the blocks' slices are stacked
    once more for a moment. A slice whose [B, heads, queries, all keys] probabilities fit
    KEEP_ELEMENTS also saves those probabilities in the block; larger ones are recomputed in
    backward in chunks of about DEFAULT_CHUNK_ELEMENTS (logits, probabilities and their
    gradients)."""
    kept, per_block, transient = 0, 0, 0
    refs = sum(tokens.refs)
    if not refs or not blocks:
        return 0, 0, 0
    for kind in maps:
        queries, keys, all_keys = (tokens.target, refs, tokens.joint) if kind == "target_to_refs" else \
            (refs, tokens.target, tokens.target)
        sliced = 4 * blocks * tokens.batch * queries * keys
        kept += sliced
        transient = max(transient, sliced)  # torch.stack in AttentionCapture.mean
        probs = tokens.batch * heads * queries * all_keys
        if probs <= min(KEEP_ELEMENTS, DEFAULT_CHUNK_ELEMENTS):
            per_block += 4 * probs
        else:
            transient = max(transient, 4 * 4 * min(probs, DEFAULT_CHUNK_ELEMENTS))
    return kept, per_block, transient


def block_activations(arch: Architecture, layers: AdapterLayers, prec: Precision, tokens: Tokens,
                      checkpointing: bool, maps=(), map_blocks=()) -> Activations:
    """Activation memory of one training forward + backward over `tokens`.

    Without checkpointing every block keeps its saved tensors until backward reaches it, so
    the peak is their sum plus what is saved outside the blocks and one block's backward
    working set. With checkpointing (diffusers runs each block under non-reentrant
    `torch.utils.checkpoint`) a block keeps only its inputs, and backward rebuilds one
    block's saved tensors at a time. `maps` in the blocks named by `map_blocks`: the
    attention slices the regularizers capture (`regularizer_maps`).
    """
    full = layers.kind == "none"
    width = arch.width
    outer = _Trace(prec, full, layers, arch.heads)
    unit = tokens.batch * tokens.joint * width * prec.act
    outer.save(_T(2 * arch.head_dim, "joint", 4, False))  # RoPE cos and sin, read by every block
    img = outer.linear(_T(arch.in_channels, "img", prec.inputs, False), "x_embedder", width)
    txt = outer.linear(_T(arch.text_width, "txt", prec.inputs, False), "context_embedder", width)
    stages = [Stage("head", outer.bytes(tokens))]
    per_block = {}
    kept_maps, map_saved, map_transient = regularizer_maps(tokens, arch.heads, maps, len(map_blocks))
    joint = None
    for kind, prefix, count in (("double", "transformer_blocks", arch.double),
                                ("single", "single_transformer_blocks", arch.single)):
        for i in range(count):
            tr = _Trace(prec, full, layers, arch.heads)
            if kind == "double":
                inputs = (img, txt)
                img, txt = _double_block(tr, i, img, txt, width)
            else:
                if joint is None:
                    joint = _T(width, "joint", max(img.size, txt.size), img.grad or txt.grad)
                inputs = (joint,)
                joint = _single_block(tr, i, joint, width)
            per_block.setdefault(kind, tr.bytes(tokens) / unit)
            block = tr.bytes(tokens) + (map_saved if f"{prefix}.{i}" in map_blocks else 0)
            if checkpointing:  # the checkpoint keeps the block's inputs for the recomputation
                kept = sum(int(t.width * tokens.count(t.tokens)) * t.size for t in inputs) * tokens.batch
                stages.append(Stage(f"{prefix}.{i}", kept, block))
            else:
                stages.append(Stage(f"{prefix}.{i}", block))
    last = joint if joint is not None else img
    # norm_out (AdaLayerNormContinuous) on the image tokens, proj_out, the target slice, the loss.
    head = outer.bytes(tokens)
    tail = _T(width, "img", last.size, last.grad)
    if prec.norms_fp32 or not last.grad:
        n = outer.modulate(outer.layer_norm(tail))
    else:  # LayerNorm saves its input: a view that keeps the whole joint tensor
        outer.save(last)
        n = outer.modulate(outer.new(tail))
    pred = outer.linear(n, "proj_out", arch.out_channels)
    outer.save(_T(arch.out_channels, "target", 4, pred.grad))     # pred.float() for the float32 loss
    outer.save(_T(arch.out_channels, "target", 4, False))         # the velocity target
    stages.append(Stage("tail", outer.bytes(tokens) - head))
    # The maps' transients come at the loss or inside one block's backward, not together with
    # the rest of a block's working set.
    working = max(BACKWARD_WORKING_SET * unit, map_transient)
    return Activations(stages=stages, maps=kept_maps, working=working, per_block=per_block)


def stage_gradients(transformer, layers: AdapterLayers) -> dict[str, int]:
    """Float32 gradient bytes per stage (`Stage.name`) of what the adapter trains."""
    out: dict[str, int] = {}

    def stage_of(name: str) -> str:
        parts = name.split(".")
        if parts[0] in ("transformer_blocks", "single_transformer_blocks"):
            return ".".join(parts[:2])
        return "tail" if parts[0] in ("norm_out", "proj_out") else "head"

    if layers.kind == "none":
        for name, param in transformer.named_parameters():
            key = stage_of(name)
            out[key] = out.get(key, 0) + 4 * param.numel()
        return out
    k, r = layers.experts, layers.rank
    for name, (i, o) in layers.lora.items():
        out[stage_of(name)] = out.get(stage_of(name), 0) + 4 * r * (i + o)
    for name, (i, o) in layers.moe.items():
        out[stage_of(name)] = out.get(stage_of(name), 0) + 4 * (i * k + k + k * r * (i + o))
    return out


# ---------------------------------------------------------------------------- plan
@dataclass
class Row:
    name: str
    bytes: int
    note: str = ""


@dataclass
class Plan:
    recipe: str
    command: str
    preset: str
    source: str
    processes: int
    strategy: str
    rows: list[Row]
    peak: int
    sum_of_rows: int
    parameters: dict[str, int]
    tokens: dict[str, Any]
    activations: dict[str, Any]
    assumptions: list[str]

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["peak_gib"] = round(self.peak / GIB, 3)
        return data


def _tokens_of(side: int, stride: int) -> int:
    return (side // stride) ** 2


def forward_shape(recipe, size: int | None = None, references: int | None = None) -> tuple[Tokens, int, str]:
    """(tokens of the largest gradient forward, backward passes per optimizer step, what that
    means in words) for a resolved recipe. Each backward follows its own forward, so one
    forward's graph is alive at a time."""
    model = recipe.model
    preset = PRESETS[model.preset]
    stride = preset.token_stride
    count = recipe.data.max_references if references is None else references
    if not 0 <= count <= model.max_references:
        raise UserError(f"--references {count}: must lie in [0, model.max_references={model.max_references}]")
    if size is not None and (size < stride or size % stride):
        raise UserError(f"--size {size}: must be a positive multiple of the token stride ({stride} px)")
    ref_w, ref_h = reference_fit_size(model.reference_size, model.reference_size, model.resize_rule,
                                      model.reference_size, stride)
    refs = (ref_w // stride * (ref_h // stride),) * count
    text = model.max_sequence_length
    if recipe.command == "pretrain":
        side = size or recipe.samples.size or preset.size
        tokens = Tokens(recipe.train.batch_size, text, _tokens_of(side, stride), refs)
        # Rows whose references are dropped form their own group, with its own backward.
        groups = 2 if recipe.train.batch_size > 1 and recipe.train.drop_refs + recipe.train.drop_both > 0 else 1
        backwards = recipe.train.grad_accum * groups
        what = (f"pretrain: {recipe.train.batch_size} row(s) of {side} px per micro-step, "
                f"{recipe.train.grad_accum} micro-step(s) per step")
        return tokens, backwards, what
    side = size or recipe.rollout.size or preset.size
    if recipe.objective == "focusdpo":
        tokens = Tokens(2, text, _tokens_of(side, stride), refs)  # winner and loser in one forward
        pairs = recipe.rollout.groups_per_step
        return tokens, pairs, f"focusdpo: one pair (2 rows) of {side} px per backward, {pairs} pair(s) per step"
    # GRPO and GSPO backpropagate each (group, trained step, micro-batch) on its own; GSPO
    # gets its sequence ratios from a pass without gradients first.
    g = recipe.rollout.group_size
    batch = min(g, getattr(recipe.train, "micro_batch", 0) or g)
    steps = len(recipe.rollout.train_steps) or max(1, round(recipe.rollout.train_fraction * recipe.rollout.steps))
    rows = recipe.rollout.groups_per_step * g // getattr(recipe.policy, "mini_batches", 1)
    backwards = max(1, math.ceil(rows / batch)) * steps
    what = (f"{recipe.objective}: {batch} of a group's {g} rollouts of {side} px per forward, one trained step at "
            f"a time, {backwards} backwards per optimizer step")
    return Tokens(batch, text, _tokens_of(side, stride), refs), backwards, what


@dataclass
class Analysis:
    """Everything a plan is computed from, for one recipe."""

    recipe: Any
    transformer: Any
    frozen: dict[str, int]
    source: str
    arch: Architecture
    layers: AdapterLayers
    precision: Precision
    tokens: Tokens
    backwards: int
    shape_note: str
    checkpointing: bool
    maps: tuple[str, ...]
    map_blocks: int
    act: Activations

    grads: dict[str, int]
    """Gradient bytes per stage (`stage_gradients`)."""

    @property
    def activations(self) -> int:
        """Peak activation bytes of a step, without gradients."""
        return self.act.peak({})

    def backward_peak(self) -> int:
        """Estimated peak above the weights of one forward + backward that starts without
        gradients (what `psr.train.memory.measure_step` measures)."""
        return self.act.peak(self.grads)


def analyse(recipe, *, size: int | None = None, references: int | None = None, device: str = "cuda",
            source_name: str = "recipe") -> Analysis:
    """Build the meta transformer of a `PretrainRecipe` or `RlRecipe` and estimate one step.

    `size`: target side in pixels (default: `rollout.size` for rl, the preset's size for
    pretrain); `references`: references per row (default `data.max_references`). `device`
    "cpu" applies CPU autocast's rules (LayerNorm stays 16-bit), for checks on the CPU."""
    if recipe.command not in ("pretrain", "rl"):
        raise UserError(f"{source_name}: a memory plan needs a pretrain or rl recipe, this is a "
                        f"{recipe.command} recipe")
    model = resolve_model(recipe.model)
    recipe = dataclasses.replace(recipe, model=model)
    transformer, frozen, source = model_skeleton(model)
    arch = Architecture.of(transformer)
    layers = adapter_layers(transformer, recipe.adapter)
    full = layers.kind == "none"
    wbytes = DTYPE_BYTES[model.dtype]
    autocast = recipe.train.mixed_precision in ("bf16", "fp16")
    prec = Precision(autocast=autocast, cuda=device == "cuda", weights=4 if full else wbytes,
                     inputs=4 if full else wbytes)
    tokens, backwards, shape_note = forward_shape(recipe, size, references)
    checkpointing = bool(getattr(recipe.train, "gradient_checkpointing", False))
    maps, blocks = (), ()
    if recipe.command == "pretrain" and tokens.refs:
        maps, blocks = capture_plan(recipe.regularizers, transformer)
    maps = tuple(sorted(maps))
    act = block_activations(arch, layers, prec, tokens, checkpointing, maps, tuple(blocks))
    return Analysis(recipe=recipe, transformer=transformer, frozen=frozen, source=source, arch=arch, layers=layers,
                    precision=prec, tokens=tokens, backwards=backwards, shape_note=shape_note,
                    checkpointing=checkpointing, maps=maps, map_blocks=len(blocks), act=act,
                    grads=stage_gradients(transformer, layers))


def memory_plan(recipe, *, processes: int = 1, strategy: str = "ddp", size: int | None = None,
                references: int | None = None, device: str = "cuda", source_name: str = "recipe") -> Plan:
    """The memory plan of a `PretrainRecipe` or `RlRecipe` (module docstring) for one of
    `processes` training processes under `strategy` ("ddp": every process holds everything;
    "fsdp": FULL_SHARD, weights, gradients and optimizer state divided among processes).
    `size`, `references`, `device`: as `analyse`."""
    if processes < 1:
        raise UserError(f"--processes {processes}: must be >= 1")
    if strategy not in STRATEGIES:
        raise UserError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
    an = analyse(recipe, size=size, references=references, device=device, source_name=source_name)
    recipe, model, transformer, frozen, source = an.recipe, an.recipe.model, an.transformer, an.frozen, an.source
    arch, layers, prec, tokens, act = an.arch, an.layers, an.precision, an.tokens, an.act
    backwards, shape_note, checkpointing = an.backwards, an.shape_note, an.checkpointing
    total_params = _count(transformer)
    full = layers.kind == "none"
    wbytes = DTYPE_BYTES[model.dtype]
    mp = recipe.train.mixed_precision
    autocast = prec.autocast
    map_note = (f"regularizers capture {' and '.join(an.maps)} attention slices in {an.map_blocks} block(s) "
                f"(counted in the activations)") if an.maps else ""
    activations = an.activations

    trainable = layers.trainable
    shard = processes if strategy == "fsdp" else 1
    frozen_params = 0 if full else total_params
    rows = [
        Row("weights, frozen", math.ceil(frozen_params * wbytes / shard),
            f"{frozen_params:,} transformer parameters in {model.dtype}" if frozen_params else "none (full fine-tune)"),
        Row("weights, trained", math.ceil(trainable * 4 / shard), f"{trainable:,} parameters in float32"),
    ]
    encoders = sum(frozen.values())
    if model.cpu_offload:
        rows.append(Row("text encoders + VAE", 0, f"{encoders:,} parameters kept on the CPU (model.cpu_offload); "
                                                  f"each visits the GPU only while it encodes"))
    else:
        rows.append(Row("text encoders + VAE", encoders * wbytes,
                        ", ".join(f"{FROZEN_NAMES[k]} {_millions(v)}" for k, v in frozen.items())
                        + f" parameters in {model.dtype}"))
    grads = math.ceil(trainable * 4 / shard)
    optimizer = math.ceil(trainable * 8 / shard)
    ema = trainable * 4 if recipe.train.ema_decay > 0 else 0
    scratch = math.ceil(trainable * 4 / shard)
    rows += [
        Row("gradients", grads, "float32; alive from the first backward of a step to zero_grad"),
        Row("optimizer (AdamW)", optimizer, "exp_avg + exp_avg_sq, float32"),
        Row("optimizer step scratch", scratch, "foreach AdamW's float32 temporary, only inside optimizer.step()"),
        Row("EMA", ema, f"float32 copy of the trained weights, main process only (ema_decay {recipe.train.ema_decay})"
            if ema else "off"),
    ]
    buckets = trainable * 4 if strategy == "ddp" and processes > 1 else 0
    if strategy == "ddp":
        rows.append(Row("DDP buckets", buckets, "DistributedDataParallel's flat gradient buffers"
                        if buckets else "none: one process is not wrapped in DDP"))
    gather = 0
    if strategy == "fsdp" and processes > 1:
        block_params = max(_count(b) for b in [*transformer.transformer_blocks, *transformer.single_transformer_blocks])
        gather = 2 * block_params * (2 if autocast else 4)
        rows.append(Row("FSDP gathered blocks", gather, "the running block's and the prefetched block's full weights"))
    act_note = (f"{'gradient checkpointing, ' if checkpointing else ''}{shape_note}; "
                f"{tokens.batch} x {tokens.joint:,} tokens ({tokens.text} text + {tokens.target} target"
                + (f" + {len(tokens.refs)} x {tokens.refs[0]} reference" if tokens.refs else "") + ")")
    rows.append(Row("activations", activations, act_note))

    persistent = sum(r.bytes for r in rows if r.name not in ("gradients", "optimizer step scratch", "activations"))
    coexist = grads if backwards > 1 else 0
    stage_grads = {k: math.ceil(v / shard) for k, v in an.grads.items()}
    backward_phase = act.peak(stage_grads, grads_before=coexist)
    step_phase = grads + scratch
    peak = persistent + max(backward_phase, step_phase)
    sum_of_rows = sum(r.bytes for r in rows)

    assumptions = [
        f"sizes: {source}; {_count(transformer):,} transformer parameters "
        f"({arch.double} double + {arch.single} single blocks, width {arch.width})",
        f"trained: {_adapter_words(recipe.adapter, layers)}",
        f"precision: weights {model.dtype}, mixed_precision {mp!r}; trained weights, gradients, AdamW moments "
        f"and EMA in float32 (psr's master weights)",
        f"processes: {processes} under {strategy.upper()}"
        + (" (every process holds everything)" if strategy == "ddp" else
           " (FULL_SHARD: weights, gradients and optimizer state divided among processes)"),
        f"activations per block (saved, in [batch, {tokens.joint:,}, {arch.width}] tensors of "
        f"{prec.act} bytes): " + ", ".join(f"{k} {v:.1f}" for k, v in act.per_block.items())
        + ("; with checkpointing each block keeps only its inputs and backward rebuilds one block"
           if checkpointing else ""),
        "peak = weights + optimizer + EMA" + (" + buckets" if buckets else "")
        + (" + gathered blocks" if gather else "")
        + " + the larger of backward (activations"
        + (" + all gradients, which an earlier backward of the step allocated" if coexist else
           ", block by block, while backward frees them and allocates the gradients")
        + ") and the optimizer step (gradients + scratch)",
    ]
    if map_note:
        assumptions.append(map_note)
    if strategy == "fsdp":
        whole = total_params * 4 if full else total_params * wbytes + trainable * 4
        assumptions.append(f"FSDP: psr moves the whole transformer to every GPU before accelerate shards it, so "
                           f"{human(whole)} of transformer weights must fit once at setup")
    if recipe.command == "rl" and (recipe.objective == "focusdpo" or recipe.policy.kl_beta > 0):
        assumptions.append("the reference forward (adapters off, no gradients) runs while the policy's graph is "
                           "held; its working memory is about one block's, like backward's")
    if recipe.command == "rl":
        assumptions.append("not counted: the reward models, and the rollout phase (sampling without gradients "
                           "and the VAE decode of the images), which runs before the update, not during it")
    parameters = {"transformer": total_params, "trainable": trainable, **frozen}
    token_info = {"batch": tokens.batch, "text": tokens.text, "target": tokens.target, "refs": list(tokens.refs),
                  "joint": tokens.joint, "backwards_per_step": backwards}
    act_info = {"per_block": act.per_block, "blocks": act.blocks, "rebuilt": act.rebuilt,
                "outside": act.outside, "maps": act.maps, "working": act.working,
                "checkpointing": checkpointing, "backward_phase": backward_phase, "optimizer_step_phase": step_phase}
    return Plan(recipe=source_name, command=recipe.command, preset=model.preset, source=source,
                processes=processes, strategy=strategy, rows=rows, peak=peak, sum_of_rows=sum_of_rows,
                parameters=parameters, tokens=token_info, activations=act_info, assumptions=assumptions)


def _adapter_words(adapter, layers: AdapterLayers) -> str:
    if layers.kind == "none":
        return f"every transformer weight (full fine-tune), {layers.trainable:,} parameters"
    if layers.kind == "lora":
        return (f"LoRA rank {adapter.rank} on {len(layers.lora)} layers (targets {list(adapter.targets or ('attn',))}, "
                f"blocks {list(adapter.blocks)}), {layers.trainable:,} parameters")
    return (f"MoE-LoRA, {adapter.experts} experts of rank {adapter.rank} on {len(layers.moe)} feed-forwards, "
            f"{layers.trainable:,} parameters")


def _millions(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"


def human(n: int) -> str:
    """Bytes as GiB from 1 GiB up, else MiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / MIB:.1f} MiB"


def format_plan(plan: Plan) -> str:
    """The plan as a table: one row per component, then the peak, then the assumptions."""
    name_w = max(len(r.name) for r in plan.rows + [Row("peak per GPU", 0)])
    lines = [f"memory plan of {plan.recipe} ({plan.command}, preset {plan.preset}, {plan.processes} process(es), "
             f"{plan.strategy.upper()}), per GPU (the main process's, which also holds the EMA):", ""]
    for row in plan.rows:
        lines.append(f"  {row.name:<{name_w}}  {human(row.bytes):>11}  {row.note}")
    lines.append(f"  {'-' * name_w}  {'-' * 11}")
    lines.append(f"  {'peak per GPU':<{name_w}}  {human(plan.peak):>11}  (sum of the rows: {human(plan.sum_of_rows)})")
    lines.append("")
    lines += [f"- {a}" for a in plan.assumptions]
    return "\n".join(lines)
