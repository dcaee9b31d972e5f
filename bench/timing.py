"""Shared measurement helpers for the benchmarks: interleaved timing, robust summaries, a
least-squares per-step fit, peak memory of a process, and a description of the machine.

Kept free of psr imports so any script under bench/ can use it before the model loads.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass


# ---------------------------------------------------------------------------- summaries
@dataclass(frozen=True)
class Summary:
    """Order statistics of repeated measurements of one quantity."""

    n: int
    min: float
    q1: float
    median: float
    q3: float
    max: float

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    @property
    def rel_iqr(self) -> float:
        """IQR / median: the spread as a fraction of the typical value."""
        return self.iqr / abs(self.median) if self.median else float("inf")

    @property
    def rel_range(self) -> float:
        """(max − min) / median."""
        return (self.max - self.min) / abs(self.median) if self.median else float("inf")


def summarize(samples: Sequence[float]) -> Summary:
    values = sorted(samples)
    if not values:
        raise ValueError("no samples")
    if len(values) == 1:
        v = values[0]
        return Summary(1, v, v, v, v, v)
    # 'inclusive' keeps the quartiles inside the observed range, which matters with 5 samples.
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return Summary(len(values), values[0], q1, median, q3, values[-1])


# ---------------------------------------------------------------------------- the per-step fit
def ols(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float, float]:
    """Ordinary least squares y = slope·x + intercept: (slope, intercept, r²). The sign is
    not checked here: the caller refuses a non-positive per-step time with the reason."""
    if len(xs) != len(ys) or len(set(xs)) < 2:
        raise ValueError("a line needs at least two distinct x values")
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - (slope * x + intercept)) ** 2 for x, y in zip(xs, ys))
    return slope, intercept, (1.0 - ss_res / ss_tot if ss_tot else 0.0)


# ---------------------------------------------------------------------------- interleaving
def interleaved(runs: dict[Hashable, Callable[[], float]], rounds: int,
                before_each: Callable[[], None] | None = None) -> dict[Hashable, list[float]]:
    """Call every run once per round, in the dict's order (A, B, C, A, B, C, …), so a change in
    background load hits every configuration alike instead of whichever ran during it.
    Each run returns its own duration in seconds (it knows where the timed part starts)."""
    out: dict[Hashable, list[float]] = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            if before_each is not None:
                before_each()
            out[key].append(run())
    return out


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def stopwatch(fn: Callable[[], object], sync: Callable[[], None] | None = None, clock: str = "wall") -> float:
    """Seconds one call of fn takes on `clock`, synchronising the device before and after.

    "wall" is elapsed time. "cpu" is this process's CPU time over all its threads: time spent
    waiting for a core that another process holds is not counted, which makes it the steadier
    measure on a shared machine with one torch thread (with several, spin-waits count too)."""
    now = CLOCKS[clock]
    if sync is not None:
        sync()
    start = now()
    fn()
    if sync is not None:
        sync()
    return now() - start


# ---------------------------------------------------------------------------- process memory (Linux)
def _proc_status_mib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_mib() -> float | None:
    """Current resident set of this process in MiB (VmRSS)."""
    return _proc_status_mib("VmRSS")


def peak_rss_mib() -> float | None:
    """Peak resident set of this process in MiB since start or the last reset (VmHWM)."""
    return _proc_status_mib("VmHWM")


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux ≥ 4.0: write 5 to clear_refs), so a
    later peak excludes transients of imports and model loading. False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:
        return False
    return True


WINDOW = "bench::window"


@contextlib.contextmanager
def profiled_windows(module):
    """Mark every forward of `module` as a profiler range named WINDOW, so a peak can be read
    over those calls alone (`cpu_tensor_peaks`)."""
    from torch.profiler import record_function

    open_ranges = []

    def enter(*_):
        ctx = record_function(WINDOW)
        ctx.__enter__()
        open_ranges.append(ctx)

    def leave(*_):
        open_ranges.pop().__exit__(None, None, None)

    handles = [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def cpu_tensor_peaks(fn: Callable[[], object], window_module=None) -> tuple[float, float | None]:
    """(peak over fn, peak during forwards of window_module) of live CPU tensor memory in MiB
    allocated while fn runs: the CPU counterpart of torch.cuda.max_memory_allocated() minus
    what was allocated before. Read from the torch profiler's allocation events (pointer and
    size of every allocation and free, in order), counting only blocks allocated during fn,
    so weights and inputs that exist already are excluded and temporaries inside an operator
    are included. Unlike the resident set, this does not depend on which freed chunks glibc
    happens to keep from model loading."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    marks = profiled_windows(window_module) if window_module is not None else contextlib.nullcontext()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, marks:
        fn()

    def walk(nodes):
        for node in nodes:
            yield node
            yield from walk(node.children)

    nodes = list(walk(prof.profiler.kineto_results.experimental_event_tree()))
    events = sorted((e for e in nodes if e.tag == _EventType.Allocation), key=lambda e: e.start_time_ns)
    windows = sorted((e.start_time_ns, e.end_time_ns) for e in nodes if e.name == WINDOW)
    if not events:
        raise RuntimeError("the profiler recorded no allocation")
    if window_module is not None and not windows:
        raise RuntimeError("the profiler recorded no forward of the window module")
    live: dict[int, int] = {}
    current = peak = 0
    window_peak = 0 if windows else None
    w = 0
    for event in events:
        t = event.start_time_ns
        while windows and w < len(windows) and windows[w][1] < t:
            w += 1
        inside = bool(windows) and w < len(windows) and windows[w][0] <= t
        if inside:  # what the window starts with counts too, not only what it adds
            window_peak = max(window_peak, current)
        fields = event.extra_fields
        if fields.alloc_size > 0:
            live[fields.ptr] = fields.alloc_size
            current += fields.alloc_size
            peak = max(peak, current)
        elif fields.ptr in live:  # frees of blocks that predate fn are not ours to subtract
            current -= live.pop(fields.ptr)
        if inside:
            window_peak = max(window_peak, current)
    return peak / 2**20, None if window_peak is None else window_peak / 2**20


# ---------------------------------------------------------------------------- the machine
def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def load_average() -> str:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine_lines(device: str) -> list[str]:
    """What the numbers were measured on, to print above the table."""
    import torch

    versions = [f"torch {torch.__version__}"]
    try:
        import diffusers

        versions.append(f"diffusers {diffusers.__version__}")
    except ImportError:
        versions.append("diffusers not installed")
    dev = device
    if device.startswith("cuda") and torch.cuda.is_available():
        dev = f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return [
        f"cpu: {cpu_model()}, {os.cpu_count()} logical cores, torch threads {torch.get_num_threads()}",
        f"device: {dev}; {', '.join(versions)}; python {platform.python_version()}",
        f"load average (1/5/15 min) at start: {load_average()}",
    ]


def fmt(value: float | None, spec: str, missing: str = "n/a") -> str:
    return missing if value is None else format(value, spec)


def table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table: readable in a terminal and pasted into the README unchanged."""
    rows = [list(map(str, r)) for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "| " + " | ".join(c.rjust(w) for c, w in zip(cells, widths)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule, *map(line, rows)])
