"""Built-in and user data sets, and the sharded, resumable batch iterator."""
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from adv_dpm import data
from adv_dpm.data import BatchIterator, Data, load_dataset


# ---------------------------------------------------------------------------------------------
# toy 2-D
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,k", [("rings", 3), ("gmm", 8)])
def test_toy2d_samples(name, k):
    x, y = data.toy2d(name, n=4000, seed=1)
    assert x.shape == (4000, 2) and x.dtype == torch.float32 and y.shape == (4000,)
    assert x.abs().max() <= 1 and set(y.tolist()) == set(range(k))
    assert torch.equal(x, data.toy2d(name, n=4000, seed=1).x)
    assert not torch.equal(x, data.toy2d(name, n=4000, seed=2).x)
    # the modes are > 9 std apart: every point's nearest mode is its own component, within 5 std
    nearest, dist = data.nearest_mode(name, x)
    assert torch.equal(nearest, y) and dist.max() < 5


@pytest.mark.parametrize("name", ["rings", "gmm"])
def test_toy2d_log_density_integrates_to_one(name):
    step = 0.004
    ticks = torch.arange(-1.2, 1.2, step, dtype=torch.float64) + step / 2
    grid = torch.cartesian_prod(ticks, ticks)
    log_p = data.log_density(name, grid)
    assert log_p.dtype == torch.float64 and torch.isfinite(log_p).all()
    assert log_p.exp().sum().item() * step ** 2 == pytest.approx(1.0, abs=1e-3)


def test_toy2d_log_density_matches_the_samples():
    # the empirical mean of log p over samples estimates -entropy; compare with the grid value
    x = data.toy2d("gmm", n=20000, seed=0).x
    modes = data.toy_modes("gmm")
    # a mixture of well-separated isotropic Gaussians: -H = -log(2 pi e s^2) - log(8)
    expected = -np.log(2 * np.pi * np.e * modes.std ** 2) - np.log(8)
    assert data.log_density("gmm", x).mean().item() == pytest.approx(expected, abs=0.03)
    with pytest.raises(ValueError, match="unknown toy"):
        data.toy2d("moons", 10)


# ---------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------

def test_digits():
    train, test = data.digits(8, "train"), data.digits(8, "test")
    assert train.x.shape == (1438, 1, 8, 8) and test.x.shape == (359, 1, 8, 8)
    assert train.x.min() == -1 and train.x.max() == 1 and train.x.dtype == torch.float32
    assert set(train.y.tolist()) == set(range(10)) and len(data.digits(8, "all").x) == 1797
    big = data.digits(16, "test")
    assert big.x.shape == (359, 1, 16, 16) and big.x.min() >= -1 and big.x.max() <= 1
    assert torch.equal(big.y, test.y)
    with pytest.raises(ValueError, match="size must be 8 or 16"):
        data.digits(32)


def write_cifar(folder, sizes):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name, n in sizes.items():
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
        batches[name] = batch
    return batches


def test_cifar10_reads_the_python_pickles(tmp_path):
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    batches = write_cifar(tmp_path / "cifar-10-batches-py", {n: 2 + i for i, n in enumerate(names)})
    train = data.cifar10(tmp_path, "train")                       # the parent folder works too
    assert train.x.shape == (2 + 3 + 4 + 5 + 6, 3, 32, 32) and train.y.dtype == torch.int64
    first = batches["data_batch_1"][b"data"][0]                   # rows: 1024 red, 1024 green, 1024 blue
    assert train.x[0, 1, 2, 3].item() == pytest.approx(first[1024 + 2 * 32 + 3] / 127.5 - 1)
    assert train.y[:2].tolist() == batches["data_batch_1"][b"labels"]
    test = data.cifar10(tmp_path / "cifar-10-batches-py", "test")
    assert test.x.shape == (7, 3, 32, 32) and -1 <= test.x.min() and test.x.max() <= 1


def test_cifar10_errors_name_the_path(tmp_path):
    write_cifar(tmp_path / "c", {"test_batch": 2})
    with pytest.raises(FileNotFoundError, match=r"(?s)c\b.*data_batch_1"):
        data.cifar10(tmp_path / "c", "train")
    with open(tmp_path / "c" / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"test_batch.*expected uint8 data \(N, 3072\)"):
        data.cifar10(tmp_path / "c", "test")
    (tmp_path / "c" / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="cannot read .*test_batch"):
        data.cifar10(tmp_path / "c", "test")


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder(tmp_path):
    # 8 x 24 image: red | green | blue thirds -> the centre crop at size 8 is all green
    stripes = np.zeros((8, 24, 3), np.uint8)
    stripes[:, :8, 0], stripes[:, 8:16, 1], stripes[:, 16:, 2] = 255, 255, 255
    save_png(tmp_path / "b_class" / "stripes.png", stripes)
    save_png(tmp_path / "a_class" / "one.png", np.full((20, 20, 3), 255, np.uint8))
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "a_class" / "two.jpg")
    x, y = data.image_folder(tmp_path, size=8)
    assert x.shape == (3, 3, 8, 8) and y.tolist() == [0, 0, 1]
    assert torch.equal(x[0], torch.ones(3, 8, 8)) and x[1].max() < -0.9
    assert torch.equal(x[2, 1], torch.ones(8, 8)) and torch.equal(x[2, 0], -torch.ones(8, 8))
    gray = data.image_folder(tmp_path / "a_class", size=4, channels=1)
    assert gray.x.shape == (2, 1, 4, 4) and gray.y is None
    assert data.load_dataset(f"folder:{tmp_path}").x.shape == (3, 3, 20, 20)   # the first image's size


