"""The fixed evaluation ruler (issue 16): the shipped classifier loads without training and reaches its
accuracy on the fixed held-out split; runs with different --seed record the same feature network and
evaluation split; --resume refuses a run measured with another protocol."""
import json

import pytest
import torch

from cdgfast.metrics.classifier import (accuracy, data_sha256, get_classifier, load_ruler, network_sha256,
                                        shipped_ruler_path)
from cdgfast.train import RunConfig, RunError, run
from cdgfast.train.ruler import RULERS, embedded_data

TINY = dict(scale="smoke", steps=2, fid_samples=3, num_tasks=2, progress=False, methods=["finetune"])


@pytest.mark.parametrize("key", list(RULERS))
def test_shipped_ruler_loads_without_training_and_reaches_its_accuracy(key, tmp_path, monkeypatch):
    data = embedded_data(key)
    if data is None:
        pytest.skip(f"{key} is not on this machine")
    path = shipped_ruler_path(data.name, data.image_size, data.channels, data.num_classes)
    assert path is not None, f"no shipped ruler for {key}: run python -m cdgfast.train.ruler --dataset {key}"
    assert path.stat().st_size < 600 * 1024
    import cdgfast.metrics.classifier as C

    def no_training(*a, **k):
        raise AssertionError("the shipped ruler must load without training")

    monkeypatch.setattr(C, "train_classifier", no_training)
    model, info = get_classifier(data.name, data.train.x, data.train.y, data.num_classes, cache_dir=tmp_path)
    assert info["source"] == "shipped" and info["path"] == str(path)
    assert not any(tmp_path.iterdir())  # nothing trained, nothing cached
    acc = accuracy(model, data.eval.x, data.eval.y)
    assert acc >= RULERS[key]["min_accuracy"]
    _, meta = load_ruler(path)
    assert float(meta["eval_accuracy"]) == pytest.approx(acc, abs=1e-6)
    assert meta["eval_split_sha256"] == data_sha256(data.eval.x, data.eval.y)
    assert info["sha256"] == network_sha256(model)


def test_shipped_ruler_is_refused_for_another_training_split(tmp_path):
    data = embedded_data("digits")
    x, y = data.train.x[:200], data.train.y[:200]
    model, info = get_classifier(data.name, x, y, data.num_classes, epochs=1, cache_dir=tmp_path, progress=False)
    assert info["source"] == "trained" and str(tmp_path) in info["path"]


def test_seeds_share_the_ruler_and_resume_refuses_another_protocol(tmp_path):
    runs = {}
    for seed in (0, 1):
        out = tmp_path / f"s{seed}"
        runs[seed] = run(RunConfig(**TINY, seed=seed, out=str(out), cache_dir=str(tmp_path / "cache")))
    p0, p1 = runs[0]["protocol"], runs[1]["protocol"]
    assert p0["feature_network_sha256"] == p1["feature_network_sha256"]
    assert p0["eval_split_sha256"] == p1["eval_split_sha256"]
    assert p0["classifier_source"] == "shipped"  # the smoke cap on training images does not change the ruler
    assert p0["classifier_eval_accuracy"] >= 0.97
    assert runs[0]["methods"]["finetune"]["mf"] != runs[1]["methods"]["finetune"]["mf"]  # the seed still matters
    # a run.json that recorded another ruler: --resume refuses, naming what differs
    rj = tmp_path / "s0" / "run.json"
    info = json.loads(rj.read_text())
    info["protocol"]["feature_network_sha256"] = "0" * 64
    rj.write_text(json.dumps(info))
    with pytest.raises(RunError, match="another evaluation protocol.*feature_network_sha256"):
        run(RunConfig(**TINY, seed=0, out=str(tmp_path / "s0"), cache_dir=str(tmp_path / "cache"), resume=True))
    del info["protocol"]
    rj.write_text(json.dumps(info))
    with pytest.raises(RunError, match="recorded no evaluation protocol"):
        run(RunConfig(**TINY, seed=0, out=str(tmp_path / "s0"), cache_dir=str(tmp_path / "cache"), resume=True))


