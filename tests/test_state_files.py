"""State without pickle (issue 15): cdgfast.serialization, run checkpoints, method save / load.

"No pickle" is checked on the bytes: every file a run writes under checkpoints/ (and every file Method.save
writes) must parse as safetensors (an 8-byte little-endian header length, then that many bytes of JSON,
then raw tensor data) or as JSON; a torch.save file is a zip (PK..) or a raw pickle (0x80 0x02..) and
fails. Then loading is done with pickle itself switched off (pickle.Unpickler / torch.load raise), and
the resumed run must equal the uninterrupted one.
"""
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

import cdgfast.methods as M
from cdgfast.serialization import (UnreadableState, flatten_state, load_state, load_state_dir, save_state,
                                   unflatten_state)
from cdgfast.train import RunConfig, run
from cdgfast.train.checkpoint import UnreadableCheckpoint, load_checkpoint, read_checkpoint
from test_methods import NUM_CLASSES, assert_same_next_task_losses, class_methods, run_two_tasks
from cdgfast.diffusion import NoiseSchedule


def is_safetensors(path: Path) -> bool:
    raw = path.read_bytes()
    if len(raw) < 8:
        return False
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        return False
    try:
        header = json.loads(raw[8:8 + n])
    except ValueError:
        return False
    end = max([v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"] or [0])
    return 8 + n + end == len(raw)


def is_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
        return True
    except (ValueError, UnicodeDecodeError):
        return False


def assert_no_pickle(folder: Path):
    """Every file parses as safetensors (structurally, to its last byte) or as JSON. No magic-byte test on
    top: a safetensors file begins with its header length, whose low byte is 0x80 for one length in 256
    (a pickle's first byte), so such a test fails valid files; a torch.save zip or a pickle never parses
    as either (test_the_no_pickle_check_tells_formats_apart)."""
    files = [p for p in folder.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert is_safetensors(p) or is_json(p), f"{p} is neither safetensors nor JSON"


def test_the_no_pickle_check_tells_formats_apart(tmp_path):
    from safetensors.torch import save_file

    torch.save({"w": torch.ones(3)}, tmp_path / "zip.pt")
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=2))
    for bad in ("zip.pt", "raw.pkl"):
        assert not is_safetensors(tmp_path / bad) and not is_json(tmp_path / bad), bad
    # a valid safetensors file whose header length's low byte is 0x80, the byte a pickle starts with
    for n in range(300):
        f = tmp_path / "edge.safetensors"
        save_file({"w": torch.ones(2)}, str(f), metadata={"pad": "x" * n})
        if f.read_bytes()[0] == 0x80:
            break
    assert f.read_bytes()[0] == 0x80 and is_safetensors(f)
    edge_dir = tmp_path / "edge_dir"
    edge_dir.mkdir()
    f.rename(edge_dir / f.name)
    assert_no_pickle(edge_dir)


@pytest.fixture
def no_pickle(monkeypatch):
    """Loading must not unpickle: every way to unpickle raises while the fixture is active."""

    class Refused(pickle.Unpickler):
        def __init__(self, *a, **k):
            raise AssertionError("something unpickled")

    def refuse(*a, **k):
        raise AssertionError("something unpickled")

    monkeypatch.setattr(pickle, "Unpickler", Refused)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    yield


def test_flatten_round_trip_of_awkward_values(tmp_path):
    x = torch.arange(12.0)
    obj = {"view": x[2:5], "same": x, "t": x.view(3, 4).t(), "empty": torch.zeros(0, 3),
           "bf": torch.ones(2, dtype=torch.bfloat16),
           "opt": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"betas": (0.9, 0.999), "params": [0]}]},
           "vals": [1, 2.5, float("nan"), float("inf"), None, True, "s", (1, (2, "x"))], "dtype": torch.float16,
           "gen": torch.Generator().manual_seed(5).get_state(), "__odd": 1, "dev": torch.device("cpu")}
    save_state(tmp_path / "s.safetensors", obj)
    assert is_safetensors(tmp_path / "s.safetensors")
    back = load_state(tmp_path / "s.safetensors")
    for k in ("view", "same", "t", "empty", "bf", "gen"):
        assert torch.equal(back[k], obj[k]) and back[k].dtype == obj[k].dtype and back[k].shape == obj[k].shape
    assert back["opt"]["state"][0]["step"] == 3.0 and back["opt"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert back["vals"][:2] == [1, 2.5] and back["vals"][2] != back["vals"][2] and back["vals"][4:] == [None, True, "s",
                                                                                                  (1, (2, "x"))]
    assert isinstance(back["vals"][0], int) and back["dtype"] is torch.float16 and back["__odd"] == 1
    assert back["dev"] == torch.device("cpu")
    tensors, skel = flatten_state({"a": {"b": torch.ones(1)}, "a.b": torch.zeros(1)})  # colliding names
    assert len(tensors) == 2 and unflatten_state(tensors, skel)["a.b"].item() == 0


def test_unsupported_values_and_bad_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"state: model\.net is a torch\.nn\.modules\.linear\.Linear"):
        save_state(tmp_path / "x.safetensors", {"model": {"net": torch.nn.Linear(2, 2)}})
    assert not (tmp_path / "x.safetensors").exists()
    (tmp_path / "bad.safetensors").write_bytes(b"\x10" * 20)
    with pytest.raises(UnreadableState, match="bad.safetensors cannot be read"):
        load_state(tmp_path / "bad.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(UnreadableState, match="without cdgfast's state metadata"):
        load_state(tmp_path / "plain.safetensors")
    save_state(tmp_path / "k.safetensors", {"a": 1}, kind="one")
    with pytest.raises(UnreadableState, match="expected a 'two' file"):
        load_state(tmp_path / "k.safetensors", kind="two")


@pytest.mark.parametrize("name", class_methods())
def test_every_method_saves_and_loads_without_pickle(name, tmp_path, no_pickle):
    """Method.save / cdgfast.methods.load carry every method's state: the loaded method continues with
    the same loss terms as the original (as test_methods.test_state_dict_round_trip does in memory)."""
    model, m, _ = run_two_tasks(name)
    m.save(tmp_path / "m", model=model)
    assert_no_pickle(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["state.json", "state.safetensors",
                                                                   "trainable.safetensors"]
    loaded = M.load(tmp_path / "m")
    assert loaded.name == m.name and loaded.config == m.config
    loaded.setup(num_classes=NUM_CLASSES, schedule=NoiseSchedule(), device="cpu")
    assert_same_next_task_losses(model, m, loaded)


def test_class_load_and_trainable_weights(tmp_path):
    model, m, _ = run_two_tasks("rank1")
    m.save(tmp_path / "r")
    again = type(m).load(tmp_path / "r")
    assert torch.equal(again.state_dict()["generator"], m.state_dict()["generator"])
    with pytest.raises(ValueError, match="holds the state of method 'rank1', not 'ewc'"):
        M.method_class("ewc").load(tmp_path / "r")
    with pytest.raises(ValueError, match="has no trainable.safetensors"):
        M.load(tmp_path / "r", model=model)
    # LoRA + the method state that protects it: the adapter weights come back into a fresh model
    lmodel, lm, _ = run_two_tasks("lora_merge")
    lm.save(tmp_path / "l", model=lmodel)
    from cdgfast.models import build_unet

    torch.manual_seed(123)
    fresh = build_unet("tiny", num_classes=NUM_CLASSES, sample_size=8)
    back = M.load(tmp_path / "l")
    back.restore_model_structure(fresh)
    M.load_trainable(fresh, tmp_path / "l")
    trained = {n: p for n, p in lmodel.named_parameters() if p.requires_grad}
    for n, p in fresh.named_parameters():
        if n in trained:
            assert torch.equal(p, trained[n]), n
    with pytest.raises(ValueError, match="has no parameters"):
        M.load_trainable(build_unet("tiny", num_classes=NUM_CLASSES, sample_size=8), tmp_path / "l")


TINY = dict(scale="smoke", steps=2, fid_samples=3, num_tasks=2, progress=False)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("clf_cache"))


def _cfg(out, cache_dir, **kw):
    return RunConfig(**{**TINY, "out": str(out), "cache_dir": cache_dir, **kw})


@pytest.mark.parametrize("methods", [["rank1+gd"], ["ccd", "clora"]])
def test_run_checkpoints_hold_no_pickle_and_resume_exactly(tmp_path, cache_dir, methods, monkeypatch):
    """A smoke run's checkpoints are safetensors with JSON metadata only; a run stopped after task 1 and
    resumed with pickle switched off gives the uninterrupted run's numbers (LoRA included: the adapter
    is re-added by the method, not unpickled)."""
    from train_hooks import InjectedCrash, StopAt

    kw = dict(methods=methods, dataset="digits")
    full = run(_cfg(tmp_path / "full", cache_dir, **kw))
    assert_no_pickle(tmp_path / "full" / "checkpoints")
    out = tmp_path / "crashed"
    with pytest.raises(InjectedCrash):
        run(_cfg(out, cache_dir, **kw), callbacks=StopAt(f"{methods[-1]}:1:1"))
    for name in methods:  # the last one stopped in task 2, the others finished
        ck = read_checkpoint(out / "checkpoints" / f"{name}.safetensors")
        assert ck["completed_task"] == (0 if name == methods[-1] else 1)
    assert_no_pickle(out / "checkpoints")

    def refuse(*a, **k):
        raise AssertionError("something unpickled")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    resumed = run(_cfg(out, cache_dir, resume=True, **kw))
    for name in methods:
        a, b = full["methods"][name], resumed["methods"][name]
        assert a["fid"] == b["fid"] and a["kld_at_k"] == b["kld_at_k"], name
        assert a["loss_means"] == b["loss_means"], name


def test_old_pickle_checkpoints_need_the_opt_in(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    torch.save({"completed_task": 0, "model": {}}, ck / "finetune.pt")
    with pytest.raises(UnreadableCheckpoint, match="old pickle checkpoint.*--allow-pickle"):
        load_checkpoint(tmp_path, "finetune")
    assert load_checkpoint(tmp_path, "finetune", allow_pickle=True)["completed_task"] == 0
    assert load_checkpoint(tmp_path, "l2") is None


def test_allow_pickle_is_a_cli_flag(capsys):
    from cdgfast.train.cli import build_parser

    args = build_parser().parse_args(["--resume", "--allow-pickle"])
    assert args.allow_pickle
    assert "--allow-pickle" in build_parser().format_help()


def test_load_state_dir_reports_missing_files(tmp_path):
    with pytest.raises(UnreadableState, match="state.json"):
        load_state_dir(tmp_path)


def test_analysis_checkpoint_inputs_without_pickle(tmp_path, cache_dir, no_pickle):
    """`analyze --checkpoint` takes plain safetensors weights, a diffusers model folder and a cdgfast.train
    checkpoint (a LoRA method's included), all without unpickling; a .pt needs --allow-pickle."""
    from safetensors.torch import save_file

    from cdgfast.analysis.experiment import load_checkpoint, save_checkpoint
    from cdgfast.data import load_dataset
    from cdgfast.models import build_unet

    data = load_dataset("digits")
    torch.manual_seed(7)
    model = build_unet("tiny", num_classes=data.num_classes, in_channels=data.channels, sample_size=data.image_size)
    save_checkpoint(str(tmp_path / "model.safetensors"), model, preset="tiny", data=data)
    assert_no_pickle(tmp_path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "plain.safetensors"))
    model.save_pretrained(str(tmp_path / "folder"), safe_serialization=True)
    for src in ("model.safetensors", "plain.safetensors", "folder"):
        got = load_checkpoint(str(tmp_path / src), data)
        for (n, a), b in zip(model.state_dict().items(), got.state_dict().values()):
            assert torch.equal(a, b), (src, n)
    (tmp_path / "x.pt").write_bytes(b"\x80\x02}q\x00.")  # a pickle
    with pytest.raises(ValueError, match=r"x\.pt cannot be read \(a pickle file .*--allow-pickle"):
        load_checkpoint(str(tmp_path / "x.pt"), data)
    with pytest.raises(ValueError, match="not a diffusers UNet2DModel folder"):
        load_checkpoint(str(tmp_path), data)
    # a driver checkpoint of a LoRA method: the adapter comes back from the saved method config
    out = tmp_path / "run"
    run(_cfg(out, cache_dir, methods=["lora_seq"], dataset="digits", num_tasks=1))
    got = load_checkpoint(str(out / "checkpoints" / "lora_seq.safetensors"), data)
    ck = read_checkpoint(out / "checkpoints" / "lora_seq.safetensors")
    assert any("lora" in n for n in got.state_dict())
    for n, v in got.state_dict().items():
        assert torch.equal(v, ck["model"][n]), n
