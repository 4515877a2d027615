"""cdgfast.fisher._layout: the sample-layout proof behind the hook path.

Every rule claims that label k of its output depends only on label k of its tagged inputs. Each case
below runs an op under `SampleLayout` with hand-set input tags and checks the claimed output tag, and,
where the claim is a layout, checks it against the float64 Jacobian: every entry that links
different labels must be exactly zero. Cases that mix labels must come out MIXED.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cdgfast.fisher._layout import MIXED, SampleLayout


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed + sum(shape))
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def _labels(n: int, group: int) -> torch.Tensor:
    return torch.arange(n) // group


def assert_separable(fn, inputs, in_tags, out_tag):
    """d out[label k] / d in[label j] == 0 for j != k, for every tagged floating input."""
    out_dim, out_group = out_tag
    for i, (x, tg) in enumerate(zip(inputs, in_tags)):
        if tg is None or not x.is_floating_point():
            continue

        def f(v, i=i):
            args = list(inputs)
            args[i] = v
            return fn(*args)

        J = torch.autograd.functional.jacobian(f, x.detach())  # out.shape + x.shape
        out = fn(*inputs)
        J = J.movedim(out_dim, 0).movedim(out.dim() + tg[0], 1)  # [out_rows, in_rows, ...]
        lo = _labels(J.shape[0], out_group)
        li = _labels(J.shape[1], tg[1])
        cross = lo[:, None] != li[None, :]
        assert J.abs().flatten(2).amax(-1)[cross].max().item() == 0.0 if cross.any() else True, \
            f"input {i}: the claimed layout {out_tag} links different labels"
        assert J.abs().sum() > 0  # the case differentiates something


def run(fn, inputs, in_tags):
    L = SampleLayout()
    leaves = [x.clone().requires_grad_(x.is_floating_point()) for x in inputs]
    for x, tg in zip(leaves, in_tags):
        if tg is not None:
            L.set(x, tg)
    with L:
        out = fn(*leaves)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    return [L.tag(o) for o in outs if isinstance(o, torch.Tensor)], L


# (name, fn, inputs, input tags, expected tag of the (first) output)
x43 = _rand(4, 3)
x435 = _rand(4, 3, 5)
x345 = _rand(3, 4, 5)
SEPARABLE = [
    ("pointwise broadcast", lambda a, b: torch.tanh(a) * b + 1, [x43, _rand(3)], [(0, 1), None], (0, 1)),
    ("pointwise aligned", lambda a, b: a - b, [x43, _rand(4, 3, seed=1)], [(0, 1), (0, 1)], (0, 1)),
    ("unsqueeze broadcast", lambda a, b: a[:, None, :] * b, [x43, _rand(5, 3)], [(0, 1), None], (0, 1)),
    ("view merge", lambda a: a.view(12, 5), [x345], [(1, 1)], None),  # MIXED: outer dim merged
    ("view merge trailing", lambda a: a.reshape(3, 20), [x345], [(1, 1)], (1, 5)),
    ("flatten groups", lambda a: a.flatten(0, 1), [x435], [(0, 1)], (0, 3)),
    ("view ungroup", lambda a: a.view(2, 6, 5), [_rand(12, 5)], [(0, 6)], (0, 1)),
    ("view regroup", lambda a: a.view(6, 10), [_rand(12, 5)], [(0, 4)], (0, 2)),
    ("view regroup across labels", lambda a: a.view(6, 10), [_rand(12, 5)], [(0, 3)], None),
    ("reshape then transpose", lambda a: a.reshape(6, 2).t(), [_rand(2, 6)], [(0, 1)], (1, 3)),
    ("view ungroup exact", lambda a: a.view(4, 3, 5), [_rand(12, 5)], [(0, 3)], (0, 1)),
    ("unflatten", lambda a: a.unflatten(1, (5, 3)), [x435.flatten(1)], [(0, 1)], (0, 1)),
    ("permute", lambda a: a.permute(2, 0, 1), [x435], [(0, 1)], (1, 1)),
    ("transpose", lambda a: a.transpose(0, 1).contiguous(), [x345], [(1, 1)], (0, 1)),
    ("movedim", lambda a: a.movedim(0, -1), [x435], [(0, 1)], (2, 1)),
    ("T", lambda a: a.T, [x43], [(0, 1)], (1, 1)),
    ("mT", lambda a: a.mT, [x435], [(1, 1)], (2, 1)),
    ("expand", lambda a: a[:, :, None].expand(4, 3, 2), [x43], [(0, 1)], (0, 1)),
    ("repeat other dim", lambda a: a.repeat(1, 2), [x43], [(0, 1)], (0, 1)),
    ("repeat_interleave", lambda a: a.repeat_interleave(3, dim=0), [x43], [(0, 1)], (0, 3)),
    ("repeat_interleave other", lambda a: a.repeat_interleave(2, dim=1), [x43], [(0, 1)], (0, 1)),
    ("cat", lambda a, b: torch.cat([a, b], dim=1), [x43, _rand(4, 2)], [(0, 1), None], (0, 1)),
    ("stack", lambda a, b: torch.stack([a, b], dim=0), [x43, _rand(4, 3, seed=2)], [(0, 1), (0, 1)], (1, 1)),
    ("chunk", lambda a: a.chunk(3, dim=1)[1], [x435], [(0, 1)], (0, 1)),
    ("getitem slices", lambda a: a[:, 1:, None, ::2], [x435], [(0, 1)], (0, 1)),
    ("getitem prefix", lambda a: a[:3], [x43], [(0, 2)], (0, 2)),
    ("getitem ellipsis", lambda a: a[..., 0], [x345], [(1, 1)], (1, 1)),
    ("getitem int other", lambda a: a[1], [x345], [(1, 1)], (0, 1)),
    ("getitem table", lambda tab, i: tab[i], [_rand(7, 3), torch.tensor([3, 0, 6, 3])], [None, (0, 1)], (0, 1)),
    ("getitem const index", lambda a, i: a[:, i], [x43, torch.tensor([2, 0])], [(0, 1), None], (0, 1)),
    ("index_select", lambda a: a.index_select(1, torch.tensor([2, 2, 0])), [x43], [(0, 1)], (0, 1)),
    ("sum keep", lambda a: a.sum(dim=(1, 2), keepdim=True), [x435], [(0, 1)], (0, 1)),
    ("mean drop", lambda a: a.mean(0), [x345], [(1, 1)], (0, 1)),
    ("amax", lambda a: a.amax(-1), [x435], [(0, 1)], (0, 1)),
    ("max dim", lambda a: a.max(dim=2).values, [x435], [(0, 1)], (0, 1)),
    ("var", lambda a: a.var(1), [x435], [(0, 1)], (0, 1)),
    ("norm", lambda a: a.norm(dim=2), [x435], [(0, 1)], (0, 1)),
    ("logsumexp", lambda a: a.logsumexp(0), [x345], [(1, 1)], (0, 1)),
    ("softmax", lambda a: a.softmax(dim=-1), [x435], [(0, 1)], (0, 1)),
    ("log_softmax", lambda a: F.log_softmax(a, dim=0), [x345], [(1, 1)], (1, 1)),
    ("cumsum", lambda a: a.cumsum(1), [x43], [(0, 1)], (0, 1)),
    ("linear", lambda a, w: F.linear(a, w), [x345, _rand(2, 5)], [(1, 1), None], (1, 1)),
    ("conv2d", lambda a, w: F.conv2d(a, w, padding=1), [_rand(3, 2, 4, 5), _rand(4, 2, 3, 3)], [(0, 1), None],
     (0, 1)),
    ("conv2d grouped rows", lambda a, w: F.conv2d(a, w, stride=2), [_rand(4, 2, 5, 5), _rand(3, 2, 3, 3)],
     [(0, 2), None], (0, 2)),
    ("unfold", lambda a: F.unfold(a, 2), [_rand(3, 2, 4, 4)], [(0, 1)], (0, 1)),
    ("group_norm", lambda a: F.group_norm(a, 2), [_rand(3, 4, 2, 2)], [(0, 1)], (0, 1)),
    ("layer_norm", lambda a: F.layer_norm(a, (5,)), [x345], [(1, 1)], (1, 1)),
    ("batch_norm eval", lambda a: F.batch_norm(a, torch.zeros(3, dtype=a.dtype), torch.ones(3, dtype=a.dtype)),
     [x435], [(0, 1)], (0, 1)),
    ("instance_norm", lambda a: F.instance_norm(a), [x435], [(0, 1)], (0, 1)),
    ("interpolate", lambda a: F.interpolate(a, scale_factor=2.0), [_rand(3, 2, 2, 2)], [(0, 1)], (0, 1)),
    ("pad", lambda a: F.pad(a, (1, 2)), [x435], [(0, 1)], (0, 1)),
    ("pad reflect", lambda a: F.pad(a, (1, 1, 1, 1), mode="reflect"), [_rand(3, 2, 3, 3)], [(0, 1)], (0, 1)),
    ("avg_pool2d", lambda a: F.avg_pool2d(a, 2), [_rand(3, 2, 4, 4)], [(0, 1)], (0, 1)),
    ("adaptive_avg_pool2d", lambda a: F.adaptive_avg_pool2d(a, 1), [_rand(3, 2, 4, 4)], [(0, 1)], (0, 1)),
    ("embedding", lambda i, w: F.embedding(i, w), [torch.tensor([[1, 2], [0, 1], [3, 3]]), _rand(4, 5)],
     [(0, 1), None], (0, 1)),
    ("dropout eval", lambda a: F.dropout(a, 0.5, training=False), [x43], [(0, 1)], (0, 1)),
    ("matmul rows", lambda a, b: a @ b, [x43, _rand(3, 2)], [(0, 1), None], (0, 1)),
    ("matmul batch", lambda a, b: a @ b, [x345, _rand(5, 2)], [(0, 1), None], (0, 1)),
    ("matmul cols", lambda a, b: a @ b, [_rand(2, 4), x345], [None, (2, 1)], (2, 1)),
    ("bmm", lambda a, b: torch.bmm(a, b), [x435, _rand(4, 5, 2)], [(0, 1), (0, 1)], (0, 1)),
    ("baddbmm", lambda c, a, b: torch.baddbmm(c, a, b), [_rand(4, 3, 2), x435, _rand(4, 5, 2)],
     [(0, 1), (0, 1), None], (0, 1)),
    ("einsum", lambda a, b: torch.einsum("btc,dc->tbd", a, b), [x435, _rand(2, 5)], [(0, 1), None], (1, 1)),
    ("einsum diag", lambda a: torch.einsum("bb->b", a), [_rand(4, 4)], [(0, 1)], (0, 1)),
    ("sdpa batch", lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
     [_rand(3, 2, 4, 5), _rand(3, 2, 6, 5), _rand(3, 2, 6, 5)], [(0, 1), (0, 1), (0, 1)], (0, 1)),
    ("sdpa heads", lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
     [_rand(2, 3, 4, 5), _rand(2, 3, 6, 5), _rand(2, 3, 6, 5)], [(1, 1), (1, 1), (1, 1)], (1, 1)),
    ("sdpa query rows", lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
     [_rand(4, 5), _rand(6, 5), _rand(6, 5)], [(0, 1), None, None], (0, 1)),
    ("cross_entropy none", lambda a, t: F.cross_entropy(a, t, reduction="none"), [x43, torch.tensor([0, 2, 1, 1])],
     [(0, 1), (0, 1)], (0, 1)),
    ("mse none", lambda a, b: F.mse_loss(a, b, reduction="none").sum(1), [x43, _rand(4, 3, seed=5)],
     [(0, 1), (0, 1)], (0, 1)),
    ("cosine", lambda a, b: F.cosine_similarity(a, b, dim=1), [x43, _rand(1, 3)], [(0, 1), None], (0, 1)),
]


@pytest.mark.parametrize("name,fn,inputs,tags,expected", SEPARABLE, ids=[c[0] for c in SEPARABLE])
def test_rule_claims_hold(name, fn, inputs, tags, expected):
    got, L = run(fn, inputs, tags)
    assert not L.poisoned
    assert got[0] == (MIXED if expected is None else expected)
    if expected is not None:
        assert_separable(fn, inputs, tags, expected)


MIXING = [  # every one of these links different labels: a layout claim would be wrong
    ("sum over samples", lambda a: a.sum(0), [x43], [(0, 1)]),
    ("mean all", lambda a: a.mean(), [x43], [(0, 1)]),
    ("dim=() reduces all", lambda a: a.sum(dim=()), [x43], [(0, 1)]),
    ("centering", lambda a: a - a.mean(0, keepdim=True), [x43], [(0, 1)]),
    ("softmax over samples", lambda a: a.softmax(0), [x43], [(0, 1)]),
    ("cumsum over samples", lambda a: a.cumsum(0), [x43], [(0, 1)]),
    ("transposed pointwise", lambda a: a * a.t(), [_rand(4, 4)], [(0, 1)]),
    ("broadcast one sample", lambda a, b: a[:1] + b, [x43, _rand(4, 3, seed=3)], [(0, 1), None]),
    ("sample-major merge of outer", lambda a: a.reshape(12, 5), [x345], [(1, 1)]),
    ("repeat samples", lambda a: a.repeat(2, 1), [x43], [(0, 1)]),
    ("flip samples", lambda a: a.flip(0), [x43], [(0, 1)]),
    ("roll samples", lambda a: torch.roll(a, 1, 0), [x43], [(0, 1)]),
    ("cat along samples", lambda a, b: torch.cat([a, b]), [x43, _rand(2, 3)], [(0, 1), None]),
    ("getitem one sample", lambda a: a[0], [x43], [(0, 1)]),
    ("getitem offset", lambda a: a[1:], [x43], [(0, 1)]),
    ("getitem tensor on samples", lambda a, i: a[i], [x43, torch.tensor([1, 0, 3, 2])], [(0, 1), None]),
    ("linear over samples", lambda a, w: F.linear(a.t(), w), [x43, _rand(2, 4)], [(0, 1), None]),
    ("conv unbatched", lambda a, w: F.conv2d(a, w), [_rand(2, 4, 4), _rand(3, 2, 3, 3)], [(0, 1), None]),
    ("group_norm channels", lambda a: F.group_norm(a, 2), [_rand(3, 4, 2, 2)], [(1, 1)]),
    ("layer_norm over samples", lambda a: F.layer_norm(a, (4, 3)), [x43], [(0, 1)]),
    ("batch_norm train", lambda a: F.batch_norm(a, None, None, training=True), [x435], [(0, 1)]),
    ("matmul contracts samples", lambda a, b: b @ a, [x43, _rand(2, 4)], [(0, 1), None]),
    ("einsum contracts samples", lambda a, b: torch.einsum("bc,bd->cd", a, b), [x43, _rand(4, 2)], [(0, 1), None]),
    ("einsum two labels", lambda a, b: torch.einsum("bc,cb->bc", a, b), [x43, _rand(3, 4)], [(0, 1), (0, 1)]),
    ("sdpa over samples", lambda q, k, v: F.scaled_dot_product_attention(q, k, v),
     [_rand(4, 5), _rand(4, 5), _rand(4, 5)], [(0, 1), (0, 1), (0, 1)]),
    ("cross_entropy classes", lambda a, t: F.cross_entropy(a.t(), t, reduction="none"), [x43, torch.tensor([0, 1, 2])],
     [(0, 1), None]),
    ("unknown op", lambda a: torch.linalg.svdvals(a), [x43], [(0, 1)]),
    ("interpolate spatial", lambda a: F.interpolate(a, scale_factor=2.0), [_rand(2, 3, 4)], [(2, 1)]),
]


@pytest.mark.parametrize("name,fn,inputs,tags", MIXING, ids=[c[0] for c in MIXING])
def test_mixing_ops_prove_nothing(name, fn, inputs, tags):
    got, _ = run(fn, inputs, tags)
    assert got[0] is MIXED


def test_multihead_attention_sequence_first():
    """nn.MultiheadAttention on [T, N, E]: separable along N (dim 1), whatever T is."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(4, 2).double()
    for T, N in ((3, 3), (2, 3)):
        x = _rand(T, N, 4)
        kpm = torch.zeros(N, T, dtype=torch.bool)

        def fn(v):
            return mha(v, v, v, key_padding_mask=kpm)[0]

        L = SampleLayout()
        leaf = x.clone().requires_grad_()
        L.set(leaf, (1, 1))
        L.set(kpm, (0, 1))
        with L:
            out = fn(leaf)
        assert L.tag(out) == (1, 1)
        assert_separable(fn, [x], [(1, 1)], (1, 1))