@pytest.mark.slow
@pytest.mark.parametrize("key", [pytest.param(k, marks=[pytest.mark.slow] if k != "digits" else [])
                                 for k in RULERS])  # MNIST's ruler takes ~4 min to train: slow
def test_train_ruler_reproduces_the_shipped_weights(key, tmp_path):
    """`python -m cdgfast.train.ruler` is deterministic: retraining gives the shipped network bit for bit."""
    from cdgfast.train.ruler import train_ruler

    got = train_ruler(key, out_dir=tmp_path, progress=False)
    if got is None:
        pytest.skip(f"{key} is not on this machine")
    shipped, _ = load_ruler(shipped_ruler_path(got["dataset"], 16, 1, 10))
    fresh, _ = load_ruler(got["path"])
    assert network_sha256(fresh) == network_sha256(shipped)
    for (k, a), b in zip(shipped.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), k


def test_mean_se_against_a_naive_reference():
    from cdgfast.train.loop import mean_se

    vals = [21.63, 28.21, 17.37]
    m = sum(vals) / 3
    sd = (sum((v - m) ** 2 for v in vals) / 2) ** 0.5
    got = mean_se(vals)
    assert got["mean"] == pytest.approx(m) and got["se"] == pytest.approx(sd / 3 ** 0.5) and got["n"] == 3
    assert mean_se([5.0])["se"] is None and mean_se([None])["mean"] is None


def test_seeds_run_keeps_every_seed_reports_mean_se_and_resumes_per_seed(tmp_path, capsys):
    from cdgfast.train import run_seeds
    from cdgfast.train.cli import main

    out = tmp_path / "multi"
    cfg = dict(TINY, methods=["finetune", "gd"], num_tasks=1, out=str(out), cache_dir=str(tmp_path / "cache"))
    res = run_seeds(RunConfig(**cfg), [0, 1])
    assert res["seeds"] == [0, 1] and set(res["per_seed"]) == {"0", "1"} and res["protocol_consistent"]
    for s in ("0", "1"):
        assert (out / f"seed-{s}" / "results.json").is_file()
    mf = [res["per_seed"][s]["methods"]["finetune"]["mf"] for s in ("0", "1")]
    assert res["methods"]["finetune"]["mf"]["values"] == mf
    assert res["methods"]["finetune"]["mf"]["mean"] == pytest.approx(sum(mf) / 2)
    assert res["methods"]["finetune"]["mf"]["se"] == pytest.approx(abs(mf[0] - mf[1]) / 2)
    (c,) = res["comparisons"]
    assert c["combined_se"] == pytest.approx((res["methods"]["finetune"]["mf"]["se"] ** 2
                                              + res["methods"]["gd"]["mf"]["se"] ** 2) ** 0.5)
    report = (out / "report.md").read_text()
    assert "±" in report and "combined" in report
    saved = json.loads((out / "results.json").read_text())
    assert saved["methods"]["gd"]["mf"]["values"] == res["methods"]["gd"]["mf"]["values"]
    # refused without --resume / --overwrite; --resume keeps the finished seeds and adds a new one
    with pytest.raises(RunError, match="not empty"):
        run_seeds(RunConfig(**cfg), [0, 1])
    (out / "seed-1" / "results.json").unlink()  # seed 1 "interrupted" after its checkpoints
    res2 = run_seeds(RunConfig(**cfg, resume=True), [0, 1, 2])
    assert res2["seeds"] == [0, 1, 2]
    for s in ("0", "1"):
        assert res2["per_seed"][s]["methods"]["finetune"]["mf"] == res["per_seed"][s]["methods"]["finetune"]["mf"]
    log1 = (out / "seed-1" / "train.log").read_text()
    assert "finished in an earlier session" in log1
    # the CLI: --seeds and --seed exclude each other
    with pytest.raises(SystemExit):
        main(["--seeds", "0", "1", "--seed", "3"])
    capsys.readouterr()
    # a seed measured with another ruler is flagged, not averaged silently
    from cdgfast.train.loop import aggregate_seeds
    per = {s: json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)}
    per[1]["protocol"]["eval_split_sha256"] = "x"
    agg = aggregate_seeds(per)
    assert not agg["protocol_consistent"] and "eval_split_sha256" in agg["protocol_differences"][0]
