"""The DC-score paper's Table-1 methods on text-to-image models (SPEC 2.3), offline on tiny_text_models.

Every row runs two tiny tasks (concepts V1, V2, each a prompt with its own modifier token, plus
prior-preservation samples of c_0 = "a photo of a person") through TextConditions: finite terms, the
method's own terms on task 2, gradients for every trainable parameter, and only the intended parameters
change (the task's token row, LoRA on attn2 K/V, the K/V weights for Custom Diffusion; V1's row is left
alone by task 2). Closed forms: Custom Diffusion's constrained merge against a float64 KKT solve (and the
merged model against its constraint), the C-LoRA penalty against its formula on peft's matrices, and
EWC-DC's Fisher on the LoRA parameters against a per-sample loop of plain forwards, one per condition.
"""
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import cdgfast.methods as M  # noqa: E402
from cdgfast.data import Task  # noqa: E402
from cdgfast.methods import TextConditions  # noqa: E402
from cdgfast.methods.personalization import constrained_merge  # noqa: E402
from cdgfast.models import CROSS_ATTENTION_KV, encode_prompts, tiny_text_models  # noqa: E402
from cdgfast.models.lora import add_lora  # noqa: E402

L = 8
PROMPTS = ["a photo of a <V1> dog", "a photo of a <V2> cat"]
TOKENS = ["<V1>", "<V2>"]
PRIOR = "a photo of a person"
PRIOR_ID = len(PROMPTS)
TEXT_METHODS = ["textual_inversion", "custom_diffusion", "cd_ewc", "lora_seq", "lora_merge", "clora", "ewc",
                "ewc_dc", "dsc", "dsc+ewc", "dsc+ewc_dc"]
# the rows whose method keeps the trainer's LoRA (one LoRA carried from task to task, the paper's EWC / DSC)
TRAINER_LORA = {"ewc", "ewc_dc", "dsc", "dsc+ewc", "dsc+ewc_dc"}
KV_WEIGHTS = {"custom_diffusion", "cd_ewc"}


def build(name, **extra):
    parts = tiny_text_models(max_length=L, seed=0)
    parts.text_encoder.requires_grad_(False)
    unet = parts.unet
    if name in TRAINER_LORA:
        add_lora(unet, rank=2, target_modules=CROSS_ATTENTION_KV, seed=0)
    cond = TextConditions(parts.tokenizer, parts.text_encoder, PROMPTS, PRIOR, tokens=TOKENS, init_word="dog")
    method = M.create(name, **{**M.text_config(name), **M.tiny_run(name).config, **extra})
    method.setup(num_classes=len(PROMPTS), schedule=parts.noise_schedule(), device="cpu", conditions=cond)
    return parts, unet, cond, method


