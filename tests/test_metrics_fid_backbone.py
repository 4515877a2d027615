"""The FID backbone (`--fid inception|classifier|auto`): which one a run gets, found without downloading;
the refusal at --scale paper without the FID Inception weights; the torch-fidelity path of
InceptionFeatures (a stub network stands in for torch-fidelity, which is an optional extra); the
backbone recorded in results.json's protocol."""
import json
import sys
import types

import pytest
import torch

from cdgfast.metrics import (FidBackboneUnavailable, InceptionFeatures, fid_inception_cache_path,
                             resolve_fid_backbone)
from cdgfast.metrics.fid import FID_INCEPTION_FILE
from cdgfast.train.cli import main


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub cache; never a download (torch.hub's downloader raises)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def no_download(*a, **k):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "torch-home" / "hub" / "checkpoints" / FID_INCEPTION_FILE


def test_cache_path_is_torch_hubs_checkpoint_folder(hub):
    assert fid_inception_cache_path() == hub
    assert not hub.parent.exists()  # only a path: nothing created


def test_resolution_without_weights(hub, tmp_path):
    assert resolve_fid_backbone("auto", None, "cpu") == ("classifier", None)
    assert resolve_fid_backbone("auto", None, "smoke") == ("classifier", None)
    assert resolve_fid_backbone("classifier", None, "paper") == ("classifier", None)  # asked for explicitly
    with pytest.raises(FidBackboneUnavailable, match="--scale paper") as e:
        resolve_fid_backbone("auto", None, "paper")
    assert str(hub) in str(e.value) and "--fid classifier" in str(e.value)
    with pytest.raises(FidBackboneUnavailable, match="--fid inception") as e:
        resolve_fid_backbone("inception", None, "cpu")
    assert str(hub) in str(e.value)
    missing = tmp_path / "w.pth"
    with pytest.raises(FidBackboneUnavailable, match="w.pth does not exist"):
        resolve_fid_backbone("auto", missing, "cpu")
    with pytest.raises(ValueError, match="^fid: expected one of"):
        resolve_fid_backbone("tf", None, "cpu")
    with pytest.raises(ValueError, match="^fid: 'classifier' contradicts"):
        resolve_fid_backbone("classifier", missing, "cpu")


def test_resolution_with_weights_in_the_cache_or_given(hub, tmp_path):
    hub.parent.mkdir(parents=True)
    hub.write_bytes(b"x")
    for fid in ("auto", "inception"):
        for scale in ("smoke", "cpu", "paper"):
            assert resolve_fid_backbone(fid, None, scale) == ("inception", hub)
    given = tmp_path / "mine.pth"
    given.write_bytes(b"x")
    assert resolve_fid_backbone("auto", given, "paper") == ("inception", given)  # a given path wins
    assert resolve_fid_backbone("classifier", None, "paper") == ("classifier", None)


def _fid_state(classes=1008):
    return {"Conv2d_1a_3x3.conv.weight": torch.zeros(32, 3, 3, 3), "fc.weight": torch.zeros(classes, 2048),
            "fc.bias": torch.zeros(classes)}


class _StubExtractor(torch.nn.Module):
    """Stands in for torch_fidelity.feature_extractor_inceptionv3.FeatureExtractorInceptionV3: records
    what it was built with and what it is given; features = per-channel means of the uint8 images."""

    built = []

    def __init__(self, name, features_list, feature_extractor_weights_path=None):
        super().__init__()
        _StubExtractor.built.append((name, tuple(features_list), feature_extractor_weights_path))
        self.seen = []

    def forward(self, x):
        assert x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3
        self.seen.append(x.clone())
        return (x.float().mean((2, 3)),)


@pytest.fixture
def stub_fidelity(monkeypatch):
    pkg = types.ModuleType("torch_fidelity")
    mod = types.ModuleType("torch_fidelity.feature_extractor_inceptionv3")
    mod.FeatureExtractorInceptionV3 = _StubExtractor
    pkg.feature_extractor_inceptionv3 = mod
    monkeypatch.setitem(sys.modules, "torch_fidelity", pkg)
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", mod)
    _StubExtractor.built.clear()
    return _StubExtractor


def test_torch_fidelity_weights_go_through_its_extractor_as_uint8(tmp_path, stub_fidelity):
    path = tmp_path / FID_INCEPTION_FILE
    torch.save(_fid_state(), path)
    ext = InceptionFeatures(path)
    assert ext.kind == "torch-fidelity" and ext.label == "Inception-FID"
    assert stub_fidelity.built == [("inception-v3-compat", ("2048",), str(path))]
    x = torch.tensor([-1.0, -0.5, 0.0, 1.0, 2.0]).view(1, 1, 1, 5).repeat(2, 1, 3, 1)  # grey, out of range too
    out = ext(x)
    seen = ext.net.seen[-1]
    assert seen.shape == (2, 3, 3, 5)  # grey repeated to 3 channels, no resize here (torch-fidelity resizes)
    # [-1, 1] -> round((x + 1) * 127.5), clamped: -1 -> 0, -0.5 -> 64 (63.75), 0 -> 128 (127.5 rounds to even), 1 -> 255
    assert seen[0, 0, 0].tolist() == [0, 64, 128, 255, 255]
    assert out.shape == (2, 3) and out.dtype == torch.float32


def test_torchvision_imagenet_weights_and_pickles_are_refused(tmp_path, stub_fidelity):
    tv = tmp_path / "inception_v3_google.pth"
    torch.save(_fid_state(classes=1000), tv)
    with pytest.raises(ValueError, match="not the FID Inception.*1000-way"):
        InceptionFeatures(tv)
    evil = tmp_path / "evil.pth"
    torch.save({"fc.weight": torch.zeros(1008, 2048), "hook": types.SimpleNamespace(a=1)}, evil)
    with pytest.raises(ValueError, match="neither a TorchScript module nor a state dict of tensors"):
        InceptionFeatures(evil)
    assert stub_fidelity.built == []  # refused before torch-fidelity saw the file


def test_fid_weights_without_torch_fidelity_say_which_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import fails
    monkeypatch.setitem(sys.modules, "torch_fidelity.feature_extractor_inceptionv3", None)
    path = tmp_path / FID_INCEPTION_FILE
    torch.save(_fid_state(), path)
    with pytest.raises(ImportError, match=r"cdgfast\[fid\]"):
        InceptionFeatures(path)


# ------------------------------------------------------------------------------------------- driver
SMOKE = ["--scale", "smoke", "--method", "finetune", "--steps", "1", "--fid-samples", "3", "--num-tasks", "1",
         "--no-progress"]


def test_paper_scale_without_weights_exits_2_before_any_work(hub, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["--preset", "rank1-mnist", "--scale", "paper", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and str(hub) in err and "--fid classifier" in err
    assert not out.exists()
    code = main(SMOKE + ["--fid", "inception", "--out", str(out)])
    assert code == 2 and str(hub) in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as e:  # a contradiction is a usage error
        main(SMOKE + ["--fid", "classifier", "--inception", str(tmp_path / "w.pth"), "--out", str(out)])
    assert e.value.code == 2 and "contradicts" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(SMOKE + ["--fid", "tf", "--out", str(out)])


def test_auto_falls_back_to_classifier_and_picks_cached_weights(hub, tmp_path, capsys):
    cache = str(tmp_path / "clf")
    out = tmp_path / "a"
    assert main(SMOKE + ["--out", str(out), "--cache-dir", cache]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"]["fid_backbone"] == "classifier" and res["metric"]["fid"] == "classifier-FID"
    assert res["metric"]["inception_weights"] is None

    class Feat(torch.nn.Module):  # a TorchScript feature network saved under the cache's file name
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    hub.parent.mkdir(parents=True)
    torch.jit.script(Feat()).save(str(hub))
    out = tmp_path / "b"
    assert main(SMOKE + ["--out", str(out), "--cache-dir", cache]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["protocol"]["fid_backbone"] == "inception" and res["metric"]["fid"] == "Inception-FID"
    assert res["metric"]["inception_weights"] == str(hub)
    assert "FID backbone: Inception (torchscript" in (out / "train.log").read_text()
