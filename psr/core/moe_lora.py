"""MoE-LoRA (MultiCrafter): K LoRA experts on the output of frozen feed-forward layers,
chosen per token by a learned router, with a switch-transformer load-balancing loss.

For a wrapped module f with input x [B, L, in] and output [B, L, out]:

    p = softmax(router(x))                     router: Linear(in, K), [B, L, K]
    S = the top_k experts of p per token
    y = f(x) + Σ_{e ∈ S} p_e · (alpha/rank) · B_e A_e x

The gate is the router probability itself (not renormalised over S), as in the switch
transformer: with top_k = 1 a renormalised gate would be 1 and the router would get no
gradient from the main loss. A_e [rank, in] starts like peft's LoRA A, B_e [out, rank] at
zero, so the wrapped model starts equal to the base model. Experts are computed densely
(one matmul over all K·rank rows, masked by the gates): simple, and cheap while K·rank is
small next to the FFN width.

Load balance (switch transformer): per wrapped module and forward, with T tokens,
f_e = (tokens whose top_k contains e) / (T · top_k) and P_e = mean over tokens of p_e,
aux = K · Σ_e f_e · P_e (1 when balanced, K when every token picks one expert). Each
forward that records autograd adds its aux per module; `moe_aux_loss(transformer)` returns
their mean and resets the list.

Wrapped modules: in double-stream blocks `ff` (image stream) and `ff_context` (text stream),
the whole feed-forward (its output is the FFN output); in single-stream blocks `proj_mlp`,
the MLP's input projection (the MLP output is folded into `proj_out` together with the
attention output, so its first projection is the FFN part that can be adapted alone).

File (`save_moe_lora`): safetensors with tensors `<module>.router.weight` [K, in],
`<module>.router.bias` [K], `<module>.lora_A` [K, rank, in], `<module>.lora_B` [K, out, rank]
and metadata `psr_moe_lora` = JSON {"version": 1, "experts", "top_k", "rank", "alpha",
"modules"}. Routed experts cannot be merged into weights.

Frozen adapters (`freeze_adapters`): trained weights loaded as modules (`model.weights` or
`init` that stay unmerged, psr.core.weights) are part of the network a later adapter trains
on: `mark_adapters_trainable` leaves them frozen, their MoE modules add no load-balancing
term, and switching the trained adapter off (`psr.core.adapters.adapters_disabled`) keeps
them on.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from psr.core.attention import select_blocks
from psr.core.io import write_atomic
from psr.errors import UserError

MOE_TARGETS = ("ff", "ff_context", "proj_mlp")
FILE_FORMAT_VERSION = 1


class _AuxSink:
    """Collects the load-balancing terms of one transformer's MoE-LoRA modules."""

    def __init__(self):
        self.terms: list[torch.Tensor] = []


def _features(module: nn.Module) -> tuple[int, int]:
    """(in, out) features of a linear layer or a feed-forward stack, LoRA layers ignored."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    linears = [m for n, m in module.named_modules() if isinstance(m, nn.Linear) and "lora_" not in n]
    if not linears:
        raise UserError(f"MoE-LoRA: cannot wrap {type(module).__name__}, it has no linear layers")
    return linears[0].in_features, linears[-1].out_features


class MoELoRA(nn.Module):
    """A frozen module plus routed LoRA experts (see the module docstring)."""

    def __init__(self, base: nn.Module, experts: int, top_k: int, rank: int, alpha: float, sink: _AuxSink):
        super().__init__()
        if not 1 <= top_k <= experts:
            raise UserError(f"MoE-LoRA: top_k {top_k} must lie in [1, experts={experts}]")
        if rank < 1:
            raise UserError(f"MoE-LoRA: rank {rank} must be ≥ 1")
        in_features, out_features = _features(base)
        param = next(base.parameters())
        self.base = base
        self.experts, self.top_k, self.rank, self.alpha = experts, top_k, rank, float(alpha)
        self.scaling = self.alpha / rank
        self.router = nn.Linear(in_features, experts, device=param.device, dtype=param.dtype)
        self.lora_A = nn.Parameter(torch.empty(experts, rank, in_features, device=param.device, dtype=param.dtype))
        self.lora_B = nn.Parameter(torch.zeros(experts, out_features, rank, device=param.device, dtype=param.dtype))
        for e in range(experts):  # peft's LoRA A init, per expert
            nn.init.kaiming_uniform_(self.lora_A.data[e], a=math.sqrt(5))
        self._sink = sink
        self.frozen = False
        """Loaded below a trained adapter (`freeze_adapters`): never trained, no aux term."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        probs = self.router(x).float().softmax(dim=-1)                     # [..., K]
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_p)          # p_e on the chosen experts
        k, r = self.experts, self.rank
        h = x.to(self.lora_A.dtype) @ self.lora_A.reshape(k * r, -1).t()   # [..., K·r]
        h = (h.unflatten(-1, (k, r)) * gates.to(h.dtype)[..., None]).flatten(-2)
        delta = h @ self.lora_B.permute(0, 2, 1).reshape(k * r, -1)        # [..., out]
        # Computed on every forward so a checkpointed recomputation saves the same tensors as
        # the first pass; recorded only outside backward, where it would count twice.
        balance = load_balance_loss(probs, top_i)
        # A frozen module's term would train nothing and pile up (nobody reads it).
        if not self.frozen and torch.is_grad_enabled() and torch._C._current_graph_task_id() == -1:
            self._sink.terms.append(balance)
        return y + (self.scaling * delta).to(y.dtype)


