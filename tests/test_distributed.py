"""Several processes share one run: under a launcher a global batch split over two CPU
processes (gloo) trains the weights one process trains on the whole batch, for a pretrain
step and a GSPO step; and the device a launcher's processes train on."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from psr.cli import main
from psr.cli.recipes import load_recipe
from psr.errors import UserError
from psr.train import checkpoint as ckpt

ROOT = Path(__file__).parent.parent
RECIPES = ROOT / "recipes"
# AdamW's first step is lr·g/(|g| + eps); eps = 1 keeps it proportional to the gradient, so
# rounding differences of a summed versus an all-reduced gradient stay rounding-sized.
PRETRAIN = ["train.steps=1", "train.warmup=0", "train.lr=1.0", "train.eps=1.0", "logging.every=1",
            "logging.tensorboard=false", "samples.every=0", "checkpoint.every=1", "data.num_workers=0",
            "data.cache=false", "regularizers=[]", "train.ema_decay=0",
            # dropout draws per row of the global batch; adapter dropout would not (global generator)
            "train.drop_text=0.3", "train.drop_refs=0.3", "train.drop_both=0.0"]
RL = ["model.preset=tiny", "rollout.group_size=2", "rollout.steps=2", "rollout.train_fraction=1.0",
      "train.steps=1", "train.lr=1.0", "train.eps=1.0", "logging.every=1", "logging.tensorboard=false",
      "eval.every=0", "checkpoint.every=1", "adapter.rank=4"]


def _sets(overrides):
    return [a for o in overrides for a in ("--set", o)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(command: str, recipe: str, out: Path, overrides: list[str]) -> subprocess.Popen:
    """`python -m torch.distributed.run --nproc_per_node 2 -m psr COMMAND …`, started."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
            str(_free_port()), "-m", "psr", command, "--recipe", recipe, "--out", str(out), "-q", *_sets(overrides)]
    return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output[-3000:]
    return output


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(out / "checkpoints" / "step_000001")["trainable"]


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from psr.workflows.synth import run_synth

    root = tmp_path_factory.mktemp("dist-data")
    run_synth(load_recipe("synth", str(RECIPES / "synth-toy.toml"), ["shard_size=8", "workers=1"]),
              str(root / "toy"), 8, show_progress=False)
    return str(root / "toy")


def test_two_cpu_processes_train_what_one_process_trains_on_the_whole_batch(data, tmp_path, one_thread):
    pretrain, gspo = str(RECIPES / "pretrain-toy.toml"), str(RECIPES / "gspo-toy.toml")
    both = [f"data.path={data!r}"]
    # "auto" on this machine: the launcher's processes must form one group on the CPU.
    device = "model.device=auto" if not torch.cuda.is_available() else "model.device=cpu"
    launched = [_launch("pretrain", pretrain, tmp_path / "pretrain-2", [*PRETRAIN, *both, device, "train.batch_size=1"]),
                _launch("rl", gspo, tmp_path / "rl-2", [*RL, *both, device, "rollout.groups_per_step=1"])]
    try:
        # One process, the same global batch, while the launched ones run.
        assert main(["pretrain", "--recipe", pretrain, "--out", str(tmp_path / "pretrain-1"), "-q",
                     *_sets([*PRETRAIN, *both, "model.device=cpu", "train.batch_size=2"])]) == 0
        assert main(["rl", "--recipe", gspo, "--out", str(tmp_path / "rl-1"), "-q",
                     *_sets([*RL, *both, "model.device=cpu", "rollout.groups_per_step=2"])]) == 0
        outputs = [_finish(p) for p in launched]
    finally:
        for p in launched:
            if p.poll() is None:
                p.kill()
    assert "2 process(es)" in outputs[0] and "batch 1x1x2" in outputs[0]
    assert "2 process(es)" in outputs[1]
    for name in ("pretrain", "rl"):
        one, two = _weights(tmp_path / f"{name}-1"), _weights(tmp_path / f"{name}-2")
        assert one.keys() == two.keys()
        torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")
        (a,), (b,) = _log(tmp_path / f"{name}-1"), _log(tmp_path / f"{name}-2")
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5, abs=1e-9)
    # The comparison means something: the steps moved the weights (LoRA B starts at 0).
    from psr.core.tiny import build_tiny_components

    base = build_tiny_components(seed=0).transformer.state_dict()
    one = _weights(tmp_path / "pretrain-1")
    assert max((one[k] - base[k]).abs().max().item() for k in one) > 1e-3
    lora = _weights(tmp_path / "rl-1")
    assert all(lora[k].abs().max() > 0 for k in lora if "lora_B" in k)


def test_auto_under_a_launcher_without_cuda_trains_on_the_cpu(monkeypatch):
    from psr.train.launch import training_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    if not torch.cuda.is_available():
        assert training_device("auto").type == "cpu"
    assert training_device("cpu").type == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="refuses CUDA only where there is none")
def test_cuda_without_a_gpu_is_one_line_before_any_weights_load(data, tmp_path, capsys):
    from psr.train.launch import training_device

    with pytest.raises(UserError, match="model.device 'cuda': CUDA is not available"):
        training_device("cuda")
    for command, recipe, extra in (("pretrain", "pretrain-toy.toml", PRETRAIN), ("rl", "gspo-toy.toml", RL)):
        out = tmp_path / command
        assert main([command, "--recipe", str(RECIPES / recipe), "--out", str(out), "-q",
                     *_sets([*extra, f"data.path={data!r}", "model.device=cuda"])]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "model.device 'cuda': CUDA is not available" in err, err
        assert not (out / "checkpoints").exists()