def tasks(seed=0, n=4):
    """Two tasks of n concept latents each, every batch followed by 2 prior-preservation latents (y = c_0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(len(PROMPTS)):
        x = torch.randn(n, 4, 16, 16, generator=g)
        xp = torch.randn(n, 4, 16, 16, generator=g)
        data = [(torch.cat([x[i:i + 2], xp[i:i + 2]]), torch.tensor([k, k, PRIOR_ID, PRIOR_ID]))
                for i in range(0, n, 2)]
        out.append((Task(index=k, classes=[k], indices=torch.arange(n)), data))
    return out


def snapshot(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def changed(before, module):
    now = dict(module.named_parameters())
    return {n for n, p in before.items() if not torch.equal(p, now[n].detach())}


def allowed_unet(name, pname):
    if name == "textual_inversion":
        return False
    kv = any(f"{t}." in pname for t in CROSS_ATTENTION_KV)
    if name in KV_WEIGHTS:
        return kv and pname.endswith(("to_k.weight", "to_v.weight")) and "lora" not in pname
    return kv and "lora_" in pname


def run(name, steps=2, check=None, **extra):
    parts, unet, cond, method = build(name, **extra)
    history = []
    for task, data in tasks():
        method.begin_task(unet, task)
        params = method.trainable_parameters(unet)
        # weight decay moves every parameter handed to the optimizer, with a gradient or not: V1's row must
        # not be among them during task 2
        opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
        unet_before, te_before = snapshot(unet), snapshot(parts.text_encoder)
        for step in range(steps):
            xb, yb = data[step % len(data)]
            terms = method.loss(unet, {"x": xb, "y": yb})
            history.append((task.index, terms))
            sum(terms.values()).backward()
            missing = [i for i, p in enumerate(params) if p.grad is None]
            assert not missing, f"{name}: trainable parameters without a gradient: {missing}"
            method.before_step(unet)
            opt.step()
            method.after_step(unet)
            opt.zero_grad(set_to_none=True)
        # only the intended parameters changed: this task's token row, and the method's UNet parameters
        row = cond.token_row(task.classes[0])
        row_name = [n for n, p in parts.text_encoder.named_parameters() if p is row]
        assert changed(te_before, parts.text_encoder) == set(row_name) and len(row_name) == 1, name
        moved = changed(unet_before, unet)
        assert all(allowed_unet(name, n) for n in moved), (name, sorted(moved)[:4])
        assert bool(moved) == (name != "textual_inversion"), name
        if check is not None:
            check(parts, unet, cond, method, task, data)
        method.end_task(unet, data)
        te_frozen = snapshot(parts.text_encoder)
        method.post_task_phase(unet, data)
        assert not changed(te_frozen, parts.text_encoder), name  # V*_n is fixed in a consolidation phase
    return parts, unet, cond, method, history


@pytest.mark.parametrize("name", TEXT_METHODS)
def test_table1_method_runs_two_text_tasks(name):
    parts, unet, cond, method, history = run(name)
    for _, terms in history:
        assert "task" in terms
        assert all(v.dim() == 0 and math.isfinite(v.item()) for v in terms.values()), (name, terms)
    assert set(history[0][1]) == {"task"}
    assert set(history[-1][1]) - {"task"} == M.tiny_run(name).terms, name
    if name not in KV_WEIGHTS | {"textual_inversion"}:  # LoRA only on the cross-attention K/V
        from peft.tuners.lora import LoraLayer

        lora = [n for n, m in unet.named_modules() if isinstance(m, LoraLayer)]
        assert lora and all(n.endswith(CROSS_ATTENTION_KV) for n in lora), (name, lora)


def test_text_defaults_and_refusals():
    assert M.create("ewc", **M.text_config("ewc")).config["lam"] == 1e6
    assert M.create("ewc").config["lam"] == 15000.0  # the class-conditional default is unchanged
    assert M.create("clora", **M.text_config("clora")).config["lam_f"] == 1e8
    assert M.create("lora_seq", **M.text_config("lora_seq")).config["target_modules"] == CROSS_ATTENTION_KV
    assert M.create("cd_ewc").config["lam"] == 1e6
    d = M.create("dsc+ewc_dc", **M.text_config("dsc+ewc_dc")).config
    assert d["dsc.label_dropout"] == 0.0 and d["ewc_dc.label_dropout"] == 0.0 and d["ewc_dc.k"] == 5
    assert (d["dsc.teacher_tau"], d["dsc.gamma"], d["dsc.lam"], d["ewc_dc.delta"]) == (0.05, 0.1, 1.5, 0.5)
    parts = tiny_text_models(max_length=L, seed=0)
    cond = TextConditions(parts.tokenizer, parts.text_encoder, PROMPTS, PRIOR, tokens=TOKENS)
    with pytest.raises(ValueError, match="label_dropout"):  # the class-conditional 0.1 has no text meaning
        M.create("ewc_dc").setup(num_classes=2, schedule=parts.noise_schedule(), conditions=cond)
    with pytest.raises(ValueError, match="num_classes"):
        M.create("finetune").setup(num_classes=3, conditions=cond)
    with pytest.raises(ValueError, match="tokens\\[1\\]"):
        TextConditions(parts.tokenizer, parts.text_encoder, PROMPTS, PRIOR, tokens=["<V1>", "<V3>"])
    with pytest.raises(ValueError, match="conditions"):  # a text-only row on class labels
        m = M.create("textual_inversion")
        m.setup(num_classes=2)
        m.begin_task(parts.unet, Task(index=0, classes=[0], indices=torch.arange(2)))


# ------------------------------------------------------------------ Custom Diffusion's merge
def kkt_merge(w0, c_reg, c, v, ridge):
    """Row by row: min (w - w0)^T M (w - w0) s.t. C w = v_row, from the KKT system, in float64."""
    w0, c_reg, c, v = (t.double() for t in (w0, c_reg, c, v))
    i, s = w0.shape[1], c.shape[0]
    m = c_reg.t() @ c_reg + ridge * torch.eye(i, dtype=torch.float64)
    kkt = torch.zeros(i + s, i + s, dtype=torch.float64)
    kkt[:i, :i], kkt[:i, i:], kkt[i:, :i] = 2 * m, c.t(), c
    rows = []
    for r in range(w0.shape[0]):
        rhs = torch.cat([2 * m @ w0[r], v[r]])
        rows.append(torch.linalg.solve(kkt, rhs)[:i])
    return torch.stack(rows)


@pytest.mark.parametrize("ridge", [0.0, 0.3])
def test_constrained_merge_matches_a_float64_kkt_solve(ridge):
    g = torch.Generator().manual_seed(3)
    w0, c_reg = torch.randn(5, 7, generator=g), torch.randn(11, 7, generator=g)
    c, v = torch.randn(3, 7, generator=g), torch.randn(5, 3, generator=g)
    w = constrained_merge(w0, c_reg, c, v, ridge=ridge)
    torch.testing.assert_close(w.double(), kkt_merge(w0, c_reg, c, v, ridge), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w @ c.t(), v, rtol=1e-4, atol=1e-4)  # the constraint holds
    torch.testing.assert_close(constrained_merge(w0, c_reg, c, w0 @ c.t()), w0, rtol=1e-5, atol=1e-5)
    # a repeated (consistent) constraint row changes nothing
    w_dup = constrained_merge(w0, c_reg, torch.cat([c, c[:1]]), torch.cat([v, v[:, :1]], 1), ridge=ridge)
    torch.testing.assert_close(w_dup, w, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="v:"):
        constrained_merge(w0, c_reg, c, v.t())
    with pytest.raises(ValueError, match="ridge"):
        constrained_merge(w0, c_reg, c, v, ridge=-1.0)


def test_custom_diffusion_model_holds_the_merge_of_its_tasks():
    parts, unet, cond, method, _ = run("custom_diffusion")
    from cdgfast.methods.personalization import cross_attention_kv

    mods = cross_attention_kv(unet)
    assert len(method.task_kv) == 2 and method.task_classes == [[0], [1]]
    for n, m in mods.items():
        for k, c in enumerate((0, 1)):  # each concept's target rows map as under its own task's weights
            rows = cond.target_rows(c)
            torch.testing.assert_close(m.weight.detach() @ rows.t(), method.task_kv[k][n] @ rows.t(),
                                       rtol=1e-3, atol=1e-4)
        assert not torch.equal(m.weight.detach(), method.task_kv[1][n])


# ------------------------------------------------------------------ C-LoRA's penalty
def test_clora_penalty_matches_its_formula_on_peft_matrices():
    kv_base = {}

    def check(parts, unet, cond, method, task, data):
        from peft.tuners.lora import LoraLayer

        layers = {n: m for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
        if task.index == 0:
            kv_base.update({n: m.get_base_layer().weight.detach().clone() for n, m in layers.items()})
            return
        expected = 0.0
        for n, m in layers.items():
            prev = (m.get_base_layer().weight.detach() - kv_base[n]).t().double()  # task 1's merged delta
            ab = (m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight).t().double()
            expected = expected + ((prev.abs() * ab) ** 2).sum()
        got = method.extra_terms(unet, {"x": data[0][0], "y": data[0][1]})["clora"]
        assert expected > 0
        torch.testing.assert_close(got.double(), 1e8 * expected, rtol=1e-4, atol=0)

    run("clora", check=check)


# ------------------------------------------------------------------ EWC-DC's Fisher
def naive_ewc_dc_loss(parts, unet, schedule, one, cond_row, delta, tau):
    """L_ewc of one sample with one plain UNet forward per condition (column 1: its own concept)."""
    prompts = [PRIOR if c == PRIOR_ID else PROMPTS[c] for c in cond_row.tolist()]
    x_t = schedule.add_noise(one["x"], one["eps"], one["t"])
    errs = []
    for p in prompts:
        h = encode_prompts(parts.tokenizer, parts.text_encoder, [p])
        errs.append((unet(x_t, one["t"], encoder_hidden_states=h).sample - one["eps"]).pow(2).mean())
    errs = torch.stack(errs)
    logp = torch.log_softmax(-errs / tau, 0)
    sign = -torch.ones_like(errs)
    sign[1] = 1.0
    return errs[1] + delta * (sign * -logp).sum()


def test_ewc_dc_fisher_equals_a_per_sample_loop_on_lora_parameters():
    def check(parts, unet, cond, method, task, data):
        if task.index == 0:
            return
        method.end_task(unet, data)  # the second task's Fisher, with concept 0 as the earlier one
        params = [p for p in unet.parameters() if p.requires_grad]
        assert params and all(p.numel() for p in params)
        state = method.generator.get_state()
        fisher = method.fisher(unet, data)
        method.generator.set_state(state)
        sq, n = None, 0
        for b in method.fresh_batches(data)():
            cond_ids = method.conditions(b["y"])
            assert cond_ids.shape[1] == 3  # c_0, the own concept, one earlier concept (k = 3)
            for i in range(b["x"].shape[0]):
                one = {k: v[i:i + 1] for k, v in b.items()}
                loss = naive_ewc_dc_loss(parts, unet, method.schedule, one, cond_ids[i],
                                         method.config["delta"], method.config["tau"])
                g = torch.cat([x.reshape(-1) for x in torch.autograd.grad(loss, params)]).double()
                sq = g * g if sq is None else sq + g * g
                n += 1
        ref = sq / n
        assert fisher.shape == ref.shape and ref.abs().sum() > 0
        assert fisher.numel() == sum(p.numel() for n_, p in unet.named_parameters() if "lora_" in n_)
        torch.testing.assert_close(fisher.double(), ref, rtol=2e-3, atol=1e-12 * float(ref.max()))

    run("ewc_dc", check=check)


@pytest.mark.parametrize("name", ["custom_diffusion", "cd_ewc", "textual_inversion"])
def test_text_only_state_saves_and_loads(name, tmp_path):
    parts, unet, cond, method, _ = run(name, steps=1)
    method.save(tmp_path / "m")
    loaded = M.load(tmp_path / "m")
    loaded.setup(num_classes=len(PROMPTS), schedule=parts.noise_schedule(), conditions=cond)
    for attr in type(method).state_attrs():
        a, b = getattr(method, attr), getattr(loaded, attr)
        if isinstance(a, dict):
            assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), attr
        elif isinstance(a, list) and a and isinstance(a[0], dict):
            assert all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x), attr
        elif isinstance(a, list) and a and isinstance(a[0], torch.Tensor):
            assert all(torch.equal(x, y) for x, y in zip(a, b)), attr
        else:
            assert a == b, attr
    if name == "custom_diffusion":  # the merge is rebuilt from the loaded state
        for n, w in method.merged_weights().items():
            torch.testing.assert_close(loaded.merged_weights()[n], w)


def test_driver_refuses_text_only_methods_before_any_work(tmp_path):
    """The class-conditional driver refuses a text-only method at validation, before a folder is made."""
    from cdgfast.train import RunConfig, RunError, run

    for name in ("textual_inversion", "custom_diffusion", "cd_ewc"):
        out = tmp_path / name
        with pytest.raises(RunError, match="text-conditional"):
            run(RunConfig(scale="smoke", steps=1, methods=[name], out=str(out), progress=False))
        assert not out.exists()