def _nonleaf(x):
    return x.clone().requires_grad_() * 1.0


@pytest.mark.parametrize("name,op,poisoned", [
    # a write through a view leaves the base MIXED (conservative), but nothing is poisoned
    ("mix in place", lambda h: h.add_(h.sum(0, keepdim=True)), True),
    ("copy other sample", lambda h: h.__setitem__(0, h[1]), True),
    ("add into a view of another layout", lambda h: h.t().add_(h * 1.0), True),
    ("tagged data into a fresh buffer", lambda h: torch.zeros(4, 4, dtype=h.dtype).copy_(h).sum(0).mul_(h[:, 0]), True),
    ("cumsum_ over samples", lambda h: h.cumsum_(0), True),
    ("pointwise in place", lambda h: h.mul_(2.0).clamp_(min=0), False),
    ("constant into a sample", lambda h: h.__setitem__(0, 0.0), False),
    ("aligned in place", lambda h: h.add_(h.detach() * 0 + h), False),
    ("fill", lambda h: h[:, 1:].fill_(3.0), False),
    ("inplace argument", lambda h: F.leaky_relu(F.relu(h, inplace=True), 0.1, True), False),
])
def test_inplace_writes(name, op, poisoned):
    L = SampleLayout()
    x = _rand(4, 4).requires_grad_()
    L.set(x, (0, 1))
    with L:
        h = x * 1.0
        op(h)
    assert L.poisoned is poisoned
    if not poisoned:  # a separable write keeps the layout; through a view, the base reads MIXED
        assert L.tag(h) == (MIXED if name == "fill" else (0, 1))


