"""The continual-personalization driver (cdgfast.train.personalize; issue 12), offline.

* dc-digits at smoke scale, every Table-1 row over two tasks: results.json has every metric of the paper's
  tables per method, with values that follow from the run (N_param from the parameters, the A_MMD ordering
  from the A_MMD values, F/BWT after the second task), report.md and the sample grids;
* --resume keeps finished methods and refuses other settings; every option is checked before anything is
  written (the folder does not exist after a refusal);
* the folder presets (the paper's path) on a saved tiny "Stable Diffusion" directory, concept folders and a
  tiny CLIP directory;
* the sampler's classifier-free guidance against its two limits (guidance 1: the conditional prediction
  only; guidance 0: the unconditional one), and the base model's cache.
"""
import json
import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from cdgfast.train.cli import main  # noqa: E402
from cdgfast.train.loop import RunError  # noqa: E402
from cdgfast.train.personalize import (TextRunConfig, ordering, resolve_text, run_personalization,  # noqa: E402
                                       sample_text)
from cdgfast.train.text_presets import PAPER_A_MMD_ORDER, TEXT_METHODS  # noqa: E402

FINAL_KEYS = {"kid", "a_mmd", "f_mmd", "bwt_mmd", "clip_i2i", "nparam_train", "nparam_store"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def smoke_all(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("runs") / "all"
    payload = run_personalization(TextRunConfig(preset="dc-digits", scale="smoke", num_tasks=2, out=str(out),
                                                cache_dir=str(cache), progress=False))
    return out, payload


def test_smoke_run_writes_every_metric_for_every_table1_row(smoke_all):
    out, payload = smoke_all
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["methods"].keys() == set(TEXT_METHODS) and on_disk["features"] == "classifier-fallback"
    for m, res in on_disk["methods"].items():
        final = res["final"]
        assert FINAL_KEYS <= set(final), m
        assert all(isinstance(final[k], float) and math.isfinite(final[k]) for k in FINAL_KEYS), (m, final)
        assert len(res["per_task"]["a_mmd"]) == 2 and res["per_task"]["f_mmd"][0] is None
        assert res["paper_units"]["a_mmd"] == pytest.approx(1e3 * final["a_mmd"])
        assert len(res["recognised"]) == 2 and all(0 <= a <= 1 for a in res["recognised"])
        assert final["nparam_store"] >= 100.0, m  # the U-Net itself is stored
        for k in (1, 2):
            assert (out / "samples" / f"{m}_task{k}.png").is_file()
    fin = {m: r["final"] for m, r in on_disk["methods"].items()}
    # trained per task: Textual Inversion only its token row; the LoRA rows the same LoRA size; Custom
    # Diffusion the full K/V weights, more than any LoRA of rank 2
    assert 0 < fin["textual_inversion"]["nparam_train"] < fin["lora_seq"]["nparam_train"]
    assert fin["lora_seq"]["nparam_train"] == pytest.approx(fin["ewc"]["nparam_train"])
    assert fin["custom_diffusion"]["nparam_train"] > fin["lora_seq"]["nparam_train"]
    # stored: EWC keeps its Fisher and anchor beside the LoRA; Textual Inversion keeps only tokens
    assert fin["ewc"]["nparam_store"] > fin["textual_inversion"]["nparam_store"]
    o = on_disk["ordering_a_mmd"]
    assert o["paper"] == list(PAPER_A_MMD_ORDER)
    assert [fin[m]["a_mmd"] for m in o["ours"]] == sorted(fin[m]["a_mmd"] for m in o["ours"])
    report = (out / "report.md").read_text()
    assert "classifier-fallback" in report and "dsc+ewc_dc" in report and "94.1" in report  # the paper's row


def test_ordering_kendall_tau_against_hand_counted_pairs():
    res = {m: {"final": {"a_mmd": float(i)}} for i, m in enumerate(PAPER_A_MMD_ORDER)}
    assert ordering(res) == {"paper": list(PAPER_A_MMD_ORDER), "ours": list(PAPER_A_MMD_ORDER), "kendall_tau": 1.0,
                             "same": True}
    rev = {m: {"final": {"a_mmd": -float(i)}} for i, m in enumerate(PAPER_A_MMD_ORDER)}
    assert ordering(rev)["kendall_tau"] == -1.0
    three = {"ewc": {"final": {"a_mmd": 1.0}}, "clora": {"final": {"a_mmd": 0.5}}, "lora_seq": {"final": {"a_mmd": 2.0}}}
    o = ordering(three)  # paper: ewc < clora < lora_seq; ours: clora < ewc < lora_seq -> 2 of 3 pairs agree
    assert o["ours"] == ["clora", "ewc", "lora_seq"] and o["kendall_tau"] == pytest.approx(1 / 3) and not o["same"]


def test_resume_keeps_finished_methods_and_refuses_other_settings(tmp_path, cache):
    out = tmp_path / "run"
    base = dict(preset="dc-digits", scale="smoke", num_tasks=2, out=str(out), cache_dir=str(cache), progress=False)
    first = run_personalization(TextRunConfig(methods=["lora_seq"], **base))
    with pytest.raises(RunError, match="already holds a finished run"):
        run_personalization(TextRunConfig(methods=["lora_seq"], **base))
    second = run_personalization(TextRunConfig(methods=["lora_seq", "ewc"], resume=True, **base))
    assert second["methods"]["lora_seq"] == first["methods"]["lora_seq"]
    assert "lora_seq: finished earlier, kept" in (out / "train.log").read_text()
    assert set(second["methods"]) == {"lora_seq", "ewc"}
    with pytest.raises(RunError, match="other settings"):
        run_personalization(TextRunConfig(methods=["lora_seq"], resume=True, steps=3, **base))


@pytest.mark.parametrize("kw, match", [
    (dict(preset="dc-custom-concept"), "pretrained: preset 'dc-custom-concept' needs"),
    (dict(preset="dc-custom-concept", pretrained="/nonexistent/sd"), "is not a directory"),
    (dict(preset="dc-digits", pretrained="/x"), "pretrained: preset dc-digits pretrains its own"),
    (dict(preset="dc-digits", concepts="/x"), "concepts: preset dc-digits"),
    (dict(preset="dc-digits", methods=["gd"]), "not rows of the personalization benchmark"),
    (dict(preset="dc-digits", num_tasks=1), "num-tasks: expected 2..6"),
    (dict(preset="dc-digits", scale="paper"), "scale: preset 'dc-digits' has the scales"),
    (dict(preset="dc-digits", method_args={"gd": {"lam": 1.0}}), "set: \\['gd'\\] are not among"),
    (dict(preset="dc-digits", method_args={"ewc": {"lam": -1.0}}), "set: ewc.lam=-1.0"),
    (dict(preset="dc-digits", clip="/nonexistent/clip"), "clip: .* is not a directory"),
    (dict(preset="dc-digits", steps=0), "steps: expected a positive integer"),
])
def test_every_option_is_checked_before_anything_is_written(tmp_path, kw, match):
    out = tmp_path / "never"
    with pytest.raises(RunError, match=match):
        run_personalization(TextRunConfig(out=str(out), progress=False, **kw))
    assert not out.exists()


def test_folder_preset_refusals_name_the_missing_input(tmp_path, tiny_sd):
    sd, _, concepts = tiny_sd
    with pytest.raises(RunError, match="concepts: preset 'dc-custom-concept' needs"):
        resolve_text(TextRunConfig(preset="dc-custom-concept", scale="smoke", pretrained=str(sd)))
    with pytest.raises(RunError, match="has 2 concept folders with images, the preset needs 6"):
        resolve_text(TextRunConfig(preset="dc-custom-concept", scale="smoke", pretrained=str(sd), concepts=str(concepts)))
    with pytest.raises(RunError, match="clip: preset 'dc-custom-concept' reports"):
        resolve_text(TextRunConfig(preset="dc-custom-concept", scale="smoke", pretrained=str(sd),
                                   concepts=str(concepts), num_tasks=2))
    broken = tmp_path / "sd"
    (broken / "unet").mkdir(parents=True)
    with pytest.raises(RunError, match="missing: unet/config.json"):
        resolve_text(TextRunConfig(preset="dc-custom-concept", pretrained=str(broken)))


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    """A saved tiny Stable Diffusion directory, a tiny CLIP directory, two concept folders of 32 px images."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    from cdgfast.models.text import tiny_text_models

    root = tmp_path_factory.mktemp("paper-path")
    parts = tiny_text_models(max_length=77, seed=0)
    sd = root / "sd"
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        getattr(parts, name).save_pretrained(sd / name)
    (sd / "scheduler").mkdir()
    (sd / "scheduler" / "scheduler_config.json").write_text(json.dumps(parts.scheduler_config))
    cfg = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8, projection_dim=11)
    torch.manual_seed(0)
    clip = root / "clip"
    transformers.CLIPVisionModelWithProjection(cfg).save_pretrained(clip)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    concepts = root / "concepts"
    g = torch.Generator().manual_seed(0)
    for c, noun in (("a_dog", "dog"), ("b_cat", None)):
        (concepts / c).mkdir(parents=True)
        for i in range(3):
            arr = (torch.rand(40, 48, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(arr).save(concepts / c / f"{i}.jpg")
        if noun:
            (concepts / c / "prompts.txt").write_text(noun + "\n")
    return sd, clip, concepts


def test_folder_preset_runs_on_a_local_sd_directory(tmp_path, tiny_sd, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    sd, clip, concepts = tiny_sd
    out = tmp_path / "cc"
    payload = run_personalization(TextRunConfig(
        preset="dc-custom-concept", scale="smoke", num_tasks=2, methods=["custom_diffusion", "ewc_dc"], out=str(out),
        pretrained=str(sd), concepts=str(concepts), clip=str(clip), progress=False))
    assert payload["features"] == "clip:clip" and payload["concepts"] == ["a_dog", "b_cat"]
    for m in ("custom_diffusion", "ewc_dc"):
        assert FINAL_KEYS <= set(payload["methods"][m]["final"])
    assert (out / "checkpoints" / "prior.safetensors").is_file()  # the base model's prior images, kept for --resume
    assert "prompts.txt" not in payload["concepts"]


def test_prompts_name_the_concept_for_cd_and_ti_only():
    from cdgfast.train.personalize import Concept, MethodRun

    r = resolve_text(TextRunConfig(preset="dc-digits", scale="smoke"))
    cs = [Concept(name="four", noun="four", images=torch.zeros(1), reference=torch.zeros(1))]
    assert MethodRun("lora_seq", r, None, cs, None, None, 0, {}, None, None, False).prompts() == (
        ["a photo of a <v1>"], ["<v1>"])
    assert MethodRun("custom_diffusion", r, None, cs, None, None, 0, {}, None, None, False).prompts()[0] == [
        "a photo of a <v1> four"]


def test_guidance_limits_of_the_sampler():
    from cdgfast.models.text import SD_SCHEDULER_CONFIG, tiny_text_unet

    unet = tiny_text_unet(cross_attention_dim=8, sample_size=8, seed=0, channels=1, width=8)
    g = torch.Generator().manual_seed(0)
    c, u1, u2 = (torch.randn(5, 8, generator=g) for _ in range(3))
    kw = dict(size=8, scheduler_config=SD_SCHEDULER_CONFIG, sampler="ddim", steps=3, clip_sample=True)

    def draw(cond, uncond, w, sampler="ddim"):
        return sample_text(unet, cond, uncond, 3, guidance=w, generator=torch.Generator().manual_seed(1),
                           **{**kw, "sampler": sampler})

    torch.testing.assert_close(draw(c, u1, 1.0), draw(c, u2, 1.0), rtol=0, atol=2e-5)  # only the conditional
    torch.testing.assert_close(draw(u1, c, 0.0), draw(u2, c, 0.0), rtol=0, atol=2e-5)  # only the unconditional
    assert not torch.allclose(draw(c, u1, 3.0), draw(c, u2, 3.0))
    a, b = draw(c, u1, 2.0, "ddpm"), draw(c, u1, 2.0, "ddpm")
    torch.testing.assert_close(a, b, rtol=0, atol=0)  # DDPM noise comes from the generator


def test_base_model_is_cached(smoke_all, cache, tmp_path):
    out, payload = smoke_all
    assert payload["base"]["source"] in ("trained", "cached")
    again = run_personalization(TextRunConfig(preset="dc-digits", scale="smoke", num_tasks=2, methods=["lora_seq"],
                                              out=str(tmp_path / "again"), cache_dir=str(cache), progress=False))
    assert again["base"]["source"] == "cached" and again["base"]["cache"] == payload["base"]["cache"]
    assert again["methods"]["lora_seq"]["final"] == payload["methods"]["lora_seq"]["final"]  # same numbers


def test_base_prompt_following_counts_the_classifier_hits(smoke_all, cache):
    """results.json and report.md carry how well the base follows its named prompts; the fraction is the
    classifier's hits on each named prompt's samples (checked with classifiers that always say one digit)."""
    from cdgfast.train.personalize import base_prompt_following, pretrain_digits
    from cdgfast.train.ruler import embedded_data
    from cdgfast.train.text_presets import DIGIT_NAMES, DIGITS_BASE_CLASSES, TEXT_PRESETS

    out, payload = smoke_all
    follow = payload["base"]["named_prompt_recognised"]
    assert list(follow) == [DIGIT_NAMES[d] for d in DIGITS_BASE_CLASSES] and all(0 <= v <= 1 for v in follow.values())
    assert "named prompts" in (out / "report.md").read_text()
    sc = TEXT_PRESETS["dc-digits"].scale("smoke")
    data = embedded_data("digits")
    base = pretrain_digits(data.train.x, data.train.y, sc, "a photo of a digit", 0, torch.device("cpu"), str(cache),
                           False, lambda *_: None)

    class Always(torch.nn.Module):
        def __init__(self, d):
            super().__init__()
            self.d = d
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.nn.functional.one_hot(torch.full((x.shape[0],), self.d), 10).float() + 0 * self.w

    for d in (0, 2):
        got = base_prompt_following(base, Always(d), sc, 0, torch.device("cpu"))
        assert got == {DIGIT_NAMES[c]: (1.0 if c == d else 0.0) for c in DIGITS_BASE_CLASSES}


def test_cli_runs_prints_config_and_refuses(tmp_path, cache, capsys):
    rc = main(["--preset", "dc-digits", "--print-config", "--scale", "smoke"])
    cfg = json.loads(capsys.readouterr().out)
    assert rc == 0 and {"preset", "scale", "data", "model", "training", "evaluation", "methods"} <= set(cfg)
    assert cfg["methods"]["ewc"]["lam"] == 1e6 and cfg["training"]["lora_targets"] == ["attn2.to_k", "attn2.to_v"]
    assert cfg["methods"]["dsc"]["iterations"] == 2  # the smoke scale's consolidation phase
    out = tmp_path / "cli"
    rc = main(["--preset", "dc-digits", "--scale", "smoke", "--num-tasks", "2", "--method", "textual_inversion",
               "--out", str(out), "--cache-dir", str(cache), "--no-progress"])
    assert rc == 0 and (out / "results.json").is_file()
    assert main(["--preset", "dc-custom-concept", "--out", str(tmp_path / "x")]) == 2
    assert "needs a local Stable Diffusion" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--preset", "dc-digits", "--inception", "/x"])
    with pytest.raises(SystemExit):
        main(["--clip", "/x"])  # a class-incremental preset has no CLIP metrics


def test_seeds_run_aggregates_each_seed_and_resumes(tmp_path, cache, capsys):
    """--seeds on a personalization preset: one complete run per seed (the same base model for every seed,
    as Stable Diffusion is for the paper's seeds), mean and standard error recomputed here from the
    per-seed results.json files, --resume adds a seed without re-running the others, and a folder that
    holds the run is refused without --resume."""
    import statistics

    from cdgfast.train.personalize import run_text_seeds

    out = tmp_path / "seeds"
    cfg = TextRunConfig(preset="dc-digits", scale="smoke", num_tasks=2, methods=["lora_seq"], out=str(out),
                        cache_dir=str(cache), progress=False)
    agg = run_text_seeds(cfg, [0, 1])
    per = {s: json.loads((out / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)}
    assert per[0]["base"]["cache"] == per[1]["base"]["cache"]  # one base for every seed
    assert per[0]["methods"]["lora_seq"]["final"] != per[1]["methods"]["lora_seq"]["final"]  # the seeds differ
    for key in ("a_mmd", "kid", "bwt_mmd", "clip_i2i", "f_mmd"):
        vals = [per[s]["methods"]["lora_seq"]["paper_units"][key] for s in (0, 1)]
        e = agg["methods"]["lora_seq"][key]
        assert e["values"] == vals and e["n"] == 2
        assert e["mean"] == pytest.approx(sum(vals) / 2) and e["se"] == pytest.approx(statistics.stdev(vals) / 2 ** 0.5)
    assert json.loads((out / "results.json").read_text())["seeds"] == [0, 1]
    assert "±" in (out / "report.md").read_text()
    with pytest.raises(RunError, match="is not empty"):
        run_text_seeds(cfg, [0, 1])
    more = run_text_seeds(TextRunConfig(**{**cfg.__dict__, "resume": True}), [2])
    assert more["seeds"] == [0, 1, 2]
    assert more["methods"]["lora_seq"]["a_mmd"]["values"][:2] == agg["methods"]["lora_seq"]["a_mmd"]["values"]
    assert "finished earlier" not in (out / "seed-2" / "train.log").read_text()
    rc = main(["--preset", "dc-digits", "--scale", "smoke", "--num-tasks", "2", "--method", "lora_seq", "--seeds", "0",
               "--out", str(tmp_path / "cli"), "--cache-dir", str(cache), "--no-progress"])
    assert rc == 0 and (tmp_path / "cli" / "seed-0" / "results.json").is_file()
    with pytest.raises(RunError, match="seeds: listed twice"):
        run_text_seeds(TextRunConfig(**{**cfg.__dict__, "out": str(tmp_path / "never")}), [1, 1])
    assert not (tmp_path / "never").exists()


def test_torchrun_runs_whole_methods_per_process(smoke_all, cache, tmp_path):
    """`torchrun --nproc_per_node 2` on a personalization preset: each process runs whole methods (rank 0
    lora_seq, rank 1 ewc), rank 0 writes one results.json with both, and every number equals the
    single-process run's (the same seeds; nothing is shared between methods). More processes than
    methods are refused before any work."""
    import os
    import subprocess
    import sys

    out, payload = smoke_all
    run_dir = tmp_path / "ddp"
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
              "cdgfast.train"]
    args = ["--preset", "dc-digits", "--scale", "smoke", "--num-tasks", "2", "--method", "lora_seq", "ewc",
            "--cache-dir", str(cache), "--no-progress", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(launch + args + ["--out", str(run_dir)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["world_size"] == 2 and list(res["methods"]) == ["lora_seq", "ewc"]
    for m in ("lora_seq", "ewc"):
        for k, v in res["methods"][m]["final"].items():
            assert v == pytest.approx(payload["methods"][m]["final"][k], rel=1e-4, abs=1e-9), (m, k)
    assert "lora_seq: training" in (run_dir / "train.log").read_text()
    assert "ewc: training 2 tasks (rank 1 of 2)" in (run_dir / "train.rank1.log").read_text()
    three = subprocess.run(launch[:4] + ["--nproc_per_node", "3", "-m", "cdgfast.train"] + args
                           + ["--out", str(tmp_path / "never")], env=env, capture_output=True, text=True, timeout=600)
    assert three.returncode != 0 and "torchrun: 3 processes for 2 method(s)" in three.stderr
    assert not (tmp_path / "never").exists()


def test_digits_prompt_shares_and_the_base_ema(cache, tmp_path):
    """The pretraining captions: 10 % empty, `named_fraction` of a digit's images with its name, the rest
    the prior prompt. The base's EMA: decay 0 is the raw
    weights (d_n = 0), a positive decay gives other weights."""
    import dataclasses

    from cdgfast.train.personalize import _digits_prompt, pretrain_digits
    from cdgfast.train.ruler import embedded_data
    from cdgfast.train.text_presets import TEXT_PRESETS

    rs = [(i + 0.5) / 1000 for i in range(1000)]
    for frac in (0.45, 0.9):
        named = [_digits_prompt(2, r, frac) for r in rs]
        assert named.count("") == 100 and named.count("a photo of a two digit") == round(1000 * frac)
        assert named.count("a photo of a digit") == 900 - round(1000 * frac)
    data = embedded_data("digits")
    sc = dataclasses.replace(TEXT_PRESETS["dc-digits"].scale("smoke"), pretrain_steps=3, prior_images=2)

    def base(**kw):
        b = pretrain_digits(data.train.x, data.train.y, dataclasses.replace(sc, **kw), "a photo of a digit", 0,
                            torch.device("cpu"), str(tmp_path), False, lambda *_: None)
        return b.unet_state

    raw, zero, avg = base(pretrain_ema_decay=None), base(pretrain_ema_decay=0.0), base(pretrain_ema_decay=0.9)
    assert all(torch.equal(raw[k], zero[k]) for k in raw)
    assert any(not torch.allclose(raw[k], avg[k]) for k in raw)
