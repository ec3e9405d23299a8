"""Offline metrics: every one checked on cases whose answer is known in closed form."""
import math

import numpy as np
import pytest
import torch
from torch import nn

from adv_dpm import data, metrics
from adv_dpm.diffusion import Schedule, samplers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These metrics run on small matrices; on a busy 2-core machine two OpenMP threads waiting
    on each other made them 10-100x slower, so this module runs single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def whitened(n, d, seed):
    """n points in d dims with empirical mean exactly 0 and empirical covariance exactly I."""
    z = torch.randn(n, d, generator=gen(seed), dtype=torch.float64)
    z = z - z.mean(0)
    chol = torch.linalg.cholesky(torch.cov(z.T))
    return torch.linalg.solve_triangular(chol, z.T, upper=False).T


# ---------------------------------------------------------------------------------------------
# sliced Wasserstein
# ---------------------------------------------------------------------------------------------

def test_sliced_wasserstein_of_identical_sets_is_zero():
    a = torch.randn(500, 3, generator=gen())
    assert metrics.sliced_wasserstein(a, a) == 0.0
    assert metrics.sliced_wasserstein(a, a[torch.randperm(500, generator=gen(1))]) == 0.0
    # n != m: the same empirical distribution with every point twice
    assert metrics.sliced_wasserstein(a, torch.cat([a, a])) == pytest.approx(0.0, abs=1e-12)


def test_sliced_wasserstein_exact_1d_with_unequal_sizes():
    # quantile functions of {0, 1} and {0, 0.5, 1} differ by 0.5 on [1/3, 2/3): W2^2 = 0.25 / 3
    a, b = torch.tensor([[0.0], [1.0]]), torch.tensor([[0.0], [0.5], [1.0]])
    assert metrics.sliced_wasserstein(a, b) == pytest.approx(math.sqrt(1 / 12), rel=1e-12)
    assert metrics.sliced_wasserstein(b, a) == pytest.approx(math.sqrt(1 / 12), rel=1e-12)


@pytest.mark.parametrize("d", [1, 2, 5])
def test_sliced_wasserstein_of_a_translation(d):
    # a pure translation s moves every 1-D projection by theta.s: SW2^2 = E(theta.s)^2 = |s|^2 / d
    a = torch.randn(400, d, generator=gen())
    s = torch.full((d,), 0.3)
    sw = metrics.sliced_wasserstein(a, a + s, projections=4096)
    assert sw ** 2 == pytest.approx(s.pow(2).sum().item() / d, rel=0.05 if d > 1 else 1e-6)
    grows = [metrics.sliced_wasserstein(a, a + c * s) for c in (0.5, 1.0, 2.0)]
    assert grows[0] < grows[1] < grows[2]


def test_sliced_wasserstein_is_deterministic_and_checks_input():
    a, b = torch.randn(100, 4, generator=gen(0)), torch.randn(120, 4, generator=gen(1))
    assert metrics.sliced_wasserstein(a, b, seed=3) == metrics.sliced_wasserstein(a, b, seed=3)
    with pytest.raises(ValueError, match="same dimension"):
        metrics.sliced_wasserstein(a, b[:, :3])
    with pytest.raises(ValueError, match="a must have shape"):
        metrics.sliced_wasserstein(a[0], b)
    with pytest.raises(ValueError, match="projections"):
        metrics.sliced_wasserstein(a, b, projections=0)
    with pytest.raises(ValueError, match="b holds 4 non-finite"):
        metrics.sliced_wasserstein(a, torch.cat([b, torch.full((1, 4), math.nan)]))


# ---------------------------------------------------------------------------------------------
# k-NN precision / recall
# ---------------------------------------------------------------------------------------------

def test_knn_precision_recall_known_cases():
    real = torch.rand(200, 3, generator=gen())
    assert metrics.knn_precision_recall(real, real.clone()) == (1.0, 1.0)
    assert metrics.knn_precision_recall(real, real + 100) == (0.0, 0.0)
    # half the fake points are real points, half far outliers: precision exactly 1/2; the real
    # points the inliers sit on are covered by the fakes' balls, so recall >= 1/2
    fake = torch.cat([real[:100], real[:100] + 100])
    precision, recall = metrics.knn_precision_recall(real, fake)
    assert precision == 0.5 and 0.5 <= recall < 1.0


