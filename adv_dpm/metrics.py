"""Offline evaluation metrics: nothing is downloaded, every number is reproducible from seeds.

- 2-D toy data (exact density known, ``adv_dpm.data``): ``toy_metrics`` = NLL under the true
  density, sliced Wasserstein distance, k-NN precision / recall and the number of covered modes.
- images: ``frechet_distance`` and ``kernel_inception_distance`` on the features of a small CNN
  trained (and cached) on the data set itself (``feature_extractor``, ``image_metrics``), plus
  ``inception_features`` for the standard FID network when its weights are already on disk.
- sampler diagnostics: ``exposure_bias`` (ADM-ES's statistic along a sampling trajectory) and
  ``robustness`` (sampling with every model input perturbed within an L2 budget).
"""
import hashlib
import json
import math
import os
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from . import data as datasets
from .diffusion import samplers
from .diffusion.losses import split_output
from .utils import atomic_save

ROBUSTNESS_KINDS = ("none", "random", "adversarial")


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------

def _points(x, name, min_rows=1):
    """``x`` as a float64 (n, d) tensor; ValueError naming ``name`` otherwise."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (n, d), got {tuple(x.shape)}")
    if len(x) < min_rows:
        raise ValueError(f"{name} needs at least {min_rows} samples, got {len(x)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} holds {int((~torch.isfinite(x)).sum())} non-finite values")
    return x.detach().double()


def _pair(a, b, names, min_rows=1):
    a, b = _points(a, names[0], min_rows), _points(b, names[1], min_rows)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{names[0]} and {names[1]} must have the same dimension, got {a.shape[1]} and {b.shape[1]}")
    return a, b


# ---------------------------------------------------------------------------------------------
# Distances between point sets
# ---------------------------------------------------------------------------------------------

def _w2_squared_1d(a, b):
    """Exact squared W2 between 1-D empirical measures, row by row: a (P, n), b (P, m) sorted.
    With n != m the quantile functions are matched on the union of their breakpoints."""
    n, m = a.shape[1], b.shape[1]
    if n == m:
        return (a - b).pow(2).mean(dim=1)
    levels = torch.cat([torch.arange(1, n + 1, dtype=torch.float64) / n,
                        torch.arange(1, m + 1, dtype=torch.float64) / m]).sort().values
    widths = torch.diff(levels, prepend=levels.new_zeros(1))
    mids = levels - widths / 2  # inside each interval, away from the breakpoints
    ia = (mids * n).long().clamp_(max=n - 1).to(a.device)
    ib = (mids * m).long().clamp_(max=m - 1).to(a.device)
    return ((a[:, ia] - b[:, ib]).pow(2) * widths.to(a.device)).sum(dim=1)


def sliced_wasserstein(a: Tensor, b: Tensor, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance sqrt(E_theta W2^2(theta.a, theta.b)) between point sets
    a (n, d) and b (m, d), over ``projections`` random unit directions (seeded). Each 1-D W2 is
    exact (sorted samples; quantile matching when n != m). float64."""
    a, b = _pair(a, b, ("a", "b"))
    if projections < 1:
        raise ValueError(f"projections must be >= 1, got {projections}")
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(a.shape[1], projections, generator=g, dtype=torch.float64).to(a.device)
    theta = theta / theta.norm(dim=0, keepdim=True)
    pa = (a @ theta).T.sort(dim=1).values
    pb = (b @ theta).T.sort(dim=1).values
    return _w2_squared_1d(pa, pb).mean().clamp_min(0).sqrt().item()


