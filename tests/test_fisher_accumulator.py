"""FisherAccumulator and online_update against explicit sums of per-sample gradients; the streaming
kernels (Triton under the interpreter, the multi-tensor fallback of cdgfast._cuda); bad input."""
import ctypes
import os
import re
import sys

import pytest
import torch

from cdgfast.fisher.accumulator import FisherAccumulator, fisher_update_, foreach_fisher_update, online_update


def close(got, ref, rtol=1e-12):
    got, ref = torch.as_tensor(got).detach().double(), torch.as_tensor(ref).detach().double()
    torch.testing.assert_close(got, ref, rtol=rtol, atol=rtol * max(float(ref.abs().max()), 1e-30))


def model_and_per_sample_grads(B=7):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()
    params = list(model.parameters())
    x = torch.randn(B, 3, dtype=torch.float64)
    y = torch.randn(B, 1, dtype=torch.float64)
    grads = []
    for i in range(B):  # one sample at a time: the explicit per-sample gradients
        loss = ((model(x[i:i + 1]) - y[i:i + 1]) ** 2).mean()
        grads.append(torch.autograd.grad(loss, params))
    flat = torch.stack([torch.cat([g.reshape(-1) for g in gs]) for gs in grads])  # [B, P]
    return params, grads, flat


def test_diagonal_mean_grad_and_coeff_from_flat_and_per_parameter_sums():
    params, grads, flat = model_and_per_sample_grads()
    B, P = flat.shape
    acc = FisherAccumulator(P, dtype=torch.float64)
    # two batches: flat sums for samples 0..2, per-parameter sums for 3..6
    acc.add_sq_grads((flat[:3] ** 2).sum(0), count=3)
    acc.add_sq_grads([sum(grads[i][j] ** 2 for i in range(3, B)) for j in range(len(params))], count=B - 3)
    acc.add_grads(flat[:3].sum(0), count=3)
    acc.add_grads([sum(grads[i][j] for i in range(3, B)) for j in range(len(params))], count=B - 3)
    assert (acc.num_sq, acc.num_grad) == (B, B)
    close(acc.diagonal(), (flat ** 2).mean(0))
    mu = acc.mean_grad()
    close(mu, flat.mean(0))
    acc.add_projections(flat[:4] @ mu)
    acc.add_projections(flat[4:] @ mu)
    assert acc.num_proj == B
    expected = sum(float(mu @ flat[i]) ** 2 for i in range(B)) / B / float(mu @ mu) ** 2
    assert acc.coeff() == pytest.approx(expected, rel=1e-12)
    other = torch.randn(P, dtype=torch.float64)  # an explicit mu divides by its own norm
    assert acc.coeff(other) == pytest.approx(expected * float(mu @ mu) ** 2 / float(other @ other) ** 2, rel=1e-12)
    acc.reset()
    assert (acc.num_sq, acc.num_grad, acc.num_proj) == (0, 0, 0)
    with pytest.raises(RuntimeError, match="diagonal"):
        acc.diagonal()


def test_add_squared_per_sample_float32_buffer():
    _, grads, flat = model_and_per_sample_grads(B=5)
    acc = FisherAccumulator(flat.shape[1])  # float32 default, device from the first input
    for i in range(5):
        acc.add_squared([g.float() for g in grads[i]])
    assert acc.num_sq == 5 and acc.diagonal().dtype == torch.float32 and acc.device == torch.device("cpu")
    close(acc.diagonal(), (flat ** 2).mean(0), 1e-6)


def test_coeff_zero_direction_is_zero():
    acc = FisherAccumulator(3)
    acc.add_projections(torch.zeros(4))
    assert acc.coeff(torch.zeros(3)) == 0.0


def test_online_update_decay_in_place():
    gamma = 0.9
    news = [torch.rand(13, dtype=torch.float64) for _ in range(4)]
    F = online_update(None, news[0], gamma)
    assert F is not news[0] and torch.equal(F, news[0])
    ref = news[0].clone()
    for n in news[1:]:
        out = online_update(F, n, gamma)
        assert out is F  # in place
        ref = gamma * ref + n
    close(F, ref)
    close(F, sum(gamma ** (len(news) - 1 - k) * n for k, n in enumerate(news)))
    assert torch.equal(news[0], news[0].clone())  # the first F_new was copied, not updated


def test_fisher_update_flat_and_list_paths_agree_with_mixed_dtypes():
    sizes = [1, 6, 0, 13]
    srcs = [torch.randn(s).to(dt) for s, dt in zip(sizes, (torch.float32, torch.bfloat16, torch.float32,
                                                           torch.float16))]
    flat_src = torch.cat([s.float().reshape(-1) for s in srcs])
    base = torch.randn(20)
    for square in (False, True):
        a = fisher_update_(base.clone(), srcs, gamma=0.5, scale=2.0, square=square)
        b = fisher_update_(base.clone(), flat_src, gamma=0.5, scale=2.0, square=square)
        v = flat_src.double() ** 2 if square else flat_src.double()
        close(a, 0.5 * base.double() + 2.0 * v, 1e-6)
        close(b, a, 1e-6)


