"""cdgfast.metrics: Fréchet distance against an independent reference and closed forms, continual-learning
summaries against loops, KLD, class-balanced labels, the cached classifier and the Inception loader."""
import math
import warnings

import pytest
import torch

from cdgfast.metrics import (ClassifierFeatures, InceptionFeatures, SmallCNN, afid_at_k, class_balanced_labels,
                             class_histogram, class_kld, extract_features, feature_statistics, fid_from_features,
                             forgetting, frechet_distance, get_classifier, imf, kl_divergence, mf, summarize,
                             train_classifier)


def ref_frechet(mu1, s1, mu2, s2):
    """Independent reference: tr sqrt(S1 S2) from the (real, non-negative) eigenvalues of the
    NON-symmetric product S1 @ S2 (general eigen-solver), all in float64."""
    mu1, s1, mu2, s2 = (t.to(torch.float64) for t in (mu1, s1, mu2, s2))
    ev = torch.linalg.eigvals(s1 @ s2)
    tr_sqrt = ev.real.clamp_min(0).sqrt().sum()
    return float(((mu1 - mu2) ** 2).sum() + torch.trace(s1) + torch.trace(s2) - 2 * tr_sqrt)


def rand_cov(d, rank=None, g=None):
    a = torch.randn(d, rank or d, dtype=torch.float64, generator=g)
    return a @ a.T / (rank or d) + (1e-3 * torch.eye(d, dtype=torch.float64) if rank is None else 0)


@pytest.mark.parametrize("d", [1, 3, 7, 20])
def test_frechet_matches_independent_reference(d):
    g = torch.Generator().manual_seed(d)
    for _ in range(3):
        mu1, mu2 = torch.randn(d, dtype=torch.float64, generator=g), torch.randn(d, dtype=torch.float64, generator=g)
        s1, s2 = rand_cov(d, g=g), rand_cov(d, g=g)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref_frechet(mu1, s1, mu2, s2), rel=1e-7, abs=1e-9)


def test_frechet_rank_deficient_covariances():
    g = torch.Generator().manual_seed(1)
    d = 9
    s1, s2 = rand_cov(d, rank=4, g=g), rand_cov(d, rank=3, g=g)
    mu = torch.zeros(d, dtype=torch.float64)
    assert frechet_distance(mu, s1, mu, s2) == pytest.approx(ref_frechet(mu, s1, mu, s2), rel=1e-6, abs=1e-8)


def test_frechet_known_cases():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    assert fid_from_features(x, x.clone()) == pytest.approx(0.0, abs=1e-8)
    shift = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0], dtype=torch.float64)
    # shifted copy: same covariance, so FID = ||shift||^2 exactly
    assert fid_from_features(x, x + shift) == pytest.approx(float((shift ** 2).sum()), rel=1e-9)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([3.0]),
                            torch.tensor([[9.0]])) == pytest.approx(4.0 + 1.0)
    # diagonal covariances: sum (sqrt(a) - sqrt(b))^2
    a, b = torch.tensor([1.0, 4.0, 0.25], dtype=torch.float64), torch.tensor([9.0, 1.0, 1.0], dtype=torch.float64)
    z = torch.zeros(3, dtype=torch.float64)
    assert frechet_distance(z, torch.diag(a), z, torch.diag(b)) == pytest.approx(float(((a.sqrt() - b.sqrt()) ** 2).sum()))


def test_frechet_symmetric_and_float32_inputs():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(200, 4, generator=g), torch.randn(150, 4, generator=g) * 2 + 1
    assert fid_from_features(x, y) == pytest.approx(fid_from_features(y, x), rel=1e-9)
    assert fid_from_features(x, y) > 1.0


def test_feature_statistics_matches_loop():
    g = torch.Generator().manual_seed(4)
    f = torch.randn(13, 3, generator=g)
    mu, s = feature_statistics(f)
    fd = f.double()
    m = [sum(fd[i, j] for i in range(13)) / 13 for j in range(3)]
    for a in range(3):
        assert float(mu[a]) == pytest.approx(float(m[a]))
        for b in range(3):
            ref = sum((fd[i, a] - m[a]) * (fd[i, b] - m[b]) for i in range(13)) / 12
            assert float(s[a, b]) == pytest.approx(float(ref), rel=1e-10, abs=1e-12)


