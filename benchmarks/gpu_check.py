"""The GPU check (`make gpu-check`): every op and kernel on CUDA tensors against the CPU composite,
the `csrc` kernels through the runtime loader, then the benchmarks on CUDA.

    python benchmarks/gpu_check.py                    # on a CUDA machine: checks + benchmarks (< 8 min on an H200)
    python benchmarks/gpu_check.py --device cpu --out /tmp/gpu_dry   # dry run of the same checks on the CPU
    python benchmarks/gpu_check.py --no-bench         # the checks only

Each check runs one op (forward and, where it is differentiable, backward) or one kernel launcher on
the device in fp32, bf16 and fp16 (bf16 only where the device supports it) on odd shapes, and the
CPU composite (`cdgfast.ops` on CPU tensors, the plain-PyTorch contraction / update) in float64 on
the same rounded inputs; the error is max |device - reference| / max |reference| per output, against
a tolerance per dtype (`TOL`). Writes `<out>/checks.csv`, `<out>/checks.md` and (with the benchmarks)
`benchmarks/run_all.py --device cuda --out <out>`'s files; on CUDA it also replaces the GPU section of
BENCHMARKS.md (between the `<!-- gpu-check -->` markers) with the device name and the results.

Without CUDA and `--device cuda` (the default) it prints that there is no GPU and exits 0. The dry run
(`--device cpu`) runs the Triton launchers in the interpreter (TRITON_INTERPRET=1) on CPU tensors:
it exercises the comparisons and the launchers' argument handling, not the GPU code generation.
Exit status: 0 when every check passed (or there is no GPU), 1 when one failed.
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "results", "gpu")
BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")
MARK_BEGIN, MARK_END = "<!-- gpu-check begin -->", "<!-- gpu-check end -->"
TIME_BUDGET_S = 8 * 60  # one call of the device tool; the benchmarks get what the checks leave

# max |device - reference| / max |reference| allowed, by the dtype the device ran in
TOL = {"float32": 1e-4, "bfloat16": 4e-2, "float16": 5e-3}


def _torch():
    import torch

    return torch


def dtypes_for(device: str) -> List[str]:
    torch = _torch()
    names = ["float32", "float16"]
    if device == "cpu" or torch.cuda.is_bf16_supported():
        names.insert(1, "bfloat16")
    return names


def rel_error(got, ref) -> float:
    """max |got - ref| / max |ref| in float64 (both moved to the CPU); inf for a shape mismatch or NaN."""
    torch = _torch()
    got = torch.as_tensor(got).detach().double().cpu()
    ref = torch.as_tensor(ref).detach().double().cpu()
    if got.shape != ref.shape:
        return float("inf")
    if ref.numel() == 0:
        return 0.0
    err = (got - ref).abs().max()
    if not torch.isfinite(err):
        return float("inf")
    return float(err / ref.abs().max().clamp_min(1e-30))


# --------------------------------------------------------------------------------------------------
# The checks: name -> fn(device, dtype, gen) returning {output name: (device tensor, reference)}
# --------------------------------------------------------------------------------------------------
def _inputs(gen, dtype, device, *shapes, positive=False):
    """Random inputs rounded to `dtype` on `device`, and the same values in float64 on the CPU."""
    torch = _torch()
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    out = []
    for s in shapes:
        x = torch.randn(*s, generator=gen, dtype=torch.float64)
        if positive:
            x = x.abs() + 0.1
        d = x.to(dtype)
        out.append((d.to(device), d.double()))
    return out


def _fwd_bwd(fn: Callable, dev_args: Sequence, ref_args: Sequence, grad_of: Sequence[int]) -> Dict[str, tuple]:
    """fn on the device args and on the float64 CPU args; the output and the gradients of sum(out * w)
    w.r.t. the args at positions grad_of (w a fixed random weight, so no symmetry hides an error)."""
    torch = _torch()
    res = {}
    dev = [a.detach().requires_grad_(i in grad_of) for i, a in enumerate(dev_args)]
    ref = [a.detach().requires_grad_(i in grad_of) for i, a in enumerate(ref_args)]
    y, y_ref = fn(*dev), fn(*ref)
    res["out"] = (y, y_ref)
    if grad_of:
        w = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        gd = torch.autograd.grad((y.double() * w.to(y.device)).sum(), [dev[i] for i in grad_of])
        gr = torch.autograd.grad((y_ref * w).sum(), [ref[i] for i in grad_of])
        for i, a, b in zip(grad_of, gd, gr):
            res[f"grad[{i}]"] = (a, b)
    return res


def check_dc(device, dtype, gen):
    from cdgfast import ops

    torch = _torch()
    B, K, S = 3, 5, (3, 7, 9)  # odd sizes: no tile divides them
    (pred, pred_r), (eps, eps_r) = _inputs(gen, dtype, device, (B, K) + S, (B,) + S)
    target = torch.tensor([4, 0, 2])
    res = {}
    for name, fn in (("dc_errors", ops.dc_errors),
                     ("dc_scores", lambda p, e: ops.dc_scores(p, e, tau=0.7)),
                     ("dc_cross_entropy", lambda p, e: ops.dc_cross_entropy(
                         p, e, target.to(p.device), tau=0.7, reduction="none"))):
        for k, v in _fwd_bwd(fn, (pred, eps), (pred_r, eps_r), (0, 1)).items():
            res[f"{name} {k}"] = v
    return res


def check_penalties(device, dtype, gen):
    from cdgfast import ops

    P, K = 100_003, 3  # several blocks and a ragged tail
    (theta, theta_r), (anch, anch_r), (dirs, dirs_r), (coef, coef_r) = _inputs(
        gen, dtype, device, (P,), (K, P), (K, P), (K,))
    res = {}
    for k, v in _fwd_bwd(ops.rank1_penalty, (theta, anch, dirs, coef.abs()), (theta_r, anch_r, dirs_r, coef_r.abs()),
                         (0, 1, 2, 3)).items():
        res[f"rank1_penalty {k}"] = v
    (fis, fis_r), = _inputs(gen, dtype, device, (P,), positive=True)
    for k, v in _fwd_bwd(ops.diag_penalty, (theta, anch[0], fis), (theta_r, anch_r[0], fis_r), (0, 1, 2)).items():
        res[f"diag_penalty {k}"] = v
    return res


def check_bregman_lora(device, dtype, gen):
    from cdgfast import ops

    (st, st_r), (te, te_r) = _inputs(gen, dtype, device, (5, 3, 11, 13), (5, 3, 11, 13))
    (h, h_r), = _inputs(gen, dtype, device, (5, 3, 11, 13), positive=True)
    res = {}
    for k, v in _fwd_bwd(lambda s, t, p: ops.bregman_distill(s, t, p, kappa=0.5), (st, te, h), (st_r, te_r, h_r),
                         (0, 1)).items():
        res[f"bregman_distill {k}"] = v
    (pd, pd_r), (A, A_r), (Bm, B_r) = _inputs(gen, dtype, device, (37, 29), (37, 5), (5, 29))
    for k, v in _fwd_bwd(ops.lora_overlap_penalty, (pd, A, Bm), (pd_r, A_r, B_r), (1, 2)).items():
        res[f"lora_overlap_penalty {k}"] = v
    return res


def check_projection(device, dtype, gen):
    """The Triton per-sample contractions against the plain-PyTorch ones (the hook path's CPU code)."""
    torch = _torch()
    from cdgfast.kernels import projection as P

    res = {}
    (x, x_r), (gy, gy_r), (M, M_r), (Mb, Mb_r) = _inputs(gen, dtype, device, (3, 19, 37), (3, 19, 21), (21, 37), (21,))
    res["linear_grad_dot"] = (P.linear_grad_dot(x, gy, M, Mb), P.linear_grad_dot_torch(x_r, gy_r, M_r, Mb_r))
    res["linear_sq_grad_sum"] = (P.linear_sq_grad_sum(x, gy), P.linear_sq_grad_sum_torch(x_r, gy_r))
    (x1, x1_r), (g1, g1_r) = _inputs(gen, dtype, device, (5, 1, 33), (5, 1, 17))  # one token
    res["linear_sq_grad_sum T=1"] = (P.linear_sq_grad_sum(x1, g1), P.linear_sq_grad_sum_torch(x1_r, g1_r))
    for cfg in (dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, padding=1),
                dict(in_channels=4, out_channels=6, kernel_size=3, padding="same", groups=2, padding_mode="reflect")):
        conv = torch.nn.Conv2d(**cfg).double()
        with torch.no_grad():
            ho = conv(torch.zeros(1, cfg["in_channels"], 9, 7, dtype=torch.float64)).shape[2:]
        (xi, xi_r), (go, go_r), (Mw, Mw_r) = _inputs(gen, dtype, device, (3, cfg["in_channels"], 9, 7),
                                                     (3, cfg["out_channels"]) + tuple(ho), tuple(conv.weight.shape))
        tag = f"conv k3 s{conv.stride[0]} g{conv.groups}"
        conv_d = torch.nn.Conv2d(**cfg).to(device=device, dtype=getattr(torch, dtype))
        res[f"conv2d_sq_grad_sum {tag}"] = (P.conv2d_sq_grad_sum(xi, go, conv_d, use_kernel=True),
                                            P.conv2d_sq_grad_sum(xi_r, go_r, conv, use_kernel=False))
        res[f"conv2d_grad_dot {tag}"] = (P.conv2d_grad_dot(xi, go, conv_d, Mw, use_kernel=True),
                                         P.conv2d_grad_dot(xi_r, go_r, conv, Mw_r, use_kernel=False))
    return res