def test_knn_precision_recall_checks_input():
    x = torch.rand(10, 2, generator=gen())
    with pytest.raises(ValueError, match="at least 4"):
        metrics.knn_precision_recall(x[:3], x, k=3)
    with pytest.raises(ValueError, match="k must be"):
        metrics.knn_precision_recall(x, x, k=0)


# ---------------------------------------------------------------------------------------------
# Frechet distance and KID
# ---------------------------------------------------------------------------------------------

def test_frechet_distance_of_identical_sets_is_zero():
    a = torch.randn(300, 16, generator=gen()) * torch.linspace(0.1, 3, 16)
    assert metrics.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    assert metrics.frechet_distance(a, a[torch.randperm(300, generator=gen(1))]) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_diagonal_gaussians_closed_form():
    # empirical means mu and covariances exactly diag(s^2): FD = |mu1 - mu2|^2 + sum (s1 - s2)^2
    d = 6
    s1, s2 = torch.linspace(0.5, 2.0, d, dtype=torch.float64), torch.linspace(1.5, 0.2, d, dtype=torch.float64)
    mu1, mu2 = torch.zeros(d, dtype=torch.float64), torch.linspace(-1, 1, d, dtype=torch.float64)
    a = whitened(500, d, seed=0) * s1 + mu1
    b = whitened(700, d, seed=1) * s2 + mu2
    expected = (mu1 - mu2).pow(2).sum() + (s1 - s2).pow(2).sum()
    assert metrics.frechet_distance(a, b) == pytest.approx(expected.item(), rel=1e-9)
    assert metrics.frechet_distance(b, a) == pytest.approx(expected.item(), rel=1e-9)


def test_frechet_distance_with_full_covariances():
    a = torch.randn(400, 5, generator=gen(0), dtype=torch.float64) @ torch.randn(5, 5, generator=gen(1),
                                                                                dtype=torch.float64)
    b = (torch.randn(300, 5, generator=gen(2)) @ torch.randn(5, 5, generator=gen(3)) + 0.5).double()
    # c a + s: covariances c^2 S and S commute, FD = |(1 - c) mu - s|^2 + (1 - c)^2 tr S
    c, s = 1.7, torch.linspace(-1, 1, 5, dtype=torch.float64)
    mu, cov = a.mean(0), torch.cov(a.T)
    expected = ((1 - c) * mu - s).pow(2).sum() + (1 - c) ** 2 * cov.trace()
    assert metrics.frechet_distance(a, c * a + s) == pytest.approx(expected.item(), rel=1e-9)
    # non-commuting covariances: tr sqrt(S_a S_b) = sum sqrt(eig(S_a S_b)) (numpy, general eig)
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    tr_sqrt = np.sqrt(np.linalg.eigvals(ca @ cb).real.clip(min=0)).sum()
    mu_diff = a.numpy().mean(0) - b.numpy().mean(0)
    expected = mu_diff @ mu_diff + np.trace(ca) + np.trace(cb) - 2 * tr_sqrt
    assert metrics.frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_checks_input():
    with pytest.raises(ValueError, match="feat_a needs at least 2"):
        metrics.frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="same dimension"):
        metrics.frechet_distance(torch.zeros(4, 3), torch.zeros(5, 2))


def test_kid_matches_the_cubic_kernel_mmd_in_closed_form():
    # d = 1: k(x, y) = (xy + 1)^3 has features (x^3, sqrt3 x^2, sqrt3 x, 1), so for N(0, 1) vs
    # N(mu, 1): MMD^2 = (mu^3 + 3 mu)^2 + 3 mu^4 + 3 mu^2
    mu = 0.5
    a = torch.randn(4000, 1, generator=gen(0))
    b = torch.randn(4000, 1, generator=gen(1)) + mu
    expected = (mu ** 3 + 3 * mu) ** 2 + 3 * mu ** 4 + 3 * mu ** 2
    kid = metrics.kernel_inception_distance(a, b, subsets=20, subset_size=2000)
    assert kid == pytest.approx(expected, rel=0.15)


def test_kid_of_identical_distributions_is_zero_within_sampling_error():
    a = torch.randn(2000, 8, generator=gen(0))
    b = torch.randn(2000, 8, generator=gen(1))
    same = metrics.kernel_inception_distance(a, b)
    shifted = metrics.kernel_inception_distance(a, b + 0.3)
    assert abs(same) < 0.02 * shifted
    # the same set: subsets drawn independently overlap, and a shared point's k(x, x) enters
    # only the cross term, so the estimate is slightly negative, still small
    assert -0.05 * shifted < metrics.kernel_inception_distance(a, a) <= 0
    # subsets are clipped to the smaller set, and the estimate is seeded
    small = metrics.kernel_inception_distance(a[:50], b, seed=1)
    assert small == metrics.kernel_inception_distance(a[:50], b, seed=1)
    with pytest.raises(ValueError, match="subset_size"):
        metrics.kernel_inception_distance(a, b, subset_size=1)