def test_frechet_bad_input():
    with pytest.raises(ValueError, match="sigma1"):
        frechet_distance(torch.zeros(3), torch.eye(2), torch.zeros(3), torch.eye(3))
    with pytest.raises(ValueError, match="mu1"):
        frechet_distance(torch.zeros(3), torch.eye(3), torch.zeros(2), torch.eye(3))
    with pytest.raises(ValueError, match="features"):
        feature_statistics(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="sigma2"):
        frechet_distance(torch.zeros(2), torch.eye(2), torch.zeros(2), torch.full((2, 2), float("nan")))


def _lower(t, g):
    m = torch.rand(t, t, generator=g, dtype=torch.float64) * 100
    for k in range(t):
        for i in range(k + 1, t):
            m[k, i] = float("nan")
    return m


@pytest.mark.parametrize("t", [1, 2, 5, 7])
def test_continual_summaries_match_loops(t):
    m = _lower(t, torch.Generator().manual_seed(t))
    a_ref = []
    for k in range(t):
        s = 0.0
        for i in range(k + 1):
            s += float(m[k, i])
        a_ref.append(s / (k + 1))
    assert afid_at_k(m) == pytest.approx(a_ref, rel=1e-12)
    assert mf(m) == pytest.approx(a_ref[-1])
    assert imf(m) == pytest.approx(sum(a_ref) / t)
    if t == 1:
        assert math.isnan(forgetting(m))
    else:
        f_ref = sum(float(m[t - 1, k] - m[k, k]) for k in range(t)) / t  # rank-1 paper, Sec. 4: over all T tasks, / T
        assert forgetting(m) == pytest.approx(f_ref, rel=1e-12)
    # list-of-lists with None works the same and summarize is JSON-ready
    rows = [[None if math.isnan(v) else v for v in row] for row in m.tolist()]
    s = summarize(rows, kld=0.5)
    assert s["afid_at_k"] == pytest.approx(a_ref) and s["kld"] == 0.5
    assert all(s["fid"][k][i] is None for k in range(t) for i in range(k + 1, t))


def test_continual_bad_input():
    with pytest.raises(ValueError, match="fid"):
        afid_at_k(torch.zeros(2, 3))
    m = torch.zeros(3, 3)
    m[2, 1] = float("nan")
    with pytest.raises(ValueError, match="row 2"):
        forgetting(m)


def test_kld():
    p = torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.5], dtype=torch.float64)
    ref = 0.5 * math.log(0.5 / 0.25) * 2
    assert kl_divergence(p, q, eps=0.0) == pytest.approx(ref)
    assert kl_divergence(p, p, eps=0.0) == pytest.approx(0.0, abs=1e-12)
    # perfectly class-balanced predictions give 0; all predictions in one class give log(K)
    pred = torch.tensor([0, 1, 2, 3] * 5)
    assert class_kld(pred, [0, 1, 2, 3], 10) == pytest.approx(0.0, abs=1e-4)
    assert class_kld(torch.zeros(8, dtype=torch.long), [0, 1], 10) == pytest.approx(
        kl_divergence(torch.tensor([0.5, 0.5] + [0.0] * 8), class_histogram(torch.zeros(8, dtype=torch.long), 10)))
    assert class_kld(torch.zeros(8, dtype=torch.long), [0, 1], 10) > 5.0  # smoothed, finite
    with pytest.raises(ValueError, match="predictions"):
        class_histogram(torch.tensor([0, 11]), 10)
    with pytest.raises(ValueError, match="p_true"):
        kl_divergence(torch.tensor([0.5, 0.6]), torch.tensor([0.5, 0.5]))


def test_class_balanced_labels():
    y = class_balanced_labels([3, 1, 7], 11)
    counts = {c: int((y == c).sum()) for c in (3, 1, 7)}
    assert counts == {3: 4, 1: 4, 7: 3}
    with pytest.raises(ValueError, match="total"):
        class_balanced_labels([0, 1], 1)


