"""cdgfast.methods: the registry, and every method run through two tiny tasks on the tiny UNet.

Each method goes through the full hook sequence (setup, begin_task, loss, backward, before_step, step,
after_step, end_task, post_task_phase); the checks: every term is a finite scalar, "task" is always
there, the method's own terms appear once there is something to consolidate, their gradients reach the
trainable parameters and never a frozen teacher, and the state kept after each task has the right shape.

The generic tests run every registered name (`M.available()`) with what its class declares in `tiny`
(a TinyRun: small hyperparameters, its terms, its frozen attributes, what the model must offer), so a
new method is picked up without an edit here, and a method without a declaration fails.
"""
import math
import re

import pytest
import torch

import cdgfast.methods as M
from cdgfast.params import trainable_parameters
from cdgfast.data import Task
from cdgfast.diffusion import NoiseSchedule
from cdgfast.methods import _registry
from cdgfast.methods._hparams import merged_defaults, nonneg
from cdgfast.models import build_unet

NUM_CLASSES = 4
B = 6

REQUIRED = ["finetune", "er", "agem", "kd", "l2", "ewc", "si", "mas", "gd", "rank1", "rankk", "diag", "rank1+gd",
            "rankk+gd", "diag+gd",
            "ccd", "ewc_dc", "dsc", "clora", "lora_seq", "lora_merge", "dsc+ewc", "dsc+ewc_dc",
            "textual_inversion", "custom_diffusion", "cd_ewc"]

# What the built-in methods' declarations must keep saying (the tables these tests had before the
# declarations moved next to the methods): small settings so that every method runs in about a second
# on the CPU, the terms expected on task 1 (besides "task"), and the frozen modules kept.
FAST = {
    "er": dict(buffer_size=16), "agem": dict(buffer_size=16, replay_batch=4),
    "gd": dict(pool_per_class=3, pool_steps=2), "rank1+gd": dict(pool_per_class=3, pool_steps=2),
    "diag+gd": dict(pool_per_class=3, pool_steps=2), "mas": dict(mas_max_samples=4),
    "rankk": dict(power_iters=2, fisher_max_samples=8),
    "rankk+gd": dict(pool_per_class=3, pool_steps=2, power_iters=2, fisher_max_samples=8),
    "ccd": dict(buffer_size=16), "dsc": dict(iterations=2), "ewc_dc": dict(k=3),
    "clora": dict(rank=2), "lora_seq": dict(rank=2), "lora_merge": dict(rank=2),
    "dsc+ewc": {"dsc.iterations": 2}, "dsc+ewc_dc": {"dsc.iterations": 2, "ewc_dc.k": 3},
}
TERMS = {"finetune": set(), "er": set(), "agem": set(), "kd": {"kd"}, "l2": {"l2"}, "ewc": {"ewc"}, "si": {"si"},
         "mas": {"mas"}, "gd": {"gd"}, "rank1": {"rank1"}, "diag": {"diag"}, "rank1+gd": {"rank1", "gd"},
         "diag+gd": {"diag", "gd"}, "ccd": {"ikc", "ukc", "lkc"}, "ewc_dc": {"ewc_dc"}, "dsc": set(),
         "clora": {"clora"}, "lora_seq": set(), "lora_merge": set(), "rankk": {"rankk"},
         "rankk+gd": {"rankk", "gd"}, "dsc+ewc": {"ewc"}, "dsc+ewc_dc": {"ewc_dc"}, "textual_inversion": set(),
         "custom_diffusion": set(), "cd_ewc": {"cd_ewc"}}
FROZEN = {"ccd": 2, "kd": 1, "gd": 1, "rank1+gd": 1, "diag+gd": 1, "rankk+gd": 1}


def tiny(name):
    run = M.tiny_run(name)
    assert run is not None, f"{name}: its class declares no `tiny = TinyRun(...)` (see DEVELOPING.md)"
    return run


