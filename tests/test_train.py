"""python -m cdgfast.train: CLI names and errors, smoke runs of every preset family (shrunk with --steps /
--fid-samples / --num-tasks), resume after an injected crash reproducing an uninterrupted run, refusal
of an existing output directory, and the non-finite-loss stop."""
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cdgfast.train import NonFiniteLoss, RunConfig, RunError, run
from cdgfast.train.cli import main
from cdgfast.train.checkpoint import read_checkpoint
from cdgfast.train.presets import PRESETS
from train_hooks import HOOKED_CLI, InjectedCrash, OnStep, StopAt

TINY = dict(scale="smoke", steps=2, fid_samples=3, num_tasks=2, progress=False)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("clf_cache"))


def tiny_cfg(out, cache_dir, **kw):
    base = dict(TINY, out=str(out), cache_dir=cache_dir)
    base.update(kw)
    return RunConfig(**base)


def test_list_and_help_name_everything(capsys):
    from cdgfast.methods import available
    from cdgfast.data import DATASET_REGISTRY

    assert main(["--list"]) == 0
    listing = capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    helptext = capsys.readouterr().out
    for text in (listing, helptext):
        for name in list(PRESETS) + list(available()) + ["joint", "gr"] + list(DATASET_REGISTRY):
            assert name in text, name


@pytest.mark.parametrize("argv, what", [(["--preset", "nope"], "preset"), (["--method", "nope"], "method"),
                                        (["--dataset", "nope"], "dataset"), (["--scale", "huge"], "scale")])
