"""Per-sample gradient contractions for Linear and Conv2d layers, without per-sample gradients.

For a Linear layer `y = x W^T + b` applied to a sample's tokens `x_i [T, Cin]` (T = 1 for a plain
`[B, C]` input), the per-sample weight gradient is `g_i = gy_i^T x_i [Cout, Cin]` with
`gy_i = dl_i/dy_i [T, Cout]`, and the bias gradient is `sum_t gy_i,t`. Two contractions of `g_i`
are what the rank-1 and diagonal Fisher estimators need (SPEC section 4):

* `linear_grad_dot(x, gy, M, Mb)[i] = <g_i, M>_F (+ Mb . sum_t gy_i,t)`
  = `sum_t sum_o gy[i,t,o] * (x[i,t,:] . M[o,:])`: the direction `M` (shaped like the weight)
  dotted with the per-sample gradient, computed as `x_i M^T` contracted with `gy_i`;
* `linear_sq_grad_sum(x, gy)[o, c] = sum_i g_i[o, c]^2`: each program owns one (Cout, Cin) tile,
  loops over samples, forms that tile of `gy_i^T x_i` with `tl.dot` over T-chunks, squares and
  accumulates it in fp32 registers and writes once, so memory stays O(Cout*Cin), never
  O(B*Cout*Cin); `out += scale * ...` streams it straight into a Fisher buffer slice.

Conv2d reduces to the Linear case: with `x = unfold(input)` laid out `[B, L, Cin/groups*kh*kw]` (L =
output positions) and `gy = grad_output` laid out `[B, L, Cout]`, the per-sample weight gradient is
`gy_i^T x_i` reshaped like `weight` (channel-major, then kernel rows and columns, the order of both
`F.unfold` and `weight.reshape(Cout, -1)`). `conv2d_as_linear` builds that layout (plain torch);
for `groups > 1` it returns the layout of one group (`group=g`), whose rows are
`weight[g*Cout/G:(g+1)*Cout/G]`. `conv2d_sq_grad_sum` unfolds the padded input in chunks of whole
samples (the unfolded input is `kh*kw` times the input's size) and contracts it per group;
`conv2d_grad_dot` needs no unfold in plain torch: `<g_i, M> = <conv2d(x_i, M), gy_i>`.

Launchers (`linear_grad_dot`, `linear_sq_grad_sum`) always run the Triton kernels: on CUDA tensors
normally, on CPU tensors only under `TRITON_INTERPRET=1` (the tests). The plain-PyTorch functions
(`linear_grad_dot_torch`, `linear_sq_grad_sum_torch`, `bias_sq_grad_sum`, `conv2d_grad_dot`,
`conv2d_sq_grad_sum`, `conv2d_bias_sq_grad_sum`; the conv functions call the launchers when
`use_kernel`) are the only copy of these contractions: `cdgfast.fisher.hooks` runs them (and the
launchers on CUDA), and the tests check both against naive references. They take `acc`, the
accumulation dtype (the hook path passes its own); the launchers accumulate in fp32 for
fp16/bf16/fp32 inputs (fp32 matmuls use IEEE precision, not TF32, unless `allow_tf32=True`) and fp64
for fp64 inputs, and so do the torch functions by default. Sample i may own r consecutive rows of a
Conv2d's input (`rows_per_sample=r`): its gradient is the sum over them.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from cdgfast._dispatch import triton_interpreted, use_triton
from cdgfast._validation import check_same_device, check_shape, check_tensor

# None without Triton (Linux x86_64 always has it); then only the *_torch paths exist
from ._common import tl, tl_dtype, triton

__all__ = [
    "linear_grad_dot",
    "linear_sq_grad_sum",
    "bias_sq_grad_sum",
    "linear_grad_dot_torch",
    "linear_sq_grad_sum_torch",
    "conv_padded_input",
    "conv2d_as_linear",
    "conv2d_grad_dot",
    "conv2d_sq_grad_sum",
    "conv2d_bias_sq_grad_sum",
    "MAX_ELEMENTS",
]

# Fixed tiles under the interpreter (tl.dot needs every tile dimension >= 16; masks pad odd sizes).
_INTERP_BLOCK = 16
# The tile the split-over-samples heuristic assumes (autotune may pick another; only occupancy moves).
_NOMINAL_TILE = 64


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _grad_dot_kernel(
        x_ptr, gy_ptr, m_ptr, mb_ptr, part_ptr,
        T, CIN, COUT, NUM_T_TILES,
        sxb, sxt, sxc, sgb, sgt, sgo, smo, smc, smb,
        HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr,
        PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # One program: one sample i, one chunk of BLOCK_T rows; writes one partial sum.
        pid_b = tl.program_id(0)
        pid_t = tl.program_id(1)
        t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
        t_mask = t < T
        x_base = x_ptr + pid_b.to(tl.int64) * sxb
        g_base = gy_ptr + pid_b.to(tl.int64) * sgb
        row = tl.zeros([BLOCK_T], dtype=ACC_DTYPE)
        for o0 in range(0, COUT, BLOCK_O):
            o = o0 + tl.arange(0, BLOCK_O)
            o_mask = o < COUT
            z = tl.zeros([BLOCK_T, BLOCK_O], dtype=ACC_DTYPE)
            for c0 in range(0, CIN, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                c_mask = c < CIN
                xt = tl.load(x_base + t[:, None] * sxt + c[None, :] * sxc,
                             mask=t_mask[:, None] & c_mask[None, :], other=0.0).to(DOT_DTYPE)
                mt = tl.load(m_ptr + o[None, :] * smo + c[:, None] * smc,
                             mask=c_mask[:, None] & o_mask[None, :], other=0.0).to(DOT_DTYPE)
                z = tl.dot(xt, mt, z, input_precision=PRECISION, out_dtype=ACC_DTYPE)  # (x_i M^T) tile
            g = tl.load(g_base + t[:, None] * sgt + o[None, :] * sgo,
                        mask=t_mask[:, None] & o_mask[None, :], other=0.0).to(ACC_DTYPE)
            row += tl.sum(z * g, axis=1)
            if HAS_BIAS:
                mb = tl.load(mb_ptr + o * smb, mask=o_mask, other=0.0).to(ACC_DTYPE)
                row += tl.sum(g * mb[None, :], axis=1)
        tl.store(part_ptr + pid_b * NUM_T_TILES + pid_t, tl.sum(row, axis=0))

    @triton.jit
    def _sq_grad_sum_kernel(
        x_ptr, gy_ptr, out_ptr, ws_ptr,
        B, T, CIN, COUT, CHUNK, scale_ptr,
        sxb, sxt, sxc, sgb, sgt, sgo, soo, soc,
        ACCUMULATE: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
        DOT_DTYPE: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # One program: one (Cout, Cin) tile and one chunk of samples; the per-sample gradient tile
        # lives only in registers.
        pid_o = tl.program_id(0)
        pid_c = tl.program_id(1)
        pid_s = tl.program_id(2)
        o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        o_mask = o < COUT
        c_mask = c < CIN
        i0 = pid_s * CHUNK
        i1 = tl.minimum(i0 + CHUNK, B)
        sq = tl.zeros([BLOCK_O, BLOCK_C], dtype=ACC_DTYPE)
        # Pointers advance by one sample per iteration (64-bit offsets: B * stride may pass 2^31).
        x_base = x_ptr + i0.to(tl.int64) * sxb
        g_base = gy_ptr + i0.to(tl.int64) * sgb
        for _ in range(i0, i1):
            gi = tl.zeros([BLOCK_O, BLOCK_C], dtype=ACC_DTYPE)
            for t0 in range(0, T, BLOCK_T):
                t = t0 + tl.arange(0, BLOCK_T)
                t_mask = t < T
                gt = tl.load(g_base + t[None, :] * sgt + o[:, None] * sgo,
                             mask=o_mask[:, None] & t_mask[None, :], other=0.0).to(DOT_DTYPE)
                xt = tl.load(x_base + t[:, None] * sxt + c[None, :] * sxc,
                             mask=t_mask[:, None] & c_mask[None, :], other=0.0).to(DOT_DTYPE)
                gi = tl.dot(gt, xt, gi, input_precision=PRECISION, out_dtype=ACC_DTYPE)  # (gy_i^T x_i) tile
            sq += gi * gi
            x_base += sxb
            g_base += sgb
        mask = o_mask[:, None] & c_mask[None, :]
        if WRITE_PARTIAL:
            # Split over samples: each split writes its own fp32/fp64 slab; the launcher sums them.
            ws = ws_ptr + pid_s.to(tl.int64) * COUT * CIN + o[:, None] * CIN + c[None, :]
            tl.store(ws, sq, mask=mask)
        else:
            optr = out_ptr + o[:, None] * soo + c[None, :] * soc
            # scale comes through memory: a Python float argument would be rounded to fp32.
            res = sq * tl.load(scale_ptr).to(ACC_DTYPE)
            if ACCUMULATE:
                res += tl.load(optr, mask=mask, other=0.0).to(ACC_DTYPE)
            tl.store(optr, res.to(out_ptr.dtype.element_ty), mask=mask)

    def _configs():
        out = []
        for bo, bc, bt, w in ((64, 64, 32, 4), (128, 64, 32, 8), (64, 128, 32, 8), (32, 32, 32, 4),
                              (64, 64, 64, 4)):
            out.append(triton.Config({"BLOCK_O": bo, "BLOCK_C": bc, "BLOCK_T": bt}, num_warps=w, num_stages=3))
        return out

    def _dot_configs():
        out = []
        for bt, bo, bc, w in ((64, 64, 32, 4), (128, 64, 32, 8), (64, 32, 64, 4), (32, 32, 32, 4)):
            out.append(triton.Config({"BLOCK_T": bt, "BLOCK_O": bo, "BLOCK_C": bc}, num_warps=w, num_stages=3))
        return out

    # Autotuned variants for the GPU, tuned once per layer shape (T, Cin, Cout) and dtype.
    # Configs with BLOCK_T > 32 fill only the first slots of the partial buffer: zero it between the
    # tuning runs and before the real one so no slot keeps another config's partial sum.
    _grad_dot_tuned = triton.autotune(configs=_dot_configs(), key=["T", "CIN", "COUT", "DOT_DTYPE"],
                                      reset_to_zero=["part_ptr"])(_grad_dot_kernel)
    _sq_grad_sum_tuned = triton.autotune(configs=_configs(), key=["T", "CIN", "COUT", "DOT_DTYPE"],
                                         restore_value=["out_ptr"])(_sq_grad_sum_kernel)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _check_runnable(name: str, t: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("cdgfast.kernels.projection: Triton is not installed; use the *_torch functions")
    if not t.is_cuda and not triton_interpreted():
        raise ValueError(f"{name}: Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
                         f"got a tensor on {t.device}. Use the *_torch functions on the CPU.")


def _compute_dtypes(*tensors: torch.Tensor):
    """(dtype the tl.dot operands are cast to, accumulator dtype, input precision)."""
    dts = {t.dtype for t in tensors}
    if torch.float64 in dts:
        return torch.float64, torch.float64, "ieee"
    if len(dts) == 1 and next(iter(dts)) in (torch.float16, torch.bfloat16):
        # Triton's interpreter (3.x) returns garbage from a bf16 x bf16 tl.dot; bf16 products are
        # exact in fp32, so casting the operands there changes only the summation order.
        if next(iter(dts)) == torch.bfloat16 and triton_interpreted():
            return torch.float32, torch.float32, "ieee"
        return next(iter(dts)), torch.float32, None
    return torch.float32, torch.float32, "ieee"


def _check_linear_inputs(x, gy):
    check_tensor("x", x, ndim=3, nonempty=False)
    check_tensor("gy", gy, ndim=3, nonempty=False)
    check_same_device(x=x, gy=gy)
    if gy.shape[:2] != x.shape[:2]:
        raise ValueError(f"gy: expected shape ({x.shape[0]}, {x.shape[1]}, Cout) matching x's [B, T], "
                         f"got {tuple(gy.shape)}")
    return x.shape[0], x.shape[1], x.shape[2], gy.shape[2]


def linear_grad_dot(x: torch.Tensor, gy: torch.Tensor, M: torch.Tensor, Mb: Optional[torch.Tensor] = None,
                    *, allow_tf32: bool = False) -> torch.Tensor:
    """`<gy_i^T x_i, M>_F (+ Mb . sum_t gy_i,t)` for every sample i: a direction dotted with the
    per-sample gradient of one Linear layer, without forming that gradient.

    x [B, T, Cin] (layer input), gy [B, T, Cout] (gradient of sample i's loss w.r.t. the layer
    output), M [Cout, Cin] (direction restricted to the weight), Mb [Cout] (to the bias) or None.
    Returns [B], float32 (float64 if any input is float64). Any strides are accepted.
    """
    B, T, CIN, COUT = _check_linear_inputs(x, gy)
    check_tensor("M", M, ndim=2)
    check_shape("M", M, (COUT, CIN), "[Cout, Cin] like the layer weight")
    tensors = dict(x=x, gy=gy, M=M)
    if Mb is not None:
        check_tensor("Mb", Mb, ndim=1)
        check_shape("Mb", Mb, (COUT,), "[Cout] like the layer bias")
        tensors["Mb"] = Mb
    check_same_device(**tensors)
    _check_runnable("x", x)
    dot_dt, acc_dt, precision = _compute_dtypes(*tensors.values())
    if precision == "ieee" and allow_tf32 and dot_dt == torch.float32:
        precision = "tf32"
    if B == 0 or T == 0:
        return torch.zeros(B, device=x.device, dtype=acc_dt)
    interp = triton_interpreted() or not x.is_cuda
    bt = _INTERP_BLOCK if interp else 32  # the partial buffer is sized for the smallest tuned BLOCK_T
    n_t = triton.cdiv(T, bt)
    part = torch.zeros(B, n_t, device=x.device, dtype=acc_dt)
    mb = Mb if Mb is not None else M  # never read when HAS_BIAS is False
    args = (x, gy, M, mb, part, T, CIN, COUT, n_t,
            x.stride(0), x.stride(1), x.stride(2), gy.stride(0), gy.stride(1), gy.stride(2),
            M.stride(0), M.stride(1), mb.stride(0))
    meta = dict(HAS_BIAS=Mb is not None, DOT_DTYPE=tl_dtype(dot_dt), ACC_DTYPE=tl_dtype(acc_dt),
                PRECISION=precision)
    if interp:
        _grad_dot_kernel[(B, n_t)](*args, **meta, BLOCK_T=bt, BLOCK_O=_INTERP_BLOCK, BLOCK_C=_INTERP_BLOCK)
    else:
        # Programs with BLOCK_T > 32 cover several 32-row slots and leave the rest at zero.
        _grad_dot_tuned[lambda m: (B, triton.cdiv(T, m["BLOCK_T"]))](*args, **meta)
    return part.sum(dim=1)


def linear_sq_grad_sum(x: torch.Tensor, gy: torch.Tensor, out: Optional[torch.Tensor] = None,
                       scale: float = 1.0, *, allow_tf32: bool = False) -> torch.Tensor:
    """`sum_i (gy_i^T x_i)^2` (elementwise) for one Linear layer: the sum of squared per-sample
    weight gradients, [Cout, Cin], never materialising the B x Cout x Cin per-sample gradients.

    x [B, T, Cin], gy [B, T, Cout]. If `out` ([Cout, Cin], any floating dtype) is given the result is
    accumulated in place, `out += scale * sum`, and `out` is returned; else a new tensor
    `scale * sum` is returned, float32 (float64 if an input is float64). With T = 1 the sum is one
    matmul of the squares (`_single_token_sq_sum`, exact), no kernel launch.
    """
    B, T, CIN, COUT = _check_linear_inputs(x, gy)
    if not isinstance(scale, (int, float)):
        raise ValueError(f"scale: expected a Python number, got {type(scale).__name__}")
    dot_dt, acc_dt, precision = _compute_dtypes(x, gy)
    if precision == "ieee" and allow_tf32 and dot_dt == torch.float32:
        precision = "tf32"
    if out is not None:
        check_tensor("out", out, ndim=2)
        check_shape("out", out, (COUT, CIN), "[Cout, Cin] like the layer weight")
        check_same_device(x=x, gy=gy, out=out)
    _check_runnable("x", x)
    if out is None:
        if B == 0:
            return torch.zeros(COUT, CIN, device=x.device, dtype=acc_dt)
        out = torch.empty(COUT, CIN, device=x.device, dtype=acc_dt)
        accumulate = False
    else:
        if B == 0:
            return out
        accumulate = True
    if T == 1:
        _single_token_sq_sum(x, gy, out, scale, acc_dt, accumulate)
        return out
    interp = triton_interpreted() or not x.is_cuda
    if interp:
        splits = 1
    else:
        # Enough programs to fill the GPU when the layer has few tiles: split the samples, each
        # split writes a partial slab, summed below (deterministic, no atomics).
        n_tiles = triton.cdiv(COUT, _NOMINAL_TILE) * triton.cdiv(CIN, _NOMINAL_TILE)
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        splits = max(1, min(B, (2 * sms) // max(n_tiles, 1), 64))
    chunk = triton.cdiv(B, splits)
    splits = triton.cdiv(B, chunk)
    ws = torch.empty(splits, COUT, CIN, device=x.device, dtype=acc_dt) if splits > 1 else out
    scale_t = torch.full((1,), float(scale), device=x.device, dtype=acc_dt)
    args = (x, gy, out, ws, B, T, CIN, COUT, chunk, scale_t,
            x.stride(0), x.stride(1), x.stride(2), gy.stride(0), gy.stride(1), gy.stride(2),
            out.stride(0), out.stride(1))
    meta = dict(ACCUMULATE=accumulate, WRITE_PARTIAL=splits > 1, DOT_DTYPE=tl_dtype(dot_dt),
                ACC_DTYPE=tl_dtype(acc_dt), PRECISION=precision)
    if interp:
        _sq_grad_sum_kernel[(triton.cdiv(COUT, _INTERP_BLOCK), triton.cdiv(CIN, _INTERP_BLOCK), 1)](
            *args, **meta, BLOCK_T=_INTERP_BLOCK, BLOCK_O=_INTERP_BLOCK, BLOCK_C=_INTERP_BLOCK)
    else:
        grid = lambda m: (triton.cdiv(COUT, m["BLOCK_O"]), triton.cdiv(CIN, m["BLOCK_C"]), splits)  # noqa: E731
        _sq_grad_sum_tuned[grid](*args, **meta)
    if splits > 1:
        total = ws.sum(dim=0)
        if accumulate:
            out.add_(total.to(out.dtype), alpha=scale)
        else:
            out.copy_(total.mul_(scale))
    return out


def _single_token_sq_sum(x, gy, out, scale, acc_dt, accumulate):
    """T = 1 (a Linear on [B, C] inputs): (gy_i,o x_i,c)^2 = gy_i,o^2 x_i,c^2, so the sum over samples
    is one matmul of the squares, exact and far cheaper than a per-sample tile loop."""
    res = torch.mm(gy[:, 0].to(acc_dt).square().t(), x[:, 0].to(acc_dt).square())
    if accumulate:
        out.add_(res.to(out.dtype), alpha=scale)
    else:
        out.copy_(res.mul_(scale))


# --------------------------------------------------------------------------------------------------
# Plain-PyTorch contractions: the CPU path of cdgfast.fisher.hooks (the one copy)
# --------------------------------------------------------------------------------------------------
# Per-sample intermediates (per-sample weight gradients, unfolded inputs) of at most this many
# elements exist at once.
MAX_ELEMENTS = 1 << 24


def _add_into(out: torch.Tensor, res: torch.Tensor, scale: float) -> torch.Tensor:
    if scale == 1.0:
        return out.add_(res.to(out.dtype))
    return out.add_(res.to(out.dtype), alpha=scale)


def linear_grad_dot_torch(x: torch.Tensor, gy: torch.Tensor, M: Optional[torch.Tensor] = None,
                          Mb: Optional[torch.Tensor] = None, *, acc: Optional[torch.dtype] = None) -> torch.Tensor:
    """`linear_grad_dot` in plain PyTorch: [B], `<gy_i^T x_i, M> + Mb . sum_t gy_i,t` (materialises
    x_i M^T, [B, T, Cout]). M or Mb may be None (that term is left out). acc: the accumulation dtype
    (default float32, float64 if an input is float64)."""
    B, T, CIN, COUT = _check_linear_inputs(x, gy)
    terms = [gy, x]
    if M is not None:
        check_tensor("M", M, ndim=2)
        check_shape("M", M, (COUT, CIN), "[Cout, Cin] like the layer weight")
        terms.append(M)
    if Mb is not None:
        check_tensor("Mb", Mb, ndim=1)
        check_shape("Mb", Mb, (COUT,), "[Cout] like the layer bias")
        terms.append(Mb)
    if acc is None:
        acc = _compute_dtypes(*terms)[1]
    ga = gy.to(acc)
    res = None
    if M is not None:
        xa, Ma = x.to(acc), M.to(acc)
        if T == 1:
            res = ((xa[:, 0] @ Ma.t()) * ga[:, 0]).sum(1)
        else:
            res = (torch.matmul(xa, Ma.t()) * ga).sum(dim=(1, 2))
    if Mb is not None:
        b = ga.sum(1) @ Mb.to(acc)
        res = b if res is None else res + b
    return torch.zeros(B, dtype=acc, device=x.device) if res is None else res


def linear_sq_grad_sum_torch(x: torch.Tensor, gy: torch.Tensor, out: Optional[torch.Tensor] = None,
                             scale: float = 1.0, *, acc: Optional[torch.dtype] = None,
                             max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """`linear_sq_grad_sum` in plain PyTorch: [Cout, Cin] `sum_i (gy_i^T x_i)^2`. With T = 1 one
    matmul of the squares; else per-sample gradients by `bmm`, in chunks of samples so that at most
    `max_elements` intermediates exist at once. `out += scale * sum` when `out` is given."""
    B, T, CIN, COUT = _check_linear_inputs(x, gy)
    if out is not None:
        check_tensor("out", out, ndim=2)
        check_shape("out", out, (COUT, CIN), "[Cout, Cin] like the layer weight")
        check_same_device(x=x, out=out)
    if acc is None:
        acc = _compute_dtypes(x, gy)[1]
    if T == 1:  # g_i = outer(gy_i, x_i): the squares factor
        res = torch.zeros(COUT, CIN, device=x.device, dtype=acc)
        _single_token_sq_sum(x, gy, res, 1.0, acc, False)
    else:
        step = max(1, max_elements // max(1, COUT * CIN + T * (CIN + COUT)))
        res = torch.zeros(COUT, CIN, device=x.device, dtype=acc)
        for i0 in range(0, B, step):
            g = torch.bmm(gy[i0:i0 + step].to(acc).transpose(1, 2), x[i0:i0 + step].to(acc))
            res += g.square().sum(0)
    if out is None:
        return res if scale == 1.0 else res.mul_(scale)
    return _add_into(out, res, scale)


def bias_sq_grad_sum(gy: torch.Tensor, out: Optional[torch.Tensor] = None, scale: float = 1.0, *,
                     acc: Optional[torch.dtype] = None) -> torch.Tensor:
    """`sum_i (sum_t gy_i,t)^2` [Cout]: the squared per-sample bias gradients of a Linear layer (or of
    a Conv2d with gy laid out [B, L, Cout]). Plain torch (one reduction; no kernel needed). Accumulated
    into `out` (`out += scale * ...`) when given; else float32 (float64 for float64 input)."""
    check_tensor("gy", gy, ndim=3, nonempty=False)
    if acc is None:
        acc = torch.float64 if gy.dtype == torch.float64 else torch.float32
    res = gy.to(acc).sum(1).square().sum(0)
    if out is None:
        return res if scale == 1.0 else res.mul_(scale)
    check_tensor("out", out, ndim=1)
    check_shape("out", out, (gy.shape[2],), "[Cout] like the layer bias")
    check_same_device(gy=gy, out=out)
    return _add_into(out, res, scale)


# --------------------------------------------------------------------------------------------------
# Conv2d as a Linear layer
# --------------------------------------------------------------------------------------------------
def conv_padded_input(inp: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """The input as the convolution sees it after padding (any padding mode, 'same'/'valid')."""
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    if isinstance(conv.padding, str):
        if conv.padding == "valid":
            return inp
        # 'same' (stride 1): total dilation*(k-1), the extra element on the right/bottom as in torch.
        th, tw = dh * (kh - 1), dw * (kw - 1)
        pad = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        ph, pw = conv.padding
        pad = (pw, pw, ph, ph)
    if not any(pad):
        return inp
    mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
    return F.pad(inp, pad, mode=mode)


def conv_unfold(padded: torch.Tensor, conv: torch.nn.Conv2d) -> torch.Tensor:
    """`F.unfold(padded, kernel_size, dilation, stride)` ([B, C*kh*kw, L], rows ordered (channel, kh, kw)
    like the weight), formed as one strided view of the padded input and one copy. The same numbers as
    `F.unfold`, which on the CPU is several times slower (its im2col loop was a third of diag_fisher's
    time on the tiny UNet); a 1x1 stride-1 convolution gets a view, no copy."""
    B, C, Hp, Wp = padded.shape
    kh, kw = conv.kernel_size
    dh, dw = conv.dilation
    sh, sw = conv.stride
    ho, wo = (Hp - dh * (kh - 1) - 1) // sh + 1, (Wp - dw * (kw - 1) - 1) // sw + 1
    if ho < 1 or wo < 1:
        raise ValueError(f"input: padded spatial size {(Hp, Wp)} is smaller than the kernel {conv.kernel_size} "
                         f"with dilation {conv.dilation}")
    s0, s1, s2, s3 = padded.stride()
    win = padded.as_strided((B, C, kh, kw, ho, wo), (s0, s1, s2 * dh, s3 * dw, s2 * sh, s3 * sw),
                            padded.storage_offset())
    return win.reshape(B, C * kh * kw, ho * wo)


def conv2d_as_linear(input: torch.Tensor, grad_output: torch.Tensor, conv_module: torch.nn.Conv2d,
                     group: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(x [B, L, Cin/G*kh*kw], gy [B, L, Cout/G]) such that `gy_i^T x_i` is sample i's gradient of
    `weight[g*Cout/G:(g+1)*Cout/G].reshape(Cout/G, -1)` (G = groups, g = `group`; G = 1: the whole
    weight). `input` [B, Cin, H, W] is the module's input, `grad_output` [B, Cout, Ho, Wo] the
    gradient of the per-sample losses w.r.t. its output. Plain torch (`conv_unfold`); x is a
    transposed view of a new [B, Cin/G*kh*kw, L] tensor, gy a view of grad_output."""
    if not isinstance(conv_module, torch.nn.Conv2d):
        raise ValueError(f"conv_module: expected a torch.nn.Conv2d, got {type(conv_module).__name__}")
    check_tensor("input", input, ndim=4)
    check_tensor("grad_output", grad_output, ndim=4)
    check_same_device(input=input, grad_output=grad_output)
    G = conv_module.groups
    if not (isinstance(group, int) and 0 <= group < G):
        raise ValueError(f"group: expected an integer in [0, {G}), got {group!r}")
    B, cin = input.shape[:2]
    cout = conv_module.out_channels
    if cin != conv_module.in_channels:
        raise ValueError(f"input: expected {conv_module.in_channels} channels, got shape {tuple(input.shape)}")
    if grad_output.shape[0] != B or grad_output.shape[1] != cout:
        raise ValueError(f"grad_output: expected shape ({B}, {cout}, Ho, Wo), got {tuple(grad_output.shape)}")
    padded = conv_padded_input(input, conv_module)
    cg, og = cin // G, cout // G
    if G > 1:
        padded = padded[:, group * cg:(group + 1) * cg]
        grad_output = grad_output[:, group * og:(group + 1) * og]
    cols = conv_unfold(padded, conv_module)  # [B, cg*kh*kw, L]
    L = cols.shape[-1]
    if grad_output.shape[2] * grad_output.shape[3] != L:
        raise ValueError(f"grad_output: expected {L} output positions for this input and conv, got "
                         f"shape {tuple(grad_output.shape)}")
    return cols.transpose(1, 2), grad_output.reshape(B, og, L).transpose(1, 2)


