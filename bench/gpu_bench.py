"""Generation step time, peak memory, one LoRA training step and achieved TFLOP/s of a
FLUX.1-dev-sized transformer with 0, 2 and 4 in-context references, at 512² and 1024².

    bash bench/gpu.sh                                   # the GPU run (bf16, random init, a few minutes)
    .venv/bin/python bench/gpu_bench.py --tiny          # the same code on a small config, CPU, seconds

No download: FluxTransformer2DModel is built from FLUX.1-dev's published config (19 double-
and 38 single-stream blocks, 24 heads of 128, T5 width 4096, CLIP width 768, guidance
embedding) with random weights, which cost the same FLOPs as the real ones. No text encoders
and no VAE: the prompt is 512 random T5-width embeddings plus a random pooled vector, and
the target and references are random packed latents (16 channels, 2x2 patches, one token
per 16 px side). References are appended after the target exactly as psr's model does
(`psr.core.packing.pack`, ids from `psr.core.positions.sequence_ids`, frame scheme: reference
i at index i + 1), each `--ref-size` px (512, the flux-dev preset's reference size).

Per row (target size x reference count):
- step ms: one denoising step (transformer forward + Euler update), inference mode, median
  of --steps after warm-up; one forward per step, as FLUX.1-dev's guidance embedding needs.
- peak GiB: the allocator's peak during those steps, weights included (CUDA); the process's
  peak resident set on the CPU.
- cached: the same step in psr's `reference_mode = "cached"` (`psr.core.refstream`: each
  reference's keys and values computed once at timestep 0, then every step runs the text and
  target tokens only), where psr's ModelConfig offers it, else n/a. The one-time reference
  pass is outside the step; the peak includes the stored keys and values.
- train ms: one LoRA training step (peft LoRA rank 16 on every attention projection,
  gradient checkpointing on, flow-matching MSE on the target tokens, AdamW), median of
  --train-steps after one warm-up; train peak GiB likewise.
- TFLOP/s and % of peak: FLOPs counted analytically (below) over the measured time, against
  the device's dense bf16 peak (table below, or --peak-tflops).

FLOPs of one forward, D = heads x head_dim, L = image + text tokens: every double- and
single-stream block does 24·L·D² in its projections and MLP and 4·L²·D in attention
(QKᵀ and PV), plus the embedders and the output projection. A training step counts the
forward, the recomputation that checkpointing adds (the forward again) and a backward that
computes input gradients only (the base weights are frozen: 1x the projections, 2x
attention); LoRA's own FLOPs (rank 16) are left out.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))

FLUX_DEV = {"patch_size": 1, "in_channels": 64, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
TINY = {**FLUX_DEV, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16, "num_attention_heads": 2,
        "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": (4, 6, 6)}
PX_PER_TOKEN = 16  # FLUX's VAE downsamples 8x, then 2x2 patches are packed into one token
LATENT_CHANNELS = 16
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]

# Dense bf16 tensor-core peaks in TFLOP/s from the vendors' datasheets (no sparsity), matched
# in this order against torch.cuda.get_device_name().
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200", 989.0), ("H100", 989.0), ("H800", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0), ("L4", 121.0),
    ("RTX 4090", 165.0), ("A10G", 70.0), ("A10", 125.0),
)

HEADER = ["size", "refs", "image tokens", "text tokens", "step ms", "TFLOP/s", "% peak", "peak GiB",
          "cached step ms", "cached peak GiB", "train ms", "train TFLOP/s", "train % peak", "train peak GiB"]


# ---------------------------------------------------------------------------- FLOPs
def forward_flops(cfg: dict, image_tokens: int, text_tokens: int) -> tuple[float, float]:
    """(projection and MLP FLOPs, attention FLOPs) of one forward, batch 1."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    length = image_tokens + text_tokens
    blocks = cfg["num_layers"] + cfg["num_single_layers"]
    linear = blocks * 24 * length * d * d
    attention = blocks * 4 * length * length * d
    linear += 2 * image_tokens * cfg["in_channels"] * d  # x_embedder
    linear += 2 * text_tokens * cfg["joint_attention_dim"] * d  # context_embedder
    linear += 2 * image_tokens * d * cfg["in_channels"]  # proj_out
    # per-sample terms: timestep, guidance and pooled-text embedders, every block's modulation
    linear += 2 * (256 * d + d * d) * (2 + cfg["guidance_embeds"]) + 2 * cfg["pooled_projection_dim"] * d
    linear += 2 * d * d * (12 * cfg["num_layers"] + 3 * cfg["num_single_layers"] + 2)
    return float(linear), float(attention)


