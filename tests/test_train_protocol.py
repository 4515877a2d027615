"""The paper protocols (issue 13): --print-config for every preset and scale against PROTOCOLS.md, and the
pieces behind it against naive references: forgetting / T, leading DDIM spacing, the cosine warm-up
schedule, per-task class-balanced FID labels, GD's task-fraction weighting, rank1's coefficient, no
end_task work after the last task, and an unconditional run end to end."""
import copy
import json
import math
import re
from pathlib import Path

import pytest
import torch

from cdgfast.train import RunConfig, run
from cdgfast.train.cli import main
from cdgfast.train.presets import PRESETS, SCALES, ScaleConfig

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = {"preset", "scale", "data", "model", "training", "evaluation", "methods"}
TINY = dict(scale="smoke", steps=2, fid_samples=3, num_tasks=2, progress=False)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("clf_cache"))


def print_config(capsys, *argv):
    assert main(list(argv) + ["--print-config"]) == 0
    return json.loads(capsys.readouterr().out)


def lookup(cfg: dict, path: str):
    for part in path.split("."):
        cfg = cfg[part]
    return cfg


def protocol_table():
    text = (ROOT / "PROTOCOLS.md").read_text()
    body = text.split("<!-- protocol-table:start -->")[1].split("<!-- protocol-table:end -->")[0]
    rows = []
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == 4, line
        rows.append((cells[0], cells[1], cells[2], json.loads(cells[3])))
    return rows


