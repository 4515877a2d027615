"""Shared helpers for the cdgfast benchmarks: timing, peak memory, models and data, result rows,
CSV / markdown output, and the baselines several families share (per-sample loops, vmap(grad)).

Every family module `bench_<family>.py` exposes `run(cfg: BenchConfig) -> (rows, targets)` for the
script (`python benchmarks/run_all.py`) and pytest-benchmark tests at small sizes
(`pytest benchmarks/ --benchmark-enable`).

Timing: on CUDA `triton.testing.do_bench` (median, ms); on the CPU the median of `reps` wall-clock
runs after `warmup` runs. Peak memory: on CUDA `torch.cuda.max_memory_allocated` above the level at
the start of the call; on the CPU the peak of the allocation timeline recorded by the torch profiler
(`profile_memory=True`), also relative to the start: memory already held (parameters, inputs) is not
counted, memory the call frees again is.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib
import os
import platform
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

ROW_FIELDS = ("family", "case", "impl", "model", "size", "time_ms", "vs_cdgfast", "peak_mb", "rel_err", "note")
TARGET_FIELDS = ("target", "measured", "threshold", "passed", "note")


@dataclasses.dataclass
class BenchConfig:
    """Sizes and repetitions. `quick=True` is the smoke-test scale (seconds, not minutes)."""

    quick: bool = False
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    reps: int = 5
    warmup: int = 1
    seed: int = 0
    progress: bool = True

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")


# --------------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------------
def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bench(fn: Callable[[], object], cfg: BenchConfig, reps: Optional[int] = None,
          warmup: Optional[int] = None) -> float:
    """Median time of `fn()` in milliseconds."""
    reps = cfg.reps if reps is None else reps
    warmup = cfg.warmup if warmup is None else warmup
    if cfg.cuda:
        import triton.testing

        # do_bench picks its own repetition count from a time budget; keep it short for long calls.
        return float(triton.testing.do_bench(fn, warmup=max(1, 10 * warmup), rep=max(1, 40 * reps),
                                             return_mode="median"))
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def bench_interleaved(fns: Dict[str, Callable[[], object]], cfg: BenchConfig, reps: Optional[int] = None,
                      warmup: Optional[int] = None) -> Dict[str, float]:
    """Median ms of each callable, the contenders run round-robin (rep 1 of each, then rep 2, ...)
    so that a load change on a shared machine hits all of them alike; each is warmed first. On CUDA
    one `bench` (do_bench) per contender."""
    if cfg.cuda:
        return {k: bench(f, cfg, reps, warmup) for k, f in fns.items()}
    reps = cfg.reps if reps is None else reps
    warmup = cfg.warmup if warmup is None else warmup
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(max(1, reps)):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def timed(fn: Callable[[], object], cfg: BenchConfig, reps: Optional[int] = None,
          warmup: Optional[int] = None):
    """(median ms, the result of the last call): for slow baselines whose output is also the
    reference, so that they run only once."""
    box = []

    def call():
        box[:] = [fn()]

    ms = bench(call, cfg, reps, warmup)
    return ms, box[0]


def _cpu_peak_from_profile(prof) -> int:
    """Peak of the cumulative allocation timeline in a CPU profile (bytes above the start)."""
    events = []

    def walk(node):
        stack = [node]
        while stack:
            n = stack.pop()
            if "Allocation" in str(n.tag):
                size = n.extra_fields.alloc_size
                if getattr(n.extra_fields, "device", None) is None or n.extra_fields.device.type == "cpu":
                    events.append((n.start_time_ns, size))
            stack.extend(n.children)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    events.sort()
    cur = peak = 0
    for _, size in events:
        cur += size
        peak = max(peak, cur)
    return peak


def peak_memory(fn: Callable[[], object], cfg: BenchConfig) -> int:
    """Peak bytes allocated during `fn()` above what was allocated when it started."""
    if cfg.cuda:
        sync(cfg.device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        sync(cfg.device)
        return int(torch.cuda.max_memory_allocated() - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return _cpu_peak_from_profile(prof)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64."""
    a = torch.as_tensor(a).double().flatten()
    b = torch.as_tensor(b).double().flatten()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def optional_import(module: str, name: Optional[str] = None):
    """The module (or its attribute `name`), or None with the reason when it is not there yet."""
    try:
        mod = importlib.import_module(module)
        return getattr(mod, name) if name else mod
    except Exception:  # ImportError, or AttributeError while a helper is mid-edit
        return None


def installed(pkg: str) -> bool:
    return importlib.util.find_spec(pkg) is not None


# --------------------------------------------------------------------------------------------------
# Models and data
# --------------------------------------------------------------------------------------------------
MODELS = {  # preset -> (sample_size, full-run N, full-run B)
    "tiny": 16,
    "small": 32,
}


def make_model(preset: str, cfg: BenchConfig, sample_size: Optional[int] = None) -> torch.nn.Module:
    from cdgfast.models import build_unet

    torch.manual_seed(cfg.seed)
    size = sample_size or (8 if cfg.quick else MODELS[preset])
    return build_unet(preset, sample_size=size).to(cfg.device)


