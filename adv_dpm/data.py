"""Datasets that need no download, and a resumable sharded batch iterator.

Every loader returns ``Data(x, y)``: x a float32 tensor in [-1, 1] (images NCHW, points (N, 2))
and y an int64 label tensor (N,) or None. Everything is held in memory.

- ``toy2d(name, n, seed)``: 2-D mixtures with exact densities (``log_density``) and known modes;
- ``digits(size, split)``: scikit-learn's bundled 8x8 digits (1797 images), or 16x16 upsampled;
- ``cifar10(root, split)``: the CIFAR-10 python pickles a user already has;
- ``image_folder(root, size)``: PNG / JPEG files, class = subfolder, center-cropped to size;
- ``npz(path, key)``: an array of NHWC uint8 or NCHW float images (e.g. ADM's sample files);
- ``load_dataset(spec)``: all of the above by name.
"""
import math
import pickle
from pathlib import Path
from typing import NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


class Data(NamedTuple):
    x: Tensor
    y: Optional[Tensor] = None


def _from_uint8(images):
    """uint8 NCHW array -> float32 tensor in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div_(127.5).sub_(1.0)


# ---------------------------------------------------------------------------------------------
# 2-D toy data. Both sets are mixtures of "rings around a centre": component k is c_k + r_k u + s e
# with u uniform on the unit circle and e ~ N(0, I_2). With r_k = 0 it is a Gaussian at c_k ('gmm':
# 8 Gaussians on a circle); with c_k = 0 it is a ring of radius r_k ('rings': concentric rings).
# Its exact density at distance d from c_k is exp(-(d^2 + r_k^2) / 2s^2) I0(d r_k / s^2) / (2 pi s^2)
# = exp(-(d - r_k)^2 / 2s^2) i0e(d r_k / s^2) / (2 pi s^2), i0e(z) = exp(-z) I0(z) (finite for large z).
# ---------------------------------------------------------------------------------------------

class ToyModes(NamedTuple):
    centres: Tensor   # (K, 2)
    radii: Tensor     # (K,), 0 for a point mode
    std: float
    weights: Tensor   # (K,), sums to 1


def toy_modes(name):
    """The mixture behind toy set ``name``: 'gmm' (8 Gaussians, std 0.05, on a circle of radius
    0.7) or 'rings' (3 concentric rings, radii 0.25 / 0.5 / 0.75, radial std 0.025, mass
    proportional to the radius so that points are evenly spread along the rings)."""
    if name == "gmm":
        angles = torch.arange(8, dtype=torch.float64) * (2 * math.pi / 8)
        centres = 0.7 * torch.stack([angles.cos(), angles.sin()], dim=1)
        return ToyModes(centres, torch.zeros(8, dtype=torch.float64), 0.05, torch.full((8,), 1 / 8).double())
    if name == "rings":
        radii = torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
        return ToyModes(torch.zeros(3, 2, dtype=torch.float64), radii, 0.025, radii / radii.sum())
    raise ValueError(f"unknown toy data set {name!r}; expected 'rings' or 'gmm'")


def toy2d(name, n=10000, seed=0):
    """n points (n, 2) from toy set ``name``; y is the mixture component of each point. All
    but a negligible mass (> 5 std out) lies in [-1, 1]^2."""
    modes = toy_modes(name)
    g = torch.Generator().manual_seed(seed)
    k = torch.multinomial(modes.weights, n, replacement=True, generator=g)
    angle = torch.rand(n, generator=g, dtype=torch.float64) * (2 * math.pi)
    on_circle = torch.stack([angle.cos(), angle.sin()], dim=1) * modes.radii[k, None]
    x = modes.centres[k] + on_circle + modes.std * torch.randn(n, 2, generator=g, dtype=torch.float64)
    return Data(x.float(), k)


def _mode_distances(modes, x):
    """(N, K) distance of each point to each component's centre, in float64."""
    return torch.cdist(x.double().reshape(-1, 2), modes.centres)


def log_density(name, x):
    """Exact log density (float64, shape (N,)) of toy set ``name`` at points x (N, 2)."""
    modes = toy_modes(name)
    d = _mode_distances(modes, x)
    z = d * modes.radii / modes.std ** 2
    log_comp = (-(d - modes.radii) ** 2 / (2 * modes.std ** 2) + torch.special.i0e(z).log()
                - math.log(2 * math.pi * modes.std ** 2))
    return torch.logsumexp(log_comp + modes.weights.log(), dim=1)


