"""Which dimension of every tensor of a loss forward indexes the samples: the proof the hook path needs.

The hook path (`cdgfast.fisher.hooks`) turns a layer's input `x` and the gradient `gy` of `sum_j l_j`
with respect to its output `h` into per-sample gradients. That is right only if row k of `h` (along the
dimension it takes for the samples) influences no loss but l_k: `d l_j / d h[k] = 0` for `j != k`. A
shape check (`h.shape[0] == B`) cannot tell a sequence-first `[T, B, C]` activation with `T == B` from a
batch-first one. `SampleLayout` proves the property op by op while the forward runs.

**Tags.** Every tensor the forward makes gets one of
* `None` (constant): no differentiable dependence on any tagged tensor (parameters, buffers, constants,
  tensors that do not require grad and were never tagged);
* `(dim, group)`: index `i` along `dim` carries label `i // group` (`group` consecutive rows per label,
  as `repeat_interleave(group, dim)` makes them);
* `MIXED`: anything else; unknown.

**Invariant.** For tagged tensors `u` (upstream) and `v` (downstream), `d v[label k] / d u[label j] = 0`
for `j != k`. Each rule below states how an op maps labelled slices of its inputs to labelled slices of
its output and is written so that the invariant holds; an op without a rule, an argument a rule does not
understand, or an error inside a rule gives `MIXED`. The batch's tensors start with `(0, 1)` (labels =
sample indices); which tensors start tagged only decides what can be proven, never whether a proof is
right, because tensors that do not require grad carry no gradient. At the end the losses must be tagged
`(0, 1)`: then for every hooked layer whose output is tagged `(d, g)`, `d l_k / d h` vanishes outside the
`g` rows of label k along `d`, which is what the hook contractions assume.

**Guards.** A tagged tensor whose `grad_fn` changed after it was tagged (an in-place op this mode did
not see, a custom `autograd.Function` wrapping a tensor made inside its forward) reads as `MIXED`; an
in-place op that may write one label's data into another label's slice (or into a tensor whose layout
is not known) sets `poisoned`, and then nothing is proven.
"""
from __future__ import annotations

import math
import weakref
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ._common import tensors_in

MIXED = "mixed"
Tag = Any  # None | MIXED | (dim, group)


def _is_sample(tag) -> bool:
    return isinstance(tag, tuple)


def _ndim(d: int, n: int) -> int:
    """Normalise a possibly negative dim against n dims; ValueError outside."""
    if isinstance(d, bool) or not isinstance(d, int):
        raise ValueError("dim is not an int")
    if d < 0:
        d += n
    if not 0 <= d < max(n, 1):
        raise ValueError("dim out of range")
    return d