# ------------------------------------------------------------------------------------------ print-config
def test_print_config_of_every_preset_at_every_scale(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # it must write nothing (no runs/ folder)
    for name in PRESETS:
        for scale in SCALES:
            cfg = print_config(capsys, "--preset", name, "--scale", scale)
            assert REQUIRED <= set(cfg), (name, scale)
            assert cfg["preset"] == name and cfg["scale"] == scale
            ev, tr, model = cfg["evaluation"], cfg["training"], cfg["model"]
            assert {"fid_backbone", "fid_samples_per_task", "sampler", "sampler_steps", "ddim_spacing"} <= set(ev)
            assert {"optimizer", "lr", "lr_schedule", "grad_clip", "batch_size", "epochs_per_task",
                    "steps_per_task"} <= set(tr)
            assert "warmup_steps" in tr["lr_schedule"]
            assert "class_conditional" in model and "diffusers_config" in model
            assert model["diffusers_config"]["num_class_embeds"] == (
                cfg["data"]["num_classes"] + 1 if model["class_conditional"] else None)
            assert set(cfg["methods"]) == set(PRESETS[name].methods)
            for m, hp in cfg["methods"].items():
                # a composed method lists each member's hyperparameters as "member.key"
                members = m.split("+") if "+" in m else [m]
                seeds = ["seed"] if len(members) == 1 else [f"{x}.seed" for x in members]
                assert set(seeds) <= set(hp), (name, m)
    assert list(tmp_path.iterdir()) == []


def test_print_config_matches_protocols_md(capsys):
    rows = protocol_table()
    assert len(rows) >= 40 and {r[0] for r in rows} >= {"rank1-mnist", "ccd-cifar100-512", "gd-fmnist", "default"}
    cache = {}
    for preset, scale, field, value in rows:
        if (preset, scale) not in cache:
            cache[preset, scale] = print_config(capsys, "--preset", preset, "--scale", scale)
        assert lookup(cache[preset, scale], field) == value, (preset, scale, field)


def test_print_config_is_what_the_run_uses(capsys):
    """--set, --method and --batch-size reach the printout through the run's own resolution."""
    cfg = print_config(capsys, "--preset", "rank1-mnist", "--scale", "paper", "--method", "rank1+gd",
                       "--set", "rank1.coeff=one", "--set", "gd.lam_gd=2.5", "--batch-size", "64")
    assert list(cfg["methods"]) == ["rank1+gd"]
    hp = cfg["methods"]["rank1+gd"]
    assert hp["rank1.coeff"] == "one" and hp["gd.lam_gd"] == 2.5
    assert cfg["training"]["batch_size"] == 64
    from cdgfast.train.loop import _build_method, resolve
    preset, sc, methods, _ = resolve(RunConfig(preset="ccd-mnist-512", scale="paper"))
    printed = print_config(capsys, "--preset", "ccd-mnist-512", "--scale", "paper")
    for m in methods:  # the run's method configs, as JSON
        built = json.loads(json.dumps(_build_method(m, preset, "paper", 0)[0].config, default=str))
        assert printed["methods"][m] == built
    assert printed["training"]["batch_size_per_method"]["er"] == sc.batch_size_for("er") == 128
    assert main(["--preset", "default", "--set", "rank1.coeff=half", "--print-config"]) == 2


def test_print_config_refuses_bad_values(capsys):
    assert main(["--preset", "default", "--method", "rank1", "--set", "rank1.coeff='half'",
                 "--print-config"]) == 2
    assert "coeff" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("t", [2, 3, 5])
def test_forgetting_is_divided_by_t(t):
    from cdgfast.metrics import forgetting

    g = torch.Generator().manual_seed(t)
    m = torch.full((t, t), float("nan"), dtype=torch.float64)
    for k in range(t):
        m[k, :k + 1] = torch.rand(k + 1, generator=g, dtype=torch.float64) * 100
    naive = 0.0
    for k in range(t):  # the paper's sum over k = 1..T (its last term is 0)
        naive += float(m[t - 1, k]) - float(m[k, k])
    assert forgetting(m) == pytest.approx(naive / t, rel=1e-12)


# --------------------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize("n", [1, 3, 7, 50, 999])
def test_leading_ddim_spacing_is_the_official_list(n):
    from cdgfast.diffusion import NoiseSchedule
    from cdgfast.sampling import make_ddim_scheduler

    sched = make_ddim_scheduler(NoiseSchedule(), n, timestep_spacing="leading")
    ratio = 1000 // n  # diffusers' "leading", steps_offset 0 (the official rank-1 code's DDIMScheduler defaults)
    naive = [ratio * i for i in range(n - 1, -1, -1)]
    assert [int(t) for t in sched.timesteps] == naive


def test_leading_ddim_sample_matches_a_naive_loop():
    from cdgfast.diffusion import NoiseSchedule
    from cdgfast.sampling import ddim_sample
    from test_sampling import randomised_tiny_unet

    model = randomised_tiny_unet(3)
    labels = torch.tensor([0, 1, 2])
    n = 7
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    abar, prod = [], 1.0
    for b in betas:
        prod *= 1.0 - b
        abar.append(prod)
    ts = [(1000 // n) * i for i in range(n - 1, -1, -1)]
    g = torch.Generator().manual_seed(11)
    x = torch.randn((3, 1, 8, 8), generator=g, dtype=torch.float32).double()
    with torch.no_grad():
        for i, t in enumerate(ts):
            a_t, a_p = abar[t], (abar[ts[i + 1]] if i + 1 < n else 1.0)
            eps = model(x, torch.full((3,), t, dtype=torch.long), class_labels=labels).sample
            x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)
            x = math.sqrt(a_p) * x0 + math.sqrt(1 - a_p) * eps
    out = ddim_sample(model, labels, schedule=NoiseSchedule(), num_steps=n, timestep_spacing="leading",
                      generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(out, x.clamp(-1, 1), rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------- training loop
def test_cosine_warmup_schedule_matches_a_naive_formula():
    from cdgfast.train.protocol import make_optimizer

    sc = ScaleConfig(lr=1e-3, lr_schedule="cosine", warmup_steps=5)
    total = 23
    w = torch.nn.Parameter(torch.zeros(3))
    opt, sched = make_optimizer([w], sc, total)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        w.grad = torch.ones(3)
        opt.step()
        sched.step()
    naive = []
    for s in range(total):  # diffusers' get_cosine_schedule_with_warmup, written out
        if s < 5:
            naive.append(1e-3 * s / 5)
        else:
            naive.append(1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 5) / (total - 5))))
    assert seen == pytest.approx(naive, rel=1e-12, abs=1e-15)
    # the default loop: plain Adam, no scheduler at all
    opt, sched = make_optimizer([w], ScaleConfig(), 10)
    assert sched is None and type(opt) is torch.optim.Adam and opt.param_groups[0]["lr"] == 2e-4


def test_bad_training_options_refused():
    from cdgfast.train.protocol import check_scale_config

    for field, value in (("optimizer", "sgd"), ("lr_schedule", "step"), ("warmup_steps", -1), ("grad_clip", 0.0),
                         ("dropout", 1.0), ("ddim_spacing", "middle"), ("fid_protocol", "all"),
                         ("class_order", "random"), ("channels", 2), ("fid_samples_per_task", 1),
                         ("ddim_eta", 1.5), ("ddim_eta", -0.1), ("guidance", -1.0), ("guidance", float("nan")),
                         ("guidance", True), ("label_dropout", 1.0), ("label_dropout", "0.1")):
        with pytest.raises(ValueError, match=field):
            check_scale_config(ScaleConfig(**{field: value}))
    with pytest.raises(ValueError, match="fid_protocol"):
        check_scale_config(ScaleConfig(class_conditional=False))
    with pytest.raises(ValueError, match="guidance"):
        check_scale_config(ScaleConfig(class_conditional=False, fid_protocol="seen_classes", fid_samples_total=8,
                                       guidance=2.0))


def test_guided_default_is_printed_and_needs_label_dropout(capsys):
    """The embedded default samples with guidance 3 and eta 1 (evaluation and GD's pool); a method whose null
    class would be untrained (label_dropout 0) is refused before any work, for every method of the preset."""
    cfg = print_config(capsys, "--preset", "default", "--scale", "cpu")
    assert cfg["evaluation"]["guidance"] == 3.0 and cfg["evaluation"]["ddim_eta"] == 1.0
    hp = cfg["methods"]
    assert hp["gd"]["label_dropout"] == 0.1 and hp["gd"]["replay_guidance"] == 3.0 and hp["gd"]["replay_eta"] == 1.0
    assert hp["finetune"]["label_dropout"] == 0.1 and hp["rank1+gd"]["gd.label_dropout"] == 0.1
    # the scale's label dropout reaches every method, not only the preset's three
    for m in ("er", "ewc", "diag+gd"):
        other = print_config(capsys, "--preset", "default", "--scale", "cpu", "--method", m)["methods"][m]
        assert all(v == 0.1 for k, v in other.items() if k.endswith("label_dropout")), (m, other)
    for m, member in (("finetune", "finetune"), ("gd", "gd"), ("rank1+gd", "gd")):
        assert main(["--preset", "default", "--method", m, "--set", f"{member}.label_dropout=0", "--print-config"]) == 2
        assert "label_dropout" in capsys.readouterr().err
    # the paper presets keep the papers' unguided DDIM
    paper = print_config(capsys, "--preset", "rank1-mnist", "--scale", "paper")
    assert paper["evaluation"]["guidance"] == 1.0 and paper["evaluation"]["ddim_eta"] == 0.0
    assert paper["methods"]["gd"]["replay_guidance"] == 1.0


def test_guidance_reaches_the_evaluation_sampler(tmp_path, cache_dir, monkeypatch):
    """A scale with guidance / ddim_eta: every evaluation sample is drawn with them, and the protocol says so."""
    from cdgfast import sampling
    from cdgfast.train import presets

    p = copy.deepcopy(PRESETS["default"])
    p.scales["smoke"].guidance, p.scales["smoke"].ddim_eta = 2.0, 1.0
    p.scales["smoke"].method_overrides["finetune"] = {"label_dropout": 0.2}
    monkeypatch.setitem(presets.PRESETS, "default", p)
    seen = []
    real = sampling.ddim_sample

    def spy(model, labels, **kw):
        seen.append((kw.get("guidance", 1.0), kw.get("eta", 0.0)))
        return real(model, labels, **kw)

    monkeypatch.setattr(sampling, "ddim_sample", spy)
    res = run(RunConfig(**TINY, out=str(tmp_path / "g"), cache_dir=cache_dir, methods=["finetune"]))
    assert seen and set(seen) == {(2.0, 1.0)}
    assert res["protocol"]["sampler"]["guidance"] == 2.0 and res["protocol"]["sampler"]["eta"] == 1.0


@pytest.mark.parametrize("cpt, expected", [(2, [1024, 1024]), (10, [205] * 8 + [204] * 2), (20, [103] * 8 + [102] * 12)])
def test_ccd_fid_is_2048_class_balanced_samples_per_task(cpt, expected):
    from cdgfast.train.presets import get_preset
    from cdgfast.train.protocol import fid_labels

    name = {2: "ccd-mnist-512", 10: "ccd-cifar100-512", 20: "ccd-cub200-512"}[cpt]
    sc = get_preset(name).scale("paper")
    tasks = [list(range(i * cpt, (i + 1) * cpt)) for i in range(3)]
    labels = fid_labels(sc, tasks)
    assert labels.numel() == 3 * 2048
    for i, classes in enumerate(tasks):
        counts = [int((labels == c).sum()) for c in classes]
        assert counts == expected and sum(counts) == 2048
    # without a per-task count: every class fid_samples_per_class times (the evaluator as it always was)
    plain = fid_labels(ScaleConfig(fid_samples_per_class=7), [[3, 1], [0, 2]])
    assert plain.tolist() == [3] * 7 + [1] * 7 + [0] * 7 + [2] * 7


# ------------------------------------------------------------------------------------------------ methods
def _tiny_method(name, **kw):
    from cdgfast.diffusion import NoiseSchedule
    from cdgfast.methods import create

    m = create(name, seed=5, **kw)
    m.setup(num_classes=4, schedule=NoiseSchedule())
    return m


def _batches(g, n=3, b=4):
    return [(torch.rand(b, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 4, (b,), generator=g)) for _ in range(n)]


def test_rank1_coeff_one_versus_optimal():
    from cdgfast.data import Task
    from cdgfast.fisher import rank1_fisher
    from cdgfast.models import build_unet
    from cdgfast.params import flatten

    torch.manual_seed(0)
    model = build_unet("tiny", num_classes=4, sample_size=8)
    data = _batches(torch.Generator().manual_seed(1))
    task = Task(index=0, classes=[0, 1, 2, 3], indices=torch.arange(4))
    out = {}
    for coeff in ("optimal", "one"):
        m = _tiny_method("rank1", coeff=coeff, lam=3.0)
        m.begin_task(model, task)
        m.end_task(model, data)
        out[coeff] = m
    opt, one = out["optimal"], out["one"]
    torch.testing.assert_close(opt.directions, one.directions)  # the same mu from the same draws
    assert one.coeffs.tolist() == [1.0]
    # c* from the tested estimator with the method's own draws (a fresh method, same seed)
    ref = _tiny_method("rank1")
    est = rank1_fisher(model, ref.loss_fn, ref.fresh_batches(data))
    assert float(opt.coeffs[0]) == pytest.approx(float(est.coeff), rel=1e-6)
    # the penalty: lam/2 * c * (mu . (theta - theta*))^2, in float64
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    theta = flatten([p for p in model.parameters() if p.requires_grad]).double()
    for m in (opt, one):
        d = float(torch.dot(m.directions[0].double(), theta - m.anchors[0].double()))
        naive = 3.0 * 0.5 * float(m.coeffs[0]) * d * d
        # float32 penalty vs float64 naive: mu . (theta - theta*) sums P terms that cancel
        assert float(m.extra_terms(model, None)["rank1"]) == pytest.approx(naive, rel=1e-3)


@pytest.mark.parametrize("in_task", [False, True])
def test_gd_task_fraction_weighting_matches_a_naive_formula(in_task):
    from cdgfast.data import Task
    from cdgfast.methods.base import with_replay
    from cdgfast.models import build_unet

    torch.manual_seed(0)
    model = build_unet("tiny", num_classes=4, sample_size=8)
    gd = _tiny_method("gd", weighting="task_fraction", replay_in_task_loss=in_task, lam_gd=2.0, replay="pool",
                      pool_per_class=2, pool_steps=2, replay_batch=3)
    data = _batches(torch.Generator().manual_seed(2))
    for k in range(2):  # two tasks behind: weights 1/3 and 2/3 at the third
        gd.begin_task(model, Task(index=k, classes=[2 * k, 2 * k + 1], indices=torch.arange(4)))
        gd.end_task(model, data)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # student != teacher
    gd.begin_task(model, Task(index=2, classes=[0, 1], indices=torch.arange(4)))
    x, y = data[0]
    state = gd.generator.get_state()
    terms = gd.loss(model, {"x": x, "y": y})
    # the same draws again, then the loss written out in float64
    gd.generator.set_state(state)
    rep = gd.replay(3, x)
    nb = gd.noisy_batch(*with_replay(x, y, rep), dropout=True)
    with torch.no_grad():
        pred = model(nb["x_t"] if "x_t" in nb else gd.schedule.add_noise(nb["x"], nb["eps"], nb["t"]),
                     nb["t"], class_labels=nb["y"]).sample.double()
        xt_rep = gd.schedule.add_noise(nb["x"][4:], nb["eps"][4:], nb["t"][4:])
        teacher = gd.teacher(xt_rep, nb["t"][4:], class_labels=nb["y"][4:]).sample.double()
    eps = nb["eps"].double()
    data_mse = float(((pred[:4] - eps[:4]) ** 2).mean())
    rep_mse = float(((pred[4:] - eps[4:]) ** 2).mean())
    distill = float(((pred[4:] - teacher) ** 2).mean())
    task = data_mse / 3 + (2 / 3 * rep_mse if in_task else 0.0)
    assert float(terms["task"]) == pytest.approx(task, rel=1e-4)
    assert float(terms["gd"]) == pytest.approx(2 / 3 * 2.0 * distill, rel=1e-4)


@pytest.mark.parametrize("name", ["rank1+gd", "rankk+gd"])
def test_no_end_task_work_after_the_last_task(name):
    from cdgfast.data import Task
    from cdgfast.models import build_unet

    torch.manual_seed(0)
    model = build_unet("tiny", num_classes=4, sample_size=8)
    data = _batches(torch.Generator().manual_seed(3))
    m = _tiny_method(name, **{"gd.pool_per_class": 2, "gd.pool_steps": 2})
    m.begin_task(model, Task(index=0, classes=[0, 1], indices=torch.arange(4)))
    m.end_last_task(model, data)
    fisher, gd = m.members
    assert fisher.anchors is None and gd.teacher is None and gd.pool_x is None  # nothing prepared
    assert m.seen_classes == [0, 1]  # the bookkeeping still done
    lora = _tiny_method("lora_seq", rank=2)  # its end_task merges the adapter into the model: it still runs
    assert not lora.prepares_next_task


# ------------------------------------------------------------------------------------------ the driver
def test_run_skips_end_task_after_the_last_task_and_resumes(tmp_path, cache_dir):
    from cdgfast.train.checkpoint import load_checkpoint

    out = tmp_path / "run"
    res = run(RunConfig(**TINY, out=str(out), cache_dir=cache_dir, preset="default", methods=["rank1+gd"]))
    ck = load_checkpoint(out, "rank1+gd")
    state = ck["method_state"]
    assert state["rank1"]["anchors"].shape[0] == 1  # a Fisher after task 1 only (T = 2)
    assert state["gd"]["pool_y"] is not None and set(state["gd"]["pool_y"].tolist()) == set(ck["method_state"]
                                                                                             ["gd"]["seen_classes"][:2])
    again = run(RunConfig(**TINY, out=str(out), cache_dir=cache_dir, preset="default", methods=["rank1+gd"],
                          resume=True))
    assert again["methods"]["rank1+gd"]["mf"] == res["methods"]["rank1+gd"]["mf"]


def test_unconditional_gd_fmnist_smoke_run_end_to_end(tmp_path, cache_dir, capsys):
    from cdgfast.train.checkpoint import load_checkpoint

    out = tmp_path / "gd"
    res = run(RunConfig(**{**TINY, "fid_samples": 4}, out=str(out), cache_dir=cache_dir, preset="gd-fmnist",
                        dataset="digits"))
    assert list(res["methods"]) == ["gr", "gd"]
    assert res["protocol"]["fid_protocol"] == "seen_classes" and res["protocol"]["fid_samples_total"] == 40
    tasks = res["data"]["tasks"]
    assert sorted(c for t in tasks for c in t) != [c for t in tasks for c in t] or tasks == [[0, 1], [2, 3]]
    for name, r in res["methods"].items():
        assert r["fid"][1][0] == r["fid"][1][1] and r["mf"] == pytest.approx(r["fid"][1][0])  # one FID a task
        assert math.isfinite(r["kld"]) and r["kld"] >= 0
        assert all(math.isnan(a) for a in r["classifier_accuracy_on_samples"])
        ck = load_checkpoint(out, name)
        assert not any("class_embedding" in k for k in ck["model"])  # an unconditional UNet
        assert (out / "samples" / f"{name}_task2.png").is_file()
    assert res["methods"]["gd"]["method_config"]["weighting"] == "task_fraction"


def test_seeded_class_order_follows_the_seed(tmp_path, cache_dir):
    from cdgfast.train.loop import _load_inputs, _open_session, _Where, RunCallbacks

    orders = []
    for seed in (0, 1):
        cfg = RunConfig(**TINY, out=str(tmp_path / f"s{seed}"), cache_dir=cache_dir, preset="gd-fmnist",
                        dataset="digits", seed=seed)
        s = _open_session(cfg, RunCallbacks(), _Where())
        orders.append([t.classes for t in _load_inputs(s).tasks])
    assert orders[0] != orders[1]
    for o in orders:
        assert len({c for t in o for c in t}) == 4


def test_training_options_reach_the_loop(tmp_path, cache_dir, monkeypatch):
    """A preset with cosine warm-up, clipping, dropout, leading DDIM, RGB and a per-task FID count runs,
    and the loop clips and schedules what the ScaleConfig says (observed on the optimiser)."""
    from cdgfast.train import presets
    from cdgfast.train import protocol

    p = copy.deepcopy(PRESETS["ccd-mnist-512"])
    p.name = "ccd-test"
    p.scales["smoke"] = ScaleConfig(**{**vars(p.scales["smoke"]), "lr_schedule": "cosine", "warmup_steps": 2,
                                       "grad_clip": 0.5, "dropout": 0.1, "ddim_spacing": "leading",
                                       "channels": 3, "fid_samples_per_task": 6,
                                       "method_batch_size": {"er": 8}})
    monkeypatch.setitem(presets.PRESETS, "ccd-test", p)
    seen = {"lrs": [], "clipped": []}
    real_make, real_clip = protocol.make_optimizer, protocol.clip_gradients

    def make(params, sc, total):
        opt, sched = real_make(params, sc, total)
        seen["lrs"].append((total, opt))
        return opt, sched

    def clip(params, sc):
        real_clip(params, sc)
        seen["clipped"].append(float(torch.cat([q.grad.reshape(-1) for q in params if q.grad is not None]).norm()))

    monkeypatch.setattr(protocol, "make_optimizer", make)
    monkeypatch.setattr(protocol, "clip_gradients", clip)
    res = run(RunConfig(**{**TINY, "steps": 4, "fid_samples": None}, out=str(tmp_path / "c"), cache_dir=cache_dir,
                        preset="ccd-test", methods=["er"], dataset="digits"))
    r = res["methods"]["er"]
    assert res["data"]["channels"] == 3 and res["protocol"]["sampler"]["spacing"] == "leading"
    assert res["protocol"]["fid_samples_per_task"] == 6
    assert all(n <= 0.5 + 1e-5 for n in seen["clipped"]) and len(seen["clipped"]) == 8
    for total, opt in seen["lrs"]:  # after 4 steps of a 4-step task: 0.5 * (1 + cos(pi * 2 / 2)) = 0
        assert total == 4 and opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert math.isfinite(r["mf"])
    assert re.search(r"dropout", json.dumps(res["scale_config"]))
