"""Per-sample gradient contractions from one batched forward and backward (SPEC section 4).

One forward of the batch records, for every supported layer, its input `x` and a handle on its output
(`torch.autograd.graph.get_gradient_edge`); one `torch.autograd.grad` of `sum_j l_j` with respect to
those outputs gives `gy = d(sum_j l_j)/d out`, whose row i is `d l_i / d out_i` provided that row i
of the output influences no other loss. That proviso is proven, not assumed (`cdgfast.fisher._layout`:
every tensor of the forward carries the dim that indexes the samples, op by op). Per-sample parameter
gradients are then contractions of `x_i` and `gy_i` that are never materialised per sample:

| layer | g_i (weight) | direction . g_i | sum_i g_i * g_i |
|---|---|---|---|
| Linear on [B, *, Cin] | `gy_i^T x_i` | `sum_t (x_t @ M^T) . gy_t` | `(gy^2)^T x^2` (one token), else `bmm`s |
| Conv2d (any stride, padding, dilation, groups) | `gy_i (*) x_i` | `<conv2d(x_i, M), gy_i>` | `bmm` per tap (or unfold + `bmm`) |
| Group/LayerNorm affine | `sum gy_i * xhat_i`, `sum gy_i` | contraction with M | squares of the same |
| Embedding (no max_norm / scale_grad_by_freq) | rows `gy_i` at `idx_i` | `M[idx_i] . gy_i` | per-(sample, row) sums, squared |

Biases use `sum_t gy_i,t`. The weight gradients of the batch are never computed, and `.grad` is not
touched. On CUDA, Linear layers (and Conv2d's unfolded form for the squares) call the Triton kernels
`cdgfast.kernels.projection.linear_grad_dot` / `linear_sq_grad_sum` when `cdgfast._dispatch.use_triton`
says so and the module imports; elsewhere the plain-PyTorch contractions here run.

**Fallback (documented rule).** A trainable parameter is *covered* when it is the weight or bias of a
supported layer whose `forward` is the stock one, the parameter belongs to that layer only, and the
model has no sample-coupling layer (BatchNorm in train mode or without running stats). During the
forward a `TorchFunctionMode` also checks that every covered parameter enters the graph inside its own
layer's call and nowhere else, that the layer runs exactly once, that its input is not modified in
place afterwards, and that the layout proof holds: the losses come out indexed by sample, and the
layer's input and output carry the samples in one dim `d` (any dim for Linear / LayerNorm / Embedding,
which the contractions move to the front, e.g. a sequence-first [T, B, C] activation; dim 0 for Conv2d
/ GroupNorm), one row per sample or `rows_per_sample` consecutive rows per sample. Every parameter that
fails any of these gets exact per-sample gradients from the same batched graph
(`per_sample_grads_autograd`: vmapped backward of one-hot cotangents over chunks of samples, or one
backward per sample) - slower, never a wrong number. With a coupling layer, or when the proof fails
for the losses themselves (an op that mixes samples, an op the proof has no rule for), every parameter
takes that path. With one sample in the batch any layout is right.

**Several rows per sample.** A loss that runs the model on r copies of each sample (the DC scores'
B x K conditions, `x.repeat_interleave(K, 0)`) passes `rows_per_sample=r`: layers whose rows the proof
finds laid out r per sample (consecutive) then treat a sample's r rows as one more token / spatial
dimension and keep the hook path (measured: ewc_dc's Fisher on the tiny UNet, B = 16, K = 4, from
6.3 s to 0.75 s on one CPU thread, against 0.34 s for a plain forward + backward of the same loss).
Any other layout, or a promise the rows do not keep, falls back.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from cdgfast._dispatch import use_triton
from cdgfast.kernels import projection as P  # imports without triton (then only its torch functions run)

from ._common import _leading_tensor, call_loss, check_loss_graph, per_sample_grads_autograd, tensors_in, usable_batch
from ._layout import MIXED, SampleLayout

# --------------------------------------------------------------------------------------------------
# The contractions: cdgfast.kernels.projection (Triton launchers on CUDA, its plain-PyTorch functions
# elsewhere; one copy of each)
# --------------------------------------------------------------------------------------------------
def _kernels(x: torch.Tensor) -> bool:
    return use_triton(x) and P.triton is not None


def _linear_dot(x3, gy3, Mw, Mb, acc) -> torch.Tensor:
    """[B]: Mw . g_i(weight) + Mb . g_i(bias) for x3 [B, T, Cin], gy3 [B, T, Cout]."""
    if Mw is not None and _kernels(x3):
        res = P.linear_grad_dot(x3, gy3, Mw).to(acc)
        return res if Mb is None else res + P.linear_grad_dot_torch(x3, gy3, None, Mb, acc=acc)
    return P.linear_grad_dot_torch(x3, gy3, Mw, Mb, acc=acc)


def _linear_sq(x3, gy3, out, acc) -> None:
    """out [Cout, Cin] += sum_i (gy_i^T x_i)^2."""
    if _kernels(x3):
        out.add_(P.linear_sq_grad_sum(x3, gy3).to(out.dtype))
    else:
        P.linear_sq_grad_sum_torch(x3, gy3, out=out, acc=acc)


# --------------------------------------------------------------------------------------------------
# Layer rules: per-sample contractions from (x, gy)
# --------------------------------------------------------------------------------------------------
class _Rule:
    cls: type = nn.Module

    def applies(self, mod: nn.Module) -> bool:
        return True

    def layout_ok(self, mod, x: torch.Tensor, B: int) -> bool:
        return isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[0] == B

    def dim_ok(self, mod, x: torch.Tensor, dim: int) -> bool:
        """Whether the samples may sit in `dim` of the input (the rule moves that dim to the front)."""
        return dim == 0

    # `group` r > 1: the layer saw r rows per sample, sample-major (rows i*r .. i*r+r-1 are sample i's,
    # as repeat_interleave(r) makes them); sample i's gradient is the sum over its rows.
    def dot(self, mod, x, gy, Mw, Mb, acc, group: int = 1) -> torch.Tensor:
        raise NotImplementedError

    def sq(self, mod, x, gy, out_w, out_b, acc, group: int = 1) -> None:
        raise NotImplementedError


def _sample_major(t: torch.Tensor, group: int) -> torch.Tensor:
    """[B*r, *S] -> [B, r, *S]: the r rows of a sample become one more "token" dimension."""
    return t if group == 1 else t.reshape(t.shape[0] // group, group, *t.shape[1:])


class _LinearRule(_Rule):
    cls = nn.Linear

    def dim_ok(self, mod, x, dim):  # any dim but the features (sequence-first [T, B, C] inputs)
        return dim < x.dim() - 1

    @staticmethod
    def _flat(mod, x, gy):
        B = x.shape[0]
        return x.reshape(B, -1, mod.in_features), gy.reshape(B, -1, mod.out_features)

    def dot(self, mod, x, gy, Mw, Mb, acc, group=1):
        x3, g3 = self._flat(mod, _sample_major(x, group), _sample_major(gy, group))
        return _linear_dot(x3, g3, Mw, Mb, acc)

    def sq(self, mod, x, gy, out_w, out_b, acc, group=1):
        x3, g3 = self._flat(mod, _sample_major(x, group), _sample_major(gy, group))
        if out_w is not None:
            _linear_sq(x3, g3, out_w, acc)
        if out_b is not None:
            P.bias_sq_grad_sum(g3, out=out_b, acc=acc)


class _Conv2dRule(_Rule):
    cls = nn.Conv2d

    def layout_ok(self, mod, x, B):
        return isinstance(x, torch.Tensor) and x.dim() == 4 and x.shape[0] == B

    def dot(self, mod, x, gy, Mw, Mb, acc, group=1):
        return P.conv2d_grad_dot(x, gy, mod, Mw, Mb, use_kernel=False, acc=acc, rows_per_sample=group)

    def sq(self, mod, x, gy, out_w, out_b, acc, group=1):
        if out_b is not None:
            P.conv2d_bias_sq_grad_sum(gy, out=out_b, acc=acc, rows_per_sample=group)
        if out_w is not None:
            P.conv2d_sq_grad_sum(x, gy, mod, out=out_w, use_kernel=_kernels(x), acc=acc, rows_per_sample=group)


class _NormRule(_Rule):
    """GroupNorm / LayerNorm affine: out = xhat * weight + bias, elementwise per channel / feature."""

    def _xhat(self, mod, x, acc):
        raise NotImplementedError

    def _reduce_dims(self, mod, x) -> Tuple[int, ...]:
        raise NotImplementedError

    def _summaries(self, mod, x, gy, need_w, need_b, acc, group=1):
        g = gy.to(acc)
        dims = self._reduce_dims(mod, x)

        def red(t):  # sum(dim=()) would reduce everything; a sample's rows add up
            t = t.sum(dim=dims) if dims else t
            return _sample_major(t, group).sum(1) if group > 1 else t

        sw = red(g * self._xhat(mod, x, acc)) if need_w else None
        sb = red(g) if need_b else None
        return sw, sb  # [B, *param_shape]

    def dot(self, mod, x, gy, Mw, Mb, acc, group=1):
        sw, sb = self._summaries(mod, x, gy, Mw is not None, Mb is not None, acc, group)
        res = torch.zeros(x.shape[0] // group, dtype=acc, device=x.device)
        if sw is not None:
            res += (sw * Mw.to(acc)).flatten(1).sum(1)
        if sb is not None:
            res += (sb * Mb.to(acc)).flatten(1).sum(1)
        return res

    def sq(self, mod, x, gy, out_w, out_b, acc, group=1):
        sw, sb = self._summaries(mod, x, gy, out_w is not None, out_b is not None, acc, group)
        if sw is not None:
            out_w.add_(sw.square().sum(0).to(out_w.dtype))
        if sb is not None:
            out_b.add_(sb.square().sum(0).to(out_b.dtype))


class _GroupNormRule(_NormRule):
    cls = nn.GroupNorm

    def _xhat(self, mod, x, acc):
        return F.group_norm(x.to(acc), mod.num_groups, None, None, mod.eps)

    def _reduce_dims(self, mod, x):
        return tuple(range(2, x.dim()))


class _LayerNormRule(_NormRule):
    cls = nn.LayerNorm

    def layout_ok(self, mod, x, B):
        return isinstance(x, torch.Tensor) and x.dim() > len(mod.normalized_shape) and x.shape[0] == B

    def dim_ok(self, mod, x, dim):
        return dim < x.dim() - len(mod.normalized_shape)

    def _xhat(self, mod, x, acc):
        return F.layer_norm(x.to(acc), mod.normalized_shape, None, None, mod.eps)

    def _reduce_dims(self, mod, x):
        return tuple(range(1, x.dim() - len(mod.normalized_shape)))


class _EmbeddingRule(_Rule):
    cls = nn.Embedding

    def applies(self, mod):
        # max_norm renormalises the table in place inside forward; scale_grad_by_freq rescales the
        # gradient by batch-wide counts (couples samples): both go to the fallback.
        return mod.max_norm is None and not mod.scale_grad_by_freq

    def layout_ok(self, mod, x, B):
        return isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[0] == B

    def dim_ok(self, mod, x, dim):
        return dim < x.dim()

    @staticmethod
    def _flat(mod, idx, gy, acc):
        B = idx.shape[0]
        i2 = idx.reshape(B, -1)
        g3 = gy.to(acc).reshape(B, i2.shape[1], mod.embedding_dim)
        keep = None if mod.padding_idx is None else (i2 != mod.padding_idx)  # no gradient at padding_idx
        return i2, g3, keep

    def dot(self, mod, idx, gy, Mw, Mb, acc, group=1):
        i2, g3, keep = self._flat(mod, _sample_major(idx, group), _sample_major(gy, group), acc)
        if Mw is None:
            return torch.zeros(i2.shape[0], dtype=acc, device=gy.device)
        per = (Mw.to(acc)[i2] * g3).sum(-1)  # [B, T]
        if keep is not None:
            per = per * keep
        return per.sum(1)

    def sq(self, mod, idx, gy, out_w, out_b, acc, group=1):
        if out_w is None:
            return
        i2, g3, keep = self._flat(mod, _sample_major(idx, group), _sample_major(gy, group), acc)
        B, T = i2.shape
        V, D = mod.num_embeddings, mod.embedding_dim
        sample = torch.arange(B, device=i2.device).unsqueeze(1).expand(B, T)
        keys, rows = (sample * V + i2).reshape(-1), g3.reshape(-1, D)
        if keep is not None:
            k = keep.reshape(-1)
            keys, rows = keys[k], rows[k]
        if keys.numel() == 0:
            return
        if T == 1:  # one row per sample: no repeats to merge
            out_w.index_add_(0, keys % V, rows.square().to(out_w.dtype))
            return
        uniq, inv = torch.unique(keys, return_inverse=True)  # (sample, row) pairs; repeats add first
        sums = torch.zeros(uniq.numel(), D, dtype=acc, device=rows.device).index_add_(0, inv, rows)
        out_w.index_add_(0, uniq % V, sums.square().to(out_w.dtype))


_RULES: Tuple[_Rule, ...] = (_LinearRule(), _Conv2dRule(), _GroupNormRule(), _LayerNormRule(), _EmbeddingRule())


def _rule_for(mod: nn.Module) -> Optional[_Rule]:
    for rule in _RULES:
        # the stock forward only: subclasses that override it (LoRA-compatible layers, ...) and
        # instance-level forward patches fall back
        if isinstance(mod, rule.cls) and type(mod).forward is rule.cls.forward and "forward" not in mod.__dict__:
            return rule if rule.applies(mod) else None
    return None


def _couples_samples(mod: nn.Module) -> bool:
    return isinstance(mod, nn.modules.batchnorm._BatchNorm) and (mod.training or not mod.track_running_stats)


# --------------------------------------------------------------------------------------------------
# Static coverage
# --------------------------------------------------------------------------------------------------
class HookPlan:
    """Which trainable parameters the hook rules cover (static part of the rule in the module doc).

    `owners[k]` = (module, rule, "weight"|"bias") for a covered parameter k, else None.
    """

    def __init__(self, model: nn.Module, params: Sequence[torch.Tensor]):
        self.params = list(params)
        index = {id(p): k for k, p in enumerate(self.params)}
        holders: Dict[int, List[Tuple[nn.Module, str]]] = {}
        self.coupled = False
        for mod in model.modules():
            if _couples_samples(mod):
                self.coupled = True
            for pname, p in mod._parameters.items():
                if p is not None and id(p) in index:
                    holders.setdefault(id(p), []).append((mod, pname))
        self.owners: List[Optional[Tuple[nn.Module, _Rule, str]]] = [None] * len(self.params)
        for k, p in enumerate(self.params):
            h = holders.get(id(p), [])
            if self.coupled or len(h) != 1:  # shared (tied) parameters: per-sample terms add before squaring
                continue
            mod, pname = h[0]
            rule = _rule_for(mod)
            if rule is not None and pname in ("weight", "bias"):
                self.owners[k] = (mod, rule, pname)
        # modules with at least one covered parameter -> {role: k}
        self.modules: Dict[nn.Module, Dict[str, int]] = {}
        for k, o in enumerate(self.owners):
            if o is not None:
                self.modules.setdefault(o[0], {})[o[2]] = k

    @property
    def all_covered(self) -> bool:
        return all(o is not None for o in self.owners)


def hook_coverage(model: nn.Module) -> List[bool]:
    """Per trainable parameter (SPEC flat order): True where the hook rules cover it statically
    (`method="auto"` in `per_sample_grad_dot` uses hooks only when all are True)."""
    from cdgfast.params import trainable_named

    _, params = trainable_named(model)
    return [o is not None for o in HookPlan(model, params).owners]


# --------------------------------------------------------------------------------------------------
# The hooked forward
# --------------------------------------------------------------------------------------------------
class _ForwardTracker(SampleLayout):
    """The sample layout of every tensor (`SampleLayout`), plus: covered parameters that enter the
    autograd graph outside their own layer's call (`foreign`), and those that do inside it (`used`;
    a layer whose parameter was swapped for another tensor, e.g. by torch.func.functional_call,
    computes nothing the contractions could attribute to that parameter)."""

    def __init__(self, owner_of: Dict[int, nn.Module], stack: List[nn.Module]):
        super().__init__()
        self.owner_of = owner_of
        self.stack = stack
        self.foreign: set = set()
        self.used: set = set()

    def observe(self, func, args, kwargs, result, inputs, pre=None):
        super().observe(func, args, kwargs, result, inputs, pre)
        hits = [id(t) for t in inputs if id(t) in self.owner_of]
        if hits and torch.is_grad_enabled():
            outs: list = []
            tensors_in(result, outs)
            if any(o.requires_grad for o in outs):  # metadata reads (.dtype, .shape) and detach() do not count
                top = self.stack[-1] if self.stack else None
                for h in hits:
                    (self.used if self.owner_of[h] is top else self.foreign).add(h)


class _Record:
    __slots__ = ("x", "version", "edge", "calls", "tag", "x_tag")

    def __init__(self):
        self.x = None
        self.version = None
        self.edge = None
        self.calls = 0
        self.tag = MIXED  # sample layout of the layer's output
        self.x_tag = MIXED  # ... and of its input


def _hooked_forward(model, loss_fn, batch, plan: HookPlan):
    """Run loss_fn under hooks; return (losses, records, tracker)."""
    records: Dict[nn.Module, _Record] = {m: _Record() for m in plan.modules}
    owner_of = {id(plan.params[k]): m for m, roles in plan.modules.items() for k in roles.values()}
    stack: List[nn.Module] = []
    handles = []
    tracker = _ForwardTracker(owner_of, stack)

    def pre_hook(mod, args, kwargs):
        stack.append(mod)

    def post_hook(mod, args, kwargs, out):
        # The bookkeeping here reads metadata and makes a detached copy that never enters the forward:
        # it runs outside the tracker (about 730 calls per forward of the tiny UNet it need not see;
        # the tags it reads are the tracker's own).
        with torch._C.DisableTorchFunction():
            _record(mod, args, kwargs, out)

    def _record(mod, args, kwargs, out):
        if stack and stack[-1] is mod:
            stack.pop()
        rec = records[mod]
        rec.calls += 1
        x = args[0] if args else kwargs.get("input")
        if (rec.calls == 1 and isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)
                and not x.is_inference()):  # a loss_fn under inference_mode: refused after the forward
            rec.x = x.detach()  # shares the version counter: an in-place change later is detected
            rec.version = x._version
            rec.tag, rec.x_tag = tracker.tag(out), tracker.tag(x)
            if out.requires_grad:
                rec.edge = torch.autograd.graph.get_gradient_edge(out)

    lead = _leading_tensor(batch)
    tracker.tag_inputs(batch, lead.shape[0] if lead is not None and lead.dim() >= 1 else None)
    try:
        for mod in plan.modules:
            handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))
            handles.append(mod.register_forward_hook(post_hook, with_kwargs=True))
        with torch.enable_grad(), tracker:
            losses = call_loss(loss_fn, model, batch)
    finally:
        for h in handles:
            h.remove()
    return losses, records, tracker


def _layer_layout(rule: "_Rule", mod: nn.Module, rec: _Record, B: int, rows_per_sample: int,
                  proven: bool) -> Optional[Tuple[int, int]]:
    """(sample dim, rows per sample) of a hooked layer's input and output, or None (fall back).

    With one sample every row of the layer belongs to it, whatever the layout. Otherwise the tracked
    layout must say that the layer's output rows along `dim` carry the sample labels (in groups of 1 or
    `rows_per_sample` rows) and the losses are labelled by sample (`proven`)."""
    x = rec.x
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        return None
    if B == 1:
        rows = x.shape[0]
        group = 1 if rows == 1 else (rows_per_sample if rows == rows_per_sample else 0)
        return (0, group) if group else None
    if not proven or rec.tag != rec.x_tag or not isinstance(rec.tag, tuple):
        return None
    dim, group = rec.tag
    if group not in (1, rows_per_sample) or x.shape[dim] != B * group or not rule.dim_ok(mod, x, dim):
        return None
    return dim, group


def hooked_contractions(model: nn.Module, loss_fn, batch, params: Sequence[torch.Tensor], acc: torch.dtype, *,
                        pieces: Optional[Sequence[torch.Tensor]] = None,
                        sq_views: Optional[Sequence[torch.Tensor]] = None,
                        force_fallback: bool = False, rows_per_sample: int = 1):
    """One hooked forward + backward. With `pieces` (direction per parameter) returns [B] projections;
    with `sq_views` (flat-buffer views per parameter) adds sum_i g_i*g_i into them and returns the
    number of samples. `force_fallback` sends every parameter through the per-sample autograd path.
    `rows_per_sample` r: layers whose B * r rows the layout proof finds sample-major (a forward over
    repeat_interleave(r) copies) sum each sample's r rows; layers that see B rows as usual."""
    batch = usable_batch(batch)
    plan = HookPlan(model, params)
    if force_fallback:
        plan.owners = [None] * len(plan.params)
        plan.modules = {}
    losses, records, tracker = _hooked_forward(model, loss_fn, batch, plan)
    check_loss_graph(losses, params)
    B = losses.shape[0]
    proven = not tracker.poisoned and tracker.tag(losses) == (0, 1)
    foreign, used = tracker.foreign, tracker.used
    tracker.clear()

    fallback = {k for k, o in enumerate(plan.owners) if o is None}
    usable: List[Tuple[nn.Module, _Rule, _Record, int, int]] = []
    for mod, roles in plan.modules.items():
        rec = records[mod]
        rule = plan.owners[next(iter(roles.values()))][1]
        ok = (rec.calls <= 1 and not any(id(plan.params[k]) in foreign for k in roles.values())
              and (rec.calls == 0 or all(id(plan.params[k]) in used for k in roles.values())))
        if ok and rec.calls == 1 and rec.edge is not None:
            layout = _layer_layout(rule, mod, rec, B, rows_per_sample, proven)
            ok = layout is not None and rec.x._version == rec.version
            if ok:
                dim, group = layout
                if dim != 0:
                    rec.x = rec.x.movedim(dim, 0)
                ok = rule.layout_ok(mod, rec.x, rec.x.shape[0])
            if ok:
                usable.append((mod, rule, rec, dim, group))
        if not ok:
            fallback.update(roles.values())
        # calls == 0 or an output without a gradient path: these parameters' gradients are exactly zero

    result = torch.zeros(B, dtype=acc, device=losses.device) if pieces is not None else None
    if usable:
        gys = torch.autograd.grad(losses.sum(), [r.edge for _, _, r, _, _ in usable],
                                  retain_graph=bool(fallback), allow_unused=True)
        for (mod, rule, rec, dim, group), gy in zip(usable, gys):
            if gy is None:
                continue
            if dim != 0:
                gy = gy.movedim(dim, 0)
            roles = plan.modules[mod]
            kw, kb = roles.get("weight"), roles.get("bias")
            if pieces is not None:
                result += rule.dot(mod, rec.x, gy, None if kw is None else pieces[kw],
                                   None if kb is None else pieces[kb], acc, group)
            if sq_views is not None:
                rule.sq(mod, rec.x, gy, None if kw is None else sq_views[kw],
                        None if kb is None else sq_views[kb], acc, group)
            rec.x = None  # free the activation as soon as it is used
        del gys
    if fallback:
        ks = sorted(fallback)
        fb_params = [plan.params[k] for k in ks]
        for start, grads in per_sample_grads_autograd(losses, fb_params):
            c = grads[0].shape[0]
            for k, g in zip(ks, grads):
                g = g.to(acc)
                if pieces is not None:
                    result[start:start + c] += (g * pieces[k].to(acc)).flatten(1).sum(1)
                if sq_views is not None:
                    sq_views[k].add_(g.square().sum(0).to(sq_views[k].dtype))
    return result if pieces is not None else B


__all__ = ["HookPlan", "hook_coverage", "hooked_contractions"]