def _kernel_wanted(use_kernel: Optional[bool], t: torch.Tensor) -> bool:
    return use_triton(t) if use_kernel is None else bool(use_kernel)


def _check_conv(input, grad_output, conv_module, rows_per_sample):
    if not isinstance(conv_module, torch.nn.Conv2d):
        raise ValueError(f"conv_module: expected a torch.nn.Conv2d, got {type(conv_module).__name__}")
    check_tensor("input", input, ndim=4)
    check_tensor("grad_output", grad_output, ndim=4)
    check_same_device(input=input, grad_output=grad_output)
    if grad_output.shape[:2] != (input.shape[0], conv_module.out_channels):
        raise ValueError(f"grad_output: expected shape ({input.shape[0]}, {conv_module.out_channels}, Ho, Wo), "
                         f"got {tuple(grad_output.shape)}")
    if (isinstance(rows_per_sample, bool) or not isinstance(rows_per_sample, int) or rows_per_sample < 1
            or input.shape[0] % rows_per_sample):
        raise ValueError(f"rows_per_sample: expected a positive integer dividing the {input.shape[0]} input rows, "
                         f"got {rows_per_sample!r}")


def conv2d_grad_dot(input: torch.Tensor, grad_output: torch.Tensor, conv_module: torch.nn.Conv2d,
                    M: Optional[torch.Tensor] = None, Mb: Optional[torch.Tensor] = None, *,
                    use_kernel: Optional[bool] = None, acc: Optional[torch.dtype] = None,
                    rows_per_sample: int = 1) -> torch.Tensor:
    """`<g_i, M> (+ Mb . bias grad_i)` for a Conv2d, M shaped like `weight`, Mb like `bias` (either may
    be None): [B]. Plain torch: `<conv2d(x_i, M), gy_i>` (one convolution of the padded input with the
    direction). `use_kernel` (default: on CUDA): the Triton `linear_grad_dot` on the unfolded input,
    one group at a time. rows_per_sample r: the rows are B samples of r consecutive rows each (sample
    i's result is the sum over its rows)."""
    _check_conv(input, grad_output, conv_module, rows_per_sample)
    if M is not None:
        check_tensor("M", M, ndim=4)
        check_shape("M", M, tuple(conv_module.weight.shape), "like conv_module.weight")
    if Mb is not None:
        check_tensor("Mb", Mb, ndim=1)
        check_shape("Mb", Mb, (conv_module.out_channels,), "like conv_module.bias")
    if acc is None:
        acc = _compute_dtypes(input, grad_output, *[t for t in (M, Mb) if t is not None])[1]
    mod = conv_module
    if _kernel_wanted(use_kernel, input) and M is not None:
        G = mod.groups
        og = mod.out_channels // G
        res = None
        for g in range(G):
            x, gy = conv2d_as_linear(input, grad_output, mod, g)
            mbg = Mb[g * og:(g + 1) * og] if Mb is not None else None
            r = linear_grad_dot(x, gy, M[g * og:(g + 1) * og].reshape(og, -1), mbg).to(acc)
            res = r if res is None else res + r
    else:
        res = torch.zeros(input.shape[0], dtype=acc, device=input.device)  # per row
        g = grad_output.to(acc)
        if M is not None:
            y = F.conv2d(conv_padded_input(input.to(acc), mod), M.to(acc), None, mod.stride, 0, mod.dilation,
                         mod.groups)
            res += (y * g).flatten(1).sum(1)
        if Mb is not None:
            res += g.sum(dim=(2, 3)) @ Mb.to(acc)
    return res.view(-1, rows_per_sample).sum(1) if rows_per_sample > 1 else res