def test_custom_function_output_is_not_trusted():
    """A custom autograd.Function whose forward is separable but whose backward mixes samples: its
    output must not keep the layout its forward computed."""

    class MixBack(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return g + g.sum(0, keepdim=True)

    L = SampleLayout()
    x = _rand(4, 3).requires_grad_()
    L.set(x, (0, 1))
    with L:
        y = MixBack.apply(x * 1.0)
        z = y * 2
    assert L.tag(y) is MIXED and L.tag(z) is MIXED


def test_untracked_graph_tensor_is_mixed():
    pre = _rand(4, 3).requires_grad_() * 2  # a graph tensor made before the mode started
    L = SampleLayout()
    with L:
        out = pre + 1
    assert L.tag(pre) is MIXED and L.tag(out) is MIXED
    assert L.tag(_rand(4, 3)) is None and L.tag(nn.Linear(2, 2).weight) is None


def test_metadata_reads_tag_nothing():
    """Reads of metadata and Python scalars skip the tag bookkeeping (`_METADATA`): under the mode they
    change no tag, poison nothing, and the ops that follow them are tagged as without them."""
    from cdgfast.fisher import _layout as LY

    L = SampleLayout()
    x = _rand(4, 3, 5).requires_grad_()
    L.set(x, (1, 1))
    with L:
        h = torch.tanh(x)
        before = dict(L._tags)
        reads = [h.shape, h.dim(), h.size(), h.size(1), h.ndim, h.dtype, h.device, h.numel(), len(h),
                 h.is_contiguous(), h.stride(), h.requires_grad, h.grad_fn, h._version, h.is_leaf,
                 h.is_floating_point(), h.element_size(), h.is_inference(), float(h[0, 0, 0].detach()),
                 h.detach()[0, 0, 0].item()]
        after = {k: v for k, v in L._tags.items() if k in before}
        out = F.linear(h.reshape(h.shape[0], h.size(1), -1), _rand(2, 5))
    assert reads[0] == (4, 3, 5) and reads[3] == 3
    assert after == before  # the indexing for float()/item() tags new tensors only
    assert not L.poisoned and L.tag(h) == (1, 1) and L.tag(out) == (1, 1)
    # a name in _METADATA must not be one a rule reads, nor an in-place op
    ruled = LY._POINTWISE | LY._SELF_ONLY | LY._CONSTANT | LY._RESHAPE | set(LY._RULES)
    assert not (LY._METADATA & ruled)
    assert not any(SampleLayout._inplace(n, {}) for n in LY._METADATA)
    assert LY.op_name(torch.Tensor.shape.__get__) == "get:shape" and LY.op_name(torch.Tensor.T.__get__) == "get:T"


def test_metadata_named_function_returning_a_tensor_is_observed():
    """The short cut trusts a result without tensors only: a function with a metadata name that
    returns a tensor after all goes through `observe` (where the hook path notes which parameters
    entered the graph), and its output proves nothing."""
    seen = []

    class Spy(SampleLayout):
        def observe(self, func, args, kwargs, result, inputs, pre=None):
            seen.append(func.__name__)
            super().observe(func, args, kwargs, result, inputs, pre)

    def size(t):  # op_name "size", a tensor out
        return t * 2.0

    L = Spy()
    x = _rand(4, 3).requires_grad_()
    L.set(x, (0, 1))
    with L:
        h = x * 1.0
        out = L.__torch_function__(size, (torch.Tensor,), (h,))
        n = h.size(0)
    assert n == 4 and "size" in seen
    assert L.tag(out) is MIXED  # no rule for it
    assert seen.count("size") == 1  # the real size() read returned an int: not observed


@pytest.mark.parametrize("T", [3, 2])
def test_sequence_first_linear_with_shape_reads(T):
    """A sequence-first Linear whose forward reads shapes (as diffusers blocks do): with T == B the
    leading dim has the samples' size but the proof still puts the samples in dim 1."""
    B = 3
    w = _rand(4, 5)

    def fn(a):
        t, b, c = a.shape  # metadata read under the mode
        h = F.linear(a.reshape(t, b * c).view(t, b, c), w)
        return h.sum(0) * h.shape[0]

    x = _rand(T, B, 5)
    got, L = run(fn, [x], [(1, 1)])
    assert got[0] == (0, 1) and not L.poisoned
    assert_separable(fn, [x], [(1, 1)], (0, 1))
    got0, _ = run(fn, [x], [(0, 1)])  # the samples in dim 0 (T of them): summed away
    assert got0[0] is MIXED
