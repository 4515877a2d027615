"""cdgfast.analysis: Fisher geometry from the Gram matrix, checked against dense float64 references."""
import json
import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from cdgfast.analysis import fisher_geometry, gram_statistics, param_groups, scaled_prediction_mse
from cdgfast.diffusion import DiffusionLoss, NoiseSchedule

TOL = 1e-8  # float64 throughout


class SmallNet(torch.nn.Module):
    """Conv + GroupNorm + class embedding + Linear, with odd sizes and one frozen tensor."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(2, 3, 3, padding=1)
        self.norm = torch.nn.GroupNorm(1, 3)
        self.emb = torch.nn.Embedding(4, 3)
        self.frozen = torch.nn.Linear(3, 3)
        self.frozen.weight.requires_grad_(False)     # weight frozen, bias trainable
        self.out = torch.nn.Linear(3 * 5 * 5, 7)

    def forward(self, x, y):
        h = torch.tanh(self.norm(self.conv(x)) + self.emb(y)[:, :, None, None])
        h = self.frozen(h.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.out(h.flatten(1))


def small_loss(model, batch):
    pred = model(batch["x"], batch["y"])
    return (pred - batch["target"]).pow(2).mean(1) * batch["w"]


def small_setup(n=13, seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = SmallNet().double()
    batch = {"x": torch.randn(n, 2, 5, 5, generator=g, dtype=torch.float64),
             "y": torch.randint(0, 4, (n,), generator=g),
             "target": torch.randn(n, 7, generator=g, dtype=torch.float64),
             "w": torch.rand(n, generator=g, dtype=torch.float64) + 0.5}
    return model, batch


def dense_grads(model, loss_fn, batch):
    """G [n, P] by a plain per-sample loop of backward passes."""
    params = [p for p in model.parameters() if p.requires_grad]
    n = next(iter(batch.values())).shape[0]
    rows = []
    for i in range(n):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        grads = torch.autograd.grad(loss_fn(model, one).sum(), params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).double()


def close(a, b, scale=1.0):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                               rtol=TOL, atol=TOL * scale)


def dense_reference(G, top_k):
    n, P = G.shape
    F = G.T @ G / n
    mu = G.mean(0)
    eig = torch.linalg.eigvalsh(F).flip(0)[:top_k]
    c = ((G @ mu) ** 2).mean() / mu.dot(mu) ** 2
    R = c * torch.outer(mu, mu)
    D = torch.diag(torch.diagonal(F))
    fro = torch.linalg.matrix_norm(F)
    cos = (G @ mu).abs() / (G.norm(dim=1) * mu.norm())
    # Best rank-1 approximation from the leading eigenpair.
    w, V = torch.linalg.eigh(F)
    best = w[-1] * torch.outer(V[:, -1], V[:, -1])
    return dict(F=F, mu=mu, eig=eig, c=c, fro=fro, cos=cos,
                rank1=torch.linalg.matrix_norm(F - R) / fro, diag=torch.linalg.matrix_norm(F - D) / fro,
                best=torch.linalg.matrix_norm(F - best) / fro, gram=G @ G.T, dvec=torch.diagonal(F))


@pytest.mark.parametrize("n,top_k", [(13, 5), (2, 1), (6, 9)])
def test_matches_dense_fisher(n, top_k):
    model, batch = small_setup(n)
    G = dense_grads(model, small_loss, batch)
    ref = dense_reference(G, top_k)
    P = G.shape[1]
    assert P == sum(p.numel() for p in model.parameters() if p.requires_grad)
    geo = fisher_geometry(model, small_loss, batch, top_k=top_k, chunk_params=37, micro_batch=4, progress=False)
    scale = float(ref["F"].abs().max())
    assert geo.num_samples == n and geo.num_params == P
    close(geo.gram, ref["gram"], float(ref["gram"].abs().max()))
    close(geo.mean_grad, ref["mu"], float(ref["mu"].abs().max()))
    close(geo.diagonal, ref["dvec"], scale)
    close(geo.sq_norms, G.pow(2).sum(1), float(G.pow(2).sum(1).max()))
    close(geo.projections, G @ ref["mu"], float((G @ ref["mu"]).abs().max()))
    close(geo.mean_grad_sq_norm, ref["mu"].dot(ref["mu"]), float(ref["mu"].dot(ref["mu"])))
    close(geo.cosine, ref["cos"])
    assert geo.eigenvalues.shape == (top_k,)
    close(geo.eigenvalues, ref["eig"], float(ref["eig"][0]))      # k > n: zeros padded, as eigvalsh gives
    close(geo.eig_ratio, ref["eig"][1] / ref["eig"][0] if top_k >= 2 else
          torch.linalg.eigvalsh(ref["F"])[-2] / torch.linalg.eigvalsh(ref["F"])[-1])
    close(geo.fisher_fro, ref["fro"], float(ref["fro"]))
    close(geo.rank1_coeff, ref["c"], float(ref["c"]))
    close(geo.rank1_rel_err, ref["rank1"])
    close(geo.diag_rel_err, ref["diag"])
    close(geo.best_rank1_rel_err, ref["best"])
    assert geo.best_rank1_rel_err <= geo.rank1_rel_err + 1e-12   # Eckart-Young is a lower bound


def test_exactly_rank1_fisher():
    """Collinear gradients g_i = c_i v: F = c* mu mu^T exactly, lambda_2 = 0, cosines 1."""
    torch.manual_seed(1)
    lin = torch.nn.Linear(6, 1, bias=False).double()
    n = 9
    x = torch.randn(1, 6, dtype=torch.float64).expand(n, 6).contiguous()
    # Non-tensor (and 0-dim) entries are passed to loss_fn unchanged, not split per sample.
    batch = {"x": x, "s": torch.randn(n, dtype=torch.float64), "k": 3.0, "z": torch.tensor(0.5)}

    def loss(model, b):                       # grad = k z s_i x (the same x for every sample)
        return model(b["x"]).squeeze(1) * b["s"] * b["k"] * b["z"]

    geo = fisher_geometry(lin, loss, batch, top_k=3, progress=False)
    assert geo.rank1_rel_err < 1e-6 and geo.best_rank1_rel_err < 1e-6
    assert abs(geo.eig_ratio) < 1e-10
    close(geo.cosine, torch.ones(n))
    assert 0.0 < geo.diag_rel_err < 1.0
    w = lin.weight.detach().reshape(-1)
    close(geo.mean_grad, 1.5 * batch["s"].mean() * x[0], 1.0)
    close(geo.eigenvalues[0], (1.5 * batch["s"]).pow(2).mean() * x[0].dot(x[0]), 1.0)
    assert w.numel() == geo.num_params


def test_chunking_and_micro_batch_invariance():
    model, batch = small_setup(11, seed=3)
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    base = fisher_geometry(model, small_loss, batch, chunk_params=P, micro_batch=11, progress=False)
    for chunk, mb in [(13, 4), (97, 1), (P - 1, 5), (None, 3), (10 * P, 11)]:
        geo = fisher_geometry(model, small_loss, batch, chunk_params=chunk, micro_batch=mb, progress=False)
        close(geo.gram, base.gram, float(base.gram.abs().max()))
        close(geo.mean_grad, base.mean_grad, float(base.mean_grad.abs().max()))
        close(geo.diagonal, base.diagonal, float(base.diagonal.abs().max()))
        close(geo.eigenvalues, base.eigenvalues, float(base.eigenvalues[0]))


def test_param_groups_cover_flat_vector():
    numels = [5, 1, 12, 3]
    for chunk in (1, 4, 5, 7, 21, 100):
        groups = param_groups(numels, chunk)
        flat = []
        for grp in groups:
            assert 0 < sum(b - a for _, a, b in grp) <= chunk
            offs = [sum(numels[:i]) for i in range(len(numels))]
            flat += [offs[i] + j for i, a, b in grp for j in range(a, b)]
        assert flat == list(range(sum(numels)))


class _MaxNumel(TorchDispatchMode):
    """Records the largest tensor any op produces (vmap's batched tensors show their physical size)."""

    def __init__(self):
        super().__init__()
        self.max_numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_no_n_by_p_tensor():
    model, batch = small_setup(12, seed=5)
    n = 12
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with _MaxNumel() as rec:
        geo = fisher_geometry(model, small_loss, batch, chunk_params=P // 4, micro_batch=3, progress=False)
    assert rec.max_numel < n * P, (rec.max_numel, n * P)
    assert rec.max_numel <= max(n * (P // 4), n * n, P, 3 * max(p.numel() for p in model.parameters()))
    # The recorder can fail: one group of all P parameters creates the [n, P] buffer.
    with _MaxNumel() as rec_full:
        fisher_geometry(model, small_loss, batch, chunk_params=P, micro_batch=3, progress=False)
    assert rec_full.max_numel >= n * P
    assert geo.num_params == P


def test_unet_diffusion_loss_matches_loop():
    """The vmap path through a diffusers UNet (attention, GroupNorm, class embedding) in float64."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    # The "tiny" preset's block types at a fraction of its width (the loop reference is float64).
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(4, 8),
                        layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=4,
                        attention_head_dim=4, num_class_embeds=4).double()
    n = 4
    g = torch.Generator().manual_seed(0)
    batch = {"x": torch.rand(n, 1, 8, 8, generator=g, dtype=torch.float64) * 2 - 1,
             "y": torch.tensor([0, 1, 2, 3]), "t": torch.tensor([10, 500, 999, 0]),
             "eps": torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)}
    loss_fn = DiffusionLoss(NoiseSchedule())
    G = dense_grads(model, loss_fn, batch)
    P = G.shape[1]
    geo = fisher_geometry(model, loss_fn, batch, chunk_params=P // 2 + 3, micro_batch=3, progress=False)
    K = G @ G.T
    close(geo.gram, K, float(K.abs().max()))
    close(geo.mean_grad, G.mean(0), float(G.mean(0).abs().max()))
    close(geo.diagonal, G.pow(2).mean(0), float(G.pow(2).mean(0).max()))
    assert model.training  # mode restored


def test_gram_statistics_identities_random():
    """gram_statistics alone, from an explicit G (no model)."""
    g = torch.Generator().manual_seed(7)
    G = torch.randn(9, 23, generator=g, dtype=torch.float64) + 0.7 * torch.randn(23, generator=g, dtype=torch.float64)
    ref = dense_reference(G, 4)
    s = gram_statistics(G @ G.T, G.pow(2).sum(0), top_k=4)
    close(s["eigenvalues"], ref["eig"], float(ref["eig"][0]))
    close(s["rank1_rel_err"], ref["rank1"])
    close(s["diag_rel_err"], ref["diag"])
    close(s["fisher_fro"], ref["fro"], float(ref["fro"]))
    close(s["cosine"], ref["cos"])


def test_scaled_prediction_mse_reference():
    sched = NoiseSchedule()

    class Echo(torch.nn.Module):  # eps_hat = 2 * x_t
        def forward(self, x, t, class_labels=None):
            return 2 * x

    n = 5
    x0 = torch.randn(n, 1, 3, 3, dtype=torch.float64)
    eps = torch.randn_like(x0)
    t = torch.tensor([0, 100, 500, 900, 999])
    out = scaled_prediction_mse(Echo(), {"x": x0, "t": t, "eps": eps, "y": torch.zeros(n, dtype=torch.long)}, sched)
    for i in range(n):
        ab = float(sched.alphas_cumprod[t[i]])
        xt = math.sqrt(ab) * x0[i] + math.sqrt(1 - ab) * eps[i]
        close(out[i], ((xt - math.sqrt(1 - ab) * 2 * xt) ** 2).mean())


def test_scaled_prediction_mse_half_precision_near_t0():
    """A bf16 model at t = 0: 1 - abar = 1e-4 rounds to 0 in bf16, which made x_hat = 0 (MSE = mean x_t^2)."""
    sched = NoiseSchedule()

    class Echo(torch.nn.Module):  # eps_hat = x_t / sqrt(1 - abar_0): then x_hat = x_t and the MSE is ~0
        def forward(self, x, t, class_labels=None):
            return x / math.sqrt(1 - float(sched.alphas_cumprod[0]))

    x0 = torch.randn(4, 1, 3, 3)
    eps = torch.randn_like(x0)
    t = torch.zeros(4, dtype=torch.long)
    batch = {"x": x0.bfloat16(), "t": t, "eps": eps.bfloat16()}
    out = scaled_prediction_mse(Echo(), batch, sched)
    x_t = sched.add_noise(batch["x"], batch["eps"], t).float()
    assert float(out.max()) < 1e-2 * float(x_t.pow(2).mean()), out


def test_bad_input():
    model, batch = small_setup(5)
    with pytest.raises(ValueError, match="batch"):
        fisher_geometry(model, small_loss, {k: v[:1] for k, v in batch.items()}, progress=False)
    with pytest.raises(ValueError, match="batch"):
        fisher_geometry(model, small_loss, {**batch, "w": batch["w"][:3]}, progress=False)
    with pytest.raises(ValueError, match="top_k"):
        fisher_geometry(model, small_loss, batch, top_k=0, progress=False)
    with pytest.raises(ValueError, match="top_k"):
        fisher_geometry(model, small_loss, batch, top_k=10 ** 6, progress=False)
    with pytest.raises(ValueError, match="chunk_params"):
        fisher_geometry(model, small_loss, batch, chunk_params=0, progress=False)
    with pytest.raises(ValueError, match="micro_batch"):
        fisher_geometry(model, small_loss, batch, micro_batch=0, progress=False)
    with pytest.raises(ValueError, match="loss_fn"):
        fisher_geometry(model, lambda m, b: small_loss(m, b).sum() * torch.ones(2), batch, progress=False)
    with pytest.raises(ValueError, match="batch"):
        fisher_geometry(model, small_loss, [1, 2], progress=False)


def test_cli_smoke_and_checkpoint(tmp_path):
    from cdgfast.analysis.cli import main

    out = tmp_path / "run"
    assert main(["fisher", "--dataset", "digits", "--timesteps", "100,900", "--samples", "6",
                 "--train-steps", "1", "--batch-size", "4", "--out", str(out), "--no-progress"]) == 0
    names = ["geometry.json", "model.safetensors", "fig1_mse.png", "fig2_cosine.png", "fig3a_mean_grad_cosine.png",
             "fig3b_eigenvalues.png", "fig3c_eig_ratio.png", "fig3d_rel_frobenius.png"]
    for name in names:
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "geometry.json").read_text())
    assert [r["t"] for r in res["timesteps"]] == [100, 900]
    for r in res["timesteps"]:
        assert len(r["eigenvalues"]) == 5 and len(r["cosine"]) == 6
        assert r["eigenvalues"] == sorted(r["eigenvalues"], reverse=True)
        assert 0.0 <= r["rank1_rel_err"] and 0.0 <= r["diag_rel_err"] <= 1.0
    M = torch.tensor(res["mean_grad_cosine"])
    assert M.shape == (2, 2)
    close(torch.diagonal(M), torch.ones(2), 1.0)
    # Reload the checkpoint: same model, fixed seed -> same measurements.
    out2 = tmp_path / "again"
    assert main(["fisher", "--timesteps", "100,900", "--samples", "6", "--checkpoint", str(out / "model.safetensors"),
                 "--out", str(out2), "--no-progress", "--no-figures"]) == 0
    res2 = json.loads((out2 / "geometry.json").read_text())
    for a, b in zip(res["timesteps"], res2["timesteps"]):
        assert a["eigenvalues"] == pytest.approx(b["eigenvalues"], rel=1e-6)
    assert not os.path.exists(out2 / "model.safetensors")
    # A plain state dict loads too; a mismatched one is a ValueError naming the checkpoint.
    from cdgfast.analysis.experiment import load_checkpoint
    from cdgfast.data import load_dataset

    data = load_dataset("digits")
    model = load_checkpoint(str(out / "model.safetensors"), data)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    again = load_checkpoint(str(tmp_path / "plain.pt"), data, allow_pickle=True)  # a pickle: only when asked
    for a, b in zip(model.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    torch.save({"model": {"nope": torch.zeros(1)}}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="checkpoint"):
        load_checkpoint(str(tmp_path / "bad.pt"), data, allow_pickle=True)


@pytest.mark.parametrize("argv", [
    ["--timesteps", "100,1000"], ["--timesteps", "-1"], ["--timesteps", "a,b"], ["--samples", "1"],
    ["--dataset", "nope"], ["--train-steps", "-3"], ["--checkpoint", "/nonexistent/model.pt"],
])
def test_cli_bad_input(tmp_path, argv, capsys):
    from cdgfast.analysis.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["fisher", "--out", str(tmp_path), "--train-steps", "0", "--no-progress", *argv])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip()


def test_library_bad_input(tmp_path):
    from cdgfast.analysis import run_fisher_analysis

    with pytest.raises(ValueError, match="timesteps"):
        run_fisher_analysis(timesteps=[1000], samples=4, out_dir=str(tmp_path), train_steps=0)
    with pytest.raises(ValueError, match="samples"):
        run_fisher_analysis(timesteps=[10], samples=1, out_dir=str(tmp_path), train_steps=0)
    with pytest.raises(ValueError, match="dataset"):
        run_fisher_analysis(dataset="svhn", timesteps=[10], samples=4, out_dir=str(tmp_path))


def _cli_code(argv, capsys):
    from cdgfast.analysis.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["fisher", "--train-steps", "0", "--samples", "2", "--timesteps", "10", "--no-progress", *argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return exc.value.code, err


@pytest.mark.parametrize("case", ["device_foo", "cuda_missing", "out_is_file", "no_data_root", "missing_data",
                                  "corrupt_checkpoint", "not_an_analysis"])
def test_cli_refuses_bad_options_before_any_work(tmp_path, case, capsys):
    out = tmp_path / "out"
    argv, expect = ["--out", str(out)], None
    if case == "device_foo":
        argv += ["--device", "foo"]
        expect = "device: expected 'cpu', 'cuda' or 'cuda:N', got 'foo'"
    elif case == "cuda_missing":
        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
        argv += ["--device", "cuda"]
        expect = "CUDA is not available"
    elif case == "out_is_file":
        out.write_text("mine")
        expect = "exists and is not a folder"
    elif case == "no_data_root":
        argv += ["--dataset", "mnist", "--data-root", str(tmp_path / "nowhere")]
        expect = "does not exist"
    elif case == "missing_data":
        (tmp_path / "empty").mkdir()
        argv += ["--dataset", "cifar10", "--data-root", str(tmp_path / "empty")]
        expect = "cifar-10-python.tar.gz"
    elif case == "corrupt_checkpoint":
        bad = tmp_path / "model.pt"
        torch.save({"model": torch.nn.Linear(3, 3).state_dict()}, bad)
        bad.write_bytes(bad.read_bytes()[:100])  # truncated
        argv += ["--checkpoint", str(bad)]
        expect = f"checkpoint: {bad} cannot be read"
    else:
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        expect = "not empty and holds no Fisher analysis"
    before = sorted(os.listdir(tmp_path))
    code, err = _cli_code(argv, capsys)
    assert code == 2 and expect in err, err
    assert sorted(os.listdir(tmp_path)) == before  # nothing written, nothing removed
    if out.is_dir():
        assert os.listdir(out) == ["notes.txt"]


def test_cli_refuses_to_overwrite_an_analysis_unless_asked(tmp_path, capsys):
    from cdgfast.analysis.cli import main

    out = tmp_path / "geo"
    argv = ["fisher", "--timesteps", "100", "--samples", "4", "--train-steps", "1", "--batch-size", "4",
            "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    first = (out / "geometry.json").read_text()
    code, err = _cli_code(["--out", str(out)], capsys)
    assert code == 2 and "already holds a Fisher analysis" in err and "--overwrite" in err
    assert (out / "geometry.json").read_text() == first and (out / "fig1_mse.png").is_file()
    # --overwrite on the folder's own model: the model stays, the stale figures go
    assert main(["fisher", "--timesteps", "900", "--samples", "4", "--checkpoint", str(out / "model.safetensors"),
                 "--no-progress", "--no-figures", "--overwrite", "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == ["geometry.json", "model.safetensors"]
    assert [r["t"] for r in json.loads((out / "geometry.json").read_text())["timesteps"]] == [900]


def test_module_entry_points_analysis_and_its_analyze_alias(tmp_path, capsys):
    """`python -m cdgfast.analysis` is the command line; `python -m cdgfast.analyze` forwards to it under
    its own name (old commands keep working)."""
    import subprocess
    import sys

    import cdgfast.analyze as alias

    for module in ("cdgfast.analysis", "cdgfast.analyze"):
        r = subprocess.run([sys.executable, "-m", module, "fisher", "--samples", "1", "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and f"python -m {module}: error: samples" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as exc:
        alias.main(["fisher", "--timesteps", "a", "--out", str(tmp_path / "o")])
    assert exc.value.code == 2 and "python -m cdgfast.analyze fisher: error" in capsys.readouterr().err
    assert alias.build_parser().prog == "python -m cdgfast.analyze"