def test_unknown_names_exit_2_listing_valid(argv, what, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "nope" in err or "huge" in err
    valid = {"preset": "rank1-mnist", "method": "rank1+gd", "dataset": "fashion-mnist", "scale": "smoke"}[what]
    assert valid in err


def test_run_api_rejects_unknown_names(tmp_path):
    with pytest.raises(RunError, match="expected one of"):
        run(RunConfig(methods=["nope"], out=str(tmp_path / "a")))
    with pytest.raises(RunError, match="expected one of"):
        run(RunConfig(preset="nope", out=str(tmp_path / "b")))
    with pytest.raises(RunError, match="expected one of"):
        run(RunConfig(dataset="nope", out=str(tmp_path / "c")))


@pytest.mark.parametrize("preset, methods, dataset", [
    ("default", ["gd", "finetune"], None),
    ("rank1-mnist", ["joint", "diag"], None),          # MNIST train set missing here -> substitution
    ("ccd-mnist-512", ["ccd"], "digits"),
    ("gd-fmnist", ["gr"], "digits"),
])
def test_smoke_preset_families(tmp_path, cache_dir, preset, methods, dataset):
    out = tmp_path / "run"
    res = run(tiny_cfg(out, cache_dir, preset=preset, methods=methods, dataset=dataset))
    assert list(res["methods"]) == methods
    for name, r in res["methods"].items():
        t = len(r["afid_at_k"])
        assert t == 2 and len(r["fid"]) == 2 and r["fid"][0][1] is None
        assert all(math.isfinite(v) for v in r["afid_at_k"]) and math.isfinite(r["forgetting"])
        assert r["mf"] == pytest.approx(r["afid_at_k"][-1])
        assert r["imf"] == pytest.approx(sum(r["afid_at_k"]) / 2)
        assert r["forgetting"] == pytest.approx((r["fid"][1][0] - r["fid"][0][0]) / 2)  # (1/T) sum_k, T = 2
        assert r["kld"] >= 0
        for k in (1, 2):
            assert (out / "samples" / f"{name}_task{k}.png").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved["metric"]["fid"] == "classifier-FID"
    assert set(saved["versions"]) >= {"torch", "python", "cdgfast"}
    for f in ("results.csv", "report.md", "afid.png", "train.log", "run.json"):
        assert (out / f).is_file(), f
    report = (out / "report.md").read_text()
    assert "classifier-FID" in report and "Beside the paper" in report
    if saved["data"]["used"] != saved["data"]["requested"]:  # e.g. MNIST train set missing -> MNIST test set
        assert saved["data"]["substitutions"], "a data substitution must be recorded"
        assert "substitution" in report
    if preset == "rank1-mnist":
        assert saved["data"]["requested"] == "mnist"
    if methods == ["gd", "finetune"]:
        # common random numbers: on task 1 both are plain training with the same draws -> the same model;
        # on task 2 gd's distillation makes them differ
        a, b = res["methods"]["gd"], res["methods"]["finetune"]
        assert a["fid"][0] == b["fid"][0] and a["loss_means"][0] == b["loss_means"][0]
        assert a["fid"][1] != b["fid"][1]


@pytest.mark.parametrize("how", ["exception", "sigkill"])
def test_resume_after_crash_reproduces_uninterrupted_run(tmp_path, cache_dir, how):
    kw = dict(methods=["rank1+gd"], num_tasks=2)
    full = run(tiny_cfg(tmp_path / "full", cache_dir, **kw))

    out = tmp_path / "crashed"
    if how == "exception":
        with pytest.raises(InjectedCrash):
            run(tiny_cfg(out, cache_dir, **kw), callbacks=StopAt("rank1+gd:1:1"))  # second task, first step
    else:  # the process is killed mid-task: no exception handler, no cleanup runs
        env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
        argv = ["--kill-at", "rank1+gd:1:2", "--scale", "smoke", "--steps", "2", "--fid-samples", "3", "--num-tasks",
                "2", "--method", "rank1+gd", "--out", str(out), "--cache-dir", cache_dir, "--no-progress"]
        proc = subprocess.run(HOOKED_CLI + argv, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == -9, proc.stderr[-2000:]
    ck = read_checkpoint(out / "checkpoints" / "rank1+gd.safetensors")
    assert ck["completed_task"] == 0
    assert not (out / "results.json").exists()
    # without --resume an unfinished run is refused
    with pytest.raises(RunError, match="--resume"):
        run(tiny_cfg(out, cache_dir, **kw))
    resumed = run(tiny_cfg(out, cache_dir, resume=True, **kw))
    a, b = full["methods"]["rank1+gd"], resumed["methods"]["rank1+gd"]
    for ra, rb in zip(a["fid"], b["fid"]):
        assert [x if x is None else pytest.approx(x, rel=1e-6) for x in ra] == rb
    assert b["kld_at_k"] == pytest.approx(a["kld_at_k"], rel=1e-6)
    assert b["loss_means"] == [pytest.approx(d, rel=1e-6) for d in a["loss_means"]]


def test_existing_output_dir_refused(tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    argv = ["--scale", "smoke", "--method", "finetune", "--steps", "1", "--fid-samples", "3", "--num-tasks", "1",
            "--out", str(out), "--cache-dir", cache_dir, "--no-progress", "--dataset", "digits"]
    assert main(argv) == 0
    assert main(argv) == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert main(argv + ["--resume"]) == 0  # everything is done: outputs rewritten from the checkpoints
    with pytest.raises(SystemExit) as e:
        main(argv + ["--resume", "--overwrite"])
    assert e.value.code == 2


def test_non_finite_loss_stops_naming_task_step_term(tmp_path, cache_dir):
    out = tmp_path / "run"

    def poison(name, k, step):
        if k == 1 and step == 1:
            with torch.no_grad():
                for p in poison.model.parameters():
                    p.fill_(float("nan"))

    from cdgfast.models import unet as U
    real_build = U.build_unet

    def spy(*a, **k):
        poison.model = real_build(*a, **k)
        return poison.model

    U.build_unet = spy
    try:
        with pytest.raises(NonFiniteLoss) as e:
            run(tiny_cfg(out, cache_dir, methods=["finetune"], steps=3), callbacks=OnStep(poison))
    finally:
        U.build_unet = real_build
    msg = str(e.value)
    assert "task 2" in msg and "step 2" in msg and "'task'" in msg
    ck = read_checkpoint(out / "checkpoints" / "finetune.safetensors")
    assert ck["completed_task"] == 0
    assert all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


def test_module_entry_point_lists():
    r = subprocess.run([sys.executable, "-m", "cdgfast.train", "--list"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "rank1-mnist" in r.stdout and "rank1+gd" in r.stdout


def test_missing_data_and_weights_exit_2_with_instructions(tmp_path, capsys):
    # paper scale never substitutes: CIFAR-10 is not on this machine
    code = main(["--preset", "rank1-cifar10", "--scale", "paper", "--out", str(tmp_path / "a"), "--no-progress",
                 "--data-root", str(tmp_path / "empty"), "--fid", "classifier"])
    err = capsys.readouterr().err
    if code == 0:  # pragma: no cover - a machine that has CIFAR-10
        pytest.skip("CIFAR-10 is present")
    assert code == 2 and "cifar-10-python.tar.gz" in err and "Download" in err
    code = main(["--scale", "smoke", "--out", str(tmp_path / "b"), "--no-progress",
                 "--inception", str(tmp_path / "missing.pt")])
    err = capsys.readouterr().err
    assert code == 2 and "missing.pt" in err and "does not exist" in err


def test_every_preset_builds_its_methods_at_every_scale():
    from cdgfast.train.loop import _build_method
    from cdgfast.train.presets import SCALES, get_preset

    for name in PRESETS:
        p = get_preset(name)
        assert p.num_tasks >= 1 and p.classes_per_task >= 1 and p.methods
        for scale in SCALES:
            sc = p.scale(scale)
            assert (sc.steps_per_task is None) != (sc.epochs_per_task is None)
            for m in p.methods:
                method, cumulative = _build_method(m, p, scale, seed=0)
                assert cumulative == (m == "joint")
    # paper settings the SPEC fixes
    r1 = get_preset("rank1-mnist")
    assert r1.scale("paper").lr == 2e-4 and r1.scale("paper").batch_size == 128 and r1.scale("paper").epochs_per_task == 200
    assert r1.overrides_for("rank1+gd", "paper")["pool_per_class"] == 5000
    assert get_preset("ccd-mnist-5120").overrides_for("er", "cpu")["buffer_size"] == 5120
    # CLoG: 2048 class-balanced samples per task (was 2048 over all classes, 204 per class)
    assert get_preset("ccd-mnist-5120").scale("paper").fid_samples_per_task == 2048
    assert get_preset("gd-fmnist").overrides_for("gd", "paper")["lam_gd"] == 3.0


def test_paper_unet_is_one_config_under_its_old_names():
    from cdgfast.models import UNET_ALIASES, UNET_CONFIGS, UNET_PRESETS, build_unet
    from cdgfast.train.presets import SCALES, get_preset

    configs = list(UNET_CONFIGS.values())  # one entry per architecture
    assert all(a != b for i, a in enumerate(configs) for b in configs[i + 1:])
    assert UNET_ALIASES == {"rank1-paper": "paper", "ccd-paper": "paper"}
    for alias in UNET_ALIASES:
        assert UNET_PRESETS[alias] is UNET_CONFIGS["paper"]
    used = {get_preset(n).scale(sc).unet for n in PRESETS for sc in SCALES}
    assert used <= set(UNET_PRESETS) and {"rank1-paper", "ccd-paper"} <= used  # results.json keeps the names
    with torch.device("meta"):  # shapes only, no 35M-parameter initialisation
        shapes = [[(n, p.shape) for n, p in build_unet(name, sample_size=8).named_parameters()]
                  for name in ("paper", "rank1-paper", "ccd-paper")]
    assert shapes[0] == shapes[1] == shapes[2]


def test_callbacks_must_be_run_callbacks(tmp_path):
    with pytest.raises(ValueError, match="callbacks: expected a cdgfast.train.RunCallbacks"):
        run(RunConfig(out=str(tmp_path / "a")), callbacks=lambda m, k, s: None)
    assert not (tmp_path / "a").exists()


def test_production_code_reads_no_test_hooks():
    """Crashes, kills and Ctrl-C in the tests come from tests/train_hooks.py callbacks, never from
    environment variables the driver would read."""
    import cdgfast

    for path in Path(cdgfast.__file__).parent.rglob("*.py"):
        text = path.read_text()
        for word in ("CDGFAST_CRASH_AT", "CDGFAST_KILL_AT", "CDGFAST_INTERRUPT_AT", "InjectedCrash"):
            assert word not in text, (path, word)


def test_set_overrides_method_hyperparameters(tmp_path, capsys):
    from cdgfast.train.loop import _build_method, parse_method_args
    from cdgfast.train.presets import get_preset

    assert parse_method_args(["rank1.lam=100", "gd.replay=pool", "ewc.online=False"]) == {
        "rank1": {"lam": 100}, "gd": {"replay": "pool"}, "ewc": {"online": False}}
    for bad in ("rank1lam=3", "rank1.lam", ".lam=3", "rank1.=3", "a.b.c=1"):
        with pytest.raises(ValueError, match="METHOD.KEY=VALUE"):
            parse_method_args([bad])
    preset = get_preset("rank1-mnist")
    # a member's value reaches that member of a composition and no other; the preset's value otherwise
    m, _ = _build_method("rank1+gd", preset, "cpu", 0, {"rank1": {"lam": 100.0}, "gd": {"lam_gd": 2.5}})
    assert [x.config.get("lam", x.config.get("lam_gd")) for x in m.members] == [100.0, 2.5]
    m, _ = _build_method("rank1+gd", preset, "cpu", 0, {})
    assert m.members[0].config["lam"] == 15000.0
    m, _ = _build_method("diag", preset, "cpu", 0, {"diag": {"lam": 7.0}})
    assert m.config["lam"] == 7.0
    # bad keys and methods outside the run fail before any work, with exit code 2
    out = tmp_path / "o"
    for argv, msg in ((["--method", "rank1+gd", "--set", "rank1.lamm=3"], "lamm"),
                      (["--method", "gd", "--set", "rank1.lam=3"], "not a method of this run"),
                      (["--set", "rank1lam=3"], "METHOD.KEY=VALUE")):
        with pytest.raises(SystemExit) if "KEY" in msg else contextlib.nullcontext():
            code = main(["--scale", "smoke", "--out", str(out), "--no-progress"] + argv)
            assert code == 2
        assert msg in capsys.readouterr().err
        assert not out.exists()



# ------------------------------------------------------------------ a run never loses finished work
SMOKE_ARGV = ["--scale", "smoke", "--steps", "1", "--fid-samples", "3", "--num-tasks", "1", "--no-progress"]


@pytest.mark.parametrize("item, key, valid", [
    ("rank1.lam=abc", "lam", "a number >= 0"), ("rank1.lam=-1", "lam", "a number >= 0"),
    ("ewc.gamma=-2", "gamma", "a number >= 0"), ("rank1.fisher_max_samples=0", "fisher_max_samples", "an integer >= 1"),
    ("ewc.online=maybe", "online", "True or False"), ("gd.pool_per_class=2.5", "pool_per_class", "an integer >= 1"),
])
def test_set_value_of_wrong_type_or_range_exits_2_before_any_work(tmp_path, cache_dir, capsys, item, key, valid):
    out = tmp_path / "o"
    methods = ["finetune", "rank1+gd", "ewc"]  # the bad value's method last but one: others would run first
    code = main(SMOKE_ARGV + ["--method", *methods, "--set", item, "--out", str(out), "--cache-dir", cache_dir])
    err = capsys.readouterr().err
    assert code == 2, err
    assert item.split("=")[0] in err and f"{key}: expected" in err and valid in err, err
    assert not out.exists()


def _log(out):
    return (out / "train.log").read_text()


def test_resume_with_a_corrected_value_reruns_only_that_method(tmp_path, cache_dir):
    out = tmp_path / "run"
    kw = dict(methods=["finetune", "l2"], num_tasks=2)
    with pytest.raises(InjectedCrash):  # l2 fails in task 2 (as a bad value would)
        run(tiny_cfg(out, cache_dir, method_args={"l2": {"lam": 1e9}}, **kw), callbacks=StopAt("l2:1:1"))
    steps = []
    resumed = run(tiny_cfg(out, cache_dir, resume=True, method_args={"l2": {"lam": 0.5}}, **kw),
                  callbacks=OnStep(lambda m, k, s: steps.append((m, k))))
    assert {m for m, _ in steps} == {"l2"} and (("l2", 0) in steps)  # finetune kept, l2 from task 1
    log = _log(out)
    assert "finetune: finished in an earlier session" in log
    assert "l2: its checkpoint (after task 1) was made with other settings (lam 1000000000.0 -> 0.5)" in log
    assert "running l2 again from task 1" in log
    fresh = run(tiny_cfg(tmp_path / "fresh", cache_dir, methods=["l2"], num_tasks=2, method_args={"l2": {"lam": 0.5}}))
    assert resumed["methods"]["l2"]["fid"] == fresh["methods"]["l2"]["fid"]
    assert resumed["methods"]["l2"]["method_config"]["lam"] == 0.5
    assert list(json.loads((out / "results.json").read_text())["methods"]) == ["finetune", "l2"]


def test_resume_with_fewer_methods_keeps_the_others_results(tmp_path, cache_dir):
    out = tmp_path / "run"
    first = run(tiny_cfg(out, cache_dir, methods=["finetune", "l2"], num_tasks=1))
    again = run(tiny_cfg(out, cache_dir, methods=["l2"], num_tasks=1, resume=True))
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["methods"]) == list(again["methods"]) == ["finetune", "l2"]
    assert saved["methods"]["finetune"]["fid"] == first["methods"]["finetune"]["fid"]
    assert saved["kept_from_earlier_sessions"] == ["finetune"]
    csv_text = (out / "results.csv").read_text()
    report = (out / "report.md").read_text()
    for name in ("finetune", "l2"):
        assert f"\n{name}," in csv_text and f"| {name} |" in report
    assert "results kept from earlier sessions of this run (not run in this one): finetune" in report


def test_out_that_is_not_a_run_is_refused(tmp_path, cache_dir, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "results.csv").write_text("my own numbers\n")
    (out / "notes.txt").write_text("keep me\n")
    argv = SMOKE_ARGV + ["--method", "finetune", "--cache-dir", cache_dir, "--dataset", "digits"]
    assert main(argv + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and "no cdgfast.train run" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "results.csv"]
    assert (out / "results.csv").read_text() == "my own numbers\n"
    (tmp_path / "a_file").write_text("x")
    assert main(argv + ["--out", str(tmp_path / "a_file")]) == 2
    assert "not a folder" in capsys.readouterr().err
    assert (tmp_path / "a_file").read_text() == "x"


def test_default_out_dir_skips_folders_that_hold_anything(tmp_path, monkeypatch):
    from cdgfast.train.loop import default_out_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "default-smoke").mkdir(parents=True)
    assert default_out_dir("default", "smoke", False) == Path("runs/default-smoke")  # empty: usable
    (tmp_path / "runs" / "default-smoke" / "mine.txt").write_text("x")
    assert default_out_dir("default", "smoke", False) == Path("runs/default-smoke-2")


def test_unreadable_checkpoint_on_resume_names_it_and_the_others_go_on(tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    argv = SMOKE_ARGV[:-3] + ["--num-tasks", "2", "--no-progress", "--method", "finetune", "l2", "--out", str(out),
                              "--cache-dir", cache_dir, "--dataset", "digits"]
    assert main(argv, callbacks=StopAt("l2:1:1")) == 1
    bad = out / "checkpoints" / "finetune.safetensors"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated, as by a full disk
    capsys.readouterr()
    assert main(argv + ["--resume"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "cannot be read" in err and "Delete it to rerun finetune" in err
    saved = json.loads((out / "results.json").read_text())
    assert list(saved["methods"]) == ["l2"] and len(saved["methods"]["l2"]["afid_at_k"]) == 2
    assert "ERROR: the checkpoint of finetune" in _log(out)


def test_ctrl_c_prints_where_and_the_resume_command(tmp_path, cache_dir):
    import shlex

    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()))
    argv = SMOKE_ARGV[:-3] + ["--num-tasks", "2", "--no-progress", "--method", "finetune", "--out", str(out),
                              "--cache-dir", cache_dir, "--dataset", "digits"]
    proc = subprocess.run(HOOKED_CLI + ["--interrupt-at", "finetune:1:1"] + argv, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 130, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "interrupted (Ctrl-C) in finetune, task 2 of 2 (training, step 1 of 1)" in proc.stderr
    assert "checkpointed: finetune after task 1" in proc.stderr
    command = shlex.split(proc.stderr.strip().splitlines()[-1])
    assert command[:3] == [sys.executable, "-m", "cdgfast.train"] and "--resume" in command
    assert main(command[3:]) == 0
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["methods"]["finetune"]["afid_at_k"]) == 2


def test_no_progress_hides_every_bar_and_progress_shows_them(tmp_path, cache_dir, monkeypatch):
    import tqdm.std

    bars = []
    real_init = tqdm.std.tqdm.__init__

    def spy(self, *a, **k):
        real_init(self, *a, **k)
        bars.append((str(k.get("desc")), bool(self.disable)))

    monkeypatch.setattr(tqdm.std.tqdm, "__init__", spy)
    kw = dict(methods=["rank1+gd", "diag"], num_tasks=2, steps=1)  # 2 tasks: no Fisher or pool is built after the last one
    run(tiny_cfg(tmp_path / "quiet", cache_dir, **kw))
    shown = [d for d, disabled in bars if not disabled]
    assert not shown, shown
    bars.clear()
    run(tiny_cfg(tmp_path / "bars", cache_dir, progress=True, **kw))
    shown = " | ".join(d for d, disabled in bars if not disabled)
    for desc in ("rank1 Fisher", "diag Fisher", "replay pool", "end_task pass", "sampling", "train"):
        assert desc in shown, (desc, shown)


def test_data_root_that_does_not_exist_is_said(tmp_path):
    from cdgfast.train.data import DataUnavailable, load_benchmark_data

    missing = str(tmp_path / "no-such-folder")
    lines = []
    data = load_benchmark_data("mnist", data_root=missing, image_size=16, scale="smoke", log=lines.append)
    warning = [ln for ln in lines if ln.startswith("WARNING")]
    assert warning and f"--data-root {missing} does not exist" in warning[0]
    assert any(f"--data-root {missing} does not exist" in s for s in data.substitutions)
    with pytest.raises(DataUnavailable, match="does not exist.*nothing is substituted"):
        load_benchmark_data("mnist", data_root=missing, image_size=16, scale="paper", log=lines.append)


def test_overwrite_refused_on_bad_input_deletes_nothing(tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    argv = SMOKE_ARGV + ["--method", "finetune", "--out", str(out), "--cache-dir", cache_dir, "--dataset", "digits"]
    assert main(argv) == 0
    before = sorted(p.name for p in out.rglob("*"))
    assert main(argv + ["--overwrite", "--inception", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
    assert sorted(p.name for p in out.rglob("*")) == before  # the finished run is still there