def check_fisher_update(device, dtype, gen):
    """The Triton in-place update and, on CUDA, csrc/fisher_update.cu through cdgfast._cuda."""
    torch = _torch()
    from cdgfast.kernels import fisher_update as kf

    res = {}
    (src, src_r), = _inputs(gen, dtype, device, (70_001,))
    (dst, dst_r), = _inputs(gen, "float32", device, (70_001,))
    got = kf.fisher_update_(dst.clone(), src, 0.9, 1.5, True)
    res["fisher_update_ (triton)"] = (got, 0.9 * dst_r + 1.5 * src_r * src_r)
    if str(device).startswith("cuda"):
        from cdgfast import _cuda

        if not _cuda.available():
            raise RuntimeError(f"csrc loader: {_cuda.unavailable_reason()}")
        shapes = [(3, 7), (1,), (129, 5), (0,), (33,)]
        parts = _inputs(gen, dtype, device, *shapes)
        flat, flat_r = _inputs(gen, "float32", device, (sum(int(torch.tensor(s).prod()) for s in shapes),))[0]
        out = kf.cuda_fisher_update_(flat.clone(), [p for p, _ in parts], 0.75, 1.25, True)
        ref = 0.75 * flat_r + 1.25 * torch.cat([r.reshape(-1) for _, r in parts]).square()
        res[f"csrc fisher_update.cu ({_cuda.backend()})"] = (out, ref)
    return res


