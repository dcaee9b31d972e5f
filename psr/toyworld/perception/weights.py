"""Weight folders of the ToyWorld perception models.

A folder holds `model.safetensors` (the state dict) and `config.json`:

    {"kind": "identity" | "localizer", "format": 1,
     "config": {...},          # constructor arguments of the net (nets.build_net)
     "labels": {...}}          # class names the heads were trained on, in head order

and, after training, `metrics.json` (what `psr fit` measured; not needed to load).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from psr.core.features import _resolve_device
from psr.core.io import write_atomic, write_json_atomic
from psr.errors import UserError
from psr.toyworld.perception.nets import build_net

FORMAT = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"


def save_folder(folder: str | Path, kind: str, model, config: dict, labels: dict[str, Any]) -> Path:
    """Write `model`'s weights and its config into `folder` (created), each file atomically."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomic(folder / WEIGHTS, lambda tmp: save_file(state, str(tmp), metadata={"kind": kind}))
    write_json_atomic(folder / CONFIG, {"kind": kind, "format": FORMAT, "config": config, "labels": labels})
    return folder


def load_folder(path: str | Path, kind: str, device="cpu"):
    """(net in eval mode on `device`, config.json dict) from a folder `save_folder` wrote.
    Any problem with the folder is a one-line UserError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(path).expanduser()
    what = f"toyworld {kind} weights {path}"
    if not folder.is_dir():
        raise UserError(f"{what}: no such folder (train them with `psr fit --recipe recipes/fit-toy-{kind}.toml`)")
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise UserError(f"{what}: {name} is missing")
    try:
        meta = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"{what}: cannot read {CONFIG} ({err.__class__.__name__})") from None
    if not isinstance(meta, dict) or meta.get("kind") != kind:
        found = meta.get("kind") if isinstance(meta, dict) else None
        raise UserError(f"{what}: holds {found!r} weights, not {kind!r} ones")
    if meta.get("format") != FORMAT:
        raise UserError(f"{what}: format {meta.get('format')!r}, this psr reads format {FORMAT}")
    try:
        net = build_net(kind, meta.get("config", {}))
        state = load_file(str(folder / WEIGHTS))
        net.load_state_dict(state)
    except (TypeError, RuntimeError, SafetensorError, OSError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else err.__class__.__name__
        raise UserError(f"{what}: the weights do not fit the config ({first})") from None

    return net.to(_resolve_device(device)).eval(), meta