def _conv_sq_shifted(xp: torch.Tensor, g: torch.Tensor, mod: torch.nn.Conv2d, group: int) -> torch.Tensor:
    """[Cout, Cin*kh*kw]: sum over samples of the squared per-sample weight gradients of a stride-1,
    groups-1 Conv2d, from its padded input xp [c, Cin, Hp, Wp] and output gradient g [c, Cout, Ho, Wo]
    (c = samples * group rows), without unfolding the input.

    Laid out on the padded width (Wp columns per output row, the Wp - Wo extra columns of g zero), the
    input window of kernel tap (i, j) is one contiguous slice of the flattened padded input starting at
    i*dh*Wp + j*dw, so tap (i, j) of every per-sample gradient is one `bmm` of g [c, Cout, Ho*Wp] with
    that slice (a view): the wrapped-around columns meet the zero columns of g and add exact zeros.
    Measured on the tiny UNet's convolutions (one CPU thread): 1.1-3x faster than `conv_unfold` + einsum,
    whose copy of the unfolded input was as slow as the products."""
    c, cin, hp, wp = xp.shape
    kh, kw = mod.kernel_size
    dh, dw = mod.dilation
    ho, wo = hp - dh * (kh - 1), wp - dw * (kw - 1)
    if (ho, wo) != tuple(g.shape[2:]):
        raise ValueError(f"grad_output: expected {ho * wo} output positions for this input and conv, "
                         f"got shape {tuple(g.shape)}")
    cout = g.shape[1]
    # the positions up to the last real output column: the last tap's slice ends at the input's end
    lp = (ho - 1) * wp + wo
    xf = xp.reshape(c, cin, hp * wp)
    gp = (g if wp == wo else F.pad(g, (0, wp - wo))).reshape(c, cout, ho * wp)[:, :, :lp]
    per = torch.empty(kh * kw, c, cout, cin, dtype=g.dtype, device=g.device)  # per-sample gradients, by tap
    for i in range(kh):
        for j in range(kw):
            off = i * dh * wp + j * dw
            torch.bmm(gp, xf[:, :, off:off + lp].transpose(1, 2), out=per[i * kw + j])
    if group > 1:  # a sample's rows add up before squaring
        per = per.view(kh * kw, c // group, group, cout, cin).sum(2)
    return per.square_().sum(1).permute(1, 2, 0).reshape(cout, cin * kh * kw)  # weight order (cin, kh, kw)


def _conv_sq_grouped(x: torch.Tensor, g: torch.Tensor, mod: torch.nn.Conv2d, group: int) -> torch.Tensor:
    """[G, Cout/G, Cin/G*kh*kw]: sum over samples of the squared per-sample weight gradients of any
    Conv2d, from its input x [c, Cin, H, W] and output gradient g [c, Cout, Ho, Wo] (c = samples *
    group rows). The c rows side by side are one image of c*Cin channels through the convolution with
    c*G groups (row b's channels form groups b*G .. b*G+G-1), whose weight gradient
    (`torch.nn.grad.conv2d_weight`, the backward's own kernel) is every row's weight gradient stacked,
    [c*Cout, Cin/G, kh, kw]: one call instead of a product per row or per tap."""
    c, cin = x.shape[:2]
    cout, cg, kh, kw = mod.weight.shape
    G = mod.groups
    if isinstance(mod.padding, str) or mod.padding_mode != "zeros":
        x, pad = conv_padded_input(x, mod), (0, 0)
    else:
        pad = mod.padding
    (dh, dw), (sh, sw) = mod.dilation, mod.stride
    ho = (x.shape[2] + 2 * pad[0] - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] + 2 * pad[1] - dw * (kw - 1) - 1) // sw + 1
    if (ho, wo) != tuple(g.shape[2:]):
        raise ValueError(f"grad_output: expected {ho * wo} output positions for this input and conv, "
                         f"got shape {tuple(g.shape)}")
    per = torch.nn.grad.conv2d_weight(x.reshape(1, c * cin, *x.shape[2:]), (c * cout, cg, kh, kw),
                                      g.reshape(1, c * cout, *g.shape[2:]), mod.stride, pad, mod.dilation, c * G)
    per = per.view(c, cout, cg * kh * kw)
    if group > 1:  # a sample's rows add up before squaring
        per = per.view(c // group, group, cout, cg * kh * kw).sum(1)
    return per.square_().sum(0).view(G, cout // G, cg * kh * kw)


def _conv_sq_path(mod: torch.nn.Conv2d, input: torch.Tensor, grad_output: torch.Tensor, kern: bool) -> str:
    """The form `conv2d_sq_grad_sum` takes (the same numbers; speed only): "unfold" for the Triton
    squares; on the CPU "grouped" (`_conv_sq_grouped`) where its one grouped weight-gradient call was
    measured faster, else "shifted" (`_conv_sq_shifted`: stride 1, groups 1). Measured on the tiny /
    small UNets' convolutions (one idle CPU thread, B = 64 / 32): for 3x3 kernels the grouped call takes
    0.5-0.8x the tap-by-tap products at 32 x 32 outputs and at 16 x 16 with up to 2048 (Cin/G * Cout/G)
    channel pairs, but 1.2-2.5x at 8 x 8 outputs, with 4096+ pairs at 16 x 16, or one output channel;
    1x1 kernels are one product either way; strided or grouped convs (no tap-by-tap form) take
    0.5-0.8x the unfold."""
    if kern:
        return "unfold"
    shifted_ok = mod.groups == 1 and tuple(mod.stride) == (1, 1)
    if input.device.type == "cpu":
        if not shifted_ok:
            return "grouped"
        kk = mod.kernel_size[0] * mod.kernel_size[1]
        pairs = mod.in_channels * mod.out_channels
        positions = grad_output.shape[2] * grad_output.shape[3]
        if kk > 1 and mod.out_channels > 1 and (positions >= 1024 or (positions >= 256 and pairs <= 2048)):
            return "grouped"
    return "shifted" if shifted_ok else "unfold"


def conv2d_sq_grad_sum(input: torch.Tensor, grad_output: torch.Tensor, conv_module: torch.nn.Conv2d,
                       out: Optional[torch.Tensor] = None, scale: float = 1.0, *,
                       use_kernel: Optional[bool] = None, acc: Optional[torch.dtype] = None,
                       rows_per_sample: int = 1, max_elements: int = MAX_ELEMENTS) -> torch.Tensor:
    """`sum_i g_i^2` for a Conv2d weight, shaped like `weight` ([Cout, Cin/G, kh, kw]); accumulated into
    `out` (`out += scale * ...`, same shape, e.g. a view of a flat Fisher buffer) when given.

    In chunks of whole samples (at most `max_elements` intermediates), in one of three forms
    (`_conv_sq_path`; the same numbers): on the CPU, the per-sample gradients as the weight gradient of
    one convolution with the samples as groups (`_conv_sq_grouped`), or, for a stride-1, groups-1
    convolution where that was measured slower, tap by tap on the padded input, never unfolded
    (`_conv_sq_shifted`); with the kernel (or off the CPU without the tap form) the padded input is
    unfolded (`conv_unfold`) and, per group, the per-sample gradients `gy_i^T cols_i` are formed by
    `einsum`, or squared and summed by the Triton `linear_sq_grad_sum` when `use_kernel` (default: on
    CUDA). rows_per_sample r: a sample's
    r consecutive rows become r times the output positions. The bias term is
    `conv2d_bias_sq_grad_sum(grad_output)`."""
    _check_conv(input, grad_output, conv_module, rows_per_sample)
    mod = conv_module
    wshape = tuple(mod.weight.shape)
    if out is not None:
        check_tensor("out", out, ndim=4)
        check_shape("out", out, wshape, "like conv_module.weight")
        check_same_device(input=input, out=out)
    if acc is None:
        acc = _compute_dtypes(input, grad_output)[1]
    kern = _kernel_wanted(use_kernel, input)
    group = rows_per_sample
    N = input.shape[0]  # rows: B * group
    G = mod.groups
    cout = mod.out_channels
    og = cout // G
    kk = mod.kernel_size[0] * mod.kernel_size[1]
    cg = mod.in_channels // G
    L = grad_output.shape[2] * grad_output.shape[3]
    path = _conv_sq_path(mod, input, grad_output, kern)
    if path == "grouped":  # a row's weight gradient (and its padded input in a padding mode)
        per_sample = cout * cg * kk + input[0].numel()
    else:  # its unfolded input (or the taps' products), output gradient and weight gradient
        per_sample = cg * kk * L * G + og * L * G + cout * cg * kk
    step = max(1, max_elements // max(1, per_sample)) * group  # whole samples per chunk
    res = torch.zeros(G, og, cg * kk, dtype=acc, device=input.device)
    for s in range(0, N, step):
        if path == "grouped":
            res += _conv_sq_grouped(input[s:s + step].to(acc), grad_output[s:s + step].to(acc), mod, group)
            continue
        xp = conv_padded_input(input[s:s + step].to(acc), mod)
        c = xp.shape[0]
        if path == "shifted":
            res[0] += _conv_sq_shifted(xp, grad_output[s:s + step].to(acc), mod, group)
            continue
        cols = conv_unfold(xp, mod)
        if cols.shape[-1] != L:
            raise ValueError(f"grad_output: expected {cols.shape[-1]} output positions for this input and conv, "
                             f"got shape {tuple(grad_output.shape)}")
        cols = cols.view(c, G, cg * kk, L)  # unfold's row order (channel, kh, kw) matches weight
        g = grad_output[s:s + step].to(acc).reshape(c, G, og, L)
        if group > 1:  # a sample's rows become more positions: [c/r, G, ., r*L]
            cols = cols.view(c // group, group, G, cg * kk, L).permute(0, 2, 3, 1, 4).reshape(
                c // group, G, cg * kk, group * L)
            g = g.view(c // group, group, G, og, L).permute(0, 2, 3, 1, 4).reshape(c // group, G, og, group * L)
        if kern:
            for gi in range(G):
                res[gi] += linear_sq_grad_sum(cols[:, gi].transpose(1, 2), g[:, gi].transpose(1, 2)).to(acc)
        else:
            per = torch.einsum("bgol,bgkl->bgok", g, cols)  # per-sample weight gradients of the chunk
            res += per.square().sum(0)
    res = res.view(wshape)
    if out is None:
        return res if scale == 1.0 else res.mul_(scale)
    return _add_into(out, res, scale)


def conv2d_bias_sq_grad_sum(grad_output: torch.Tensor, out: Optional[torch.Tensor] = None, scale: float = 1.0, *,
                            acc: Optional[torch.dtype] = None, rows_per_sample: int = 1) -> torch.Tensor:
    """`sum_i (sum over positions and rows of gy_i)^2` [Cout]: the squared per-sample bias gradients of a
    Conv2d, grad_output [B * rows_per_sample, Cout, Ho, Wo]."""
    check_tensor("grad_output", grad_output, ndim=4)
    N, cout = grad_output.shape[:2]
    if (isinstance(rows_per_sample, bool) or not isinstance(rows_per_sample, int) or rows_per_sample < 1
            or N % rows_per_sample):
        raise ValueError(f"rows_per_sample: expected a positive integer dividing the {N} rows, got {rows_per_sample!r}")
    if acc is None:
        acc = torch.float64 if grad_output.dtype == torch.float64 else torch.float32
    per_row = grad_output.to(acc).sum(dim=(2, 3))
    return bias_sq_grad_sum(per_row.reshape(N // rows_per_sample, rows_per_sample, cout), out, scale, acc=acc)