def model_size(model) -> int:
    return model.config.sample_size


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def make_batches(model, n: int, batch_size: int, cfg: BenchConfig, seed: Optional[int] = None) -> List[dict]:
    """Deterministic diffusion batches (x0 in [-1, 1], labels, t, eps) of the model's image size."""
    from cdgfast.diffusion import NoiseSchedule, make_batch

    g = torch.Generator().manual_seed(cfg.seed if seed is None else seed)
    size = model_size(model)
    ch = model.config.in_channels
    ncls = model.config.num_class_embeds - 1
    sched = NoiseSchedule()
    batches = []
    for i0 in range(0, n, batch_size):
        b = min(batch_size, n - i0)
        x = torch.rand(b, ch, size, size, generator=g) * 2 - 1
        y = torch.randint(0, ncls, (b,), generator=g)
        batch = make_batch(x, y, sched, generator=g)
        batches.append({k: v.to(cfg.device) for k, v in batch.items()})
    return batches


def loss_fn():
    from cdgfast.diffusion import DiffusionLoss

    return DiffusionLoss()


def params_of(model) -> List[torch.nn.Parameter]:
    from cdgfast.params import trainable_parameters

    return trainable_parameters(model)


def flat_grad(params: Sequence[torch.Tensor]) -> torch.Tensor:
    from cdgfast.params import flat_grads

    return flat_grads(params)


def zero_grad(params) -> None:
    for p in params:
        p.grad = None


def slice_batch(batch: dict, i: int, j: Optional[int] = None) -> dict:
    j = i + 1 if j is None else j
    return {k: v[i:j] for k, v in batch.items()}


# --------------------------------------------------------------------------------------------------
# Baselines shared by several families
# --------------------------------------------------------------------------------------------------
def per_sample_grads_loop(model, loss, batch) -> Iterable[torch.Tensor]:
    """Yield flat g_i one sample at a time: a backward at batch size 1 (the official procedure)."""
    params = params_of(model)
    n = batch["x"].shape[0]
    for i in range(n):
        zero_grad(params)
        loss(model, slice_batch(batch, i)).sum().backward()
        yield flat_grad(params)
    zero_grad(params)


class _Functional:
    """Calls `model` with given parameter / buffer tensors (torch.func.functional_call); a stand-in
    for the module inside loss functions written against `model(x_t, t, class_labels=y)`."""

    def __init__(self, model, params_and_buffers):
        self.model = model
        self.pb = params_and_buffers

    def __call__(self, *args, **kwargs):
        return torch.func.functional_call(self.model, self.pb, args, kwargs)


def vmap_per_sample_grads(model, loss, batch, chunk_size: Optional[int] = None) -> torch.Tensor:
    """[B, P] flat per-sample gradients by torch.func.vmap(grad) (the generic functorch recipe)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}

    def one(p, sample):
        single = {k: v.unsqueeze(0) for k, v in sample.items()}
        return loss(_Functional(model, {**p, **buffers}), single)[0]

    g = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0), chunk_size=chunk_size)(params, batch)
    return torch.cat([g[n].reshape(g[n].shape[0], -1) for n in names], dim=1)


def train_step_fn(model, loss, batch, lr: float = 1e-4) -> Callable[[], None]:
    """One plain training step (forward, mean loss, backward, Adam step): the unit the overheads of
    the consolidation ops are measured against."""
    params = params_of(model)
    opt = torch.optim.Adam(params, lr=lr)

    def step():
        opt.zero_grad(set_to_none=True)
        loss(model, batch).mean().backward()
        opt.step()

    return step


# --------------------------------------------------------------------------------------------------
# Rows, targets, output
# --------------------------------------------------------------------------------------------------
def row(family, case, impl, model="", size="", time_ms=None, vs_cdgfast=None, peak_mb=None, rel_err=None,
        note="") -> Dict[str, object]:
    return dict(family=family, case=case, impl=impl, model=model, size=size, time_ms=time_ms,
                vs_cdgfast=vs_cdgfast, peak_mb=peak_mb, rel_err=rel_err, note=note)


def fill_ratios(rows: List[dict], reference_impl_prefix: str = "cdgfast") -> List[dict]:
    """vs_cdgfast = time / time of the case's cdgfast row (how many times slower than cdgfast)."""
    ref = {}
    for r in rows:
        if str(r["impl"]).startswith(reference_impl_prefix) and r["time_ms"] is not None:
            ref.setdefault((r["family"], r["case"], r["model"], r["size"]), r["time_ms"])
    for r in rows:
        t0 = ref.get((r["family"], r["case"], r["model"], r["size"]))
        if t0 and r["time_ms"] is not None and r.get("vs_cdgfast") is None:
            r["vs_cdgfast"] = r["time_ms"] / t0
    return rows


def target(name: str, measured, threshold: str, passed: Optional[bool], note: str = "") -> Dict[str, object]:
    return dict(target=name, measured=measured, threshold=threshold, passed=passed, note=note)


def unavailable(family: str, case: str, impl: str, why: str, model: str = "", size: str = "") -> Dict[str, object]:
    return row(family, case, impl, model=model, size=size, note=f"not run: {why}")


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1000 or abs(v) < 1e-3:
            return f"{v:.3g}"
        return f"{v:.4g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def write_csv(path: str, rows: List[dict], fields: Sequence[str]) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in fields})


def markdown_table(rows: List[dict], fields: Sequence[str]) -> str:
    lines = ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k)).replace("|", "/") for k in fields) + " |")
    return "\n".join(lines)


def environment() -> Dict[str, str]:
    """What the numbers were measured on."""
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_threads": str(torch.get_num_threads()),
        "cpu_count": str(os.cpu_count()),
    }
    try:
        env["loadavg_1min"] = f"{os.getloadavg()[0]:.2f}"
    except OSError:
        pass
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    try:
        import triton

        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = "not installed"
    return env


def progress(iterable, cfg: BenchConfig, desc: str):
    if not cfg.progress:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, desc=desc, leave=False)
