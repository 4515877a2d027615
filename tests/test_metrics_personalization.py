"""cdgfast.metrics.personalization against independent naive formulas (float64 loops written here) and, for KID
and the cosine similarities, against torchmetrics."""
import json
import math
import warnings

import pytest
import torch

from cdgfast.metrics import (FALLBACK_LABEL, PAPER_UNITS, CLIPImageFeatures, SmallCNN, clip_i2i, continual_mmd,
                             count_parameters, kid, mmd, nparam_percent, personalization_metrics,
                             resolve_personalization_features, to_paper_units)

NAN = float("nan")
# float64 features: our float64 sums against the naive loops / torchmetrics in float64
TOL64 = dict(rtol=1e-10, abs_tol=1e-12)


def close(a, b, rtol=1e-10, abs_tol=1e-12):
    return math.isclose(a, b, rel_tol=rtol, abs_tol=abs_tol)


# --- naive references -------------------------------------------------------------------------------

def naive_kernel(x, y, degree, gamma, coef):
    dot = 0.0
    for d in range(len(x)):
        dot += float(x[d]) * float(y[d])
    return (gamma * dot + coef) ** degree


def naive_mmd2(X, Y, degree, gamma=None, coef=1.0):
    """Gretton et al. (2012) MMD^2_u with explicit double sums."""
    X, Y = X.double(), Y.double()
    m, n = X.shape[0], Y.shape[0]
    g = 1.0 / X.shape[1] if gamma is None else gamma
    sxx = sum(naive_kernel(X[a], X[b], degree, g, coef) for a in range(m) for b in range(m) if a != b)
    syy = sum(naive_kernel(Y[a], Y[b], degree, g, coef) for a in range(n) for b in range(n) if a != b)
    sxy = sum(naive_kernel(X[a], Y[b], degree, g, coef) for a in range(m) for b in range(n))
    return sxx / (m * (m - 1)) + syy / (n * (n - 1)) - 2 * sxy / (m * n)


def feats(n, d, seed, shift=0.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) + shift).to(dtype)


# --- MMD --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,n,d", [(7, 13, 5), (13, 7, 33), (2, 2, 1), (7, 7, 33)])
def test_mmd_quadratic_kernel_matches_naive_double_sum(m, n, d):
    x, y = feats(m, d, 1), feats(n, d, 2, shift=0.3)
    ours = mmd(x, y)
    assert close(ours, naive_mmd2(x, y, degree=2), **TOL64)
    # the kernel is the degree-2 one: the cubic estimate differs
    assert not close(ours, naive_mmd2(x, y, degree=3), rtol=1e-3)
    assert close(mmd(x, y, kernel="cubic"), naive_mmd2(x, y, degree=3), **TOL64)
    assert close(mmd(x, y, gamma=0.5, coef=2.0), naive_mmd2(x, y, degree=2, gamma=0.5, coef=2.0), **TOL64)


def test_mmd_float32_and_symmetry():
    x, y = feats(13, 33, 3, dtype=torch.float32), feats(7, 33, 4, shift=0.5, dtype=torch.float32)
    ref = naive_mmd2(x, y, degree=2)   # of the float32 values, in float64
    assert close(mmd(x, y), ref, rtol=1e-9)   # computed in float64 from the float32 inputs
    assert close(mmd(x, y), mmd(y, x), **TOL64)
    # same distribution: near 0 (the unbiased estimate may be negative); a shifted one is clearly larger
    same = mmd(feats(400, 5, 5), feats(400, 5, 6))
    far = mmd(feats(400, 5, 5), feats(400, 5, 6, shift=1.0))
    assert abs(same) < 0.02 < far


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_mmd_kid_on_cuda_match_cpu():
    x, y = feats(13, 33, 1), feats(7, 33, 2, shift=0.3)
    assert close(mmd(x.cuda(), y.cuda()), mmd(x, y), rtol=1e-9)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert close(kid(x.cuda(), y.cuda(), subsets=3, subset_size=5, generator=g1).mean,
                 kid(x, y, subsets=3, subset_size=5, generator=g2).mean, rtol=1e-9)


# --- KID --------------------------------------------------------------------------------------------

