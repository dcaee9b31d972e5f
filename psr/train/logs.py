"""Training logs: one line on stdout, one JSON line in out/log.jsonl, TensorBoard scalars.

Only the main process logs. On resume, log.jsonl keeps the entries up to the resumed
step (a killed run may have logged past its last checkpoint) and TensorBoard purges
events after it, so both read as one uninterrupted run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from psr.core.io import write_text_atomic
from psr.errors import UserError


def check_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UserError("logging.tensorboard: the tensorboard package is not installed "
                        "(pip install tensorboard) — or set logging.tensorboard = false") from None


def _format(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    return f"{value:.3e}" if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e4) else f"{value:.4f}"


class TrainLog:
    def __init__(self, out: Path, *, tensorboard: bool, resume_step: int, total_steps: int, echo):
        self.path = out / "log.jsonl"
        self.total = total_steps
        self.echo = echo
        if self.path.is_file():
            kept, torn = [], 0
            for line in self.path.read_bytes().decode("utf-8", errors="replace").splitlines():
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:  # a write cut short (a full disk, a kill mid-line)
                    torn += 1
                    continue
                if isinstance(entry, dict) and entry.get("step", 0) <= resume_step:
                    kept.append(line)
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
            if torn:
                echo(f"psr: log.jsonl: dropped {torn} damaged line(s); the checkpoint holds the state")
        self.file = self.path.open("a", encoding="utf-8")
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tb"), purge_step=resume_step + 1)

    def note(self, text: str) -> None:
        self.echo(f"psr pretrain: {text}")

    def write(self, step: int, values: dict[str, float]) -> None:
        shown = "  ".join(f"{k} {_format(v)}" for k, v in values.items())
        self.echo(f"step {step}/{self.total}  {shown}")
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key if "/" in key else f"train/{key}", value, step)
            self.writer.flush()

    def close(self) -> None:
        self.file.close()
        if self.writer is not None:
            self.writer.close()