CHECKS: Dict[str, Callable] = {
    "dc": check_dc,
    "penalties": check_penalties,
    "bregman+lora": check_bregman_lora,
    "projection": check_projection,
    "fisher_update": check_fisher_update,
}


def run_checks(device: str, dtypes: Optional[Sequence[str]] = None, checks: Optional[Dict[str, Callable]] = None,
               tol: Optional[Dict[str, float]] = None) -> List[dict]:
    """One row per (check, dtype, output): error, tolerance, passed; a check that raises gets a failed row
    with the exception (the other checks still run)."""
    torch = _torch()
    tol = tol or TOL
    rows = []
    for name, fn in (checks or CHECKS).items():
        for dt in dtypes or dtypes_for(device):
            gen = torch.Generator().manual_seed(0)
            t0 = time.perf_counter()
            try:
                outs = fn(device, dt, gen)
            except Exception as e:
                rows.append(dict(check=name, dtype=dt, output="(raised)", error=None, tol=tol[dt], passed=False,
                                 note=f"{type(e).__name__}: {str(e)[:300]}"))
                continue
            ms = 1e3 * (time.perf_counter() - t0)
            for out_name, (got, ref) in outs.items():
                err = rel_error(got, ref)
                on_dev = not isinstance(got, torch.Tensor) or got.device.type == torch.device(device).type
                rows.append(dict(check=name, dtype=dt, output=out_name, error=err, tol=tol[dt],
                                 passed=bool(err <= tol[dt] and on_dev),
                                 note="" if on_dev else f"result on {got.device}, expected {device}",
                                 ms=round(ms, 1)))
    return rows


FIELDS = ("check", "dtype", "output", "error", "tol", "passed", "note")