def naive_kid(x, y, subsets, size, seed):
    """Subsets drawn as torchmetrics draws them (randperm of real, then of fake, per subset), naive MMD^2_u."""
    g = torch.Generator().manual_seed(seed)
    vals = []
    for _ in range(subsets):
        i = torch.randperm(x.shape[0], generator=g)[:size]
        j = torch.randperm(y.shape[0], generator=g)[:size]
        vals.append(naive_mmd2(x[i], y[j], degree=3))
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
    return mean, std


def torchmetrics_kid(x, y, subsets, size, seed):
    from torchmetrics.image.kid import KernelInceptionDistance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)   # "will save all extracted features in buffer"
        metric = KernelInceptionDistance(feature=torch.nn.Identity(), subsets=subsets, subset_size=size)
    metric.update(x, real=True)
    metric.update(y, real=False)
    torch.manual_seed(seed)
    mean, std = metric.compute()
    return float(mean), float(std)


@pytest.mark.parametrize("m,n,d,size", [(7, 13, 5, 7), (13, 7, 33, 5), (13, 13, 5, 13)])
def test_kid_matches_naive_loop_and_torchmetrics(m, n, d, size):
    pytest.importorskip("torchmetrics")
    x, y = feats(m, d, 7), feats(n, d, 8, shift=0.2)
    nm, ns = naive_kid(x, y, subsets=4, size=size, seed=11)
    ours = kid(x, y, subsets=4, subset_size=size, generator=torch.Generator().manual_seed(11))
    assert close(ours.mean, nm, **TOL64) and close(ours.std, ns, rtol=1e-8, abs_tol=1e-12)
    tm_mean, tm_std = torchmetrics_kid(x, y, subsets=4, size=size, seed=11)
    assert close(ours.mean, tm_mean, **TOL64) and close(ours.std, tm_std, rtol=1e-8, abs_tol=1e-12)
    # without a generator: the global one, as torchmetrics uses it
    torch.manual_seed(11)
    glob = kid(x, y, subsets=4, subset_size=size)
    assert glob == ours


def test_kid_float32_against_torchmetrics():
    pytest.importorskip("torchmetrics")
    x, y = feats(13, 33, 9, dtype=torch.float32), feats(13, 33, 10, shift=0.2, dtype=torch.float32)
    ours = kid(x, y, subsets=3, subset_size=7, generator=torch.Generator().manual_seed(2))
    tm_mean, _ = torchmetrics_kid(x, y, subsets=3, size=7, seed=2)
    # torchmetrics sums in float32, we in float64: kernel values ~1, sums of ~50 terms
    assert close(ours.mean, tm_mean, rtol=1e-4, abs_tol=1e-5)


def test_kid_default_subset_size_is_the_smaller_set_and_subsets_agree_then():
    x, y = feats(7, 5, 1), feats(13, 5, 2)
    k = kid(x, y, subsets=3, generator=torch.Generator().manual_seed(0))
    # subset_size 7 = all of x: every subset holds all of x and 7 random rows of y
    assert k.std > 0
    k2 = kid(x, x.flip(0) + 1, subsets=3)   # both sets in full: the estimate is permutation-invariant
    assert k2.std < 1e-12 and close(k2.mean, naive_mmd2(x, x.flip(0) + 1, degree=3), **TOL64)


# --- CLIP I2I ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("m,n,d", [(7, 13, 5), (1, 1, 33), (13, 7, 33)])
def test_clip_i2i_is_100_times_mean_pairwise_cosine(m, n, d):
    x, y = feats(m, d, 3), feats(n, d, 4, shift=0.5)
    total = 0.0
    for a in range(m):
        for b in range(n):
            dot = sum(float(x[a, k]) * float(y[b, k]) for k in range(d))
            na = math.sqrt(sum(float(x[a, k]) ** 2 for k in range(d)))
            nb = math.sqrt(sum(float(y[b, k]) ** 2 for k in range(d)))
            total += dot / (na * nb)
    assert close(clip_i2i(x, y), 100 * total / (m * n), **TOL64)
    tmf = pytest.importorskip("torchmetrics.functional")
    assert close(clip_i2i(x, y), 100 * float(tmf.pairwise_cosine_similarity(x, y).mean()), rtol=1e-9)
    # scale-invariant per row
    assert close(clip_i2i(3 * x, y), clip_i2i(x, y), rtol=1e-12)