# ---------------------------------------------------------------------------------------------
# 2-D toy data
# ---------------------------------------------------------------------------------------------

def test_toy_metrics_of_true_samples():
    x = data.toy2d("gmm", n=4000, seed=1).x
    m = metrics.toy_metrics(x, "gmm")
    assert set(m) == {"nll", "swd", "precision", "recall", "modes", "modes_total"}
    # 8 well separated Gaussians of std s: entropy = log 8 + 1 + log(2 pi s^2)
    entropy = math.log(8) + 1 + math.log(2 * math.pi * 0.05 ** 2)
    assert m["nll"] == pytest.approx(entropy, abs=0.06)
    assert m["modes"] == m["modes_total"] == 8
    assert m["precision"] > 0.95 and m["recall"] > 0.95 and m["swd"] < 0.05
    rings = metrics.toy_metrics(data.toy2d("rings", n=3000, seed=1).x, "toy:rings")
    assert rings["modes"] == rings["modes_total"] == 3


def test_toy_metrics_see_a_dropped_mode():
    full = data.toy2d("gmm", n=5000, seed=1)
    dropped = full.x[full.y != 0][:4000]
    base = metrics.toy_metrics(full.x[:4000], "gmm")
    m = metrics.toy_metrics(dropped, "gmm")
    assert m["modes"] == base["modes"] - 1 == 7
    assert m["recall"] < base["recall"] - 0.08          # an eighth of the real mass is uncovered
    assert m["precision"] > 0.95                         # what is there is still good
    assert m["swd"] > base["swd"]


def test_toy_metrics_nll_and_swd_rank_degraded_samples():
    x = data.toy2d("gmm", n=3000, seed=1).x
    noise = torch.randn(x.shape, generator=gen(5))
    true, blurred = metrics.toy_metrics(x, "gmm"), metrics.toy_metrics(x + 0.05 * noise, "gmm")
    shifted = metrics.toy_metrics(x + torch.tensor([0.05, 0.0]), "gmm")
    assert true["nll"] < blurred["nll"] and true["nll"] < shifted["nll"]
    assert true["swd"] < blurred["swd"] and true["swd"] < shifted["swd"]
    # the given reference replaces the default one
    assert metrics.toy_metrics(x, "gmm", reference=x)["swd"] == 0.0


def test_toy_metrics_check_input():
    x = data.toy2d("gmm", n=100).x
    with pytest.raises(ValueError, match="dataset"):
        metrics.toy_metrics(x, "moons")
    with pytest.raises(ValueError, match=r"samples must have shape \(n, 2\)"):
        metrics.toy_metrics(torch.zeros(100, 3), "gmm")


# ---------------------------------------------------------------------------------------------
# images: the feature network and its metrics
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits_net(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    net, accuracy = metrics.feature_extractor("digits", cache_dir=cache)
    return net, accuracy, cache


def test_feature_extractor_accuracy_and_cache(digits_net):
    net, accuracy, cache = digits_net
    assert accuracy >= 0.95
    assert not net.from_cache and not net.training
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].suffix == ".pt"
    mtime = files[0].stat().st_mtime_ns
    again, accuracy2 = metrics.feature_extractor("digits", cache_dir=cache)
    assert again.from_cache and accuracy2 == accuracy and not again.training
    assert files[0].stat().st_mtime_ns == mtime and list(cache.iterdir()) == files
    for (k, v), (_, w) in zip(net.state_dict().items(), again.state_dict().items()):
        assert torch.equal(v, w), k
    assert files[0].name.startswith("featurenet-digits-")


def test_feature_extractor_rejects_non_image_data(tmp_path):
    with pytest.raises(ValueError, match="toy"):
        metrics.feature_extractor("toy:gmm", cache_dir=tmp_path)


