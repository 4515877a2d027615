"""cdgfast.methods against independent references written here in plain PyTorch: A-GEM projection, SI path
integral on a quadratic toy, online EWC decay, the rank-1 state and penalty (SPEC formula, naive loops),
CCD's L_UKC closed form, the C-LoRA penalty, DSC's teacher draw and loss, EWC-DC's per-sample loss.

Where a reference must see the same (t, eps) as the method, it replays the method's generator in the
documented draw order of `cdgfast.diffusion.make_batch` (t, then eps, per batch).
"""
import math

import pytest
import torch

import cdgfast.methods as M
from cdgfast.params import trainable_parameters
from cdgfast.data import Task
from cdgfast.diffusion import NoiseSchedule
from cdgfast.models import build_unet

NC = 4


def unet(seed=0, dtype=torch.float32, num_classes=NC):
    torch.manual_seed(seed)
    return build_unet("tiny", num_classes=num_classes, sample_size=8).to(dtype)


def linear_schedule_tables(T=1000, b0=1e-4, b1=0.02):
    betas = [b0 + (b1 - b0) * i / (T - 1) for i in range(T)]
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1 - b
        abar.append(prod)
    return betas, abar


def data_for(classes, n=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, 1, 8, 8, generator=g) * 2 - 1).to(dtype)
    y = torch.tensor([classes[i % len(classes)] for i in range(n)])
    return [(x[:4], y[:4]), (x[4:], y[4:])]


def replay_batches(gen_state, data, dtype=torch.float32):
    """The (x, y, t, eps) batches a method draws from a generator in `gen_state` (make_batch order)."""
    g = torch.Generator()
    g.set_state(gen_state)
    out = []
    for x, y in data:
        t = torch.randint(0, 1000, (x.shape[0],), generator=g)
        eps = torch.randn(x.shape, generator=g, dtype=x.dtype)
        out.append((x, y, t, eps))
    return out, g


def naive_per_sample_grads(model, batches):
    """g_i for every sample, one backward per sample, l_i = mean over pixels of (eps - eps_theta)^2."""
    params = trainable_parameters(model)
    abar = torch.tensor(linear_schedule_tables()[1], dtype=torch.float64)
    rows = []
    for x, y, t, eps in batches:
        for i in range(x.shape[0]):
            a = abar[t[i]].to(x.dtype)
            xt = a.sqrt() * x[i:i + 1] + (1 - a).sqrt() * eps[i:i + 1]
            pred = model(xt, t[i:i + 1], class_labels=y[i:i + 1]).sample
            li = ((pred - eps[i:i + 1]) ** 2).mean()
            gs = torch.autograd.grad(li, params, allow_unused=True)
            rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(gs, params)]))
    return torch.stack(rows)


def flat(model):
    return torch.cat([p.detach().reshape(-1) for p in trainable_parameters(model)])


# ------------------------------------------------------------------------------------------ A-GEM
def test_agem_projection_matches_formula_and_reference_gradient():
    model = unet(0)
    m = M.create("agem", buffer_size=8, replay_batch=3)
    m.setup(num_classes=NC, schedule=NoiseSchedule())
    m.begin_task(model, Task(0, [0, 1], torch.arange(6)))
    m.end_task(model, data_for([0, 1], seed=1))
    m.begin_task(model, Task(1, [2, 3], torch.arange(6)))
    params = trainable_parameters(model)
    projected = unchanged = 0
    for trial in range(4):
        # Gradients pointing both ways, so that some trials need the projection and some do not.
        gen = torch.Generator().manual_seed(trial)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-2
        if trial % 2 == 0:
            state = m.generator.get_state()
            g_ref_probe = _agem_reference(m, model, state)
            for p, piece in zip(params, _split(-g_ref_probe, params)):
                p.grad += piece
        g = torch.cat([p.grad.reshape(-1) for p in params]).clone()
        state = m.generator.get_state()
        m.before_step(model)
        g_ref = _agem_reference(m, model, state)
        torch.testing.assert_close(m.last_ref, g_ref, rtol=1e-3, atol=1e-4 * float(g_ref.abs().max()))
        new = torch.cat([p.grad.reshape(-1) for p in params])
        dot = torch.dot(g.double(), g_ref.double())
        if dot < 0:
            expected = g.double() - dot / g_ref.double().pow(2).sum() * g_ref.double()
            torch.testing.assert_close(new.double(), expected, rtol=1e-4, atol=1e-5 * float(g.abs().max()))
            assert torch.dot(new.double(), g_ref.double()) >= -1e-6 * g_ref.double().norm() * new.double().norm()
            projected += 1
        else:
            assert torch.equal(new, g)
            unchanged += 1
    assert projected >= 1 and unchanged >= 1