def test_classifier_cache_and_features(tmp_path):
    from cdgfast.metrics.classifier import classifier_cache_key, network_sha256

    g = torch.Generator().manual_seed(0)
    # two trivially separable classes: bright top half vs bright bottom half
    x = -torch.ones(64, 1, 8, 8)
    y = torch.arange(64) % 2
    x[y == 0, :, :4] = 1.0
    x[y == 1, :, 4:] = 1.0
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    logs = []
    m1, i1 = get_classifier("toy", x, y, 2, epochs=8, cache_dir=tmp_path, progress=False, log=logs.append)
    assert i1["source"] == "trained" and (m1(x).argmax(1) == y).float().mean() > 0.9
    m2, i2 = get_classifier("toy", x, y, 2, epochs=8, cache_dir=tmp_path, progress=False, log=logs.append)
    assert i1["path"] == i2["path"] and i2["source"] == "cached" and "loaded" in logs[-1]
    assert i1["sha256"] == i2["sha256"] == network_sha256(m2)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    k0 = classifier_cache_key("toy", x, y, 2, 8)
    assert k0 in i1["path"]
    assert k0 != classifier_cache_key("toy", x, 1 - y, 2, 8)           # labels (content hash)
    x2 = x.clone()
    x2[5, 0, 3, 3] += 0.5
    assert k0 != classifier_cache_key("toy", x2, y, 2, 8)               # one pixel (content hash, every row)
    assert k0 != classifier_cache_key("other", x, y, 2, 8)              # data set
    assert k0 != classifier_cache_key("toy", x[:, :, :6, :6], y, 2, 8)  # resolution
    f = extract_features(ClassifierFeatures(m1), x, batch_size=10)
    assert f.shape == (64, m1.feature_dim)
    assert fid_from_features(f[y == 0], f[y == 1]) > fid_from_features(f[y == 0][:16], f[y == 0][16:])


