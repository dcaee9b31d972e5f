"""The benchmarks' own machinery: bench/gpu_bench.py runs end to end on the CPU with --tiny,
so the GPU run is known to work before a GPU ever runs it (only the table's shape and the
token arithmetic are checked: timings on a shared CPU say nothing), and bench_core's fit and
refusal rules reject the kinds of result it once printed (a negative per-step time, the same
peak memory for every configuration, ratios noisier than the goal they check)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_bench.py"
HEADER = ["size", "refs", "image tokens", "text tokens", "step ms", "TFLOP/s", "% peak", "peak GiB",
          "cached step ms", "cached peak GiB", "train ms", "train TFLOP/s", "train % peak", "train peak GiB"]
NUMBER = re.compile(r"^-?\d+(\.\d+)?(e[-+]\d+)?$")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def test_gpu_bench_tiny_runs_on_cpu_and_prints_one_full_table():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--steps", "1", "--warmup", "1",
                           "--train-steps", "1"], capture_output=True, text=True, timeout=180, cwd=ROOT, env=env,
                          check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("|") and _cells(line)[0] == "size"]
    assert len(starts) == 1, done.stdout
    start = starts[0]
    assert _cells(lines[start]) == HEADER
    assert set(lines[start + 1]) <= {"|", "-"}
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(HEADER, _cells(line))))
        assert len(_cells(line)) == len(HEADER), line
    # --tiny: targets of 32 and 64 px, references of 32 px, 16 px per token side, 8 text tokens
    assert [(r["size"], r["refs"]) for r in rows] == [(s, n) for s in ("32²", "64²") for n in ("0", "2", "4")]
    for r in rows:
        side = int(r["size"].rstrip("²"))
        assert int(r["image tokens"]) == (side // 16) ** 2 + int(r["refs"]) * 4
        assert r["text tokens"] == "8"
        for column in ("step ms", "TFLOP/s", "peak GiB", "train ms", "train TFLOP/s", "train peak GiB"):
            assert NUMBER.match(r[column]), (column, r[column])
        # no known peak for a CPU, so no share of it
        assert r["% peak"] == "n/a" and r["train % peak"] == "n/a"
        for column in ("cached step ms", "cached peak GiB"):
            assert r[column] == "n/a" or NUMBER.match(r[column]), (column, r[column])


def test_gpu_bench_refuses_the_full_size_model_without_a_gpu():
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, check=False)
    assert done.returncode == 2
    assert "--tiny" in done.stderr


def _load(name: str):
    path = ROOT / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    saved, had_timing = list(sys.path), "timing" in sys.modules
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
        # bench_core puts bench/ first to import its sibling timing.py; leave no trace of either
        sys.path[:] = saved
        if not had_timing:
            sys.modules.pop("timing", None)
    return module


def test_fit_recovers_a_line_and_summaries_are_order_statistics():
    bench_core = _load("bench_core")
    slope, intercept, r2 = bench_core.ols([2, 4, 8, 16], [0.1 + 0.02 * s for s in (2, 4, 8, 16)])
    assert abs(slope - 0.02) < 1e-12 and abs(intercept - 0.1) < 1e-12 and abs(r2 - 1) < 1e-12
    summary = bench_core.summarize([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (summary.min, summary.q1, summary.median, summary.q3, summary.max) == (1, 2, 3, 4, 5)


def _row(step=0.02, fixed=0.01, ratios=(1.0,) * 5, diffs=(0.0,) * 5, bench_core=None):
    return {"step": step, "fixed": fixed, "ratios": bench_core.summarize(ratios),
            "diffs": bench_core.summarize(diffs)}


def test_refusals_name_each_untrustworthy_result():
    bc = _load("bench_core")
    clean = {"pipeline": _row(bench_core=bc), 0: _row(ratios=(0.99, 1.0, 1.0, 1.01, 1.0), bench_core=bc),
             4: _row(ratios=(1.5,) * 5, diffs=(0.010, 0.011, 0.010, 0.012, 0.011), bench_core=bc)}
    memory = {"pipeline": (2.0, 1.0), 0: (2.0, 1.0), 4: (2.0, 1.5)}
    assert bc.problems_for("wide", clean, memory, 0.0, 0.05) == []

    noisy = {**clean, 0: _row(ratios=(0.8, 0.9, 1.0, 1.1, 1.2), bench_core=bc),
             4: _row(diffs=(-0.01, 0.0, 0.001, 0.01, 0.02), bench_core=bc),
             "pipeline": _row(fixed=-0.004, bench_core=bc)}
    problems = bc.problems_for("wide", noisy, {k: (1.2, 1.0) for k in memory}, 0.0, 0.05)
    assert len(problems) == 4, problems
    assert any("fixed cost" in p for p in problems)
    assert any("wider than the 0.05" in p for p in problems)
    assert any("within its spread" in p for p in problems)
    assert any("same for every configuration" in p for p in problems)
    negative = {**clean, 4: _row(step=-0.038, bench_core=bc)}  # what a difference of two noisy runs once gave
    assert any("per-step time refused" in p for p in bc.problems_for("tiny", negative, None, None, 0.05))


def test_flop_count_matches_the_flux_dev_parameter_budget():
    gpu_bench = _load("gpu_bench")
    cfg = gpu_bench.FLUX_DEV
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    linear, attention = gpu_bench.forward_flops(cfg, 4096, 512)
    # each token passes through 12·D² projection and MLP weights per block (one stream of a
    # double block, all of a single block), 2 FLOPs per weight; embedders add under 1 %
    per_token = 2 * 12 * d * d * (cfg["num_layers"] + cfg["num_single_layers"])
    assert 0 < linear - per_token * (4096 + 512) < 0.01 * linear
    assert attention == 57 * 4 * (4096 + 512) ** 2 * d
    # forward + checkpoint recompute + input-gradient backward (1x projections, 2x attention)
    assert gpu_bench.train_flops(cfg, 4096, 512) == 3 * linear + 4 * attention