def nearest_mode(name, x):
    """For points x (N, 2): the index of the nearest mode (a point for 'gmm', a circle for
    'rings') and the distance to it, in units of the set's std."""
    modes = toy_modes(name)
    dist = (_mode_distances(modes, x) - modes.radii).abs() / modes.std
    d, k = dist.min(dim=1)
    return k, d


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def digits(size=8, split="train"):
    """scikit-learn's bundled handwritten digits (1797 images of 1x8x8, values 0..16, labels 0..9),
    scaled to [-1, 1] and, for ``size=16``, upsampled bilinearly. Split: every fifth image
    (index % 5 == 4) is 'test' (359 images), the rest 'train' (1438); 'all' takes every one."""
    from sklearn.datasets import load_digits

    if size not in (8, 16):
        raise ValueError(f"digits: size must be 8 or 16, got {size!r}")
    bunch = load_digits()
    x = torch.from_numpy(bunch.images).float().div_(8).sub_(1).unsqueeze(1)
    y = torch.from_numpy(bunch.target).long()
    if split != "all":
        if split not in ("train", "test"):
            raise ValueError(f"digits: split must be 'train', 'test' or 'all', got {split!r}")
        keep = (torch.arange(len(x)) % 5 == 4) == (split == "test")
        x, y = x[keep], y[keep]
    if size == 16:
        x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    return Data(x.contiguous(), y)


CIFAR10_FILES = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}