def test_image_metrics(digits_net):
    net = digits_net[0]
    train, test = data.digits(split="train"), data.digits(split="test")
    same = metrics.image_metrics(test.x, test.x, net)
    assert set(same) == {"fd", "kid", "precision", "recall", "class_hist", "class_tv"}
    assert same["fd"] == pytest.approx(0.0, abs=1e-6) and same["class_tv"] == 0.0
    assert same["precision"] == same["recall"] == 1.0
    assert sum(same["class_hist"]) == pytest.approx(1.0) and len(same["class_hist"]) == 10
    # held-out real digits vs train digits: close; noise images: far
    real = metrics.image_metrics(test.x, train.x, net)
    noise = metrics.image_metrics(torch.rand(359, 1, 8, 8, generator=gen()) * 2 - 1, train.x, net)
    assert real["fd"] < 0.1 * noise["fd"] and real["kid"] < 0.1 * noise["kid"]
    assert real["precision"] > 0.8 and real["recall"] > 0.8
    assert noise["precision"] < real["precision"] - 0.3 and noise["recall"] < 0.3
    # a dropped class: its histogram bin empties and the TV distance is about its share (0.1)
    no_nines = metrics.image_metrics(train.x[train.y != 9], train.x, net)
    assert no_nines["class_hist"][9] < 0.01 and no_nines["class_tv"] == pytest.approx(0.1, abs=0.02)
    with pytest.raises(ValueError, match=r"samples must be images of shape \(n, 1, 8, 8\)"):
        metrics.image_metrics(torch.zeros(10, 1, 16, 16), test.x, net)


def test_inception_features_error_paths(tmp_path):
    images = torch.zeros(2, 3, 32, 32)
    with pytest.raises(FileNotFoundError, match="weights"):
        metrics.inception_features(images, tmp_path / "missing.pt")
    not_torchscript = tmp_path / "inception.pt"
    torch.save({"a": torch.zeros(1)}, not_torchscript)
    with pytest.raises(ValueError, match="weights.*not a TorchScript"):
        metrics.inception_features(images, not_torchscript)


# ---------------------------------------------------------------------------------------------
# exposure bias
# ---------------------------------------------------------------------------------------------

def test_exposure_bias_of_the_forward_process_is_one():
    schedule = Schedule.named("cosine", 1000)
    x0 = torch.rand(256, 1, 8, 8, generator=gen(0)) * 2 - 1
    g = gen(1)
    forward, inflated = [], []
    for t in (999, 700, 300, 50, 5):
        abar = schedule.alphas_cumprod[t].item()
        eps = torch.randn(x0.shape, generator=g)
        forward.append((math.sqrt(abar) * x0 + math.sqrt(1 - abar) * eps, t))
        inflated.append((math.sqrt(abar) * x0 + 1.2 * math.sqrt(1 - abar) * eps, t))
    stats = metrics.exposure_bias(forward, x0, schedule)
    assert [s["t"] for s in stats] == [999, 700, 300, 50, 5]
    for s in stats:
        assert s["expected"] == pytest.approx(math.sqrt(1 - schedule.alphas_cumprod[s["t"]].item()))
        assert s["ratio"] == pytest.approx(1.0, abs=0.03) and s["std"] == pytest.approx(s["ratio"] * s["expected"])
    for s in metrics.exposure_bias(inflated, x0, schedule):
        assert s["ratio"] == pytest.approx(1.2, abs=0.04)


def test_exposure_bias_on_a_sampler_trajectory():
    schedule = Schedule.named("cosine", 100)
    model_fn = tiny_eps_model(dim=2)
    x0, trajectory = samplers.sample(model_fn, schedule, (64, 2), "ddim", 5, learn_sigma=False, generator=gen(),
                                     return_trajectory=True)
    stats = metrics.exposure_bias(trajectory, x0, schedule)
    assert len(stats) == 5 and [s["t"] for s in stats] == [t for _, t in trajectory]
    assert all(math.isfinite(s["ratio"]) and s["ratio"] > 0 for s in stats)
    with pytest.raises(ValueError, match="shape"):
        metrics.exposure_bias(trajectory, x0[:10], schedule)
    with pytest.raises(ValueError, match="timestep 100"):
        metrics.exposure_bias([(x0, 100)], x0, schedule)


# ---------------------------------------------------------------------------------------------
# robustness
# ---------------------------------------------------------------------------------------------