# How the tiny model offers each of TinyRun.NEEDS; a need without a check here fails test_model_needs.
NEED_CHECKS = {
    "class_labels": lambda m: m.config.num_class_embeds is not None,
    "null_class": lambda m: m.config.num_class_embeds >= NUM_CLASSES + 1,
    "attention": lambda m: any(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n, _ in m.named_modules()),
    "mid_block": lambda m: isinstance(getattr(m, "mid_block", None), torch.nn.Module),
    "text": lambda m: type(m).__name__ == "UNet2DConditionModel",
}


def class_methods():
    """Every registered name that runs on class-conditional models (the text-only ones run in
    tests/test_methods_text.py)."""
    return [n for n in M.available() if "text" not in tiny(n).needs]


def model_for(name):
    """The tiny class-conditional UNet (8x8, attention, a mid block, the null class), checked against
    what the method says it needs."""
    model = build_unet("tiny", num_classes=NUM_CLASSES, sample_size=8)
    for need in tiny(name).needs:
        assert need in NEED_CHECKS and NEED_CHECKS[need](model), (name, need)
    return model


def tiny_tasks(seed=0, n=8):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2 * n, 1, 8, 8, generator=g) * 2 - 1
    y = torch.tensor([0, 1] * (n // 2) + [2, 3] * (n // 2))
    tasks = [Task(index=0, classes=[0, 1], indices=torch.arange(n)),
             Task(index=1, classes=[2, 3], indices=torch.arange(n, 2 * n))]
    return x, y, tasks


def loader(x, y, task, bs=4):
    idx = task.indices
    return [(x[idx[i:i + bs]], y[idx[i:i + bs]]) for i in range(0, idx.numel(), bs)]


def frozen_modules(method):
    """The modules held by the attributes the method's TinyRun names as frozen (every member's)."""
    members = method.members if isinstance(method, M.Compose) else [method]
    out = []
    for m in members:
        for attr in tiny(m.name).frozen:
            mod = getattr(m, attr, None)
            if isinstance(mod, torch.nn.Module):
                out.append(mod)
    return out


def run_two_tasks(name, steps=2, seed=0, check=None, schedule=None, **extra):
    torch.manual_seed(seed)
    model = model_for(name)
    method = M.create(name, **{**tiny(name).config, **extra})
    method.setup(num_classes=NUM_CLASSES, schedule=NoiseSchedule() if schedule is None else schedule, device="cpu")
    x, y, tasks = tiny_tasks(seed)
    history = []
    for task in tasks:
        method.begin_task(model, task)
        opt = torch.optim.Adam(trainable_parameters(model), lr=1e-3)
        data = loader(x, y, task)
        for step in range(steps):
            xb, yb = data[step % len(data)]
            terms = method.loss(model, {"x": xb, "y": yb})
            history.append((task.index, terms))
            sum(terms.values()).backward()
            # torchrun's DistributedDataParallel needs a gradient for every trainable parameter
            unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
            assert not unused, f"{name}: trainable parameters without a gradient: {unused[:3]}"
            method.before_step(model)
            opt.step()
            method.after_step(model)
            opt.zero_grad(set_to_none=True)
        if check is not None and task.index == len(tasks) - 1:
            check(model, method)  # while training on the last task, before its end_task
        method.end_task(model, data)
        method.post_task_phase(model, data)
    return model, method, history


def test_available_lists_every_required_name():
    assert set(REQUIRED) <= set(M.available())
    for name in M.available():
        m = M.create(name)
        assert isinstance(m, M.Method) and m.name == name and isinstance(m.config, dict)


def test_unknown_name_and_override_raise_value_error():
    with pytest.raises(ValueError, match="finetune"):  # lists the valid names
        M.create("nope")
    with pytest.raises(ValueError, match="bogus"):
        M.create("ewc", bogus=1)
    with pytest.raises(ValueError, match="bogus"):
        M.create("rank1+gd", bogus=1)
    with pytest.raises(ValueError, match="gd.lam"):
        M.create("rank1+gd", **{"gd.lam": 1.0})
    with pytest.raises(ValueError, match="label_dropout"):
        M.create("finetune", label_dropout=1.5)


def test_defaults_follow_spec():
    assert M.create("rank1").config["lam"] == 15000.0
    assert M.create("ewc").config["online"] is True
    assert M.create("clora").config["lam_f"] == 1e8
    c = M.create("dsc").config
    assert (c["teacher_tau"], c["student_tau"], c["gamma"], c["lam"], c["iteration_ratio"]) == (0.05, 1.0, 0.1, 1.5, 0.2)
    assert M.create("gd").config["pool_steps"] == 50 and M.create("gd").config["online_steps"] == 2
    e = M.create("ewc_dc").config
    assert (e["k"], e["delta"], e["tau"], e["label_dropout"]) == (5, 0.5, 1.0, 0.1)


def test_composition_is_a_compose_of_single_methods():
    m = M.create("rank1+gd", lam=5.0, lam_gd=2.0, **{"gd.seed": 3})
    assert isinstance(m, M.Compose)
    assert [type(x) for x in m.members] == [M.Rank1, M.GD]
    assert m.primary is m.members[1]  # gd computes the task loss over current + replay
    assert m.config["rank1.lam"] == 5.0 and m.config["gd.lam_gd"] == 2.0 and m.config["gd.seed"] == 3
    d = M.create("diag+gd")
    assert [type(x) for x in d.members] == [M.Diag, M.GD]
    with pytest.raises(ValueError, match="task loss"):
        M.Compose([M.create("gd"), M.create("er")])


def test_hooks_need_setup():
    with pytest.raises(ValueError, match="setup"):
        M.create("finetune").loss(build_unet("tiny", num_classes=2, sample_size=8),
                                  {"x": torch.zeros(1, 1, 8, 8), "y": torch.zeros(1, dtype=torch.long)})


def check_gradients(name):
    def check(model, method):
        # Gradients of every term reach trainable parameters, never a frozen teacher.
        x, y, _ = tiny_tasks(1)
        terms = method.loss(model, {"x": x[8:12], "y": y[8:12]})
        params = trainable_parameters(model)
        for k, v in terms.items():
            grads = torch.autograd.grad(v, params, retain_graph=True, allow_unused=True)
            assert any(g is not None and g.abs().sum() > 0 for g in grads), (name, k)
        sum(terms.values()).backward()
        for mod in frozen_modules(method):
            assert all(not p.requires_grad and p.grad is None for p in mod.parameters()), name
        model.zero_grad(set_to_none=True)
    return check


@pytest.mark.parametrize("name", class_methods())
def test_method_runs_two_tasks(name):
    model, method, history = run_two_tasks(name, check=check_gradients(name))
    for task_index, terms in history:
        assert "task" in terms
        for k, v in terms.items():
            assert v.dim() == 0 and math.isfinite(v.item()), (name, k, v)
    last = history[-1][1]
    assert set(last) - {"task"} == tiny(name).terms, (name, set(last))
    assert set(history[0][1]) == {"task"}  # nothing to consolidate during the first task
    assert len(frozen_modules(method)) == len(tiny(name).frozen), name


# ------------------------------------------------------------------ the registry and the declarations
def test_every_registered_method_declares_its_tiny_run():
    """A registered method cannot be skipped by the generic tests: each class declares its own `tiny`
    (not inherited: a subclass's terms differ), with hyperparameters it accepts."""
    for name, cls in M.single_methods().items():
        assert isinstance(cls.__dict__.get("tiny"), M.TinyRun), f"{name}: {cls.__name__} declares no `tiny`"
    for name in M.available():
        M.create(name, **tiny(name).config)  # the declared settings are valid hyperparameters


def test_builtin_declarations_keep_the_expectations():
    for name in REQUIRED:
        run = tiny(name)
        assert M.create(name, **run.config).config == M.create(name, **FAST.get(name, {})).config, name
        assert run.terms == TERMS[name], name
        assert len(run.frozen) == FROZEN.get(name, 0), name


def test_model_needs_have_checks():
    from cdgfast.methods import TinyRun

    assert set(NEED_CHECKS) == set(TinyRun.NEEDS)
    with pytest.raises(ValueError, match="needs"):
        TinyRun(needs={"a_gpu"})
    with pytest.raises(ValueError, match="terms"):
        TinyRun(terms="kd")


def test_available_keeps_its_order():
    assert M.available() == REQUIRED


def test_register_refuses_taken_and_malformed_names(monkeypatch):
    monkeypatch.setattr(_registry, "_ENTRIES", dict(_registry._ENTRIES))  # registrations here are undone
    with pytest.raises(ValueError, match="already registered"):
        @M.register("ewc")
        class Other(M.Method):
            pass
    for bad in ("", "a b", "x+y", 3):
        with pytest.raises(ValueError, match="name"):
            M.register(bad)
    with pytest.raises(ValueError, match="order"):
        M.register("fine", order="first")
    with pytest.raises(ValueError, match="Method subclass"):
        M.register("notamethod")(dict)
    with pytest.raises(ValueError, match="members"):
        M.register_composition("ewc+ewc", "ewc", "ewc")
    M.register_composition("ewc+nope", "ewc", "nope")
    with pytest.raises(ValueError, match="nope"):
        M.create("ewc+nope")


def test_a_registered_method_is_listed_built_and_composed(monkeypatch):
    monkeypatch.setattr(_registry, "_ENTRIES", dict(_registry._ENTRIES))

    @M.register("mine", order=55)
    class Mine(M.Method):
        defaults = {"w": 1.0}
        specs = {"w": nonneg()}
        tiny = M.TinyRun(terms={"mine"})

    M.register_composition("mine+gd", "mine", "gd")
    names = M.available()
    assert names.index("mine") == names.index("l2") + 1 and names[-1] == "mine+gd"
    assert Mine.name == "mine" and M.method_class("mine") is Mine and M.members("mine+gd") == ["mine", "gd"]
    m = M.create("mine+gd", w=2.0, pool_per_class=3)
    assert [x.name for x in m.members] == ["mine", "gd"] and m.config["mine.w"] == 2.0
    run = M.tiny_run("mine+gd")
    assert run.terms == {"mine", "gd"} and run.frozen == ("teacher",)
    assert run.config == {"gd.pool_per_class": 3, "gd.pool_steps": 2}
    with pytest.raises(ValueError, match="w: expected a number >= 0"):
        M.create("mine", w=-1)


def test_package_scan_registers_every_public_module(tmp_path, monkeypatch):
    """How a new method file is found: every module of the package whose name does not start with "_"
    is imported, so its decorator runs."""
    monkeypatch.setattr(_registry, "_ENTRIES", dict(_registry._ENTRIES))
    pkg = tmp_path / "scanpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "newmethod.py").write_text(
        "from cdgfast.methods import Method, TinyRun, register\n"
        "@register('scanned')\nclass Scanned(Method):\n    tiny = TinyRun()\n")
    (pkg / "_private.py").write_text("raise RuntimeError('a private module is not imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _registry.import_method_modules("scanpkg", [str(pkg)]) == ["newmethod"]
    assert "scanned" in M.available() and M.create("scanned").name == "scanned"


def test_gd_online_replay_uses_two_step_ddim():
    model, m, history = run_two_tasks("gd", replay="online", replay_batch=3)
    assert m.pool_x is None and m.config["online_steps"] == 2
    assert set(history[-1][1]) == {"task", "gd"}


def test_gd_guided_replay_pool_and_its_refusal(monkeypatch):
    """replay_guidance / replay_eta reach the pool's sampler; guiding towards a null class that label_dropout = 0
    never trains is refused at construction."""
    import cdgfast.methods.distill as distill

    with pytest.raises(ValueError, match="label_dropout"):
        M.create("gd", replay_guidance=3.0)
    with pytest.raises(ValueError, match="replay_eta"):
        M.create("gd", replay_eta=1.5)
    seen = []
    real = distill.generate_replay_pool

    def spy(*a, **kw):
        seen.append((kw["guidance"], kw["eta"]))
        return real(*a, **kw)

    monkeypatch.setattr(distill, "generate_replay_pool", spy)
    model, m, _ = run_two_tasks("gd", replay_guidance=2.5, replay_eta=1.0, label_dropout=0.2)
    assert seen and set(seen) == {(2.5, 1.0)} and m.pool_x.shape[0] > 0


def _flat_size(model):
    return sum(p.numel() for p in trainable_parameters(model))


def test_state_shapes_after_tasks():
    model, m, _ = run_two_tasks("rank1")
    P = _flat_size(model)
    assert m.anchors.shape == (2, P) and m.directions.shape == (2, P) and m.coeffs.shape == (2,)
    assert torch.all(m.coeffs > 0)

    model, m, _ = run_two_tasks("ewc")
    assert len(m.weights) == 1 and m.weights[0].shape == (_flat_size(model),) and len(m.anchors) == 1
    model, m, _ = run_two_tasks("diag")
    assert len(m.weights) == 2 and all(w.shape == (_flat_size(model),) for w in m.weights)
    assert all(torch.all(w >= 0) for w in m.weights)

    model, m, _ = run_two_tasks("gd")
    assert m.pool_x.shape == (4 * 3, 1, 8, 8) and sorted(m.pool_y.unique().tolist()) == [0, 1, 2, 3]
    assert all(not p.requires_grad for p in m.teacher.parameters()) and not m.teacher.training

    model, m, _ = run_two_tasks("er")
    assert len(m.buffer) == 16
    model, m, _ = run_two_tasks("dsc")
    assert len(m.task_models) == 2 and m.task_models[0].shape == (_flat_size(model),)
    assert len(m.teacher_history) == 2 and m.task_classes == [[0, 1], [2, 3]]


@pytest.mark.parametrize("name", class_methods())  # every method: the mixins' and each own state
def test_state_dict_round_trip(name):
    model, m, _ = run_two_tasks(name)
    state = m.state_dict()
    fresh = M.create(name, **tiny(name).config)
    fresh.setup(num_classes=NUM_CLASSES, schedule=NoiseSchedule(), device="cpu")
    fresh.load_state_dict(state)
    assert_same_next_task_losses(model, m, fresh)


def assert_same_next_task_losses(model, m, other):
    """Two methods that hold the same state give the same loss terms on the next task (task 3 of
    run_two_tasks' data): the check of every state round trip, in memory or through files."""
    x, y, _ = tiny_tasks(2)
    batch = {"x": x[8:12], "y": y[8:12]}
    task = Task(index=2, classes=[2, 3], indices=torch.arange(8, 16))
    m.begin_task(model, task)
    other.begin_task(model, task)
    a, b = m.loss(model, batch), other.loss(model, batch)
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_label_dropout_uses_null_class():
    m = M.create("finetune", label_dropout=0.5)
    m.setup(num_classes=NUM_CLASSES, schedule=NoiseSchedule())
    nb = m.noisy_batch(torch.zeros(400, 1, 2, 2), torch.zeros(400, dtype=torch.long), dropout=True)
    frac = (nb["y"] == NUM_CLASSES).float().mean().item()
    assert set(nb["y"].unique().tolist()) == {0, NUM_CLASSES} and 0.4 < frac < 0.6
    assert torch.all(m.noisy_batch(torch.zeros(5, 1, 2, 2), torch.zeros(5, dtype=torch.long))["y"] == 0)


# ------------------------------------------------------------------ declared hyperparameters
def test_every_hyperparameter_of_every_method_has_a_spec():
    from cdgfast.methods._hparams import HP, merged_specs

    for name, cls in M.single_methods().items():
        defaults, specs = merged_defaults(cls), merged_specs(cls)
        assert set(defaults) == set(specs), (name, sorted(set(defaults) ^ set(specs)))
        assert all(isinstance(s, HP) for s in specs.values()), name
        for key, value in defaults.items():  # the defaults themselves are valid, and kept as they are
            assert specs[key].check(key, value, name) == (tuple(value) if isinstance(value, tuple) else value), key
    for name in M.available():  # compositions are made of the single methods, so they are covered too
        assert isinstance(M.create(name), M.Method)


def _bad_values(spec):
    """Values `spec` must refuse: the wrong type, and each side of its range."""
    bad = {"bool": ["maybe", 1, None], "choice": ["nope", 1, None], "names": [3, [], [""], None],
           "str": ["", 3, None]}.get(spec.kind)
    if bad is not None:
        return bad
    bad = ["abc", True, float("nan")] + ([2.5] if spec.kind == "int" else [float("inf")])
    if not spec.none:
        bad.append(None)
    if spec.lo is not None:
        bad.append(spec.lo if spec.lo_open else spec.lo - 1)
    if spec.hi is not None:
        bad.append(spec.hi if spec.hi_open else spec.hi + 1)
    return bad


@pytest.mark.parametrize("name", sorted(M.single_methods()))
def test_every_hyperparameter_refuses_wrong_type_and_range(name):
    from cdgfast.methods._hparams import merged_specs

    for key, spec in merged_specs(M.method_class(name)).items():
        for value in _bad_values(spec):
            with pytest.raises(ValueError) as e:
                M.create(name, **{key: value})
            msg = str(e.value)
            assert msg.startswith(f"{key}:") and spec.describe() in msg and repr(value) in msg, (name, key, msg)


@pytest.mark.parametrize("name, overrides, valid", [
    # the values of issue 10: accepted before, and then crashing (or silently wrong) mid-run
    ("rank1", {"lam": "abc"}, "a number >= 0"), ("rank1", {"lam": -1}, "a number >= 0"),
    ("ewc", {"gamma": -2}, "a number >= 0"), ("rank1", {"fisher_max_samples": 0}, "an integer >= 1 or None"),
    ("ewc", {"online": "maybe"}, "True or False"), ("gd", {"pool_per_class": 2.5}, "an integer >= 1"),
    ("rank1+gd", {"lam": -1}, "a number >= 0"), ("rank1+gd", {"gd.pool_per_class": 2.5}, "an integer >= 1"),
    ("agem", {"replay_batch": None}, "an integer >= 1"), ("finetune", {"label_dropout": 1.0}, "[0, 1)"),
])
def test_bad_hyperparameters_refused_naming_key_and_range(name, overrides, valid):
    key = next(iter(overrides)).split(".")[-1]
    with pytest.raises(ValueError, match=rf"^{key}: expected .*{re.escape(valid)}"):
        M.create(name, **overrides)
    cls = M.single_methods().get(name)
    if cls is not None:  # the constructors check too, not only create()
        with pytest.raises(ValueError, match=rf"^{key}:"):
            cls(**overrides)


def test_hyperparameters_are_normalised():
    m = M.create("rank1+gd", lam=100, pool_per_class=3)
    assert m.config["rank1.lam"] == 100.0 and isinstance(m.config["rank1.lam"], float)
    assert isinstance(m.config["gd.pool_per_class"], int)
    assert M.create("clora", target_modules="to_q").config["target_modules"] == ("to_q",)
    assert M.create("clora", target_modules=["to_q", "to_k"]).config["target_modules"] == ("to_q", "to_k")
    assert M.create("ewc", fisher_max_samples=None).config["fisher_max_samples"] is None