@pytest.mark.parametrize("n,block", [(1, 64), (37, 16), (1031, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_triton_fisher_update_matches_torch(n, block, dtype):
    from cdgfast.kernels.fisher_update import fisher_sq_accumulate_
    from cdgfast.kernels.fisher_update import fisher_update_ as triton_update

    rtol = 1e-13 if dtype == torch.float64 else 1e-6
    dst, src = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
    for gamma, scale, square in ((1.0, 1.0, False), (0.9, 0.3, False), (0.7, 1.0 / 3.0, True)):
        got = triton_update(dst.clone(), src, gamma, scale, square, block=block)
        ref = gamma * dst.double() + scale * (src.double() ** 2 if square else src.double())
        close(got, ref, rtol)
    close(fisher_sq_accumulate_(dst.clone(), src.bfloat16(), 2.0), dst.double() + 2 * src.bfloat16().double() ** 2,
          rtol)


def test_triton_fisher_update_slices():
    from cdgfast.kernels.fisher_update import fisher_update_slices

    tensors = [torch.randn(3, 2), torch.randn(1), torch.randn(0), torch.randn(5, 1, 2)]
    dst = torch.randn(17)
    ref = dst.clone()
    foreach_fisher_update(ref, tensors, 0.8, 1.5, True)
    close(fisher_update_slices(dst, tensors, 0.8, 1.5, True), ref, 1e-6)
    with pytest.raises(ValueError, match="tensors"):
        fisher_update_slices(dst, tensors[:2], 1.0, 1.0, False)


def test_cuda_loader_fallback_and_sources():
    from cdgfast import _cuda
    from cdgfast.kernels import fisher_update as kf

    assert kf.CUDA_SOURCE == "fisher_update.cu" and kf.CUDA_SOURCE in _cuda.sources()
    src = _cuda.source(kf.CUDA_SOURCE)
    # every kernel the launcher names is an extern "C" entry point of the source, for its (F, g) types
    assert '#define FU_KERNEL(name, Dst, Tag)' in src and 'extern "C" __global__ void __launch_bounds__(FU_THREADS)' in src
    c_type = {torch.float32: "float", torch.float64: "double", torch.float16: "fu_half_tag",
              torch.bfloat16: "fu_bf16_tag"}
    defined = {m[1]: (m[2], m[3]) for m in re.finditer(r"^FU_KERNEL\((\w+), (\w+), (\w+)\)$", src, re.M)}
    assert defined == {name: (c_type[d], c_type[s]) for (d, s), name in kf.CUDA_KERNELS.items()}
    assert f"#define FU_CHUNK {kf.CUDA_CHUNK}" in src and f"#define FU_THREADS {kf.CUDA_THREADS}" in src
    with pytest.raises(ValueError, match="name"):
        _cuda.source("nope.cu")
    if not torch.cuda.is_available():
        assert not _cuda.available() and "CUDA" in _cuda.unavailable_reason()
        with pytest.raises(RuntimeError, match="unavailable"):
            _cuda.get_kernel(kf.CUDA_SOURCE, "fisher_update_f32_f32")
    tensors = [torch.randn(4, 3), torch.randn(2).half(), torch.randn(1).bfloat16()]
    dst = torch.randn(15)
    ref = dst.double() * 0.25 + 3.0 * torch.cat([t.double().reshape(-1) for t in tensors])
    close(fisher_update_(dst, tensors, gamma=0.25, scale=3.0), ref, 1e-6)
    with pytest.raises(ValueError, match=r"src\[1\].*device"):
        fisher_update_(dst, [tensors[0], torch.randn(3, device="meta")])
    for bad in (dst.view(3, 5), torch.randn(30)[::2], dst.long(), dst.tolist()):
        with pytest.raises(ValueError, match="dst: expected a contiguous 1-D floating"):
            fisher_update_(bad, tensors)


def _memory(address: int, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The n elements of `dtype` at a CPU address, as a tensor over that memory (what a kernel sees)."""
    nbytes = n * torch.empty(0, dtype=dtype).element_size()
    return torch.frombuffer((ctypes.c_char * nbytes).from_address(address), dtype=dtype, count=n)


class _EmulatedFisherKernel:
    """A line-by-line Python mirror of fu_find_tensor/fu_body in csrc/fisher_update.cu, launched like the
    compiled kernel (grid, block, args: dst, table, T, gamma, scale, square) and, like it, reading and
    writing through the addresses it is given. Counts how often each element of dst is written."""

    def __init__(self, name: str):
        from cdgfast.kernels import fisher_update as kf

        self.kf = kf
        self.dst_dtype, self.src_dtype = {v: k for k, v in kf.CUDA_KERNELS.items()}[name]
        self.hits = None

    def __call__(self, grid, block, args):
        kf = self.kf
        dst, table_dev, T, gamma, scale, square = args
        assert isinstance(T, int) and isinstance(gamma, float) and isinstance(scale, float) and square in (0, 1)
        assert dst.dtype == self.dst_dtype and table_dev.dtype == torch.int64 and table_dev.device == dst.device
        assert tuple(block) == (kf.CUDA_THREADS, 1, 1) and tuple(grid[1:]) == (1, 1)
        table = table_dev.tolist()
        assert len(table) == 4 * T + 1 and grid[0] == table[-1]  # grid.x = table[4T]
        fisher = _memory(dst.data_ptr(), dst.numel(), dst.dtype)
        if self.hits is None:
            self.hits = torch.zeros(dst.numel(), dtype=torch.int64)
        ptrs, sizes, offsets, prefix = table[:T], table[T:2 * T], table[2 * T:3 * T], table[3 * T:]
        chunk = kf.CUDA_CHUNK
        for blk in range(grid[0]):
            lo, hi = 0, T - 1
            while lo < hi:
                mid = (lo + hi + 1) >> 1
                if prefix[mid] <= blk:
                    lo = mid
                else:
                    hi = mid - 1
            n = sizes[lo]
            begin = (blk - prefix[lo]) * chunk
            end = min(begin + chunk, n)
            v = _memory(ptrs[lo], n, self.src_dtype)[begin:end].to(dst.dtype)  # arithmetic in F's type
            if square:
                v = v * v
            out = fisher[offsets[lo] + begin:offsets[lo] + end]
            out.copy_(gamma * out + scale * v)
            self.hits[offsets[lo] + begin:offsets[lo] + end] += 1


@pytest.fixture
def emulated_cuda(monkeypatch):
    """cdgfast._cuda.get_kernel compiles nothing: it hands out _EmulatedFisherKernel (list of those made)."""
    from cdgfast import _cuda
    from cdgfast.kernels import fisher_update as kf

    made = []

    def get_kernel(source_name, kernel_name, device=None):
        assert source_name == kf.CUDA_SOURCE and kernel_name in kf.CUDA_KERNELS.values()
        made.append(_EmulatedFisherKernel(kernel_name))
        return made[-1]

    monkeypatch.setattr(_cuda, "get_kernel", get_kernel)
    return made


def test_cuda_launcher_table_and_block_mapping_emulated_on_cpu(emulated_cuda):
    """The CUDA launcher end to end on the CPU: its groups, table, kernel names and launch configuration,
    run by the emulated kernel: every element is written exactly once and matches the torch path."""
    from cdgfast.kernels import fisher_update as kf

    chunk = kf.CUDA_CHUNK
    cases = [(torch.float32, [torch.randn(1), torch.randn(chunk - 1), torch.randn(0), torch.randn(2, chunk // 2),
                              torch.randn(chunk + 1).half(), torch.randn(9000), torch.randn(3).half(),
                              torch.randn(5).bfloat16()], 1e-6),
             (torch.float64, [torch.randn(7, dtype=torch.float64), torch.randn(chunk + 3, dtype=torch.float64)],
              1e-12)]
    for dst_dtype, tensors, rtol in cases:
        total = sum(t.numel() for t in tensors)
        base = torch.randn(total, dtype=dst_dtype)
        for square in (False, True):
            emulated_cuda.clear()
            dst = base.clone()
            assert kf.cuda_fisher_update_(dst, tensors, 0.75, 1.25, square) is dst
            assert len(emulated_cuda) == len({t.dtype for t in tensors})  # one launch per source dtype
            hits = sum(k.hits for k in emulated_cuda)
            assert torch.equal(hits, torch.ones_like(hits))
            ref = base.clone()
            foreach_fisher_update(ref, tensors, 0.75, 1.25, square)
            close(dst, ref, rtol)
            close(dst, naive_update(base, tensors, 0.75, 1.25, square), rtol)


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: drives the CUDA branches of `_fisher_update` on the CPU."""

    @property
    def is_cuda(self):
        return True


def test_fisher_update_picks_the_implementation_in_one_place(monkeypatch, emulated_cuda):
    """`_fisher_update`'s choice: flat -> Triton on CUDA, plain torch elsewhere; list -> the CUDA kernel on
    CUDA when the loader is available, a kernel exists for every dtype pair and it is trusted, in that
    order, else torch._foreach_*; the numbers are the same on every path."""
    from cdgfast import _cuda
    from cdgfast.fisher import accumulator as A
    from cdgfast.kernels import fisher_update as kf

    calls = []

    def spy(module, attr, label, unwrap=False):
        real = getattr(module, attr)

        def wrapper(dst, src, *args):
            calls.append(label)
            if unwrap:  # the Triton interpreter wants plain CPU tensors; the update lands in dst's storage
                real(dst.as_subclass(torch.Tensor), src.as_subclass(torch.Tensor), *args)
                return dst
            return real(dst, src, *args)

        monkeypatch.setattr(module, attr, wrapper)

    spy(kf, "fisher_update_", "triton", unwrap=True)
    spy(kf, "cuda_fisher_update_", "cuda")
    spy(A, "_foreach_fisher_update_", "foreach")
    state = {"available": True, "trusted": True}
    asked = []
    monkeypatch.setattr(_cuda, "available", lambda: state["available"])

    def trusted(source_name, device, check, fallback):
        asked.append(source_name)
        assert check is A._check_cuda_kernel and fallback == "torch._foreach_*"
        return state["trusted"]

    monkeypatch.setattr(_cuda, "trusted", trusted)

    def run(dst, src, expect):
        calls.clear()
        ref = naive_update(dst, src if isinstance(src, list) else [src], 0.5, 2.0, True)
        out = fisher_update_(dst, src, gamma=0.5, scale=2.0, square=True)
        assert out is dst and calls == [expect], (calls, expect)
        close(out, ref, 1e-6)

    f32 = [torch.randn(3, 2), torch.randn(5).half(), torch.randn(0), torch.randn(4).bfloat16()]
    run(torch.rand(15), f32, "foreach")  # a CPU buffer never asks the loader
    assert asked == []
    run(torch.rand(15).as_subclass(_OnCuda), f32, "cuda")
    assert asked == ["fisher_update.cu"]
    run(torch.rand(15).as_subclass(_OnCuda), torch.randn(15), "triton")
    calls.clear()
    fisher_update_(torch.rand(15), torch.randn(15))
    assert calls == []  # the CPU flat path is plain torch: neither Triton nor a multi-tensor path
    state["trusted"] = False
    run(torch.rand(15).as_subclass(_OnCuda), f32, "foreach")
    state["trusted"], state["available"] = True, False
    asked.clear()
    run(torch.rand(15).as_subclass(_OnCuda), f32, "foreach")
    assert asked == []  # no loader: the check is never run
    state["available"] = True
    mixed64 = [torch.randn(3, 2, dtype=torch.float64), torch.randn(9)]  # (float64, float32): no kernel
    run(torch.rand(15, dtype=torch.float64).as_subclass(_OnCuda), mixed64, "foreach")
    assert asked == []  # no kernel for a dtype pair: neither is the check


def test_cuda_kernel_check_and_trust(monkeypatch, emulated_cuda):
    """`_check_cuda_kernel` accepts the (emulated) kernel and rejects a wrong one; `_cuda.trusted` runs a
    check once per (source, device) and turns a failure into a warning and False."""
    from cdgfast import _cuda
    from cdgfast.fisher import accumulator as A

    A._check_cuda_kernel(torch.device("cpu"))  # the emulated launch agrees with torch._foreach_*
    assert emulated_cuda
    real_call = _EmulatedFisherKernel.__call__
    monkeypatch.setattr(_EmulatedFisherKernel, "__call__",
                        lambda self, grid, block, args: real_call(self, grid, block, [*args[:3], args[3] * 1.001,
                                                                                      *args[4:]]))
    with pytest.raises(RuntimeError, match="mismatch"):
        A._check_cuda_kernel(torch.device("cpu"))

    monkeypatch.setattr(_cuda, "_trusted", {})
    runs = []

    def good(device):
        runs.append(device)

    def bad(device):
        runs.append(device)
        raise RuntimeError("compile error 42")

    assert _cuda.trusted("a.cu", "cuda:1", good, fallback="plain torch")
    assert _cuda.trusted("a.cu", torch.device("cuda", 1), good, fallback="plain torch")
    assert runs == [torch.device("cuda", 1)]  # once per device
    with pytest.warns(UserWarning, match=r"csrc/a\.cu disabled on cuda:0, using plain torch: compile error 42"):
        assert not _cuda.trusted("a.cu", "cuda:0", bad, fallback="plain torch")
    assert not _cuda.trusted("a.cu", "cuda:0", good, fallback="plain torch")  # stays off, checked once
    assert _cuda.trusted("b.cu", "cuda:0", good, fallback="plain torch")  # per source
    assert runs == [torch.device("cuda", 1), torch.device("cuda", 0), torch.device("cuda", 0)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernel_matches_foreach():
    from cdgfast import _cuda
    from cdgfast.fisher import accumulator as A
    from cdgfast.kernels import fisher_update as kf

    if not _cuda.available():
        pytest.skip(_cuda.unavailable_reason())
    dev = torch.device("cuda")
    tensors = [torch.randn(n, device=dev) for n in (1, 4095, 4096, 4097, 70001)]
    tensors += [torch.randn(33, device=dev).half(), torch.randn(5000, device=dev).bfloat16()]
    total = sum(t.numel() for t in tensors)
    for square in (False, True):
        dst = torch.randn(total, device=dev)
        ref = dst.clone()
        foreach_fisher_update(ref, tensors, 0.9, 0.5, square)
        kf.cuda_fisher_update_(dst, tensors, 0.9, 0.5, square)
        torch.testing.assert_close(dst, ref, rtol=1e-5, atol=1e-6)
    assert _cuda.trusted(kf.CUDA_SOURCE, dev, A._check_cuda_kernel, fallback="torch._foreach_*")


def test_cuda_loader_is_not_imported_on_cpu_paths(monkeypatch):
    import ast
    import pathlib

    import cdgfast
    import cdgfast.kernels
    from cdgfast.ops.lora import lora_overlap_penalty
    from cdgfast.ops.penalties import diag_penalty

    # import time: no module-level import of cdgfast._cuda anywhere in the package, kernels included
    for root in {pathlib.Path(cdgfast.__file__).parent, pathlib.Path(cdgfast.kernels.__file__).parent}:
        for path in root.rglob("*.py"):
            for node in ast.parse(path.read_text()).body:
                if isinstance(node, ast.Import):
                    bad = any(a.name.startswith("cdgfast._cuda") for a in node.names)
                elif isinstance(node, ast.ImportFrom):
                    bad = (node.module or "").startswith("cdgfast._cuda") or (
                        node.module == "cdgfast" and any(a.name == "_cuda" for a in node.names))
                else:
                    continue
                assert not bad, f"{path} imports the CUDA loader at import time"
    # run time: the CPU paths never reach it
    monkeypatch.delitem(sys.modules, "cdgfast._cuda", raising=False)
    monkeypatch.delattr(cdgfast, "_cuda", raising=False)
    acc = FisherAccumulator(5)
    acc.add_sq_grads([torch.ones(2), torch.ones(3)], 1)
    acc.add_squared(torch.ones(5))
    online_update(torch.ones(5), torch.ones(5), 0.5)
    diag_penalty([torch.ones(2, requires_grad=True), torch.ones(3)], torch.zeros(5), torch.ones(5)).backward()
    lora_overlap_penalty(torch.ones(2, 2), torch.ones(2, 1), torch.ones(1, 2))
    assert "cdgfast._cuda" not in sys.modules and "cupy" not in sys.modules


def test_fisher_update_without_triton_installed():
    """Without Triton (where it has no wheels) the accumulator, the projection helpers and the CUDA launcher
    module still import and the CPU paths run; nothing imports the loader."""
    import subprocess

    code = ("import sys\n"
            "sys.modules['triton'] = None  # `import triton` raises ImportError, as where it is not installed\n"
            "import torch\n"
            "from cdgfast.fisher import FisherAccumulator\n"
            "from cdgfast.kernels import _common, fisher_update as kf, projection\n"
            "assert _common.triton is None and projection.triton is None and not hasattr(kf, '_fisher_update_kernel')\n"
            "assert kf.CUDA_SOURCE == 'fisher_update.cu' and len(kf.CUDA_KERNELS) == 4\n"
            "acc = FisherAccumulator(5)\n"
            "acc.add_squared([torch.ones(2), 2 * torch.ones(3)])\n"
            "acc.add_squared(torch.ones(5))\n"
            "assert acc.diagonal().tolist() == [1.0, 1.0, 2.5, 2.5, 2.5], acc.diagonal()\n"
            "assert 'cdgfast._cuda' not in sys.modules\n"
            "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stdout + proc.stderr


def test_bad_input_names_the_argument():
    with pytest.raises(ValueError, match="num_params"):
        FisherAccumulator(0)
    with pytest.raises(ValueError, match="dtype"):
        FisherAccumulator(3, dtype=torch.int64)
    acc = FisherAccumulator(5)
    with pytest.raises(ValueError, match=r"sq.*5 elements"):
        acc.add_sq_grads(torch.ones(4), 1)
    with pytest.raises(ValueError, match=r"sq.*5 elements"):
        acc.add_sq_grads([torch.ones(2), torch.ones(2)], 1)
    with pytest.raises(ValueError, match="count"):
        acc.add_sq_grads(torch.ones(5), 0)
    with pytest.raises(ValueError, match="count"):
        acc.add_grads(torch.ones(5), 1.5)
    with pytest.raises(ValueError, match=r"g.*floating"):
        acc.add_grads(torch.ones(5, dtype=torch.long), 1)
    with pytest.raises(ValueError, match=r"g\[1\].*floating"):
        acc.add_grads([torch.ones(2), torch.ones(3, dtype=torch.long)], 1)
    with pytest.raises(ValueError, match="g.*empty"):
        acc.add_grads(torch.ones(0), 1)
    with pytest.raises(ValueError, match="g.*non-empty list"):
        acc.add_grads([], 1)
    acc.add_grads(torch.ones(5), 1)  # fixes the device to the CPU
    with pytest.raises(ValueError, match="g.*device"):
        acc.add_grads(torch.ones(5, device="meta"), 1)
    with pytest.raises(ValueError, match="proj.*device"):
        acc.add_projections(torch.ones(3, device="meta"))
    with pytest.raises(ValueError, match="proj.*1 dimensions"):
        acc.add_projections(torch.ones(3, 1))
    with pytest.raises(RuntimeError, match="projections"):
        acc.coeff()
    acc.add_projections(torch.ones(3))
    with pytest.raises(ValueError, match="mean_grad.*5 elements"):
        acc.coeff(torch.ones(4))
    with pytest.raises(ValueError, match="gamma"):
        online_update(torch.ones(3), torch.ones(3), -0.1)
    with pytest.raises(ValueError, match=r"new.*\(3,\)"):
        online_update(torch.ones(3), torch.ones(4), 0.5)
    with pytest.raises(ValueError, match="new.*device"):
        online_update(torch.ones(3), torch.ones(3, device="meta"), 0.5)
    with pytest.raises(ValueError, match="new.*floating"):
        online_update(torch.ones(3), torch.ones(3, dtype=torch.int32), 0.5)


# ---------------------------------------------------------------------------------------------------------
# Cached views, the flat (tiled storage) path, gamma folding, flatten_parameters_

def naive_update(F, tensors, gamma=1.0, scale=1.0, square=False):
    """F <- gamma F + scale (t or t*t), one parameter at a time, in float64."""
    out, off = F.double().clone(), 0
    for t in tensors:
        n = t.numel()
        v = t.double().reshape(-1)
        out[off:off + n] = gamma * out[off:off + n] + scale * (v * v if square else v)
        off += n
    return out


def test_view_cache_follows_the_parameter_list_and_never_goes_stale():
    torch.manual_seed(1)
    dst = torch.randn(12, dtype=torch.float64)
    ref = dst.clone()
    layouts = [[(3, 2), (1,), (5,)], [(12,)], [(4, 1), (0,), (2, 2), (4,)], [(3, 2), (1,), (5,)], [(1, 12)]]
    for shapes in layouts * 2:  # each layout twice: the second time the views come from the cache
        ts = [torch.randn(s, dtype=torch.float64) for s in shapes]
        for square in (False, True):
            fisher_update_(dst, ts, gamma=0.75, scale=1.5, square=square)
            ref = naive_update(ref, ts, 0.75, 1.5, square)
        close(dst, ref)
    # a second buffer with the same layout gets its own views
    other = torch.zeros(12, dtype=torch.float64)
    ts = [torch.randn(s, dtype=torch.float64) for s in layouts[0]]
    fisher_update_(other, ts)
    close(other, naive_update(torch.zeros(12), ts))
    close(dst, ref)  # untouched by the update of `other`
    # a wrong total is still caught after the layouts were cached
    with pytest.raises(ValueError, match=r"src.*12 elements"):
        fisher_update_(dst, [torch.randn(3, 2, dtype=torch.float64), torch.randn(5, dtype=torch.float64)])


def test_tiled_list_cache_sees_repointed_tensors():
    from cdgfast.params import split_like

    shapes = [(2, 3), (1,), (4, 1, 2)]
    P = 15
    store = torch.randn(P, dtype=torch.float64)
    ts = split_like(store, [torch.empty(s) for s in shapes])  # views that tile `store`
    dst = torch.zeros(P, dtype=torch.float64)
    fisher_update_(dst, ts, square=True)
    fisher_update_(dst, ts, square=True)  # the remembered flat alias
    close(dst, 2 * store ** 2)
    store.mul_(3)  # new values in the same storage: the alias reads them
    fisher_update_(dst, ts)
    close(dst, 2 * (store / 3) ** 2 + store)
    ts[1].data = torch.full((1,), 7.0, dtype=torch.float64)  # same object, new storage: no longer tiled
    before = dst.clone()
    fisher_update_(dst, ts, gamma=0.5)
    close(dst, naive_update(before, ts, 0.5))
    assert float(dst[6]) == pytest.approx(0.5 * float(before[6]) + 7.0)


@pytest.mark.parametrize("chunk", [7, 1 << 16])
def test_flat_detect_path_matches_per_parameter_reference(monkeypatch, chunk):
    from cdgfast.params import flatten_parameters_
    from cdgfast.fisher import accumulator as A

    monkeypatch.setattr(A, "_FLAT_CHUNK", chunk)  # 7: the chunked gamma pass runs over many chunks
    torch.manual_seed(2)
    shapes = [(3, 1, 5), (1,), (7,), (2, 9), (1, 1)]
    mod = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes])
    fp = flatten_parameters_(mod)
    fp.sync_grads()  # no backward yet: every p.grad becomes its (zero) view of the flat gradient
    with torch.no_grad():
        for g in fp.grads():
            g.copy_(torch.randn(g.shape, dtype=torch.float64))

    def no_foreach(*a, **k):
        raise AssertionError("the tiled list must take the flat path, not _foreach")

    for op in ("_foreach_add_", "_foreach_addcmul_", "_foreach_mul_"):
        monkeypatch.setattr(torch, op, no_foreach)
    P = fp.numel
    for src in ([p.grad for p in fp.params], list(fp.params)):
        base = torch.rand(P, dtype=torch.float64)
        for gamma, scale, square in ((1.0, 1.0, False), (0.9, 0.5, True), (0.3, 2.0, False), (0.0, 1.0, True),
                                     (0.5, 1.0, False)):
            for _ in range(2):  # detection, then the remembered alias
                got = fisher_update_(base.clone(), src, gamma=gamma, scale=scale, square=square)
                close(got, naive_update(base, [t.detach() for t in src], gamma, scale, square))
    acc = FisherAccumulator(P, dtype=torch.float64)
    for _ in range(3):
        acc.add_squared([p.grad for p in fp.params], count=2)
        acc.add_grads([p.grad for p in fp.params], count=2)
    close(acc.diagonal(), torch.cat([p.grad.reshape(-1) ** 2 for p in fp.params]) / 2)
    close(acc.mean_grad(), torch.cat([p.grad.reshape(-1) for p in fp.params]) / 2)
    # online_update (flat tensors) through the chunked pass
    F = online_update(torch.ones(P, dtype=torch.float64), fp.grad, 0.25)
    close(F, 0.25 + fp.grad)


@pytest.mark.parametrize("chunk", [5, 1 << 16])
def test_gamma_folding_on_per_parameter_lists_matches_naive_loop(monkeypatch, chunk):
    from cdgfast.fisher import accumulator as A

    monkeypatch.setattr(A, "_FLAT_CHUNK", chunk)  # 5: many groups of views, decayed group by group
    torch.manual_seed(3)
    shapes = [(2, 3), (1,), (0,), (4, 1), (13,), (1, 1, 1), (3, 3)]
    P = sum(torch.Size(s).numel() for s in shapes)
    for dtype, rtol in ((torch.float64, 1e-12), (torch.float32, 1e-6)):
        F = torch.rand(P, dtype=dtype)
        ref = F.double().clone()  # .double() of a float64 tensor is the tensor itself
        for step in range(3):
            ts = [torch.randn(s, dtype=dtype) for s in shapes]
            gamma, scale, square = (0.9, 0.5, True) if step % 2 == 0 else (0.6, 1.25, False)
            fisher_update_(F, ts, gamma=gamma, scale=scale, square=square)
            ref = naive_update(ref, ts, gamma, scale, square)
            close(F, ref, rtol)
            other = torch.rand(P, dtype=dtype)  # foreach_fisher_update is the same update without checks
            expect = naive_update(other, ts, gamma, scale, square)
            foreach_fisher_update(other, ts, gamma, scale, square)
            close(other, expect, rtol)
    # flat sources of another dtype, every CPU branch of the flat update (one-op online form included)
    for gamma, scale, square in ((0.5, 1.0, False), (0.5, 1.0, True), (0.5, 3.0, False), (1.0, 2.0, True)):
        F, src = torch.rand(P), torch.randn(P).bfloat16()
        ref = naive_update(F, [src], gamma, scale, square)
        close(fisher_update_(F, src, gamma=gamma, scale=scale, square=square), ref, 1e-6)
    # mixed source dtypes through the groups
    F = torch.rand(P)
    ts = [torch.randn(s).to(dt) for s, dt in zip(shapes, [torch.float16, torch.bfloat16] * 4)]
    ref = naive_update(F, ts, 0.8, 3.0, True)
    close(fisher_update_(F, ts, gamma=0.8, scale=3.0, square=True), ref, 1e-6)


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3)
        self.norm = torch.nn.GroupNorm(1, 3)
        self.lin = torch.nn.Linear(3 * 3 * 3, 5)
        self.unused = torch.nn.Linear(1, 1)  # never in a forward: its gradient stays None
        self.frozen = torch.nn.Parameter(torch.ones(2), requires_grad=False)

    def forward(self, x):
        h = torch.nn.functional.silu(self.norm(self.conv(x)))
        return self.lin(h.flatten(1)) * self.frozen.sum()


def test_flatten_parameters_trains_like_the_unflattened_model():
    import copy
    import io

    from cdgfast.params import FlatParameters, flatten_parameters_
    from cdgfast.ops.penalties import _shared_flat_buffer, flat_parameters

    torch.manual_seed(4)
    ref = _Net().double()
    net = copy.deepcopy(ref)
    fp = flatten_parameters_(net)
    assert isinstance(fp, FlatParameters) and fp.is_flat()
    params = [p for p in net.parameters() if p.requires_grad]
    assert fp.params == params and fp.numel == sum(p.numel() for p in params)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), net.parameters()))  # values kept
    theta = flat_parameters(params)  # the penalties see one zero-copy view
    assert theta.data_ptr() == fp.data.data_ptr() and _shared_flat_buffer(fp.grads()) is not None
    assert all(p.grad is None for p in params)  # no gradient yet: optimizers still skip them
    opts = [torch.optim.Adam(ref.parameters(), lr=1e-2), torch.optim.Adam(net.parameters(), lr=1e-2)]
    acc_ref, acc = FisherAccumulator(fp.numel, dtype=torch.float64), FisherAccumulator(fp.numel, dtype=torch.float64)
    for step in range(4):
        x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
        for model, opt in zip((ref, net), opts):
            opt.zero_grad(set_to_none=step % 2 == 0)  # both ways of zeroing
            loss = model(x).pow(2).mean()
            loss.backward()
            if step == 1:
                (0.5 * model(x).sum()).backward()  # a second backward accumulates into .grad
        assert net.unused.weight.grad is None  # never in a backward: still None, like the reference's
        ref_grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                     for p in ref.parameters() if p.requires_grad]
        torch.testing.assert_close(fp.grad, torch.cat([g.reshape(-1) for g in ref_grads]), rtol=1e-12, atol=0)
        assert fp.is_flat()
        acc.add_squared(fp.grad)  # the flat buffer, against per-parameter gradients
        acc_ref.add_squared(ref_grads)
        for opt in opts:
            opt.step()
        for a, b in zip(ref.parameters(), net.parameters()):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-15)
        assert fp.is_flat()  # the optimizer updated the parameters in place: still views of fp.data
    close(acc.diagonal(), acc_ref.diagonal())
    fp.sync_grads()  # now every p.grad is a view (zeros for `unused`), and the list takes the flat path
    assert fp.is_flat() and all(p.grad is not None for p in params)
    torch.testing.assert_close(fp.grad, torch.cat([g.reshape(-1) for g in ref_grads]), rtol=1e-12, atol=0)
    assert _shared_flat_buffer([p.grad for p in params]) is not None
    acc.add_squared([p.grad for p in params])
    acc_ref.add_squared(ref_grads)
    close(acc.diagonal(), acc_ref.diagonal())
    with torch.no_grad():  # writing the flat buffer writes the parameters
        fp.data[:3] = 0.0
    assert float(net.conv.weight.detach().reshape(-1)[:3].abs().sum()) == 0.0
    # state_dict: save the flattened model, load into an unflattened one, and back
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    fresh = _Net().double()
    fresh.load_state_dict(torch.load(buf))
    for a, b in zip(fresh.state_dict().values(), net.state_dict().values()):
        assert torch.equal(a, b)
    net.load_state_dict(ref.state_dict())  # in place: still flat
    assert fp.is_flat() and torch.equal(fp.data, torch.cat([p.detach().reshape(-1) for p in ref.parameters()
                                                            if p.requires_grad]))
    net.lin.weight.grad = torch.ones_like(net.lin.weight)  # a replaced gradient is re-pointed by zero_grad
    fp.zero_grad()
    assert float(fp.grad.abs().sum()) == 0.0 and fp.is_flat() and float(net.lin.weight.grad.abs().sum()) == 0.0
    net.conv.weight.data = net.conv.weight.data.clone()  # re-pointed: no longer flat, and the paths notice
    assert not fp.is_flat() and _shared_flat_buffer(params) is None
    fp.remove()


def test_flatten_parameters_bad_input_names_the_argument():
    from cdgfast.params import flatten_parameters_

    with pytest.raises(ValueError, match="model"):
        flatten_parameters_(torch.nn.ReLU())
    mixed = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2).double())
    with pytest.raises(ValueError, match="model.*one dtype"):
        flatten_parameters_(mixed)
    with pytest.raises(ValueError, match=r"model\[0\].*Parameter"):
        flatten_parameters_([torch.ones(2)])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_running_sums_are_refused(dtype):
    """A bf16 sum of 4096 ones stops at 256: half-precision running sums would be a quietly wrong Fisher."""
    total = torch.zeros((), dtype=dtype)
    for _ in range(4096):
        total += 1
    assert float(total) < 4096  # why: the running sum stalls in this dtype
    with pytest.raises(ValueError, match="dtype.*float32 or torch.float64"):
        FisherAccumulator(3, dtype=dtype)
    acc = FisherAccumulator(3)  # half-precision inputs into float32 sums are fine
    for _ in range(4096):
        acc.add_sq_grads(torch.ones(3, dtype=dtype), 1)
    assert torch.equal(acc.diagonal(), torch.ones(3))