# --- A / F / BWT_MMD --------------------------------------------------------------------------------

# to_real[i][j] = MMD(real_j, X_ij); above the diagonal: not evaluated
TO_REAL = [[0.10, NAN, NAN],
           [0.30, 0.20, NAN],
           [0.50, 0.40, 0.15]]
# to_own[i][j] = MMD(X_jj, X_ij) for j < i
TO_OWN = [[NAN, NAN, NAN],
          [0.05, NAN, NAN],
          [0.09, 0.03, NAN]]


def test_continual_mmd_on_a_hand_built_matrix():
    out = continual_mmd(TO_REAL, TO_OWN)
    # A_MMD (Eq. 7), N = 3: (0.50 + 0.40 + 0.15) / 3 = 0.35
    assert close(out["a_mmd"], 0.35)
    # BWT_MMD (Eq. 9): ((0.10 - 0.50) + (0.20 - 0.40)) / 2 = -0.30
    assert close(out["bwt_mmd"], -0.30)
    # F_MMD (Eq. 8): (0.09 + 0.03) / 2 = 0.06
    assert close(out["f_mmd"], 0.06)
    # per task: A = [0.10, (0.30 + 0.20) / 2 = 0.25, 0.35]; BWT after task 1: 0.10 - 0.30 = -0.20; F: 0.05
    pt = out["per_task"]
    assert [round(v, 12) for v in pt["a_mmd"]] == [0.10, 0.25, 0.35]
    assert pt["bwt_mmd"][0] is None and close(pt["bwt_mmd"][1], -0.20) and close(pt["bwt_mmd"][2], -0.30)
    assert pt["f_mmd"][0] is None and close(pt["f_mmd"][1], 0.05) and close(pt["f_mmd"][2], 0.06)


def test_continual_mmd_ignores_entries_above_the_diagonal_and_without_to_own_has_no_f():
    filled = torch.tensor(TO_REAL, dtype=torch.float64).nan_to_num(99.0)
    a, b = continual_mmd(TO_REAL), continual_mmd(filled)
    assert a == b and a["f_mmd"] is None and a["per_task"]["f_mmd"] == [None, None, None]
    nested_none = [[0.10, None, None], [0.30, 0.20, None], [0.50, 0.40, 0.15]]
    assert continual_mmd(nested_none) == a
    one = continual_mmd([[0.2]])
    assert one["a_mmd"] == 0.2 and one["bwt_mmd"] is None and one["f_mmd"] is None


def test_paper_units():
    out = to_paper_units({"kid": 1.5e-3, "a_mmd": 0.1, "bwt_mmd": -0.09, "f_mmd": 0.002, "clip_i2i": 73.2,
                          "nparam_train": 0.09, "x": None})
    assert close(out["kid"], 150.0) and close(out["a_mmd"], 100.0) and close(out["bwt_mmd"], -90.0)
    assert out["f_mmd"] == 0.002 and out["clip_i2i"] == 73.2 and out["nparam_train"] == 0.09
    assert PAPER_UNITS["kid"] == 1e5 and PAPER_UNITS["a_mmd"] == 1e3


# --- N_param ----------------------------------------------------------------------------------------

def test_nparam_percent():
    unet = torch.nn.Sequential(torch.nn.Linear(10, 10), torch.nn.Linear(10, 5))   # 110 + 55 = 165
    lora = [torch.zeros(10, 2), torch.zeros(2, 10)]                                  # 40 per task
    assert count_parameters(unet) == 165 and count_parameters(lora + lora) == 40   # each tensor once
    out = nparam_percent(lora, 165 + 3 * 40, unet)
    assert close(out["nparam_train"], 100 * 40 / 165) and close(out["nparam_store"], 100 * 285 / 165)
    assert nparam_percent(0, unet, 165) == {"nparam_train": 0.0, "nparam_store": 100.0}


# --- end to end -------------------------------------------------------------------------------------