def tiny_eps_model(dim=2, learn_sigma=False, seed=0):
    """A fixed random MLP eps(x, t) with a non-trivial Jacobian (and 2*dim outputs with learn_sigma)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(dim + 1, 64), nn.Tanh(), nn.Linear(64, dim * (2 if learn_sigma else 1)))
    for p in net.parameters():
        p.requires_grad_(False)

    def model_fn(x, t):
        return net(torch.cat([x, t[:, None].float() / 100], dim=1))
    return model_fn


class Recorder:
    """Wraps a model_fn and keeps every input it is called with."""

    def __init__(self, fn):
        self.fn, self.inputs = fn, []

    def __call__(self, x, t):
        self.inputs.append(x.detach().clone())
        return self.fn(x, t)


def per_sample_norm(x):
    return x.flatten(1).norm(dim=1)


def test_robustness_none_is_plain_sampling():
    schedule, model_fn = Schedule.named("cosine", 100), tiny_eps_model()
    for method in ("ddpm", "ddim", "dpm_solver++"):
        plain = samplers.sample(model_fn, schedule, (32, 2), method, 6, learn_sigma=False, generator=gen(3))
        none = metrics.robustness(model_fn, schedule, (32, 2), method, 6, 0.1, "none", learn_sigma=False,
                                  generator=gen(3))
        assert torch.equal(plain, none)
        perturbed = metrics.robustness(model_fn, schedule, (32, 2), method, 6, 0.1, "random", learn_sigma=False,
                                       generator=gen(3))
        assert not torch.equal(plain, perturbed)


def test_robustness_random_perturbations_have_the_stated_norm():
    # a model that ignores its input: the sampler's states are those of plain sampling, so the
    # recorded model inputs minus that trajectory are exactly the perturbations
    schedule, shape, budget = Schedule.named("cosine", 100), (16, 1, 4, 4), 0.05

    def constant(x, t):
        return torch.full_like(x, 0.1)
    _, trajectory = samplers.sample(constant, schedule, shape, "ddim", 5, learn_sigma=False, generator=gen(2),
                                    return_trajectory=True)
    rec = Recorder(constant)
    metrics.robustness(rec, schedule, shape, "ddim", 5, budget, "random", learn_sigma=False, generator=gen(2))
    assert len(rec.inputs) == 5
    deltas = [x_in - x_t for x_in, (x_t, _) in zip(rec.inputs, trajectory)]
    for delta in deltas:
        assert per_sample_norm(delta) == pytest.approx(budget * math.sqrt(16), rel=1e-4)
    assert not torch.allclose(deltas[0], deltas[1])  # fresh noise at every step


@pytest.mark.parametrize("learn_sigma", [False, True])
def test_robustness_adversarial_perturbations_have_the_stated_norm(learn_sigma):
    # three calls per step: clean x_t, the small random start, the perturbed input
    schedule, budget, dim = Schedule.named("cosine", 100), 0.05, 8
    rec = Recorder(tiny_eps_model(dim=dim, learn_sigma=learn_sigma))
    metrics.robustness(rec, schedule, (32, dim), "ddpm", 4, budget, "adversarial", learn_sigma=learn_sigma,
                       generator=gen(1))
    assert len(rec.inputs) == 3 * 4
    radius = budget * math.sqrt(dim)
    for clean, start, final in zip(rec.inputs[0::3], rec.inputs[1::3], rec.inputs[2::3]):
        assert per_sample_norm(final - clean) == pytest.approx(radius, rel=1e-4)
        assert per_sample_norm(start - clean) == pytest.approx(0.01 * radius, rel=1e-3)


def test_adversarial_perturbation_moves_eps_more_than_random():
    dim, budget = 16, 0.05
    model_fn = tiny_eps_model(dim=dim)
    x = torch.randn(256, dim, generator=gen(4))
    t = torch.full((256,), 50)
    clean = model_fn(x, t)
    change = {}
    for kind in ("random", "adversarial"):
        rec = Recorder(model_fn)
        out = metrics.perturbed_model_fn(rec, budget, kind, learn_sigma=False)(x, t)
        assert per_sample_norm(rec.inputs[-1] - x) == pytest.approx(budget * math.sqrt(dim), rel=1e-4)
        change[kind] = per_sample_norm(out - clean)
    assert (change["adversarial"] >= change["random"] * 0.999).float().mean() > 0.95
    assert change["adversarial"].mean() > 1.3 * change["random"].mean()


def test_robustness_checks_input():
    schedule, model_fn = Schedule.named("cosine", 100), tiny_eps_model()
    with pytest.raises(ValueError, match="kind"):
        metrics.robustness(model_fn, schedule, (4, 2), "ddim", 3, 0.1, "gaussian", learn_sigma=False)
    with pytest.raises(ValueError, match="budget"):
        metrics.robustness(model_fn, schedule, (4, 2), "ddim", 3, -0.1, "random", learn_sigma=False)