def _split(flat_vec, params):
    out, o = [], 0
    for p in params:
        out.append(flat_vec[o:o + p.numel()].view_as(p))
        o += p.numel()
    return out


def _agem_reference(m, model, gen_state):
    """g_ref replayed from the generator state: buffer.sample(k, generator) then t, eps; mean of l_i."""
    g = torch.Generator()
    g.set_state(gen_state)
    xb, yb = m.buffer.sample(3, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    eps = torch.randn(xb.shape, generator=g)
    rows = naive_per_sample_grads(model, [(xb, yb, t, eps)])
    return rows.mean(0)


# ------------------------------------------------------------------------------------------ SI
class Quadratic(torch.nn.Module):
    def __init__(self, w0):
        super().__init__()
        self.w = torch.nn.Parameter(w0.clone())


def test_si_omega_on_quadratic_matches_hand_computation():
    a = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64)
    w_star = torch.tensor([1.0, -2.0, 0.25], dtype=torch.float64)
    w0 = torch.tensor([0.0, 0.5, 2.0], dtype=torch.float64)
    lr, n, xi, c = 0.1, 7, 1e-3, 0.7
    model = Quadratic(w0)
    m = M.create("si", xi=xi, c=c)
    m.setup(num_classes=1, schedule=NoiseSchedule())
    m.begin_task(model, Task(0, [0], torch.arange(1)))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(n):
        loss = 0.5 * (a * (model.w - w_star) ** 2).sum()
        loss.backward()
        m.before_step(model)
        opt.step()
        m.after_step(model)
        opt.zero_grad()
    m.end_task(model, [])
    # Plain SGD on a separable quadratic: w_k - w* = r^k (w0 - w*), r = 1 - lr a; each step
    # contributes -g . dtheta = lr g_k^2 = lr a^2 r^(2k) (w0 - w*)^2.
    r = 1 - lr * a
    omega = lr * a ** 2 * (w0 - w_star) ** 2 * (1 - r ** (2 * n)) / (1 - r ** 2)
    delta = (r ** n - 1) * (w0 - w_star)
    big_omega = omega / (delta ** 2 + xi)
    torch.testing.assert_close(m.weights[0], big_omega, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(m.anchors[0], w_star + r ** n * (w0 - w_star), rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        model.w.add_(torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64))
    term = m.extra_terms(model, None)["si"]
    expected = c * sum(big_omega[j] * (model.w[j] - m.anchors[0][j]) ** 2 for j in range(3))
    torch.testing.assert_close(term.detach(), expected.detach(), rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------------------------------ EWC
def test_online_ewc_decays_previous_fisher_and_keeps_one_anchor():
    model = unet(1)
    gamma, lam = 0.5, 3.0
    m = M.create("ewc", gamma=gamma, lam=lam)
    m.setup(num_classes=NC, schedule=NoiseSchedule())
    fishers = []
    for k, classes in enumerate([[0, 1], [2, 3]]):
        m.begin_task(model, Task(k, classes, torch.arange(6)))
        with torch.no_grad():  # move the model between tasks so the anchors differ
            for p in trainable_parameters(model):
                p.add_(1e-3 * torch.randn_like(p))
        data = data_for(classes, seed=10 + k)
        batches, _ = replay_batches(m.generator.get_state(), data)
        fishers.append(naive_per_sample_grads(model, batches).pow(2).mean(0))
        m.end_task(model, data)
    assert len(m.weights) == 1 and len(m.anchors) == 1
    torch.testing.assert_close(m.weights[0], gamma * fishers[0] + fishers[1], rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(m.anchors[0], flat(model))
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(1e-2 * torch.randn_like(p))
    term = m.extra_terms(model, None)["ewc"]
    d = (flat(model) - m.anchors[0]).double()
    expected = lam / 2 * (m.weights[0].double() * d * d).sum()
    torch.testing.assert_close(term.double(), expected, rtol=1e-4, atol=1e-12)


# ------------------------------------------------------------------------------------------ rank-1
def test_rank1_state_and_penalty_match_spec_formula():
    model = unet(2)
    lam = 7.0
    m = M.create("rank1", lam=lam)
    m.setup(num_classes=NC, schedule=NoiseSchedule())
    mus, cs, thetas = [], [], []
    for k, classes in enumerate([[0, 1], [2, 3]]):
        m.begin_task(model, Task(k, classes, torch.arange(6)))
        with torch.no_grad():
            for p in trainable_parameters(model):
                p.add_(1e-3 * torch.randn_like(p))
        data = data_for(classes, seed=20 + k)
        pass1, g = replay_batches(m.generator.get_state(), data)
        pass2, _ = replay_batches(g.get_state(), data)  # the second pass draws fresh t/eps
        mu = naive_per_sample_grads(model, pass1).double().mean(0)
        g2 = naive_per_sample_grads(model, pass2).double()
        cs.append(((g2 @ mu) ** 2).mean() / mu.pow(2).sum() ** 2)
        mus.append(mu)
        thetas.append(flat(model).double())
        m.end_task(model, data)
    assert m.anchors.shape == m.directions.shape == (2, mus[0].numel())
    for k in range(2):
        torch.testing.assert_close(m.directions[k].double(), mus[k], rtol=1e-3, atol=1e-4 * float(mus[k].abs().max()))
        torch.testing.assert_close(m.coeffs[k].double(), cs[k], rtol=1e-3, atol=0)
        torch.testing.assert_close(m.anchors[k].double(), thetas[k])
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(1e-2 * torch.randn_like(p))
    term = m.extra_terms(model, None)["rank1"]
    theta = flat(model).double()
    expected = 0.0
    for k in range(2):  # SPEC: lam/2 * sum_k c_k (mu_k . (theta - theta_k))^2
        proj = (m.directions[k].double() * (theta - m.anchors[k].double())).sum()
        expected += lam / 2 * float(m.coeffs[k]) * float(proj) ** 2
    term = term.detach()
    assert math.isclose(float(term), expected, rel_tol=1e-3), (float(term), expected)


# ------------------------------------------------------------------------------------------ CCD
def test_ukc_equals_weighted_eps_mse_closed_form():
    sched = NoiseSchedule()
    betas, abar = linear_schedule_tables()
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 1, 137, 500, 998, 999])
    x_t = torch.randn(6, 2, 3, 5, generator=g, dtype=torch.float64)
    e_te = torch.randn(6, 2, 3, 5, generator=g, dtype=torch.float64)
    e_s = torch.randn(6, 2, 3, 5, generator=g, dtype=torch.float64)
    got = M.ukc_loss(sched, x_t, t, e_te, e_s)
    expected = 0.0
    for i in range(6):
        b, ab = betas[t[i]], abar[t[i]]
        w = 4 * ab * (1 - ab)
        expected += w * b ** 2 / ((1 - b) * (1 - ab)) * ((e_te[i] - e_s[i]) ** 2).mean().item()
    assert math.isclose(got.item(), expected / 6, rel_tol=1e-10)
    # The reverse mean itself, from its definition.
    i = 3
    b, ab = betas[t[i]], abar[t[i]]
    m_ref = (x_t[i] - b / math.sqrt(1 - ab) * e_te[i]) / math.sqrt(1 - b)
    torch.testing.assert_close(M.reverse_mean(sched, x_t, t, e_te)[i], m_ref, rtol=1e-12, atol=1e-12)


def test_ccd_label_regressor_and_lkc_kl():
    from test_methods import run_two_tasks
    model, m, history = run_two_tasks("ccd", steps=3)
    assert m.regressor.out_features == NC and m.regressor.in_features == model.config.block_out_channels[-1]
    assert m.last_regressor_ce is not None and math.isfinite(m.last_regressor_ce)
    assert len(m.buffer) == 16 and set(m.buffer.class_counts()) == {0, 1, 2, 3}
    assert all(not p.requires_grad for p in m.teacher_regressor.parameters())


# ------------------------------------------------------------------------------------------ C-LoRA
def test_clora_penalty_matches_peft_weights():
    from peft.tuners.lora import LoraLayer
    model = unet(4)
    lam_f = 1e3
    m = M.create("clora", rank=2, lam_f=lam_f)
    m.setup(num_classes=NC, schedule=NoiseSchedule())
    m.begin_task(model, Task(0, [0, 1], torch.arange(6)))
    layers = {n: mod for n, mod in model.named_modules() if isinstance(mod, LoraLayer)}
    assert layers and all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for mod in layers.values():
            mod.lora_B["default"].weight.copy_(torch.randn(mod.lora_B["default"].weight.shape, generator=gen))
    naive_prev = {n: (mod.lora_B["default"].weight @ mod.lora_A["default"].weight).t() * mod.scaling["default"]
                  for n, mod in layers.items()}
    m.end_task(model, [])
    m.begin_task(model, Task(1, [2, 3], torch.arange(6)))
    with torch.no_grad():
        for mod in layers.values():
            mod.lora_B["default"].weight.copy_(torch.randn(mod.lora_B["default"].weight.shape, generator=gen))
    expected = 0.0
    for n, mod in layers.items():
        A = mod.lora_A["default"].weight.t()
        Bm = mod.lora_B["default"].weight.t() * mod.scaling["default"]
        prod = A @ Bm
        for i in range(prod.shape[0]):
            for j in range(prod.shape[1]):
                expected += float((abs(naive_prev[n][i, j]) * prod[i, j]).detach() ** 2)
    term = m.extra_terms(model, None)["clora"]
    assert math.isclose(float(term), lam_f * expected, rel_tol=1e-4)


# ------------------------------------------------------------------------------------------ DSC
def _run_dsc(seed, tasks=3, iterations=4):
    model = unet(5, num_classes=6)
    m = M.create("dsc", iterations=iterations, seed=seed)
    m.setup(num_classes=6, schedule=NoiseSchedule())
    for k in range(tasks):
        classes = [2 * k, 2 * k + 1]
        m.begin_task(model, Task(k, classes, torch.arange(4)))
        data = data_for(classes, n=6, seed=k)
        m.end_task(model, data)
        m.post_task_phase(model, data)
    return m


def test_dsc_draws_previous_teachers_seeded():
    a, b, c = _run_dsc(0), _run_dsc(0), _run_dsc(1)
    assert len(a.teacher_history) == 8  # 4 iterations after task 1, 4 after task 2
    assert a.teacher_history == b.teacher_history
    assert all(j == 0 for j in a.teacher_history[:4])  # after task 1 the only previous model is task 0's
    assert set(a.teacher_history[4:]) <= {0, 1}
    assert set(a.teacher_history[4:] + c.teacher_history[4:]) == {0, 1}
    assert len(a.task_models) == 3 and a.task_classes[2] == [4, 5]


def test_dsc_loss_matches_naive_formula():
    torch.manual_seed(0)
    student, tn, tj = unet(6, torch.float64), unet(7, torch.float64), unet(8, torch.float64)
    m = M.create("dsc")
    m.setup(num_classes=NC, schedule=NoiseSchedule())
    g = torch.Generator().manual_seed(9)
    x = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.tensor([2, 3, 2])
    c_j = torch.tensor([0, 1, 1])
    batch = m.noisy_batch(x, y)
    terms = m.dsc_terms(student, tn, tj, batch, c_j)
    _, abar = linear_schedule_tables()

    def eps_of(model, i, c):
        a = abar[int(batch["t"][i])]
        xt = math.sqrt(a) * x[i:i + 1] + math.sqrt(1 - a) * batch["eps"][i:i + 1]
        return model(xt, batch["t"][i:i + 1], class_labels=torch.tensor([c])).sample[0]

    ce = mse = 0.0
    for i in range(3):
        conds = [NC, int(y[i]), int(c_j[i])]
        e = {name: [eps_of(mod, i, c) for c in conds] for name, mod in (("n", tn), ("j", tj), ("s", student))}
        err = {k: torch.stack([((v - batch["eps"][i]) ** 2).mean() for v in vs]) for k, vs in e.items()}
        p_n = torch.softmax(-err["n"] / 0.05, 0)
        p_j = torch.softmax(-err["j"] / 0.05, 0)
        log_ps = torch.log_softmax(-err["s"] / 1.0, 0)
        ce += float(-(p_n * log_ps).sum() - (p_j * log_ps).sum()) / 3
        mse += float(((e["n"][1] - e["s"][1]) ** 2).mean() + ((e["j"][2] - e["s"][2]) ** 2).mean()) / 3
    assert math.isclose(float(terms["dsc_ce"]), 0.1 * ce, rel_tol=1e-6)
    assert math.isclose(float(terms["dsc_mse"]), 1.5 * mse, rel_tol=1e-6)


# ------------------------------------------------------------------------------------------ EWC-DC
def test_ewc_dc_conditions_and_per_sample_loss():
    model = unet(9, torch.float64, num_classes=6)
    m = M.create("ewc_dc", k=4, delta=0.5, tau=1.0)
    m.setup(num_classes=6, schedule=NoiseSchedule())
    m.seen_classes = [0, 1, 2, 3]
    m.current_classes = [4, 5]
    y = torch.tensor([4, 5, 5])
    cond = m.conditions(y)
    assert cond.shape == (3, 4)
    assert torch.all(cond[:, 0] == 6) and torch.equal(cond[:, 1], y)
    for row in cond[:, 2:]:
        assert len(set(row.tolist())) == 2 and set(row.tolist()) <= {0, 1, 2, 3}
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1
    batch = m.noisy_batch(x, y)
    batch["cond"] = cond
    got = m.ewc_loss_fn(model, batch)
    _, abar = linear_schedule_tables()
    for i in range(3):
        a = abar[int(batch["t"][i])]
        xt = math.sqrt(a) * x[i:i + 1] + math.sqrt(1 - a) * batch["eps"][i:i + 1]
        errs = torch.stack([((model(xt, batch["t"][i:i + 1], class_labels=cond[i, k:k + 1]).sample
                              - batch["eps"][i:i + 1]) ** 2).mean() for k in range(4)])
        logp = torch.log_softmax(-errs, 0)
        expected = errs[1] + 0.5 * sum((1.0 if k == 1 else -1.0) * (-logp[k]) for k in range(4))
        assert math.isclose(float(got[i]), float(expected), rel_tol=1e-8)
    # Before any earlier task exists the condition set is {null, own class}.
    m.seen_classes, m.current_classes = [], [0, 1]
    assert m.conditions(torch.tensor([0, 1])).shape == (2, 2)


# ------------------------------------------------------------------------------------------ L2
def test_l2_penalty_is_half_lam_squared_distance():
    model = unet(11)
    m = M.create("l2", lam=2.5)
    m.setup(num_classes=NC, schedule=NoiseSchedule())
    m.begin_task(model, Task(0, [0, 1], torch.arange(6)))
    old = flat(model).double()
    m.end_task(model, [])
    with torch.no_grad():
        for p in trainable_parameters(model):
            p.add_(1e-2 * torch.randn_like(p))
    expected = 2.5 / 2 * ((flat(model).double() - old) ** 2).sum()
    torch.testing.assert_close(m.extra_terms(model, None)["l2"].detach().double(), expected, rtol=1e-5, atol=0)


# ------------------------------------------------------------------------------------------ LoRA merge / seq
def _lora_layers(model):
    from peft.tuners.lora import LoraLayer
    return {n: mod for n, mod in model.named_modules() if isinstance(mod, LoraLayer)}


def _set_random_lora(layers, gen):
    with torch.no_grad():
        for mod in layers.values():
            mod.lora_B["default"].weight.copy_(torch.randn(mod.lora_B["default"].weight.shape, generator=gen))


def _delta(mod):
    return (mod.lora_B["default"].weight @ mod.lora_A["default"].weight * mod.scaling["default"]).detach().clone()


@pytest.mark.parametrize("name", ["lora_merge", "lora_seq"])
def test_lora_merge_and_seq_fold_deltas_into_base(name):
    model = unet(12)
    m = M.create(name, rank=2)
    m.setup(num_classes=NC, schedule=NoiseSchedule())
    gen = torch.Generator().manual_seed(2)
    base0, deltas = None, []
    for k in range(2):
        m.begin_task(model, Task(k, [2 * k, 2 * k + 1], torch.arange(6)))
        layers = _lora_layers(model)
        if base0 is None:
            base0 = {n: mod.get_base_layer().weight.detach().clone() for n, mod in layers.items()}
        if name == "lora_merge":  # every task's LoRA starts from the original base weights
            for n, mod in layers.items():
                torch.testing.assert_close(mod.get_base_layer().weight, base0[n])
        _set_random_lora(layers, gen)
        deltas.append({n: _delta(mod) for n, mod in layers.items()})
        m.end_task(model, [])
        for n, mod in layers.items():
            assert torch.all(mod.lora_B["default"].weight == 0)  # the adapter is folded and re-initialised
            expected = base0[n] + (sum(d[n] for d in deltas) / len(deltas) if name == "lora_merge"
                                   else sum(d[n] for d in deltas))
            torch.testing.assert_close(mod.get_base_layer().weight, expected, rtol=1e-5, atol=1e-6)