def test_personalization_metrics_per_task_and_final():
    t, d = 3, 5
    real = [feats(7, d, 10 + j) for j in range(t)]
    gen = [[feats(13, d, 100 + 10 * i + j, shift=0.1 * (i - j)) for j in range(i + 1)] for i in range(t)]
    res = personalization_metrics(real, gen, "clip:tiny", kid_subsets=2, kid_subset_size=5,
                                  generator=torch.Generator().manual_seed(0), nparam={"nparam_train": 0.09,
                                                                                       "nparam_store": 100.54})
    assert res["features"] == "clip:tiny"
    i = t - 1
    a_ref = sum(naive_mmd2(real[j], gen[i][j], 2) for j in range(t)) / t
    bwt_ref = sum(naive_mmd2(real[j], gen[j][j], 2) - naive_mmd2(real[j], gen[i][j], 2) for j in range(i)) / i
    f_ref = sum(naive_mmd2(gen[j][j], gen[i][j], 2) for j in range(i)) / i
    i2i_ref = sum(clip_i2i(real[j], gen[i][j]) for j in range(t)) / t
    fin = res["final"]
    assert close(fin["a_mmd"], a_ref, rtol=1e-9) and close(fin["bwt_mmd"], bwt_ref, rtol=1e-9)
    assert close(fin["f_mmd"], f_ref, rtol=1e-9) and close(fin["clip_i2i"], i2i_ref, rtol=1e-12)
    assert fin["nparam_store"] == 100.54 and close(res["paper_units"]["a_mmd"], 1e3 * a_ref, rtol=1e-9)
    assert len(res["per_task"]["kid"]) == t and res["per_task"]["bwt_mmd"][0] is None
    assert close(res["per_task"]["a_mmd"][0], naive_mmd2(real[0], gen[0][0], 2), rtol=1e-9)
    json.dumps({k: v for k, v in res.items() if k != "matrices"})   # plain numbers, None for undefined
    fb = personalization_metrics(real[:1], gen[:1], FALLBACK_LABEL, kid_subsets=1)
    assert fb["features"] == "classifier-fallback"


# --- features ---------------------------------------------------------------------------------------

def test_fallback_features_and_label():
    net = SmallCNN(3, 4, feature_dim=9, width=8).eval()
    ext, label = resolve_personalization_features(classifier=net)
    assert label == FALLBACK_LABEL == "classifier-fallback" and ext.label == label
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ext(x), net.features(x))
    with pytest.raises(ValueError, match="classifier"):
        resolve_personalization_features()


def test_fake_clip_dirs_are_refused_with_the_argument_named(tmp_path):
    with pytest.raises(ValueError, match=r"clip: .*missing-dir is not a directory"):
        resolve_personalization_features(clip=tmp_path / "missing-dir")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=r"clip: .*incomplete, missing config.json, preprocessor_config.json, "
                                         r"model.safetensors"):
        CLIPImageFeatures(empty)
    fake = tmp_path / "fake-clip"
    fake.mkdir()
    (fake / "config.json").write_text("{not json")
    (fake / "preprocessor_config.json").write_text("{}")
    (fake / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match=r"clip: .*fake-clip could not be loaded"):
        resolve_personalization_features(clip=fake)
    with pytest.raises(ValueError, match="clip: expected the path"):
        CLIPImageFeatures(3)


def test_tiny_local_clip_dir_gives_projection_features(tmp_path, monkeypatch):
    transformers = pytest.importorskip("transformers")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, image_size=32, patch_size=8, projection_dim=11)
    torch.manual_seed(0)
    model = transformers.CLIPVisionModelWithProjection(cfg).eval()
    proc = transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    path = tmp_path / "tiny-clip"
    model.save_pretrained(path)
    proc.save_pretrained(path)
    ext, label = resolve_personalization_features(clip=path)
    assert label == "clip:tiny-clip"
    x = torch.rand(3, 3, 20, 24) * 2 - 1
    f = ext(x)
    assert f.shape == (3, 11) and f.dtype == torch.float32
    with torch.no_grad():
        pix = proc(images=list((x + 1) / 2), return_tensors="pt", do_rescale=False)["pixel_values"]
        ref = model(pixel_values=pix).image_embeds
    torch.testing.assert_close(f, ref)
    grey = ext(x[:, :1])
    torch.testing.assert_close(grey, ext(x[:, :1].repeat(1, 3, 1, 1)))