def train_flops(cfg: dict, image_tokens: int, text_tokens: int) -> float:
    linear, attention = forward_flops(cfg, image_tokens, text_tokens)
    forward = linear + attention
    return forward + forward + (linear + 2 * attention)  # forward, checkpoint recompute, input-grad backward


def peak_tflops(device, override: float | None) -> float | None:
    if override:
        return override
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


# ---------------------------------------------------------------------------- the model and inputs
def build_transformer(cfg: dict, device, dtype):
    """Random-init FluxTransformer2DModel built directly on `device` in `dtype` (a FLUX.1-dev
    built in float32 on the host would need 48 GB of RAM and minutes of init)."""
    import torch
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = FluxTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(previous)
    # Buffers made outside the default dtype stay as diffusers made them; only stragglers among
    # the parameters are cast (ModelMixin.to(dtype) would warn about fp32-kept modules).
    for param in model.parameters():
        if param.dtype != dtype:
            param.data = param.data.to(dtype)
    return model.eval().requires_grad_(False)


@dataclasses.dataclass
class Inputs:
    target: object  # [1, L_t, 64] packed noisy target latents
    references: object  # [1, L_r, 64] packed reference latents, all references in order
    img_ids: object  # [L_t + L_r, 3]
    txt: object  # [1, T, joint_attention_dim]
    txt_ids: object  # [T, 3]
    pooled: object  # [1, pooled_projection_dim]
    refs: int

    @property
    def image_tokens(self) -> int:
        return self.target.shape[1] + self.references.shape[1]


