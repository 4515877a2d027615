"""Triton kernels for diffusion-classifier (DC) scores: squared error per condition, log-softmax over
the conditions, cross-entropy against a target distribution, and the gradient w.r.t. the predictions.

Shapes (after flattening the spatial dims): ``pred[B, K, N]``, ``eps[B, N]``.

When one program per sample fills the device (large B, or small N) and K fits one tile (K <= 16),
``_dc_fused_kernel`` does everything in a single launch, one program per sample: it reduces the
errors over S, forms the log-softmax / cross-entropy in registers and (cross-entropy) makes a
second pass over S to write the gradient. Otherwise three stages, so that a small batch with large
images still fills the GPU:

1. ``_dc_partial_kernel``  grid ``(B, T, cdiv(K, BLOCK_K))``: program ``(b, t, kc)`` sums
   ``(pred[b, k, s] - eps[b, s])^2`` over its chunk of ``s`` for a block of conditions, tile by tile,
   and writes ``partial[b, k, t]``. ``eps`` is read once per tile for the whole K block.
2. ``_dc_reduce_kernel``   grid ``(B,)``: sums the partials over ``t``, ``err = sum / N``, then
   (MODE 1, 2) ``logp = log_softmax(-err / tau)``, (MODE 2) ``loss = -sum_k q_k logp_k`` and the
   coefficient ``coef_k = d loss / d err_k * 2 / N = (q_k - p_k * sum(q)) * 2 / (tau * N)``.
3. ``_dc_grad_kernel``     grid ``(cdiv(N, BLOCK_S), B)``: ``gpred = coef[b, k] * (pred - eps)`` and
   ``geps = -sum_k gpred``; used by the fused cross-entropy forward and by the backward of
   dc_errors / dc_scores (whose coefficients are computed from grad_output).

All accumulation is fp32 (fp64 for fp64 inputs); outputs are in the input dtype (the cross-entropy
gradients in fp32 for fp16 inputs: they are scaled by grad_output later). Launchers accept
tensors on any device (CPU tensors run under ``TRITON_INTERPRET=1``). On a GPU the single-kernel,
stage-1 and stage-3 kernels are autotuned over warps (stage 3 also over its tile width; the other
tile shapes come from ``_tiles`` because buffer sizes and the path choice depend on them); in the
interpreter a fixed small configuration is used. Float scalars reach a compiled kernel as fp32, so
fp64 runs receive 1/N and 1/tau as hi + lo fp32 pairs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import acc_dtype as _acc_dtype
from ._common import acc_scalar, chunk_grid, next_pow2, split_f32
from ._common import use_tuned as _use_tuned

__all__ = ["dc_errors", "dc_scores", "dc_cross_entropy", "dc_apply_coef"]

_MODE_ERRORS, _MODE_SCORES, _MODE_CE = 0, 1, 2


@triton.jit
def _masked_log_softmax(err, mask_k, inv_tau):
    """(log p, p) of p = softmax(-err / tau) over the valid lanes; masked lanes get log p = -inf, p = 0."""
    z = tl.where(mask_k, -err * inv_tau, float("-inf"))
    m = tl.max(z, axis=0)
    ez = tl.where(mask_k, tl.exp(z - m), 0.0)
    se = tl.sum(ez, axis=0)
    return z - m - tl.log(se), ez / se


@triton.jit
def _dc_outputs(err, b, K, offs_k, mask_k, inv_n, inv_tau, q_ptr, err_ptr, logp_ptr, loss_ptr,
                MODE: tl.constexpr):
    """The outputs of sample b from its errors err[k] (accumulation dtype), shared by the reduce and the
    single-kernel paths: err (MODE 0), logp (MODE 1, 2), the loss (MODE 2). Returns the cross-entropy
    coefficient coef_k = d loss / d err_k * 2 / N in MODE 2 (err otherwise, unused)."""
    coef = err
    if MODE == 0:
        tl.store(err_ptr + b * K + offs_k, err.to(err_ptr.dtype.element_ty), mask=mask_k)
    else:
        logp, prob = _masked_log_softmax(err, mask_k, inv_tau)
        tl.store(logp_ptr + b * K + offs_k, logp.to(logp_ptr.dtype.element_ty), mask=mask_k)
        if MODE == 2:
            q = tl.load(q_ptr + b * K + offs_k, mask=mask_k, other=0.0).to(err.dtype)
            # masked lanes hold logp = -inf; zero them so that 0 * -inf does not make a nan
            loss = -tl.sum(q * tl.where(mask_k, logp, 0.0), axis=0)
            tl.store(loss_ptr + b, loss.to(loss_ptr.dtype.element_ty))
            coef = (q - prob * tl.sum(q, axis=0)) * (2.0 * inv_tau * inv_n)
    return coef


@triton.jit
def _dc_partial_kernel(
    pred_ptr, eps_ptr, partial_ptr,
    K, N, T, CHUNK,
    ACC_F64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    t = tl.program_id(1)
    kc = tl.program_id(2)
    offs_k = kc * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_s0 = tl.arange(0, BLOCK_S)
    pred_row = pred_ptr + b * K * N + offs_k.to(tl.int64)[:, None] * N
    eps_row = eps_ptr + b * N
    if ACC_F64:
        acc = tl.zeros([BLOCK_K, BLOCK_S], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_K, BLOCK_S], dtype=tl.float32)
    start = t * CHUNK
    for s0 in range(start, start + CHUNK, BLOCK_S):
        offs_s = s0 + offs_s0
        mask_s = offs_s < N
        e = tl.load(eps_row + offs_s, mask=mask_s, other=0.0).to(acc.dtype)
        p = tl.load(pred_row + offs_s[None, :], mask=mask_k[:, None] & mask_s[None, :], other=0.0).to(acc.dtype)
        d = p - e[None, :]
        # masked lanes load 0 for both pred and eps, so they add nothing
        acc += d * d
    tot = tl.sum(acc, axis=1)
    tl.store(partial_ptr + (b * K + offs_k) * T + t, tot, mask=mask_k)


@triton.jit
def _dc_reduce_kernel(
    partial_ptr, q_ptr, err_ptr, logp_ptr, loss_ptr, coef_ptr,
    K, T, inv_n_hi, inv_n_lo, inv_tau_hi, inv_tau_lo,
    MODE: tl.constexpr, ACC_F64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_T: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_t0 = tl.arange(0, BLOCK_T)
    if ACC_F64:
        acc = tl.zeros([BLOCK_K, BLOCK_T], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK_K, BLOCK_T], dtype=tl.float32)
    inv_n = acc_scalar(inv_n_hi, inv_n_lo, ACC_F64)
    inv_tau = acc_scalar(inv_tau_hi, inv_tau_lo, ACC_F64)
    rows = partial_ptr + (b * K + offs_k)[:, None] * T
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + offs_t0
        acc += tl.load(rows + offs_t[None, :], mask=mask_k[:, None] & (offs_t < T)[None, :], other=0.0)
    err = tl.sum(acc, axis=1) * inv_n
    coef = _dc_outputs(err, b, K, offs_k, mask_k, inv_n, inv_tau, q_ptr, err_ptr, logp_ptr, loss_ptr, MODE)
    if MODE == 2:
        tl.store(coef_ptr + b * K + offs_k, coef, mask=mask_k)


@triton.jit
def _dc_grad_kernel(
    pred_ptr, eps_ptr, coef_ptr, gpred_ptr, geps_ptr,
    K, N,
    ACC_F64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    sb = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    offs_s = sb * BLOCK_S + tl.arange(0, BLOCK_S)
    mask_s = offs_s < N
    if ACC_F64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    e = tl.load(eps_ptr + b * N + offs_s, mask=mask_s, other=0.0).to(acc_dtype)
    geps = tl.zeros([BLOCK_S], dtype=acc_dtype)
    offs_k0 = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_k0
        mask_k = offs_k < K
        mask = mask_k[:, None] & mask_s[None, :]
        c = tl.load(coef_ptr + b * K + offs_k, mask=mask_k, other=0.0).to(acc_dtype)
        ptrs = (b * K + offs_k.to(tl.int64))[:, None] * N + offs_s[None, :]
        p = tl.load(pred_ptr + ptrs, mask=mask, other=0.0).to(acc_dtype)
        g = c[:, None] * (p - e[None, :])
        tl.store(gpred_ptr + ptrs, g.to(gpred_ptr.dtype.element_ty), mask=mask)
        geps -= tl.sum(tl.where(mask, g, 0.0), axis=0)
    tl.store(geps_ptr + b * N + offs_s, geps.to(geps_ptr.dtype.element_ty), mask=mask_s)


@triton.jit
def _dc_fused_kernel(
    pred_ptr, eps_ptr, q_ptr, err_ptr, logp_ptr, loss_ptr, gpred_ptr, geps_ptr,
    K, N, inv_n_hi, inv_n_lo, inv_tau_hi, inv_tau_lo,
    MODE: tl.constexpr, ACC_F64: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """All three stages in one program per sample (used when one program per sample is enough)."""
    b = tl.program_id(0).to(tl.int64)
    if ACC_F64:
        acc_dtype = tl.float64
    else:
        acc_dtype = tl.float32
    inv_n = acc_scalar(inv_n_hi, inv_n_lo, ACC_F64)
    inv_tau = acc_scalar(inv_tau_hi, inv_tau_lo, ACC_F64)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_s0 = tl.arange(0, BLOCK_S)
    rows = (b * K + offs_k.to(tl.int64))[:, None] * N
    acc = tl.zeros([BLOCK_K, BLOCK_S], dtype=acc_dtype)
    for s0 in range(0, N, BLOCK_S):
        offs_s = s0 + offs_s0
        mask_s = offs_s < N
        e = tl.load(eps_ptr + b * N + offs_s, mask=mask_s, other=0.0).to(acc_dtype)
        p = tl.load(pred_ptr + rows + offs_s[None, :], mask=mask_k[:, None] & mask_s[None, :], other=0.0)
        d = p.to(acc_dtype) - e[None, :]
        acc += d * d
    err = tl.sum(acc, axis=1) * inv_n
    coef = _dc_outputs(err, b, K, offs_k, mask_k, inv_n, inv_tau, q_ptr, err_ptr, logp_ptr, loss_ptr, MODE)
    if MODE == 2:
        # second pass: the gradient, while the sample's data is still hot in L2
        for s0 in range(0, N, BLOCK_S):
            offs_s = s0 + offs_s0
            mask_s = offs_s < N
            mask = mask_k[:, None] & mask_s[None, :]
            e = tl.load(eps_ptr + b * N + offs_s, mask=mask_s, other=0.0).to(acc_dtype)
            p = tl.load(pred_ptr + rows + offs_s[None, :], mask=mask, other=0.0).to(acc_dtype)
            g = coef[:, None] * (p - e[None, :])
            tl.store(gpred_ptr + rows + offs_s[None, :], g.to(gpred_ptr.dtype.element_ty), mask=mask)
            geps = -tl.sum(tl.where(mask, g, 0.0), axis=0)
            tl.store(geps_ptr + b * N + offs_s, geps.to(geps_ptr.dtype.element_ty), mask=mask_s)


# --- GPU autotuning -----------------------------------------------------------------------------
# Stage 1 keeps the tile shape from the heuristic below (the partial buffer's size depends on it)
# and tunes warps; stage 3 writes only its outputs, so its tile width is tuned too.
_partial_tuned = triton.autotune(
    configs=[triton.Config({}, num_warps=w, num_stages=s) for w in (2, 4, 8) for s in (2, 3)],
    key=["K", "N", "BLOCK_K", "BLOCK_S"],
)(_dc_partial_kernel)

_fused_tuned = triton.autotune(
    configs=[triton.Config({}, num_warps=w) for w in (2, 4, 8)],
    key=["K", "N", "MODE", "BLOCK_K", "BLOCK_S"],
)(_dc_fused_kernel)

_grad_tuned = triton.autotune(
    configs=[triton.Config({"BLOCK_S": bs}, num_warps=w) for bs in (256, 512, 1024) for w in (4, 8)],
    key=["K", "N", "BLOCK_K"],
)(_dc_grad_kernel)


def _tiles(K: int, N: int, B: int, on_gpu: bool):
    """Heuristic tile shape for stage 1: about 2-4K elements per tile, enough programs to fill a GPU."""
    block_k = min(next_pow2(K), 16)
    elems = 4096 if on_gpu else 64  # small CPU tiles: the interpreter tests cover several chunks
    block_s = max(16, min(next_pow2(N), elems // block_k))
    kc = triton.cdiv(K, block_k)
    chunk, t = chunk_grid(N, block_s, B * kc, on_gpu)
    return block_k, block_s, chunk, t, kc


def _acc_f64(x: torch.Tensor) -> bool:
    return x.dtype == torch.float64


def _flatten(pred: torch.Tensor, eps: torch.Tensor):
    B, K = pred.shape[0], pred.shape[1]
    N = eps[0].numel() if eps.dim() > 1 else 1
    pred3 = pred.contiguous().reshape(B, K, N)
    eps2 = eps.to(pred.dtype).contiguous().reshape(B, N)
    return pred3, eps2, B, K, N


def _partials(pred3, eps2, B, K, N):
    on_gpu = _use_tuned(pred3)
    block_k, block_s, chunk, t, kc = _tiles(K, N, B, on_gpu)
    acc_dtype = _acc_dtype(pred3)
    partial = torch.empty((B, K, t), device=pred3.device, dtype=acc_dtype)
    kern = _partial_tuned if on_gpu else _dc_partial_kernel
    if on_gpu:
        kern[(B, t, kc)](pred3, eps2, partial, K, N, t, chunk,
                         ACC_F64=_acc_f64(pred3), BLOCK_K=block_k, BLOCK_S=block_s)
    else:
        kern[(B, t, kc)](pred3, eps2, partial, K, N, t, chunk,
                         ACC_F64=_acc_f64(pred3), BLOCK_K=block_k, BLOCK_S=block_s, num_warps=4)
    return partial, t


def _reduce(partial, t, B, K, N, tau, mode, out_dtype, q=None):
    dev = partial.device
    acc_dtype = partial.dtype
    block_k = next_pow2(K)
    block_t = max(1, min(next_pow2(t), max(1, 4096 // block_k)))
    err = torch.empty((B, K), device=dev, dtype=out_dtype) if mode == _MODE_ERRORS else None
    logp = torch.empty((B, K), device=dev, dtype=out_dtype) if mode != _MODE_ERRORS else None
    loss = torch.empty((B,), device=dev, dtype=out_dtype) if mode == _MODE_CE else None
    coef = torch.empty((B, K), device=dev, dtype=acc_dtype) if mode == _MODE_CE else None
    dummy = partial
    _dc_reduce_kernel[(B,)](
        partial, q if q is not None else dummy,
        err if err is not None else dummy, logp if logp is not None else dummy,
        loss if loss is not None else dummy, coef if coef is not None else dummy,
        K, t, *split_f32(1.0 / N), *split_f32(1.0 / float(tau)),
        MODE=mode, ACC_F64=acc_dtype == torch.float64, BLOCK_K=block_k, BLOCK_T=block_t,
        num_warps=4,
    )
    return err, logp, loss, coef


def _apply_coef(pred3, eps2, coef, B, K, N, out_dtype=None):
    gpred = torch.empty_like(pred3, dtype=out_dtype)
    geps = torch.empty_like(eps2, dtype=out_dtype)
    block_k = min(next_pow2(K), 8)
    if _use_tuned(pred3):
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_S"]), B)  # noqa: E731
        _grad_tuned[grid](pred3, eps2, coef.contiguous(), gpred, geps, K, N,
                          ACC_F64=_acc_f64(pred3), BLOCK_K=block_k)
    else:
        block_s = max(16, min(next_pow2(N), 128))
        _dc_grad_kernel[(triton.cdiv(N, block_s), B)](
            pred3, eps2, coef.contiguous(), gpred, geps, K, N,
            ACC_F64=_acc_f64(pred3), BLOCK_K=block_k, BLOCK_S=block_s, num_warps=4)
    return gpred, geps


def _saved_grad_dtype(x: torch.Tensor) -> torch.dtype:
    """The cross-entropy forward's gradients are scaled by grad_output only in the backward: fp16 ones
    are written as fp32, whose range holds them before that scaling (cdgfast.ops._common)."""
    return torch.float32 if x.dtype == torch.float16 else x.dtype


# --- launchers ----------------------------------------------------------------------------------

def _fused(pred3, eps2, B, K, N, tau, mode, out_dtype, q=None):
    """The single-kernel path, or None when the problem wants the three-stage one (several
    programs per sample to fill the GPU, or more conditions than one tile holds)."""
    on_gpu = _use_tuned(pred3)
    block_k, block_s, chunk, t, kc = _tiles(K, N, B, on_gpu)
    if t != 1 or kc != 1:
        return None
    dev = pred3.device
    err = torch.empty((B, K), device=dev, dtype=out_dtype) if mode == _MODE_ERRORS else None
    logp = torch.empty((B, K), device=dev, dtype=out_dtype) if mode != _MODE_ERRORS else None
    loss = torch.empty((B,), device=dev, dtype=out_dtype) if mode == _MODE_CE else None
    gpred = torch.empty_like(pred3, dtype=_saved_grad_dtype(pred3)) if mode == _MODE_CE else None
    geps = torch.empty_like(eps2, dtype=_saved_grad_dtype(pred3)) if mode == _MODE_CE else None
    dummy = eps2
    args = [pred3, eps2, q if q is not None else dummy] + [x if x is not None else dummy
                                                           for x in (err, logp, loss, gpred, geps)]
    args += [K, N, *split_f32(1.0 / N), *split_f32(1.0 / float(tau))]
    meta = dict(MODE=mode, ACC_F64=_acc_f64(pred3), BLOCK_K=block_k, BLOCK_S=block_s)
    if on_gpu:
        _fused_tuned[(B,)](*args, **meta)
    else:
        _dc_fused_kernel[(B,)](*args, **meta, num_warps=4)
    return err, logp, loss, gpred, geps


def dc_errors(pred: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """err[b, k] = mean_s (pred[b, k, s] - eps[b, s])^2; pred [B, K, *S], eps [B, *S]."""
    pred3, eps2, B, K, N = _flatten(pred, eps)
    out = _fused(pred3, eps2, B, K, N, 1.0, _MODE_ERRORS, pred.dtype)
    if out is not None:
        return out[0]
    partial, t = _partials(pred3, eps2, B, K, N)
    err, _, _, _ = _reduce(partial, t, B, K, N, 1.0, _MODE_ERRORS, pred.dtype)
    return err


def dc_scores(pred: torch.Tensor, eps: torch.Tensor, tau: float) -> torch.Tensor:
    """log_softmax_k(-err[b, k] / tau)."""
    pred3, eps2, B, K, N = _flatten(pred, eps)
    out = _fused(pred3, eps2, B, K, N, tau, _MODE_SCORES, pred.dtype)
    if out is not None:
        return out[1]
    partial, t = _partials(pred3, eps2, B, K, N)
    _, logp, _, _ = _reduce(partial, t, B, K, N, tau, _MODE_SCORES, pred.dtype)
    return logp


def dc_cross_entropy(pred: torch.Tensor, eps: torch.Tensor, q: torch.Tensor, tau: float):
    """Fused forward of the per-sample DC cross-entropy ``loss[b] = -sum_k q[b, k] logp[b, k]``.

    Returns ``(loss[B], d loss[b] / d pred, d loss[b] / d eps, logp[B, K])``; the gradients are per
    sample (not reduced), have the shapes of ``pred`` and ``eps`` and its dtype (fp32 for fp16).
    """
    pred3, eps2, B, K, N = _flatten(pred, eps)
    q = q.to(_acc_dtype(pred3)).contiguous()
    out = _fused(pred3, eps2, B, K, N, tau, _MODE_CE, pred.dtype, q=q)
    if out is not None:
        _, logp, loss, gpred, geps = out
    else:
        partial, t = _partials(pred3, eps2, B, K, N)
        _, logp, loss, coef = _reduce(partial, t, B, K, N, tau, _MODE_CE, pred.dtype, q=q)
        gpred, geps = _apply_coef(pred3, eps2, coef, B, K, N, _saved_grad_dtype(pred3))
    return loss, gpred.reshape(pred.shape), geps.reshape(eps.shape), logp


def dc_apply_coef(pred: torch.Tensor, eps: torch.Tensor, coef: torch.Tensor):
    """``gpred = coef[b, k] * (pred - eps)``, ``geps = -sum_k gpred``: the backward of an op whose
    gradient w.r.t. ``err[b, k]`` is ``coef[b, k] * N / 2``."""
    pred3, eps2, B, K, N = _flatten(pred, eps)
    acc_dtype = _acc_dtype(pred3)
    gpred, geps = _apply_coef(pred3, eps2, coef.to(acc_dtype), B, K, N)
    return gpred.reshape(pred.shape), geps.reshape(eps.shape)