def cifar10(root, split="train"):
    """CIFAR-10 from its python pickles (``root`` is the cifar-10-batches-py folder or its parent):
    50000 train or 10000 test images of 3x32x32 with labels 0..9. Pickles can run code when
    loaded: only read files you trust."""
    if split not in CIFAR10_FILES:
        raise ValueError(f"cifar10: split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    missing = [f for f in CIFAR10_FILES[split] if not (root / f).is_file()]
    if missing:
        raise FileNotFoundError(f"cifar10: {root} lacks {missing}; expected the CIFAR-10 python version "
                                f"(folder cifar-10-batches-py with data_batch_1..5 and test_batch)")
    xs, ys = [], []
    for name in CIFAR10_FILES[split]:
        path = root / name
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data = np.asarray(batch.get(b"data", batch.get("data")))
            labels = np.asarray(batch.get(b"labels", batch.get("labels")))
        except Exception as e:
            raise ValueError(f"cifar10: cannot read {path} as a CIFAR-10 pickle (a dict with b'data' and "
                             f"b'labels'): {e}") from e
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
            raise ValueError(f"cifar10: {path} holds data {data.dtype} {data.shape} and labels {labels.shape}; "
                             f"expected uint8 data (N, 3072) and N labels")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return Data(_from_uint8(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)).long())


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _center_crop(img, size):
    """Resize the shorter side to ``size`` (bicubic, antialiased) and cut the central size x size."""
    from PIL import Image

    scale = size / min(img.size)
    w, h = max(size, round(img.width * scale)), max(size, round(img.height * scale))
    img = img.resize((w, h), Image.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def image_folder(root, size=None, channels=3):
    """Every PNG / JPEG under ``root``, resized and center-cropped to size x size (default: the
    shorter side of the first image). Images in subfolders are labelled by subfolder (sorted
    names -> 0, 1, ...); with none, y is None."""
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image_folder: {root} is not a directory")
    if channels not in (1, 3):
        raise ValueError(f"image_folder: channels must be 1 or 3, got {channels!r}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise FileNotFoundError(f"image_folder: no images ({'/'.join(IMAGE_SUFFIXES)}) under {root}")
    images, labels = [], []
    for path in files:
        parts = path.relative_to(root).parts
        if classes and len(parts) == 1:
            raise ValueError(f"image_folder: {path} lies beside class subfolders {classes} of {root}; "
                             f"expected every image inside a class subfolder")
        try:
            with Image.open(path) as img:
                size = size or min(img.size)
                img = _center_crop(img.convert("RGB" if channels == 3 else "L"), size)
        except OSError as e:
            raise ValueError(f"image_folder: cannot read image {path}: {e}") from e
        images.append(np.asarray(img).reshape(size, size, channels))
        if classes:
            labels.append(classes.index(parts[0]))
    x = _from_uint8(np.stack(images).transpose(0, 3, 1, 2))
    return Data(x, torch.tensor(labels) if classes else None)


def npz(path, key="arr_0", label_key="arr_1"):
    """Images from a .npz file: NHWC uint8 (0..255, as ADM's sample files) or NCHW float already
    in [-1, 1], with 1 or 3 channels. Labels from ``label_key`` when the file has it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"npz: {path} does not exist")
    try:
        archive = np.load(path)
    except Exception as e:
        raise ValueError(f"npz: cannot read {path} as a .npz archive: {e}") from e
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"npz: {path} is a single array, expected a .npz archive (np.savez)")
    with archive:
        if key not in archive:
            raise KeyError(f"npz: {path} has no array {key!r}; it holds {list(archive.keys())}")
        arr, labels = archive[key], (archive[label_key] if label_key in archive else None)
    if arr.ndim == 4 and arr.dtype == np.uint8 and arr.shape[3] in (1, 3):
        x = _from_uint8(arr.transpose(0, 3, 1, 2))
    elif arr.ndim == 4 and np.issubdtype(arr.dtype, np.floating) and arr.shape[1] in (1, 3):
        if arr.size and (arr.min() < -1 - 1e-3 or arr.max() > 1 + 1e-3):
            raise ValueError(f"npz: {path}[{key!r}] is float in [{arr.min():.3g}, {arr.max():.3g}]; "
                             f"expected float images in [-1, 1]")
        x = torch.from_numpy(arr.astype(np.float32))
    else:
        raise ValueError(f"npz: {path}[{key!r}] is {arr.dtype} of shape {arr.shape}; expected NHWC uint8 "
                         f"(N, H, W, 1|3) or NCHW float (N, 1|3, H, W) in [-1, 1]")
    if labels is not None and labels.shape != (len(x),):
        raise ValueError(f"npz: {path}[{label_key!r}] has shape {labels.shape}; expected ({len(x)},) labels")
    return Data(x, None if labels is None else torch.from_numpy(labels.astype(np.int64)))


def load_dataset(spec, **kw):
    """A data set by spec: 'digits' (8x8), 'digits16', 'toy:rings', 'toy:gmm', 'cifar10:ROOT',
    'folder:ROOT' (images cut to the first one's shorter side unless keyword ``size`` says),
    'npz:PATH'; keywords go to the loader."""
    kind, _, arg = spec.partition(":")
    if kind in ("digits", "digits16") and not arg:
        return digits(size=16 if kind == "digits16" else 8, **kw)
    if kind == "toy" and arg:
        return toy2d(arg, **kw)
    loaders = {"cifar10": cifar10, "folder": image_folder, "npz": npz}
    if kind in loaders and arg:
        return loaders[kind](arg, **kw)
    raise ValueError(f"unknown data set spec {spec!r}; expected 'digits', 'digits16', 'toy:rings', 'toy:gmm', "
                     f"'cifar10:ROOT', 'folder:ROOT' or 'npz:PATH'")


# ---------------------------------------------------------------------------------------------
# Batches
# ---------------------------------------------------------------------------------------------

class BatchIterator:
    """Endless shuffled batches ``Data(x, y)`` of ``data`` for one rank of ``world_size``.

    Epoch e shuffles with ``torch.randperm`` seeded from (seed, e), the same on every rank; rank r
    takes every world_size-th index from r on (the few left over after an equal split are
    skipped this epoch), so ranks see disjoint samples. An epoch ends when fewer than
    ``batch_size`` of the rank's samples are left. ``state_dict()`` gives the position (epoch,
    index = samples of this epoch already served) and ``load_state_dict`` restores it, so a
    resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, data, batch_size, seed=0, rank=0, world_size=1):
        x, y = data
        if seed < 0:
            raise ValueError(f"BatchIterator: seed must be >= 0, got {seed}")
        if not 0 <= rank < world_size:
            raise ValueError(f"BatchIterator: rank must be in [0, world_size={world_size}), got {rank}")
        self.shard_size = len(x) // world_size
        if self.shard_size < batch_size:
            raise ValueError(f"BatchIterator: {len(x)} samples over {world_size} rank(s) give {self.shard_size} "
                             f"per rank, fewer than batch_size {batch_size}")
        self.x, self.y = x, y
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.epoch, self.index = 0, 0
        self._order = None

    def _shard(self):
        epoch_seed = np.random.SeedSequence([self.seed, self.epoch]).generate_state(1)[0]
        g = torch.Generator().manual_seed(int(epoch_seed))
        perm = torch.randperm(len(self.x), generator=g)
        return perm[self.rank:self.shard_size * self.world_size:self.world_size]

    def __iter__(self):
        return self

    def __next__(self):
        if self.index + self.batch_size > self.shard_size:
            self.epoch, self.index, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = self._shard()
        idx = self._order[self.index:self.index + self.batch_size]
        self.index += self.batch_size
        return Data(self.x[idx], None if self.y is None else self.y[idx])

    def state_dict(self):
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state):
        self.epoch, self.index, self._order = int(state["epoch"]), int(state["index"]), None