# --- refusals ---------------------------------------------------------------------------------------

GOOD = feats(7, 5, 0)


@pytest.mark.parametrize("real,fake,match", [
    (GOOD.long(), GOOD, "real: expected a floating dtype"),
    (GOOD, GOOD[0], r"fake: expected a feature matrix \[N, D\]"),
    (GOOD[:1], GOOD, "real: expected at least 2 rows"),
    (GOOD, torch.cat([GOOD[:3], torch.full((1, 5), NAN)]), r"fake: contains NaN or Inf \(rows \[3\]\)"),
    (GOOD, feats(7, 33, 1), "real, fake: expected feature matrices with the same D"),
    ([[1.0]], GOOD, "real: expected a feature tensor"),
])
def test_mmd_and_kid_refuse_bad_features(real, fake, match):
    with pytest.raises(ValueError, match=match):
        mmd(real, fake)
    with pytest.raises(ValueError, match=match):
        kid(real, fake)


def test_refusals_of_arguments():
    with pytest.raises(ValueError, match="kernel: expected one of"):
        mmd(GOOD, GOOD, kernel="gaussian")
    with pytest.raises(ValueError, match="gamma"):
        mmd(GOOD, GOOD, gamma=-1.0)
    with pytest.raises(ValueError, match="coef"):
        mmd(GOOD, GOOD, coef=float("nan"))
    with pytest.raises(ValueError, match=r"subset_size: expected an integer in \[2, 7\]"):
        kid(GOOD, feats(13, 5, 1), subset_size=8)
    with pytest.raises(ValueError, match="subset_size"):
        kid(GOOD, GOOD, subset_size=1)
    with pytest.raises(ValueError, match="subsets: expected an integer >= 1"):
        kid(GOOD, GOOD, subsets=0)
    with pytest.raises(ValueError, match="degree"):
        kid(GOOD, GOOD, degree=True)
    with pytest.raises(ValueError, match="generator"):
        kid(GOOD, GOOD, generator=0)
    zero = GOOD.clone()
    zero[2] = 0
    with pytest.raises(ValueError, match=r"fake_feats: rows \[2\] have zero norm"):
        clip_i2i(GOOD, zero)
    with pytest.raises(ValueError, match="real_feats, fake_feats: expected feature matrices with the same D"):
        clip_i2i(GOOD, feats(3, 4, 0))
    with pytest.raises(ValueError, match=r"to_real: expected a square matrix"):
        continual_mmd(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"to_real: expected a square matrix"):
        continual_mmd([[0.1], [0.2, 0.3]])
    with pytest.raises(ValueError, match=r"to_real: row 1 needs a finite MMD"):
        continual_mmd([[0.1, NAN], [NAN, 0.3]])
    with pytest.raises(ValueError, match=r"to_own: row 2 needs a finite MMD"):
        continual_mmd(TO_REAL, [[NAN] * 3, [0.1, NAN, NAN], [0.1, NAN, NAN]])
    with pytest.raises(ValueError, match=r"to_own: expected shape \(3, 3\)"):
        continual_mmd(TO_REAL, [[0.0, NAN], [0.1, 0.0]])
    with pytest.raises(ValueError, match="to_real: expected a square matrix"):
        continual_mmd("abc")
    with pytest.raises(ValueError, match="unet: expected a U-Net with at least one parameter"):
        nparam_percent(1, 1, 0)
    with pytest.raises(ValueError, match="trained: expected a count >= 0"):
        nparam_percent(-1, 1, 10)
    with pytest.raises(ValueError, match="stored: item 0 is a str"):
        nparam_percent(1, ["a"], 10)
    with pytest.raises(ValueError, match="label: expected 'classifier-fallback' or 'clip:<name>'"):
        personalization_metrics([GOOD], [[GOOD]], "classifier-FID")
    with pytest.raises(ValueError, match=r"generated\[1\]: expected 2 feature matrices"):
        personalization_metrics([GOOD, GOOD], [[GOOD], [GOOD]], "clip:x")
    with pytest.raises(ValueError, match="generated: expected a list of 2 rows"):
        personalization_metrics([GOOD, GOOD], [[GOOD]], "clip:x")