def write_rows(out_dir: str, rows: List[dict], header: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "checks.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(FIELDS), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    lines = [header, "", "| " + " | ".join(FIELDS) + " |", "|" + "---|" * len(FIELDS)]
    for r in rows:
        err = "" if r["error"] is None else f"{r['error']:.2e}"
        lines.append(f"| {r['check']} | {r['dtype']} | {r['output']} | {err} | {r['tol']:.0e} | "
                     f"{'yes' if r['passed'] else 'NO'} | {r['note']} |")
    md = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "checks.md"), "w") as f:
        f.write(md)
    return md


def run_benchmarks(device: str, out_dir: str, budget_s: float) -> Tuple[str, float]:
    """benchmarks/run_all.py on the device in a subprocess with a time limit; the --quick sizes when the
    full run does not fit. (what ran, seconds)."""
    t0 = time.perf_counter()
    for extra in ([], ["--quick"]):
        left = budget_s - (time.perf_counter() - t0)
        if left < 20:
            break
        cmd = [sys.executable, os.path.join(HERE, "run_all.py"), "--device", device, "--out", out_dir] + extra
        try:
            subprocess.run(cmd, check=True, timeout=left, cwd=ROOT)
            return " ".join(["python benchmarks/run_all.py", "--device", device] + extra), time.perf_counter() - t0
        except subprocess.TimeoutExpired:
            print(f"gpu-check: {' '.join(cmd[1:])} ran past {left:.0f} s", flush=True)
        except subprocess.CalledProcessError as e:
            return f"run_all.py failed with exit status {e.returncode}", time.perf_counter() - t0
    return "benchmarks did not fit the time budget", time.perf_counter() - t0


def update_benchmarks_md(section: str, path: str = BENCHMARKS_MD) -> None:
    """Replace the text between the gpu-check markers (append the markers when absent)."""
    text = open(path).read() if os.path.exists(path) else ""
    block = f"{MARK_BEGIN}\n{section.rstrip()}\n{MARK_END}"
    if MARK_BEGIN in text and MARK_END in text:
        head, rest = text.split(MARK_BEGIN, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    with open(path, "w") as f:
        f.write(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (dry run, Triton interpreted)")
    ap.add_argument("--out", default=None, help=f"output folder (default {DEFAULT_OUT} on CUDA)")
    ap.add_argument("--no-bench", action="store_true", help="the checks only")
    ap.add_argument("--budget", type=float, default=TIME_BUDGET_S, help="seconds for the whole check")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    if args.device not in ("cuda", "cpu") and not args.device.startswith("cuda:"):
        ap.error(f"--device: expected cuda or cpu, got {args.device!r}")
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported
        if args.out is None:
            ap.error("--out: required for the CPU dry run (benchmarks/results/gpu/ is for GPU figures)")
    torch = _torch()
    if args.device != "cpu" and not torch.cuda.is_available():
        print(f"gpu-check: no GPU here (torch {torch.__version__}: torch.cuda.is_available() is False); "
              "nothing checked. On a CUDA machine run `make gpu-check`; `python benchmarks/gpu_check.py "
              "--device cpu --out DIR` is the CPU dry run of the same comparisons.")
        return 0
    out = args.out or DEFAULT_OUT
    dev_name = torch.cuda.get_device_name(args.device) if args.device != "cpu" else "CPU (dry run, Triton interpreted)"
    rows = run_checks(args.device)
    failed = [r for r in rows if not r["passed"]]
    t_checks = time.perf_counter() - t_start
    header = (f"Checks on {dev_name} (torch {torch.__version__}): {len(rows) - len(failed)} of {len(rows)} "
              f"passed in {t_checks:.0f} s; reference: the CPU composite in float64 on the same rounded inputs.")
    md = write_rows(out, rows, header)
    print(md, flush=True)
    bench = ""
    if not args.no_bench:
        what, secs = run_benchmarks(args.device, out, args.budget - (time.perf_counter() - t_start) - 15)
        bench = f"\nBenchmarks: `{what}` ({secs:.0f} s), results in `{os.path.relpath(out, ROOT)}/results.md`.\n"
        print(bench, flush=True)
    if args.device != "cpu" and args.out is None:
        update_benchmarks_md(f"## GPU check: {dev_name}\n\nGenerated by `make gpu-check` "
                             f"({time.perf_counter() - t_start:.0f} s).\n\n{md}{bench}")
    print(f"gpu-check: {len(failed)} failed of {len(rows)} checks; wrote {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    sys.exit(main())