def make_inputs(cfg: dict, size: int, refs: int, ref_size: int, text_tokens: int, device, dtype) -> Inputs:
    import torch

    from psr.core.packing import pack
    from psr.core.positions import sequence_ids

    gen = torch.Generator().manual_seed(size * 10 + refs)

    def lat(side):
        return torch.randn(1, LATENT_CHANNELS, side // 8, side // 8, generator=gen)

    grid = (size // PX_PER_TOKEN,) * 2
    ref_grid = (ref_size // PX_PER_TOKEN,) * 2
    target = pack(lat(size))
    references = torch.cat([pack(lat(ref_size)) for _ in range(refs)], dim=1) if refs else target[:, :0]
    ids = sequence_ids(grid, [ref_grid] * refs, "frame")
    to = {"device": device, "dtype": dtype}
    return Inputs(target=target.to(**to), references=references.to(**to), img_ids=ids.to(device),
                  txt=torch.randn(1, text_tokens, cfg["joint_attention_dim"], generator=gen).to(**to),
                  txt_ids=torch.zeros(text_tokens, 3, device=device),
                  pooled=torch.randn(1, cfg["pooled_projection_dim"], generator=gen).to(**to), refs=refs)


def velocity(transformer, x: Inputs, latents, t: float):
    """The target tokens' velocity with the references appended, as psr's MultiRefFlux.velocity."""
    import torch

    hidden = torch.cat([latents, x.references], dim=1)
    batch = torch.full((1,), t, device=latents.device, dtype=latents.dtype)
    out = transformer(hidden_states=hidden, timestep=batch, guidance=torch.full_like(batch, 3.5),
                      pooled_projections=x.pooled, encoder_hidden_states=x.txt, txt_ids=x.txt_ids,
                      img_ids=x.img_ids, return_dict=False)[0]
    return out[:, :latents.shape[1]]


def cached_mode_available() -> bool:
    """Whether psr's model section offers reference_mode = "cached"."""
    try:
        from psr.core.schema import ModelConfig
        from psr.errors import UserError
    except ImportError:  # psr's own dependencies missing where only the transformer's are installed
        return False
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    if "reference_mode" not in names:
        return False
    try:
        ModelConfig(reference_mode="cached")
    except (ValueError, TypeError, UserError):
        return False
    return True


# ---------------------------------------------------------------------------- measuring
class Meter:
    """Times a callable and reads the peak memory it reaches, on CUDA or the CPU."""

    def __init__(self, device):
        self.device = device

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def reset_peak(self):
        import torch

        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            from timing import reset_peak_rss

            reset_peak_rss()

    def peak_gib(self) -> float | None:
        import torch

        self.sync()
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        from timing import peak_rss_mib

        mib = peak_rss_mib()
        return None if mib is None else mib / 1024

    def median_s(self, fn, warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            self.sync()
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times)


def generation_row(transformer, x: Inputs, meter: Meter, args) -> tuple[float, float | None]:
    import torch

    def step():
        with torch.inference_mode():
            v = velocity(transformer, x, x.target, 0.5)
            return (x.target.float() - 0.05 * v.float()).to(x.target.dtype)  # one Euler step

    meter.reset_peak()
    seconds = meter.median_s(step, warmup=args.warmup, repeats=args.steps)
    return seconds, meter.peak_gib()


def cached_generation_row(transformer, x: Inputs, meter: Meter, args) -> tuple[float, float | None]:
    """psr's cached reference mode: every block's reference keys and values computed once
    (references alone, timestep 0), then each step runs the text and target tokens only with
    them appended. The one-time reference pass is not part of the step; the peak includes
    the stored keys and values."""
    import torch

    from psr.core.refstream import reference_kv

    target_len = x.target.shape[1]
    target_ids = x.img_ids[:target_len]
    guidance = torch.full((1,), 3.5, device=x.target.device, dtype=x.target.dtype)
    kv = None
    meter.reset_peak()
    if x.references.shape[1]:
        ref_len = (x.references.shape[1]) // x.refs
        with torch.inference_mode():
            kv = reference_kv(transformer, x.references, x.img_ids[target_len:], [ref_len] * x.refs,
                              pooled=x.pooled, guidance=guidance, text=x.txt, txt_ids=x.txt_ids)

    def step():
        with torch.inference_mode():
            t = torch.full((1,), 0.5, device=x.target.device, dtype=x.target.dtype)
            v = transformer(hidden_states=x.target, timestep=t, guidance=guidance, pooled_projections=x.pooled,
                            encoder_hidden_states=x.txt, txt_ids=x.txt_ids, img_ids=target_ids,
                            joint_attention_kwargs=None if kv is None else {"reference_kv": kv},
                            return_dict=False)[0]
            return (x.target.float() - 0.05 * v.float()).to(x.target.dtype)

    seconds = meter.median_s(step, warmup=args.warmup, repeats=args.steps)
    return seconds, meter.peak_gib()


def add_lora(transformer):
    from peft import LoraConfig

    transformer.add_adapter(LoraConfig(r=16, lora_alpha=16, init_lora_weights="gaussian",
                                       target_modules=LORA_TARGETS))
    for name, param in transformer.named_parameters():
        param.requires_grad_("lora_" in name)
    transformer.enable_gradient_checkpointing()
    transformer.train()
    params = [p for p in transformer.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("peft added no LoRA parameters")
    base = next(p for p in transformer.parameters() if not p.requires_grad).dtype
    for param in params:  # peft may create the adapter in float32; keep one dtype throughout
        if param.dtype != base:
            param.data = param.data.to(base)
    return params


def train_row(transformer, params, optimizer, x: Inputs, meter: Meter, args) -> tuple[float, float | None]:
    import torch
    import torch.nn.functional as F

    target = torch.randn_like(x.target)

    def step():
        optimizer.zero_grad(set_to_none=True)
        pred = velocity(transformer, x, x.target, 0.5)
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        optimizer.step()

    step()  # warm-up outside the peak: the first step allocates the optimizer state
    meter.reset_peak()
    seconds = meter.median_s(step, warmup=0, repeats=args.train_steps)
    return seconds, meter.peak_gib()


# ---------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="small config and sizes: runs on a CPU in seconds")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--sizes", default=None, help="target sides in px (default 512,1024; --tiny 32,64)")
    p.add_argument("--refs", default="0,2,4")
    p.add_argument("--ref-size", type=int, default=None, help="reference side in px (default 512; --tiny 32)")
    p.add_argument("--text-tokens", type=int, default=None, help="default 512 (flux-dev); --tiny 8")
    p.add_argument("--steps", type=int, default=5, help="timed generation steps per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--train-steps", type=int, default=3, help="timed training steps per row")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak, if not known")
    p.add_argument("--budget-s", type=float, default=420.0,
                   help="stop starting rows after this many seconds, so the whole run stays bounded")
    return p.parse_args(argv)


def fmt(value, spec: str) -> str:
    if isinstance(value, str):
        return value
    return "n/a" if value is None else format(value, spec)


def main(argv=None) -> int:
    import torch
    from timing import machine_lines, table

    args = parse(argv)
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu" and not args.tiny:
        print("a FLUX.1-dev-sized transformer needs a GPU (24 GB of bf16 weights); use --tiny on a CPU",
              file=sys.stderr)
        return 2
    cfg = TINY if args.tiny else FLUX_DEV
    sizes = [int(s) for s in (args.sizes or ("32,64" if args.tiny else "512,1024")).split(",")]
    refs = [int(r) for r in args.refs.split(",")]
    ref_size = args.ref_size or (32 if args.tiny else 512)
    text_tokens = args.text_tokens or (8 if args.tiny else 512)
    for side in (*sizes, ref_size):
        if side % PX_PER_TOKEN:
            raise SystemExit(f"{side} px: sizes must be multiples of {PX_PER_TOKEN}")
    dtype = torch.bfloat16
    peak = peak_tflops(device, args.peak_tflops)
    cached = cached_mode_available()

    for line in machine_lines(str(device)):
        print(line)
    transformer = build_transformer(cfg, device, dtype)
    weights_gib = sum(p.numel() * p.element_size() for p in transformer.parameters()) / 2**30
    count = sum(p.numel() for p in transformer.parameters())
    print(f"{'tiny config' if args.tiny else 'FLUX.1-dev config'}, random init, bf16, "
          f"{count / 1e9:.2f} B parameters ({weights_gib:.2f} GiB); "
          f"references {ref_size} px; text tokens {text_tokens}; peak {fmt(peak, '.0f')} TFLOP/s dense bf16"
          + ("" if peak else " (unknown device: --peak-tflops)"))
    print('cached: psr\'s reference_mode = "cached" (references\' keys and values computed once, outside the step)'
          if cached else 'cached: n/a (psr\'s ModelConfig has no reference_mode = "cached")')

    meter = Meter(device)
    grid = [(size, n) for size in sizes for n in refs]
    inputs = {key: make_inputs(cfg, key[0], key[1], ref_size, text_tokens, device, dtype) for key in grid}
    rows = {key: {} for key in grid}
    skipped = []
    failures = []
    for key in grid:  # generation first: the LoRA adapter would change the inference path
        if time.perf_counter() - started > args.budget_s:
            skipped.append(f"generation {key[0]} px, {key[1]} refs")
            continue
        rows[key]["gen"] = generation_row(transformer, inputs[key], meter, args)
    # Cached rows after every plain one: cached mode swaps in its own attention processor.
    for key in grid if cached else ():
        if time.perf_counter() - started > args.budget_s:
            skipped.append(f"cached generation {key[0]} px, {key[1]} refs")
            continue
        try:
            rows[key]["cached"] = cached_generation_row(transformer, inputs[key], meter, args)
        except Exception as err:  # noqa: BLE001  (another module's code: report it, keep the other columns)
            failures.append(f"cached generation {key[0]} px, {key[1]} refs: {type(err).__name__}: {err}")
            rows[key]["cached"] = ("error", "error")
    params = add_lora(transformer)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    for key in grid:
        if time.perf_counter() - started > args.budget_s:
            skipped.append(f"training {key[0]} px, {key[1]} refs")
            continue
        rows[key]["train"] = train_row(transformer, params, optimizer, inputs[key], meter, args)

    out = []
    for (size, n), row in rows.items():
        x = inputs[(size, n)]
        fwd = sum(forward_flops(cfg, x.image_tokens, text_tokens))
        trn = train_flops(cfg, x.image_tokens, text_tokens)
        gen_s, gen_peak = row.get("gen", (None, None))
        cached_s, cached_peak = row.get("cached", (None, None))
        train_s, train_peak = row.get("train", (None, None))
        gen_tf = fwd / gen_s / 1e12 if gen_s else None
        train_tf = trn / train_s / 1e12 if train_s else None
        out.append([f"{size}²", str(n), str(x.image_tokens), str(text_tokens),
                    fmt(gen_s and gen_s * 1e3, ".1f"), fmt(gen_tf, ".1f" if gen_tf and gen_tf >= 1 else ".2g"),
                    fmt(gen_tf and peak and 100 * gen_tf / peak, ".1f"), fmt(gen_peak, ".2f"),
                    fmt(cached_s * 1e3 if isinstance(cached_s, float) else cached_s, ".1f"), fmt(cached_peak, ".2f"),
                    fmt(train_s and train_s * 1e3, ".1f"),
                    fmt(train_tf, ".1f" if train_tf and train_tf >= 1 else ".2g"),
                    fmt(train_tf and peak and 100 * train_tf / peak, ".1f"), fmt(train_peak, ".2f")])
    print()
    print(table(HEADER, out))
    for what in skipped:
        print(f"skipped (over --budget-s {args.budget_s:.0f} s): {what}")
    for what in failures:
        print(f"failed: {what}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 1 if skipped or failures else 0


if __name__ == "__main__":
    # timing.py beside this file, and psr from the checkout where it is not installed
    sys.path[:0] = [BENCH, os.path.dirname(BENCH)]
    sys.exit(main())