def _chunk_rows(n_cols):
    """Rows per chunk so that a float64 chunk of an (n, n_cols) distance matrix stays near 64 MB."""
    return max(1, (1 << 23) // max(1, n_cols))


def _squared_distances(x, y):
    """|x_i - y_j|^2 = |x_i|^2 + |y_j|^2 - 2 x_i.y_j, in place on the product (memory-bound)."""
    return (x @ y.T).mul_(-2).add_(x.pow(2).sum(1)[:, None]).add_(y.pow(2).sum(1)[None, :]).clamp_min_(0)


def _knn_radii(x, k):
    """Squared distance of each row of x to its k-th nearest other row."""
    out = []
    step = _chunk_rows(len(x))
    for i in range(0, len(x), step):
        d2 = _squared_distances(x[i:i + step], x)
        rows = torch.arange(len(d2), device=x.device)
        d2[rows, rows + i] = math.inf  # not its own neighbour
        out.append(d2.topk(k, dim=1, largest=False).values[:, -1])  # (topk beats kthvalue here)
    return torch.cat(out)


def _coverage(points, centres, radii2, tol):
    """Fraction of ``points`` inside at least one ball (centre, squared radius)."""
    inside = 0
    step = _chunk_rows(len(centres))
    for i in range(0, len(points), step):
        inside += (_squared_distances(points[i:i + step], centres) <= radii2[None, :] + tol).any(dim=1).sum().item()
    return inside / len(points)


def knn_precision_recall(real: Tensor, fake: Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union
    of balls around its points reaching their k-th nearest neighbour. Precision = fraction of
    fake points inside the real manifold (quality), recall = fraction of real points inside
    the fake manifold (coverage). float64."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    real, fake = _pair(real, fake, ("real", "fake"), min_rows=k + 1)
    # a rounding allowance for the |x|^2 + |y|^2 - 2xy form, so that a point on a ball's
    # centre (identical sets, radius 0 for duplicates) counts as inside
    tol = 1e-10 * max(real.pow(2).sum(1).max().item(), fake.pow(2).sum(1).max().item(), 1e-30)
    precision = _coverage(fake, real, _knn_radii(real, k), tol)
    recall = _coverage(real, fake, _knn_radii(fake, k), tol)
    return precision, recall


# ---------------------------------------------------------------------------------------------
# 2-D toy data
# ---------------------------------------------------------------------------------------------

def _toy_name(dataset):
    name = dataset[len("toy:"):] if dataset.startswith("toy:") else dataset
    try:
        datasets.toy_modes(name)
    except ValueError:
        raise ValueError(f"dataset must be a toy set 'rings' or 'gmm' (or 'toy:rings', 'toy:gmm'), "
                         f"got {dataset!r}") from None
    return name


def toy_metrics(samples: Tensor, dataset: str, reference: Tensor | None = None, *, k: int = 3,
                mode_radius: float = 3.0, projections: int = 256) -> dict:
    """Quality of 2-D samples of toy set ``dataset`` ('rings' / 'gmm'):

    - 'nll': mean -log p_true(sample) under the exact density: it punishes samples off the data
      but not missing mass (samples collapsed onto the modes' centres score below the data's
      own entropy), so read it together with recall and modes;
    - 'swd', 'precision', 'recall': against ``reference`` (default: fresh true samples of the same
      size, seed 12345, independent of any training draw);
    - 'modes' of 'modes_total': modes holding at least max(5, 20% of their fair share) samples
      within ``mode_radius`` std of the mode (point or ring).
    """
    name = _toy_name(dataset)
    x = _points(samples, "samples", min_rows=k + 1)
    if x.shape[1] != 2:
        raise ValueError(f"samples must have shape (n, 2), got {tuple(samples.shape)}")
    ref = datasets.toy2d(name, n=len(x), seed=12345).x if reference is None else reference
    ref = _points(ref, "reference", min_rows=k + 1)
    if ref.shape[1] != 2:
        raise ValueError(f"reference must have shape (n, 2), got {tuple(ref.shape)}")
    modes = datasets.toy_modes(name)
    nearest, dist = datasets.nearest_mode(name, x.cpu())
    counts = torch.bincount(nearest[dist <= mode_radius], minlength=len(modes.weights)).double()
    needed = (0.2 * len(x) * modes.weights).clamp(min=5)
    precision, recall = knn_precision_recall(ref, x, k)
    return {"nll": -datasets.log_density(name, x.cpu()).mean().item(),
            "swd": sliced_wasserstein(x, ref, projections=projections),
            "precision": precision, "recall": recall,
            "modes": int((counts >= needed).sum()), "modes_total": len(modes.weights)}


# ---------------------------------------------------------------------------------------------
# Feature-space distances
# ---------------------------------------------------------------------------------------------

def _sqrt_psd(m):
    """Symmetric square root of a symmetric PSD matrix (eigenvalues clamped at 0)."""
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(feat_a: Tensor, feat_b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (FID's formula):
    ||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), in float64. tr (S_a S_b)^(1/2) is
    taken as tr (S_a^(1/2) S_b S_a^(1/2))^(1/2), a symmetric PSD matrix (same eigenvalues),
    so two eigh calls suffice and no scipy.linalg.sqrtm is needed."""
    a, b = _pair(feat_a, feat_b, ("feat_a", "feat_b"), min_rows=2)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrt_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    fd = (mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * tr_sqrt
    return max(fd.item(), 0.0)


def kernel_inception_distance(feat_a: Tensor, feat_b: Tensor, subsets: int = 10, subset_size: int = 1000,
                              seed: int = 0) -> float:
    """KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic kernel
    k(x, y) = (x.y / d + 1)^3, averaged over ``subsets`` random subsets (without replacement,
    seeded) of ``subset_size`` samples from each set (clipped to the smaller set). float64;
    can be slightly negative for matching distributions."""
    a, b = _pair(feat_a, feat_b, ("feat_a", "feat_b"), min_rows=2)
    if subsets < 1:
        raise ValueError(f"subsets must be >= 1, got {subsets}")
    if subset_size < 2:
        raise ValueError(f"subset_size must be >= 2, got {subset_size}")
    m, d = min(subset_size, len(a), len(b)), a.shape[1]
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(subsets):
        x = a[torch.randperm(len(a), generator=g)[:m].to(a.device)]
        y = b[torch.randperm(len(b), generator=g)[:m].to(b.device)]
        k_xx, k_yy, k_xy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
        within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
        total += (within - 2 * k_xy.sum() / (m * m)).item()
    return total / subsets


# ---------------------------------------------------------------------------------------------
# A small feature network trained on the data set itself
# ---------------------------------------------------------------------------------------------

class FeatureNet(nn.Module):
    """A small CNN classifier: two conv stages (the second after a 2x max-pool), adaptive
    pooling to 4x4, a ``feature_dim`` ReLU layer (``features``) and the class logits
    (``forward``). Images NCHW in [-1, 1]; any size >= 8."""

    def __init__(self, in_channels=1, image_size=8, num_classes=10, width=32, feature_dim=128, dropout=0.25):
        super().__init__()
        self.config = dict(in_channels=in_channels, image_size=image_size, num_classes=num_classes, width=width,
                           feature_dim=feature_dim, dropout=dropout)
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(2 * width * 16, feature_dim), nn.ReLU())
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(feature_dim, num_classes))

    def check_input(self, x, name="x"):
        c, s = self.config["in_channels"], self.config["image_size"]
        if x.dim() != 4 or x.shape[1:] != (c, s, s):
            raise ValueError(f"{name} must be images of shape (n, {c}, {s}, {s}) for this FeatureNet, "
                             f"got {tuple(x.shape)}")

    def features(self, x):
        """(n, feature_dim) penultimate activations."""
        return self.body(x)

    def forward(self, x):
        return self.head(self.body(x))


FEATURE_TRAINING = dict(epochs=20, batch_size=64, lr=2e-3, weight_decay=1e-4, shift=1)
_FEATURE_NET_VERSION = 1  # bump when FeatureNet or its training changes in a way the hash does not see


def _cache_dir(cache_dir):
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("ADV_DPM_CACHE") or Path.home() / ".cache" / "adv_dpm")


def _canonical_spec(dataset):
    """The data set spec with any path made absolute (so the cache key does not depend on the cwd)."""
    kind, sep, arg = dataset.partition(":")
    if kind in ("cifar10", "folder", "npz") and arg:
        return f"{kind}:{Path(arg).expanduser().resolve()}"
    return dataset


def train_and_held_out(dataset):
    """(train, held-out) ``Data`` of an image data set with labels: its own test split when it
    has one (digits, cifar10), else every fifth image held out."""
    kind = dataset.partition(":")[0]
    if kind == "toy":
        raise ValueError(f"dataset {dataset!r} is 2-D toy data: use toy_metrics, not a feature network")
    if kind in ("digits", "digits16", "cifar10"):
        train, test = datasets.load_dataset(dataset, split="train"), datasets.load_dataset(dataset, split="test")
    else:
        x, y = datasets.load_dataset(dataset)
        if y is None:
            raise ValueError(f"dataset {dataset!r} has no labels; a FeatureNet is trained as a classifier")
        held = torch.arange(len(x)) % 5 == 4
        train, test = datasets.Data(x[~held], y[~held]), datasets.Data(x[held], y[held])
    if train.x.dim() != 4:
        raise ValueError(f"dataset {dataset!r} is not an image data set (x has shape {tuple(train.x.shape)})")
    return train, test


def _random_shift(x, pixels, g):
    """Each image translated by up to ``pixels`` in x and y (edge padding): cheap augmentation."""
    if pixels == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels,) * 4, mode="replicate")
    dy, dx = (torch.randint(0, 2 * pixels + 1, (2, n), generator=g))
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pixels)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w))[:, None, None, :].expand(n, x.shape[1], h, w)
    return out.gather(3, cols)


@torch.no_grad()
def _predict(net, x, batch_size, device):
    """(features, logits) of images x, in batches, in float64 on the CPU."""
    feats, logits = [], []
    for i in range(0, len(x), batch_size):
        f = net.features(x[i:i + batch_size].to(device=device, dtype=torch.float32))
        feats.append(f.double().cpu())
        logits.append(net.head(f).double().cpu())
    return torch.cat(feats), torch.cat(logits)


def _fit(net, train, seed, progress, device):
    """AdamW with a one-cycle learning rate and 1-pixel random shifts, ``FEATURE_TRAINING``."""
    hp = FEATURE_TRAINING
    g = torch.Generator().manual_seed(seed)
    net.to(device).train()
    opt = torch.optim.AdamW(net.parameters(), lr=hp["lr"], weight_decay=hp["weight_decay"])
    steps_per_epoch = max(1, len(train.x) // hp["batch_size"])
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=hp["lr"], total_steps=hp["epochs"] * steps_per_epoch)
    for _ in tqdm(range(hp["epochs"]), desc="feature net", disable=not progress):
        order = torch.randperm(len(train.x), generator=g)
        for j in range(steps_per_epoch):
            idx = order[j * hp["batch_size"]:(j + 1) * hp["batch_size"]]
            x = _random_shift(train.x[idx], hp["shift"], g).to(device)
            loss = F.cross_entropy(net(x), train.y[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    net.eval()


def _train_feature_net(net, train, test, seed, progress, device):
    """Train ``net`` in place, deterministically given ``seed``; returns its held-out accuracy.
    On the CPU it runs on one thread: the layers are too small to gain from more, and on a busy
    2-core machine two OpenMP threads waiting on each other made a step 30x slower."""
    threads = torch.get_num_threads()
    try:
        if torch.device(device).type == "cpu":
            torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)  # dropout draws from the global generator: keep it local
            _fit(net, train, seed, progress, device)
        _, logits = _predict(net, test.x, 500, device)
    finally:
        torch.set_num_threads(threads)
    return (logits.argmax(1) == test.y).double().mean().item()


def feature_extractor(dataset: str, cache_dir: str | Path | None = None, seed: int = 0, progress: bool = False,
                      *, device: str | torch.device = "cpu") -> tuple[FeatureNet, float]:
    """A ``FeatureNet`` trained on the labelled image data set ``dataset`` (a
    ``adv_dpm.data.load_dataset`` spec) and its held-out accuracy.

    Training is deterministic given ``seed`` (AdamW, one-cycle, 1-pixel random shifts,
    ``FEATURE_TRAINING``). The result is cached in ``cache_dir`` (default $ADV_DPM_CACHE or
    ~/.cache/adv_dpm) under a hash of the spec, architecture, hyper-parameters and seed, written
    atomically; later calls load it. The returned net is in eval mode on ``device``;
    ``net.from_cache`` tells whether it was loaded.
    """
    train, test = train_and_held_out(dataset)
    num_classes = int(max(train.y.max(), test.y.max())) + 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the initial weights
        net = FeatureNet(in_channels=train.x.shape[1], image_size=train.x.shape[-1], num_classes=num_classes)
    key_src = json.dumps({"dataset": _canonical_spec(dataset), "net": net.config, "train": FEATURE_TRAINING,
                          "seed": seed, "version": _FEATURE_NET_VERSION, "n_train": len(train.x)}, sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()
    slug = re.sub(r"[^A-Za-z0-9]+", "_", dataset).strip("_")[-40:]
    path = _cache_dir(cache_dir) / f"featurenet-{slug}-{key[:16]}.pt"
    if path.is_file():
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            if state.get("key") == key:
                net.load_state_dict(state["model"])
                net.to(device).eval()
                net.from_cache = True
                return net, float(state["accuracy"])
        except Exception:  # unreadable or foreign file: train again and overwrite it
            pass
    accuracy = _train_feature_net(net, train, test, seed, progress, device)
    atomic_save({"key": key, "key_source": key_src, "model": {k: v.cpu() for k, v in net.state_dict().items()},
                 "accuracy": accuracy}, path)
    net.from_cache = False
    return net, accuracy


def image_metrics(samples: Tensor, real: Tensor, net: FeatureNet, batch_size: int = 500, *, k: int = 3,
                  kid_subsets: int = 10, kid_subset_size: int = 1000) -> dict:
    """Sample quality of images in the feature space of ``net`` (``feature_extractor``): 'fd'
    (Frechet distance), 'kid', k-NN 'precision' / 'recall', 'class_hist' (fraction of samples
    per predicted class) and 'class_tv' (total variation between that histogram and the real
    images' predicted one: mode dropping / class imbalance)."""
    for name, x in (("samples", samples), ("real", real)):
        net.check_input(x, name)
        if len(x) < k + 1:
            raise ValueError(f"{name} needs at least {k + 1} images, got {len(x)}")
        if not torch.isfinite(x).all():
            raise ValueError(f"{name} holds {int((~torch.isfinite(x)).sum())} non-finite values")
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    try:
        f_fake, l_fake = _predict(net, samples, batch_size, device)
        f_real, l_real = _predict(net, real, batch_size, device)
    finally:
        net.train(was_training)
    classes = l_fake.shape[1]
    hist_fake = torch.bincount(l_fake.argmax(1), minlength=classes).double() / len(samples)
    hist_real = torch.bincount(l_real.argmax(1), minlength=classes).double() / len(real)
    precision, recall = knn_precision_recall(f_real, f_fake, k)
    return {"fd": frechet_distance(f_fake, f_real),
            "kid": kernel_inception_distance(f_fake, f_real, subsets=kid_subsets, subset_size=kid_subset_size),
            "precision": precision, "recall": recall, "class_hist": hist_fake.tolist(),
            "class_tv": 0.5 * (hist_fake - hist_real).abs().sum().item()}


def inception_features(images: Tensor, weights: str | Path, batch_size: int = 100, *,
                       device: str | torch.device | None = None) -> Tensor:
    """(n, 2048) pool features of the standard FID Inception network, from a local TorchScript
    file ``weights`` (NVlabs' inception-2015-12-05.pt; never downloaded). Images NCHW in [-1, 1]
    with 1 or 3 channels are resized to 299x299 (bilinear) and quantized to uint8 0..255, the
    input that network expects."""
    path = Path(weights)
    if not path.is_file():
        raise FileNotFoundError(f"weights: no file {path}; expected a local TorchScript copy of the FID Inception "
                                f"network (inception-2015-12-05.pt), which this project never downloads")
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be NCHW with 1 or 3 channels, got {tuple(images.shape)}")
    device = torch.device(device) if device is not None else images.device
    try:
        net = torch.jit.load(str(path), map_location=device)
    except Exception as e:
        raise ValueError(f"weights: {path} is not a TorchScript file ({e.__class__.__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from e
    net.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = images[i:i + batch_size].to(device=device, dtype=torch.float32)
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
            x = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
            out.append(net(x, return_features=True).double().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Along a sampler's trajectory
# ---------------------------------------------------------------------------------------------

def exposure_bias(trajectory: list[tuple[Tensor, int]], x0: Tensor, schedule) -> list[dict]:
    """ADM-ES's exposure-bias statistic. Under the forward process x_t - sqrt(abar_t) x_0 is
    noise of std sqrt(1 - abar_t); for each (x_t, t) of a sampler's trajectory (original
    timestep indices of ``schedule``, as ``samplers.sample(return_trajectory=True)`` gives)
    and its final samples ``x0``, report that std measured ('std'), its forward-process value
    ('expected') and 'ratio' = std / expected (> 1: the sampler's x_t drifted outwards)."""
    x0 = x0.detach().double()
    out = []
    for i, (x_t, t) in enumerate(trajectory):
        if x_t.shape != x0.shape:
            raise ValueError(f"trajectory[{i}] has shape {tuple(x_t.shape)}, x0 {tuple(x0.shape)}; expected equal")
        t = int(t)
        if not 0 <= t < schedule.num_timesteps:
            raise ValueError(f"trajectory[{i}] has timestep {t}, outside schedule's [0, {schedule.num_timesteps})")
        abar = schedule.alphas_cumprod[t].item()
        std = (x_t.detach().double().to(x0.device) - math.sqrt(abar) * x0).std().item()
        expected = math.sqrt(1 - abar)
        out.append({"t": t, "std": std, "expected": expected, "ratio": std / expected})
    return out


def _per_sample_norm(x):
    return x.flatten(1).norm(dim=1).reshape(-1, *([1] * (x.dim() - 1)))


def _to_norm(direction, radius, fallback=None):
    """``direction`` rescaled to L2 norm ``radius`` per sample; rows with a zero or non-finite
    norm take ``fallback``'s direction."""
    norm = _per_sample_norm(direction)
    bad = ~torch.isfinite(norm) | (norm == 0)
    if fallback is not None and bad.any():
        direction = torch.where(bad, fallback, direction)
        norm = _per_sample_norm(direction)
    return direction * (radius / norm.clamp_min(1e-30))


def perturbed_model_fn(model_fn, budget: float, kind: str, *, learn_sigma: bool, seed: int = 0, start: float = 0.01):
    """``model_fn`` with its input x replaced by x + delta, ||delta_i||_2 = budget * sqrt(d) per
    sample (d = elements per sample): see ``robustness``. Its own generator (``seed``) draws the
    random directions, so the sampler's noise stream is untouched."""
    if kind not in ROBUSTNESS_KINDS:
        raise ValueError(f"kind must be one of {ROBUSTNESS_KINDS}, got {kind!r}")
    if not budget >= 0 or not math.isfinite(budget):
        raise ValueError(f"budget must be a finite number >= 0, got {budget}")
    if kind == "none" or budget == 0:
        return model_fn
    generators = {}

    def random_direction(x):
        if x.device not in generators:
            generators[x.device] = torch.Generator(device=x.device).manual_seed(seed)
        return torch.randn(x.shape, generator=generators[x.device], device=x.device, dtype=x.dtype)

    def perturbed(x, t, *args, **kwargs):
        radius = budget * math.sqrt(x[0].numel())
        noise = random_direction(x)
        if kind == "random":
            return model_fn(x + _to_norm(noise, radius), t, *args, **kwargs)
        with torch.enable_grad():
            x = x.detach()
            clean = split_output(model_fn(x, t, *args, **kwargs), x, learn_sigma)[0].detach()
            delta0 = _to_norm(noise, start * radius).requires_grad_(True)
            moved = split_output(model_fn(x + delta0, t, *args, **kwargs), x, learn_sigma)[0]
            (grad,) = torch.autograd.grad((moved - clean).pow(2).sum(), delta0)
        delta = _to_norm(grad.detach(), radius, fallback=noise)
        return model_fn(x + delta, t, *args, **kwargs)

    return perturbed


def robustness(model_fn, schedule, shape, method: str, steps: int, budget: float, kind: str, *, learn_sigma: bool,
               generator=None, device="cpu", seed: int = 0, **sample_kw) -> Tensor:
    """Samples of ``samplers.sample`` (any method) with every model input x_t replaced by
    x_t + delta, ||delta_i||_2 = budget * sqrt(d) per sample (d elements per sample); the
    sampler's own state stays x_t. Kinds:

    - 'none': plain sampling (bit-identical to ``samplers.sample`` with the same generator);
    - 'random': delta = Gaussian noise rescaled to that norm;
    - 'adversarial': one normalized-gradient ascent step on ||eps(x_t + delta) - eps(x_t)||^2,
      taken from a random start delta0 of norm 0.01 * budget norm (the gradient vanishes at
      delta = 0). Near 0 that gradient is 2 J^T J delta0 (J the Jacobian of eps in x_t): one
      power-iteration step towards the input direction the denoiser is most sensitive to, as
      a first-order attack should find. Rows whose gradient is zero or non-finite keep the
      random direction. Costs three model calls per step (clean, start, perturbed).

    The perturbations draw from their own generator (``seed``); ``generator`` drives only the
    sampler, so every kind starts from the same x_T. Returns the samples; measure the quality
    drop with ``toy_metrics`` / ``image_metrics``.
    """
    fn = perturbed_model_fn(model_fn, budget, kind, learn_sigma=learn_sigma, seed=seed)
    return samplers.sample(fn, schedule, shape, method, steps, learn_sigma=learn_sigma, generator=generator,
                           device=device, **sample_kw)


__all__ = ["FEATURE_TRAINING", "ROBUSTNESS_KINDS", "FeatureNet", "exposure_bias", "feature_extractor",
           "frechet_distance", "image_metrics", "inception_features", "kernel_inception_distance",
           "knn_precision_recall", "perturbed_model_fn", "robustness", "sliced_wasserstein", "toy_metrics"]