def test_image_folder_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        data.image_folder(tmp_path / "nowhere", 8)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"no images .* under .*empty"):
        data.image_folder(tmp_path / "empty", 8)
    (tmp_path / "empty" / "sub" / "broken.png").write_bytes(b"no png")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        data.image_folder(tmp_path / "empty", 8)


def test_npz_layouts(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 3), dtype=np.uint8)
    np.savez(tmp_path / "nhwc.npz", images, np.arange(5))
    x, y = data.npz(tmp_path / "nhwc.npz")
    assert x.shape == (5, 3, 6, 6) and y.tolist() == list(range(5))
    torch.testing.assert_close(x, torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1)
    floats = np.linspace(-1, 1, 2 * 1 * 4 * 4, dtype=np.float32).reshape(2, 1, 4, 4)
    np.savez(tmp_path / "nchw.npz", images=floats)
    x, y = data.npz(tmp_path / "nchw.npz", key="images")
    assert torch.equal(x, torch.from_numpy(floats)) and y is None


def test_npz_errors_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        data.npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "flat.npz", np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"flat\.npz.*shape \(4, 8, 8\); expected NHWC uint8"):
        data.npz(tmp_path / "flat.npz")
    with pytest.raises(KeyError, match=r"flat\.npz has no array 'images'"):
        data.npz(tmp_path / "flat.npz", key="images")
    np.savez(tmp_path / "range.npz", np.full((1, 3, 2, 2), 3.0))
    with pytest.raises(ValueError, match=r"range\.npz.*expected float images in \[-1, 1\]"):
        data.npz(tmp_path / "range.npz")
    np.save(tmp_path / "single.npy", np.zeros((1, 3, 2, 2)))
    with pytest.raises(ValueError, match=r"single\.npy is a single array"):
        data.npz(tmp_path / "single.npy")


def test_load_dataset_dispatch(tmp_path):
    assert load_dataset("digits", split="test").x.shape == (359, 1, 8, 8)
    assert load_dataset("digits16", split="test").x.shape == (359, 1, 16, 16)
    assert load_dataset("toy:gmm", n=10).x.shape == (10, 2)
    np.savez(tmp_path / "a.npz", np.zeros((2, 4, 4, 1), np.uint8))
    assert load_dataset(f"npz:{tmp_path / 'a.npz'}").x.shape == (2, 1, 4, 4)
    save_png(tmp_path / "imgs" / "c" / "x.png", np.zeros((5, 5, 3), np.uint8))
    assert load_dataset(f"folder:{tmp_path / 'imgs'}", size=4).x.shape == (1, 3, 4, 4)
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        load_dataset(f"cifar10:{tmp_path}")
    for bad in ("mnist", "cifar10", "toy"):
        with pytest.raises(ValueError, match="unknown data set spec"):
            load_dataset(bad)


# ---------------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------------

def indexed(n):
    """Samples whose value is their index."""
    return Data(torch.arange(n).float()[:, None], torch.arange(n))


def test_batches_are_disjoint_across_ranks():
    world, batch, n = 3, 4, 40                           # 13 per rank: 3 batches an epoch, 1 left
    its = [BatchIterator(indexed(n), batch, seed=5, rank=r, world_size=world) for r in range(world)]
    for epoch in range(2):
        seen = [torch.cat([next(it).y for _ in range(3)]) for it in its]
        flat = torch.cat(seen)
        assert len(flat) == 36 and len(set(flat.tolist())) == 36, f"epoch {epoch}: ranks overlap"
        assert all(it.state_dict() == {"epoch": epoch, "index": 12} for it in its)
    assert next(its[0]).x.shape == (batch, 1) and its[0].state_dict() == {"epoch": 2, "index": 4}


def test_epochs_reshuffle_and_labels_follow_samples():
    it = BatchIterator(indexed(8), 8, seed=0)
    first, second = next(it), next(it)
    assert sorted(first.y.tolist()) == sorted(second.y.tolist()) == list(range(8))
    assert not torch.equal(first.y, second.y) and torch.equal(first.x[:, 0].long(), first.y)
    unlabelled = BatchIterator(Data(torch.zeros(8, 2)), 4)
    assert next(unlabelled).y is None


def test_resume_gives_the_same_batches():
    it = BatchIterator(indexed(30), 7, seed=3, rank=1, world_size=2)   # 15 per rank: 2 batches an epoch
    for _ in range(5):
        next(it)
    state = it.state_dict()
    expected = [next(it).y for _ in range(6)]
    resumed = BatchIterator(indexed(30), 7, seed=3, rank=1, world_size=2)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, next(resumed).y) for a in expected)


def test_iterator_errors():
    with pytest.raises(ValueError, match="fewer than batch_size"):
        BatchIterator(indexed(10), 6, world_size=2)
    with pytest.raises(ValueError, match="rank"):
        BatchIterator(indexed(10), 2, rank=2, world_size=2)