def load_balance_loss(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Switch-transformer aux loss K · Σ_e f_e · P_e.

    probs [..., K] router probabilities; chosen [..., k] indices of the selected experts.
    """
    k = probs.shape[-1]
    probs = probs.reshape(-1, k)
    counts = torch.zeros(k, device=probs.device).index_add_(
        0, chosen.reshape(-1), torch.ones(chosen.numel(), device=probs.device))
    fraction = counts / chosen.numel()
    return k * (fraction * probs.mean(0)).sum()


def _moe_modules(transformer) -> list[tuple[str, MoELoRA]]:
    return [(n, m) for n, m in transformer.named_modules() if isinstance(m, MoELoRA)]


def resolve_moe_targets(transformer, blocks: Sequence[str] = ("all",),
                        targets: Sequence[str] = MOE_TARGETS) -> list[str]:
    """Full names of the FFN modules to wrap: `targets` ⊆ {"ff", "ff_context", "proj_mlp"}
    inside the selected blocks."""
    bad = [t for t in targets if t not in MOE_TARGETS]
    if bad or not targets:
        raise UserError(f"MoE-LoRA targets {list(targets)}: choose from {', '.join(MOE_TARGETS)}")
    names = []
    for block in select_blocks(transformer, blocks, "MoE-LoRA blocks"):
        module = transformer.get_submodule(block)
        names.extend(f"{block}.{t}" for t in targets if hasattr(module, t))
    if not names:
        raise UserError(f"MoE-LoRA: targets {list(targets)} select no module in blocks {list(blocks)}")
    return names


FROZEN_ATTR = "_psr_frozen_adapters"
"""Transformer attribute: the names of the peft adapters that `freeze_adapters` froze."""


def _frozen_prefixes(transformer) -> tuple[str, ...]:
    return tuple(f"{n}." for n, m in transformer.named_modules() if isinstance(m, MoELoRA) and m.frozen)


def _peft_adapter_of(name: str) -> str | None:
    """The peft adapter a parameter belongs to (`<module>.lora_A.<adapter>.weight`); None
    for MoE-LoRA's own tensors (`<module>.lora_A`) and everything else."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-2]):
        if part in ("lora_A", "lora_B"):
            return parts[i + 1]
    return None


def mark_adapters_trainable(transformer) -> list[torch.nn.Parameter]:
    """Freeze every parameter except LoRA and MoE-LoRA ones, and those of frozen adapters
    (`freeze_adapters`); returns the trainable ones."""
    transformer.requires_grad_(False)
    frozen_names = getattr(transformer, FROZEN_ATTR, set())
    frozen_modules = _frozen_prefixes(transformer)
    trainable = []
    for name, param in transformer.named_parameters():
        if not (".lora_A" in name or ".lora_B" in name or ".router." in name):
            continue
        if _peft_adapter_of(name) in frozen_names or name.startswith(frozen_modules):
            continue
        param.requires_grad_(True)
        trainable.append(param)
    return trainable


def freeze_adapters(transformer) -> None:
    """Make every adapter now in `transformer` (peft LoRA adapters and MoE-LoRA modules) a
    frozen part of the network (module docstring)."""
    for module in transformer.modules():
        if isinstance(module, MoELoRA):
            module.frozen = True
    names = set(getattr(transformer, "peft_config", None) or {})
    setattr(transformer, FROZEN_ATTR, getattr(transformer, FROZEN_ATTR, set()) | names)
    mark_adapters_trainable(transformer)


def frozen_adapter_names(transformer) -> set[str]:
    """The peft adapters of `transformer` that `freeze_adapters` froze."""
    return set(getattr(transformer, FROZEN_ATTR, set()))


def has_frozen_adapters(transformer) -> bool:
    return bool(frozen_adapter_names(transformer)) or bool(_frozen_prefixes(transformer))


def add_moe_lora(transformer, experts: int = 4, top_k: int = 1, rank: int = 16, alpha: float | None = None, *,
                 blocks: Sequence[str] = ("all",), targets: Sequence[str] = MOE_TARGETS,
                 modules: Sequence[str] | None = None) -> list[str]:
    """Wrap the selected FFN modules in `MoELoRA` (in place), freeze every non-adapter
    parameter and return the wrapped names."""
    if experts < 1:
        raise UserError(f"MoE-LoRA: experts {experts} must be ≥ 1")
    if _frozen_prefixes(transformer):
        raise UserError("MoE-LoRA: the trained weights loaded below already hold MoE-LoRA experts (kept frozen); "
                        "train a LoRA on top of them (adapter.kind = \"lora\")")
    if _moe_modules(transformer):
        raise UserError("add_moe_lora: this transformer already has MoE-LoRA")
    names = list(modules) if modules is not None else resolve_moe_targets(transformer, blocks, targets)
    for name in names:
        if any("lora_" in n for n, _ in transformer.get_submodule(name).named_modules()):
            raise UserError(f"MoE-LoRA on {name}: the layer already has LoRA; adapt a feed-forward layer with "
                            f"one or the other")
    sink = getattr(transformer, "_psr_moe_sink", None) or _AuxSink()
    transformer._psr_moe_sink = sink
    for name in names:
        parent, _, child = name.rpartition(".")
        owner = transformer.get_submodule(parent)
        setattr(owner, child, MoELoRA(getattr(owner, child), experts, top_k, rank,
                                      rank if alpha is None else alpha, sink))
    mark_adapters_trainable(transformer)
    return names


def moe_aux_loss(transformer) -> torch.Tensor:
    """Mean load-balancing loss over the MoE-LoRA forwards since the last call (then
    reset); 0 when nothing was recorded."""
    sink = getattr(transformer, "_psr_moe_sink", None)
    if sink is None or not sink.terms:
        return torch.zeros(())
    value = torch.stack(sink.terms).mean()
    sink.terms = []
    return value


def remove_moe_lora(transformer):
    """Unwrap every MoE-LoRA module (dropping the experts); returns the transformer."""
    for name, module in _moe_modules(transformer):
        parent, _, child = name.rpartition(".")
        setattr(transformer.get_submodule(parent), child, module.base)
    vars(transformer).pop("_psr_moe_sink", None)
    return transformer


def save_moe_lora(transformer, path: str | Path) -> Path:
    """Write routers and experts to one safetensors file (format in the module docstring)."""
    from safetensors.torch import save_file

    wrapped = _moe_modules(transformer)
    if not wrapped:
        raise UserError("save_moe_lora: this transformer has no MoE-LoRA")
    first = wrapped[0][1]
    tensors = {}
    for name, module in wrapped:
        for key, value in (("router.weight", module.router.weight), ("router.bias", module.router.bias),
                           ("lora_A", module.lora_A), ("lora_B", module.lora_B)):
            tensors[f"{name}.{key}"] = value.detach().to("cpu").contiguous()
    meta = {"version": FILE_FORMAT_VERSION, "experts": first.experts, "top_k": first.top_k, "rank": first.rank,
            "alpha": first.alpha, "modules": [n for n, _ in wrapped]}
    metadata = {"format": "pt", "psr_moe_lora": json.dumps(meta)}
    return write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def load_moe_lora(transformer, path: str | Path) -> list[str]:
    """Wrap `transformer` as the saved file says and load its routers and experts."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"MoE-LoRA file {path}: not found")
    with safe_open(str(path), framework="pt") as f:
        raw = (f.metadata() or {}).get("psr_moe_lora")
        names = f.keys()
        tensors = {k: f.get_tensor(k) for k in names}
    if raw is None:
        raise UserError(f"MoE-LoRA file {path}: no psr_moe_lora metadata")
    meta = json.loads(raw)
    if meta.get("version") != FILE_FORMAT_VERSION:
        raise UserError(f"MoE-LoRA file {path}: format version {meta.get('version')}, this psr reads "
                        f"{FILE_FORMAT_VERSION}")
    names = add_moe_lora(transformer, meta["experts"], meta["top_k"], meta["rank"], meta["alpha"],
                         modules=meta["modules"])
    with torch.no_grad():
        for name, module in _moe_modules(transformer):
            module.router.weight.copy_(tensors[f"{name}.router.weight"])
            module.router.bias.copy_(tensors[f"{name}.router.bias"])
            module.lora_A.copy_(tensors[f"{name}.lora_A"])
            module.lora_B.copy_(tensors[f"{name}.lora_B"])
    return names