def _arg(args, kwargs, i: int, name: str, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _reshape_tag(tag, in_shape: Sequence[int], out_shape: Sequence[int]):
    """Tag after a reshape that keeps row-major element order (view, reshape, flatten, (un)squeeze...).

    With `pre` = product of the dims before the tagged one and `suf` the product after it, an element's
    label is `(flat index within its outer block) // (group * suf)`. An output dim j whose leading dims
    multiply to `pre` and whose trailing dims multiply to `suf_o` carries the same labels with
    `group * suf / suf_o` rows each when that is a whole number."""
    d, r = tag
    in_shape, out_shape = tuple(in_shape), tuple(out_shape)
    if in_shape == out_shape:
        return tag
    if 0 in in_shape:
        return MIXED
    pre = math.prod(in_shape[:d])
    suf = math.prod(in_shape[d + 1:])
    acc = 1
    for j, s in enumerate(out_shape):
        if acc == pre:
            suf_o = math.prod(out_shape[j + 1:])
            if s > 0 and (r * suf) % suf_o == 0:
                m = (r * suf) // suf_o
                if s % m == 0 and s * suf_o == in_shape[d] * suf:
                    return (j, m)
        acc *= s
        if acc > pre:
            break
    return MIXED


def _moved(tag, perm: Sequence[int]):
    """Tag after a permutation: output dim j is input dim perm[j]."""
    d, r = tag
    return (list(perm).index(d), r)


# --------------------------------------------------------------------------------------------------
# Op names
# --------------------------------------------------------------------------------------------------
_POINTWISE = frozenset("""
abs absolute acos arccos acosh arccosh add addcdiv addcmul angle asin arcsin asinh arcsinh atan arctan atan2
arctan2 atanh arctanh bitwise_and bitwise_not bitwise_or bitwise_xor ceil clamp clamp_min clamp_max clip
conj conj_physical copysign cos cosh deg2rad div divide true_divide floor_divide digamma erf erfc erfinv exp
exp2 expm1 float_power floor fmod frac hypot i0 lerp lgamma log log10 log1p log2 logaddexp logaddexp2
logical_and logical_not logical_or logical_xor logit maximum minimum fmax fmin mul multiply mvlgamma
nan_to_num neg negative nextafter pow rad2deg reciprocal remainder round rsqrt rsub sigmoid sign sgn signbit
sin sinc sinh sqrt square sub subtract tan tanh trunc fix xlogy special_xlogy where masked_fill
relu relu6 gelu silu mish elu selu celu leaky_relu hardtanh hardsigmoid hardswish softplus softsign
tanhshrink threshold logsigmoid rrelu hardshrink softshrink
eq ne lt le gt ge greater greater_equal less less_equal not_equal isnan isinf isfinite isneginf isposinf
isclose isreal
float double half bfloat16 int long bool byte char short cpu cuda contiguous clone detach
resolve_conj resolve_neg positive
dropout alpha_dropout feature_alpha_dropout dropout1d dropout2d dropout3d
__add__ __radd__ __sub__ __rsub__ __mul__ __rmul__ __truediv__ __rtruediv__ __div__ __rdiv__
__floordiv__ __rfloordiv__ __mod__ __rmod__ __pow__ __rpow__ __neg__ __pos__ __abs__ __and__ __rand__
__or__ __ror__ __xor__ __rxor__ __invert__ __lt__ __le__ __gt__ __ge__ __eq__ __ne__
get:data get:real get:imag
""".split())

# Only the first argument carries values (the others give a dtype, device or shape).
_SELF_ONLY = frozenset("to type type_as pin_memory".split())

# Outputs that do not depend on the input values at all.
_CONSTANT = frozenset("""
zeros_like ones_like empty_like full_like rand_like randn_like randint_like new_zeros new_ones new_empty
new_full new_tensor new_empty_strided get:grad
""".split())

_RESHAPE = frozenset("view reshape flatten unflatten squeeze unsqueeze view_as reshape_as ravel".split())

# In-place ops that write constants (values that do not depend on any tensor of the graph).
_FILLS = frozenset("fill_ zero_ uniform_ normal_ random_ bernoulli_ exponential_ geometric_ cauchy_ "
                   "log_normal_".split())
# In-place ops that change neither values nor layout.
_META_INPLACE = frozenset("requires_grad_ detach_ retain_grad share_memory_ record_stream".split())
_INPLACE_DUNDER = {"__iadd__": "add", "__isub__": "sub", "__imul__": "mul", "__itruediv__": "div",
                   "__idiv__": "div", "__ifloordiv__": "floor_divide", "__imod__": "remainder",
                   "__ipow__": "pow", "__iand__": "bitwise_and", "__ior__": "bitwise_or",
                   "__ixor__": "bitwise_xor"}


# Reads of metadata or of a Python scalar: no tensor comes out, so the mode tags nothing, writes
# nothing and has nothing to check; they skip the tag bookkeeping (`SampleLayout.__torch_function__`).
# A name here must be no in-place op and have no rule (tests/test_fisher_layout.py checks both), and a
# result that holds a tensor after all still goes through `observe`.
_METADATA = frozenset("""
dim ndimension size numel nelement stride storage_offset is_contiguous is_floating_point is_complex
is_signed is_inference is_leaf is_pinned is_shared element_size data_ptr get_device __len__ __int__
__float__ __bool__ __index__ __complex__ item tolist __format__ __hash__
get:shape get:dtype get:device get:ndim get:requires_grad get:grad_fn get:_version get:output_nr
get:is_leaf get:layout get:is_cuda get:is_cpu get:is_meta get:is_sparse get:is_quantized get:is_mkldnn
get:is_nested get:itemsize get:nbytes get:names get:_backward_hooks
""".split())


def op_name(func) -> str:
    """The name the rules are keyed by (cached per function object, see `_op_info`)."""
    try:
        return _op_info(func)[0]
    except TypeError:  # an unhashable callable
        return _op_name(func)


_OP_INFO: Dict[Any, Tuple[str, bool]] = {}


def _op_info(func) -> Tuple[str, bool]:
    """(op_name, is a metadata read) of a function, cached: the same function object always has the
    same name."""
    info = _OP_INFO.get(func)
    if info is None:
        name = _op_name(func)
        info = _OP_INFO[func] = (name, name in _METADATA)
    return info


def _op_name(func) -> str:
    qn = getattr(func, "_qualified_op_name", None)  # torch.ops packets: "cdgfast::dc_errors"
    if isinstance(qn, str):
        return qn
    name = getattr(func, "__name__", None) or ""
    if name == "__get__":  # a Tensor property (x.T, x.shape, ...)
        owner = getattr(func, "__self__", None)
        return "get:" + str(getattr(owner, "__name__", "?"))
    return name


# --------------------------------------------------------------------------------------------------
# The mode
# --------------------------------------------------------------------------------------------------
class SampleLayout(TorchFunctionMode):
    """TorchFunctionMode that tags every tensor of the forward (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self._tags: Dict[int, Tuple[Any, Tag, Any]] = {}
        self._frozen: Optional[Dict[int, Tag]] = None  # tags read before an in-place op ran
        self.poisoned = False

    # ---- the tag table
    def tag_inputs(self, batch, num_samples: Optional[int]) -> None:
        """Tag the batch's tensors with dim >= 1 (those with `num_samples` rows if given) as (0, 1)."""
        found: list = []
        tensors_in(batch, found)
        for t in found:
            if t.dim() >= 1 and (num_samples is None or t.shape[0] == num_samples):
                self.set(t, (0, 1))

    def set(self, t: torch.Tensor, tag: Tag) -> None:
        try:
            ref = weakref.ref(t)
        except TypeError:  # pragma: no cover - every torch.Tensor supports weak references
            return
        self._tags[id(t)] = (ref, tag, t.grad_fn)

    def tag(self, t: torch.Tensor) -> Tag:
        if self._frozen is not None and id(t) in self._frozen:
            return self._frozen[id(t)]
        entry = self._tags.get(id(t))
        if entry is not None and entry[0]() is t:
            if t.grad_fn is entry[2]:
                return entry[1]
            return MIXED if t.requires_grad else None
        # never tagged: a leaf (parameter, constant) or a tensor without a gradient path cannot depend
        # differentiably on a tagged tensor; anything else came from somewhere this mode did not see
        if not t.requires_grad or t.grad_fn is None:
            return None
        return MIXED

    def clear(self) -> None:
        self._tags.clear()

    # ---- combining tags
    def agree(self, tensors: Sequence, place: Callable[[int, torch.Tensor, Tuple[int, int]], Tag]) -> Tag:
        """The one output tag that every tagged input agrees on.

        `place(i, t, tag)` maps the i-th input's (dim, group) to the output's (dim, group), or MIXED when
        that input's layout does not survive the op. Constants (untagged, or not tensors) are skipped;
        None when nothing is tagged; MIXED for a MIXED input, a MIXED placement, or two inputs that land
        on different output tags (the op would mix samples)."""
        res = None
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                continue
            tg = self.tag(t)
            if tg is None:
                continue
            if tg is MIXED:
                return MIXED
            cand = place(i, t, tg)
            if cand is MIXED or (res is not None and res != cand):
                return MIXED
            res = cand
        return res

    def align(self, tensors: Sequence[torch.Tensor], out_shape: Sequence[int]) -> Tag:
        """Tag of a broadcasting elementwise op's output: every tagged input's tagged dim must land on
        the same output dim with the same group, unbroadcast."""
        out_shape = tuple(out_shape)

        def place(i, t, tg):
            d, r = tg
            od = d + len(out_shape) - t.dim()
            if od < 0 or od >= len(out_shape) or out_shape[od] != t.shape[d]:
                return MIXED
            return (od, r)
        return self.agree(tensors, place)

    def all_const(self, tensors: Sequence[torch.Tensor]) -> bool:
        return all(self.tag(t) is None for t in tensors)

    # ---- interception
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            name, meta = _op_info(func)
        except TypeError:  # an unhashable callable
            name, meta = _op_name(func), False
        if meta and "out" not in kwargs:
            # x.shape, x.dim(), x.grad_fn, ...: nothing to tag unless a tensor comes out after all
            result = func(*args, **kwargs)
            if not isinstance(result, (torch.Tensor, tuple, list)):
                return result
            found: list = []
            tensors_in(result, found)
            if not found:
                return result
            inputs: list = []
            tensors_in(args, inputs)
            tensors_in(kwargs, inputs)
            self.observe(func, args, kwargs, result, inputs, None)
            return result
        inputs = []
        tensors_in(args, inputs)
        tensors_in(kwargs, inputs)
        # an in-place op changes its target's grad_fn: read the tags it writes over first. Pointwise
        # functions can also work in place by argument (F.relu(x, inplace=True)): they return their input.
        pre = first = None
        if self._inplace(name, kwargs):
            pre = {id(t): self.tag(t) for t in inputs}
        elif name in _POINTWISE and args and isinstance(args[0], torch.Tensor):
            first = args[0]
            first_tag = self.tag(first)
        result = func(*args, **kwargs)
        if first is not None and result is first:
            pre = {id(t): self.tag(t) for t in inputs if t is not first}
            pre[id(first)] = first_tag
        if inputs or isinstance(result, (torch.Tensor, tuple, list)):
            self.observe(func, args, kwargs, result, inputs, pre)
        return result

    def observe(self, func, args, kwargs, result, inputs: list, pre: Optional[Dict[int, Tag]] = None) -> None:
        name = op_name(func)
        if pre is not None:
            self._frozen = pre
            try:
                self._record_inplace(name, args, kwargs, inputs)
            except Exception:
                self.poisoned = True
            finally:
                self._frozen = None
            return
        outs: list = []
        if isinstance(result, torch.Tensor):
            outs = [result]
        elif isinstance(result, (tuple, list)):
            outs = [o for o in result if isinstance(o, torch.Tensor)]
        if not outs:
            return
        try:
            tags = self._rule(func, name, args, kwargs, result, inputs)
        except Exception:  # a rule that does not understand its arguments proves nothing
            tags = None if self.all_const(inputs) else MIXED
        if not isinstance(tags, list):
            tags = [tags] * len(outs)
        for o, tg in zip(outs, tags):
            self.set(o, tg)

    @staticmethod
    def _inplace(name: str, kwargs) -> bool:
        if kwargs.get("out") is not None:
            return True
        if name in _INPLACE_DUNDER or name == "__setitem__":
            return True
        return name.endswith("_") and not name.startswith("_") and "::" not in name

    # ---- in-place ops
    def _record_inplace(self, name, args, kwargs, inputs) -> None:
        """Tag the tensors an in-place op wrote. The grad_fn guard turns every alias of a written
        tensor that requires grad (its base, its other views) MIXED; a write that mixes labels into a
        tensor that requires grad also poisons the whole forward, in case an alias escaped the guard."""
        if name in _META_INPLACE:
            for t in inputs:  # no value changed: keep the tags, refresh the grad_fn they were read with
                self.set(t, self.tag(t))
            return
        out = kwargs.get("out")
        if out is not None:
            targets: list = []
            tensors_in(out, targets)
            ids = {id(t) for t in targets}
            const = self.all_const([t for t in inputs if id(t) not in ids])
            for t in targets:
                self._write(t, None if const and self.tag(t) is None else MIXED)
            return
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if target is None:
            self.poisoned = True
            return
        old = self.tag(target)
        others = [t for t in inputs if t is not target]
        base = _INPLACE_DUNDER.get(name, name[:-1] if name.endswith("_") else name)
        if name in _FILLS:
            new = old if self.all_const(others) else MIXED
        elif name == "__setitem__":
            new = old if self._setitem_ok(target, old, args) else MIXED
        elif base in _POINTWISE or base == "copy":
            ot = self.align(others, target.shape)
            if ot is None:
                new = old  # every element rewritten from itself and constants
            elif base == "copy" or old is None or ot == old:
                new = ot
            else:
                new = MIXED
        else:  # cumsum_, index_add_, t_, ...: only constants in, constants out
            new = old if (old is None and self.all_const(others)) else MIXED
        self._write(target, new)

    def _write(self, t: torch.Tensor, new: Tag) -> None:
        if new is MIXED and t.requires_grad:
            self.poisoned = True
        self.set(t, new)

    def _setitem_ok(self, target, old, args) -> bool:
        value = args[2] if len(args) > 2 else None
        if not isinstance(value, torch.Tensor) or self.tag(value) is None:
            return True  # constants written anywhere keep every label's slice its own
        if not _is_sample(old):
            return False
        view_tag = _getitem_tag(self, target, args[1], target[args[1]].shape)
        if not _is_sample(view_tag):
            return False
        vt = self.tag(value)
        view_shape = target[args[1]].shape
        d, r = vt
        od = d + len(view_shape) - value.dim()
        return 0 <= od < len(view_shape) and view_shape[od] == value.shape[d] and (od, r) == view_tag

    # ---- out-of-place ops
    def _rule(self, func, name, args, kwargs, result, inputs):
        if not inputs or self.all_const(inputs):
            return None
        if name in _CONSTANT:
            return None
        if name in _POINTWISE:
            if name == "where" and len(args) + len(kwargs) < 3:
                return MIXED  # where(cond): indices
            return self.align(inputs, result.shape)
        if name in _SELF_ONLY:
            return self.tag(args[0])
        rule = _RULES.get(name)
        if rule is None:
            return MIXED
        return rule(self, func, args, kwargs, result)


# --------------------------------------------------------------------------------------------------
# Rules: (layout, func, args, kwargs, result) -> tag, or a list of tags for a tuple/list result
# --------------------------------------------------------------------------------------------------
def _first_tag(L, args, kwargs, name="input"):
    x = args[0] if args else kwargs[name]
    return x, L.tag(x)


def _only_first(L, args, kwargs, x) -> bool:
    """True when every tensor argument other than `x` is constant (weights, biases, masks)."""
    others: list = []
    tensors_in(args, others)
    tensors_in(kwargs, others)
    return L.all_const([t for t in others if t is not x])


def _n_outputs(result) -> int:
    if isinstance(result, torch.Tensor):
        return 1
    return sum(isinstance(o, torch.Tensor) for o in result)


def _reshape_rule(L, func, args, kwargs, result):
    x, tg = _first_tag(L, args, kwargs)
    # view_as / reshape_as read only the other tensor's shape
    if not _is_sample(tg) or not (op_name(func).endswith("_as") or _only_first(L, args, kwargs, x)):
        return MIXED
    return _reshape_tag(tg, x.shape, result.shape)


def _reorder_rule(perm_of: Callable[[Any, tuple, dict, int], List[int]]):
    """The rule of an op that only reorders dims (a view): the samples' dim goes where the permutation
    `perm_of(func, args, kwargs, ndim)` sends it (output dim i holds input dim perm[i])."""
    def rule(L, func, args, kwargs, result):
        x, tg = _first_tag(L, args, kwargs)
        if not _is_sample(tg):
            return MIXED
        return _moved(tg, perm_of(func, args, kwargs, x.dim()))
    return rule


def _permute_perm(func, args, kwargs, n):
    dims = args[1:] if len(args) > 1 else kwargs["dims"]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple, torch.Size)):
        dims = dims[0]
    return [_ndim(int(d), n) for d in dims]


