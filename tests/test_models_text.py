"""cdgfast.models.text: loading a local Stable Diffusion directory (incomplete ones refused, a saved tiny
model read back offline), the offline tiny tokenizer and models, modifier tokens (only the new row trains,
bit for bit, under Adam / AdamW with weight decay; task 2 leaves V*_1 alone; forward and gradient equal a
plain nn.Embedding of the full table), LoRA on the cross-attention K/V only, and prompt encoding feeding
ops.dc_predictions."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from cdgfast.models import (CROSS_ATTENTION_KV, ModifierTokenEmbedding, add_modifier_token, encode_prompts,  # noqa: E402
                            fold_modifier_tokens, freeze_modifier_tokens,
                            load_stable_diffusion, modifier_token_ids, tiny_text_models,
                            tiny_text_unet, tiny_tokenizer)
from cdgfast.models.lora import add_lora  # noqa: E402
from cdgfast.ops import dc_predictions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
L = 8  # a short context keeps the tests fast; the default is CLIP's 77


@pytest.fixture(scope="module")
def parts():
    return tiny_text_models(max_length=L, seed=0)


def fresh(max_length=L):
    p = tiny_text_models(max_length=max_length, seed=0)
    p.text_encoder.requires_grad_(False)
    return p


def save_parts(p, root: Path) -> Path:
    for name in ("unet", "vae", "text_encoder", "tokenizer"):
        getattr(p, name).save_pretrained(root / name)
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(p.scheduler_config))
    return root


@pytest.fixture(scope="module")
def saved(parts, tmp_path_factory):
    return save_parts(parts, tmp_path_factory.mktemp("sd"))


# --- loading -----------------------------------------------------------------------------------------------------

def test_load_refuses_an_absent_directory(tmp_path):
    with pytest.raises(ValueError, match="pretrained: .*not a directory"):
        load_stable_diffusion(tmp_path / "nothing")
    for bad in (None, 3, ""):
        with pytest.raises(ValueError, match="pretrained"):
            load_stable_diffusion(bad)


def test_load_lists_what_is_missing(saved, tmp_path):
    # a fake directory: vae complete, unet without weights, text encoder without config, no tokenizer/scheduler
    import shutil

    shutil.copytree(saved / "vae", tmp_path / "vae")
    (tmp_path / "unet").mkdir()
    shutil.copy(saved / "unet" / "config.json", tmp_path / "unet")
    (tmp_path / "text_encoder").mkdir()
    shutil.copy(saved / "text_encoder" / "model.safetensors", tmp_path / "text_encoder")
    with pytest.raises(ValueError, match="pretrained") as e:
        load_stable_diffusion(tmp_path)
    msg = str(e.value)
    for part in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/config.json", "tokenizer/",
                 "scheduler/scheduler_config.json"):
        assert part in msg, msg
    assert "vae" not in msg and "text_encoder/model" not in msg and "unet/config" not in msg
    (tmp_path / "tokenizer").mkdir()
    (tmp_path / "tokenizer" / "vocab.json").write_text("{}")
    with pytest.raises(ValueError, match="tokenizer/vocab.json \\+ tokenizer/merges.txt"):
        load_stable_diffusion(tmp_path)


def test_load_bad_dtype_and_device(saved):
    with pytest.raises(ValueError, match="dtype"):
        load_stable_diffusion(saved, dtype=torch.int64)
    with pytest.raises(ValueError, match="dtype"):
        load_stable_diffusion(saved, dtype="float32")
    with pytest.raises(ValueError, match="device"):
        load_stable_diffusion(saved, device="nowhere")


def test_saved_tiny_model_loads_back_offline(parts, saved, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(saved / "no-cache"))
    got = load_stable_diffusion(str(saved), dtype=torch.float64, device="cpu")
    assert type(got.unet).__name__ == "UNet2DConditionModel" and type(got.vae).__name__ == "AutoencoderKL"
    assert type(got.text_encoder).__name__ == "CLIPTextModel"
    assert all(p.dtype == torch.float64 for m in (got.unet, got.vae, got.text_encoder) for p in m.parameters())
    assert not got.unet.training and got.scheduler_config == parts.scheduler_config
    prompts = ["a photo of a digit", "A picture of zebra style"]
    ids = parts.tokenizer(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids
    ids2 = got.tokenizer(prompts, padding="max_length", max_length=L, truncation=True, return_tensors="pt").input_ids
    assert torch.equal(ids, ids2) and got.tokenizer.model_max_length == L
    with torch.no_grad():
        ehs = encode_prompts(got.tokenizer, got.text_encoder, prompts)
        ref = encode_prompts(parts.tokenizer, parts.text_encoder.double(), prompts)
        torch.testing.assert_close(ehs, ref, rtol=0, atol=0)
        x, t = torch.randn(2, 4, 16, 16, dtype=torch.float64), torch.tensor([3, 700])
        torch.testing.assert_close(got.unet(x, t, encoder_hidden_states=ehs).sample,
                                   parts.unet.double()(x, t, encoder_hidden_states=ehs).sample, rtol=0, atol=0)
        img = torch.randn(1, 3, 32, 32, dtype=torch.float64)
        torch.testing.assert_close(got.vae.encode(img).latent_dist.mean, parts.vae.double().encode(img).latent_dist.mean)
    parts.unet.float(), parts.text_encoder.float(), parts.vae.float()


def test_import_error_names_the_text_extra(saved, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="`text` extra"):
        load_stable_diffusion(saved)
    with pytest.raises(ImportError, match="`text` extra"):
        tiny_text_models()


def test_library_imports_without_transformers():
    # peft depends on transformers and diffusers imports peft whenever it is installed, so an environment
    # without transformers has no peft either: block both (peft is imported only inside the LoRA helpers)
    code = ("import sys; sys.modules['transformers'] = None; sys.modules['peft'] = None\n"
            "import cdgfast.models, cdgfast.ops, cdgfast.methods\n"
            "from cdgfast.models import CROSS_ATTENTION_KV, tiny_text_unet, tiny_tokenizer\n"
            "tiny_text_unet(seed=0)\n"
            "try:\n    tiny_tokenizer()\nexcept ImportError as e:\n    assert '`text` extra' in str(e), e\n"
            "else:\n    raise AssertionError('no ImportError')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": ""})
    assert r.returncode == 0, r.stderr


def test_noise_schedule_is_sd_scaled_linear(parts):
    s = parts.noise_schedule()
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    torch.testing.assert_close(s.alphas_cumprod.double(), torch.cumprod(1 - betas, 0), rtol=1e-12, atol=1e-12)


# --- the tiny tokenizer and models ---------------------------------------------------------------------------------

def test_tiny_tokenizer_pads_to_a_fixed_length():
    tok = tiny_tokenizer(max_length=10)
    assert tok.model_max_length == 10
    out = tok(["a photo of a digit", "A PHOTO of a zebra", "a"], padding="max_length", max_length=10,
              truncation=True, return_tensors="pt").input_ids
    v = tok.get_vocab()
    assert out.shape == (3, 10) and out.dtype == torch.long
    assert out[0].tolist() == [2, v["a"], v["photo"], v["of"], v["a"], v["digit"], 3, 0, 0, 0]
    assert out[1, 5].item() == tok.unk_token_id == 1 and out[1, :5].tolist() == out[0, :5].tolist()
    assert out[2].tolist() == [2, v["a"], 3] + [0] * 7
    assert (tok.pad_token_id, tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2, 3)
    assert tiny_tokenizer(words=("x", "y"), max_length=4)(["x y y y y"], padding="max_length", max_length=4,
                                                           truncation=True).input_ids == [[2, 4, 5, 3]]
    for bad in ({"max_length": 2}, {"max_length": 7.0}, {"words": "abc"}, {"words": ("a", "a")},
                {"words": ("Upper",)}, {"words": ("two words",)}, {"words": ("<|pad|>",)}, {"words": ()}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tiny_tokenizer(**bad)


def test_tiny_models_shapes_and_sizes(parts):
    te, unet = parts.text_encoder, parts.unet
    assert te.config.vocab_size == len(parts.tokenizer) and te.config.hidden_size == 32
    assert te.config.num_hidden_layers == 2 and te.config.num_attention_heads == 2
    assert te.config.max_position_embeddings == L and unet.config.cross_attention_dim == 32
    assert tuple(unet.config.block_out_channels) == (16, 32)
    a, b = tiny_text_models(max_length=L, seed=0), tiny_text_models(max_length=L, seed=1)
    same = all(torch.equal(p, q) for p, q in zip(a.unet.parameters(), parts.unet.parameters()))
    assert same and not torch.equal(a.text_encoder.get_input_embeddings().weight, b.text_encoder.get_input_embeddings().weight)
    assert tiny_text_models().tokenizer.model_max_length == 77
    for bad in ({"hidden_size": 7}, {"hidden_size": 0}, {"seed": -1}, {"max_length": 0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tiny_text_models(**bad)
    for bad in ({"cross_attention_dim": 0}, {"sample_size": 15}, {"seed": 1.5}, {"cross_attention_levels": 3},
                {"cross_attention_levels": True}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tiny_text_unet(**bad)


def test_tiny_unet_cross_attention_levels():
    """levels 1: cross-attention at full resolution (down 0, up 1) and in the mid block; levels 2: at
    both resolutions. The forward runs either way and reads the text states at every cross-attention."""
    def xattn(unet):
        return sorted(n.split(".attentions")[0] for n, _ in unet.named_modules() if n.endswith("attn2"))

    one, two = tiny_text_unet(seed=0), tiny_text_unet(seed=0, cross_attention_levels=2)
    assert xattn(one) == ["down_blocks.0", "mid_block", "up_blocks.1", "up_blocks.1"]
    assert xattn(two) == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.0", "up_blocks.1",
                          "up_blocks.1"]
    x, t = torch.randn(2, 4, 16, 16), torch.tensor([3, 500])
    h1, h2 = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert not torch.allclose(two(x, t, encoder_hidden_states=h1).sample, two(x, t, encoder_hidden_states=h2).sample)


# --- modifier tokens -------------------------------------------------------------------------------------------------

def table(te) -> torch.Tensor:
    return te.get_input_embeddings().weight.detach().clone()


def test_add_modifier_token_ids_and_initialisation():
    p = fresh()
    tok, te = p.tokenizer, p.text_encoder
    V = len(tok)
    before = table(te)
    i1 = add_modifier_token(tok, te, "<V1>", init_word="digit")
    i2 = add_modifier_token(tok, te, "<V2>")
    assert (i1, i2) == (V, V + 1) and len(tok) == V + 2 and modifier_token_ids(te) == [V, V + 1]
    emb = te.get_input_embeddings()
    assert isinstance(emb, ModifierTokenEmbedding) and emb.num_embeddings == V + 2 and emb.embedding_dim == 32
    w = table(te)
    assert torch.equal(w[:V], before) and torch.equal(w[i1], before[tok.get_vocab()["digit"]])
    torch.testing.assert_close(w[i2], before.double().mean(0).float(), rtol=1e-6, atol=1e-7)
    ids = tok(["a photo of a <V1> digit", "<V2> <V1>", "a x<V1>"]).input_ids
    assert ids[0][5] == i1 and ids[1][1:3] == [i2, i1] and i1 not in ids[2]
    # only V2 trains (V1 frozen when V2 was added); the base table is frozen
    trainable = [q for q in te.parameters() if q.requires_grad]
    assert len(trainable) == 1 and trainable[0] is emb.rows[1]


def test_modifier_embedding_equals_a_plain_table():
    """Forward and the new row's gradient equal those of a text encoder whose nn.Embedding holds the full
    table (what transformers' resize_token_embeddings would give)."""
    import copy

    p = fresh()
    tok, te = p.tokenizer, p.text_encoder.double()
    ref = copy.deepcopy(te)
    i1 = add_modifier_token(tok, te, "<V1>", init_word="cat")
    add_modifier_token(tok, te, "<V2>", freeze_previous=False)
    plain = torch.nn.Embedding(len(tok), 32, dtype=torch.float64)
    plain.weight.data.copy_(table(te))
    ref.set_input_embeddings(plain)
    prompts = ["a photo of a <V1> cat", "a <V2> photo of <V1>", "the dog"]
    out = encode_prompts(tok, te, prompts)
    out_ref = encode_prompts(tok, ref, prompts)
    torch.testing.assert_close(out, out_ref, rtol=0, atol=1e-12)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    rows = te.get_input_embeddings().rows
    torch.testing.assert_close(rows[0].grad, plain.weight.grad[i1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rows[1].grad, plain.weight.grad[i1 + 1], rtol=1e-10, atol=1e-12)
    assert plain.weight.grad[:i1].abs().sum() > 0  # the plain table's frozen rows would get gradients


def test_fold_modifier_tokens_saves_a_plain_clip_text_model(tmp_path):
    from transformers import CLIPTextModel

    p = fresh()
    add_modifier_token(p.tokenizer, p.text_encoder, "<V1>")
    emb = p.text_encoder.get_input_embeddings()
    plain = emb.to_embedding()
    assert type(plain) is torch.nn.Embedding and not plain.weight.requires_grad
    ids = torch.tensor([[0, 5, len(p.tokenizer) - 1]])
    assert torch.equal(plain(ids), emb(ids)) and plain.weight.data_ptr() != emb.rows[0].data_ptr()
    with torch.no_grad():
        before = encode_prompts(p.tokenizer, p.text_encoder, ["a photo of a <V1> digit"])
        fold_modifier_tokens(p.text_encoder)
        assert type(p.text_encoder.get_input_embeddings()) is torch.nn.Embedding and modifier_token_ids(p.text_encoder) == []
        p.text_encoder.save_pretrained(tmp_path)
        back = CLIPTextModel.from_pretrained(tmp_path, local_files_only=True)
        torch.testing.assert_close(encode_prompts(p.tokenizer, back, ["a photo of a <V1> digit"]), before, rtol=0, atol=0)


def test_a_gradient_mask_alone_would_not_freeze_rows_under_weight_decay():
    """Why the new row is its own parameter: masking the gradient of a resized table is not enough."""
    emb = torch.nn.Embedding(6, 4)
    w0 = emb.weight.detach().clone()
    emb.weight.register_hook(lambda g: torch.zeros_like(g).index_copy_(0, torch.tensor([5]), g[5:]))
    opt = torch.optim.AdamW(emb.parameters(), lr=1e-2, weight_decay=0.1)
    emb(torch.tensor([1, 5])).sum().backward()
    opt.step()
    assert (emb.weight[:5] != w0[:5]).any()


def train(p, prompts, optimizer, steps=4):
    """A few steps of a loss through the UNet, the optimizer over ALL of the text encoder's parameters."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(len(prompts), 4, 16, 16, generator=g)
    t = torch.randint(0, 1000, (len(prompts),), generator=g)
    for _ in range(steps):
        optimizer.zero_grad()
        ehs = encode_prompts(p.tokenizer, p.text_encoder, prompts)
        p.unet(x, t, encoder_hidden_states=ehs).sample.square().mean().backward()
        optimizer.step()


@pytest.mark.parametrize("opt", [torch.optim.Adam, torch.optim.AdamW])
def test_only_the_new_row_trains_under_weight_decay(opt):
    p = fresh()
    p.unet.requires_grad_(False)
    tok, te = p.tokenizer, p.text_encoder
    new = add_modifier_token(tok, te, "<V1>", init_word="digit")
    w0 = table(te)
    rest0 = {n: q.detach().clone() for n, q in te.named_parameters() if "token_embedding" not in n}
    train(p, ["a photo of a <V1> digit", "<V1>"], opt(list(te.parameters()), lr=1e-2, weight_decay=0.1))
    w1 = table(te)
    changed = (w1 != w0).any(1).nonzero().flatten().tolist()
    assert changed == [new]
    assert all(torch.equal(q, rest0[n]) for n, q in te.named_parameters() if n in rest0)


def test_two_tasks_task2_leaves_v1_unchanged():
    p = fresh()
    p.unet.requires_grad_(False)
    tok, te = p.tokenizer, p.text_encoder
    v1 = add_modifier_token(tok, te, "<V1>")
    train(p, ["a photo of a <V1> digit"], torch.optim.AdamW(te.parameters(), lr=1e-2, weight_decay=0.1))
    after1 = table(te)
    v2 = add_modifier_token(tok, te, "<V2>", init_word="dog")
    assert te.get_input_embeddings().rows[0].grad is None  # frozen rows hold no stale gradient
    train(p, ["a photo of a <V2> dog", "<V1> and <V2>"], torch.optim.AdamW(te.parameters(), lr=1e-2, weight_decay=0.1))
    after2 = table(te)
    assert torch.equal(after2[: v1 + 1], after1) and not torch.equal(after2[v2], table(fresh().text_encoder)[0])
    assert (after2[v2] != after1[tok.get_vocab()["dog"]]).any()
    freeze_modifier_tokens(te)
    assert not any(q.requires_grad for q in te.parameters())


def test_add_modifier_token_refusals():
    p = fresh()
    tok, te = p.tokenizer, p.text_encoder
    add_modifier_token(tok, te, "<V1>")
    cases = [({"token": "<V1>"}, "token"), ({"token": "photo"}, "token"), ({"token": "two words"}, "token"),
             ({"token": ""}, "token"), ({"token": 3}, "token"), ({"init_word": "a photo"}, "init_word"),
             ({"init_word": "zebra"}, "init_word"), ({"init_word": 5}, "init_word"),
             ({"freeze_previous": 1}, "freeze_previous")]
    for kw, name in cases:
        args = {"token": "<V2>", **kw}
        with pytest.raises(ValueError, match=name):
            add_modifier_token(tok, te, **args)
    assert len(tok) == te.get_input_embeddings().num_embeddings  # nothing was added by a refusal
    with pytest.raises(ValueError, match="tokenizer"):
        add_modifier_token(tiny_tokenizer(max_length=L), te, "<V3>")
    with pytest.raises(ValueError, match="tokenizer"):
        add_modifier_token("not a tokenizer", te, "<V3>")
    with pytest.raises(ValueError, match="text_encoder"):
        add_modifier_token(tok, torch.nn.Linear(2, 2), "<V3>")
    with pytest.raises(ValueError, match="token_id"):
        te.get_input_embeddings().row(len(tok))


# --- LoRA on the cross-attention K/V --------------------------------------------------------------------------------

def test_lora_only_on_cross_attention_kv():
    from peft.tuners.lora import LoraLayer

    unet = tiny_text_unet(seed=0)
    plain = {n for n, m in add_lora(tiny_text_unet(seed=0), 2, target_modules=("to_k", "to_v")).named_modules()
             if isinstance(m, LoraLayer)}
    assert any(".attn1." in n for n in plain)  # why the plain names are not the K/V of cross-attention
    g = torch.Generator().manual_seed(0)
    x, t, ehs = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([10, 900]), torch.randn(2, L, 32, generator=g)
    with torch.no_grad():
        before = unet(x, t, encoder_hidden_states=ehs).sample
    add_lora(unet, rank=4, target_modules=CROSS_ATTENTION_KV, seed=0)
    lora = {n for n, m in unet.named_modules() if isinstance(m, LoraLayer)}
    expected = {n for n, _ in tiny_text_unet(seed=0).named_modules() if n.endswith(("attn2.to_k", "attn2.to_v"))}
    assert lora == expected and len(expected) == 8 and not any("attn1" in n for n in lora)
    assert {n for n, q in unet.named_parameters() if q.requires_grad} == \
        {f"{n}.lora_{ab}.default.weight" for n in expected for ab in "AB"}
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, encoder_hidden_states=ehs).sample, before, rtol=0, atol=0)


# --- prompt encoding ----------------------------------------------------------------------------------------------

def test_encode_prompts_feeds_the_unet_and_dc_predictions():
    p = fresh()
    tok, te, unet = p.tokenizer, p.text_encoder, p.unet
    add_modifier_token(tok, te, "<V1>", init_word="digit")
    prompts = ["a photo of a digit", "a photo of a <V1> digit", "a photo of a cat"]
    with torch.no_grad():
        ehs = encode_prompts(tok, te, prompts)
        assert ehs.shape == (3, L, 32) and ehs.dtype == torch.float32
        ids = tok(prompts, padding="max_length", max_length=L, return_tensors="pt").input_ids
        torch.testing.assert_close(ehs, te(ids).last_hidden_state, rtol=0, atol=0)
        assert not torch.equal(ehs[0], ehs[1])
        g = torch.Generator().manual_seed(3)
        x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([5, 600])
        idx = torch.tensor([[0, 1, 2], [1, 1, 0]])
        fast = dc_predictions(unet, x, t, ehs, idx)
        naive = torch.stack([unet(x, t, encoder_hidden_states=ehs[idx[:, k]]).sample for k in range(3)], 1)
    assert fast.shape == (2, 3, 4, 16, 16)
    torch.testing.assert_close(fast, naive, rtol=2e-5, atol=2e-5)


def test_encode_prompts_refusals(parts):
    tok, te = parts.tokenizer, parts.text_encoder
    for bad in ("a photo", [], ["a", 3], None):
        with pytest.raises(ValueError, match="prompts"):
            encode_prompts(tok, te, bad)
    with pytest.raises(ValueError, match=r"prompts\[1\]: 10 tokens"):
        encode_prompts(tok, te, ["a", "a photo of a photo of a cat"])
    with pytest.raises(ValueError, match="tokenizer"):
        encode_prompts(tiny_tokenizer(max_length=L + 1), te, ["a"])
    with pytest.raises(ValueError, match="text_encoder"):
        encode_prompts(tok, object(), ["a"])