def test_inception_missing_and_torchscript(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        InceptionFeatures(tmp_path / "nope.pt")

    class Feat(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    path = tmp_path / "feat.pt"
    torch.jit.script(Feat()).save(str(path))
    ext = InceptionFeatures(path)
    out = ext(torch.rand(3, 1, 16, 16) * 2 - 1)
    assert out.shape == (3, 12) and ext.label == "Inception-FID"


def test_small_cnn_shapes():
    m = SmallCNN(3, 7, feature_dim=5)
    x = torch.randn(2, 3, 13, 13)
    assert m.features(x).shape == (2, 5) and m(x).shape == (2, 7)
    with pytest.raises(ValueError, match="SmallCNN"):
        SmallCNN(0, 7)


# ------------------------------------------------------------------ issue 10 classes, metrics
def test_bad_values_refused_not_dropped():
    """(6) a NaN probability dropped out of the KL sum (a finite, wrong KLD); a negative class index
    wrapped around to the last class; a float total was truncated; a NaN feature was reported as a
    covariance error, ragged FID rows as a bare tensor error."""
    with pytest.raises(ValueError, match="p_true.*NaN"):
        kl_divergence(torch.tensor([float("nan"), 1.0]), torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="p_gen.*NaN"):
        kl_divergence(torch.tensor([0.5, 0.5]), torch.tensor([float("nan"), 1.0]))
    with pytest.raises(ValueError, match="eps"):
        kl_divergence(torch.tensor([0.5, 0.5]), torch.tensor([0.0, 1.0]), eps=-1e-3)
    with pytest.raises(ValueError, match="non-empty"):
        kl_divergence(torch.tensor([]), torch.tensor([]))
    for classes, what in (([-1], "classes.*\\[0, 10\\)|classes.*non-negative"), ([10], "classes.*\\[0, 10\\)"),
                          ([1, 1], "classes.*distinct"), ([1.5], "classes.*integer")):
        with pytest.raises(ValueError, match=what):
            class_kld(torch.tensor([9, 9]), classes, 10)
    with pytest.raises(ValueError, match="predictions"):
        class_histogram(torch.tensor([True, False]), 2)
    with pytest.raises(ValueError, match="num_classes"):
        class_histogram(torch.tensor([1, 0]), 2.5)
    with pytest.raises(ValueError, match="total"):
        class_balanced_labels([1, 2], 4.5)
    with pytest.raises(ValueError, match="classes.*distinct"):
        class_balanced_labels([1, 1], 4)
    f = torch.randn(30, 3, dtype=torch.float64)
    bad = f.clone()
    bad[4, 1] = float("nan")
    with pytest.raises(ValueError, match="fake.*NaN.*\\[4\\]"):
        fid_from_features(f, bad)
    with pytest.raises(ValueError, match="real"):
        fid_from_features(f.tolist(), f)
    with pytest.raises(ValueError, match="fid.*square"):
        afid_at_k([[1.0], [2.0, 3.0]])
    with pytest.raises(ValueError, match="kld"):
        summarize([[1.0]], kld="0.5")
    assert summarize([[1.0]], kld=float("nan"))["kld"] is None


def test_singular_covariance_warns():
    """Fewer samples than feature dimensions: the FID is defined but biased, and a warning says so."""
    g = torch.Generator().manual_seed(0)
    few, many = torch.randn(7, 8, generator=g), torch.randn(9, 8, generator=g)
    with pytest.warns(RuntimeWarning, match="real: 7 samples of 8 features.*singular"):
        fid_from_features(few, many)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fid_from_features(many, many + 0.1) > 0


def test_extract_features_rows_and_batch_size():
    """(1) an extractor that returns one row per chunk instead of per image gave N / batch_size rows;
    a negative batch_size returned no features at all."""
    x = torch.randn(6, 1, 2, 2)
    with pytest.raises(ValueError, match="extractor.*3 rows"):
        extract_features(lambda xb: xb.reshape(1, -1), x, batch_size=3)
    for bs in (0, -1, 2.0):
        with pytest.raises(ValueError, match="batch_size"):
            extract_features(lambda xb: xb.flatten(1), x, batch_size=bs)
    torch.testing.assert_close(extract_features(lambda xb: xb.flatten(1), x, batch_size=4), x.flatten(1))


def test_translate_augmentation_against_a_naive_loop():
    """Each image moved by its own offset, the uncovered border filled with the background -1 (odd sizes)."""
    from cdgfast.metrics.classifier import _translate

    g = torch.Generator().manual_seed(0)
    for shift, (n, c, h, w) in ((1, (5, 1, 7, 9)), (2, (3, 3, 5, 6))):
        x = torch.rand(n, c, h, w, generator=g, dtype=torch.float64) * 2 - 1
        off = torch.randint(0, 2 * shift + 1, (n, 2), generator=g)
        want = torch.full_like(x, -1.0)
        for i in range(n):
            dy, dx = int(off[i, 0]) - shift, int(off[i, 1]) - shift  # output (r, q) reads input (r + dy, q + dx)
            for r in range(h):
                for q in range(w):
                    if 0 <= r + dy < h and 0 <= q + dx < w:
                        want[i, :, r, q] = x[i, :, r + dy, q + dx]
        assert torch.equal(_translate(x, off, shift), want)


def test_train_classifier_labels_checked():
    x = torch.randn(8, 1, 8, 8)
    with pytest.raises(ValueError, match="augmentation"):
        train_classifier(x, torch.zeros(8, dtype=torch.long), 2, epochs=1, augmentation="flip", progress=False)
    with pytest.raises(ValueError, match="max_shift"):
        train_classifier(x, torch.zeros(8, dtype=torch.long), 2, epochs=1, max_shift=-1, progress=False)
    with pytest.raises(ValueError, match="y.*integer"):
        train_classifier(x, torch.zeros(8), 2, epochs=1, progress=False)
    with pytest.raises(ValueError, match="y.*\\[0, 2\\)"):
        train_classifier(x, torch.full((8,), 5), 2, epochs=1, progress=False)