def _transpose_perm(func, args, kwargs, n):
    if op_name(func) == "t":
        if n < 2:
            return list(range(n))
        a, b = 0, 1
    else:
        a = _ndim(_arg(args, kwargs, 1, "dim0"), n)
        b = _ndim(_arg(args, kwargs, 2, "dim1"), n)
    perm = list(range(n))
    perm[a], perm[b] = perm[b], perm[a]
    return perm


def _property_T_perm(func, args, kwargs, n):
    perm = list(range(n))
    if op_name(func) in ("get:mT", "get:mH", "adjoint"):
        perm[-1], perm[-2] = perm[-2], perm[-1]
        return perm
    return perm[::-1]  # T / H: all dims reversed


def _movedim_perm(func, args, kwargs, n):
    src = _arg(args, kwargs, 1, "source")
    dst = _arg(args, kwargs, 2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src = [_ndim(s, n) for s in src]
    dst = [_ndim(s, n) for s in dst]
    perm: List[Optional[int]] = [None] * n
    for s, t in zip(src, dst):
        perm[t] = s
    rest = iter(d for d in range(n) if d not in src)
    return [p if p is not None else next(rest) for p in perm]


_permute_rule = _reorder_rule(_permute_perm)
_transpose_rule = _reorder_rule(_transpose_perm)
_prop_T = _reorder_rule(_property_T_perm)
_movedim_rule = _reorder_rule(_movedim_perm)


def _expand_rule(L, func, args, kwargs, result):
    """expand / broadcast_to / repeat / tile: the tagged dim must come out once, unbroadcast, unrepeated."""
    x, tg = _first_tag(L, args, kwargs)
    if not _is_sample(tg) or not (op_name(func) == "expand_as" or _only_first(L, args, kwargs, x)):
        return MIXED
    d, r = tg
    od = d + result.dim() - x.dim()
    return (od, r) if 0 <= od < result.dim() and result.shape[od] == x.shape[d] else MIXED


def _repeat_interleave_rule(L, func, args, kwargs, result):
    x, tg = _first_tag(L, args, kwargs)
    if not _is_sample(tg):
        return MIXED
    repeats = _arg(args, kwargs, 1, "repeats")
    dim = _arg(args, kwargs, 2, "dim")
    d, r = tg
    if dim is None:
        if x.dim() != 1:
            return MIXED
        dim = 0
    dim = _ndim(dim, x.dim())
    if dim != d:
        return tg if (not isinstance(repeats, torch.Tensor) or L.tag(repeats) is None) else MIXED
    if isinstance(repeats, bool) or not isinstance(repeats, int):
        return MIXED
    return (d, r * repeats) if repeats > 0 else MIXED


def _cat_rule(L, func, args, kwargs, result):
    seq = args[0] if args else kwargs["tensors"]
    dim = _arg(args, kwargs, 1, "dim", kwargs.get("axis", 0))
    seq = [t for t in seq if isinstance(t, torch.Tensor)]
    dim = _ndim(dim, result.dim())
    # concatenating along the samples' dim would interleave them; along another dim keeps them apart
    return L.agree(seq, lambda i, t, tg: MIXED if t.dim() != result.dim() or tg[0] == dim else tg)


def _stack_rule(L, func, args, kwargs, result):
    seq = args[0] if args else kwargs["tensors"]
    dim = _ndim(_arg(args, kwargs, 1, "dim", 0), result.dim())
    return L.agree(seq, lambda i, t, tg: (tg[0] if tg[0] < dim else tg[0] + 1, tg[1]))


def _split_rule(L, func, args, kwargs, result):
    x, tg = _first_tag(L, args, kwargs, "tensor" if "tensor" in kwargs else "input")
    n_out = _n_outputs(result)
    if not _is_sample(tg):
        return [MIXED] * n_out
    name = op_name(func)
    if name == "unbind":
        dim = _ndim(_arg(args, kwargs, 1, "dim", 0), x.dim())
        d, r = tg
        return [MIXED if dim == d else (d - (dim < d), r)] * n_out
    dim = _ndim(_arg(args, kwargs, 2, "dim", 0), x.dim())
    return [MIXED if dim == tg[0] else tg] * n_out


def _narrow_rule(L, func, args, kwargs, result):
    x, tg = _first_tag(L, args, kwargs)
    if not _is_sample(tg):
        return MIXED
    dim = _ndim(_arg(args, kwargs, 1, "dim"), x.dim())
    start = _arg(args, kwargs, 2, "start")
    if dim == tg[0]:
        return tg if (isinstance(start, int) and start == 0) else MIXED
    return tg


def _select_rule(L, func, args, kwargs, result):
    x, tg = _first_tag(L, args, kwargs)
    if not _is_sample(tg):
        return MIXED
    dim = _ndim(_arg(args, kwargs, 1, "dim"), x.dim())
    d, r = tg
    if dim == d:
        return MIXED
    return (d - (dim < d), r)


def _index_select_rule(L, func, args, kwargs, result):
    x = args[0] if args else kwargs["input"]
    dim = _ndim(_arg(args, kwargs, 1, "dim"), x.dim())
    index = _arg(args, kwargs, 2, "index")
    xt, it = L.tag(x), L.tag(index)
    if xt is None and _is_sample(it) and index.dim() == 1:
        return (dim, it[1])  # rows of a constant table picked by labelled indices
    if _is_sample(xt) and it is None and xt[0] != dim:
        return xt
    return MIXED


def _gather_rule(L, func, args, kwargs, result):
    x = args[0] if args else kwargs["input"]
    dim = _ndim(_arg(args, kwargs, 1, "dim"), x.dim())
    index = _arg(args, kwargs, 2, "index")

    def place(i, t, tg):
        d = tg[0]
        if t is x and (d == dim or index.shape[d] != x.shape[d]):
            return MIXED  # gathering along the samples' dim, or from a broadcast one
        return tg
    return L.agree((x, index), place)


def _flip_rule(L, func, args, kwargs, result):
    x, tg = _first_tag(L, args, kwargs)
    if not _is_sample(tg):
        return MIXED
    name = op_name(func)
    n = x.dim()
    if name == "fliplr":
        dims = [1]
    elif name == "flipud":
        dims = [0]
    elif name == "roll":
        dims = _arg(args, kwargs, 2, "dims")
        if dims is None:
            return MIXED
    elif name == "rot90":
        dims = _arg(args, kwargs, 2, "dims", [0, 1])
    else:
        dims = args[1:] if len(args) > 1 else kwargs["dims"]
        if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
            dims = dims[0]
    dims = [dims] if isinstance(dims, int) else list(dims)
    return MIXED if tg[0] in [_ndim(d, n) for d in dims] else tg


def _pad_rule(L, func, args, kwargs, result):
    x, tg = _first_tag(L, args, kwargs)
    if not _is_sample(tg) or not _only_first(L, args, kwargs, x):
        return MIXED
    pad = list(_arg(args, kwargs, 1, "pad"))
    d = tg[0]
    k = x.dim() - 1 - d  # position of d counted from the last dim
    if 2 * k + 1 < len(pad) and (pad[2 * k] != 0 or pad[2 * k + 1] != 0):
        return MIXED
    return tg if result.dim() == x.dim() else MIXED


def _leading_rule(keep: int):
    """Ops that act on the last dims and keep the first `keep` dims (channels included) separate."""
    def rule(L, func, args, kwargs, result):
        x, tg = _first_tag(L, args, kwargs)
        if not _is_sample(tg) or not _only_first(L, args, kwargs, x):
            return MIXED
        return tg if tg[0] < keep and result.dim() == x.dim() else MIXED
    return rule


def _spatial_rule(spatial: int):
    """Pooling over the last `spatial` dims: the other dims stay separate."""
    def rule(L, func, args, kwargs, result):
        x, tg = _first_tag(L, args, kwargs)
        if not _is_sample(tg) or not _only_first(L, args, kwargs, x):
            return [MIXED] * _n_outputs(result)
        ok = tg[0] < x.dim() - spatial
        outs = [result] if isinstance(result, torch.Tensor) else [o for o in result if isinstance(o, torch.Tensor)]
        return [tg if ok and o.dim() == x.dim() else MIXED for o in outs]
    return rule


def _batch_only(L, func, args, kwargs, result):
    """Ops that treat dim 0 of a batched input as independent items and mix everything else
    (convolutions, unfold / fold, group_norm, channel_shuffle, local_response_norm)."""
    x, tg = _first_tag(L, args, kwargs)
    if not _is_sample(tg) or not _only_first(L, args, kwargs, x):
        return MIXED
    name = op_name(func)
    if name == "unfold" and func is not F.unfold:
        return _tensor_unfold(L, x, tg, args, kwargs)
    if name.startswith("conv"):
        weight = _arg(args, kwargs, 1, "weight")
        if not isinstance(weight, torch.Tensor) or x.dim() != weight.dim():
            return MIXED  # an unbatched input: dim 0 is the channels
    elif name == "unfold" and x.dim() != 4 or name == "fold" and x.dim() != 3:
        return MIXED  # unbatched
    if x.dim() < 2 or result.dim() < 1:
        return MIXED
    return tg if tg[0] == 0 and result.shape[0] == x.shape[0] else MIXED


def _tensor_unfold(L, x, tg, args, kwargs):
    dim = _ndim(_arg(args, kwargs, 1, "dimension"), x.dim())
    return MIXED if dim == tg[0] else tg


def _linear_rule(L, func, args, kwargs, result):
    x, tg = _first_tag(L, args, kwargs)
    if not _is_sample(tg) or not _only_first(L, args, kwargs, x):
        return MIXED
    return tg if x.dim() >= 2 and tg[0] < x.dim() - 1 else MIXED


def _group_norm_rule(L, func, args, kwargs, result):
    return _batch_only(L, func, args, kwargs, result)


def _layer_norm_rule(L, func, args, kwargs, result):
    x, tg = _first_tag(L, args, kwargs)
    if not _is_sample(tg) or not _only_first(L, args, kwargs, x):
        return MIXED
    ns = _arg(args, kwargs, 1, "normalized_shape")
    k = 1 if isinstance(ns, int) else len(ns)
    return tg if tg[0] < x.dim() - k else MIXED


def _batch_norm_rule(L, func, args, kwargs, result):
    if func is not F.batch_norm:  # torch.batch_norm orders its arguments differently
        return MIXED
    x, tg = _first_tag(L, args, kwargs)
    if not _is_sample(tg) or not _only_first(L, args, kwargs, x):
        return MIXED
    running_mean = _arg(args, kwargs, 1, "running_mean")
    training = _arg(args, kwargs, 5, "training", False)
    if training or running_mean is None:  # batch statistics: per channel, over every other dim
        return tg if tg[0] == 1 else MIXED
    return tg  # running statistics: an elementwise affine map per channel


def _instance_norm_rule(L, func, args, kwargs, result):
    x, tg = _first_tag(L, args, kwargs)
    if not _is_sample(tg) or not _only_first(L, args, kwargs, x):
        return MIXED
    use_input_stats = _arg(args, kwargs, 5, "use_input_stats", True)
    return tg if (not use_input_stats or tg[0] < 2) else MIXED


def _embedding_rule(L, func, args, kwargs, result):
    """F.embedding(indices, weight) / F.one_hot(indices): an output row per index, from constants."""
    idx = args[0] if args else kwargs["input"]
    tg = L.tag(idx)
    if idx.is_floating_point() or not _is_sample(tg) or not _only_first(L, args, kwargs, idx):
        return MIXED
    return tg if result.dim() == idx.dim() + 1 else MIXED


def _prelu_rule(L, func, args, kwargs, result):
    x, tg = _first_tag(L, args, kwargs)
    if not _is_sample(tg) or not _only_first(L, args, kwargs, x):
        return MIXED
    return tg  # elementwise with a per-channel constant slope


def _matmul_tags(L, a, b, out: torch.Tensor):
    """Output tag of a @ b (torch.matmul broadcasting), or MIXED. out = batch + [rows of a] + [cols of b]."""
    na, nb, no = a.dim(), b.dim(), out.dim()
    nbatch = no - (na >= 2) - (nb >= 2)

    def place(i, t, tg):
        d, r = tg
        n, is_a = t.dim(), i == 0
        if n == 1 or (is_a and d == n - 1) or (not is_a and d == n - 2):
            return MIXED  # the contracted dim
        if is_a and d == n - 2:
            od = nbatch
        elif not is_a and d == n - 1:
            od = no - 1
        else:
            od = d + nbatch - (n - 2)
        if not 0 <= od < no or out.shape[od] != t.shape[d]:
            return MIXED  # a broadcast batch dim
        return (od, r)
    return L.agree((a, b), place)


def _matmul_rule(L, func, args, kwargs, result):
    name = op_name(func)
    a = args[0] if args else kwargs["input"]
    b = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2", kwargs.get("vec")))
    if name == "__rmatmul__":
        a, b = b, a
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return MIXED
    return _matmul_tags(L, a, b, result)


def _outer_rule(L, func, args, kwargs, result):
    # a's samples become the rows, b's the columns: both tagged land on different dims, i.e. MIXED
    return L.agree(args[:2], lambda i, t, tg: (i, tg[1]))


def _addmm_like(L, func, args, kwargs, result):
    """baddbmm / addmm / addmv: beta * input + alpha * (m1 @ m2)."""
    inp = args[0] if args else kwargs["input"]
    m1 = args[1] if len(args) > 1 else kwargs.get("batch1", kwargs.get("mat1", kwargs.get("mat")))
    m2 = args[2] if len(args) > 2 else kwargs.get("batch2", kwargs.get("mat2", kwargs.get("vec")))
    prod = _matmul_tags(L, m1, m2, result)
    if prod is MIXED:
        return MIXED
    it = L.align([inp], result.shape)
    if it is MIXED:
        return MIXED
    if prod is not None and it is not None and prod != it:
        return MIXED
    return prod if prod is not None else it


def _einsum_rule(L, func, args, kwargs, result):
    eq = args[0]
    ops = list(args[1:])
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or "..." in eq:
        return MIXED
    eq = eq.replace(" ", "")
    if "->" in eq:
        lhs, out = eq.split("->")
    else:
        lhs = eq
        letters = lhs.replace(",", "")
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    terms = lhs.split(",")
    if len(terms) != len(ops):
        return MIXED
    letter, group = None, None
    for term, t in zip(terms, ops):
        tg = L.tag(t) if isinstance(t, torch.Tensor) else None
        if tg is None:
            continue
        if tg is MIXED or len(term) != t.dim():
            return MIXED
        c = term[tg[0]]
        if letter is None:
            letter, group = c, tg[1]
        elif (letter, group) != (c, tg[1]):
            return MIXED
    if letter is None:
        return None
    if letter not in out:
        return MIXED
    return (out.index(letter), group)


def _reduce_rule(dim_pos: int, default=None):
    """sum/mean/amax/var/...: the tagged dim must not be reduced."""
    def rule(L, func, args, kwargs, result):
        x, tg = _first_tag(L, args, kwargs)
        name = op_name(func)
        if name in ("max", "min") and len(args) > 1 and isinstance(args[1], torch.Tensor):
            return L.align(args[:2], result.shape)
        n_out = _n_outputs(result)
        if not _is_sample(tg) or not _only_first(L, args, kwargs, x):
            return [MIXED] * n_out
        dim = _arg(args, kwargs, dim_pos, "dim", kwargs.get("axis", default))
        if isinstance(dim, bool):
            dim = None
        n = x.dim()
        if dim is None:
            return [MIXED] * n_out
        dims = [dim] if isinstance(dim, int) else list(dim)
        if not dims:
            return [MIXED] * n_out  # dim=() reduces everything
        dims = {_ndim(d, n) for d in dims}
        d, r = tg
        if d in dims:
            return [MIXED] * n_out
        outs = [result] if isinstance(result, torch.Tensor) else [o for o in result if isinstance(o, torch.Tensor)]
        res = []
        for o in outs:
            if o.dim() == n:
                res.append(tg)  # keepdim
            elif o.dim() == n - len(dims):
                res.append((d - sum(1 for k in dims if k < d), r))
            else:
                res.append(MIXED)
        return res
    return rule


def _along_rule(dim_pos: int, default=None):
    """softmax/cumsum/sort/topk/normalize/...: an op along one dim that keeps the others separate."""
    def rule(L, func, args, kwargs, result):
        x, tg = _first_tag(L, args, kwargs)
        n_out = _n_outputs(result)
        if not _is_sample(tg) or not _only_first(L, args, kwargs, x):
            return [MIXED] * n_out
        dim = _arg(args, kwargs, dim_pos, "dim", default)
        n = x.dim()
        if dim is None:  # softmax's legacy implicit dim
            dim = 0 if n in (0, 1, 3) else 1
        dim = _ndim(dim, n)
        outs = [result] if isinstance(result, torch.Tensor) else [o for o in result if isinstance(o, torch.Tensor)]
        return [MIXED if (dim == tg[0] or o.dim() != n) else tg for o in outs]
    return rule


def _kthvalue_rule(L, func, args, kwargs, result):
    return _reduce_rule(2, -1)(L, func, args, kwargs, result)


def _loss_rule(L, func, args, kwargs, result):
    """Elementwise losses (mse_loss, l1_loss, ...): 'none' is elementwise, anything else reduces all."""
    if kwargs.get("reduction") != "none":
        return MIXED
    tensors: list = []
    tensors_in(args, tensors)
    tensors_in(kwargs, tensors)
    return L.align(tensors, result.shape)


def _cross_entropy_rule(L, func, args, kwargs, result):
    """cross_entropy / nll_loss with reduction='none': input [N, C, *], target [N, *] or [N, C, *]."""
    if kwargs.get("reduction") != "none":
        return MIXED
    inp = args[0] if args else kwargs["input"]
    target = args[1] if len(args) > 1 else kwargs["target"]
    if inp.dim() < 2:
        return MIXED  # unbatched: dim 0 is the classes
    weight = kwargs.get("weight", args[2] if len(args) > 2 else None)
    if isinstance(weight, torch.Tensor) and L.tag(weight) is not None:
        return MIXED

    def place(i, t, tg):
        d, r = tg
        if t.dim() == inp.dim():  # the input, or a class-probability target
            return MIXED if d == 1 else (0 if d == 0 else d - 1, r)
        return tg  # class indices [N, *]: the output's own layout
    return L.agree((inp, target), place)


def _sdpa_rule(L, func, args, kwargs, result):
    q = args[0] if args else kwargs["query"]
    k = args[1] if len(args) > 1 else kwargs["key"]
    v = args[2] if len(args) > 2 else kwargs["value"]
    mask = args[3] if len(args) > 3 else kwargs.get("attn_mask")
    gqa = bool(kwargs.get("enable_gqa", False))
    n = result.dim()
    kv_const = L.tag(k) is None and L.tag(v) is None and (mask is None or L.tag(mask) is None)

    def place(i, t, tg):
        d, r = tg
        if t is q and d == q.dim() - 2 and kv_const:
            return (n - 2, r)  # query rows attend independently
        if d < t.dim() - 2 and not (gqa and d == t.dim() - 3):
            od = d + n - t.dim()
            return (od, r) if result.shape[od] == t.shape[d] else MIXED
        return MIXED
    return L.agree((q, k, v, mask), place)


def _mha_rule(L, func, args, kwargs, result):
    """F.multi_head_attention_forward, batched sequence-first query [L, N, E]: dim 1 is the batch."""
    q, k, v = args[0], args[1], args[2]
    n_out = _n_outputs(result)
    if q.dim() != 3:
        return [MIXED] * n_out
    padding = kwargs.get("key_padding_mask")

    def place(i, t, tg):  # the group of the samples' dim: 1 of q, k, v; 0 of the padding mask
        return tg[1] if tg[0] == (0 if t is padding else 1) else MIXED
    res = L.agree((q, k, v, padding), place)
    if res is MIXED:
        return [MIXED] * n_out
    # every other tensor (projections, attn_mask, static keys) must be constant
    others: list = []
    tensors_in(args[3:], others)
    tensors_in({kk: vv for kk, vv in kwargs.items() if kk != "key_padding_mask"}, others)
    if not L.all_const(others) or res is None:
        return [MIXED] * n_out
    tags = [(1, res)]
    if n_out > 1:
        tags.append((0, res))  # attention weights [N, L, S]
    return tags


def _broadcast_tensors_rule(L, func, args, kwargs, result):
    ts = list(args[0]) if len(args) == 1 and isinstance(args[0], (list, tuple)) else list(args)
    return [L.align([t], o.shape) for t, o in zip(ts, result)]


def _dc_rule(L, func, args, kwargs, result):
    """cdgfast::dc_errors / dc_scores: pred [B, K, *S], eps [B, *S] -> [B, K]; separate per row of dim 0."""
    pred, eps = args[0], args[1]
    res = L.agree((pred, eps), lambda i, t, tg: tg if tg[0] == 0 else MIXED)
    if res is MIXED:
        return MIXED
    rest: list = []
    tensors_in(args[2:], rest)
    tensors_in(kwargs, rest)
    if not L.all_const(rest):
        return MIXED
    return res if res is None or result.shape[0] == pred.shape[0] else MIXED


def _cosine_rule(dim_pos: int, default: int):
    def rule(L, func, args, kwargs, result):
        x1, x2 = args[0], args[1]
        shape = torch.broadcast_shapes(x1.shape, x2.shape)
        tg = L.align([x1, x2], shape)
        if not _is_sample(tg):
            return tg
        dim = _ndim(_arg(args, kwargs, dim_pos, "dim", default), len(shape))
        if dim == tg[0]:
            return MIXED
        if result.dim() == len(shape):
            return tg
        return (tg[0] - (dim < tg[0]), tg[1])
    return rule


def _getitem_tag(L, x, index, out_shape) -> Tag:
    """x[index]: basic indexing (ints, slices, None, Ellipsis) and one advanced index."""
    if not isinstance(index, tuple):
        index = (index,)
    xt = L.tag(x)
    advanced = [i for i in index if isinstance(i, (torch.Tensor, list)) or (
        not isinstance(i, (int, slice, type(None), type(Ellipsis))))]
    if any(isinstance(i, bool) for i in index):
        return MIXED if xt is not None else None
    if advanced:
        if len(advanced) != 1 or not isinstance(advanced[0], torch.Tensor):
            return MIXED if not (xt is None and all(
                not isinstance(i, torch.Tensor) or L.tag(i) is None for i in index)) else None
        idx = advanced[0]
        it = L.tag(idx)
        pos = next(p for p, i in enumerate(index) if i is idx)
        before = index[:pos]
        if any(i is Ellipsis or i is None or not (isinstance(i, slice) and i == slice(None)) for i in before):
            return MIXED if (xt is not None or it is not None) else None
        if idx.dtype == torch.bool:
            if idx.dim() != 1 or it is not None:
                return MIXED if (xt is not None or it is not None) else None
            idx_shape: Tuple[int, ...] = (int(out_shape[pos]) if len(out_shape) > pos else -1,)
        else:
            idx_shape = tuple(idx.shape)
        after = index[pos + 1:]
        if any(not ((isinstance(i, slice) and i == slice(None)) or i is Ellipsis) for i in after):
            return MIXED if (xt is not None or it is not None) else None
        if xt is None and _is_sample(it):
            d, r = it
            return (pos + d, r) if tuple(out_shape[pos:pos + len(idx_shape)]) == idx_shape else MIXED
        if _is_sample(xt) and it is None:
            d, r = xt
            if d == pos:
                return MIXED
            nd = d if d < pos else d - 1 + len(idx_shape)
            return (nd, r) if nd < len(out_shape) and out_shape[nd] == x.shape[d] else MIXED
        return MIXED if (xt is not None or it is not None) else None
    if not _is_sample(xt):
        return xt
    d, r = xt
    consumed = sum(1 for i in index if isinstance(i, (int, slice)))
    in_dim = out_dim = 0
    new_d = None
    for i in index:
        if i is None:
            out_dim += 1
        elif i is Ellipsis:
            k = x.dim() - consumed
            if in_dim <= d < in_dim + k:
                new_d = out_dim + d - in_dim
            in_dim += k
            out_dim += k
        elif isinstance(i, int):
            if in_dim == d:
                return MIXED
            in_dim += 1
        else:  # slice
            if in_dim == d:
                if i.start not in (None, 0) or i.step not in (None, 1):
                    return MIXED
                new_d = out_dim
            in_dim += 1
            out_dim += 1
    if new_d is None:
        if d < in_dim:
            return MIXED
        new_d = out_dim + d - in_dim
    return (new_d, r)


def _getitem_rule(L, func, args, kwargs, result):
    return _getitem_tag(L, args[0], args[1], result.shape)


_RULES: Dict[str, Callable] = {}
for _n in _RESHAPE:
    _RULES[_n] = _reshape_rule
_RULES.update({
    "permute": _permute_rule, "transpose": _transpose_rule, "swapaxes": _transpose_rule,
    "swapdims": _transpose_rule, "t": _transpose_rule, "get:T": _prop_T, "get:H": _prop_T,
    "get:mT": _prop_T, "get:mH": _prop_T, "adjoint": _prop_T,
    "movedim": _movedim_rule, "moveaxis": _movedim_rule,
    "expand": _expand_rule, "expand_as": _expand_rule, "broadcast_to": _expand_rule,
    "repeat": _expand_rule, "tile": _expand_rule,  # a tagged dim repeated more than once is MIXED
    "repeat_interleave": _repeat_interleave_rule,
    "cat": _cat_rule, "concat": _cat_rule, "concatenate": _cat_rule, "stack": _stack_rule,
    "split": _split_rule, "split_with_sizes": _split_rule, "chunk": _split_rule, "tensor_split": _split_rule,
    "unbind": _split_rule,
    "narrow": _narrow_rule, "select": _select_rule, "index_select": _index_select_rule, "gather": _gather_rule,
    "flip": _flip_rule, "fliplr": _flip_rule, "flipud": _flip_rule, "roll": _flip_rule, "rot90": _flip_rule,
    "pad": _pad_rule,
    "interpolate": _leading_rule(2), "upsample": _leading_rule(2), "upsample_nearest": _leading_rule(2),
    "upsample_bilinear": _leading_rule(2),
    "conv1d": _batch_only, "conv2d": _batch_only, "conv3d": _batch_only, "conv_transpose1d": _batch_only,
    "conv_transpose2d": _batch_only, "conv_transpose3d": _batch_only, "unfold": _batch_only, "fold": _batch_only,
    "channel_shuffle": _batch_only, "local_response_norm": _batch_only,
    "linear": _linear_rule, "group_norm": _group_norm_rule, "layer_norm": _layer_norm_rule,
    "rms_norm": _layer_norm_rule, "batch_norm": _batch_norm_rule, "instance_norm": _instance_norm_rule,
    "embedding": _embedding_rule, "one_hot": _embedding_rule, "prelu": _prelu_rule,
    "matmul": _matmul_rule, "__matmul__": _matmul_rule, "__rmatmul__": _matmul_rule, "mm": _matmul_rule,
    "bmm": _matmul_rule, "mv": _matmul_rule, "outer": _outer_rule, "ger": _outer_rule,
    "baddbmm": _addmm_like, "addmm": _addmm_like, "addmv": _addmm_like,
    "einsum": _einsum_rule,
    "sum": _reduce_rule(1), "nansum": _reduce_rule(1), "mean": _reduce_rule(1), "nanmean": _reduce_rule(1),
    "amax": _reduce_rule(1), "amin": _reduce_rule(1), "prod": _reduce_rule(1), "logsumexp": _reduce_rule(1),
    "var": _reduce_rule(1), "std": _reduce_rule(1), "var_mean": _reduce_rule(1), "std_mean": _reduce_rule(1),
    "count_nonzero": _reduce_rule(1), "all": _reduce_rule(1), "any": _reduce_rule(1),
    "argmax": _reduce_rule(1), "argmin": _reduce_rule(1), "max": _reduce_rule(1), "min": _reduce_rule(1),
    "median": _reduce_rule(1), "nanmedian": _reduce_rule(1), "mode": _reduce_rule(1, -1),
    "norm": _reduce_rule(2), "vector_norm": _reduce_rule(2), "linalg_vector_norm": _reduce_rule(2),
    "kthvalue": _kthvalue_rule,
    "softmax": _along_rule(1), "log_softmax": _along_rule(1), "softmin": _along_rule(1),
    "cumsum": _along_rule(1), "cumprod": _along_rule(1), "logcumsumexp": _along_rule(1),
    "cummax": _along_rule(1), "cummin": _along_rule(1), "sort": _along_rule(1, -1),
    "argsort": _along_rule(1, -1), "topk": _along_rule(2, -1), "normalize": _along_rule(2, 1),
    "glu": _along_rule(1, -1), "diff": _along_rule(2, -1),
    "cosine_similarity": _cosine_rule(2, 1),
    "mse_loss": _loss_rule, "l1_loss": _loss_rule, "smooth_l1_loss": _loss_rule, "huber_loss": _loss_rule,
    "binary_cross_entropy": _loss_rule, "binary_cross_entropy_with_logits": _loss_rule,
    "soft_margin_loss": _loss_rule,
    "cross_entropy": _cross_entropy_rule, "nll_loss": _cross_entropy_rule,
    "scaled_dot_product_attention": _sdpa_rule, "multi_head_attention_forward": _mha_rule,
    "broadcast_tensors": _broadcast_tensors_rule,
    "cdgfast::dc_errors": _dc_rule, "cdgfast::dc_scores": _dc_rule,
    "__getitem__": _getitem_rule,
})
for _k in (1, 2, 3):
    for _p in ("avg_pool", "max_pool", "adaptive_avg_pool", "adaptive_max_pool", "lp_pool"):
        _RULES[f"{_p}{_k}d"] = _spatial_rule(_k)
        _RULES[f"{_p}{_k}d_with_indices"] = _spatial_rule(_k)


def _pixel_shuffle_rule(L, func, args, kwargs, result):
    x, tg = _first_tag(L, args, kwargs)
    if not _is_sample(tg) or not _only_first(L, args, kwargs, x):
        return MIXED
    return tg if tg[0] < x.dim() - 3 else MIXED


_RULES["pixel_shuffle"] = _pixel_shuffle_rule
_RULES["pixel_unshuffle"] = _pixel_shuffle_rule

__all__ = ["MIXED", "SampleLayout", "op_name", "tensors_in"]
